"""Megatron DDP wrapping, optimizer, LR schedule and the guarded optimizer step.

Shared by the SFT and RL trainers. The schedule is linear warmup then cosine decay to ``min_lr``
(megatron's ``OptimizerParamScheduler``). Gradient normalization follows megatron's per-token
contract: loss functions return the *sum* of their per-token losses and the number of tokens, the
schedule accumulates the count on device, and ``finalize_model_grads`` divides the gradients by
the global count after the DP all-reduce (``calculate_per_token_loss=True``), so results do not
depend on how a global batch is split into microbatches and data-parallel ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pear_mega.platform import use_gpu

_FLOAT32_MAX = 3.4028234663852886e38


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with warmup + cosine decay and global-norm gradient clipping."""

    lr: float = 1e-5
    """Peak learning rate, reached after ``warmup_steps``."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay."""
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    warmup_steps: int = 0
    decay_style: str = "cosine"
    """'cosine', 'linear' or 'constant' after warmup."""
    use_distributed_optimizer: bool | None = None
    """Shard optimizer state over DP ranks; None = on GPU only."""

    def __post_init__(self):
        # Every value is used in float32 by the fused update: a number finite in Python but not
        # in float32 (1e39) is as bad as inf. `not x >= 0` is also true for NaN.
        def finite(name: str, value: float, rule: str, ok: bool) -> None:
            if not (ok and math.isfinite(value) and abs(value) <= _FLOAT32_MAX):
                raise ValueError(f"optim.{name} must be a finite number {rule}, got {value!r}")

        finite("lr", self.lr, "> 0", self.lr > 0)
        finite("min_lr", self.min_lr, "in [0, optim.lr]", 0 <= self.min_lr <= self.lr)
        finite("weight_decay", self.weight_decay, ">= 0", self.weight_decay >= 0)
        finite("adam_eps", self.adam_eps, "> 0", self.adam_eps > 0)
        finite("clip_grad", self.clip_grad, ">= 0 (0 disables clipping)", self.clip_grad >= 0)
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.decay_style not in ("cosine", "linear", "constant"):
            raise ValueError(f"optim.decay_style must be cosine|linear|constant, got {self.decay_style!r}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"optim.{name} must be in [0, 1), got {getattr(self, name)!r}")

    def check_steps(self, total_updates: int, steps_key: str) -> None:
        """Cross-field check: warmup must end within the run (``steps_key`` names the setting)."""
        if self.warmup_steps > total_updates:
            raise ValueError(f"optim.warmup_steps ({self.warmup_steps}) exceeds the run's {total_updates} optimizer "
                             f"steps ({steps_key}): the learning rate would never reach optim.lr")


def wrap_ddp(model: torch.nn.Module, use_distributed_optimizer: bool) -> torch.nn.Module:
    """Wrap a megatron module in megatron's DDP (contiguous fp32 grad buffers).

    On CPU the linear layers then accumulate their weight gradients straight into the fp32 grad
    buffer (``pear_mega.cpu.linear``; needs ``overlap_grad_reduce=False``, set here).
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
        check_for_nan_in_grad=False,  # the guarded step below decides what a bad step is
    )
    ddp = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    if not use_gpu():
        from pear_mega.cpu.linear import enable_main_grad_accumulation

        enable_main_grad_accumulation(model)
    return ddp


def default_distributed_optimizer(setting: bool | None) -> bool:
    """``optim.use_distributed_optimizer``; None = on a GPU (``use_gpu()``), off on CPU. The one
    default: the DDP wrap (``pear_mega.trainer_core``) and the optimizer read it here."""
    return setting if setting is not None else use_gpu()


def build_optimizer(model_chunks: list[torch.nn.Module], cfg: OptimConfig, total_steps: int, dtype: torch.dtype):
    """Return ``(optimizer, scheduler)`` for DDP-wrapped model chunks."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    use_dist = default_distributed_optimizer(cfg.use_distributed_optimizer)
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        bf16=dtype == torch.bfloat16,
        fp16=False,
        params_dtype=dtype,
        use_distributed_optimizer=use_dist,
    )
    optimizer = get_megatron_optimizer(opt_config, model_chunks)
    if not use_gpu():
        _use_fused_cpu_adam(optimizer)
    decay_steps = max(total_steps, cfg.warmup_steps + 1)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if cfg.warmup_steps > 0 else cfg.lr,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=cfg.decay_style,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


