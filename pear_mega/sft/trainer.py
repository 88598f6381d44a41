"""The PEAR-SFT trainer on megatron-core.

One optimizer step::

    packs (global_batch_packs / DP per rank, one pack per microbatch)
      → megatron get_forward_backward_func()   (1F1B over PP stages; no pipelining when PP = 1)
          forward_step: GPTModel(tokens, positions, block-diagonal mask) → logits [1, S, V/tp]
          loss_func:    loss.kind's loss object (pear_mega.sft.losses): fused_pear_loss → Σ G·(−logp_θ), n,
                        or fused_pear_kd_loss against the data's teacher top-K → Σ G·ℓ_KD, n
      → finalize_model_grads: DP all-reduce, then grads /= global loss-token count (on device)
      → guarded optimizer step (skipped when the loss or grad norm is not finite)
      → LR schedule, metrics, checkpoint

The loss normalizer is megatron's per-token contract (``calculate_per_token_loss``): each
microbatch returns the *sum* of its weighted token losses and its token count, so the update is
Σ_global G·ℓ / N_global whatever the microbatch/DP split (``normalization="tokens"``). With
``normalization="sequences"`` the count is the number of sequences and each token is scaled by
1 / (its sequence's loss tokens). ``"weights"`` self-normalizes within each microbatch
(Σ G·ℓ / Σ G), token-weighted across microbatches: Σ G over the global batch is only known after
every forward, which megatron's schedule does not offer.

The model building, forward step, loop, export and ``NonFiniteError`` are the trainer core's
(``pear_mega.trainer_core``); this module holds the SFT data, the loss call and its statistics.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from functools import partial
from pathlib import Path

import torch

from pear_mega.checkpointing import latest_checkpoint, load_checkpoint, save_checkpoint
from pear_mega.config_tools import to_dict
from pear_mega.metrics_log import MetricsWriter
from pear_mega.optim import build_optimizer, guarded_step
from pear_mega.pear import truncated_sampling_warning
from pear_mega.sft.config import SFTConfig
from pear_mega.trainer_core import NonFiniteError, TrainerCore, forward_pack, share_from_last_stage

# Order of the per-step summed statistics (one float64 tensor, reduced with a single all_reduce).
# "weighted_loss": Σ G·ℓ_t with ℓ_t the loss kind's per-token loss; the kind's own sums follow these.
_SUMS = ("tokens", "count", "nll", "weighted_loss", "g", "g2", "clip_low", "clip_high", "delta_clip", "seq_tokens")

__all__ = ["NonFiniteError", "SFTTrainer"]


class SFTTrainer(TrainerCore):
    """Builds the parallel model, optimizer and data from an ``SFTConfig`` and runs PEAR-SFT."""

    log_keys = ("train/loss", "train/nll", "pear/weight_mean", "train/grad_norm")
    save_after_skipped_step = False

    def __init__(self, cfg: SFTConfig):
        from pear_mega.data import PackSource
        from pear_mega.sft.losses import build_loss

        self._start(cfg)
        if cfg.train.global_batch_packs % self.ctx.dp_size:
            raise ValueError(
                f"train.global_batch_packs={cfg.train.global_batch_packs} must be divisible by the "
                f"data-parallel size {self.ctx.dp_size}"
            )
        self.num_microbatches = cfg.train.global_batch_packs // self.ctx.dp_size
        self.model = [self._make_trainable(self._build_model(cfg.model.hf_path))]
        self.loss = build_loss(cfg, self.arch.vocab_size)
        self._sum_names = _SUMS + self.loss.extra_names
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg.optim, cfg.train.steps, self.dtype)

        self.data = PackSource(cfg.data_source(), dp_rank=self.ctx.dp_rank, dp_size=self.ctx.dp_size)
        self.loss.check_packs(self.data.packs, cfg.data.train_files)
        if self.ctx.rank == 0:
            print(f"data: {self.data.stats.summary()}", flush=True)
            warning = truncated_sampling_warning(
                ((json.loads(k), n) for k, n in self.data.stats.behaviors.items()), cfg.pear)
            if warning:
                warnings.warn(warning, stacklevel=1)
        if cfg.checkpoint.dir and cfg.checkpoint.resume:
            path = latest_checkpoint(cfg.checkpoint.dir)
            if path is not None:
                self.step, data_state = load_checkpoint(path, self.model, self.optimizer, self.scheduler, self.ctx,
                                                        keep_schedule=cfg.checkpoint.keep_schedule)
                self.data.load_state_dict(data_state)
                self._print(f"resumed from {path} at step {self.step}")
        self.metrics = MetricsWriter(self.ctx.rank, cfg.train.steps, cfg.logging.tensorboard_dir,
                                     cfg.logging.progress_bar, initial_step=self.step, desc=cfg.name)
        self._last_log_weights: torch.Tensor | None = None

    # ------------------------------------------------------------------ the step
    def _forward_step(self, data_iterator, model):
        """megatron forward_step_func: one pack → (output, loss_func)."""
        pack = next(data_iterator)
        return forward_pack(model, pack, self.ctx.device), partial(self._loss_func, pack)

    def _loss_func(self, pack, logits: torch.Tensor):
        """logits [1, S, V/tp] → (Σ weighted loss, loss-token count, stats); see module docstring."""
        # squeeze, not logits[0]: squeeze's backward is a view of the incoming gradient, while
        # select's backward allocates a zeroed [1, S, V/tp] buffer and copies the gradient into it.
        # The logits are a fresh [s, V/tp] buffer (GPTModel's transpose().contiguous()) that nothing
        # reads after the loss: the loss writes the gradient into its storage (inplace_backward).
        result = self.loss(logits.squeeze(0), pack, self.ctx)
        mask = result.mask
        stats = self._stat_sums(result, mask, result.logp_beta, result.count)
        self._last_log_weights = result.out.log_weights[mask]
        return result.loss_sum, result.count.to(torch.int), {"sums": stats[0], "minmax": stats[1]}

    def _stat_sums(self, result, mask, logp_beta, count):
        """Per-microbatch sums for the step metrics (summed over microbatches and DP later)."""
        pear, out = self.cfg.pear, result.out
        m = mask.double()
        lw = out.log_weights.double()
        g = lw.exp() * m
        nll = -out.logprobs.double() * m
        entropy = getattr(out, "entropy", None)  # the distillation loss has none
        lo, hi = pear.log_weight_clip
        dlo, dhi = pear.delta_clip
        delta = out.logprobs.double() - logp_beta.double()
        at_bound = pear.level != "none"
        sums = torch.stack([
            m.sum(), count.double(), nll.sum(), (g * result.per_token.double() * m).sum(), g.sum(), (g * g).sum(),
            ((lw <= lo + 1e-6) & mask).double().sum() if at_bound else m.sum() * 0,
            ((lw >= hi - 1e-6) & mask).double().sum() if at_bound else m.sum() * 0,
            (((delta < dlo) | (delta > dhi)) & mask).double().sum(),
            (entropy.double() * m).sum() if entropy is not None else m.sum() * 0,
        ])
        sums = torch.cat([sums, result.sums.to(sums)])
        big = torch.tensor(float("inf"), dtype=torch.float64, device=lw.device)
        minmax = torch.stack([(-torch.where(mask, lw, big)).max() if mask.any() else -big,
                              torch.where(mask, lw, -big).max() if mask.any() else -big])
        return sums, minmax

    def train_step(self) -> dict[str, float]:
        """Run one optimizer step; returns the step's metrics (identical on every rank)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        t0 = time.perf_counter()
        packs = [self.data.next_pack() for _ in range(self.num_microbatches)]
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        forward_backward = get_forward_backward_func()
        reduced = forward_backward(
            forward_step_func=self._forward_step,
            data_iterator=iter(packs),
            model=self.model,
            num_microbatches=self.num_microbatches,
            seq_length=self.cfg.data.seq_length,
            micro_batch_size=1,
            forward_only=False,
        )
        sums, minmax = self._reduce_stats(reduced)
        loss_finite = bool(torch.isfinite(sums).all())
        applied, grad_norm = guarded_step(self.optimizer, self.cfg.optim.clip_grad, loss_finite)
        if applied:
            self.scheduler.step(increment=1)
            self.bad_streak = 0
        else:
            self.bad_streak += 1
        self.step += 1
        elapsed = time.perf_counter() - t0
        real_tokens = sum(int(p["num_real_tokens"]) for p in packs) * self.ctx.dp_size
        return self._metrics(sums, minmax, grad_norm, applied, elapsed, real_tokens)

    def _reduce_stats(self, reduced: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum the microbatch stats on the last stage, share them along PP, then reduce over DP."""
        device = self.ctx.device
        sums = torch.zeros(len(self._sum_names), dtype=torch.float64, device=device)
        minmax = torch.full((2,), -float("inf"), dtype=torch.float64, device=device)
        for item in reduced:
            sums += item["sums"]
            minmax = torch.maximum(minmax, item["minmax"])
        share_from_last_stage(self.ctx, sums, torch.distributed.ReduceOp.SUM)
        share_from_last_stage(self.ctx, minmax, torch.distributed.ReduceOp.MAX)
        return sums.cpu(), minmax.cpu()

    def _metrics(self, sums, minmax, grad_norm, applied, elapsed, real_tokens) -> dict[str, float]:
        s = dict(zip(self._sum_names, sums.tolist()))
        n = max(s["tokens"], 1.0)
        loss = s["weighted_loss"] / max(s["count"], 1.0)
        if self.cfg.pear.normalization == "weights":
            loss = s["weighted_loss"] / max(s["g"], 1e-30)
        metrics = {
            "train/loss": loss,
            "train/nll": s["nll"] / n,
            "train/entropy": s["seq_tokens"] / n,
            "train/grad_norm": grad_norm,
            "train/lr": self.optimizer.param_groups[0]["lr"],
            "train/step_applied": float(applied),
            "train/loss_tokens": s["tokens"],
            "timing/step_s": elapsed,
            "throughput/tokens_per_s": real_tokens / max(elapsed, 1e-9),
            "pear/weight_mean": s["g"] / n,
            "pear/weight_min": math.exp(-minmax[0].item()) if s["tokens"] else 0.0,
            "pear/weight_max": math.exp(minmax[1].item()) if s["tokens"] else 0.0,
            "pear/ess": (s["g"] ** 2) / (n * s["g2"]) if s["g2"] > 0 else 0.0,
            "pear/clip_low_frac": s["clip_low"] / n,
            "pear/clip_high_frac": s["clip_high"] / n,
            "pear/delta_clip_frac": s["delta_clip"] / n,
        }
        if not self.loss.has_entropy:  # e.g. the distillation kernel computes none
            del metrics["train/entropy"]
        return {**metrics, **self.loss.metrics(s)}

    # ------------------------------------------------------------------ the loop (trainer_core)
    def _after_step(self, metrics: dict[str, float]) -> None:
        hist = self.cfg.logging.histogram_interval
        if hist and self.step % hist == 0 and self._last_log_weights is not None:
            self.metrics.histogram(self.step, "pear/log_weights", self._last_log_weights)

    def save(self, before_publish=None) -> Path:
        return save_checkpoint(
            self.cfg.checkpoint.dir, self.step, self.model, self.optimizer, self.scheduler, self.ctx,
            self.data.state_dict(),
            metadata={"hf_path": self.cfg.model.hf_path, "config": to_dict(self.cfg)},
            hf_files_from=self.cfg.model.hf_path,
            before_publish=before_publish,
        )

    def _export_model(self):
        return self.model[0].module
