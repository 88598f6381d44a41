"""How far and how sparsely RL moves the policy.

- **Update sparsity** (Mukherjee et al. 2025, "RL finetunes small subnetworks"): the fraction of
  parameters whose change exceeds a tolerance, per step (vs the previous step's parameters) and
  cumulative (vs the parameters at RL start). ``sparsity = 1 − changed_frac``.
- **Drift**: ‖θ − θ₀‖₂ (and relative to ‖θ₀‖₂), and KL(πθ ‖ π₀) estimated per token with k3 on the
  rollout tokens (π₀ = the initial policy, e.g. the reference model when it is the RL start).

Counts are computed tensor by tensor on each rank (no flattening of the model) and summed over a
process group. Pass the *model-parallel* group (tensor × pipeline), not the data-parallel one, so
replicas are not counted twice; for tensor-parallel duplicates (norms, biases that every TP rank
holds whole) pass ``counted=megatron.core.tensor_parallel.param_is_not_tensor_parallel_duplicate``
style predicate so they count once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from pear_mega.rl.algorithms import kl_penalty

Metrics = dict[str, Tensor]
NamedParams = Iterable[tuple[str, Tensor]]


def _all_reduce(t: Tensor, group) -> Tensor:
    """Sum over ``group`` (None = the default group) when torch.distributed is up; else a no-op."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


class ParamSnapshot:
    """fp32 copies of the parameters at RL start (θ₀) and at the previous step (θ_prev).

    Memory: two fp32 copies of this rank's parameters (≈1.1 GB for a 135M model).

    Args:
        named_params: this rank's ``(name, parameter)`` pairs (e.g. ``model.named_parameters()``).
        tol: a parameter counts as changed when ``|Δ| > tol`` (elementwise, absolute).
        group: process group the counts are summed over (None: the default group if initialized).
        counted: predicate ``(name, param) -> bool``; parameters for which it is False on this rank
            are skipped (TP duplicates on tp_rank > 0).
    """

    def __init__(
        self,
        named_params: NamedParams,
        tol: float = 0.0,
        group=None,
        counted: Callable[[str, Tensor], bool] | None = None,
    ) -> None:
        if tol < 0:
            raise ValueError(f"tol must be >= 0, got {tol}")
        self.tol = tol
        self.group = group
        self.counted = counted or (lambda name, p: True)
        self.initial: dict[str, Tensor] = {}
        self.previous: dict[str, Tensor] = {}
        for name, p in named_params:
            if not self.counted(name, p):
                continue
            self.initial[name] = p.detach().float().clone()
            self.previous[name] = self.initial[name].clone()
        if not self.initial:
            raise ValueError("ParamSnapshot: no parameters to track (empty or all filtered by `counted`)")

    @torch.no_grad()
    def update(self, named_params: NamedParams) -> Metrics:
        """Compare the current parameters to θ_prev and θ₀, then make them the new θ_prev.

        Returns (global over ``group``):
            ``update/step_changed_frac``, ``update/step_sparsity``: |θ − θ_prev| > tol
            ``update/cum_changed_frac``, ``update/cum_sparsity``: |θ − θ₀| > tol
            ``drift/param_l2_to_init`` = ‖θ − θ₀‖₂, ``drift/param_rel_l2_to_init`` = ‖θ − θ₀‖₂ / ‖θ₀‖₂
        """
        device = next(iter(self.initial.values())).device
        # [changed_step, changed_cum, numel, Σ(θ−θ₀)², Σθ₀²], float64 so counts stay exact
        stats = torch.zeros(5, dtype=torch.float64, device=device)
        seen = set()
        for name, p in named_params:
            if name not in self.initial:
                if self.counted(name, p):
                    raise ValueError(f"ParamSnapshot.update: parameter {name!r} was not in the snapshot")
                continue
            seen.add(name)
            cur = p.detach().float()
            init, prev = self.initial[name], self.previous[name]
            if cur.shape != init.shape:
                raise ValueError(f"ParamSnapshot.update: {name!r} has shape {tuple(cur.shape)}, "
                                 f"snapshot has {tuple(init.shape)}")
            diff_init = cur - init
            stats[0] += ((cur - prev).abs() > self.tol).sum()
            stats[1] += (diff_init.abs() > self.tol).sum()
            stats[2] += cur.numel()
            stats[3] += diff_init.double().square().sum()
            stats[4] += init.double().square().sum()
            prev.copy_(cur)
        missing = set(self.initial) - seen
        if missing:
            raise ValueError(f"ParamSnapshot.update: parameters missing from this call: {sorted(missing)[:5]}")
        _all_reduce(stats, self.group)
        step, cum = stats[0] / stats[2], stats[1] / stats[2]
        dist_l2 = stats[3].sqrt()
        return {
            "update/step_changed_frac": step.float(),
            "update/step_sparsity": (1 - step).float(),
            "update/cum_changed_frac": cum.float(),
            "update/cum_sparsity": (1 - cum).float(),
            "drift/param_l2_to_init": dist_l2.float(),
            "drift/param_rel_l2_to_init": (dist_l2 / stats[4].sqrt().clamp(min=1e-30)).float(),
        }


@torch.no_grad()
def kl_to_initial_policy(logp: Tensor, logp_init: Tensor, loss_mask: Tensor, group=None) -> Metrics:
    """KL(πθ ‖ π₀) ≈ mean over response tokens of k3 (Schulman 2020):

        k3_t = r_t − 1 − log r_t,  r_t = π₀(y_t)/πθ(y_t)

    on tokens sampled from πθ. Summed over ``group`` (use the data-parallel group: every DP rank
    holds different tokens). Shapes: ``[T]`` or ``[B, L]``, all equal.
    """
    mask = loss_mask.float()
    k3 = kl_penalty(logp.float(), logp_init.float(), "k3")
    stats = torch.stack([(k3 * mask).sum().double(), mask.sum().double()])
    _all_reduce(stats, group)
    return {"drift/kl_to_init_k3": (stats[0] / stats[1].clamp(min=1)).float()}
