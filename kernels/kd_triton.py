"""Triton backend of the fused PEAR distillation loss: row statistics and the sparse gradient write.

1. ``_kd_row_stats_kernel`` — one pass over a ``[BLOCK_T, V_local]`` row block with an online
   softmax: per row m = max x and r = Σ_{v ∉ top-K} exp(x − m), rescaled as r' = e^{m−m'} r when the
   running max moves. The top-K columns are zeroed inside each tile before the sum (one vector
   compare per teacher id that falls in the tile; a scalar test skips the others), so r never comes
   from a difference and keeps full relative precision when the student's top-K mass Q → 1. After
   the sweep, one load per owned slot gathers xk[i] = x[k_i], and one load the label's logit.
2. ``_scatter_slots_kernel`` — writes the K + 1 sparse gradient values of each row (top-K ids and the
   label) after the dense part c_t · softmax(x_t), which is ``pear_triton.grad_triton`` with no label.

Memory traffic: the logits read once in forward, once in backward, the gradient written once; the
top-K reads and writes are O(T·K). Row offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .pear_triton import _row_blocks


@triton.jit
def _kd_row_stats_kernel(
    logits_ptr,
    stride_row,
    labels_ptr,
    ids_ptr,
    stats_ptr,
    xk_ptr,
    T,
    K,
    n_valid,
    vocab_start,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    rows64 = rows.to(tl.int64)
    row_off = rows64 * stride_row
    id_row = ids_ptr + rows64 * K  # [T, K] int64 local columns, -1 = not in this shard / empty
    m = tl.full([BLOCK_T], float("-inf"), tl.float32)
    r = tl.zeros([BLOCK_T], tl.float32)
    for v0 in range(0, n_valid, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        ok = row_ok[:, None] & (cols < n_valid)[None, :]
        x = tl.load(logits_ptr + row_off[:, None] + cols[None, :], mask=ok, other=float("-inf"))
        x = x.to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no valid column (yet)
        alpha = tl.exp(m - m_safe)
        e = tl.where(ok, tl.exp(x - m_safe[:, None]), 0.0)
        for i in range(K):
            idv = tl.load(id_row + i, mask=row_ok, other=-1)
            in_tile = (idv >= v0) & (idv < v0 + BLOCK_V)
            if tl.sum(in_tile.to(tl.int32), 0) > 0:  # most ids are in other tiles: skip the compare
                e = tl.where(cols[None, :].to(tl.int64) == idv[:, None], 0.0, e)
        r = alpha * r + tl.sum(e, 1)
        m = m_new
    for i in range(K):
        idv = tl.load(id_row + i, mask=row_ok, other=-1)
        own = row_ok & (idv >= 0)
        xv = tl.load(logits_ptr + row_off + tl.where(own, idv, 0), mask=own, other=0.0).to(tl.float32)
        tl.store(xk_ptr + rows64 * K + i, xv, mask=row_ok)
    local = tl.load(labels_ptr + rows, mask=row_ok, other=-100).to(tl.int64) - vocab_start
    own_label = row_ok & (local >= 0) & (local < n_valid)
    tgt = tl.load(logits_ptr + row_off + tl.where(own_label, local, 0), mask=own_label, other=0.0)
    out = stats_ptr + rows64 * 3
    tl.store(out, m, mask=row_ok)
    tl.store(out + 1, r, mask=row_ok)
    tl.store(out + 2, tgt.to(tl.float32), mask=row_ok)


@triton.jit
def _scatter_slots_kernel(out_ptr, stride_out, cols_ptr, vals_ptr, N, S, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < N
    col = tl.load(cols_ptr + idx, mask=ok, other=-1)
    val = tl.load(vals_ptr + idx, mask=ok, other=0.0)
    live = ok & (col >= 0)
    row = (idx // S).to(tl.int64)
    tl.store(out_ptr + row * stride_out + tl.where(live, col, 0), val.to(out_ptr.dtype.element_ty), mask=live)


def kd_row_stats_triton(
    logits: Tensor, labels: Tensor, topk_local: Tensor, vocab_start: int, n_valid: int
) -> tuple[Tensor, Tensor]:
    """``(stats [T, 3] = (m, r, tgt), xk [T, K])`` fp32, as ``kd_torch.kd_row_stats_torch``."""
    T, K = topk_local.shape
    stats = torch.empty(T, 3, dtype=torch.float32, device=logits.device)
    xk = torch.empty(T, K, dtype=torch.float32, device=logits.device)
    block_t, block_v, warps = _row_blocks(max(n_valid, 1), logits.dtype)
    _kd_row_stats_kernel[(triton.cdiv(T, block_t),)](
        logits, logits.stride(0), labels, topk_local, stats, xk, T, K, n_valid, vocab_start,
        BLOCK_T=block_t, BLOCK_V=block_v, num_warps=warps,
    )  # fmt: skip
    return stats, xk


def scatter_slots_triton(out: Tensor, slot_cols: Tensor, slot_vals: Tensor) -> Tensor:
    """``out[t, slot_cols[t, i]] = slot_vals[t, i]`` wherever ``slot_cols >= 0`` (unique per row)."""
    n = slot_cols.numel()
    if n:
        block = 1024
        _scatter_slots_kernel[(triton.cdiv(n, block),)](
            out, out.stride(0), slot_cols, slot_vals, n, slot_cols.shape[1], BLOCK=block
        )
    return out
