"""Policy-gradient building blocks for GRPO and PPO: pure tensor functions.

Every loss function takes per-token tensors of one shape (packed ``[T]`` or padded ``[B, L]``,
the same shape for all inputs), a ``loss_mask`` of that shape (1 = response token that carries
loss) and an optional ``normalizer``; it returns ``(loss, metrics)`` where ``metrics`` maps names
to detached scalar tensors (no host sync).

Token-level normalization: ``loss = Σ_t mask_t · ℓ_t / N`` with ``N`` the number of loss tokens in
the *global* batch (all micro-batches, all data-parallel ranks). Summing the micro-batch losses
then gives the same gradient as one big batch (DAPO, arXiv 2503.14476, Eq. 12). Without a
normalizer the local token count is used.

Naming follows the papers: ``logp`` = log πθ (current trainer policy, carries gradient),
``logp_old`` = log πθ_old (trainer, before this round of updates), ``logp_rollout`` = log-probs
reported by the rollout engine for the sampled tokens, ``logp_ref`` = log π_ref (reference
policy).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Metrics = dict[str, Tensor]

KL_ESTIMATORS = ("k1", "k2", "k3")
KL_MODES = ("loss", "reward")
OVERLONG_MODES = ("none", "mask", "soft_penalty")


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyLossConfig:
    """Fields shared by GRPO and PPO: the clipped surrogate and its regularizers."""

    clip_eps_low: float = 0.2
    """ε_low: the ratio is clipped below at 1 − ε_low (PPO, arXiv 1707.06347, Eq. 7)."""
    clip_eps_high: float = 0.2
    """ε_high: clipped above at 1 + ε_high; DAPO's clip-higher uses 0.28."""
    dual_clip: float | None = None
    """c > 1 enables dual-clip PPO (arXiv 1912.09729, Eq. 5): for A < 0 the loss is bounded by −c·A."""
    kl_coef: float = 0.0
    """β of the KL to the reference policy; 0 disables it."""
    kl_estimator: str = "k3"
    """'k1' | 'k2' | 'k3' (Schulman, "Approximating KL divergence", 2020)."""
    kl_mode: str = "loss"
    """'loss': β·KL added to the loss (GRPO); 'reward': −β·KL folded into token rewards (PPO)."""
    entropy_coef: float = 0.0
    """Coefficient of the entropy bonus (loss −= coef · mean entropy); 0 disables it."""
    tis_cap: float | None = 2.0
    """Truncated importance sampling cap C on π_old/π_rollout (TIS, Yao et al. 2025); None disables."""
    overlong_mode: str = "none"
    """'none' | 'mask' (drop truncated responses from the loss) | 'soft_penalty' (DAPO Eq. 13)."""
    overlong_buffer: int = 0
    """L_cache of DAPO's soft overlong punishment, in tokens (soft_penalty only)."""
    overlong_penalty: float = 1.0
    """Scale of the soft overlong penalty (the paper's −1 at the limit times this)."""
    ratio: str = "token"
    """How the importance ratio is formed, a name in ``SURROGATES``: 'token' (PPO's per-token ρ_t) or
    'sequence' (GSPO's length-normalized sequence ratio, clipped per sequence; ``gspo_policy_loss``)."""
    loss_agg: str = "token_mean"
    """How token losses become the loss, a name in ``LOSS_AGGREGATIONS``: 'token_mean' (Σ_t ℓ_t / N over
    the global batch's loss tokens, DAPO Eq. 12), 'seq_mean_token_mean' (the original GRPO: the mean
    over each response's tokens, then over responses) or 'seq_mean_token_sum_norm' (Dr.GRPO: Σ_t ℓ_t
    / (number of responses × rollout.max_tokens))."""

    def __post_init__(self) -> None:
        if self.ratio not in SURROGATES:
            raise ValueError(f"ratio must be one of {tuple(SURROGATES)}, got {self.ratio!r}")
        if self.loss_agg not in LOSS_AGGREGATIONS:
            raise ValueError(f"loss_agg must be one of {tuple(LOSS_AGGREGATIONS)}, got {self.loss_agg!r}")
        if self.ratio == "sequence" and self.dual_clip is not None:
            raise ValueError("dual_clip is not defined for ratio='sequence' (GSPO clips the sequence ratio only)")
        if not 0.0 <= self.clip_eps_low < 1.0:
            raise ValueError(f"clip_eps_low must be in [0, 1), got {self.clip_eps_low}")
        if self.clip_eps_high < 0.0:
            raise ValueError(f"clip_eps_high must be >= 0, got {self.clip_eps_high}")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1 (or None), got {self.dual_clip}")
        if self.kl_coef < 0.0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        if self.kl_mode not in KL_MODES:
            raise ValueError(f"kl_mode must be one of {KL_MODES}, got {self.kl_mode!r}")
        if self.entropy_coef < 0.0:
            raise ValueError(f"entropy_coef must be >= 0, got {self.entropy_coef}")
        if self.tis_cap is not None and self.tis_cap < 1.0:
            raise ValueError(f"tis_cap must be >= 1 (or None), got {self.tis_cap}")
        if self.overlong_mode not in OVERLONG_MODES:
            raise ValueError(f"overlong_mode must be one of {OVERLONG_MODES}, got {self.overlong_mode!r}")
        if self.overlong_buffer < 0:
            raise ValueError(f"overlong_buffer must be >= 0, got {self.overlong_buffer}")
        if self.overlong_mode == "soft_penalty" and self.overlong_buffer == 0:
            raise ValueError("overlong_buffer must be > 0 when overlong_mode='soft_penalty'")
        if self.overlong_penalty < 0.0:
            raise ValueError(f"overlong_penalty must be >= 0, got {self.overlong_penalty}")


