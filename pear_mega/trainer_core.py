"""What the SFT and RL trainers share: a trainable megatron model, the forward step, the reduction
of step statistics over the parallel groups, and the loop.

``TrainerCore`` is the base of ``pear_mega.sft.trainer.SFTTrainer`` and
``pear_mega.rl.trainer.RLTrainer``; each keeps only its own loss and phases (``train_step``,
``save``). The pieces:

* ``_start`` — final config checks, the process groups, one writer per checkpoint directory, the
  architecture and the parameter dtype.
* ``_build_model`` / ``_make_trainable`` — ``build_gpt_model`` + HF weights; then full activation
  recompute (``model.recompute_activations``), megatron's per-token loss contract
  (``calculate_per_token_loss``: each microbatch returns Σ loss and its token count, megatron divides
  the gradients by the global count after the DP all-reduce), ``finalize_model_grads`` and the DDP
  wrap. The distributed optimizer defaults to on exactly when ``pear_mega.platform.use_gpu()``
  (``pear_mega.optim.default_distributed_optimizer``, read by the optimizer too).
* ``forward_pack`` — one pack through the model with the attention inputs of the layout the model
  was built with (``model.pear_spec_layout``: a block-diagonal mask for the local spec, THD
  ``PackedSeqParams`` for the TE spec), so no trainer can hand one spec the other's inputs.
* ``share_from_last_stage`` — step statistics computed on the last pipeline stage: summed (or
  maxed) over DP and broadcast to every stage.
* ``train`` — the loop: steps until ``train.steps``, a stop after ``train.max_bad_steps``
  consecutive skipped updates or at once on a non-finite update (``NonFiniteError``, naming the last
  good checkpoint), a save every ``checkpoint.save_interval`` steps and at the end, metrics and
  progress/ETA through ``MetricsWriter``, the HF export.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from pear_mega.checkpointing import latest_checkpoint, latest_step, lock_checkpoint_dir
from pear_mega.optim import NonFiniteUpdateError, TrainingStopped, default_distributed_optimizer, wrap_ddp
from pear_mega.weight_sync import drain


class NonFiniteError(TrainingStopped):
    """Training stopped: the optimizer update made parameters non-finite, or too many consecutive
    optimizer steps had a non-finite loss or gradient norm."""


def make_trainable(model, *, recompute_activations: bool, use_distributed_optimizer: bool | None):
    """Configure a freshly built ``GPTModel`` for training and wrap it in megatron's DDP."""
    from megatron.core.distributed import finalize_model_grads

    if recompute_activations:
        # Read by TransformerBlock at forward time: recompute every layer from its input.
        model.config.recompute_granularity = "full"
        model.config.recompute_method = "uniform"
        model.config.recompute_num_layers = 1
    # Per-token normalization (module docstring); DDP reads this flag when it is built.
    model.config.calculate_per_token_loss = True
    model.config.finalize_model_grads_func = finalize_model_grads
    return wrap_ddp(model, default_distributed_optimizer(use_distributed_optimizer))


def forward_pack(model, pack: dict, device):
    """One pack ``{"tokens" [S], "cu_seqlens" [B+1]}`` through ``model`` (any wrapper) → its output
    (logits ``[1, S, V/tp]`` on the last stage), attention inputs in the model's own spec layout."""
    from pear_mega.models import SPEC_TE, attention_inputs, unwrap_model

    tokens = pack["tokens"].to(device).unsqueeze(0)
    use_te = unwrap_model(model).pear_spec_layout == SPEC_TE
    position_ids, attention_mask, packed = attention_inputs(pack["cu_seqlens"], tokens.shape[1], device, use_te=use_te)
    return model(tokens, position_ids, attention_mask, packed_seq_params=packed)


def share_from_last_stage(ctx, t: torch.Tensor, dp_op=None) -> torch.Tensor:
    """``t`` as computed on the last pipeline stage, reduced over DP with ``dp_op`` (None = not
    reduced; on the last stage only) and broadcast to every stage of the pipeline. In place."""
    if dp_op is not None and ctx.is_last_stage and ctx.dp_size > 1:
        dist.all_reduce(t, op=dp_op, group=ctx.dp_group)
    if ctx.pp_size > 1:
        dist.broadcast(t, src=dist.get_process_group_ranks(ctx.pp_group)[-1], group=ctx.pp_group)
    return t


