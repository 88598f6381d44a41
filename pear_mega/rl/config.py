"""Typed configuration of a colocated GRPO / PPO run.

One nested dataclass per concern, each validating itself in ``__post_init__``; cross-field checks
live in ``RLConfig.__post_init__``. Recipes (``pear_mega.rl.recipes``) are functions returning an
``RLConfig``; the command line overrides single fields with ``dotted.key=value`` exactly like
``pear_mega.train_sft`` (``algorithm.grpo.kl_coef=0.01``, ``rollout.n=4``, ...).

The policy-loss knobs (clip range, KL to the reference policy and its estimator k1/k2/k3, entropy
coefficient, TIS cap, dynamic sampling, over-long handling) are the fields of
``pear_mega.rl.algorithms.GRPOConfig`` / ``PPOConfig``, used as they are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import ClassVar

from pear_mega.engine import EngineConfig
from pear_mega.optim import OptimConfig
from pear_mega.parallel import ParallelConfig
from pear_mega.rl.algorithms import GRPOConfig, PolicyLossConfig, PPOConfig
from pear_mega.run_config import CheckpointConfig, ModelConfig, check_context_length

SYNTHETIC_REWARDS = ("low_ids",)

__all__ = [
    "AlgorithmConfig",
    "CheckpointConfig",
    "CriticConfig",
    "LoggingConfig",
    "ModelConfig",
    "RLConfig",
    "RefitConfig",
    "RolloutSettings",
    "TaskConfig",
    "TrainConfig",
    "rl_engine",
]


@dataclass(frozen=True)
class TaskConfig:
    """Where prompts and their verifiable rewards come from."""

    source: str = "reasoning_gym"
    """'reasoning_gym' (procedural tasks with their own verifiers), 'jsonl' (prompts with gold
    answers, scored by math-verify) or 'synthetic' (a dense token-level reward for mechanics tests)."""
    tasks: tuple[str, ...] = ("basic_arithmetic",)
    """reasoning-gym task names (source='reasoning_gym'); prompts of all tasks are mixed."""
    task_config: str = "{}"
    """reasoning-gym dataset settings as JSON, the same for every task, e.g. '{"max_digits": 1}'."""
    size: int = 256
    """Prompts per task (reasoning_gym / synthetic); the cursor cycles through them in epochs."""
    seed: int = 0
    """Seed of the task items (reasoning-gym) and of the per-epoch prompt order."""
    num_shots: int = 2
    """Few-shot demonstrations per prompt (reasoning_gym, jsonl): they fix the ``Answer:`` format."""
    prompts_file: str = ""
    """source='jsonl': rows {"prompt": str | "messages": [...], "answer": str | int}."""
    synthetic_reward: str = "low_ids"
    """source='synthetic': 'low_ids' = fraction of response tokens with id < vocab/2 (random policy: 0.5)."""
    synthetic_prompt_tokens: int = 8
    """source='synthetic': random prompt length in tokens."""

    def __post_init__(self):
        from pear_mega.tasks import task_source

        task_source(self.source)  # ValueError naming task.source when it is not registered
        if self.source == "reasoning_gym" and not self.tasks:
            raise ValueError("task.tasks: give at least one reasoning-gym task name")
        if self.source == "jsonl" and not self.prompts_file:
            raise ValueError("task.prompts_file is required when task.source='jsonl'")
        if self.synthetic_reward not in SYNTHETIC_REWARDS:
            raise ValueError(f"task.synthetic_reward must be one of {SYNTHETIC_REWARDS}, got {self.synthetic_reward!r}")
        if self.size < 1:
            raise ValueError(f"task.size must be >= 1, got {self.size}")
        if self.seed < 0:
            raise ValueError(f"task.seed must be >= 0, got {self.seed}")
        if self.num_shots < 0:
            raise ValueError(f"task.num_shots must be >= 0, got {self.num_shots}")
        if self.synthetic_prompt_tokens < 1:
            raise ValueError(f"task.synthetic_prompt_tokens must be >= 1, got {self.synthetic_prompt_tokens}")
        self.task_settings()
        if self.source == "reasoning_gym":
            from pear_mega.rewards import check_task_names

            check_task_names(self.tasks, "task.tasks", known_only=False)

    def task_settings(self) -> dict:
        """``task_config`` parsed (ValueError naming the field when it is not a JSON object)."""
        try:
            value = json.loads(self.task_config)
        except json.JSONDecodeError as e:
            raise ValueError(f"task.task_config is not valid JSON ({e.msg}): {self.task_config!r}") from None
        if not isinstance(value, dict):
            raise ValueError(f"task.task_config must be a JSON object, got {self.task_config!r}")  # noqa: TRY004 (bad config value)
        return value


def rl_engine(**settings) -> EngineConfig:
    """The engine settings of an RL run: a bare engine's (``pear_mega.engine.EngineConfig``) except
    ``dtype`` '' (= ``model.dtype``), ``gpu_memory_utilization`` 0 (= the largest share the memory
    plan leaves) and ``keep_freed_memory`` on; ``settings`` override any field."""
    return EngineConfig(**{"dtype": "", "gpu_memory_utilization": 0.0, "keep_freed_memory": True, **settings})


@dataclass(frozen=True)
class RolloutSettings:
    """Sampling and the colocated vLLM engines (on global ranks 0 .. num_engines·R−1,
    R = ``engine.tensor_parallel_size``)."""

    # Keys that moved into ``engine``: an override of the old key names the new one
    # (``pear_mega.config_tools.apply_overrides``).
    moved_keys: ClassVar[dict[str, str]] = {
        **{name: f"engine.{name}" for name in (
            "max_model_len", "dtype", "kv_cache_gib", "gpu_memory_utilization", "sleep_level", "max_num_seqs",
            "enforce_eager", "num_threads", "keep_freed_memory", "tensor_parallel_size")},
        "engine_seed": "engine.seed",
    }

    prompts_per_step: int = 8
    """G: prompts per RL step."""
    n: int = 8
    """Samples per prompt (the GRPO group size)."""
    temperature: float = 1.0
    """Sampling temperature; the trainer's log-probs use the same temperature (logits / T)."""
    top_p: float = 1.0
    """Nucleus sampling; < 1 makes π_rollout a truncated π (the mismatch metrics show it; TIS corrects it)."""
    max_tokens: int = 64
    """Response length limit; a response cut here is 'truncated' (see the over-long options)."""
    stop: tuple[str, ...] = ()
    """Stop strings (besides EOS): generation ends once the text contains one (e.g. a newline)."""
    engine: EngineConfig = field(default_factory=rl_engine)
    """Each engine's settings (``pear_mega.engine.EngineConfig``; ``rollout.engine.max_model_len``,
    ``rollout.engine.seed``, ...). The trainer fills ``model`` from ``model.hf_path``, ``dtype`` ''
    with ``model.dtype`` and, on GPU, ``gpu_memory_utilization`` 0 with the largest share the memory
    plan leaves (``pear_mega.plan.plan_rl``; a given share is checked against the plan before
    anything is built). ``seed`` also reseeds each step's sampling from (seed, step, round), so a
    resumed run draws the samples an uninterrupted one would. ``num_threads`` (CPU): torch threads
    of the trainer process after the engine starts. GPU: ``sleep_level`` 1 copies the weights to
    pinned host memory between rollouts, 2 discards them (every wake follows a full refit)."""
    offload_optimizer: bool = False
    """GPU, bf16: keep the optimizer state (fp32 main params, Adam moments) in host memory while the
    engine is awake (megatron's ``offload_to_cpu`` / ``restore_from_cpu`` around each update)."""
    engine_threads: int = 0
    """CPU: torch threads of an engine rank during engine work (generation, refit, verification),
    while the host's other trainer ranks wait for it; 0 = the host's cores shared by the host's
    engine ranks (never fewer than the trainer's threads)."""
    num_engines: int = 1
    """E: engines on global ranks 0 .. E·R−1, each sampling its share of the prompts; 0 = as
    many as the trainer's ranks hold (world_size // R)."""

    def __post_init__(self):
        for name in ("prompts_per_step", "n", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"rollout.{name} must be >= 1, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise ValueError(f"rollout.temperature must be > 0 (log-probs are taken at it), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        if self.engine.model:
            raise ValueError(f"rollout.engine.model must be '' (the trainer sets it to model.hf_path), "
                             f"got {self.engine.model!r}")
        if self.engine.max_model_len <= self.max_tokens:
            raise ValueError(f"rollout.engine.max_model_len ({self.engine.max_model_len}) must exceed "
                             f"rollout.max_tokens ({self.max_tokens})")
        if self.engine.dtype == "auto":
            # the refit verification compares against the trainer's numbers: a dtype the run names
            raise ValueError("rollout.engine.dtype must be '' (= model.dtype), float32, bfloat16 or float16, "
                             f"got {self.engine.dtype!r}")
        if self.num_engines < 0:
            raise ValueError(f"rollout.num_engines must be >= 0 (0 = world_size // rollout.engine.tensor_parallel_size), "
                             f"got {self.num_engines}")
        if self.engine_threads < 0:
            raise ValueError(f"rollout.engine_threads must be >= 0, got {self.engine_threads}")


@dataclass(frozen=True)
class AlgorithmConfig:
    """GRPO or PPO, and how one rollout batch is turned into optimizer steps."""

    name: str = "grpo"
    """A name in ``pear_mega.rl.estimators.ESTIMATORS``: 'grpo' (group-relative advantages, no
    critic) or 'ppo' (critic + GAE)."""
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    """GRPO loss options; ``group_size`` is always ``rollout.n`` (set by RLConfig)."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """PPO loss and GAE options."""
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    minibatches: int = 1
    """Optimizer steps per pass (the batch's sequences split evenly); epochs x minibatches > 1 is off-policy."""
    whiten_advantages: bool = True
    """PPO: normalize GAE advantages to zero mean / unit std over the global batch."""
    dynamic_sampling_max_rounds: int = 4
    """With dynamic sampling: generation rounds per step to fill the batch with informative groups."""
    logprob_recompute: str = "auto"
    """How log π_old (and the rollout/entropy metric) are obtained. 'always': a forward-only pass of
    the policy over the batch before the update. 'auto': that pass only where π_old must be known
    before the first optimizer step — several updates per batch (ppo_epochs x minibatches > 1) or
    the KL folded into the rewards (kl_coef > 0, kl_mode='reward'); otherwise π_old is the current
    policy, and its log-probs and entropy are taken, detached, from the update's own forward pass
    (the same numbers, one forward pass fewer; ``RLConfig.recomputes_old_logprobs``)."""

    def __post_init__(self):
        from pear_mega.rl.estimators import check_estimator

        check_estimator(self.name, self)
        if self.ppo_epochs < 1 or self.minibatches < 1:
            raise ValueError("algorithm.ppo_epochs and algorithm.minibatches must be >= 1")
        if self.logprob_recompute not in ("auto", "always"):
            raise ValueError(f"algorithm.logprob_recompute must be 'auto' or 'always', got {self.logprob_recompute!r}")
        if self.dynamic_sampling_max_rounds < 1:
            raise ValueError(f"algorithm.dynamic_sampling_max_rounds must be >= 1, got {self.dynamic_sampling_max_rounds}")

    @property
    def estimator(self):
        """The ``pear_mega.rl.estimators.Estimator`` of ``name``."""
        from pear_mega.rl.estimators import ESTIMATORS

        return ESTIMATORS[self.name]

    @property
    def policy(self) -> PolicyLossConfig:
        """The estimator's policy-loss settings (``algorithm.<its settings field>``)."""
        return getattr(self, self.estimator.settings)

    @property
    def updates_per_step(self) -> int:
        return self.ppo_epochs * self.minibatches


@dataclass(frozen=True)
class CriticConfig:
    """The PPO value model: the policy's architecture with a scalar value head (untied)."""

    hf_path: str = ""
    """Initial trunk weights; '' = model.hf_path."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5))


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    """RL steps (each: rollout batch, epochs x minibatches optimizer steps, weight sync)."""
    seq_length: int = 1024
    """Tokens per training pack; every prompt + response must fit."""
    max_bad_steps: int = 3
    """Consecutive optimizer steps with a non-finite loss or grad norm (skipped) before the run stops."""
    log_interval: int = 1

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"train.steps must be >= 1, got {self.steps}")
        if self.seq_length < 8:
            raise ValueError(f"train.seq_length must be >= 8, got {self.seq_length}")
        if self.max_bad_steps < 1 or self.log_interval < 1:
            raise ValueError("train.max_bad_steps and train.log_interval must be >= 1")


@dataclass(frozen=True)
class RefitConfig:
    """Weight sync trainer → engine and its verification on fixed probe sequences."""

    bucket_mb: int = 256
    """Whole layers gathered ahead of the engine, in MiB (the refit streams through one reload call)."""
    verify_interval: int = 1
    """Compare engine and trainer log-probs on the probes every N steps (0 = never)."""
    tol: float = 1e-3
    """Mean and 99th-percentile |Δ log-prob| (nats) over the probe tokens allowed; beyond it the run
    stops. fp32: 1e-3; bf16 needs ~0.5."""
    max_tol: float = 0.0
    """Max |Δ log-prob| of any one probe token allowed (looser: one rare bf16 token may differ far
    more than the rest); 0 = 10 x tol."""
    num_probes: int = 2
    """Probe sequences: the first N task prompts with their gold answer as the response."""
    transport: str = "auto"
    """How the full tensors reach the engine ranks. 'shared_memory' (CPU, all ranks involved on one
    host): every rank writes its shards into place in full tensors mapped from /dev/shm, the
    engine reads them there, no gather (``pear_mega.models.staging``; the model once in /dev/shm).
    'collective': gathered over the process groups and merged on the stage's first rank.
    'auto': shared_memory where it can be used, else collective."""

    def __post_init__(self):
        if self.transport not in ("auto", "shared_memory", "collective"):
            raise ValueError(f"refit.transport must be auto, shared_memory or collective, got {self.transport!r}")
        if self.bucket_mb < 1:
            raise ValueError(f"refit.bucket_mb must be >= 1, got {self.bucket_mb}")
        if self.verify_interval < 0:
            raise ValueError(f"refit.verify_interval must be >= 0, got {self.verify_interval}")
        if not self.tol > 0:
            raise ValueError(f"refit.tol must be > 0, got {self.tol}")
        if not (self.max_tol == 0 or self.max_tol >= self.tol):
            raise ValueError(f"refit.max_tol must be 0 (= 10 x refit.tol) or >= refit.tol ({self.tol}), got {self.max_tol}")
        if self.num_probes < 1:
            raise ValueError(f"refit.num_probes must be >= 1, got {self.num_probes}")


@dataclass(frozen=True)
class LoggingConfig:
    tensorboard_dir: str = ""
    """TensorBoard event directory ('' = none)."""
    progress_bar: bool = True
    update_sparsity: bool | None = None
    """Track per-step / cumulative update sparsity and drift (two fp32 copies of the parameters,
    +8 bytes per parameter on the device); None = on CPU only."""
    sparsity_tol: float = 0.0
    """A parameter counts as changed when |Δ| > this."""
    kl_to_init: bool = True
    """Log KL(π ‖ π_init) (needs the reference model even when the KL coefficient is 0)."""
    kl_to_init_interval: int = 10
    """With kl_coef = 0 the KL to π_init is only logged, and costs a forward pass of the reference
    model (about a fifth of a CPU step, docs/benchmarks.md): it runs on steps N, 2N, ... and the
    last one only (1 = every step, as the studies' drift curves use). With kl_coef > 0 the
    reference pass runs, and the KL is logged, every step."""
    sample_interval: int = 0
    """Print one sampled response every N steps (0 = never)."""

    def __post_init__(self):
        if self.sparsity_tol < 0:
            raise ValueError(f"logging.sparsity_tol must be >= 0, got {self.sparsity_tol}")
        if self.kl_to_init_interval < 1:
            raise ValueError(f"logging.kl_to_init_interval must be >= 1, got {self.kl_to_init_interval}")
        if self.sample_interval < 0:
            raise ValueError(f"logging.sample_interval must be >= 0, got {self.sample_interval}")


@dataclass(frozen=True)
class RLConfig:
    name: str = "rl"
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutSettings = field(default_factory=RolloutSettings)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    refit: RefitConfig = field(default_factory=RefitConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        if not self.model.hf_path:
            raise ValueError("model.hf_path is required (an HF checkpoint directory)")
        if self.train.seq_length < self.rollout.max_tokens + 1:
            raise ValueError(f"train.seq_length ({self.train.seq_length}) must exceed rollout.max_tokens "
                             f"({self.rollout.max_tokens})")
        if self.algorithm.estimator.group_relative and self.rollout.n < 2:
            raise ValueError(f"rollout.n must be >= 2 for {self.algorithm.name}'s group-relative advantages, "
                             f"got {self.rollout.n}")
        # GRPO's group is the n samples of one prompt: one number, kept in rollout.n.
        if self.algorithm.grpo.group_size != self.rollout.n and self.rollout.n >= 2:
            object.__setattr__(self, "algorithm", replace(
                self.algorithm, grpo=replace(self.algorithm.grpo, group_size=self.rollout.n)))
        if self.rollout.offload_optimizer and self.model.dtype != "bfloat16":
            # megatron's fp32 optimizer steps the model's own parameters: offloading would move the model
            raise ValueError("rollout.offload_optimizer needs model.dtype=bfloat16 (fp32 main params apart from "
                             f"the model's), got model.dtype={self.model.dtype!r}")
        policy = self.algorithm.policy
        if policy.overlong_mode == "soft_penalty" and policy.overlong_buffer > self.rollout.max_tokens:
            raise ValueError(f"algorithm.{self.algorithm.name}.overlong_buffer ({policy.overlong_buffer}) must be "
                             f"<= rollout.max_tokens ({self.rollout.max_tokens})")

    def validate_run(self) -> None:
        """Checks of the final config (after every override; the CLI and the trainer run them
        before anything is built): warmup within the run, sequence lengths within the model's
        context (config.json), reasoning-gym task names known to reasoning-gym, math gold answers
        of a prompts file parseable. Raises ValueError naming the key."""
        from pear_mega.rewards import check_prompt_answers, check_task_names

        updates = "train.steps x algorithm.ppo_epochs x algorithm.minibatches"
        self.optim.check_steps(self.train.steps * self.algorithm.updates_per_step, updates)
        if self.algorithm.estimator.needs_critic:
            try:
                self.critic.optim.check_steps(self.train.steps * self.algorithm.updates_per_step, updates)
            except ValueError as exc:
                raise ValueError(str(exc).replace("optim.", "critic.optim.", 1)) from None
        check_context_length(self.model.hf_path, self.train.seq_length, "train.seq_length")
        check_context_length(self.model.hf_path, self.rollout.engine.max_model_len, "rollout.engine.max_model_len")
        if self.task.source == "reasoning_gym":
            check_task_names(self.task.tasks, "task.tasks", known_only=True)
        elif self.task.source == "jsonl":
            check_prompt_answers(self.task.prompts_file, "task.prompts_file")

    def engine_config(self, gpu_memory_utilization: float) -> EngineConfig:
        """The engine each engine rank builds: ``rollout.engine`` with ``model`` = ``model.hf_path``,
        ``dtype`` '' = ``model.dtype`` and ``gpu_memory_utilization`` = the given share (GPU: the
        memory plan's, which is the configured share when one is given; unused on CPU)."""
        engine = self.rollout.engine
        return replace(engine, model=self.model.hf_path, dtype=engine.dtype or self.model.dtype,
                       gpu_memory_utilization=gpu_memory_utilization)

    @property
    def policy(self) -> PolicyLossConfig:
        return self.algorithm.policy

    @property
    def needs_reference(self) -> bool:
        """A frozen copy of the initial policy is built for the KL term or the KL-to-init metric."""
        return self.policy.kl_coef > 0 or self.logging.kl_to_init

    @property
    def recomputes_old_logprobs(self) -> bool:
        """Whether each step runs a forward-only pass of the policy for log π_old before the update
        (``algorithm.logprob_recompute``). 'auto' skips it only where π_old is the policy of the
        update's forward pass and nothing reads it earlier: one optimizer step per rollout batch
        (later epochs or minibatches would see updated weights) and no KL in the rewards (the
        advantages would need it). TIS, the mismatch metrics and the KL loss term read log π_old
        inside the loss, dynamic sampling reads only rewards, PPO's values come from the critic's
        own pass."""
        algo, policy = self.algorithm, self.policy
        return (algo.logprob_recompute == "always" or algo.updates_per_step > 1
                or (policy.kl_coef > 0 and policy.kl_mode == "reward"))

    def runs_reference_pass(self, step: int) -> bool:
        """Whether 0-based step ``step`` runs the reference model's forward pass: every step when the
        KL is in the objective (kl_coef > 0); when it is only logged, the 1-based steps N, 2N, ...
        of ``logging.kl_to_init_interval`` and the run's last step (its final KL)."""
        if self.policy.kl_coef > 0:
            return True
        done = step + 1
        return self.logging.kl_to_init and (done % self.logging.kl_to_init_interval == 0 or done == self.train.steps)
