"""Fused, vocab-parallel PEAR distillation loss: ``fused_pear_kd_loss``.

The loss of ``pear_mega.kd`` (a top-K KL to stored teacher log-probs, optionally plus the NLL of the
sampled token, weighted by PEAR's G_t) from logits sharded over the vocabulary across a tensor-parallel
group (rank r holds global columns ``[vocab_start, vocab_start + V_local)``), without any ``[T, V]``
fp32 copy:

    forward   one pass over the shard: m, r = Σ_{v ∉ top-K} exp(x_v − m), x[label], x[k_i] (owned)
              per rank [T, 6]: (m, r, s_K = Σ_owned exp(xk − m), tgt, u = Σ_owned p_i (xk_i − m),
              P_r = Σ_owned p_i); ONE all_gather over the TP group merges them:
                  s = r + s_K,  log Z = m + log s,  log q(y) = tgt − log Z,
                  Σ_i p_i log q_{k_i} = U − P log s  with U = Σ_r u_r + P_r (m_r − m),
                  1 − Q = r / s (no cancellation),   log Q = log s_K − log s
              → KL_t per mode, ℓ_t, PEAR log G (detached), loss = Σ mask·G·s_t·ℓ_t / norm
    backward  dense: grad = c_t · A_t · softmax(x_t) with A_t = kl_weight·a_t + nll_weight and
                  a_t = 1 − (1 − P)/(1 − Q) (topk_tail; see pear_mega.kd under the floor), P (topk),
                  0 (topk_renorm)
              sparse (K + 1 values per row, written after): on the top-K ids
                  c_t · (kl_weight·h_i + nll_weight·(q_i − [k_i = y])),
                  h_i = q_i − p_i (topk_tail), P q_i − p_i (topk), q_i/Q − p_i/P (topk_renorm),
              and c_t · (A_t q_y − nll_weight) at the label when it is not a top-K id.

The teacher-side sums (P, Σ p a, log P) are computed in fp64 from the ``[T, K]`` inputs; the per-token
algebra runs in fp64 too (it is O(T)). Every TP rank computes the same loss and per-token outputs and
receives the gradient of its own shard (no collective in backward). Backends as for
``fused_pear_loss``: "triton" (CUDA, or CPU under ``TRITON_INTERPRET=1``), "torch" (chunked), "auto".
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from pear_mega.kd import STUDENT_TAIL_FLOOR, KDConfig, KDLossOutput, _check_temperature
from pear_mega.pear import IGNORE_INDEX, PearConfig

from .kd_torch import kd_row_stats_torch, scatter_slots_torch
from .pear_loss import all_gather_rows, check_loss_inputs, loss_coefficients, pear_log_weights
from .pear_torch import grad_torch

_LOG_FLOOR = math.log(STUDENT_TAIL_FLOOR)


def _kd_backend_fns(backend: str):
    if backend == "triton":
        from . import kd_triton, pear_triton  # lazily: TRITON_INTERPRET must be set before triton loads

        return kd_triton.kd_row_stats_triton, pear_triton.grad_triton, kd_triton.scatter_slots_triton
    return kd_row_stats_torch, grad_torch, scatter_slots_torch


def _merge_stats(local: Tensor, tp_group) -> tuple[Tensor, ...]:
    """``[T, 6]`` per-shard (m, r, s_K, tgt, u, P_r) → global (m, r, s_K, tgt, U), all relative to the
    global max m (see the module doc)."""
    world = dist.get_world_size(tp_group) if tp_group is not None else 1
    if world == 1:
        m, r, s_k, tgt, u, _ = local.unbind(-1)
        return m, r, s_k, tgt, u
    m_r, r_r, sk_r, t_r, u_r, p_r = all_gather_rows(local, tp_group).unbind(-1)  # each [world, T]
    m = m_r.max(dim=0).values
    scale = torch.exp(m_r - m)  # 0 for shards that are pure padding (m_r = -inf)
    shift = torch.where(p_r > 0, u_r + p_r * (m_r - m), 0.0)  # p_r > 0 implies m_r is finite
    return m, (scale * r_r).sum(0), (scale * sk_r).sum(0), t_r.sum(0), shift.sum(0)


def _mode_terms(mode, p, a, valid, owned, xk, q_k, m, r, s_k, U) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-token KL ``[T]``, the dense gradient factor a_t ``[T]``, the top-K gradient values
    h ``[T, K]`` and the KL's tail term ``[T]`` (0 but for topk_tail) of one mode (module doc), in fp64. p, a: teacher probabilities / log-probs (0 on empty
    slots); xk, q_k: this shard's logits / student probabilities at its top-K ids; m, r, s_k, U: the
    merged statistics."""
    P, pa = p.sum(1), (p * a).sum(1)
    log_s = torch.log(r + s_k)
    if mode == "topk_renorm":
        has = (P > 0) & (s_k > 0)
        p_safe = torch.where(has, P, 1.0)
        log_p_sum, log_sk = torch.log(p_safe), torch.log(torch.where(has, s_k, 1.0))
        # Σ p̂ (log p̂ − log q̂) = Σ p a / P − log P − (U / P − log s_K)   (log q̂ = x − m − log s_K)
        kl = torch.where(has, (pa - U) / p_safe - log_p_sum + log_sk, 0.0)
        p_hat = torch.where(valid & has[:, None], torch.exp(a - log_p_sum[:, None]), 0.0)
        q_hat = torch.where(owned & has[:, None], torch.exp(xk - (m + log_sk)[:, None]), 0.0)
        return kl, torch.zeros_like(P), q_hat - p_hat, torch.zeros_like(P)
    head = pa - U + P * log_s  # Σ p (a − log q), log q = x − m − log s
    if mode == "topk":
        return head, P, P[:, None] * q_k - p, torch.zeros_like(P)
    log_tail = torch.clamp_min(torch.log(r) - log_s, _LOG_FLOOR)  # log(1 − Q) = log(r / s), floored
    one_m_p = (1.0 - P).clamp(0.0, 1.0)
    safe = torch.where(one_m_p > 0, one_m_p, 1.0)
    tail = torch.where(one_m_p > 0, one_m_p * (torch.log(safe) - log_tail), 0.0)
    kl = head + tail
    # −(1 − P)·∂(1 − Q)/∂x_j / max(1 − Q, floor), ρ = (1 − Q)/max(1 − Q, floor) (1 unless floored):
    # off the top-K q_j (P − (1 − P) Q / max(1 − Q, floor)), on it q_j − p_j − (1 − P)(1 − ρ) q_j
    rho = torch.exp(torch.log(r) - log_s - log_tail)
    dense = P - one_m_p * (s_k / (r + s_k)) * torch.exp(-log_tail)
    return kl, dense, q_k - p - (one_m_p * (1.0 - rho))[:, None] * q_k, tail


