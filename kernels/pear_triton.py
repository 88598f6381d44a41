"""Triton backend of the fused PEAR loss: row statistics, log-weight scan, gradient.

Three kernels (launchers below; ``pear_loss.py`` holds the autograd function and the TP collective):

1. ``_row_stats_kernel`` — one pass over a ``[BLOCK_T, V_local]`` row block with an online softmax:
   per row m = max x, s = Σ exp(x − m), w = Σ exp(x − m)(x − m), tgt = x[label] if the label lives in
   this shard. When the running max moves from m to m', (s, w) rescale as
   s' = e^{m−m'} s,  w' = e^{m−m'} (w + (m − m') s). fp32 accumulation for bf16 logits.
   With a target temperature τ ≠ 1 (``WITH_TEMP``) a fifth statistic s_τ = Σ exp((x − m)/τ)
   rescales as s_τ' = e^{(m−m')/τ} s_τ (the tempered log-probs of the PEAR weight).
2. ``_seq_scan_kernel`` / ``_log_weights_kernel`` — one program per sequence walks it backwards in
   chunks with ``tl.cumsum(x, 0, reverse=True)`` and a carry: the number of later loss tokens and
   the suffix sum of clipped δ. The block level also needs Σ δ over the ranks >= r (r = the first
   rank of the next block); the first kernel scatters each loss token's inclusive suffix sum into a
   scratch buffer indexed by its reverse rank, the second reads it back (two launches, so no
   intra-kernel barrier is needed).
3. ``_grad_kernel`` — grad = coef_t · (softmax − onehot(label)), written into a fresh buffer or in
   place over the logits; columns >= n_valid (vocab padding) get 0.

Memory traffic: logits read twice (forward stats, backward) and the gradient written once; the
per-token tensors are O(T). Row offsets are int64 (T·V exceeds 2^31 at real sizes).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from pear_mega.pear import IGNORE_INDEX, PearConfig

_LEVEL_IDS = {"none": 0, "token": 1, "block": 2, "sequence": 3}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _row_blocks(v: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_V, num_warps). The interpreter runs each op as one numpy call, so big tiles
    amortize its per-op cost; on a GPU one row per program streams the vocabulary."""
    if _interpreting():
        return 16, min(8192, triton.next_power_of_2(max(v, 16))), 4
    block_v = min(4096 if dtype == torch.float32 else 8192, triton.next_power_of_2(max(v, 16)))
    return 1, block_v, 8 if block_v >= 4096 else 4