def _use_fused_cpu_adam(optimizer) -> None:
    """Switch megatron's torch AdamW (its fallback without TE/apex) to torch's fused CPU kernel.

    Without the switch torch runs the for-loop AdamW on CPU tensors: ~6 elementwise passes per
    parameter (lerp, mul, addcmul, sqrt, div, addcdiv) each reading and writing memory. The fused
    kernel does the same update in one vectorized pass (megatron's own CPU-offload optimizer
    passes ``fused=True`` for the same reason). Same update rule; results agree to float rounding.
    Set before the first step: the ``step`` state is created then, on the parameter's device.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, torch.optim.Adam):  # AdamW subclasses Adam
            continue
        inner.defaults.update(fused=True, foreach=False)
        for group in inner.param_groups:
            group.update(fused=True, foreach=False)


def _clip_grads_(opt, max_norm: float, total_norm: float) -> None:
    """Scale ``opt``'s fp32 gradients in place by ``max_norm / total_norm`` when that is < 1.

    On GPU this is megatron's ``clip_grad_by_total_norm_fp32`` (apex's multi-tensor scale). On CPU
    megatron's fallback computes ``grad.copy_(grad * coeff)``: a temporary the size of every
    gradient (page-faulting fresh memory for the large ones) and an extra pass; ``mul_`` is the
    same product in place.
    """
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    params = opt.get_parameters()
    if not params:
        return
    decoupled = opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8
    if use_gpu():
        clip_grad_by_total_norm_fp32(params, max_norm=max_norm, total_norm=total_norm, use_decoupled_grad=decoupled)
        return
    coeff = max_norm / (total_norm + 1.0e-6)  # megatron's formula, epsilon included
    if coeff >= 1.0:
        return
    for param in params:
        grad = getattr(param, "decoupled_grad", None) if decoupled else param.grad
        if grad is not None:
            grad.detach().mul_(coeff)


class TrainingStopped(RuntimeError):
    """A run stopped on a condition it detected itself (non-finite steps or weights); the message
    says why and which checkpoint is the last good one. The command line prints it alone, exit 1."""


class NonFiniteUpdateError(TrainingStopped):
    """The optimizer update made some parameter NaN or infinite (the run must stop: the weights are lost)."""


def guarded_step(optimizer, clip_grad: float, loss_is_finite: bool = True) -> tuple[bool, float]:
    """Clip and apply the update only when the loss and the global grad norm are finite, then
    check that the parameters the update wrote are finite.

    Megatron's fp32/bf16 optimizers check for inf/nan only under a loss scaler (fp16), so a NaN
    loss would otherwise be applied and poison the weights. This is ``ChainedOptimizer.step``
    with the finiteness check inserted between the norm and the update. A finite gradient can
    still give a non-finite update (an overflowing learning rate, Adam's second moment
    underflowing in low precision): the parameters after the update are checked on every rank
    (max |θ| per tensor, one all-reduce) and a non-finite result raises, so the step never counts
    as applied and nothing after it is saved.

    Returns:
        ``(applied, grad_norm)``; when not applied the gradients are left for the caller to zero.
    Raises:
        NonFiniteUpdateError: the update made a parameter non-finite.
    """
    if optimizer.prepare_grads():  # loss-scaler overflow (fp16 only)
        return False, float("inf")
    grad_norm = float(optimizer.get_grad_norm())
    if not (loss_is_finite and math.isfinite(grad_norm)):
        return False, grad_norm
    if clip_grad > 0:
        for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
            _clip_grads_(opt, clip_grad, grad_norm)
    optimizer.step_with_ready_grads()
    if not _updated_params_finite(optimizer):
        lr = optimizer.param_groups[0]["lr"] if optimizer.param_groups else float("nan")
        raise NonFiniteUpdateError(f"the optimizer update made parameters non-finite (grad norm {grad_norm:.4g}, "
                                   f"lr {lr:.4g})")
    return True, grad_norm


def _updated_params_finite(optimizer) -> bool:
    """Whether the parameters every rank's optimizer updated are finite (a world all-reduce).

    The optimizer's own parameters: the model's (fp32), the fp32 main copies (bf16) or this DP
    rank's shard of them (distributed optimizer); together over the world they cover every
    updated value, and the model copies are cast from them.
    """
    peaks = [p.detach().abs().amax().float() for opt in getattr(optimizer, "chained_optimizers", [optimizer])
             for p in opt.get_parameters() if p.numel()]
    device = peaks[0].device if peaks else (torch.device("cuda") if use_gpu() else torch.device("cpu"))
    bad = (~torch.isfinite(torch.stack(peaks))).any().float().reshape(1) if peaks else torch.zeros(1, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return not bool(bad.item())


# scheduler state key -> the setting it comes from (for the resume message)
_SCHEDULE_SETTINGS = {
    "max_lr": "optim.lr",
    "min_lr": "optim.min_lr",
    "lr_warmup_steps": "optim.warmup_steps",
    "lr_decay_style": "optim.decay_style",
    "lr_decay_steps": "decay length (train.steps)",
    "start_wd": "optim.weight_decay",
    "end_wd": "optim.weight_decay (end)",
    "wd_incr_steps": "weight-decay length (train.steps)",
}


_GROUP_SCHEDULE_KEYS = ("max_lr", "min_lr")


def schedule_group_settings(optimizer) -> list[dict]:
    """The per-param-group schedule settings megatron puts in the optimizer's param groups (the
    scheduler reads ``max_lr`` / ``min_lr`` from each group before its own): take them before an
    optimizer load, which replaces them with the checkpoint's, and give them to ``restore_schedule``."""
    return [{k: g[k] for k in _GROUP_SCHEDULE_KEYS if k in g} for g in optimizer.param_groups]