class TrainerCore:
    """The shared half of a trainer. A subclass sets ``self.metrics`` (a ``MetricsWriter``) and
    implements ``train_step() -> metrics``, ``save()`` and ``_export_model()``; it counts skipped
    updates in ``self.bad_streak``."""

    log_keys: tuple[str, ...] = ()
    """Metrics shown on the progress line."""
    save_after_skipped_step: bool = True
    """Whether a periodic save may follow a step whose update was skipped."""

    def _start(self, cfg) -> None:
        from pear_mega.models import ModelArch
        from pear_mega.parallel import init_parallel

        cfg.validate_run()
        self.cfg = cfg
        self.ctx = init_parallel(cfg.parallel)
        # one writer per checkpoint directory (an orphaned worker and its restart must not share it)
        self._dir_lock = lock_checkpoint_dir(cfg.checkpoint.dir, self.ctx) if cfg.checkpoint.dir else None
        self.dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
        self.arch = ModelArch.from_hf(cfg.model.hf_path)
        self.step = 0
        self.bad_streak = 0

    def _build_model(self, hf_path: str):
        """This rank's ``GPTModel`` with the weights of ``hf_path`` (unless ``model.load_weights`` is off)."""
        from pear_mega.models import build_gpt_model, load_hf_checkpoint

        model = build_gpt_model(self.arch, self.ctx, dtype=self.dtype, use_te=self.cfg.model.use_te)
        if self.cfg.model.load_weights:
            load_hf_checkpoint(model, hf_path, self.arch, self.ctx)
        return model

    def _make_trainable(self, model):
        return make_trainable(model, recompute_activations=self.cfg.model.recompute_activations,
                              use_distributed_optimizer=self.cfg.optim.use_distributed_optimizer)

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
                        f"{self.bad_streak} consecutive optimizer steps had a non-finite loss or grad norm "
                        f"(last: loss={metrics.get('train/loss')}, grad_norm={metrics.get('train/grad_norm')}); "
                        f"stopping at step {self.step}. The last good checkpoint is {self._last_good()}"
                    )
                if (cfg.checkpoint.dir and cfg.checkpoint.save_interval and self.step % cfg.checkpoint.save_interval == 0
                        and (self.save_after_skipped_step or self.bad_streak == 0)):  # fmt: skip
                    t = time.perf_counter()
                    self.save()
                    metrics["timing/checkpoint"] = time.perf_counter() - t
                if self.step % cfg.train.log_interval == 0 or self.step == cfg.train.steps:
                    self.metrics.log(self.step, metrics, self.log_keys)
                self._after_step(metrics)
            if cfg.checkpoint.dir and latest_step(cfg.checkpoint.dir) != self.step:
                self.save()
            if cfg.checkpoint.export_hf:
                self.export_hf(cfg.checkpoint.export_hf)
        finally:
            self.metrics.close()
        return self.metrics.history

    def _after_step(self, metrics: dict[str, float]) -> None:
        """A subclass's per-step extras after logging (e.g. histograms)."""

    def _last_good(self) -> str:
        """The newest checkpoint (saves refuse non-finite weights, so it is a finite one)."""
        if not self.cfg.checkpoint.dir:
            return "none (checkpoint.dir unset)"
        return str(latest_checkpoint(self.cfg.checkpoint.dir) or f"none in {self.cfg.checkpoint.dir}")

    def export_hf(self, out_dir: str) -> None:
        """Gather TP/PP shards into an HF directory (safetensors + config + tokenizer) on rank 0."""
        from pear_mega.models import iter_hf_tensors, save_hf_checkpoint

        tensors = iter_hf_tensors(self._export_model(), self.arch, self.ctx, dst=0)
        if self.ctx.rank == 0:
            save_hf_checkpoint(tensors, out_dir, self.arch, hf_files_from=self.cfg.model.hf_path)
        else:
            drain(tensors)  # every rank drives the gather collectives
        dist.barrier()
        self._print(f"exported HF checkpoint to {out_dir}")

    def _print(self, msg: str) -> None:
        if self.ctx.rank == 0:
            print(msg, flush=True)

    def close(self) -> None:
        from pear_mega.parallel import destroy_parallel

        if self._dir_lock is not None:
            self._dir_lock.close()
        destroy_parallel()


__all__ = ["NonFiniteError", "TrainerCore", "default_distributed_optimizer", "forward_pack", "make_trainable",
           "share_from_last_stage"]
