"""The matrix multiply of megatron's tensor-parallel linear layers on CPU (local layer spec).

megatron's ``ColumnParallelLinear`` / ``RowParallelLinear`` call ``self._forward_impl(input,
weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel, ...)``, which is
``LinearWithGradAccumulationAndAsyncCommunication``:

    forward    y = x Wᵀ (+ b)                 x [s, b, k], W [n, k] → y [s, b, n]
    backward   dx = dy W  (all-reduced over TP when allreduce_dgrad)
               dW = dyᵀ x  (a fresh [n, k] tensor, added to DDP's fp32 ``main_grad`` by a hook)

``install_cpu_linear(model)`` replaces ``_forward_impl`` on every such layer with ``cpu_linear``:
the same maths and the same tensor-parallel communication, with two differences that only change
speed:

1. **bf16/fp16 GEMMs run in fp32.** The operands are upcast and the fp32 product is rounded once
   to the activation dtype: the result of a bf16 GEMM with fp32 accumulation (what cuBLAS and
   oneDNN compute), up to summation order. On CPUs without bf16 instructions (AVX2, AVX-512F)
   torch's bf16 GEMMs fall back to kernels over an order of magnitude slower than its fp32 GEMM
   (docs/benchmarks.md, "SFT step", bf16).
2. **Weight gradients accumulate into ``main_grad`` inside the GEMM** (``main_grad.addmm_(dyᵀ,
   x)``, β = 1) once ``enable_main_grad_accumulation`` has switched the layer's
   ``gradient_accumulation_fusion`` on, which ``pear_mega.optim.wrap_ddp`` does. This is
   megatron's gradient-accumulation fusion (apex's ``wgrad_gemm_accum_fp32`` on GPU): no
   weight-sized gradient tensor per microbatch and no separate ``main_grad.add_`` pass. The
   layer then returns no gradient for the weight, so autograd never calls DDP's per-parameter
   hook for it; that hook only adds ``param.grad`` into ``main_grad`` when
   ``overlap_grad_reduce=False`` (``wrap_ddp``'s setting), so nothing is lost. Tied weights
   (the output layer reusing the word embeddings) still receive the embedding's gradient through
   the hook. In bf16 the accumulated product is fp32, not a bf16-rounded gradient.

Not supported (megatron features that need CUDA anyway, ValueError): sequence parallelism and
deferred embedding weight-gradient computation.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _fp32(t: Tensor) -> Tensor:
    return t.float() if t.dtype in _LOW_PRECISION else t


def _matmul(a: Tensor, b: Tensor, *, transpose_b: bool = False) -> Tensor:
    """``a @ b`` (``a @ bᵀ`` with ``transpose_b``) for ``a [..., k]``, in fp32, in ``a``'s dtype.

    The leading dims of ``a`` are flattened into one explicit 2-D GEMM: torch.matmul does not
    fold a non-contiguous 3-D operand (the logits gradient is a transposed view) and falls back
    to a batched matmul. Operands are upcast before any transpose, so the copies stay contiguous.
    """
    a2 = a.reshape(-1, a.shape[-1])
    b32 = _fp32(b)
    rhs = b32.t() if transpose_b else b32
    # The result is allocated in its final shape and written through a 2-D view, so what is
    # returned is a base tensor, not a view: a custom Function's output that is a view may not be
    # modified in place later (vocab_parallel_cross_entropy does that to the logits).
    result = torch.empty(*a.shape[:-1], rhs.shape[1], dtype=a.dtype, device=a.device)
    if a.dtype in _LOW_PRECISION:
        result.view(-1, rhs.shape[1]).copy_(torch.mm(_fp32(a2), rhs))
    else:
        torch.mm(a2, rhs, out=result.view(-1, rhs.shape[1]))
    return result


class _CpuLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, accumulate_main_grad, allreduce_dgrad, tp_group):
        ctx.save_for_backward(input, weight)
        ctx.use_bias = bias is not None
        ctx.accumulate_main_grad = accumulate_main_grad
        ctx.allreduce_dgrad = allreduce_dgrad
        ctx.tp_group = tp_group
        output = _matmul(input, weight, transpose_b=True)
        return output + bias if bias is not None else output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        grad_input = _matmul(grad_output, weight) if ctx.needs_input_grad[0] else None
        handle = None
        if ctx.allreduce_dgrad and grad_input is not None:
            # Overlaps the weight-gradient GEMM below, as megatron's implementation does.
            handle = dist.all_reduce(grad_input, group=ctx.tp_group, async_op=True)
        grad_2d = grad_output.reshape(-1, grad_output.shape[-1])  # [s*b, n]
        input_2d = input.reshape(-1, input.shape[-1])  # [s*b, k]
        grad_weight = None
        if ctx.needs_input_grad[1]:
            main_grad = getattr(weight, "main_grad", None) if ctx.accumulate_main_grad else None
            if main_grad is not None and main_grad.dtype == torch.float32:
                main_grad.addmm_(_fp32(grad_2d).t(), _fp32(input_2d))
            else:
                grad_weight = torch.mm(_fp32(grad_2d).t(), _fp32(input_2d)).to(weight.dtype)
        grad_bias = grad_2d.sum(dim=0) if ctx.use_bias else None
        if handle is not None:
            handle.wait()
        return grad_input, grad_weight, grad_bias, None, None, None


def cpu_linear(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    gradient_accumulation_fusion: bool,
    allreduce_dgrad: bool,
    sequence_parallel: bool,
    grad_output_buffer=None,
    wgrad_deferral_limit=None,
    tp_group=None,
) -> Tensor:
    """Drop-in for megatron's ``linear_with_grad_accumulation_and_async_allreduce`` (see module doc).

    Args:
        input: ``[s, b, k]`` activations (this rank's columns for a row-parallel layer).
        weight: ``[n, k]``, this rank's shard.
        bias: ``[n]`` or None.
        gradient_accumulation_fusion: accumulate the weight gradient into ``weight.main_grad``
            (fp32) instead of returning it.
        allreduce_dgrad: all-reduce the input gradient over ``tp_group`` (column-parallel, TP > 1).
        sequence_parallel, grad_output_buffer, wgrad_deferral_limit: must be off / None.
        tp_group: the tensor-parallel group (needed when ``allreduce_dgrad``).
    Returns:
        ``[s, b, n]`` in ``input``'s dtype.
    """
    if sequence_parallel:
        raise ValueError("cpu_linear: sequence parallelism needs a GPU (keep parallel.sequence_parallel off)")
    if grad_output_buffer is not None:
        raise ValueError("cpu_linear: defer_embedding_wgrad_compute is not supported")
    if allreduce_dgrad and tp_group is None:
        from megatron.core import parallel_state

        tp_group = parallel_state.get_tensor_model_parallel_group()
    return _CpuLinear.apply(input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, tp_group)


def _linear_layers(model: torch.nn.Module):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    return [m for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]


def install_cpu_linear(model: torch.nn.Module) -> int:
    """Route every megatron tensor-parallel linear layer of ``model`` through ``cpu_linear``.

    Returns the number of layers changed. ``gradient_accumulation_fusion`` stays as configured
    (off on CPU) until ``enable_main_grad_accumulation``.
    """
    layers = _linear_layers(model)
    for layer in layers:
        layer._forward_impl = cpu_linear  # an instance attribute shadows the class's method
    return len(layers)


def enable_main_grad_accumulation(model: torch.nn.Module) -> int:
    """Accumulate weight gradients straight into DDP's ``main_grad`` in the ``cpu_linear`` layers.

    Call on a model wrapped in megatron DDP with ``overlap_grad_reduce=False`` (see the module
    docstring for why that setting is required). Returns the number of layers switched.
    """
    layers = [m for m in _linear_layers(model) if m.__dict__.get("_forward_impl") is cpu_linear]
    for layer in layers:
        layer.gradient_accumulation_fusion = True
    return len(layers)
