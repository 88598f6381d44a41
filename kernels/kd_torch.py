"""Chunked pure-PyTorch backend of the fused PEAR distillation loss (CPU, any device without Triton).

Same contract as the Triton backend (``kd_triton``). One pass over the local vocab shard in chunks
of about ``pear_torch.CHUNK_ELEMENTS`` logits gives, per row (fp32, relative to the row max m over
the valid local columns):

    m,  r = Σ_{v ∉ top-K} exp(x_v − m),  tgt = x[label] (0 if not local),  xk[i] = x[k_i] (owned slots)

r excludes the top-K columns exactly (they are zeroed in the chunk before the sum) instead of being
computed as a difference, so the student's tail mass 1 − Q = r / (r + Σ_i exp(xk_i − m)) keeps full
relative precision when Q → 1. The gradient reuses ``pear_torch.grad_torch`` for the dense part
c_t · softmax(x_t) and writes the K + 1 sparse values per row (top-K ids and the label) afterwards.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pear_mega.pear import IGNORE_INDEX

from .pear_torch import _rows_per_chunk


def kd_row_stats_torch(
    logits: Tensor, labels: Tensor, topk_local: Tensor, vocab_start: int, n_valid: int
) -> tuple[Tensor, Tensor]:
    """Per-row ``(m, r, tgt)`` ``[T, 3]`` fp32 and the owned top-K logits ``xk [T, K]`` fp32 (0 where
    ``topk_local`` is -1) over local columns ``[0, n_valid)``. topk_local: ``[T, K]`` int64 local
    column of each teacher id held by this shard, -1 otherwise (unique per row)."""
    T, K = topk_local.shape
    stats = torch.zeros(T, 3, dtype=torch.float32, device=logits.device)
    xk = torch.zeros(T, K, dtype=torch.float32, device=logits.device)
    if n_valid == 0:  # the whole shard is vocab padding: contributes nothing to the softmax
        stats[:, 0] = -math.inf
        return stats, xk
    step = _rows_per_chunk(n_valid)
    local = labels - vocab_start
    owned_label = (labels != IGNORE_INDEX) & (local >= 0) & (local < n_valid)
    owned = topk_local >= 0
    buf = torch.empty(min(step, T), n_valid, dtype=torch.float32, device=logits.device)  # reused
    for r0 in range(0, T, step):
        r1 = min(T, r0 + step)
        x = logits[r0:r1, :n_valid]
        ids, own = topk_local[r0:r1], owned[r0:r1]
        xk[r0:r1] = torch.where(own, x.gather(1, ids.clamp_min(0)).float(), 0.0)
        m = torch.amax(x, dim=1, keepdim=True).float()
        e = torch.sub(x, m, out=buf[: r1 - r0]).exp_()  # the caller's logits stay untouched
        rows, slots = own.nonzero(as_tuple=True)
        e[rows, ids[rows, slots]] = 0.0  # drop the top-K columns from the tail sum
        stats[r0:r1, 0] = m.squeeze(1)
        stats[r0:r1, 1] = e.sum(dim=1)
        idx = local[r0:r1].clamp(0, n_valid - 1)[:, None]
        stats[r0:r1, 2] = torch.where(owned_label[r0:r1], x.gather(1, idx).squeeze(1).float(), 0.0)
    return stats, xk


def scatter_slots_torch(out: Tensor, slot_cols: Tensor, slot_vals: Tensor) -> Tensor:
    """``out[t, slot_cols[t, i]] = slot_vals[t, i]`` wherever ``slot_cols >= 0`` (unique per row)."""
    rows, slots = (slot_cols >= 0).nonzero(as_tuple=True)
    out[rows, slot_cols[rows, slots]] = slot_vals[rows, slots].to(out.dtype)
    return out
