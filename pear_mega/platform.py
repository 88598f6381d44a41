"""The one switch per GPU-only code path.

``use_gpu()`` decides between nccl/gloo, GPU/CPU tensors and bf16/fp32 defaults; ``te_available()``
decides between megatron's Transformer Engine layer spec and its local (pure PyTorch) spec (a TE
that is installed but broken is an error, not a silent fallback).
Both are cached: the answer cannot change within a process. What runs only on CPU is in
``pear_mega.cpu``.
"""

from __future__ import annotations

import functools


@functools.cache
def use_gpu() -> bool:
    """True when a CUDA device is visible to this process."""
    import torch

    return torch.cuda.is_available()


# megatron-core 0.16.1 declares transformer-engine[pytorch] >=2.9.0a0,<2.12.0 (setup.py pins the same)
TE_RANGE = ">=2.9,<2.12"


class TransformerEngineError(RuntimeError):
    """Transformer Engine is installed but unusable: silently falling back to the local layer spec
    would run a large model without its fused kernels."""


@functools.cache
def te_available() -> bool:
    """True when Transformer Engine imports together with megatron's TE extension; False when it is
    not installed.

    Raises:
        TransformerEngineError: TE is installed but it, its PyTorch extension or megatron's TE
            extension fails to import (a build for another CUDA or torch, a partial install); the
            message carries the import error. Fix the install, or set ``model.use_te=false`` to
            run the local spec knowingly.
    """
    import importlib.util

    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine
        import transformer_engine.pytorch  # noqa: F401
        from megatron.core.extensions import transformer_engine as _mcore_te  # noqa: F401
    except Exception as exc:  # noqa: BLE001 (a broken TE build raises anything at import)
        spec = importlib.util.find_spec("transformer_engine")
        where = spec.origin or (list(spec.submodule_search_locations or []) or ["?"])[0]
        raise TransformerEngineError(
            f"Transformer Engine is installed ({where}) but does not import: {type(exc).__name__}: {exc}. "
            f"megatron-core 0.16.1 needs transformer-engine[pytorch]{TE_RANGE} built for this torch and CUDA; "
            "reinstall it, or set model.use_te=false to train with the local layer spec (no TE fusions)"
        ) from exc
    return True


def te_version() -> str | None:
    """The installed Transformer Engine version (package metadata, nothing imported), or None."""
    from importlib import metadata

    for name in ("transformer-engine", "transformer_engine"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def quiet_fallback_warnings() -> None:
    """Silence megatron-core's import-time notices that TE/Apex are absent (expected on CPU).

    Entry points call this once; the choice of layer spec is logged by ``build_gpt_model`` instead.
    """
    import warnings

    for pattern in (r"Transformer Engine and Apex are not installed", r"Apex is not installed",
                    r"full scope is deprecated"):
        warnings.filterwarnings("ignore", message=pattern, category=UserWarning)
