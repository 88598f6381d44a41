"""The one switch per GPU-only code path.

``use_gpu()`` decides between nccl/gloo, GPU/CPU tensors and bf16/fp32 defaults; ``te_available()``
decides between megatron's Transformer Engine layer spec and its local (pure PyTorch) spec.
Both are cached: the answer cannot change within a process. ``torch_threads`` scopes the CPU
thread count of a block (engine work on CPU, the host-staging writes).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator


@functools.cache
def use_gpu() -> bool:
    """True when a CUDA device is visible to this process."""
    import torch

    return torch.cuda.is_available()


@functools.cache
def te_available() -> bool:
    """True when Transformer Engine imports together with megatron's TE extension.

    A partial TE install makes ``megatron.core.extensions.transformer_engine`` raise at import, so
    both imports are tried; any failure means "no TE".
    """
    try:
        import transformer_engine
        import transformer_engine.pytorch  # noqa: F401
        from megatron.core.extensions import transformer_engine as _mcore_te  # noqa: F401
    except Exception:  # noqa: BLE001 (a broken TE build raises anything at import)
        return False
    return True


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch threads (None: unchanged), then restore the count."""
    import torch

    before = torch.get_num_threads()
    if threads is None or threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def quiet_fallback_warnings() -> None:
    """Silence megatron-core's import-time notices that TE/Apex are absent (expected on CPU).

    Entry points call this once; the choice of layer spec is logged by ``build_gpt_model`` instead.
    """
    import warnings

    for pattern in (r"Transformer Engine and Apex are not installed", r"Apex is not installed",
                    r"full scope is deprecated"):
        warnings.filterwarnings("ignore", message=pattern, category=UserWarning)
