"""Colocated GRPO / PPO on megatron-core with an in-process vLLM rollout engine.

One RL step, one phase per line (``RLTrainer.train_step``)::

    seqs     = generate()          engine ranks: vLLM samples n responses per prompt, verifiable
                                   rewards, over-long shaping, dynamic sampling → every rank
    exp      = recompute(seqs)     forward-only, each where needed: log π_old and entropy (policy;
                                   else from the update's forward, algorithm.logprob_recompute),
                                   log π_ref (frozen initial policy; a logged-only KL every
                                   logging.kl_to_init_interval steps), V (critic, PPO)
    adv      = advantages(...)     the estimator's (pear_mega.rl.estimators): GRPO group-relative
                                   per sequence, PPO GAE on token rewards
    train    = update(...)         ppo_epochs x minibatches optimizer steps (megatron schedule)
    sync     = sync_weights()      WeightSync.push: iter_hf_tensors → RolloutEngine.update_weights (bucketed)
    verify   = verify_refit()      WeightSync.verify: probe log-probs, engine vs trainer, beyond tol → stop
    drift    = snapshot.update()   update sparsity, parameter drift

Layout. Every rank builds the policy (DDP + optimizer), the reference model and, for PPO, the
critic, split by TP/PP/DP like the SFT trainer. The vLLM engines live in the trainer processes
(``pear_mega.rl.engine_group``): ``rollout.num_engines`` engines of
``rollout.engine.tensor_parallel_size`` workers on global ranks ``0 .. E·R−1`` (default one
single-worker engine on rank 0), built from ``rollout.engine`` (``RLConfig.engine_config``);
rank 0's rollouts are broadcast with ``broadcast_object_list``. On GPU the engines sleep (sleep
mode: weights offloaded, KV cache freed) from the end of generation until the refit. Sequence
``i`` stays on DP rank ``i % dp`` for the whole step (``pear_mega.rl.experience``), and its
per-token tensors (old/ref log-probs, values, advantages) live on the last pipeline stage of that
DP rank, where the loss is computed.

Log-probs. All trainer log-probs are at the sampling temperature T (logits / T): the rollout
engine reports log-probs of its sampling distribution, so train/rollout mismatch compares like
with like (top_p < 1 adds the truncation to it). Detached log-probs and entropies come from the
fused PEAR kernel at level "none"; the differentiable log-prob of the policy loss is megatron's
``vocab_parallel_cross_entropy`` on the vocab-parallel logits, padded vocabulary columns masked to
−inf first. Refit verification compares at temperature 1 (vLLM's prompt log-probs).

Loss normalization follows megatron's per-token contract (``calculate_per_token_loss``): each
microbatch returns Σ_t mask_t·ℓ_t (``normalizer=1``) and its loss-token count; megatron divides
the gradients by the global count after the DP all-reduce — the token-level mean of DAPO Eq. 12.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from pear_mega.checkpointing import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from pear_mega.config_tools import to_dict
from pear_mega.metrics_log import MetricsWriter
from pear_mega.optim import build_optimizer, guarded_step
from pear_mega.pear import IGNORE_INDEX, PearConfig
from pear_mega.platform import use_gpu
from pear_mega.rl.config import RLConfig
from pear_mega.rl.engine_group import EngineGroup, EnginePlacement
from pear_mega.rl.experience import (
    Experience,
    RolloutSequence,
    collect_rollouts,
    gather_from_pack,
    pack_sequences,
    plan_microbatches,
    scatter_to_pack,
    shard_of,
    trim_packs,
)
from pear_mega.trainer_core import NonFiniteError, TrainerCore, forward_pack, share_from_last_stage
from pear_mega.weight_sync import WeightSync

__all__ = ["NonFiniteError", "RLTrainer", "vocab_parallel_entropy"]

_LOGPROBS_ONLY = PearConfig(level="none")
# metrics reduced with MAX (over microbatches and DP ranks) instead of a token-weighted mean
_MAX_KEYS = ("train/ratio_max", "rollout/logp_abs_diff_max")
# metrics that are already token sums (normalizer=1) rather than per-microbatch means
_SUM_KEYS = ("train/pg_loss", "train/loss", "train/value_loss")
_PER_UPDATE_KEYS = ("train/grad_norm", "train/lr", "train/step_applied", "train/critic_grad_norm", "train/critic_lr",
                    "train/critic_step_applied")
_CRITIC_RENAME = {"train/grad_norm": "train/critic_grad_norm", "train/step_applied": "train/critic_step_applied",
                  "train/lr": "train/critic_lr"}


def _combine_updates(collected: list[dict[str, float]]) -> dict[str, float]:
    """One step's metrics from its optimizer updates: token statistics weighted by each update's
    loss tokens (= the global token-level mean over the step), maxima as maxima, per-update
    quantities (grad norm, lr, applied) as plain means."""
    tokens = [m.get("train/loss_tokens", 0.0) for m in collected]
    total = sum(tokens)
    out: dict[str, float] = {}
    for key in {k for m in collected for k in m}:
        values = [m[key] for m in collected if key in m]
        if key in _MAX_KEYS:
            out[key] = max(values)
        elif key in _PER_UPDATE_KEYS or total == 0:
            out[key] = sum(values) / len(values)
        else:
            out[key] = sum(m.get(key, 0.0) * n for m, n in zip(collected, tokens)) / total
    out["train/loss_tokens"] = total
    out["train/updates"] = float(len(collected))
    return out


def vocab_parallel_entropy(logits: torch.Tensor, tp_group=None) -> torch.Tensor:
    """Differentiable entropy of softmax over vocab-parallel logits ``[T, V_valid_local]`` → ``[T]``.

        m = max_v z_v (all ranks, no gradient),  S = Σ_v e^{z_v − m},  Z = Σ_v e^{z_v − m}(z_v − m)
        H = log S − Z / S

    The partial sums are all-reduced with megatron's reduce_from_tensor_model_parallel_region
    (identity backward), so each rank gets the gradient of its own shard.
    """
    z = logits.float()
    if z.shape[-1]:
        m = z.detach().max(dim=-1).values
    else:
        m = torch.full(z.shape[:-1], float("-inf"), device=z.device)
    if tp_group is not None:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
    shifted = z - m.unsqueeze(-1)
    e = shifted.exp()
    sums = torch.stack([e.sum(-1), (e * shifted).sum(-1)])
    if tp_group is not None:
        from megatron.core.tensor_parallel import (
            reduce_from_tensor_model_parallel_region,
        )

        sums = reduce_from_tensor_model_parallel_region(sums, group=tp_group)
    return sums[0].log() - sums[1] / sums[0]


class RLTrainer(TrainerCore):
    """Builds policy, reference, critic, prompt source and rollout engine from an ``RLConfig``."""

    log_keys = ("rollout/reward_mean", "train/pg_loss", "train/clip_frac", "drift/kl_to_init_k3",
                "refit/max_abs_logp_diff")

    def __init__(self, cfg: RLConfig):
        from megatron.core import parallel_state as ps

        from pear_mega.models import unwrap_model

        self._start(cfg)
        self.is_rank0 = self.ctx.rank == 0
        self.engine_utilization = self._memory_plan()
        self.pad_id = int(self.arch.hf_config.get("pad_token_id") or 0)
        self.estimator = cfg.algorithm.estimator  # pear_mega.rl.estimators: critic or not, advantages
        self.tp_group = self.ctx.tp_group if self.ctx.tp_size > 1 else None
        coords = [None] * self.ctx.world_size
        dist.all_gather_object(coords, (self.ctx.tp_rank, self.ctx.pp_rank, self.ctx.dp_rank))
        # The rank whose reduced metrics go to rank 0: last stage of data-parallel replica 0.
        self.metrics_src = coords.index((0, self.ctx.pp_size - 1, 0))
        total_updates = cfg.train.steps * cfg.algorithm.updates_per_step

        self.policy = [self._make_trainable(self._build_model(cfg.model.hf_path))]
        self.optimizer, self.scheduler = build_optimizer(self.policy, cfg.optim, total_updates, self.dtype)
        self.ref = self._build_frozen() if cfg.needs_reference else None
        self.kl_in_reward = cfg.policy.kl_coef > 0 and cfg.policy.kl_mode == "reward" and self.ref is not None
        if self.estimator.needs_critic:
            from pear_mega.rl.critic import build_critic

            critic = build_critic(self.arch, self.ctx, cfg.critic.hf_path or cfg.model.hf_path, dtype=self.dtype,
                                  use_te=cfg.model.use_te, load_weights=cfg.model.load_weights)
            self.critic = [self._make_trainable(critic)]
            self.critic_optimizer, self.critic_scheduler = build_optimizer(
                self.critic, cfg.critic.optim, total_updates, self.dtype)

        self.data_state: dict = {}
        resumed_from = None
        if cfg.checkpoint.dir and cfg.checkpoint.resume:
            resumed_from = latest_checkpoint(cfg.checkpoint.dir)
            if resumed_from is not None:
                keep = cfg.checkpoint.keep_schedule
                if self.estimator.needs_critic:
                    load_checkpoint(Path(cfg.checkpoint.dir) / "critic" / resumed_from.name, self.critic,
                                    self.critic_optimizer, self.critic_scheduler, self.ctx, keep_schedule=keep)
                # the policy's last: its RNG states are the ones restored
                self.step, self.data_state = load_checkpoint(resumed_from, self.policy, self.optimizer,
                                                             self.scheduler, self.ctx, keep_schedule=keep)
                resumed_rng = rng_state()

        self.source = None
        ro = cfg.rollout
        self.rollout = EngineGroup(self.ctx, EnginePlacement.from_settings(
            self.ctx.world_size, ro.engine.tensor_parallel_size, ro.num_engines), timeout_s=cfg.parallel.timeout_s,
            engine_threads=ro.engine_threads)
        self.weight_sync = WeightSync(self.rollout, self.arch, self.ctx, cfg.refit,
                                      next(unwrap_model(self.policy[0]).parameters()).dtype,
                                      timeout_s=cfg.parallel.timeout_s, log=self._print)
        self._offload_optimizers()  # before vLLM measures the free memory
        probes = self.rollout.on_hosts(self._start_engine)
        if ro.engine.num_threads and self.rollout.hosts_engine:
            # on_hosts puts back the threads it found after the engine's start: set them again here
            torch.set_num_threads(ro.engine.num_threads)
        self.probe_seqs = [RolloutSequence(-1, p, r, [0.0] * len(r), 0.0, 0.0) for p, r in zip(*probes)]
        self.snapshot = None
        self.weights_discarded = False
        if cfg.logging.update_sparsity or (cfg.logging.update_sparsity is None and not use_gpu()):
            self.snapshot = self._param_snapshot(ps.get_model_parallel_group(), resumed=resumed_from is not None)
        if resumed_from is not None:
            self._print(f"resumed from {resumed_from} at step {self.step}")
            self.sync_weights()
            if cfg.refit.verify_interval:
                self.verify_refit()
            # the engine's start (it reseeds torch) and the refit consumed RNG: restore what the checkpoint held
            set_rng_state(resumed_rng)
        self.metrics = MetricsWriter(self.ctx.rank, cfg.train.steps, cfg.logging.tensorboard_dir,
                                     cfg.logging.progress_bar, initial_step=self.step, desc=cfg.name)
        self._print(self._passes_note())

    def _passes_note(self) -> str:
        """One line saying which forward-only passes each step runs (``recompute``)."""
        cfg = self.cfg
        if cfg.recomputes_old_logprobs:
            why = ("algorithm.logprob_recompute=always" if cfg.algorithm.logprob_recompute == "always" else
                   "several updates per batch" if cfg.algorithm.updates_per_step > 1 else "KL in the rewards")
            old = f"log π_old: a forward-only pass of the policy every step ({why})"
        else:
            old = "log π_old: from the update's forward pass (one update per batch; no recompute pass)"
        if self.ref is None:
            ref = "no reference model"
        elif cfg.policy.kl_coef > 0:
            ref = "reference pass every step (kl_coef > 0)"
        else:
            ref = f"reference pass for the logged KL every {cfg.logging.kl_to_init_interval} step(s)"
        return f"{old}; {ref}"

    # ------------------------------------------------------------------ construction
    def _memory_plan(self) -> float:
        """GPU: the RL memory plan of this run on this device (``pear_mega.plan.check_rl_plan``:
        ValueError with the numbers when it does not fit) and the engine's memory share from it.
        CPU: the configured share (unused there)."""
        if not use_gpu():
            return self.cfg.rollout.engine.gpu_memory_utilization
        from pear_mega.plan import Shape, check_rl_plan

        total = torch.cuda.get_device_properties(self.ctx.device).total_memory
        plan = check_rl_plan(self.cfg, Shape.from_hf(self.arch.hf_config), self.ctx.world_size, total)
        return plan["utilization"]

    def _optimizers(self) -> list:
        return [self.optimizer] + ([self.critic_optimizer] if self.estimator.needs_critic else [])

    def _offload_optimizers(self) -> None:
        """``rollout.offload_optimizer`` (GPU, bf16 params with fp32 main params): the optimizer state
        to host memory while the engine is awake. Not checked on GPU."""
        if self.cfg.rollout.offload_optimizer and use_gpu():
            for optimizer in self._optimizers():
                optimizer.offload_to_cpu()

    def _build_frozen(self):
        model = self._build_model(self.cfg.model.hf_path)
        for p in model.parameters():
            p.requires_grad_(False)
        return model.eval()

    @property
    def staging(self):
        """The weight sync's host staging (None: the collective path)."""
        return self.weight_sync.staging

    @property
    def engine(self):
        """This rank's rollout engine worker (None on ranks that host none)."""
        return self.rollout.engine

    def _start_engine(self):
        """Engine ranks: the vLLM engine on the initial weights, the prompt source and the probes."""
        from pear_mega.rl.experience import PromptSource
        from pear_mega.engine import RolloutEngine

        cfg = self.cfg
        config = cfg.engine_config(self.engine_utilization)
        self.rollout.start(lambda launch_env: RolloutEngine(config, launch_env=launch_env))
        self.source = PromptSource(cfg.task, self.engine.tokenizer, self.arch.vocab_size)
        if self.data_state:
            self.source.load_state_dict(self.data_state["prompts"])
        self.data_state = {"prompts": self.source.state_dict()}
        return self.source.probes(cfg.refit.num_probes, self.engine.encode)

    def _param_snapshot(self, group, resumed: bool):
        """θ₀ = the initial weights (the reference model when there is one), θ_prev = now."""
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

        from pear_mega.models import unwrap_model
        from pear_mega.rl.metrics import ParamSnapshot

        def counted(name, p):
            return param_is_not_tensor_parallel_duplicate(p)

        policy = unwrap_model(self.policy[0])
        if not resumed:
            return ParamSnapshot(policy.named_parameters(), self.cfg.logging.sparsity_tol, group, counted)
        initial = self.ref if self.ref is not None else self._build_frozen()
        snap = ParamSnapshot(initial.named_parameters(), self.cfg.logging.sparsity_tol, group, counted)
        snap.update(policy.named_parameters())  # θ_prev := the resumed weights
        return snap

    # ------------------------------------------------------------------ rollout phases
    def generate(self) -> tuple[list[RolloutSequence], dict[str, float]]:
        """The engine ranks sample and score a batch; every rank receives rank 0's with the prompt
        cursor."""
        def work():
            start = time.perf_counter()
            seqs, metrics, example = collect_rollouts(self.rollout, self.source, self.cfg, self.step)
            self.engine.sleep()  # GPU: free the engine's memory for training (no-op on CPU)
            every = self.cfg.logging.sample_interval
            if every and (self.step + 1) % every == 0 and self.is_rank0:
                print(f"step {self.step + 1} sample: {example!r}", flush=True)
            # vLLM sampling alone (scoring is timed apart as timing/reward)
            metrics["timing/generation"] = time.perf_counter() - start - metrics["timing/reward"]
            return seqs, metrics, {"prompts": self.source.state_dict()}

        if self.weights_discarded:  # sleep level 2 and no update since the last rollout: refit first
            self.sync_weights()
        seqs, metrics, self.data_state = self.rollout.on_hosts(work)
        # every rank knows: on GPU the engines sleep after each rollout (unless sleep mode is off);
        # level 2 drops their weights
        engine = self.cfg.rollout.engine
        self.weights_discarded = use_gpu() and engine.enable_sleep_mode is not False and engine.sleep_level == 2
        return seqs, metrics

    # ------------------------------------------------------------------ forward passes
    def _forward_step(self, loss_func, data_iterator, model):
        """megatron forward_step_func: one pack → (output, loss_func bound to the pack)."""
        pack = next(data_iterator)
        return forward_pack(model, pack, self.ctx.device), partial(loss_func, pack)

    def _run_schedule(self, chunks, packs, loss_func, forward_only: bool) -> list:
        """One megatron schedule call over ``packs`` (one microbatch each), cut to their content."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        packs, seq_length = trim_packs(packs)
        return get_forward_backward_func()(
            forward_step_func=partial(self._forward_step, loss_func), data_iterator=iter(packs), model=chunks,
            num_microbatches=len(packs), seq_length=seq_length, micro_batch_size=1, forward_only=forward_only,
        )

    @torch.no_grad()
    def _forward_only(self, chunks, packs, loss_func) -> list[dict]:
        return self._run_schedule(chunks, packs, loss_func, forward_only=True)

    def _detached_logprobs(self, logits: torch.Tensor, pack: dict, temperature: float):
        """Fused-kernel log π(labels) and entropy ``[S]`` at ``temperature`` (detached, fp32)."""
        from pear_mega.kernels import fused_pear_loss

        z = logits[0].detach().float() / temperature
        device = z.device
        labels = pack["labels"].to(device)
        with torch.no_grad():
            # inputs checked once per step on the host (_check_packs): on the device every
            # microbatch's check would be a host sync
            out = fused_pear_loss(z, labels, torch.zeros_like(labels, dtype=torch.float32),
                                  pack["cu_seqlens"].to(device), _LOGPROBS_ONLY, tp_group=self.tp_group,
                                  vocab_start=self.ctx.tp_rank * z.shape[-1], normalizer=1.0,
                                  vocab_size=self.arch.vocab_size, check_inputs=False)
        return out

    def _check_packs(self, packs: list[dict]) -> None:
        """The fused kernel's input checks (labels in the vocabulary or -100, cu_seqlens), once per
        step on the host copies of this rank's packs."""
        from pear_mega.kernels.pear_loss import _check_values

        for pack in packs:
            labels = pack["labels"].cpu()
            _check_values(labels, torch.zeros(labels.shape), pack["cu_seqlens"].cpu(), self.arch.vocab_size)

    def _logprob_loss(self, temperature: float, pack: dict, logits: torch.Tensor):
        out = self._detached_logprobs(logits, pack, temperature)
        n = (pack["labels"] != IGNORE_INDEX).sum()
        return out.loss, n.int(), {"logp": out.logprobs, "entropy": out.entropy}

    @staticmethod
    def _value_output(pack: dict, values: torch.Tensor):
        return values.sum() * 0, torch.tensor(0, dtype=torch.int), {"values": values[0, :, 0].float()}

    # ------------------------------------------------------------------ phases on the trainer
    def recompute(self, seqs: list[RolloutSequence]) -> tuple[Experience, dict[str, float]]:
        """Forward-only passes over this rank's sequences, each only where this step needs it:
        log π_old and entropy (policy, ``RLConfig.recomputes_old_logprobs``; else the update's
        forward fills them), log π_ref (``RLConfig.runs_reference_pass``), V (critic, PPO)."""
        packs = plan_microbatches(seqs, self.ctx.dp_rank, self.ctx.dp_size, self.cfg.train.seq_length, self.pad_id)[0]
        self._check_packs(packs)
        exp = Experience(ids=shard_of(len(seqs), self.ctx.dp_rank, self.ctx.dp_size))
        temperature = self.cfg.rollout.temperature
        last = self.ctx.is_last_stage
        recomputed = self.cfg.recomputes_old_logprobs
        if recomputed:
            outputs = self._forward_only(self.policy, packs, partial(self._logprob_loss, temperature))
            for pack, out in zip(packs, outputs if last else []):
                exp.logp_old.update(gather_from_pack(pack, out["logp"]))
                exp.entropy.update(gather_from_pack(pack, out["entropy"]))
        if self.ref is not None and self.cfg.runs_reference_pass(self.step):
            outputs = self._forward_only([self.ref], packs, partial(self._logprob_loss, temperature))
            for pack, out in zip(packs, outputs if last else []):
                exp.logp_ref.update(gather_from_pack(pack, out["logp"]))
        if self.estimator.needs_critic:
            outputs = self._forward_only(self.critic, packs, self._value_output)
            for pack, out in zip(packs, outputs if last else []):
                exp.values.update(gather_from_pack(pack, out["values"]))
        return exp, {"train/logprob_recomputed": float(recomputed)}

    def _rollout_metrics(self, exp: Experience, have_old: bool) -> dict[str, float]:
        """``rollout/entropy`` of π_old and, on the steps that ran the reference pass,
        ``drift/kl_to_init_k3``, over this step's response tokens (after the update: π_old may come
        from its forward pass). ``have_old``: π_old was computed (the same on every rank)."""
        from pear_mega.rl.metrics import kl_to_initial_policy

        metrics: dict[str, float] = {}
        if not (self.ctx.is_last_stage and have_old):
            return metrics

        def cat(per_seq: dict) -> torch.Tensor:  # this rank's response tokens, on the collective device
            flat = torch.cat([per_seq[i] for i in exp.ids]) if exp.ids else torch.zeros(0)
            return flat.to(self.ctx.device)

        ones = torch.ones_like(cat(exp.logp_old))
        stats = torch.stack([(cat(exp.entropy) * ones).sum(), ones.sum()]).double()
        if self.ctx.dp_size > 1:
            dist.all_reduce(stats, group=self.ctx.dp_group)
        metrics["rollout/entropy"] = float(stats[0] / stats[1].clamp(min=1))
        if self.ref is not None and self.cfg.logging.kl_to_init and self.cfg.runs_reference_pass(self.step):
            kl = kl_to_initial_policy(cat(exp.logp_old), cat(exp.logp_ref), ones,
                                      group=self.ctx.dp_group if self.ctx.dp_size > 1 else None)
            metrics.update({k: float(v) for k, v in kl.items()})
        return metrics

    def advantages(self, seqs: list[RolloutSequence], exp: Experience) -> dict[str, float]:
        """The estimator's advantages (``pear_mega.rl.estimators``): GRPO group-relative per
        sequence, PPO GAE (whitened); into ``exp``, on the last stage."""
        rewards = torch.tensor([s.reward for s in seqs], dtype=torch.float32)
        return self.estimator.advantages(self, seqs, exp, rewards)

    def _share_from_last_stage(self, t: torch.Tensor, dp_sum: bool = False) -> torch.Tensor:
        """Sum ``t`` over DP on the last stage, then broadcast it to every pipeline stage."""
        return share_from_last_stage(self.ctx, t.to(self.ctx.device), dist.ReduceOp.SUM if dp_sum else None).cpu()

    def _attach(self, packs: list[dict], seqs: list[RolloutSequence], exp: Experience) -> None:
        """Per-token tensors of the loss, on the last stage (response-aligned → pack positions)."""
        if not self.ctx.is_last_stage:
            return
        for pack in packs:
            ids = pack["seq_ids"]
            weight = {i: torch.full((len(seqs[i].response_ids),), float(seqs[i].loss_weight > 0)) for i in ids}
            pack["loss_mask"] = scatter_to_pack(pack, weight)
            pack["logp_rollout"] = scatter_to_pack(pack, {i: torch.tensor(seqs[i].rollout_logprobs) for i in ids})
            if self.cfg.recomputes_old_logprobs:  # else _policy_loss takes π_old from its own forward
                pack["logp_old"] = scatter_to_pack(pack, exp.logp_old)
            pack["advantages"] = scatter_to_pack(pack, exp.advantages)
            if self.ref is not None and self.cfg.runs_reference_pass(self.step):
                pack["logp_ref"] = scatter_to_pack(pack, exp.logp_ref)
            if self.estimator.needs_critic:
                pack["values_old"] = scatter_to_pack(pack, exp.values)
                pack["returns"] = scatter_to_pack(pack, exp.returns)

    def update(self, seqs: list[RolloutSequence], exp: Experience) -> dict[str, float]:
        """``ppo_epochs x minibatches`` optimizer steps of the policy (and the critic for PPO); with
        ``rollout.offload_optimizer`` the optimizer state is on the device only in between."""
        if self.cfg.rollout.offload_optimizer and use_gpu():
            for optimizer in self._optimizers():
                optimizer.restore_from_cpu()
        try:
            return self._update(seqs, exp)
        finally:
            self._offload_optimizers()

    def _update(self, seqs: list[RolloutSequence], exp: Experience) -> dict[str, float]:
        algo = self.cfg.algorithm
        collected: list[dict[str, float]] = []
        for epoch in range(algo.ppo_epochs):
            shuffle = (self.cfg.parallel.seed, self.step, epoch) if algo.updates_per_step > 1 else None
            plan, totals = plan_microbatches(seqs, self.ctx.dp_rank, self.ctx.dp_size, self.cfg.train.seq_length,
                                             self.pad_id, algo.minibatches, shuffle, with_totals=True)
            for packs, total in zip(plan, totals):
                if total == 0:  # every sequence of the minibatch is masked out: nothing to learn
                    continue
                self._attach(packs, seqs, exp)
                metrics, outputs = self._optimizer_step(self.policy, self.optimizer, self.scheduler, packs,
                                                        self._policy_loss)
                for pack, out in zip(packs, outputs if "old" in (outputs or [{}])[0] else []):
                    # one update per batch: π_old from this forward, before the optimizer step
                    exp.logp_old.update(gather_from_pack(pack, out["old"]["logp"]))
                    exp.entropy.update(gather_from_pack(pack, out["old"]["entropy"]))
                if self.estimator.needs_critic:
                    critic, _ = self._optimizer_step(self.critic, self.critic_optimizer, self.critic_scheduler, packs,
                                                     self._value_loss)
                    metrics.update({_CRITIC_RENAME.get(k, k): v for k, v in critic.items() if k != "train/loss_tokens"})
                collected.append(metrics)
        if not collected:
            return {"train/step_applied": 0.0, "train/updates": 0.0}
        out = _combine_updates(collected)
        if "train/pg_clip_frac" in out:
            out["train/clip_frac"] = out["train/pg_clip_frac"]
        return out

    def _optimizer_step(self, chunks, optimizer, scheduler, packs, loss_func) -> tuple[dict[str, float], list]:
        """One optimizer step over ``packs``: (metrics, the loss function's per-pack outputs on the
        last stage)."""
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        reduced = self._run_schedule(chunks, packs, loss_func, forward_only=False)
        metrics, finite = self._reduce_metrics(reduced)
        applied, grad_norm = guarded_step(optimizer, self.cfg.optim.clip_grad, finite)
        if applied:
            scheduler.step(increment=1)
        if chunks is self.policy:
            self.bad_streak = 0 if applied else self.bad_streak + 1
        metrics.update({"train/grad_norm": grad_norm, "train/step_applied": float(applied),
                        "train/lr": optimizer.param_groups[0]["lr"]})
        return metrics, reduced

    def _reduce_metrics(self, reduced: list[dict]) -> tuple[dict[str, float], bool]:
        """Token-weighted means (max for ``_MAX_KEYS``) over microbatches and DP, on the last stage;
        the loss finiteness is shared with every stage."""
        metrics: dict[str, float] = {}
        flag = torch.ones(1, dtype=torch.float64, device=self.ctx.device)
        if self.ctx.is_last_stage:
            keys = sorted(reduced[0]["sum"])
            max_keys = sorted(reduced[0]["max"])
            sums = torch.stack([torch.stack([r["sum"][k].double() for k in keys] + [r["n"].double()])
                                for r in reduced]).sum(0)
            maxes = torch.stack([torch.stack([r["max"][k].double() for k in max_keys]) for r in reduced]).amax(0) \
                if max_keys else torch.zeros(0, dtype=torch.float64, device=sums.device)
            if self.ctx.dp_size > 1:
                dist.all_reduce(sums, group=self.ctx.dp_group)
                dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=self.ctx.dp_group)
            n = sums[-1].clamp(min=1)
            metrics = {k: float(v / n) for k, v in zip(keys, sums[:-1])}
            metrics.update({k: float(v) for k, v in zip(max_keys, maxes)})
            metrics["train/loss_tokens"] = float(sums[-1])
            flag[0] = float(bool(torch.isfinite(sums).all()))
        if self.ctx.pp_size > 1:
            src = dist.get_process_group_ranks(self.ctx.pp_group)[-1]
            dist.broadcast(flag, src=src, group=self.ctx.pp_group)
        return metrics, bool(flag.item() > 0)

    def _policy_loss(self, pack: dict, logits: torch.Tensor):
        """logits [1, S, V/tp] → (Σ mask·ℓ, loss-token count, stats) — megatron's per-token contract."""
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        from pear_mega.rl.algorithms import LossContext, loss_aggregation, policy_loss

        policy = self.cfg.policy
        temperature = self.cfg.rollout.temperature
        device = logits.device
        labels = pack["labels"].to(device)
        on_label = labels != IGNORE_INDEX
        mask = pack["loss_mask"].to(device)
        v_local = logits.shape[-1]
        n_valid = max(0, min(v_local, self.arch.vocab_size - self.ctx.tp_rank * v_local))
        z = logits[0].float() / temperature  # a fresh tensor: the cross entropy below works in place
        if n_valid < v_local:
            z = z.masked_fill(torch.arange(v_local, device=device) >= n_valid, float("-inf"))
        logp = -vocab_parallel_cross_entropy(z.unsqueeze(1), labels.clamp(min=0).unsqueeze(1))[:, 0]
        logp = torch.where(on_label, logp, torch.zeros_like(logp))
        entropy = None  # monitoring uses π_old's detached entropy (rollout/entropy)
        if policy.entropy_coef > 0:
            entropy = vocab_parallel_entropy((logits[0].float() / temperature)[:, :n_valid], self.tp_group)

        def get(key: str):
            return pack[key].to(device) if key in pack else None

        # the aggregation's token weights and count (megatron divides by the global Σ count)
        context = LossContext(cu_seqlens=pack["cu_seqlens"].to(device), max_response_len=self.cfg.rollout.max_tokens)
        weights, count = loss_aggregation(policy, mask, context)
        old = None
        logp_old = get("logp_old")
        if logp_old is None:
            # No recompute pass (RLConfig.recomputes_old_logprobs): π_old is this forward's policy. The
            # fused kernel on these logits, detached, gives what the pass would have: same logits, same kernel.
            old = self._detached_logprobs(logits, pack, temperature)
            logp_old = torch.where(on_label, old.logprobs, torch.zeros_like(old.logprobs))
        loss, m = policy_loss(policy, logp, logp_old, get("advantages"), mask, normalizer=1.0,
                              logp_rollout=get("logp_rollout"), logp_ref=get("logp_ref"), entropy=entropy,
                              token_weights=weights, context=context)
        n = mask.sum()
        sums = {k: (v if k in _SUM_KEYS else v * n) for k, v in m.items() if k not in _MAX_KEYS}
        sums["train/loss"] = loss.detach()
        maxes = {k: v for k, v in m.items() if k in _MAX_KEYS}
        out = {"sum": sums, "max": maxes, "n": n}
        if old is not None:
            out["old"] = {"logp": logp_old, "entropy": old.entropy}
        return loss, count.int(), out

    def _value_loss(self, pack: dict, values: torch.Tensor):
        from pear_mega.rl.algorithms import value_loss

        ppo = self.cfg.algorithm.ppo
        device = values.device
        mask = pack["loss_mask"].to(device)
        loss, m = value_loss(values[0, :, 0].float(), pack["values_old"].to(device), pack["returns"].to(device), mask,
                             clip_eps=ppo.value_clip, normalizer=1.0)
        n = mask.sum()
        sums = {k: v * n for k, v in m.items()}
        sums["train/value_loss"] = loss.detach()
        return ppo.vf_coef * loss, n.int(), {"sum": sums, "max": {}, "n": n}

    # ------------------------------------------------------------------ weight sync
    def sync_weights(self) -> dict[str, float]:
        """Push the policy into the engines (``pear_mega.weight_sync``)."""
        self.weights_discarded = False
        return self.weight_sync.push(self.policy[0])

    def probe_logprobs(self) -> list[torch.Tensor] | None:
        """Trainer log π(probe response | probe prompt) at temperature 1 (on the engine ranks and
        the metrics source)."""
        packs = pack_sequences(self.probe_seqs, list(range(len(self.probe_seqs))), self.cfg.train.seq_length,
                               self.pad_id)
        outputs = self._forward_only(self.policy, packs, partial(self._logprob_loss, 1.0))
        result = None
        if self.ctx.is_last_stage:
            per_seq = {}
            for pack, out in zip(packs, outputs):
                per_seq.update(gather_from_pack(pack, out["logp"]))
            result = [per_seq[i] for i in range(len(self.probe_seqs))]
        if self.metrics_src != 0 or self.rollout.placement.num_hosts > 1:
            box = [result]
            dist.broadcast_object_list(box, src=self.metrics_src)
            result = box[0]
        return result

    def verify_refit(self) -> dict[str, float]:
        """Engine vs trainer log-probs on the probes; beyond ``refit.tol`` every rank stops
        (``WeightSync.verify``)."""
        start = time.perf_counter()
        trainer_logprobs = self.probe_logprobs()
        return self.weight_sync.verify([s.prompt_ids for s in self.probe_seqs],
                                       [s.response_ids for s in self.probe_seqs], trainer_logprobs, started=start)

    # ------------------------------------------------------------------ the loop
    def train_step(self) -> dict[str, float]:
        """One RL step (module docstring); returns its metrics on rank 0 (partial elsewhere)."""
        t0 = time.perf_counter()
        seqs, metrics = self.generate()
        if seqs:
            t = time.perf_counter()
            exp, m = self.recompute(seqs)
            metrics.update(m, **{"timing/logprob_recompute": time.perf_counter() - t})
            metrics.update(self.advantages(seqs, exp))
            t = time.perf_counter()
            metrics.update(self.update(seqs, exp))
            metrics["timing/training"] = time.perf_counter() - t
            have_old = self.cfg.recomputes_old_logprobs or metrics.get("train/updates", 0) > 0
            metrics.update(self._rollout_metrics(exp, have_old))
            if metrics.get("train/updates", 0):
                metrics.update(self.sync_weights())
            interval = self.cfg.refit.verify_interval
            if interval and (self.step + 1) % interval == 0:
                metrics.update(self.verify_refit())
        else:
            metrics.update({"train/step_applied": 0.0, "train/updates": 0.0})
        if self.snapshot is not None:
            from pear_mega.models import unwrap_model

            drift = self.snapshot.update(unwrap_model(self.policy[0]).named_parameters())
            metrics.update({k: float(v) for k, v in drift.items()})
        self.step += 1
        metrics = self._gather_metrics(metrics)
        metrics["timing/step"] = time.perf_counter() - t0
        return metrics

    def _gather_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Rank 0 has the rollout/refit metrics; the last stage of DP replica 0 the training ones."""
        if self.metrics_src == 0:
            return metrics
        box = [metrics if self.ctx.rank == self.metrics_src else None]
        dist.broadcast_object_list(box, src=self.metrics_src)
        return {**box[0], **metrics} if self.is_rank0 else metrics

    def save(self) -> Path:
        """Critic first, then the policy (whose ``latest`` marks the step complete)."""
        meta = {"hf_path": self.cfg.model.hf_path, "config": to_dict(self.cfg)}
        if self.estimator.needs_critic:
            save_checkpoint(Path(self.cfg.checkpoint.dir) / "critic", self.step, self.critic, self.critic_optimizer,
                            self.critic_scheduler, self.ctx, None, meta, hf_files_from=self.cfg.model.hf_path)
        return save_checkpoint(self.cfg.checkpoint.dir, self.step, self.policy, self.optimizer, self.scheduler,
                               self.ctx, self.data_state, meta, hf_files_from=self.cfg.model.hf_path)

    def _export_model(self):
        return self.policy[0]

    def close(self) -> None:
        self.rollout.close()
        self.weight_sync.close()
        super().close()
