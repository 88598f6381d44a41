"""Run megatron-core on a machine without CUDA (gloo, fp32, the local layer spec).

megatron-core assumes a GPU in a handful of places that have nothing to do with the maths. Five
small patches make those places run on the CPU; ``apply_cpu_patches()`` applies them once per
process and does nothing at all when CUDA is present, so a GPU run never sees them.

1. ``torch.cuda.current_device()`` returns ``"cpu"``: ~40 allocation sites (global memory buffer,
   RoPE frequencies, grad buffers) pass it as ``device=``.
2. ``torch.cuda.synchronize()`` is a no-op: the p2p pipeline code and the async checkpoint writer
   synchronise the (absent) device.
3. The CUDA RNG is mapped onto the CPU default generator (``torch.cuda.get/set_rng_state``,
   ``torch.cuda.manual_seed`` and megatron's ``tensor_parallel.random._get/_set_cuda_rng_state``):
   ``model_parallel_cuda_manual_seed`` and the RNG tracker's ``fork()`` (dropout inside tensor
   parallel regions, activation recompute) read and write it.
4. A ``TorchFunctionMode`` maps ``device="cuda"``, ``.cuda()`` and ``.to("cuda")`` onto the CPU:
   pipeline schedules, DDP grad buffers and the optimizer hard-code CUDA tensors. The mode is
   entered once for the main thread (torch function modes are thread-local); megatron's CPU work
   happens there.
5. ``Tensor.type()`` (no arguments) reports ``torch.cuda.*`` names for CPU tensors: the optimizer's
   grad clipping asserts ``param.grad.type() == 'torch.cuda.FloatTensor'`` and picks fp32/bf16 code
   paths from the same strings.

Keep off on CPU (they need TE/apex, see ``pear_mega.models.build``): ``apply_rope_fusion``,
``gradient_accumulation_fusion``, ``sequence_parallel``, ``persist_layer_norm``.
"""

from __future__ import annotations

import threading

_LOCK = threading.Lock()
_APPLIED = False
_MODE = None  # the entered TorchFunctionMode (kept alive for the life of the process)


def patches_applied() -> bool:
    """True once ``apply_cpu_patches()`` has patched this process."""
    return _APPLIED


def _is_cuda_device(device) -> bool:
    import torch

    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    # A bare int is a CUDA ordinal in every torch API that takes `device=`; bool is an int too.
    return isinstance(device, int) and not isinstance(device, bool)


def _make_mode():
    import torch
    from torch.overrides import TorchFunctionMode

    tensor_cuda = torch.Tensor.cuda
    tensor_to = torch.Tensor.to
    tensor_pin = torch.Tensor.pin_memory

    class CudaToCpuMode(TorchFunctionMode):
        """Rewrites CUDA placements to the CPU; everything else passes through unchanged."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is tensor_cuda or func is tensor_pin:
                return args[0]
            if func is tensor_to:
                args = tuple("cpu" if _is_cuda_device(a) else a for a in args)
            if "device" in kwargs and _is_cuda_device(kwargs["device"]):
                kwargs = dict(kwargs, device="cpu")
            if kwargs.get("pin_memory"):
                # Pinned host memory needs a CUDA driver; plain CPU memory is equivalent here.
                kwargs = dict(kwargs, pin_memory=False)
            return func(*args, **kwargs)

    return CudaToCpuMode()


def apply_cpu_patches() -> bool:
    """Patch torch and megatron-core for CPU execution; idempotent.

    Returns:
        True when the patches are active in this process after the call, False when CUDA is
        present (then nothing is patched).
    """
    global _APPLIED, _MODE
    import torch

    from pear_mega.platform import use_gpu

    if use_gpu():
        return False
    with _LOCK:
        if _APPLIED:
            return True

        # 1. Allocation sites pass `device=torch.cuda.current_device()`.
        torch.cuda.current_device = lambda: "cpu"
        # 2. Synchronising an absent device is meaningless; the callers only need ordering.
        torch.cuda.synchronize = lambda device=None: None

        # 3. The "CUDA" RNG is the CPU default generator.
        def get_rng_state(device="cuda"):
            return torch.get_rng_state()

        def set_rng_state(new_state, device="cuda"):
            torch.set_rng_state(new_state)

        torch.cuda.get_rng_state = get_rng_state
        torch.cuda.random.get_rng_state = get_rng_state
        torch.cuda.set_rng_state = set_rng_state
        torch.cuda.random.set_rng_state = set_rng_state
        torch.cuda.manual_seed = torch.manual_seed
        torch.cuda.random.manual_seed = torch.manual_seed

        from megatron.core.tensor_parallel import random as mcore_random

        mcore_random._get_cuda_rng_state = (
            lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
        )
        mcore_random._set_cuda_rng_state = (
            lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
        )

        # 5. The optimizer asserts/selects on CUDA type strings.
        original_type = torch.Tensor.type

        def tensor_type(self, *args, **kwargs):
            if args or kwargs:
                return original_type(self, *args, **kwargs)
            name = original_type(self)
            if self.device.type == "cpu" and name.startswith("torch.") and ".cuda." not in name:
                return "torch.cuda." + name[len("torch.") :]
            return name

        torch.Tensor.type = tensor_type

        # 4. Hard-coded CUDA placements go to the CPU (entered last: the lines above must not
        # run under the mode).
        _MODE = _make_mode()
        _MODE.__enter__()
        _APPLIED = True
        return True
