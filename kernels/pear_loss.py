"""Fused, vocab-parallel PEAR loss: ``fused_pear_loss``.

For logits sharded over the vocabulary across a tensor-parallel group (rank r holds global columns
``[vocab_start, vocab_start + V_local)``), one call computes the PEAR loss of ``pear_mega.pear``
without materializing softmax, log-softmax or any other ``[T, V]`` fp32 copy:

    forward   per-row (max, Σexp, Σexp·x, target logit) of the local shard       1 read of logits
              ONE all_gather of the [T, 4] stats over the TP group → log Z, logp_θ, entropy
              per-sequence suffix scan → log G (detached), loss = Σ mask·G·s·(−logp_θ) / norm
    backward  grad = G·s/norm · (softmax − onehot(label))                          1 read + 1 write

With ``config.target_temperature`` τ ≠ 1 the weight's δ uses the tempered log-prob
log softmax(x/τ)[label] of πθ (the distribution RL rollouts at temperature τ will sample from), from
a fifth per-row statistic in the same pass and the same collective; the loss term −logp_θ, the
returned ``logprobs``, the entropy and the gradient stay at temperature 1 (the weights are detached).

Every TP rank computes the same loss, log-probs, weights and entropy; each receives the gradient of
its own shard (no collective in backward). Two backends with the same semantics: ``"triton"``
(CUDA, or CPU under ``TRITON_INTERPRET=1``) and ``"torch"`` (chunked PyTorch); ``"auto"`` picks
Triton for CUDA tensors and PyTorch otherwise.

Validated (clear ValueError): shapes, dtypes, labels in [0, V_global) or -100, cu_seqlens (integer,
starts at 0, ends at T, non-decreasing), finite behavior log-probs on loss tokens. NOT validated:
finiteness of the logits (it would cost a full extra read); a NaN/inf logit propagates into loss.
Validation costs one device→host sync; pass ``check_inputs=False`` to skip it in a tuned loop.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from pear_mega.pear import IGNORE_INDEX, PearConfig, PearLossOutput

from .pear_torch import grad_torch, log_weights_torch, row_stats_torch

BACKENDS = ("auto", "triton", "torch")
_FLOAT_LOGITS = (torch.float32, torch.bfloat16, torch.float16)


def _backend_fns(backend: str):
    if backend == "triton":
        # Imported lazily: TRITON_INTERPRET must be set before triton loads (CPU tests).
        from . import pear_triton

        return pear_triton.row_stats_triton, pear_triton.log_weights_triton, pear_triton.grad_triton
    return row_stats_torch, _log_weights_from_labels, grad_torch


def _log_weights_from_labels(logp_theta, logp_beta, labels, cu_seqlens, config):
    return log_weights_torch(logp_theta, logp_beta, labels != IGNORE_INDEX, cu_seqlens, config)


def _combine_tp_stats(stats: Tensor, tp_group, inv_temperature: float | None = None) -> Tensor:
    """Merge per-shard (m, s, w, tgt[, s_τ]) ``[T, 4 or 5]`` into global ones with a single all_gather."""
    world = dist.get_world_size(tp_group) if tp_group is not None else 1
    if world == 1:
        return stats
    return merge_shard_stats(all_gather_rows(stats, tp_group), inv_temperature)


def merge_shard_stats(per_shard: Tensor, inv_temperature: float | None = None) -> Tensor:
    """Global (m, s, w, tgt[, s_τ]) ``[T, 4 or 5]`` from every vocab shard's ``[world, T, 4 or 5]``."""
    m_r, s_r, w_r, t_r, *st_r = per_shard.unbind(-1)  # each [world, T]
    m = m_r.max(dim=0).values
    m_safe = torch.where(torch.isinf(m), 0.0, m)
    scale = torch.exp(m_r - m_safe)  # 0 for shards that are pure padding (m_r = -inf)
    s = (scale * s_r).sum(0)
    w = (scale * torch.where(s_r > 0, w_r + (m_r - m_safe) * s_r, 0.0)).sum(0)
    merged = [m, s, w, t_r.sum(0)]
    if st_r:  # s_τ rescales by exp((m_r − m)/τ)
        merged.append((torch.exp((m_r - m_safe) * inv_temperature) * st_r[0]).sum(0))
    return torch.stack(merged, dim=-1)