@triton.jit
def _row_stats_kernel(
    logits_ptr,
    stride_row,
    labels_ptr,
    stats_ptr,
    T,
    n_valid,
    vocab_start,
    inv_temp,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    WITH_TEMP: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    row_off = rows.to(tl.int64) * stride_row
    local = tl.load(labels_ptr + rows, mask=row_ok, other=-100).to(tl.int64) - vocab_start
    m = tl.full([BLOCK_T], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_T], tl.float32)
    w = tl.zeros([BLOCK_T], tl.float32)
    tgt = tl.zeros([BLOCK_T], tl.float32)
    s_t = tl.zeros([BLOCK_T], tl.float32)
    for v0 in range(0, n_valid, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        ok = row_ok[:, None] & (cols < n_valid)[None, :]
        x = tl.load(logits_ptr + row_off[:, None] + cols[None, :], mask=ok, other=float("-inf"))
        x = x.to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no valid column (yet)
        alpha = tl.exp(m - m_safe)
        d = tl.where(ok, x - m_safe[:, None], 0.0)
        e = tl.where(ok, tl.exp(d), 0.0)
        shift = tl.where(s > 0, m - m_safe, 0.0) * s  # s > 0 implies m is finite
        w = alpha * (w + shift) + tl.sum(e * d, 1)
        s = alpha * s + tl.sum(e, 1)
        if WITH_TEMP:
            e_t = tl.where(ok, tl.exp(d * inv_temp), 0.0)
            s_t = tl.exp((m - m_safe) * inv_temp) * s_t + tl.sum(e_t, 1)
        m = m_new
        hit = ok & (cols[None, :].to(tl.int64) == local[:, None])
        tgt += tl.sum(tl.where(hit, x, 0.0), 1)
    out = stats_ptr + rows.to(tl.int64) * (5 if WITH_TEMP else 4)
    tl.store(out, m, mask=row_ok)
    tl.store(out + 1, s, mask=row_ok)
    tl.store(out + 2, w, mask=row_ok)
    tl.store(out + 3, tgt, mask=row_ok)
    if WITH_TEMP:
        tl.store(out + 4, s_t, mask=row_ok)


@triton.jit
def _grad_kernel(
    logits_ptr,
    stride_row,
    grad_ptr,
    stride_grad,
    labels_ptr,
    logz_ptr,
    coef_ptr,
    T,
    V_local,
    n_valid,
    vocab_start,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    rows64 = rows.to(tl.int64)
    local = tl.load(labels_ptr + rows, mask=row_ok, other=-100).to(tl.int64) - vocab_start
    log_z = tl.load(logz_ptr + rows, mask=row_ok, other=0.0)
    coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
    live = coef != 0.0
    for v0 in range(0, V_local, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        inside = row_ok[:, None] & (cols < V_local)[None, :]
        x = tl.load(logits_ptr + rows64[:, None] * stride_row + cols[None, :], mask=inside, other=0.0)
        p = tl.exp(x.to(tl.float32) - log_z[:, None])
        onehot = tl.where(cols[None, :].to(tl.int64) == local[:, None], 1.0, 0.0)
        g = coef[:, None] * (p - onehot)
        g = tl.where(live[:, None] & (cols < n_valid)[None, :], g, 0.0)
        dst = grad_ptr + rows64[:, None] * stride_grad + cols[None, :]
        tl.store(dst, g.to(grad_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _seq_scan_kernel(
    cu_ptr,
    labels_ptr,
    logp_ptr,
    logpb_ptr,
    count_ptr,
    total_ptr,
    scratch_ptr,
    delta_lo,
    delta_hi,
    STORE_RANKED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per sequence: loss-token count, Σ δ, and (block level) scratch[start + q] = Σ_{rev-rank <= q} δ."""
    pid = tl.program_id(0)
    start = tl.load(cu_ptr + pid).to(tl.int32)
    end = tl.load(cu_ptr + pid + 1).to(tl.int32)
    carry_n = tl.zeros([], tl.int32)
    carry_d = tl.zeros([], tl.float32)
    for c in range(0, tl.cdiv(end - start, BLOCK)):
        offs = end - (c + 1) * BLOCK + tl.arange(0, BLOCK)
        ok = offs >= start
        is_loss = ok & (tl.load(labels_ptr + offs, mask=ok, other=-100) != -100)
        lp = tl.load(logp_ptr + offs, mask=ok, other=0.0)
        lb = tl.load(logpb_ptr + offs, mask=ok, other=0.0)
        d = tl.where(is_loss, tl.minimum(tl.maximum(lp - lb, delta_lo), delta_hi), 0.0)
        n_i = is_loss.to(tl.int32)
        if STORE_RANKED:
            cnt_incl = tl.cumsum(n_i, 0, reverse=True) + carry_n
            sum_incl = tl.cumsum(d, 0, reverse=True) + carry_d
            tl.store(scratch_ptr + start + cnt_incl - 1, sum_incl, mask=is_loss)
        carry_n += tl.sum(n_i, 0)
        carry_d += tl.sum(d, 0)
    tl.store(count_ptr + pid, carry_n)
    tl.store(total_ptr + pid, carry_d)


@triton.jit
def _log_weights_kernel(
    cu_ptr,
    labels_ptr,
    logp_ptr,
    logpb_ptr,
    count_ptr,
    total_ptr,
    scratch_ptr,
    logw_ptr,
    inv_count_ptr,
    delta_lo,
    delta_hi,
    logw_lo,
    logw_hi,
    log_gamma,
    block_size,
    LEVEL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per sequence, backwards: log G_t for every level, then the final clip; 0 on masked tokens."""
    pid = tl.program_id(0)
    start = tl.load(cu_ptr + pid).to(tl.int32)
    end = tl.load(cu_ptr + pid + 1).to(tl.int32)
    n = tl.load(count_ptr + pid)
    total = tl.load(total_ptr + pid)
    inv_n = 1.0 / tl.maximum(n, 1).to(tl.float32)
    carry_n = tl.zeros([], tl.int32)
    carry_d = tl.zeros([], tl.float32)
    for c in range(0, tl.cdiv(end - start, BLOCK)):
        offs = end - (c + 1) * BLOCK + tl.arange(0, BLOCK)
        ok = offs >= start
        is_loss = ok & (tl.load(labels_ptr + offs, mask=ok, other=-100) != -100)
        lp = tl.load(logp_ptr + offs, mask=ok, other=0.0)
        lb = tl.load(logpb_ptr + offs, mask=ok, other=0.0)
        d = tl.where(is_loss, tl.minimum(tl.maximum(lp - lb, delta_lo), delta_hi), 0.0)
        n_i = is_loss.to(tl.int32)
        n_later = tl.cumsum(n_i, 0, reverse=True) + carry_n - n_i  # later loss tokens
        if LEVEL == 1:  # token: strict suffix
            logw = n_later.to(tl.float32) * log_gamma + (tl.cumsum(d, 0, reverse=True) + carry_d - d)
        elif LEVEL == 2:  # block: r = rank from the start, f = first rank of the next block
            r = n - 1 - n_later
            f = (r // block_size + 1) * block_size
            has_next = is_loss & (f < n)
            later = tl.load(scratch_ptr + start + (n - 1 - f), mask=has_next, other=0.0)
            logw = tl.where(has_next, (n - f).to(tl.float32) * log_gamma + later, 0.0)
        elif LEVEL == 3:  # sequence
            logw = tl.zeros([BLOCK], tl.float32) + total
        else:
            logw = tl.zeros([BLOCK], tl.float32)
        if LEVEL != 0:
            logw = tl.minimum(tl.maximum(logw, logw_lo), logw_hi)
        tl.store(logw_ptr + offs, tl.where(is_loss, logw, 0.0), mask=ok)
        tl.store(inv_count_ptr + offs, tl.where(is_loss, inv_n, 0.0), mask=ok)
        carry_n += tl.sum(n_i, 0)
        carry_d += tl.sum(d, 0)


def row_stats_triton(
    logits: Tensor, labels: Tensor, vocab_start: int, n_valid: int, inv_temperature: float | None = None
) -> Tensor:
    """Per-row (m, s, w, tgt) over local columns [0, n_valid): ``[T, 4]`` fp32 (see module doc);
    ``[T, 5]`` with s_τ when ``inv_temperature`` (1/τ) is given."""
    T = logits.shape[0]
    with_temp = inv_temperature is not None
    stats = torch.empty(T, 5 if with_temp else 4, dtype=torch.float32, device=logits.device)
    block_t, block_v, warps = _row_blocks(max(n_valid, 1), logits.dtype)
    grid = (triton.cdiv(T, block_t),)
    _row_stats_kernel[grid](
        logits, logits.stride(0), labels, stats, T, n_valid, vocab_start,
        float(inv_temperature) if with_temp else 1.0,
        BLOCK_T=block_t, BLOCK_V=block_v, WITH_TEMP=with_temp, num_warps=warps,
    )  # fmt: skip
    return stats


def grad_triton(
    logits: Tensor, labels: Tensor, log_z: Tensor, coef: Tensor, vocab_start: int, n_valid: int, out: Tensor
) -> Tensor:
    """Write coef_t · (softmax − onehot) into ``out [T, V_local]`` (``out`` may alias ``logits``)."""
    T, V_local = logits.shape
    block_t, block_v, warps = _row_blocks(V_local, logits.dtype)
    grid = (triton.cdiv(T, block_t),)
    _grad_kernel[grid](
        logits, logits.stride(0), out, out.stride(0), labels, log_z, coef, T, V_local, n_valid,
        vocab_start, BLOCK_T=block_t, BLOCK_V=block_v, num_warps=warps,
    )  # fmt: skip
    return out


def log_weights_triton(
    logp_theta: Tensor, logp_beta: Tensor, labels: Tensor, cu_seqlens: Tensor, config: PearConfig
) -> tuple[Tensor, Tensor, Tensor]:
    """``(log_weights [T], inv_count [T], nonempty)`` as in ``pear_torch.log_weights_torch``."""
    T = labels.numel()
    n_seq = cu_seqlens.numel() - 1  # B
    dev = labels.device
    logp_theta = logp_theta.float().contiguous()
    logp_beta = logp_beta.float().contiguous()
    counts = torch.empty(n_seq, dtype=torch.int32, device=dev)
    totals = torch.empty(n_seq, dtype=torch.float32, device=dev)
    scratch = torch.empty(max(T, 1), dtype=torch.float32, device=dev)
    log_w = torch.empty(T, dtype=torch.float32, device=dev)
    inv_count = torch.empty(T, dtype=torch.float32, device=dev)
    lo, hi = config.delta_clip
    wlo, whi = config.log_weight_clip
    block = 1024
    if n_seq > 0:
        _seq_scan_kernel[(n_seq,)](
            cu_seqlens, labels, logp_theta, logp_beta, counts, totals, scratch, lo, hi,
            STORE_RANKED=config.level == "block", BLOCK=block,
        )  # fmt: skip
        _log_weights_kernel[(n_seq,)](
            cu_seqlens, labels, logp_theta, logp_beta, counts, totals, scratch, log_w, inv_count,
            lo, hi, wlo, whi, math.log(config.gamma), config.block_size,
            LEVEL=_LEVEL_IDS[config.level], BLOCK=block,
        )  # fmt: skip
    return log_w, inv_count, (counts > 0).sum()


__all__ = ["row_stats_triton", "grad_triton", "log_weights_triton", "IGNORE_INDEX"]
