"""RL algorithms as estimators, in one registry keyed by ``algorithm.name``.

An ``Estimator`` says what the algorithm needs and how it makes advantages:

* ``settings`` — the ``AlgorithmConfig`` field holding its policy-loss settings (a
  ``pear_mega.rl.algorithms.PolicyLossConfig``: clip range, KL, entropy, TIS, over-long handling,
  the ratio surrogate and the loss aggregation);
* ``needs_critic`` — a value model is built, recomputed, trained and checkpointed;
* ``group_relative`` — advantages compare the ``rollout.n`` samples of one prompt (n >= 2);
* ``advantages(trainer, seqs, exp, rewards)`` — fills ``exp.advantages`` (and ``exp.returns``) of
  this rank's sequences with per-token tensors and returns metrics.

A reference model is built when the settings' ``kl_coef > 0`` (or ``logging.kl_to_init``). The
trainer reads only these fields: adding an algorithm is one ``register`` call (and, for a new
settings class, one ``AlgorithmConfig`` field). A name that is not registered, or whose settings
field or advantage function is missing, is an error when the config is built
(``check_estimator``).

    grpo  group-relative sequence advantages (r − mean_g) / (std_g + ε) broadcast over the tokens
          (DeepSeekMath, arXiv 2402.03300; ``normalize_std=False`` = Dr.GRPO's, arXiv 2503.20783)
    ppo   GAE over token rewards with a learned critic, whitened over the global batch (arXiv 1506.02438)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Estimator:
    name: str
    settings: str
    """``AlgorithmConfig`` field with its ``PolicyLossConfig``."""
    advantages: Callable
    """``(trainer, seqs, exp, rewards [N]) -> metrics``; see the module doc."""
    needs_critic: bool = False
    group_relative: bool = False


ESTIMATORS: dict[str, Estimator] = {}


def register(estimator: Estimator) -> Estimator:
    if estimator.name in ESTIMATORS:
        raise ValueError(f"estimator {estimator.name!r} is already registered")
    ESTIMATORS[estimator.name] = estimator
    return estimator


def check_estimator(name: str, algorithm) -> Estimator:
    """The registered estimator of ``algorithm.name`` for an ``AlgorithmConfig``; ValueError naming
    ``algorithm.name`` when it is unknown or half-registered."""
    from pear_mega.rl.algorithms import PolicyLossConfig

    est = ESTIMATORS.get(name)
    if est is None:
        raise ValueError(f"algorithm.name must be one of {tuple(ESTIMATORS)}, got {name!r}")
    settings = getattr(algorithm, est.settings, None)
    if not isinstance(settings, PolicyLossConfig):
        raise ValueError(f"algorithm.name={name!r}: its settings field algorithm.{est.settings} is not a "
                         f"PolicyLossConfig in AlgorithmConfig (got {type(settings).__name__})")
    if not callable(est.advantages):
        raise ValueError(f"algorithm.name={name!r}: the estimator has no advantage function")
    return est


def padded(ids: Sequence[int], values: dict[int, torch.Tensor], lengths: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``{seq_id: [r]}`` → ``([B, L_max] values, [B, L_max] mask)`` for the sequences ``ids``."""
    width = max([*lengths, 1])
    out = torch.zeros(len(ids), width)
    mask = torch.zeros(len(ids), width)
    for row, (i, r) in enumerate(zip(ids, lengths)):
        out[row, :r] = values[i]
        mask[row, :r] = 1.0
    return out, mask


def _kl(trainer, exp, lengths, policy):
    """``(kl [B, L], mask [B, L])`` of this rank's sequences when the KL is folded into the
    rewards (``kl_mode='reward'``), else ``(None, None)``."""
    from pear_mega.rl import algorithms as A
    if not (trainer.ctx.is_last_stage and exp.ids and trainer.kl_in_reward):
        return None, None
    logp_old, mask = padded(exp.ids, exp.logp_old, lengths)
    logp_ref, _ = padded(exp.ids, exp.logp_ref, lengths)
    return A.kl_penalty(logp_old, logp_ref, policy.kl_estimator) * mask, mask


def grpo_advantages(trainer, seqs, exp, rewards: torch.Tensor) -> dict[str, float]:
    """Group-relative sequence advantages broadcast over each response's tokens."""
    from pear_mega.rl import algorithms as A

    policy = trainer.cfg.policy
    lengths = [len(seqs[i].response_ids) for i in exp.ids]
    kl, mask = _kl(trainer, exp, lengths, policy)
    metrics: dict[str, float] = {}
    if trainer.kl_in_reward:
        # r_i − β·Σ_t KL_it needs every sequence's KL: each DP rank fills its own, then sum.
        penalty = torch.zeros(len(seqs))
        if trainer.ctx.is_last_stage and exp.ids:
            penalty[exp.ids] = A.kl_penalized_rewards(torch.zeros(len(exp.ids)), kl, mask, policy.kl_coef)
        penalty = trainer._share_from_last_stage(penalty, dp_sum=True)
        metrics["rollout/kl_reward_penalty_mean"] = float(-penalty.mean())
        rewards = rewards + penalty
    adv, m = A.grpo_advantages(rewards, trainer.cfg.rollout.n, policy.normalize_std, policy.std_eps)
    metrics.update({k: float(v) for k, v in m.items()})
    for i, r in zip(exp.ids, lengths):
        exp.advantages[i] = torch.full((r,), float(adv[i]))
    return metrics


def gae_advantages(trainer, seqs, exp, rewards: torch.Tensor) -> dict[str, float]:
    """GAE on token rewards (the sequence reward on the last token, −β·KL per token in reward
    mode) with the critic's values, whitened over the global batch (``algorithm.whiten_advantages``)."""
    from pear_mega.rl import algorithms as A
    policy, ctx = trainer.cfg.policy, trainer.ctx
    lengths = [len(seqs[i].response_ids) for i in exp.ids]
    kl, _ = _kl(trainer, exp, lengths, policy)
    metrics: dict[str, float] = {}
    if not ctx.is_last_stage:
        return metrics
    values, vmask = padded(exp.ids, exp.values, lengths)
    token_rewards = A.token_level_rewards(rewards[exp.ids], vmask, kl, policy.kl_coef if trainer.kl_in_reward else 0.0)
    adv, ret = A.gae(token_rewards, values, vmask, policy.gamma, policy.lam)
    stats = torch.stack([(adv * vmask).sum(), (adv * adv * vmask).sum(), vmask.sum()]).double().to(ctx.device)
    if ctx.dp_size > 1:
        dist.all_reduce(stats, group=ctx.dp_group)
    stats = stats.cpu()
    n = stats[2].clamp(min=1)
    mean = stats[0] / n
    std = (stats[1] / n - mean * mean).clamp(min=0).sqrt()
    metrics.update({"train/adv_mean": float(mean), "train/adv_std": float(std)})
    if trainer.cfg.algorithm.whiten_advantages:
        adv = ((adv - mean.float()) / (std.float() + 1e-8)) * vmask
    for row, (i, r) in enumerate(zip(exp.ids, lengths)):
        exp.advantages[i] = adv[row, :r].clone()
        exp.returns[i] = ret[row, :r].clone()
    return metrics


register(Estimator("grpo", settings="grpo", advantages=grpo_advantages, group_relative=True))
register(Estimator("ppo", settings="ppo", advantages=gae_advantages, needs_critic=True))