def restore_schedule(scheduler, state: dict, keep_schedule: bool, config_groups: list[dict] | None = None
                     ) -> list[str]:
    """Load a checkpoint's ``OptimizerParamScheduler`` state: its step count always, its settings
    only with ``keep_schedule`` (else this run's config wins). Sets the optimizer's lr / weight
    decay for the resumed step.

    megatron's scheduler defaults to ``use_checkpoint_opt_param_scheduler=True``, under which the
    checkpoint's lr, warmup, decay style and length silently beat the config ("lower the LR and
    resume" would do nothing); the optimizer's own state dict also brings back the checkpoint's
    per-group ``max_lr`` / ``min_lr``, which the scheduler prefers: unless ``keep_schedule``, the
    ``config_groups`` taken before the optimizer load (``schedule_group_settings``) are put back.
    Returns one ``"setting: old -> new"`` line per difference (old: the checkpoint's; new: what
    the run uses).
    """
    if not keep_schedule and config_groups is not None:
        for group, settings in zip(scheduler.optimizer.param_groups, config_groups):
            group.update(settings)
    mine = scheduler.state_dict()
    changes = []
    for key, setting in _SCHEDULE_SETTINGS.items():
        if key in state and state[key] != mine[key]:
            old, new = (state[key], state[key]) if keep_schedule else (state[key], mine[key])
            changes.append(f"{setting}: {old!r} -> {new!r}" + (f" (config: {mine[key]!r})" if keep_schedule else ""))
    scheduler.override_opt_param_scheduler = not keep_schedule
    scheduler.use_checkpoint_opt_param_scheduler = keep_schedule
    scheduler.load_state_dict(dict(state))
    return changes
