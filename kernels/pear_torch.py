"""Chunked pure-PyTorch backend of the fused PEAR loss (CPU, and any device without Triton).

Same contract as the Triton backend (``pear_triton``): per-row softmax statistics of the local
vocab shard, the per-sequence log-weight scan, and the gradient pass. Rows are processed in chunks
of about ``CHUNK_ELEMENTS`` logits, so the extra memory is a few ``[rows, V_local]`` fp32 chunks,
never a full ``[T, V]`` fp32 copy.

Per-row statistics (``[T, 4]`` fp32, relative to the row max m over the valid local columns):
    m,  s = Σ_v exp(x_v − m),  w = Σ_v exp(x_v − m)·(x_v − m),  tgt = x[label] (0 if not local)
so that log Z = m + log s, log p(label) = tgt − log Z and entropy H = log s − w / s.
With a target temperature τ ≠ 1 (``inv_temperature`` = 1/τ) a fifth column
    s_τ = Σ_v exp((x_v − m)/τ)
gives the tempered log-partition log Z_τ = m/τ + log s_τ and log p_τ(label) = tgt/τ − log Z_τ.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pear_mega.pear import IGNORE_INDEX, PearConfig

# 4 MiB of fp32 per temporary buffer. Small enough that a chunk's passes (max, sub, exp, sums;
# sub, exp, scale in backward) hit the cache instead of memory, and below glibc's largest mmap
# threshold (32 MiB), so the buffers come from the heap instead of fresh, page-faulting mappings.
# Measured against 32 MiB chunks: docs/benchmarks.md (fused PEAR loss, chunk size).
CHUNK_ELEMENTS = 1 << 20


def _rows_per_chunk(v_local: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, v_local))


def row_stats_torch(
    logits: Tensor, labels: Tensor, vocab_start: int, n_valid: int, inv_temperature: float | None = None
) -> Tensor:
    """Softmax statistics of each row over local columns ``[0, n_valid)``. Returns ``[T, 4]`` fp32,
    or ``[T, 5]`` with s_τ when ``inv_temperature`` is given."""
    T = logits.shape[0]
    stats = torch.zeros(T, 4 if inv_temperature is None else 5, dtype=torch.float32, device=logits.device)
    if n_valid == 0:  # the whole shard is vocab padding: contributes nothing to the softmax
        stats[:, 0] = -math.inf
        return stats
    step = _rows_per_chunk(n_valid)
    local = labels - vocab_start
    owned = (labels != IGNORE_INDEX) & (local >= 0) & (local < n_valid)
    # Two fp32 chunk buffers reused across chunks: fresh pages per chunk would cost page faults.
    d_buf = torch.empty(min(step, T), n_valid, dtype=torch.float32, device=logits.device)
    e_buf = torch.empty_like(d_buf)
    for r0 in range(0, T, step):
        r1 = min(T, r0 + step)
        x = logits[r0:r1, :n_valid]
        m = torch.amax(x, dim=1, keepdim=True).float()
        d = torch.sub(x, m, out=d_buf[: r1 - r0])  # the caller's logits stay untouched
        if inv_temperature is not None:  # before d is overwritten below; e_buf is free until then
            stats[r0:r1, 4] = torch.mul(d, inv_temperature, out=e_buf[: r1 - r0]).exp_().sum(dim=1)
        e = torch.exp(d, out=e_buf[: r1 - r0])
        stats[r0:r1, 0] = m.squeeze(1)
        stats[r0:r1, 1] = e.sum(dim=1)
        stats[r0:r1, 2] = d.mul_(e).sum(dim=1)  # d is not needed afterwards: no third buffer
        idx = local[r0:r1].clamp(0, n_valid - 1)[:, None]
        stats[r0:r1, 3] = torch.where(owned[r0:r1], x.gather(1, idx).squeeze(1).float(), 0.0)
    return stats


def grad_torch(
    logits: Tensor, labels: Tensor, log_z: Tensor, coef: Tensor, vocab_start: int, n_valid: int, out: Tensor
) -> Tensor:
    """Write ``coef_t · (softmax(x_t) − onehot(label_t))`` into ``out [T, V_local]`` (may be ``logits``).

    log_z: [T] global log-partition; coef: [T] fp32, 0 on rows without loss. Padded columns
    (``>= n_valid``) get 0.
    """
    T, V_local = logits.shape
    step = _rows_per_chunk(V_local)
    local = labels - vocab_start
    owned = (labels != IGNORE_INDEX) & (local >= 0) & (local < n_valid)
    direct = out.dtype == torch.float32  # compute straight into the output rows, no temporary
    g_buf = None if direct else torch.empty(min(step, T), n_valid, dtype=torch.float32, device=logits.device)
    for r0 in range(0, T, step):
        r1 = min(T, r0 + step)
        c = coef[r0:r1, None]
        x = logits[r0:r1, :n_valid]
        dst = out[r0:r1, :n_valid] if direct else g_buf[: r1 - r0]
        g = torch.sub(x, log_z[r0:r1, None], out=dst)
        # x − log Z <= 0, so exp is finite and rows with coef 0 (no loss) get exactly 0.
        g.exp_().mul_(c)
        rows = torch.arange(r1 - r0, device=logits.device)[owned[r0:r1]]
        cols = local[r0:r1][owned[r0:r1]]
        g[rows, cols] -= c[rows, 0]
        if not direct:
            out[r0:r1, :n_valid] = g
        if n_valid < V_local:
            out[r0:r1, n_valid:] = 0
    return out


def log_weights_torch(
    logp_theta: Tensor, logp_beta: Tensor, loss_mask: Tensor, cu_seqlens: Tensor, config: PearConfig
) -> tuple[Tensor, Tensor, Tensor]:
    """Vectorized per-sequence PEAR log weights with static shapes (no host sync, compilable).

    Returns ``(log_weights [T] fp32, inv_count [T] fp32, nonempty 0-dim int64)``: log G_t after
    both clips (0 where masked), 1 / (loss tokens of t's sequence) on loss tokens (0 elsewhere), and
    the number of sequences with at least one loss token. Scans run in fp64 over the whole pack;
    per-sequence values are differences of global prefix sums.
    """
    T = loss_mask.numel()
    dev = loss_mask.device
    mask = loss_mask.bool()
    cu = cu_seqlens.to(device=dev, dtype=torch.int64)
    pos = torch.arange(T, device=dev)
    # sequence id of every token: count the boundaries at or before it (empty sequences included)
    starts = torch.zeros(T + 1, dtype=torch.int64, device=dev).index_add_(0, cu[1:-1], torch.ones_like(cu[1:-1]))
    seq = starts[:T].cumsum(0)
    start, end = cu[seq], cu[(seq + 1).clamp_max(cu.numel() - 1)]
    lo, hi = config.delta_clip
    m64 = mask.double()
    delta = torch.where(mask, (logp_theta.double() - logp_beta.double()).clamp(lo, hi), 0.0)
    zero = torch.zeros(1, dtype=torch.float64, device=dev)
    cd = torch.cat([zero, delta.cumsum(0)])  # cd[i] = Σ_{j<i} δ_j over the pack
    cm = torch.cat([zero, m64.cumsum(0)])
    n = cm[end] - cm[start]  # loss tokens in t's sequence
    total = cd[end] - cd[start]  # Σ δ of t's sequence
    rank_incl = cm[pos + 1] - cm[start]  # loss tokens of the sequence at or before t
    prefix_incl = cd[pos + 1] - cd[start]
    n_later = n - rank_incl
    log_gamma = math.log(config.gamma)
    if config.level == "none":
        log_w = torch.zeros(T, dtype=torch.float64, device=dev)
    elif config.level == "token":
        log_w = n_later * log_gamma + (total - prefix_incl)
    elif config.level == "sequence":
        log_w = total
    else:
        B = config.block_size
        rank = (rank_incl - 1).clamp_min(0).long()  # 0-based rank among loss tokens
        first_next = (rank // B + 1) * B  # rank of the first token of the next block
        # Scatter each loss token's inclusive prefix to slot start + rank, then read the prefix at
        # the end of its own block (rank first_next − 1). Masked tokens write to a dump slot T.
        slot = torch.where(mask, start + rank, T)
        by_rank = torch.zeros(T + 1, dtype=torch.float64, device=dev).scatter_(0, slot, prefix_incl)
        has_next = first_next < n.long()
        end_of_block = by_rank[torch.where(has_next, start + first_next - 1, T)]
        log_w = torch.where(has_next, (n - first_next) * log_gamma + (total - end_of_block), 0.0)
    if config.level != "none":
        log_w = log_w.clamp(*config.log_weight_clip)
    log_w = torch.where(mask, log_w, 0.0).float()
    inv_count = torch.where(mask, 1.0 / n.clamp_min(1.0), 0.0).float()
    counts = cm[cu[1:]] - cm[cu[:-1]]
    return log_w, inv_count, (counts > 0).sum()


def pear_loss_eager(
    logits: Tensor,
    labels: Tensor,
    behavior_logprobs: Tensor,
    cu_seqlens: Tensor,
    config: PearConfig,
    normalizer: float | Tensor | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    """Vectorized eager PEAR loss (full-vocab ``log_softmax``, no host sync), for benchmarking and
    ``torch.compile``. Same semantics as ``pear_mega.pear.reference_pear_loss``; returns only the loss."""
    from pear_mega.pear import _tempered_logprobs  # the reference's tempered log-probs

    V = logits.shape[1] if vocab_size is None else vocab_size
    logsm = torch.log_softmax(logits[:, :V].float(), dim=-1)
    mask = labels != IGNORE_INDEX
    safe_labels = torch.where(mask, labels, 0)
    logp = torch.where(mask, logsm.gather(1, safe_labels[:, None]).squeeze(1), 0.0)
    logp_w = _tempered_logprobs(logits[:, :V], safe_labels, mask, config.target_temperature, logp)
    log_w, inv_count, nonempty = log_weights_torch(logp_w.detach(), behavior_logprobs, mask, cu_seqlens, config)
    coef = torch.where(mask, log_w.exp(), 0.0)
    if config.normalization == "sequences":
        coef = coef * inv_count
    if normalizer is not None:
        denom = torch.as_tensor(normalizer, dtype=torch.float32, device=logits.device)
    elif config.normalization == "tokens":
        denom = mask.sum().float().clamp_min(1.0)
    elif config.normalization == "sequences":
        denom = nonempty.float().clamp_min(1.0)
    else:
        s = coef.sum()
        denom = torch.where(s > 0, s, 1.0)
    return (coef * -logp).sum() / denom

