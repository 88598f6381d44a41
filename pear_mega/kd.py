"""PEAR on a knowledge-distillation loss: the config and a readable float64 reference.

The teacher's top-K log-probs are stored per response token: ids k_1..k_K (id -1 = empty slot) and
log-probs a_i, p_i = exp(a_i), P = Σ_i p_i. The student is q = softmax(logits) over the whole
(unpadded) vocabulary, Q = Σ_i q_{k_i}. Per loss token t:

    topk_tail    KL_t = Σ_i p_i (a_i − log q_{k_i}) + (1 − P)(log(1 − P) − log(1 − Q))
                 the exact KL between teacher and student coarse-grained to {k_1, …, k_K, rest}:
                 never negative, no clamp. ∂KL_t/∂x_j = q_j − τ_j, τ_j = p_j on the top-K ids and
                 τ_j = q_j (1 − P)/(1 − Q) elsewhere. 1 − P is clamped to [0, 1] (the tail term is 0
                 when 1 − P = 0); 1 − Q is computed without cancellation (a sum over the non-top-K
                 columns, not 1 − Q) and floored at ``STUDENT_TAIL_FLOOR``.
    topk_renorm  KL_t = Σ_i p̂_i (log p̂_i − log q̂_i), p̂ = p/P, q̂ = q/Q over the top-K ids only;
                 ∂/∂x_j = q̂_j − p̂_j on the top-K ids, 0 elsewhere. 0 for a token without teacher ids.
    topk         KL_t = Σ_i p_i (a_i − log q_{k_i}), the plain truncated sum (may be negative; kept
                 to compare with other systems). ∂/∂x_j = P q_j − p_j [j in top-K].

    ℓ_t  = kl_weight · KL_t + nll_weight · (−log q_{y_t})
    loss = Σ_t mask_t · G_t · s_t · ℓ_t / normalizer

with G_t the PEAR weight from the sampled token's log-ratio exactly as for SFT
(``pear_mega.pear.reference_log_weights``) and the same normalizers and s_t as the SFT loss.

The floor: the kernel sums exp(x − max) over the non-top-K columns in fp32; below
``STUDENT_TAIL_FLOOR`` that sum is underflow noise, so log(1 − Q) is floored there. Under the floor
the value uses the floored 1 − Q and the gradient is the tail term's linearized at the floor,
−(1 − P)·∂(1 − Q)/∂x_j / max(1 − Q, floor): off the top-K q_j (P − (1 − P) Q / max(1 − Q, floor)),
on it q_j − p_j − (1 − P)(1 − ρ) q_j with ρ = (1 − Q)/max(1 − Q, floor). It equals q_j − τ_j
above the floor, is continuous at it, and still sums to 0 over the vocabulary (softmax invariance);
the reference does the same.

Shapes: ``T`` packed tokens, ``K`` teacher slots, ``V`` vocab, ``cu_seqlens [B+1]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from pear_mega.pear import IGNORE_INDEX, PearConfig, reference_log_weights, reference_loss_coefficients

KD_MODES = ("topk_tail", "topk_renorm", "topk")
STUDENT_TAIL_FLOOR = 1e-30
"""Smallest student tail mass 1 − Q used in log(1 − Q): far above fp32's denormals (1.2e-38), where
an fp32 sum of V exponentials stops being exact."""


@dataclass(frozen=True)
class KDConfig:
    """Which distillation loss the PEAR weights multiply (see the module doc for the math)."""

    mode: str = "topk_tail"
    """"topk_tail" (exact coarse-grained KL, never negative), "topk_renorm" (KL of the renormalized
    top-K distributions) or "topk" (plain truncated sum, to compare with other systems)."""
    kl_weight: float = 1.0
    """Weight of the KL term, >= 0."""
    nll_weight: float = 0.0
    """Weight of the NLL term −log q(y_t) of the sampled token, >= 0."""

    def __post_init__(self) -> None:
        if self.mode not in KD_MODES:
            raise ValueError(f"KDConfig.mode must be one of {KD_MODES}, got {self.mode!r}")
        for name in ("kl_weight", "nll_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v >= 0):
                raise ValueError(f"KDConfig.{name} must be a finite number >= 0, got {v!r}")
        if self.kl_weight == 0 and self.nll_weight == 0:
            raise ValueError("KDConfig.kl_weight and KDConfig.nll_weight are both 0: the loss would be 0")


@dataclass
class KDLossOutput:
    """Result of a PEAR distillation loss (reference or fused kernel).

    ``loss`` is 0-dim and differentiable wrt the logits; the per-token ``[T]`` fp32 tensors are
    detached and 0 off the loss mask: ``kd`` = KL_t of ``KDConfig.mode``, ``logprobs`` = log q(y_t),
    ``log_weights`` = log G_t, ``teacher_mass`` = P, ``student_mass`` = Q, ``kd_tail`` = the tail
    term (1 − P)(log(1 − P) − log(1 − Q)) of ``topk_tail`` (0 in the other modes; the head term is
    ``kd − kd_tail``).
    """

    loss: Tensor
    logprobs: Tensor
    log_weights: Tensor
    kd: Tensor
    teacher_mass: Tensor
    student_mass: Tensor
    kd_tail: Tensor


def topk_kl(logsm: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, mode: str) -> tuple[Tensor, ...]:
    """Per-token KL of ``mode`` from the student's full log-softmax, differentiable wrt ``logsm``.

    logsm: ``[T, V]`` log q (its dtype is the compute dtype); topk_ids: ``[T, K]`` int (-1 = empty);
    topk_logprobs: ``[T, K]`` teacher log-probs a. Returns ``(KL [T], P [T], Q [T], tail term [T])``.
    """
    valid = topk_ids >= 0
    logq = logsm.gather(1, torch.where(valid, topk_ids, 0).long())  # [T, K]
    a = torch.where(valid, topk_logprobs.to(logsm.dtype), 0.0)  # 0 on empty slots: no inf in any branch
    p = torch.where(valid, a.exp(), 0.0)
    P = p.sum(1)
    Q = torch.where(valid, logq.exp(), 0.0).sum(1)
    if mode == "topk_renorm":
        neg_inf = torch.tensor(-math.inf, dtype=logsm.dtype, device=logsm.device)
        has = valid.any(1)
        log_p_sum = torch.where(has, torch.logsumexp(torch.where(valid, a, neg_inf), 1), 0.0)
        log_q_sum = torch.where(has, torch.logsumexp(torch.where(valid, logq, neg_inf), 1), 0.0)
        log_p_hat = a - log_p_sum[:, None]
        log_q_hat = logq - log_q_sum[:, None]
        kl = torch.where(valid, log_p_hat.exp() * (log_p_hat - log_q_hat), 0.0).sum(1)
        return kl, P, Q, torch.zeros_like(kl)
    head = torch.where(valid, p * (a - logq), 0.0).sum(1)
    if mode == "topk":
        return head, P, Q, torch.zeros_like(head)
    # log(1 − Q) as the log-sum-exp of log q over the columns outside the top-K: no cancellation.
    outside = torch.ones_like(logsm, dtype=torch.bool)
    outside[valid.nonzero(as_tuple=True)[0], topk_ids[valid].long()] = False
    log_tail = torch.logsumexp(logsm.masked_fill(~outside, -math.inf), 1)
    tail = log_tail.exp()
    floored = tail.detach().clamp_min(STUDENT_TAIL_FLOOR)
    # value log(max(1 − Q, floor)); gradient d(1 − Q) / max(1 − Q, floor), as the kernel's τ
    log_tail_used = floored.log() + (tail - tail.detach()) / floored
    one_minus_p = (1.0 - P).clamp(0.0, 1.0)
    safe = torch.where(one_minus_p > 0, one_minus_p, 1.0)
    tail_term = torch.where(one_minus_p > 0, one_minus_p * (safe.log() - log_tail_used), 0.0)
    return head + tail_term, P, Q, tail_term


def _check_temperature(pear_config: PearConfig, where: str) -> None:
    # Distillation has no sampled-temperature target yet: δ uses log q at temperature 1.
    if getattr(pear_config, "target_temperature", 1.0) != 1.0:
        raise ValueError(f"{where}: PearConfig.target_temperature must be 1 with a distillation loss, "
                         f"got {pear_config.target_temperature!r}")  # fmt: skip


def reference_pear_kd_loss(
    logits: Tensor,
    labels: Tensor,
    behavior_logprobs: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    cu_seqlens: Tensor,
    pear_config: PearConfig,
    kd_config: KDConfig,
    normalizer: float | Tensor | None = None,
    vocab_size: int | None = None,
) -> KDLossOutput:
    """PEAR-weighted distillation loss from full-vocabulary logits, in float64 (no TP).

    logits: ``[T, V]`` (columns >= ``vocab_size`` are padding, outside the softmax); labels: ``[T]``
    (-100 = no loss); behavior_logprobs: ``[T]`` log πβ(y_t); topk_ids ``[T, K]`` (-1 = empty slot),
    topk_logprobs ``[T, K]``: the teacher's top-K; cu_seqlens: ``[B+1]``. The loss is fp32 on the
    logits' device and differentiable wrt the logits.
    """
    _check_temperature(pear_config, "reference_pear_kd_loss")
    V = logits.shape[1] if vocab_size is None else vocab_size
    logsm = torch.log_softmax(logits[:, :V].double(), dim=-1)
    mask = labels != IGNORE_INDEX
    logp = torch.where(mask, logsm.gather(1, torch.where(mask, labels, 0)[:, None]).squeeze(1), 0.0)
    kl, P, Q, tail = topk_kl(logsm, topk_ids, topk_logprobs.double(), kd_config.mode)
    per_token = kd_config.kl_weight * kl + kd_config.nll_weight * -logp
    log_w = reference_log_weights(logp, behavior_logprobs.float(), mask, cu_seqlens, pear_config)
    coef, denom = reference_loss_coefficients(log_w, mask, cu_seqlens, pear_config, normalizer)
    loss = (coef.to(logsm.device) * torch.where(mask, per_token, 0.0)).sum() / denom.to(logsm.device)
    zero = torch.zeros((), dtype=torch.float32, device=logits.device)

    def per_tok(v: Tensor) -> Tensor:
        return torch.where(mask, v.detach().float(), zero)

    return KDLossOutput(loss=loss.float(), logprobs=per_tok(logp), log_weights=log_w.to(logits.device),
                        kd=per_tok(kl), teacher_mass=per_tok(P), student_mass=per_tok(Q),
                        kd_tail=per_tok(tail))  # fmt: skip


def pear_kd_loss_eager(
    logits: Tensor,
    labels: Tensor,
    behavior_logprobs: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    cu_seqlens: Tensor,
    pear_config: PearConfig,
    kd_config: KDConfig,
    normalizer: float | Tensor | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    """Vectorized eager fp32 version of :func:`reference_pear_kd_loss` (full-vocab ``log_softmax``,
    gather, sums; no host sync in the weights), for benchmarking. Returns only the loss."""
    from pear_mega.kernels import loss_coefficients, pear_log_weights

    _check_temperature(pear_config, "pear_kd_loss_eager")
    V = logits.shape[1] if vocab_size is None else vocab_size
    logsm = torch.log_softmax(logits[:, :V].float(), dim=-1)
    mask = labels != IGNORE_INDEX
    logp = torch.where(mask, logsm.gather(1, torch.where(mask, labels, 0)[:, None]).squeeze(1), 0.0)
    kl = topk_kl(logsm, topk_ids, topk_logprobs, kd_config.mode)[0]
    per_token = kd_config.kl_weight * kl + kd_config.nll_weight * -logp
    log_w, inv_count, nonempty = pear_log_weights(logp.detach(), behavior_logprobs.float(), labels, cu_seqlens,
                                                  pear_config, backend="torch")  # fmt: skip
    denom = None if normalizer is None else torch.as_tensor(normalizer, dtype=torch.float32, device=logits.device)
    coef, denom = loss_coefficients(log_w, inv_count, nonempty, mask, pear_config, denom)
    return (coef * torch.where(mask, per_token, 0.0)).sum() / denom