@dataclass(frozen=True)
class GRPOConfig(PolicyLossConfig):
    """GRPO (DeepSeekMath, arXiv 2402.03300) with the DAPO / Dr.GRPO options."""

    group_size: int = 8
    """n: samples per prompt; advantages are normalized within each group."""
    normalize_std: bool = True
    """Divide by the group std (GRPO). False = Dr.GRPO (arXiv 2503.20783): mean-centering only."""
    std_eps: float = 1e-6
    """Added to the group std before dividing."""
    dynamic_sampling: bool = False
    """Drop groups whose rewards are all equal (zero advantage; DAPO §3.2)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 for group-relative advantages, got {self.group_size}")
        if self.std_eps <= 0.0:
            raise ValueError(f"std_eps must be > 0, got {self.std_eps}")


@dataclass(frozen=True)
class PPOConfig(PolicyLossConfig):
    """PPO with a learned critic and GAE (arXiv 1707.06347, 1506.02438)."""

    gamma: float = 1.0
    """Discount γ of GAE."""
    lam: float = 0.95
    """λ of GAE."""
    value_clip: float | None = 0.2
    """Clip range of the value update around the old values; None disables clipping."""
    vf_coef: float = 0.5
    """Weight of the value loss when actor and critic share one loss."""
    kl_mode: str = "reward"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {self.lam}")
        if self.value_clip is not None and self.value_clip <= 0.0:
            raise ValueError(f"value_clip must be > 0 (or None), got {self.value_clip}")
        if self.vf_coef < 0.0:
            raise ValueError(f"vf_coef must be >= 0, got {self.vf_coef}")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _check_same_shape(**tensors: Tensor | None) -> None:
    shapes = {k: tuple(v.shape) for k, v in tensors.items() if v is not None}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"per-token inputs must share one shape, got {shapes}")


def _normalizer(loss_mask: Tensor, normalizer: Tensor | float | None) -> Tensor | float:
    """N of the token-level mean: the given global count, else the local one (at least 1)."""
    if normalizer is None:
        return loss_mask.sum().clamp(min=1.0)
    return normalizer


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Σ mask·x / max(Σ mask, 1), detached-safe; used for metrics."""
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def _masked_max_nonneg(x: Tensor, mask: Tensor) -> Tensor:
    """Max of a non-negative ``x`` over ``mask`` (0 if the mask is empty), without a host sync."""
    return x.masked_fill(mask == 0, float("-inf")).max().clamp(min=0.0)


# --------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------


