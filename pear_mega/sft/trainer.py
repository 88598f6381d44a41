"""The PEAR-SFT trainer on megatron-core.

One optimizer step::

    packs (global_batch_packs / DP per rank, one pack per microbatch)
      → megatron get_forward_backward_func()   (1F1B over PP stages; no pipelining when PP = 1)
          forward_step: GPTModel(tokens, positions, block-diagonal mask) → logits [1, S, V/tp]
          loss_func:    fused_pear_loss(logits, labels, logp_beta, cu_seqlens) → Σ G·(−logp_θ), n
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
"""

from __future__ import annotations

import json
import math
import time
import warnings
from functools import partial
from pathlib import Path

import torch

from pear_mega.checkpointing import (
    latest_checkpoint,
    latest_step,
    load_checkpoint,
    lock_checkpoint_dir,
    save_checkpoint,
)
from pear_mega.config_tools import to_dict
from pear_mega.metrics_log import MetricsWriter
from pear_mega.optim import NonFiniteUpdateError, TrainingStopped, build_optimizer, guarded_step, wrap_ddp
from pear_mega.pear import IGNORE_INDEX, truncated_sampling_warning
from pear_mega.sft.config import SFTConfig

# Order of the per-step summed statistics (one float64 tensor, reduced with a single all_reduce).
_SUMS = ("tokens", "count", "nll", "weighted_nll", "g", "g2", "clip_low", "clip_high", "delta_clip", "seq_tokens")


class NonFiniteError(TrainingStopped):
    """Raised when too many consecutive steps had a non-finite loss or gradient norm."""


