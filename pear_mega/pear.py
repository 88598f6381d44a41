"""PEAR: importance-reweighted SFT loss — the config and a readable pure-PyTorch reference.

PEAR (arXiv 2602.01058) reweights the per-token SFT loss by a detached importance weight G_t that
compares the target policy πθ (the model being trained) with the behavior policy πβ that generated
the data. With the loss tokens of one sequence numbered 1..n (masked spans inside the sequence are
skipped, so "later" always means "later loss token"):

    δ_t      = clip(logp_θ(t) − logp_β(t), δ_lo, δ_hi)                         per-token clip
    token    : log G_t = n_later(t)·log γ + Σ_{loss j > t} δ_j                 strict suffix; last = 0
    block    : loss tokens split into consecutive blocks of B (counted over loss tokens); every token
               of block k gets  n_later(e_k)·log γ + Σ_{j in blocks > k} δ_j,  e_k = last token of k
    sequence : log G_t = Σ_{all loss j} δ_j                                    no discount
    none     : log G_t = 0                                                      plain SFT
    log G_t  ← clip(log G_t, g_lo, g_hi)  (not for "none");  G_t = exp(log G_t), detached

    loss = Σ_t mask_t · G_t · s_t · (−logp_θ(t)) / normalizer

logp_θ in δ is taken at ``target_temperature`` τ: log softmax(logits/τ)[y_t], the distribution the RL
rollouts that follow will sample from (τ = 1 by default); the loss term −logp_θ stays at τ = 1.

with s_t = 1 except for ``normalization="sequences"`` where s_t = 1 / (loss tokens of t's sequence).
Default normalizers: "tokens" → number of loss tokens; "sequences" → number of sequences holding at
least one loss token; "weights" → Σ mask·G (self-normalized). An explicit ``normalizer`` (for example
the global loss-token count over all microbatches and data-parallel ranks) replaces the default in
every mode, so gradient accumulation and data parallelism reproduce the one-big-batch loss.

Everything here loops over sequences on purpose: it is the specification the fused kernel
(``pear_mega.kernels.fused_pear_loss``) is tested against, not a fast path.

Shapes: ``T`` packed tokens, ``B`` sequences, ``V`` vocab; ``cu_seqlens [B+1]`` integer boundaries.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE_INDEX = -100
LEVELS = ("none", "token", "block", "sequence")
NORMALIZATIONS = ("tokens", "sequences", "weights")


@dataclass(frozen=True)
class PearConfig:
    """How PEAR turns log-ratios into loss weights.

    Defaults for ``gamma``, ``block_size``, ``delta_clip`` and ``log_weight_clip`` come from an
    unofficial public reimplementation of the paper, not from the paper itself (which reports the
    method but not these values); treat them as a reasonable starting point and tune them.
    """

    level: str = "token"
    """Weighting variant: "none" (plain SFT), "token" (suffix ratio), "block" or "sequence"."""
    gamma: float = 0.999
    """Discount per later loss token, 0 < gamma <= 1. Default from the unofficial reimplementation."""
    delta_clip: tuple[float, float] = (-0.08, 0.3)
    """Per-token clip (lo, hi) of δ = logp_θ − logp_β, lo <= 0 <= hi. Unofficial-reimplementation default."""
    log_weight_clip: tuple[float, float] = (-10.0, 5.0)
    """Final clip (lo, hi) of log G, lo <= hi. Unofficial-reimplementation default."""
    block_size: int = 4
    """Loss tokens per block for level="block" (B >= 1; B = 1 equals "token"). Unofficial default."""
    normalization: str = "tokens"
    """Loss denominator: "tokens" (loss-token count), "sequences" (per-sequence mean, then mean over
    sequences) or "weights" (self-normalized: divide by Σ G)."""
    target_temperature: float = 1.0
    """τ > 0 at which πθ's log-prob enters δ (log softmax(logits/τ)): set it to the temperature of the
    RL rollouts that follow PEAR-SFT. The loss term −logp_θ and its gradient stay at τ = 1."""

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"PearConfig.level must be one of {LEVELS}, got {self.level!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"PearConfig.normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}"
            )
        if not isinstance(self.gamma, (int, float)) or not (0.0 < self.gamma <= 1.0):
            raise ValueError(f"PearConfig.gamma must satisfy 0 < gamma <= 1, got {self.gamma!r}")
        lo, hi = _pair("delta_clip", self.delta_clip)
        if not (lo <= 0.0 <= hi):
            raise ValueError(f"PearConfig.delta_clip must satisfy lo <= 0 <= hi, got {self.delta_clip!r}")
        lo, hi = _pair("log_weight_clip", self.log_weight_clip)
        if not lo <= hi:
            raise ValueError(f"PearConfig.log_weight_clip must satisfy lo <= hi, got {self.log_weight_clip!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"PearConfig.block_size must be an int >= 1, got {self.block_size!r}")
        t = self.target_temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0):
            raise ValueError(f"PearConfig.target_temperature must be a finite number > 0, got {t!r}")


def _pair(name: str, value) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"PearConfig.{name} must be a (lo, hi) pair, got {value!r}")
    lo, hi = value
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)):
        raise ValueError(f"PearConfig.{name} must hold two numbers, got {value!r}")
    if math.isnan(lo) or math.isnan(hi):
        raise ValueError(f"PearConfig.{name} must not hold NaN, got {value!r}")
    return float(lo), float(hi)


@dataclass
class PearLossOutput:
    """Result of a PEAR loss evaluation (reference or fused kernel).

    ``loss`` is 0-dim and differentiable wrt the logits (the weights are detached); the per-token
    tensors are ``[T]`` fp32 and detached: ``logprobs`` = log πθ(labels[t]) (0 where masked),
    ``log_weights`` = log G_t after both clips (0 where masked), ``entropy`` = entropy of πθ at
    position t over the full (unpadded) vocabulary, for every position.
    """

    loss: Tensor
    logprobs: Tensor
    log_weights: Tensor
    entropy: Tensor


def _sequence_log_weights(delta: Tensor, config: PearConfig) -> Tensor:
    """log G for the n loss tokens of one sequence (before the final clip). delta: [n] clipped δ."""
    n = delta.numel()
    log_gamma = math.log(config.gamma)
    out = torch.zeros(n, dtype=torch.float64)
    if config.level == "none" or n == 0:
        return out
    if config.level == "sequence":
        return out + delta.sum()
    block = 1 if config.level == "token" else config.block_size
    for i in range(n):
        end = min((i // block + 1) * block, n)  # first loss token after i's block
        out[i] = (n - end) * log_gamma + delta[end:].sum()
    return out


def reference_log_weights(
    logp_theta: Tensor, logp_beta: Tensor, loss_mask: Tensor, cu_seqlens: Tensor, config: PearConfig
) -> Tensor:
    """Per-token log G_t, ``[T]`` fp32, 0 where ``loss_mask`` is False. Detached.

    logp_theta, logp_beta: [T] log-probs of the label under πθ and πβ; loss_mask: [T] bool;
    cu_seqlens: [B+1] sequence boundaries of the pack.
    """
    lo, hi = config.delta_clip
    wlo, whi = config.log_weight_clip
    logp_theta = logp_theta.detach().double().cpu()
    logp_beta = logp_beta.detach().double().cpu()
    mask = loss_mask.bool().cpu()
    out = torch.zeros(logp_theta.numel(), dtype=torch.float64)
    bounds = [int(b) for b in cu_seqlens.tolist()]
    for start, end in zip(bounds[:-1], bounds[1:]):
        idx = torch.arange(start, end)[mask[start:end]]
        delta = (logp_theta[idx] - logp_beta[idx]).clamp(lo, hi)
        log_w = _sequence_log_weights(delta, config)
        # level "none" is plain SFT: G = 1 exactly, whatever the clip range.
        out[idx] = log_w if config.level == "none" else log_w.clamp(wlo, whi)
    return out.float().to(loss_mask.device)


def _per_token_sequence_scale(loss_mask: Tensor, cu_seqlens: Tensor) -> tuple[Tensor, int]:
    """(1 / loss tokens of each token's sequence, number of sequences with >= 1 loss token)."""
    scale = torch.zeros(loss_mask.numel(), dtype=torch.float64)
    bounds = [int(b) for b in cu_seqlens.tolist()]
    nonempty = 0
    for start, end in zip(bounds[:-1], bounds[1:]):
        n = int(loss_mask[start:end].sum())
        if n > 0:
            scale[start:end] = 1.0 / n
            nonempty += 1
    return scale, nonempty


def reference_loss_coefficients(
    log_weights: Tensor, loss_mask: Tensor, cu_seqlens: Tensor, config: PearConfig, normalizer=None
) -> tuple[Tensor, Tensor]:
    """``(coef [T] fp64, denom 0-dim fp64)`` such that loss = Σ_t coef_t · ℓ_t / denom for any
    per-token loss ℓ_t (the NLL here, the distillation loss in ``pear_mega.kd``): coef = mask · G · s
    and denom = ``normalizer`` or the default of ``config.normalization`` (see the module doc)."""
    mask = loss_mask.bool().cpu()
    weight = torch.where(mask, log_weights.detach().cpu().exp(), 0.0)
    seq_scale, nonempty = _per_token_sequence_scale(mask, cu_seqlens.cpu())
    coef = weight.double()
    if config.normalization == "sequences":
        coef = coef * seq_scale
    if normalizer is not None:
        denom = torch.as_tensor(normalizer, dtype=torch.float64).detach().cpu()
    elif config.normalization == "tokens":
        denom = torch.tensor(float(max(int(mask.sum()), 1)), dtype=torch.float64)
    elif config.normalization == "sequences":
        denom = torch.tensor(float(max(nonempty, 1)), dtype=torch.float64)
    else:
        total = float(weight.sum())
        denom = torch.tensor(total if total > 0 else 1.0, dtype=torch.float64)
    return coef, denom


def _tempered_logprobs(x: Tensor, safe_labels: Tensor, mask: Tensor, temperature: float, logp: Tensor) -> Tensor:
    """log softmax(x/τ)[label] ``[T]`` (0 where masked); ``logp`` itself when τ = 1."""
    if temperature == 1.0:
        return logp
    logsm_t = torch.log_softmax(x.float() / temperature, dim=-1)
    return torch.where(mask, logsm_t.gather(1, safe_labels[:, None]).squeeze(1), 0.0)


def reference_pear_loss(
    logits: Tensor,
    labels: Tensor,
    behavior_logprobs: Tensor,
    cu_seqlens: Tensor,
    config: PearConfig,
    normalizer: float | Tensor | None = None,
    vocab_size: int | None = None,
) -> PearLossOutput:
    """PEAR loss from full-vocabulary logits (no tensor parallelism), computed in fp32/fp64.

    logits: [T, V] (columns >= ``vocab_size`` are padding and excluded from the softmax);
    labels: [T] int, -100 = no loss; behavior_logprobs: [T] log πβ(labels[t]); cu_seqlens: [B+1].
    """
    V = logits.shape[1] if vocab_size is None else vocab_size
    x = logits[:, :V].float()
    logsm = torch.log_softmax(x, dim=-1)
    entropy = -(logsm.exp() * logsm).sum(-1).detach()
    mask = labels != IGNORE_INDEX
    safe_labels = torch.where(mask, labels, 0)
    logp = torch.where(mask, logsm.gather(1, safe_labels[:, None]).squeeze(1), 0.0)
    logp_w = _tempered_logprobs(x, safe_labels, mask, config.target_temperature, logp)
    log_w = reference_log_weights(logp_w, behavior_logprobs.float(), mask, cu_seqlens, config).to(x.device)
    coef, denom = reference_loss_coefficients(log_w, mask, cu_seqlens, config, normalizer)
    loss = (coef.float().to(x.device) * -logp).sum() / denom.float().to(x.device)
    return PearLossOutput(loss=loss, logprobs=logp.detach(), log_weights=log_w, entropy=entropy)


def truncated_sampling_warning(behaviors: Iterable[tuple[Mapping | None, int]], config: PearConfig) -> str | None:
    """A warning when PEAR is about to train on data sampled with top-p < 1 or top-k > 0, else None.

    ``behaviors``: (sampling record, number of rows) pairs; a record is the ``meta.behavior`` stored
    with each row by ``pear_mega.collect`` (model, temperature, top_p, top_k, logprobs_mode); None =
    not recorded.

    Why: under top-p / top-k the stored log πβ(y) is renormalized over the kept tokens,
    log πβ(y) = log π(y/T) − log(kept mass) (vLLM's processed log-probs), while πθ is a full
    softmax. Every δ = log πθ − log πβ is shifted by log(kept mass) < 0 (about −0.05 per token at
    top_p 0.95), and the token and block levels sum δ over the whole suffix: the first tokens of a
    200-token answer lose ≈ 10 nats of weight for no reason other than the truncation, and sit at
    the lower ``log_weight_clip``. Nothing is wrong with plain SFT (``level="none"``) on such data.
    """
    if config.level == "none":
        return None
    seen: dict[tuple, int] = {}
    for b, rows in behaviors:
        if not isinstance(b, Mapping):
            continue
        top_p, top_k = b.get("top_p", 1.0), b.get("top_k", 0)
        if (top_p is not None and float(top_p) < 1.0) or (top_k is not None and int(top_k) > 0):
            key = (b.get("model"), b.get("temperature"), top_p, top_k)
            seen[key] = seen.get(key, 0) + rows
    if not seen:
        return None
    found = "; ".join(f"{n} rows from model={k[0]!r} temperature={k[1]} top_p={k[2]} top_k={k[3]}"
                      for k, n in sorted(seen.items(), key=lambda kv: -kv[1]))
    return (f"PEAR level={config.level!r} trains on data sampled with top-p < 1 or top-k > 0 ({found}): the stored "
            "behavior log-probs are renormalized over the kept tokens, so every δ = log πθ − log πβ is biased "
            "low by log(kept mass) and the suffix sums of the weights drift toward the lower clip. Sample the "
            "behavior data with top_p=1 and top_k=0 (any temperature), or train with pear.level=none.")


def weight_stats(
    log_weights: Tensor,
    loss_mask: Tensor,
    config: PearConfig,
    logp_theta: Tensor | None = None,
    logp_beta: Tensor | None = None,
) -> dict[str, Tensor]:
    """Monitoring statistics of the PEAR weights over the loss tokens, as detached 0-dim fp32 tensors
    (no host sync; call ``.item()`` when logging).

    - ``pear/weight_mean|min|max``: of G = exp(log G);
    - ``pear/ess``: effective-sample-size fraction (Σ G)² / (n · Σ G²), 1 = uniform weights;
    - ``pear/clip_low_frac`` / ``pear/clip_high_frac``: fraction of loss tokens whose log G sits at
      the lower / upper ``log_weight_clip`` bound (a mass at the lower bound means πθ and πβ are too
      far apart for PEAR to be informative);
    - ``pear/delta_clip_frac``: fraction of loss tokens whose δ was clipped (needs logp_theta and
      logp_beta);
    - ``pear/num_tokens``: n, the loss-token count (for weighting when averaging over ranks).
    With no loss tokens every statistic is 0.
    """
    mask = loss_mask.bool()
    lw = log_weights.detach().float()
    n = mask.sum().float()
    n_safe = n.clamp_min(1.0)
    g = torch.where(mask, lw.exp(), 0.0)
    sum_g = g.sum()
    sum_g2 = (g * g).sum()
    inf = torch.tensor(float("inf"), device=lw.device)
    wlo, whi = config.log_weight_clip
    # The kernel writes the clip bound exactly; the slack only absorbs fp32 rounding of the bound.
    tol = 1e-6 * max(1.0, abs(wlo), abs(whi))
    stats = {
        "pear/weight_mean": sum_g / n_safe,
        "pear/weight_min": torch.where(n > 0, torch.where(mask, g, inf).min(), 0.0),
        "pear/weight_max": torch.where(n > 0, g.max(), 0.0),
        "pear/ess": torch.where(sum_g2 > 0, sum_g * sum_g / (n_safe * sum_g2.clamp_min(1e-30)), 0.0),
        "pear/clip_low_frac": ((lw <= wlo + tol) & mask).sum() / n_safe,
        "pear/clip_high_frac": ((lw >= whi - tol) & mask).sum() / n_safe,
        "pear/num_tokens": n,
    }
    if config.level == "none":  # weights are 1 by construction; nothing is clipped
        stats["pear/clip_low_frac"] = torch.zeros((), device=lw.device)
        stats["pear/clip_high_frac"] = torch.zeros((), device=lw.device)
    if logp_theta is not None and logp_beta is not None:
        lo, hi = config.delta_clip
        delta = logp_theta.detach().float() - logp_beta.detach().float()
        stats["pear/delta_clip_frac"] = (((delta < lo) | (delta > hi)) & mask).sum() / n_safe
    return {k: v.detach().float() for k, v in stats.items()}