def grpo_advantages(
    rewards: Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-6
) -> tuple[Tensor, Metrics]:
    """Group-relative advantages (DeepSeekMath, arXiv 2402.03300, §4.1.2).

    For group g of n samples of one prompt:  A_i = (r_i − mean_g(r)) / (std_g(r) + ε),
    std the unbiased (Bessel-corrected) sample std. ``normalize_std=False`` gives Dr.GRPO's
    A_i = r_i − mean_g(r) (arXiv 2503.20783, §3.2).

    The group statistics are computed in float64 and a group whose rewards are all equal gets
    exactly 0: in float32 the mean of eight rewards of 0.7 is off by one ulp, and dividing that
    residual by std + ε = ε would give every sample an advantage of ≈ 0.06 (0.32 for twelve of
    2.7611) — a spurious push on groups that carry no signal (partial credit makes them common).

    Args:
        rewards: ``[G·n]`` sequence rewards, the n samples of a prompt contiguous.
        group_size: n.
    Returns:
        advantages ``[G·n]`` (one per sequence; broadcast over its tokens by the caller), metrics.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size != 0 or group_size < 1:
        raise ValueError(
            f"rewards must be 1-D with a length divisible by group_size={group_size}, got shape {tuple(rewards.shape)}"
        )
    if normalize_std and group_size < 2:
        raise ValueError("group_size must be >= 2 to normalize by the group std")
    r = rewards.double().view(-1, group_size)
    # Two-pass: centre first, then the std of the centred values; a constant group is zeroed
    # explicitly so that no rounding of the mean can leak into its advantages.
    constant = r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)
    centered = torch.where(constant, torch.zeros_like(r), r - r.mean(dim=1, keepdim=True))
    std = centered.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
    adv = centered / (std + eps) if normalize_std else centered
    adv, std = adv.float(), std.float()
    metrics = {
        "train/adv_mean": adv.mean().detach(),
        "train/adv_abs_max": adv.abs().max().detach(),
        "train/reward_group_std_mean": std.mean().detach(),
    }
    return adv.view(-1), metrics


def gae(
    rewards: Tensor, values: Tensor, loss_mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (Schulman et al., arXiv 1506.02438, Eq. 16).

        δ_t = r_t + γ·V_{t+1} − V_t,     A_t = δ_t + γλ·A_{t+1},     R_t = A_t + V_t

    over the response tokens of each row; V after the last response token is 0. Positions with
    ``loss_mask == 0`` are transparent (skipped: the next valid token's value and advantage pass
    through them), so prompt padding and masked spans inside a response are handled.

    Args:
        rewards, values, loss_mask: ``[B, L]`` (padded) or ``[T]`` (one sequence).
    Returns:
        (advantages, returns), shape of the inputs, 0 where masked.
    """
    _check_same_shape(rewards=rewards, values=values, loss_mask=loss_mask)
    squeeze = rewards.dim() == 1
    r, v, m = (x.float().unsqueeze(0) if squeeze else x.float() for x in (rewards, values, loss_mask))
    next_value = torch.zeros_like(r[:, 0])
    next_adv = torch.zeros_like(r[:, 0])
    adv = torch.zeros_like(r)
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * next_value - v[:, t]
        a_t = delta + gamma * lam * next_adv
        mt = m[:, t]
        adv[:, t] = a_t * mt
        next_adv = a_t * mt + next_adv * (1 - mt)
        next_value = v[:, t] * mt + next_value * (1 - mt)
    returns = (adv + v) * m
    if squeeze:
        return adv[0], returns[0]
    return adv, returns