class _FusedPearKDLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, logits, labels, behavior_logprobs, topk_ids, topk_logprobs, cu_seqlens, pear_config, kd_config,
        tp_group, vocab_start, n_valid, normalizer, inplace_backward, backend,
    ):  # fmt: skip
        row_stats, grad_fn, scatter_fn = _kd_backend_fns(backend)
        mask = labels != IGNORE_INDEX
        valid = topk_ids >= 0
        local_ids = topk_ids - vocab_start
        owned = valid & (local_ids >= 0) & (local_ids < n_valid)
        topk_local = torch.where(owned, local_ids, -1).long().contiguous()
        # teacher side, fp64: p_i, P = Σ p, Σ p·a
        a = torch.where(valid, topk_logprobs.double(), 0.0)
        p = torch.where(valid, a.exp(), 0.0)
        P = p.sum(1)

        stats, xk = row_stats(logits, labels, topk_local, vocab_start, n_valid)
        m_loc, r_loc, tgt_loc = stats.unbind(-1)
        d = torch.where(owned, xk - m_loc[:, None], 0.0)  # <= 0 on owned slots
        p32 = torch.where(owned, p, 0.0).float()
        local = torch.stack([m_loc, r_loc, torch.where(owned, d.exp(), 0.0).sum(1), tgt_loc,
                             (p32 * d).sum(1), p32.sum(1)], dim=-1)  # fmt: skip
        m, r, s_k, tgt, U = (v.double() for v in _merge_stats(local, tp_group))

        s = r + s_k
        log_s = torch.log(s)
        log_z = m + log_s
        logp = torch.where(mask, tgt - log_z, 0.0)
        q_mass = s_k / s
        kl_w, nll_w = kd_config.kl_weight, kd_config.nll_weight
        q_k = torch.where(owned, torch.exp(xk.double() - log_z[:, None]), 0.0)  # this shard's q at top-K
        kl, dense, h, tail = _mode_terms(kd_config.mode, p, a, valid, owned, xk.double(), q_k, m, r, s_k, U)
        per_token = torch.where(mask, kl_w * kl - nll_w * logp, 0.0)

        log_w, inv_count, nonempty = pear_log_weights(logp.float(), behavior_logprobs, labels, cu_seqlens,
                                                      pear_config, backend=backend)  # fmt: skip
        coef, denom = loss_coefficients(log_w, inv_count, nonempty, mask, pear_config, normalizer)
        loss = (coef.double() * per_token).sum().float() / denom

        # backward coefficients (per unit of coef / denom); rows off the loss mask write nothing
        local_label = labels - vocab_start
        owned_label = mask & (local_label >= 0) & (local_label < n_valid)
        is_label = owned & (topk_ids == labels[:, None])
        dense = kl_w * dense + nll_w
        slot_vals = kl_w * h + nll_w * (q_k - is_label.double())
        label_val = dense * torch.exp(logp) - nll_w
        label_col = torch.where(owned_label & ~is_label.any(1) & (nll_w != 0), local_label, -1)
        slot_cols = torch.cat([topk_local, label_col[:, None]], 1)
        slot_cols = torch.where(mask[:, None], slot_cols, -1).contiguous()
        slot_vals = torch.where(slot_cols >= 0, torch.cat([slot_vals, label_val[:, None]], 1), 0.0)
        ctx.save_for_backward(logits, log_z.float(), (coef / denom).float(),
                              torch.where(mask, dense, 0.0).float(), slot_cols, slot_vals.float())  # fmt: skip
        ctx.no_labels = torch.full_like(labels, IGNORE_INDEX)
        ctx.fns, ctx.vocab_start, ctx.n_valid = (grad_fn, scatter_fn), vocab_start, n_valid
        ctx.inplace = inplace_backward
        logp, kl, P, q_mass, tail = (torch.where(mask, v, 0.0).float() for v in (logp, kl, P, q_mass, tail))
        outs = (logp, log_w, kl, P, q_mass, tail)
        ctx.mark_non_differentiable(*outs)
        return (loss, *outs)

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        logits, log_z, coef, dense, slot_cols, slot_vals = ctx.saved_tensors
        grad_fn, scatter_fn = ctx.fns
        c = coef * grad_loss.float()
        out = logits if ctx.inplace else torch.empty_like(logits)
        grad_fn(logits, ctx.no_labels, log_z, (c * dense).contiguous(), ctx.vocab_start, ctx.n_valid, out)
        scatter_fn(out, slot_cols, (slot_vals * c[:, None]).contiguous())
        return (out,) + (None,) * 13