def all_gather_rows(stats: Tensor, tp_group) -> Tensor:
    """``[T, C]`` per-row statistics of every rank of ``tp_group`` → ``[world, T, C]`` (one all_gather)."""
    world = dist.get_world_size(tp_group)
    # Concatenated (not stacked) output: the one layout every backend accepts, gloo included.
    gathered = stats.new_empty((world * stats.shape[0], stats.shape[1]))
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # torch < 2.13
    all_gather(gathered, stats.contiguous(), group=tp_group)
    return gathered.view(world, *stats.shape)


def pear_log_weights(
    logp_theta: Tensor, logp_beta: Tensor, labels: Tensor, cu_seqlens: Tensor, config: PearConfig, *,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """PEAR log weights of a pack on the device, shared by every fused loss (see ``pear_mega.pear``).

    logp_theta, logp_beta: ``[T]`` log πθ / log πβ of the labels; labels: ``[T]`` (-100 = no loss);
    cu_seqlens: ``[B+1]``. Returns ``(log_weights [T] fp32, inv_count [T] fp32, nonempty 0-dim)``:
    log G_t after both clips (0 where masked), 1 / (loss tokens of t's sequence) on loss tokens, and
    the number of sequences with a loss token. ``backend``: "auto" (Triton for CUDA tensors),
    "triton" (CUDA or ``TRITON_INTERPRET=1``) or "torch" (vectorized, no host sync).
    """
    if backend not in BACKENDS:
        raise ValueError(f"pear_log_weights: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if labels.is_cuda else "torch"
    return _backend_fns(backend)[1](logp_theta, logp_beta, labels, cu_seqlens, config)


def loss_coefficients(
    log_w: Tensor, inv_count: Tensor, nonempty: Tensor, mask: Tensor, config: PearConfig, normalizer: Tensor | None
) -> tuple[Tensor, Tensor]:
    """``(coef [T] fp32, denom 0-dim)`` with loss = Σ_t coef_t · ℓ_t / denom for any per-token loss
    ℓ_t: coef = mask · G · s (s = ``inv_count`` for ``normalization="sequences"``, else 1); denom =
    ``normalizer`` or the default of ``config.normalization``. No host sync."""
    coef = torch.where(mask, torch.exp(log_w), 0.0)
    if config.normalization == "sequences":
        coef = coef * inv_count
    if normalizer is not None:
        denom = normalizer
    elif config.normalization == "tokens":
        denom = mask.sum().float().clamp_min(1.0)
    elif config.normalization == "sequences":
        denom = nonempty.float().clamp_min(1.0)
    else:
        total = coef.sum()
        denom = torch.where(total > 0, total, 1.0)
    return coef, denom


class _FusedPearLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, logits, labels, behavior_logprobs, cu_seqlens, config, tp_group, vocab_start, n_valid,
        normalizer, inplace_backward, backend,
    ):  # fmt: skip
        row_stats, log_weights_fn, grad_fn = _backend_fns(backend)
        mask = labels != IGNORE_INDEX
        inv_t = None if config.target_temperature == 1.0 else 1.0 / config.target_temperature
        stats = _combine_tp_stats(row_stats(logits, labels, vocab_start, n_valid, inv_t), tp_group, inv_t)
        m, s, w, tgt, *s_t = stats.unbind(-1)
        log_s = torch.log(s)
        log_z = m + log_s
        logp = torch.where(mask, tgt - log_z, 0.0)
        entropy = log_s - w / s
        # log πθ at the target temperature τ: tgt/τ − (m/τ + log s_τ)
        logp_w = logp if inv_t is None else torch.where(mask, (tgt - m) * inv_t - torch.log(s_t[0]), 0.0)
        log_w, inv_count, nonempty = log_weights_fn(logp_w, behavior_logprobs, labels, cu_seqlens, config)
        coef, denom = loss_coefficients(log_w, inv_count, nonempty, mask, config, normalizer)
        loss = (coef * -logp).sum() / denom
        ctx.save_for_backward(logits, labels, log_z, coef / denom)
        ctx.grad_fn, ctx.vocab_start, ctx.n_valid, ctx.inplace = grad_fn, vocab_start, n_valid, inplace_backward
        ctx.mark_non_differentiable(logp, log_w, entropy)
        return loss, logp, log_w, entropy

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        logits, labels, log_z, coef = ctx.saved_tensors
        out = logits if ctx.inplace else torch.empty_like(logits)
        grad = ctx.grad_fn(logits, labels, log_z, (coef * grad_loss).float().contiguous(),
                           ctx.vocab_start, ctx.n_valid, out)  # fmt: skip
        return grad, None, None, None, None, None, None, None, None, None, None


def fused_pear_loss(
    logits: Tensor,
    labels: Tensor,
    behavior_logprobs: Tensor,
    cu_seqlens: Tensor,
    config: PearConfig,
    tp_group=None,
    vocab_start: int = 0,
    normalizer: float | Tensor | None = None,
    vocab_size: int | None = None,
    inplace_backward: bool = False,
    *,
    backend: str = "auto",
    check_inputs: bool = True,
) -> PearLossOutput:
    """PEAR loss from vocab-parallel logits (weights detached; see ``pear_mega.pear``).

    Args:
        logits: ``[T, V_local]`` fp32/bf16/fp16, this rank's vocab shard (last dim contiguous).
        labels: ``[T]`` int64 global token ids; -100 = no loss.
        behavior_logprobs: ``[T]`` float, log πβ(labels[t]); ignored where labels == -100.
        cu_seqlens: ``[B+1]`` int32/int64 sequence boundaries of the pack (0 … T).
        config: the PEAR variant, clips and normalization.
        tp_group: tensor-parallel process group of the vocab shards (None = no TP).
        vocab_start: global id of this shard's first column.
        normalizer: denominator replacing the default of ``config.normalization`` (float > 0, or a
            0-dim tensor such as the global loss-token count over microbatches and DP ranks).
        vocab_size: global unpadded vocab; columns with global id >= vocab_size are excluded from
            the softmax and get zero gradient. Default: V_local · TP size (no padding).
        inplace_backward: write the gradient into ``logits``' storage (saves a ``[T, V_local]``
            buffer; the caller must not use the logits after backward).
        backend: "auto" (Triton for CUDA tensors, PyTorch otherwise), "triton" or "torch".
        check_inputs: run the validation (one device→host sync).

    Returns:
        PearLossOutput(loss 0-dim fp32, logprobs [T], log_weights [T], entropy [T]); the per-token
        tensors are fp32 and detached, logprobs/log_weights are 0 where labels == -100.
    """
    if not isinstance(config, PearConfig):
        raise ValueError(f"fused_pear_loss: config must be a PearConfig, got {type(config).__name__}")
    backend, _, n_valid, denom = check_loss_inputs(
        "fused_pear_loss", logits, labels, behavior_logprobs, cu_seqlens, tp_group, vocab_start, normalizer,
        vocab_size, backend, check_inputs,
    )  # fmt: skip
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    loss, logp, log_w, entropy = _FusedPearLoss.apply(
        logits, labels.contiguous(), behavior_logprobs.float().contiguous(), cu_seqlens.contiguous(),
        config, tp_group, vocab_start, n_valid, denom, inplace_backward, backend,
    )  # fmt: skip
    return PearLossOutput(loss=loss, logprobs=logp, log_weights=log_w, entropy=entropy)


def check_loss_inputs(
    name: str, logits: Tensor, labels: Tensor, behavior_logprobs: Tensor, cu_seqlens: Tensor, tp_group,
    vocab_start: int, normalizer, vocab_size: int | None, backend: str, check_inputs: bool,
) -> tuple[str, int, int, Tensor | None]:
    """The argument checks every fused loss shares (``fused_pear_loss``, ``fused_pear_kd_loss``),
    each ValueError prefixed with ``name``: backend, shapes / dtypes / devices of the ``[T, V_local]``
    logits and the ``[T]`` / ``[B+1]`` inputs, ``vocab_size``, then (``check_inputs``: one
    device→host sync) label ids, behavior log-probs and cu_seqlens, then ``normalizer``.

    Returns:
        ``(backend, v_global, n_valid, denom)``: the backend with "auto" resolved (Triton for CUDA
        logits), the global unpadded vocab (default V_local · TP size), how many of this shard's
        columns are below it, and the normalizer as a 0-dim fp32 tensor (None = the default).
    """
    if backend not in BACKENDS:
        raise ValueError(f"{name}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if logits.is_cuda else "torch"
    tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
    _check_shapes(logits, labels, behavior_logprobs, cu_seqlens, vocab_start, name)
    V_local = logits.shape[1]
    v_global = V_local * tp_size if vocab_size is None else vocab_size
    if not isinstance(v_global, int) or v_global < 1:
        raise ValueError(f"{name}: vocab_size must be a positive int, got {vocab_size!r}")
    if check_inputs:
        _check_values(labels, behavior_logprobs, cu_seqlens, v_global, name)
    denom = _normalizer_tensor(normalizer, logits.device, name)
    return backend, v_global, max(0, min(V_local, v_global - vocab_start)), denom


def _normalizer_tensor(normalizer, device, name: str) -> Tensor | None:
    if normalizer is None:
        return None
    if isinstance(normalizer, Tensor):
        if normalizer.dim() != 0:
            raise ValueError(f"{name}: normalizer must be 0-dim, got shape {tuple(normalizer.shape)}")
        return normalizer.detach().to(device=device, dtype=torch.float32)
    if isinstance(normalizer, bool) or not isinstance(normalizer, (int, float)):
        raise ValueError(f"{name}: normalizer must be a number or 0-dim tensor, got {normalizer!r}")
    if not (math.isfinite(normalizer) and normalizer > 0):
        raise ValueError(f"{name}: normalizer must be finite and > 0, got {normalizer!r}")
    return torch.tensor(float(normalizer), dtype=torch.float32, device=device)


def _check_shapes(logits, labels, behavior_logprobs, cu_seqlens, vocab_start, name: str) -> None:
    if logits.dim() != 2:
        raise ValueError(f"{name}: logits must be [T, V_local], got shape {tuple(logits.shape)}")
    if logits.dtype not in _FLOAT_LOGITS:
        raise ValueError(f"{name}: logits dtype must be fp32/bf16/fp16, got {logits.dtype}")
    T, V_local = logits.shape
    if T == 0 or V_local == 0:
        raise ValueError(f"{name}: logits must be non-empty, got shape {tuple(logits.shape)}")
    if labels.shape != (T,):
        raise ValueError(f"{name}: labels must have shape [{T}] (logits rows), got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name}: labels must be int64 (or int32), got {labels.dtype}")
    if behavior_logprobs.shape != (T,):
        raise ValueError(
            f"{name}: behavior_logprobs must have shape [{T}], got {tuple(behavior_logprobs.shape)}"
        )
    if not behavior_logprobs.is_floating_point():
        raise ValueError(f"{name}: behavior_logprobs must be floating point, got {behavior_logprobs.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{name}: cu_seqlens must be [B+1] with B >= 1, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    for arg, t in (("labels", labels), ("behavior_logprobs", behavior_logprobs), ("cu_seqlens", cu_seqlens)):
        if t.device != logits.device:
            raise ValueError(f"{name}: {arg} is on {t.device} but logits on {logits.device}")
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"{name}: vocab_start must be an int >= 0, got {vocab_start!r}")


def _check_values(labels: Tensor, behavior_logprobs: Tensor, cu_seqlens: Tensor, v_global: int,
                  name: str = "fused_pear_loss") -> None:
    """Value checks gathered into one device→host transfer (errors prefixed with ``name``)."""
    T = labels.numel()
    mask = labels != IGNORE_INDEX
    bad_label = mask & ((labels < 0) | (labels >= v_global))
    bad_beta = mask & ~torch.isfinite(behavior_logprobs)
    cu = cu_seqlens.long()
    i_label = bad_label.int().argmax()
    i_beta = bad_beta.int().argmax()
    steps = cu[1:] - cu[:-1]
    i_step = (steps < 0).int().argmax()
    flags = torch.stack([
        bad_label.any().long(), i_label.long(), labels[i_label].long(),
        bad_beta.any().long(), i_beta.long(),
        cu[0], cu[-1], (steps < 0).any().long(), i_step.long(),
    ]).tolist()  # fmt: skip
    any_label, i_label, label_value, any_beta, i_beta, cu_first, cu_last, any_step, i_step = flags
    if any_label:
        raise ValueError(
            f"{name}: labels[{i_label}] = {label_value} is outside [0, {v_global}) and is not -100"
        )
    if any_beta:
        value = behavior_logprobs[i_beta].item()
        raise ValueError(
            f"{name}: behavior_logprobs[{i_beta}] = {value} is not finite on a loss token "
            f"(labels[{i_beta}] != -100)"
        )
    if cu_first != 0:
        raise ValueError(f"{name}: cu_seqlens[0] must be 0, got {cu_first}")
    if cu_last != T:
        raise ValueError(f"{name}: cu_seqlens[-1] must equal T = {T}, got {cu_last}")
    if any_step:
        raise ValueError(
            f"{name}: cu_seqlens must be non-decreasing, but cu_seqlens[{i_step + 1}] < "
            f"cu_seqlens[{i_step}]"
        )