def gae_packed(
    rewards: Tensor, values: Tensor, loss_mask: Tensor, cu_seqlens: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """GAE over a packed ``[T]`` layout: each ``cu_seqlens`` segment is an independent episode."""
    _check_same_shape(rewards=rewards, values=values, loss_mask=loss_mask)
    adv = torch.zeros_like(rewards, dtype=torch.float32)
    ret = torch.zeros_like(adv)
    bounds = cu_seqlens.tolist()
    for s, e in itertools.pairwise(bounds):
        adv[s:e], ret[s:e] = gae(rewards[s:e], values[s:e], loss_mask[s:e], gamma, lam)
    return adv, ret


def token_level_rewards(
    sequence_rewards: Tensor, loss_mask: Tensor, kl: Tensor | None = None, kl_coef: float = 0.0
) -> Tensor:
    """PPO token rewards for padded ``[B, L]``: r_t = −β·KL_t, plus the sequence reward on the
    last response token of each row (InstructGPT, arXiv 2203.02155, Eq. 2)."""
    if loss_mask.dim() != 2 or sequence_rewards.shape != loss_mask.shape[:1]:
        raise ValueError(
            f"expected sequence_rewards [B] and loss_mask [B, L], got {tuple(sequence_rewards.shape)}, "
            f"{tuple(loss_mask.shape)}"
        )
    m = loss_mask.float()
    rewards = torch.zeros_like(m) if kl is None else -kl_coef * kl.float() * m
    positions = torch.arange(m.shape[1], device=m.device).expand_as(m)
    last = torch.where(m > 0, positions, torch.full_like(positions, -1)).max(dim=1).values
    has_tokens = last >= 0
    rows = torch.arange(m.shape[0], device=m.device)[has_tokens]
    rewards[rows, last[has_tokens]] += sequence_rewards.float()[has_tokens]
    return rewards


def kl_penalized_rewards(rewards: Tensor, kl: Tensor, loss_mask: Tensor, kl_coef: float) -> Tensor:
    """Sequence rewards with the KL folded in (GRPO with ``kl_mode='reward'``):

        r'_i = r_i − β·Σ_t mask_it·KL_it          rewards ``[B]``, kl / loss_mask ``[B, L]``

    Apply before ``grpo_advantages``; ``kl`` from ``kl_penalty(logp_old, logp_ref, estimator)``.
    """
    if kl.dim() != 2 or kl.shape != loss_mask.shape or rewards.shape != kl.shape[:1]:
        raise ValueError(
            f"expected rewards [B], kl and loss_mask [B, L], got {tuple(rewards.shape)}, {tuple(kl.shape)}, "
            f"{tuple(loss_mask.shape)}"
        )
    return rewards.float() - kl_coef * (kl.detach().float() * loss_mask.float()).sum(dim=1)


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def ppo_policy_loss(
    logp: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    dual_clip: float | None = None,
    normalizer: Tensor | float | None = None,
    is_weights: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """PPO clipped surrogate, token-level (arXiv 1707.06347, Eq. 7; DAPO Eq. 8 for ε_low ≠ ε_high).

        ρ_t = exp(logp_t − logp_old_t)
        ℓ_t = −min(ρ_t·A_t, clip(ρ_t, 1−ε_low, 1+ε_high)·A_t)
        dual clip (arXiv 1912.09729, Eq. 5), A_t < 0:  ℓ_t = min(ℓ_t, −c·A_t)
        TIS: ℓ_t ← w_t·ℓ_t with w_t = min(π_old/π_rollout, C) (detached, from truncated_is_weights)
        loss = Σ_t mask_t·ℓ_t / N

    All inputs share one shape; ``advantages`` is per token (broadcast sequence advantages first).
    """
    _check_same_shape(logp=logp, logp_old=logp_old, advantages=advantages, loss_mask=loss_mask, w=is_weights)
    mask = loss_mask.to(logp.dtype)
    adv = advantages.to(logp.dtype)
    log_ratio = logp - logp_old.detach()
    ratio = torch.exp(log_ratio)
    surr_unclipped = -adv * ratio
    surr_clipped = -adv * ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)
    per_token = torch.maximum(surr_unclipped, surr_clipped)
    clipped = (surr_clipped > surr_unclipped).to(mask.dtype)
    dual_clipped = torch.zeros_like(mask)
    if dual_clip is not None:
        bound = -dual_clip * adv
        dual_clipped = ((adv < 0) & (per_token > bound)).to(mask.dtype)
        per_token = torch.where(adv < 0, torch.minimum(per_token, bound), per_token)
    if is_weights is not None:
        per_token = per_token * is_weights.detach().to(per_token.dtype)
    loss = (per_token * mask).sum() / _normalizer(mask, normalizer)
    with torch.no_grad():
        metrics = {
            "train/pg_clip_frac": masked_mean(clipped, mask),
            "train/pg_dual_clip_frac": masked_mean(dual_clipped, mask),
            "train/ppo_kl": masked_mean(-log_ratio, mask),
            "train/ratio_mean": masked_mean(ratio, mask),
            "train/ratio_max": _masked_max_nonneg(ratio.detach(), mask),
        }
    return loss, metrics


def value_loss(
    values: Tensor,
    values_old: Tensor,
    returns: Tensor,
    loss_mask: Tensor,
    clip_eps: float | None = 0.2,
    normalizer: Tensor | float | None = None,
) -> tuple[Tensor, Metrics]:
    """Clipped value loss (PPO as implemented in baselines / OpenAI's ppo2):

        V^clip_t = V_old_t + clip(V_t − V_old_t, −ε, ε)
        ℓ_t = ½·max((V_t − R_t)², (V^clip_t − R_t)²)          (no clipping: ½·(V_t − R_t)²)
        loss = Σ_t mask_t·ℓ_t / N
    """
    _check_same_shape(values=values, values_old=values_old, returns=returns, loss_mask=loss_mask)
    mask = loss_mask.to(values.dtype)
    returns = returns.detach().to(values.dtype)
    err = (values - returns) ** 2
    if clip_eps is None:
        per_token, clipped = err, torch.zeros_like(mask)
    else:
        v_clip = values_old.detach() + (values - values_old.detach()).clamp(-clip_eps, clip_eps)
        err_clip = (v_clip - returns) ** 2
        per_token = torch.maximum(err, err_clip)
        clipped = (err_clip > err).to(mask.dtype)
    loss = 0.5 * (per_token * mask).sum() / _normalizer(mask, normalizer)
    with torch.no_grad():
        metrics = {
            "train/vf_clip_frac": masked_mean(clipped, mask),
            "train/value_mean": masked_mean(values.detach(), mask),
            "train/return_mean": masked_mean(returns, mask),
        }
    return loss, metrics


def kl_penalty(logp: Tensor, logp_ref: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate of KL(πθ ‖ π_ref) on tokens sampled from πθ (Schulman, 2020).

    With log r = logp_ref − logp:
        k1 = −log r                  (unbiased, high variance, can be negative)
        k2 = ½·(log r)²              (biased, low variance; its gradient is that of KL)
        k3 = (r − 1) − log r         (unbiased, ≥ 0, low variance; GRPO Eq. 4)
    log r is clamped to [−20, 20] before exp so k3 stays finite.
    """
    _check_same_shape(logp=logp, logp_ref=logp_ref)
    log_r = logp_ref.detach() - logp
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r**2
    if estimator == "k3":
        log_r = log_r.clamp(-20.0, 20.0)
        return torch.exp(log_r) - 1.0 - log_r
    raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def kl_loss(
    logp: Tensor,
    logp_ref: Tensor,
    loss_mask: Tensor,
    estimator: str = "k3",
    normalizer: Tensor | float | None = None,
) -> tuple[Tensor, Metrics]:
    """KL to the reference policy as a loss term: Σ_t mask_t·k(t) / N (unscaled by β)."""
    _check_same_shape(logp=logp, logp_ref=logp_ref, loss_mask=loss_mask)
    mask = loss_mask.to(logp.dtype)
    kl = kl_penalty(logp, logp_ref, estimator)
    loss = (kl * mask).sum() / _normalizer(mask, normalizer)
    return loss, {f"train/kl_ref_{estimator}": masked_mean(kl.detach(), mask)}


def entropy_bonus(
    entropy: Tensor, loss_mask: Tensor, normalizer: Tensor | float | None = None
) -> tuple[Tensor, Metrics]:
    """Entropy bonus as a loss term: −Σ_t mask_t·H_t / N, H_t = −Σ_v π(v)·log π(v) per token.

    ``entropy`` [same shape as loss_mask] comes from the loss kernel (or ``entropy_from_logits``).
    Minimizing ``coef · loss`` raises entropy.
    """
    _check_same_shape(entropy=entropy, loss_mask=loss_mask)
    mask = loss_mask.to(entropy.dtype)
    loss = -(entropy * mask).sum() / _normalizer(mask, normalizer)
    return loss, {"train/entropy": masked_mean(entropy.detach(), mask)}


def entropy_from_logits(logits: Tensor) -> Tensor:
    """H = logsumexp(z) − Σ softmax(z)·z over the last dim: ``[..., V] -> [...]``."""
    logits = logits.float()
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(dim=-1)


# --------------------------------------------------------------------------------------------
# Train / rollout mismatch
# --------------------------------------------------------------------------------------------


def truncated_is_weights(
    logp_old: Tensor, logp_rollout: Tensor, loss_mask: Tensor, cap: float = 2.0
) -> tuple[Tensor, Metrics]:
    """Truncated importance sampling for the rollout/trainer mismatch (Yao et al. 2025,
    "Your efficient RL framework secretly brings you off-policy RL training"):

        w_t = min(exp(logp_old_t − logp_rollout_t), C)       (detached, 0 where masked)

    Corrects for the rollout engine sampling from π_rollout ≠ π_old (kernels, precision).
    """
    _check_same_shape(logp_old=logp_old, logp_rollout=logp_rollout, loss_mask=loss_mask)
    mask = loss_mask.float()
    with torch.no_grad():
        raw = torch.exp((logp_old.float() - logp_rollout.float()).clamp(max=math.log(1e6)))
        w = raw.clamp(max=cap) * mask
        metrics = {
            "rollout/tis_weight_mean": masked_mean(w, mask),
            "rollout/tis_clip_frac": masked_mean((raw > cap).float(), mask),
        }
    return w, metrics


def mismatch_metrics(logp_trainer: Tensor, logp_rollout: Tensor, loss_mask: Tensor) -> Metrics:
    """|logp_trainer − logp_rollout| mean and max over loss tokens, and the k3 KL between them."""
    _check_same_shape(logp_trainer=logp_trainer, logp_rollout=logp_rollout, loss_mask=loss_mask)
    mask = loss_mask.float()
    with torch.no_grad():
        diff = logp_trainer.float() - logp_rollout.float()
        return {
            "rollout/logp_abs_diff_mean": masked_mean(diff.abs(), mask),
            "rollout/logp_abs_diff_max": _masked_max_nonneg(diff.abs(), mask),
            "rollout/kl_trainer_rollout_k3": masked_mean(
                kl_penalty(logp_trainer.float(), logp_rollout.float(), "k3"), mask
            ),
        }


# --------------------------------------------------------------------------------------------
# Batch shaping: dynamic sampling, over-long responses
# --------------------------------------------------------------------------------------------


def dynamic_sampling_mask(rewards: Tensor, group_size: int) -> tuple[Tensor, Metrics]:
    """DAPO dynamic sampling (arXiv 2503.14476, Eq. 11): keep only groups whose rewards are not
    all equal (an all-equal group has zero advantage and only dilutes the batch).

    Args:
        rewards: ``[G·n]``, groups contiguous.
    Returns:
        keep ``[G·n]`` bool (per sample), metrics with the number of dropped and kept groups.
    """
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards must be 1-D with a length divisible by group_size={group_size}, got shape {tuple(rewards.shape)}"
        )
    r = rewards.view(-1, group_size)
    keep_group = r.max(dim=1).values != r.min(dim=1).values
    metrics = {
        "rollout/dynamic_sampling_dropped_groups": (~keep_group).sum().detach(),
        "rollout/dynamic_sampling_kept_groups": keep_group.sum().detach(),
    }
    return keep_group.repeat_interleave(group_size), metrics


def overlong_shaping(
    rewards: Tensor,
    response_lengths: Tensor,
    truncated: Tensor,
    mode: str,
    max_response_len: int,
    buffer_len: int = 0,
    penalty: float = 1.0,
) -> tuple[Tensor, Tensor, Metrics]:
    """Over-long response handling (DAPO, arXiv 2503.14476, §3.4).

    mode 'none':  rewards unchanged, every sequence kept.
    mode 'mask':  overlong filtering, truncated responses get sequence loss weight 0.
    mode 'soft_penalty':  r ← r + penalty·R_len(|y|) with (Eq. 13, L_max = max_response_len,
        L_cache = buffer_len)
            R_len = 0                                   |y| ≤ L_max − L_cache
                  = ((L_max − L_cache) − |y|) / L_cache  L_max − L_cache < |y| ≤ L_max
                  = −1                                   |y| > L_max

    Args:
        rewards ``[B]``, response_lengths ``[B]`` (tokens), truncated ``[B]`` bool (stopped by the
        length limit rather than EOS).
    Returns:
        (rewards ``[B]``, sequence loss weights ``[B]`` in {0, 1}, metrics)
    """
    _check_same_shape(rewards=rewards, response_lengths=response_lengths, truncated=truncated)
    if mode not in OVERLONG_MODES:
        raise ValueError(f"mode must be one of {OVERLONG_MODES}, got {mode!r}")
    rewards = rewards.float()
    keep = torch.ones_like(rewards)
    truncated = truncated.bool()
    metrics: Metrics = {"rollout/truncated_frac": truncated.float().mean()}
    if mode == "mask":
        keep = (~truncated).float()
    elif mode == "soft_penalty":
        if not 0 < buffer_len <= max_response_len:
            raise ValueError(f"buffer_len must be in (0, max_response_len={max_response_len}], got {buffer_len}")
        lengths = response_lengths.float()
        start = max_response_len - buffer_len
        r_len = ((start - lengths) / buffer_len).clamp(min=-1.0, max=0.0)
        r_len = torch.where(lengths > max_response_len, torch.full_like(r_len, -1.0), r_len)
        rewards = rewards + penalty * r_len
        metrics["rollout/overlong_penalty_mean"] = (penalty * r_len).mean()
    return rewards, keep, metrics


# --------------------------------------------------------------------------------------------
# One call for the trainer
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Policy-loss seams: the surrogate (how the ratio is formed) and the aggregation (how token
# losses become one loss). A new objective registers a function here and names it in a config.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossContext:
    """What a surrogate or an aggregation may read beyond the per-token tensors of one microbatch."""

    cu_seqlens: Tensor | None = None
    """``[B+1]`` boundaries of the packed sequences (prompt + response each); tokens past the last
    boundary are padding."""
    max_response_len: int | None = None
    """The generation budget (``rollout.max_tokens``)."""


def segment_ids(cu_seqlens: Tensor, length: int) -> Tensor:
    """``[length]`` index of the packed sequence each token belongs to (padding: one more index)."""
    cu = cu_seqlens.long().flatten()
    lengths = cu[1:] - cu[:-1]
    seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths)
    pad = length - seg.numel()
    return torch.cat([seg, torch.full((pad,), lengths.numel(), device=cu.device, dtype=seg.dtype)]) if pad else seg


def _token_surrogate(config, logp, logp_old, advantages, loss_mask, normalizer, is_weights, context):
    return ppo_policy_loss(logp, logp_old, advantages, loss_mask, config.clip_eps_low, config.clip_eps_high,
                           config.dual_clip, normalizer, is_weights)


def _sequences(loss_mask: Tensor, context: LossContext | None) -> tuple[Tensor, Tensor]:
    """``(segment id per token [T], loss tokens per segment [T + 1])``."""
    if context is None or context.cu_seqlens is None:
        raise ValueError("this policy loss needs the sequence boundaries (LossContext.cu_seqlens)")
    seg = segment_ids(context.cu_seqlens.to(loss_mask.device), loss_mask.numel())
    on = (loss_mask != 0).to(torch.float32)
    return seg, torch.zeros(loss_mask.numel() + 1, device=loss_mask.device).index_add_(0, seg, on)


def gspo_policy_loss(
    logp: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    segments: Tensor,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    normalizer: Tensor | float | None = None,
    is_weights: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """GSPO's clipped surrogate with sequence-level importance ratios (arXiv 2507.18071, Eqs. 5-7),
    in its token form (the same gradient for per-sequence advantages):

        log s_i = (1/|y_i|) Σ_{t∈y_i} (logp_t − logp_old_t)          length-normalized, over y_i's loss tokens
        s_t     = exp(log s_i + logp_t − sg[logp_t])                   value s_i on every token of y_i,
                                                                      ∂s_t/∂logp_t = s_i
        ℓ_t     = −min(s_t·A_t, clip(s_t, 1−ε_low, 1+ε_high)·A_t)      clipped per sequence
        loss    = Σ_t mask_t·w_t·ℓ_t / N                               (TIS w_t as in ``ppo_policy_loss``)

    With ``loss_agg='seq_mean_token_mean'`` this is the paper's (1/G) Σ_i min(s_i·A_i, clip(s_i)·A_i).
    ``segments`` ``[T]``: the sequence index of each token (``segment_ids``); the length |y_i|
    counts the tokens where ``loss_mask != 0``.
    """
    _check_same_shape(logp=logp, logp_old=logp_old, advantages=advantages, loss_mask=loss_mask, w=is_weights)
    mask = loss_mask.to(logp.dtype)
    on = (loss_mask != 0).to(logp.dtype)
    adv = advantages.to(logp.dtype)
    log_ratio = (logp - logp_old).detach()
    size = logp.numel() + 1
    seq_sum = torch.zeros(size, dtype=logp.dtype, device=logp.device).index_add_(0, segments, log_ratio * on)
    seq_len = torch.zeros(size, dtype=logp.dtype, device=logp.device).index_add_(0, segments, on)
    log_s = (seq_sum / seq_len.clamp(min=1.0))[segments]
    ratio = torch.exp(log_s + logp - logp.detach())
    surr_unclipped = -adv * ratio
    surr_clipped = -adv * ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)
    per_token = torch.maximum(surr_unclipped, surr_clipped)
    if is_weights is not None:
        per_token = per_token * is_weights.detach().to(per_token.dtype)
    loss = (per_token * mask).sum() / _normalizer(mask, normalizer)
    with torch.no_grad():
        metrics = {
            "train/pg_clip_frac": masked_mean((surr_clipped > surr_unclipped).to(mask.dtype), mask),
            "train/pg_dual_clip_frac": torch.zeros((), dtype=mask.dtype, device=mask.device),
            "train/ppo_kl": masked_mean(-log_ratio, mask),
            "train/ratio_mean": masked_mean(ratio.detach(), mask),
            "train/ratio_max": _masked_max_nonneg(ratio.detach(), mask),
        }
    return loss, metrics


def _sequence_surrogate(config, logp, logp_old, advantages, loss_mask, normalizer, is_weights, context):
    segments, _ = _sequences(loss_mask, context)
    return gspo_policy_loss(logp, logp_old, advantages, loss_mask, segments, config.clip_eps_low,
                            config.clip_eps_high, normalizer, is_weights)


def _token_mean(loss_mask: Tensor, context: LossContext | None) -> tuple[Tensor | None, Tensor]:
    return None, loss_mask.sum()


def _seq_mean_token_mean(loss_mask: Tensor, context: LossContext | None) -> tuple[Tensor | None, Tensor]:
    """w_t = 1/|y_i| (the loss tokens of t's response), count = responses with a loss token."""
    seg, per_seq = _sequences(loss_mask, context)
    return (1.0 / per_seq.clamp(min=1.0))[seg].to(loss_mask.dtype), (per_seq > 0).sum()


def _seq_mean_token_sum_norm(loss_mask: Tensor, context: LossContext | None) -> tuple[Tensor | None, Tensor]:
    """w_t = 1, count = responses with a loss token × the generation budget (Dr.GRPO, arXiv 2503.20783)."""
    if context is None or not context.max_response_len:
        raise ValueError("loss_agg='seq_mean_token_sum_norm' needs the generation budget (LossContext.max_response_len)")
    _, per_seq = _sequences(loss_mask, context)
    return None, (per_seq > 0).sum() * int(context.max_response_len)


SURROGATES: dict[str, Callable] = {"token": _token_surrogate, "sequence": _sequence_surrogate}
"""ratio name → ``f(config, logp, logp_old, advantages, loss_mask, normalizer, is_weights, context)
-> (Σ_t mask_t·ℓ_t / normalizer, metrics)``."""

LOSS_AGGREGATIONS: dict[str, Callable[[Tensor, LossContext | None], tuple[Tensor | None, Tensor]]] = {
    "token_mean": _token_mean,
    "seq_mean_token_mean": _seq_mean_token_mean,
    "seq_mean_token_sum_norm": _seq_mean_token_sum_norm,
}
"""loss_agg name → ``f(loss_mask, context) -> (token_weights or None, count)``: the microbatch returns
Σ_t mask_t·w_t·ℓ_t with its ``count``, and megatron divides the gradients by the global Σ count."""


def loss_aggregation(config: PolicyLossConfig, loss_mask: Tensor,
                     context: LossContext | None = None) -> tuple[Tensor | None, Tensor]:
    """``(token weights or None, count)`` of ``config.loss_agg`` for one microbatch."""
    return LOSS_AGGREGATIONS[config.loss_agg](loss_mask, context)


def policy_loss(
    config: PolicyLossConfig,
    logp: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    normalizer: Tensor | float | None = None,
    logp_rollout: Tensor | None = None,
    logp_ref: Tensor | None = None,
    entropy: Tensor | None = None,
    token_weights: Tensor | None = None,
    context: LossContext | None = None,
) -> tuple[Tensor, Metrics]:
    """The full actor loss for one micro-batch:

        loss = L_clip(TIS-weighted) + β·KL_ref (if kl_mode='loss') − c_H·H

    each term token-normalized by the same N. ``logp_rollout`` enables TIS (if ``config.tis_cap``)
    and mismatch metrics; ``logp_ref`` is required when ``kl_coef > 0`` and ``kl_mode='loss'``.
    L_clip is ``SURROGATES[config.ratio]``; ``token_weights`` (from ``loss_aggregation``) multiply
    the loss mask of every term (the loss-term metrics are then weighted by them too).
    """
    metrics: Metrics = {}
    w = None
    if logp_rollout is not None:
        metrics.update(mismatch_metrics(logp_old, logp_rollout, loss_mask))
        if config.tis_cap is not None:
            w, m = truncated_is_weights(logp_old, logp_rollout, loss_mask, config.tis_cap)
            metrics.update(m)
    if token_weights is not None:
        loss_mask = loss_mask * token_weights
    loss, m = SURROGATES[config.ratio](config, logp, logp_old, advantages, loss_mask, normalizer, w, context)
    metrics.update(m)
    metrics["train/pg_loss"] = loss.detach()
    if config.kl_coef > 0 and config.kl_mode == "loss":
        if logp_ref is None:
            raise ValueError("logp_ref is required when kl_coef > 0 and kl_mode='loss'")
        kl, m = kl_loss(logp, logp_ref, loss_mask, config.kl_estimator, normalizer)
        loss = loss + config.kl_coef * kl
        metrics.update(m)
    if config.entropy_coef > 0:
        if entropy is None:
            raise ValueError("entropy is required when entropy_coef > 0")
        ent, m = entropy_bonus(entropy, loss_mask, normalizer)
        loss = loss + config.entropy_coef * ent
        metrics.update(m)
    return loss, metrics