def fused_pear_kd_loss(
    logits: Tensor,
    labels: Tensor,
    behavior_logprobs: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    cu_seqlens: Tensor,
    pear_config: PearConfig,
    kd_config: KDConfig,
    tp_group=None,
    vocab_start: int = 0,
    normalizer: float | Tensor | None = None,
    vocab_size: int | None = None,
    inplace_backward: bool = False,
    *,
    backend: str = "auto",
    check_inputs: bool = True,
) -> KDLossOutput:
    """PEAR-weighted top-K distillation loss from vocab-parallel logits (see ``pear_mega.kd``).

    Args:
        logits: ``[T, V_local]`` fp32/bf16/fp16, this rank's vocab shard (last dim contiguous).
        labels: ``[T]`` int64 global ids of the sampled tokens; -100 = no loss.
        behavior_logprobs: ``[T]`` log πβ(labels[t]) (the PEAR log-ratio, as for SFT).
        topk_ids: ``[T, K]`` int64 global ids of the teacher's top-K, unique per row; -1 = empty slot.
        topk_logprobs: ``[T, K]`` float teacher log-probs (finite, <= 0 on non-empty slots).
        cu_seqlens: ``[B+1]`` sequence boundaries of the pack (0 … T).
        pear_config: PEAR variant, clips and normalization (``target_temperature`` must be 1).
        kd_config: distillation mode and the KL / NLL weights.
        tp_group, vocab_start, normalizer, vocab_size, inplace_backward, backend, check_inputs: as for
            ``fused_pear_loss``.

    Returns:
        KDLossOutput(loss 0-dim fp32; per-token [T] fp32, detached, 0 off the loss mask: logprobs,
        log_weights, kd = KL_t, teacher_mass P, student_mass Q, kd_tail: KL_t's tail term).
    """
    name = "fused_pear_kd_loss"
    if not isinstance(pear_config, PearConfig):
        raise ValueError(f"{name}: pear_config must be a PearConfig, got {type(pear_config).__name__}")
    if not isinstance(kd_config, KDConfig):
        raise ValueError(f"{name}: kd_config must be a KDConfig, got {type(kd_config).__name__}")
    _check_temperature(pear_config, name)
    backend, v_global, n_valid, denom = check_loss_inputs(
        name, logits, labels, behavior_logprobs, cu_seqlens, tp_group, vocab_start, normalizer, vocab_size,
        backend, check_inputs,
    )  # fmt: skip
    _check_topk_shapes(logits, topk_ids, topk_logprobs)
    if check_inputs:
        _check_topk_values(labels, topk_ids, topk_logprobs, v_global)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    loss, logp, log_w, kd, p_mass, q_mass, tail = _FusedPearKDLoss.apply(
        logits, labels.contiguous(), behavior_logprobs.float().contiguous(), topk_ids.long().contiguous(),
        topk_logprobs.contiguous(), cu_seqlens.contiguous(), pear_config, kd_config, tp_group, vocab_start,
        n_valid, denom, inplace_backward, backend,
    )  # fmt: skip
    return KDLossOutput(loss=loss, logprobs=logp, log_weights=log_w, kd=kd, teacher_mass=p_mass, student_mass=q_mass,
                        kd_tail=tail)