class SFTTrainer:
    """Builds the parallel model, optimizer and data from an ``SFTConfig`` and runs PEAR-SFT."""

    def __init__(self, cfg: SFTConfig):
        from megatron.core.distributed import finalize_model_grads

        from pear_mega.data import PackSource
        from pear_mega.models import ModelArch, build_gpt_model, load_hf_checkpoint
        from pear_mega.parallel import init_parallel

        cfg.validate_run()
        self.cfg = cfg
        self.ctx = init_parallel(cfg.parallel)
        # one writer per checkpoint directory (an orphaned worker and its restart must not share it)
        self._dir_lock = lock_checkpoint_dir(cfg.checkpoint.dir, self.ctx) if cfg.checkpoint.dir else None
        if cfg.train.global_batch_packs % self.ctx.dp_size:
            raise ValueError(
                f"train.global_batch_packs={cfg.train.global_batch_packs} must be divisible by the "
                f"data-parallel size {self.ctx.dp_size}"
            )
        self.num_microbatches = cfg.train.global_batch_packs // self.ctx.dp_size
        self.dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
        self.arch = ModelArch.from_hf(cfg.model.hf_path)

        model = build_gpt_model(self.arch, self.ctx, dtype=self.dtype, use_te=cfg.model.use_te)
        if cfg.model.recompute_activations:
            # Read by TransformerBlock at forward time: recompute every layer from its input.
            model.config.recompute_granularity = "full"
            model.config.recompute_method = "uniform"
            model.config.recompute_num_layers = 1
        if cfg.model.load_weights:
            load_hf_checkpoint(model, cfg.model.hf_path, self.arch, self.ctx)
        # Per-token normalization (see module docstring); DDP reads this flag when it is built.
        model.config.calculate_per_token_loss = True
        model.config.finalize_model_grads_func = finalize_model_grads
        use_dist_opt = (cfg.optim.use_distributed_optimizer
                        if cfg.optim.use_distributed_optimizer is not None else torch.cuda.is_available())
        self.model = [wrap_ddp(model, use_dist_opt)]
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg.optim, cfg.train.steps, self.dtype)

        self.data = PackSource(
            files=list(cfg.data.train_files),
            tokenizer_path=cfg.model.hf_path,
            seq_length=cfg.data.seq_length,
            seed=cfg.data.seed,
            dp_rank=self.ctx.dp_rank,
            dp_size=self.ctx.dp_size,
            skip_bad_rows=cfg.data.skip_bad_rows,
            truncate=cfg.data.truncate,
            token_check=cfg.data.token_check,
        )
        if self.ctx.rank == 0:
            print(f"data: {self.data.stats.summary()}", flush=True)
            warning = truncated_sampling_warning(
                ((json.loads(k), n) for k, n in self.data.stats.behaviors.items()), cfg.pear)
            if warning:
                warnings.warn(warning, stacklevel=1)
        self.step = 0
        self.bad_streak = 0
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
        from pear_mega.models import attention_inputs

        pack = next(data_iterator)
        tokens = pack["tokens"].to(self.ctx.device).unsqueeze(0)
        position_ids, attention_mask, packed_seq_params = attention_inputs(
            pack["cu_seqlens"], tokens.shape[1], self.ctx.device)
        output = model(tokens, position_ids, attention_mask, packed_seq_params=packed_seq_params)
        return output, partial(self._loss_func, pack)

    def _loss_func(self, pack, logits: torch.Tensor):
        """logits [1, S, V/tp] → (Σ weighted loss, loss-token count, stats); see module docstring."""
        from pear_mega.kernels import fused_pear_loss

        device = logits.device
        labels = pack["labels"].to(device)
        logp_beta = pack["behavior_logprobs"].to(device)
        cu_seqlens = pack["cu_seqlens"].to(device)
        pear = self.cfg.pear
        mask = labels != IGNORE_INDEX
        n_tokens = mask.sum()
        v_local = logits.shape[-1]
        normalizer = None if pear.normalization == "weights" else 1.0
        # squeeze, not logits[0]: squeeze's backward is a view of the incoming gradient, while
        # select's backward allocates a zeroed [1, S, V/tp] buffer and copies the gradient into it.
        out = fused_pear_loss(
            logits.squeeze(0), labels, logp_beta, cu_seqlens, pear,
            tp_group=self.ctx.tp_group if self.ctx.tp_size > 1 else None,
            vocab_start=self.ctx.tp_rank * v_local, normalizer=normalizer, vocab_size=self.arch.vocab_size,
            # The logits are a fresh [s, V/tp] buffer (GPTModel's transpose().contiguous()) that nothing
            # reads after the loss: its storage takes the gradient, saving one logits-sized buffer.
            inplace_backward=True,
        )
        if pear.normalization == "tokens":
            loss, count = out.loss, n_tokens
        elif pear.normalization == "sequences":
            seq_ids = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1, device=device),
                                              (cu_seqlens[1:] - cu_seqlens[:-1]).long())
            per_seq = torch.zeros(len(cu_seqlens) - 1, device=device).index_add_(0, seq_ids, mask.float())
            loss, count = out.loss, (per_seq > 0).sum()
        else:  # "weights": token-weighted mean of per-microbatch self-normalized losses
            loss, count = out.loss * n_tokens, n_tokens
        stats = self._stat_sums(out, mask, logp_beta, count)
        self._last_log_weights = out.log_weights[mask]
        return loss, count.to(torch.int), {"sums": stats[0], "minmax": stats[1]}

    def _stat_sums(self, out, mask, logp_beta, count):
        """Per-microbatch sums for the step metrics (summed over microbatches and DP later)."""
        pear = self.cfg.pear
        m = mask.double()
        lw = out.log_weights.double()
        g = lw.exp() * m
        nll = -out.logprobs.double() * m
        lo, hi = pear.log_weight_clip
        dlo, dhi = pear.delta_clip
        delta = out.logprobs.double() - logp_beta.double()
        at_bound = pear.level != "none"
        sums = torch.stack([
            m.sum(), count.double(), nll.sum(), (g * nll).sum(), g.sum(), (g * g).sum(),
            ((lw <= lo + 1e-6) & mask).double().sum() if at_bound else m.sum() * 0,
            ((lw >= hi - 1e-6) & mask).double().sum() if at_bound else m.sum() * 0,
            (((delta < dlo) | (delta > dhi)) & mask).double().sum(),
            (out.entropy.double() * m).sum(),
        ])
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
        sums = torch.zeros(len(_SUMS), dtype=torch.float64, device=device)
        minmax = torch.full((2,), -float("inf"), dtype=torch.float64, device=device)
        for item in reduced:
            sums += item["sums"]
            minmax = torch.maximum(minmax, item["minmax"])
        if self.ctx.pp_size > 1:
            last = torch.distributed.get_process_group_ranks(self.ctx.pp_group)[-1]
            torch.distributed.broadcast(sums, src=last, group=self.ctx.pp_group)
            torch.distributed.broadcast(minmax, src=last, group=self.ctx.pp_group)
        if self.ctx.dp_size > 1:
            torch.distributed.all_reduce(sums, group=self.ctx.dp_group)
            torch.distributed.all_reduce(minmax, op=torch.distributed.ReduceOp.MAX, group=self.ctx.dp_group)
        return sums.cpu(), minmax.cpu()

    def _metrics(self, sums, minmax, grad_norm, applied, elapsed, real_tokens) -> dict[str, float]:
        s = dict(zip(_SUMS, sums.tolist()))
        n = max(s["tokens"], 1.0)
        loss = s["weighted_nll"] / max(s["count"], 1.0)
        if self.cfg.pear.normalization == "weights":
            loss = s["weighted_nll"] / max(s["g"], 1e-30)
        return {
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

    # ------------------------------------------------------------------ the loop
    def train(self) -> list[dict]:
        cfg = self.cfg
        try:
            while self.step < cfg.train.steps:
                try:
                    metrics = self.train_step()
                except NonFiniteUpdateError as exc:
                    raise NonFiniteError(f"step {self.step + 1}: {exc}; stopping without saving it. "
                                         f"The last good checkpoint is {self._last_good()}") from None
                if self.bad_streak >= cfg.train.max_bad_steps:
                    raise NonFiniteError(
                        f"{self.bad_streak} consecutive steps had a non-finite loss or grad norm "
                        f"(last: loss={metrics['train/loss']}, grad_norm={metrics['train/grad_norm']}); "
                        f"stopping at step {self.step}. The last good checkpoint is {self._last_good()}"
                    )
                if self.step % cfg.train.log_interval == 0 or self.step == cfg.train.steps:
                    self.metrics.log(self.step, metrics, ("train/loss", "train/nll", "pear/weight_mean", "train/grad_norm"))
                hist = cfg.logging.histogram_interval
                if hist and self.step % hist == 0 and self._last_log_weights is not None:
                    self.metrics.histogram(self.step, "pear/log_weights", self._last_log_weights)
                if (cfg.checkpoint.dir and cfg.checkpoint.save_interval
                        and self.step % cfg.checkpoint.save_interval == 0 and self.bad_streak == 0):
                    self.save()
            if cfg.checkpoint.dir and latest_step(cfg.checkpoint.dir) != self.step:
                self.save()
            if cfg.checkpoint.export_hf:
                self.export_hf(cfg.checkpoint.export_hf)
        finally:
            self.metrics.close()
        return self.metrics.history

    def _last_good(self) -> str:
        """The newest checkpoint (saves refuse non-finite weights, so it is a finite one)."""
        if not self.cfg.checkpoint.dir:
            return "none (checkpoint.dir unset)"
        return str(latest_checkpoint(self.cfg.checkpoint.dir) or f"none in {self.cfg.checkpoint.dir}")

    def save(self, before_publish=None) -> Path:
        return save_checkpoint(
            self.cfg.checkpoint.dir, self.step, self.model, self.optimizer, self.scheduler, self.ctx,
            self.data.state_dict(),
            metadata={"hf_path": self.cfg.model.hf_path, "config": to_dict(self.cfg)},
            hf_files_from=self.cfg.model.hf_path,
            before_publish=before_publish,
        )

    def export_hf(self, out_dir: str) -> None:
        """Gather TP/PP shards into an HF directory (safetensors + config + tokenizer) on rank 0."""
        from pear_mega.models import iter_hf_tensors, save_hf_checkpoint

        tensors = iter_hf_tensors(self.model[0].module, self.arch, self.ctx, dst=0)
        if self.ctx.rank == 0:
            save_hf_checkpoint(tensors, out_dir, self.arch, hf_files_from=self.cfg.model.hf_path)
        else:
            for _ in tensors:  # every rank drives the gather collectives
                pass
        torch.distributed.barrier()
        self._print(f"exported HF checkpoint to {out_dir}")

    def _print(self, msg: str) -> None:
        if self.ctx.rank == 0:
            print(msg, flush=True)

    def close(self) -> None:
        from pear_mega.parallel import destroy_parallel

        if self._dir_lock is not None:
            self._dir_lock.close()
        destroy_parallel()