def _check_topk_shapes(logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor) -> None:
    T = logits.shape[0]
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T or topk_ids.shape[1] < 1:
        raise ValueError(f"fused_pear_kd_loss: topk_ids must be [{T}, K] with K >= 1, got {tuple(topk_ids.shape)}")
    if topk_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"fused_pear_kd_loss: topk_ids must be int64 (or int32), got {topk_ids.dtype}")
    if topk_logprobs.shape != topk_ids.shape:
        raise ValueError(f"fused_pear_kd_loss: topk_logprobs must have the shape of topk_ids "
                         f"{tuple(topk_ids.shape)}, got {tuple(topk_logprobs.shape)}")  # fmt: skip
    if not topk_logprobs.is_floating_point():
        raise ValueError(f"fused_pear_kd_loss: topk_logprobs must be floating point, got {topk_logprobs.dtype}")
    for what, t in (("topk_ids", topk_ids), ("topk_logprobs", topk_logprobs)):
        if t.device != logits.device:
            raise ValueError(f"fused_pear_kd_loss: {what} is on {t.device} but logits on {logits.device}")


def _check_topk_values(labels: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, v_global: int) -> None:
    """Teacher top-K checks on loss rows, gathered into one device→host transfer."""
    rows = (labels != IGNORE_INDEX)[:, None]
    ids = topk_ids.long()
    valid = ids >= 0
    bad_id = rows & ((ids < -1) | (ids >= v_global))
    bad_lp = rows & valid & ~(torch.isfinite(topk_logprobs) & (topk_logprobs <= 0))
    srt = ids.sort(dim=1).values
    dup = rows & torch.cat([torch.zeros_like(valid[:, :1]), (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)], 1)
    found = []
    for flag in (bad_id, bad_lp, dup):
        flat = flag.flatten().int().argmax()
        found += [flag.any().long(), flat // ids.shape[1], flat % ids.shape[1]]
    any_id, t_id, k_id, any_lp, t_lp, k_lp, any_dup, t_dup, k_dup = torch.stack(found).tolist()
    if any_id:
        raise ValueError(f"fused_pear_kd_loss: topk_ids[{t_id}, {k_id}] = {int(ids[t_id, k_id])} is outside "
                         f"[0, {v_global}) and is not -1 (empty slot)")  # fmt: skip
    if any_lp:
        raise ValueError(f"fused_pear_kd_loss: topk_logprobs[{t_lp}, {k_lp}] = {float(topk_logprobs[t_lp, k_lp])} "
                         "must be finite and <= 0 on a non-empty slot")  # fmt: skip
    if any_dup:
        raise ValueError(f"fused_pear_kd_loss: topk_ids row {t_dup} holds id {int(srt[t_dup, k_dup])} twice; "
                         "teacher ids must be unique within a position")  # fmt: skip
