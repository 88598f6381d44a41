"""Typed configuration of a PEAR study: behavior data → SFT arms → identical GRPO → pass@k.

A ``StudyConfig`` nests the trainers' own configs rather than copying their fields: ``sft`` is
the ``SFTConfig`` every arm starts from (its ``model.hf_path`` is the student init, its
``pear`` block the PEAR settings) and ``rl`` the ``RLConfig`` every arm's GRPO run uses (its
``task`` is the training task, ``task.num_shots`` the demonstrations in the *student's*
prompt). The study's own settings are ``study`` (seeds, arms), ``behavior`` (how πβ is made)
and ``eval`` (the held-out suites). Command-line overrides use the same ``dotted.key=value``
syntax as the trainers: ``study.seeds=[0,1,2] sft.train.steps=20 rl.rollout.n=8``.

Arms are named ``LEVEL`` or ``LEVEL_<m>x`` with LEVEL one of ``pear_mega.pear.LEVELS``:
``token`` is PEAR at token level, ``none_3x`` plain SFT with three times the SFT steps (a
*stronger-SFT* arm). A ``kd`` prefix makes a distillation arm: ``loss.kind=kd`` (the top-K KL to
πβ, ``pear_mega.kd``) with the settings of ``sft.loss.kd``; ``kd`` is unweighted distillation,
``kd_token`` its PEAR-weighted form, ``kd_token_3x`` with three times the steps. With a kd arm the
behavior data also stores πβ's top-``behavior.kd_top_k`` log-probs of every answer token.
``study.arm_overrides`` adds SFT overrides to single arms as JSON, e.g.
``'{"token": ["pear.gamma=0.99"]}'``.

Models are HF directories or ``pretrained:NAME`` with NAME in ``PRETRAINED`` (built on first
use by ``pear_mega.pretrained``; ``tiny`` is written into the study directory).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from pear_mega.pear import LEVELS
from pear_mega.rl.config import RLConfig
from pear_mega.sft.config import SFTConfig

PRETRAINED = ("smollm2_135m_instruct", "tiny")
_ARM = re.compile(r"^(?:(?P<kd>kd)(?:_(?P<kd_level>[a-z]+))?|(?P<level>[a-z]+))(?:_(?P<mult>\d+)x)?$")


@dataclass(frozen=True)
class Arm:
    """One SFT arm: a loss kind (``SFTConfig.loss.kind``), a PEAR level and a multiple of the base SFT steps."""

    name: str
    level: str
    steps_multiplier: int = 1
    loss: str = "nll"

    def sft_config(self, base: SFTConfig) -> SFTConfig:
        """``base`` with this arm's loss kind, PEAR level and steps; every other setting (the
        distillation's ``loss.kd`` included) is the study's."""
        return replace(base, loss=replace(base.loss, kind=self.loss), pear=replace(base.pear, level=self.level),
                       train=replace(base.train, steps=base.train.steps * self.steps_multiplier))


def parse_arm(name: str, key: str = "study.arms") -> Arm:
    """``token`` → Arm("token", "token", 1); ``none_3x`` → Arm("none_3x", "none", 3);
    ``kd`` → Arm("kd", "none", 1, "kd"); ``kd_token_3x`` → Arm("kd_token_3x", "token", 3, "kd")."""
    match = _ARM.match(name)
    level = ((match["kd_level"] or "none") if match["kd"] else match["level"]) if match else None
    if level not in LEVELS:
        raise ValueError(f"{key}: unknown arm {name!r}; an arm is [kd_]LEVEL[_<m>x] or kd[_<m>x] with LEVEL one of "
                         f"{LEVELS} (e.g. 'token', 'none_3x', 'kd', 'kd_token')")
    if match["kd_level"] == "none":  # one name per arm: 'kd' and 'kd_none' would be two runs of one setting
        raise ValueError(f"{key}: write unweighted distillation as 'kd', not {name!r}")
    mult = int(match["mult"] or 1)
    if mult < 1:
        raise ValueError(f"{key}: arm {name!r} needs a step multiple >= 1")
    return Arm(name, level, mult, "kd" if match["kd"] else "nll")


def is_pretrained(spec: str) -> bool:
    return spec.startswith("pretrained:")


def check_model_spec(spec: str, key: str) -> None:
    """A model is an existing HF directory or ``pretrained:NAME`` (ValueError naming ``key``)."""
    if is_pretrained(spec):
        name = spec.split(":", 1)[1]
        if name not in PRETRAINED:
            raise ValueError(f"{key}: unknown pretrained model {name!r}; known: {', '.join(PRETRAINED)}")
        return
    if not (Path(spec) / "config.json").is_file():
        raise ValueError(f"{key}: {spec!r} is not an HF model directory (no config.json there)")


@dataclass(frozen=True)
class StudySettings:
    name: str = "study"
    out_dir: str = ""
    """Study directory (manifest, data, models, logs, report); '' = outputs/studies/<name>."""
    seeds: tuple[int, ...] = (0,)
    """Each seed repeats the whole chain: SFT data order, RL sampling, evaluation sampling."""
    arms: tuple[str, ...] = ("none", "token")
    """SFT arms (see the module docstring); every arm gets the identical GRPO run."""
    baseline: str = ""
    """The arm paired differences are taken against; '' = ``none`` if it is an arm, else the first arm
    (a study of kd arms only: ``kd``); see ``baseline_arm``."""
    arm_overrides: str = "{}"
    """JSON {arm: ["sft.dotted.key=value" without the "sft." prefix, ...]}: per-arm SFT settings."""
    sft_recipe: str = "smollm2_pear_sft"
    """SFT recipe the per-arm commands are written against (``--recipe`` + overrides)."""
    rl_recipe: str = "smollm2_grpo"
    """RL recipe the GRPO commands are written against."""
    alignment: bool = True
    """Compute cos(θ_SFT − θ_0, θ_RL − θ_SFT) per arm and seed (reads three HF checkpoints)."""
    keep_sft_checkpoints: bool = False
    """Keep the SFT runs' megatron checkpoints (the exported HF models are always kept)."""
    nproc_per_node: int = 1
    """Trainer processes of the SFT and RL stages (> 1: launched with torchrun --standalone)."""

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ValueError(f"study.name must be letters, digits, '_', '.', '-', got {self.name!r}")
        if not self.seeds:
            raise ValueError("study.seeds: give at least one seed")
        if len(set(self.seeds)) != len(self.seeds) or any(s < 0 for s in self.seeds):
            raise ValueError(f"study.seeds must be distinct and >= 0, got {list(self.seeds)}")
        if self.nproc_per_node < 1:
            raise ValueError(f"study.nproc_per_node must be >= 1, got {self.nproc_per_node}")
        if not self.arms:
            raise ValueError("study.arms: give at least one arm")
        if len(set(self.arms)) != len(self.arms):
            raise ValueError(f"study.arms has duplicates: {list(self.arms)}")
        for arm in self.arms:
            parse_arm(arm)
        if self.baseline and self.baseline not in self.arms:
            raise ValueError(f"study.baseline {self.baseline!r} is not one of study.arms {list(self.arms)}")
        overrides = self.arm_override_map()
        unknown = sorted(set(overrides) - set(self.arms))
        if unknown:
            raise ValueError(f"study.arm_overrides: arms {unknown} are not in study.arms {list(self.arms)}")

    def arm_override_map(self) -> dict[str, list[str]]:
        try:
            value = json.loads(self.arm_overrides)
        except json.JSONDecodeError as e:
            raise ValueError(f"study.arm_overrides is not valid JSON ({e.msg}): {self.arm_overrides!r}") from None
        if not isinstance(value, dict) or not all(
                isinstance(v, list) and all(isinstance(x, str) for x in v) for v in value.values()):
            raise ValueError("study.arm_overrides must be a JSON object {arm: [\"key=value\", ...]}")  # noqa: TRY004
        return value

    def arm(self, name: str) -> Arm:
        return parse_arm(name)

    @property
    def baseline_arm(self) -> str:
        return self.baseline or ("none" if "none" in self.arms else self.arms[0])


@dataclass(frozen=True)
class BehaviorConfig:
    """How the behavior data (πβ's answers and their log-probs) is made.

    πβ is a model plus a prompt template: ``model`` sees ``shots`` demonstrations (and
    ``system``, if set) before each training question, samples ``n`` answers at
    ``temperature`` / ``top_p`` through vLLM (``tools/collect_logprobs.py generate``), and the
    log-prob of every sampled token under that sampling distribution is stored. The stored rows
    are then given the *student's* prompt (``rl.task.num_shots`` demonstrations, no system
    message): with ``model`` = the student init and more shots than the student, πβ is the
    few-shot-prompted teacher of context distillation, a genuinely different policy from πθ.
    """

    model: str = ""
    """πβ's weights: an HF directory or pretrained:NAME; '' = the student init (sft.model.hf_path)."""
    shots: int = 4
    """Demonstrations in πβ's prompt."""
    system: str = ""
    """System message of πβ's prompt ('' = none)."""
    prompts: int = 64
    """Training questions per task (drawn with ``task_seed``)."""
    task_seed: int = 0
    """Seed of the training questions (keep it apart from eval.seed and rl.task.seed)."""
    n: int = 4
    """Answers sampled per question."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    engine_seed: int = 0
    file: str = ""
    """An existing pear_mega.data file with πβ log-probs, used as it is instead of collecting."""
    kd_top_k: int = 32
    """πβ's K most likely tokens (ids and log-probs) stored per answer token for the kd arms; collected
    only when ``study.arms`` has a kd arm (the other arms read the sampled tokens' log-probs only)."""

    def __post_init__(self):
        if self.shots < 0:
            raise ValueError(f"behavior.shots must be >= 0, got {self.shots}")
        if self.kd_top_k < 0:
            raise ValueError(f"behavior.kd_top_k must be >= 0, got {self.kd_top_k}")
        for name in ("prompts", "n", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"behavior.{name} must be >= 1, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise ValueError(f"behavior.temperature must be > 0 (log-probs are stored under the sampling "
                             f"distribution), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"behavior.top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class EvalSettings:
    """pass@k on held-out prompts of the training task and of shifted tasks, before and after RL."""

    size: int = 32
    """Held-out prompts per suite (the same prompts, in the same order, for every arm and seed)."""
    seed: int = 99_991
    """Seed of the held-out items (neither the behavior data nor RL uses it)."""
    n: int = 4
    """Samples per prompt."""
    ks: tuple[int, ...] = (1, 4)
    temperature: float = 1.0
    max_tokens: int = 16
    shifted: str = "{}"
    """JSON {task: reasoning-gym settings}: the shifted suites (named 'shifted:<task>')."""

    def __post_init__(self):
        if self.size < 1 or self.n < 1 or self.max_tokens < 1:
            raise ValueError("eval.size, eval.n and eval.max_tokens must be >= 1")
        if not self.ks or any(not 1 <= k <= self.n for k in self.ks):
            raise ValueError(f"eval.ks must be in [1, eval.n={self.n}], got {list(self.ks)}")
        if not self.temperature > 0:
            raise ValueError(f"eval.temperature must be > 0 for pass@k sampling, got {self.temperature}")
        self.shifted_tasks()

    def shifted_tasks(self) -> dict[str, dict]:
        try:
            value = json.loads(self.shifted)
        except json.JSONDecodeError as e:
            raise ValueError(f"eval.shifted is not valid JSON ({e.msg}): {self.shifted!r}") from None
        if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
            raise ValueError("eval.shifted must be a JSON object {task: {settings}}")  # noqa: TRY004
        return value


@dataclass(frozen=True)
class StudyConfig:
    study: StudySettings = field(default_factory=StudySettings)
    behavior: BehaviorConfig = field(default_factory=BehaviorConfig)
    sft: SFTConfig = field(default_factory=lambda: SFTConfig(model=_placeholder_model(),
                                                             data=_placeholder_data()))
    rl: RLConfig = field(default_factory=lambda: RLConfig(model=_placeholder_model()))
    eval: EvalSettings = field(default_factory=EvalSettings)

    def __post_init__(self):
        if self.rl.task.source != "reasoning_gym":
            raise ValueError(f"rl.task.source must be 'reasoning_gym' in a study (the behavior data and the "
                             f"held-out suites are drawn from its tasks), got {self.rl.task.source!r}")
        if len(self.rl.task.tasks) != 1:
            raise ValueError(f"rl.task.tasks: a study trains on one task, got {list(self.rl.task.tasks)}")
        if self.rl.algorithm.name != "grpo":
            raise ValueError(f"rl.algorithm.name must be 'grpo' in a study, got {self.rl.algorithm.name!r}")
        seeds = {self.behavior.task_seed, self.rl.task.seed}
        if self.eval.seed in seeds:
            raise ValueError(f"eval.seed ({self.eval.seed}) must differ from behavior.task_seed and rl.task.seed: "
                             "the held-out prompts would not be held out")
        self._check_arm_losses()

    def _check_arm_losses(self) -> None:
        """The arm names set ``sft.loss.kind``; a kd arm needs a top-K and a valid distillation config."""
        if self.sft.loss.kind != "nll":
            raise ValueError(f"sft.loss.kind must be 'nll' in a study, got {self.sft.loss.kind!r}: each arm's name sets "
                             "it (kd arms, e.g. 'kd_token', use loss.kind=kd with the settings of sft.loss.kd)")
        kd_arms = [arm for arm in map(parse_arm, self.study.arms) if arm.loss == "kd"]
        if kd_arms and self.behavior.kd_top_k < 1:
            raise ValueError(f"behavior.kd_top_k must be >= 1 with the kd arm(s) {[a.name for a in kd_arms]} "
                             f"(they distil πβ's stored top-K), got {self.behavior.kd_top_k}")
        for arm in kd_arms:
            try:
                arm.sft_config(self.sft)
            except ValueError as exc:  # e.g. pear.target_temperature != 1, which the distillation loss refuses
                raise ValueError(f"study.arms: arm {arm.name!r} (sft.loss.kind=kd): {exc}") from None

    @property
    def teacher_top_k(self) -> int:
        """K of the top-K the behavior stage stores (0: no kd arm, none stored)."""
        return self.behavior.kd_top_k if any(parse_arm(a).loss == "kd" for a in self.study.arms) else 0

    @property
    def task(self) -> str:
        return self.rl.task.tasks[0]

    @property
    def student_shots(self) -> int:
        return self.rl.task.num_shots

    def suites(self) -> dict[str, tuple[str, dict]]:
        """Suite name → (reasoning-gym task, settings): the training task, then the shifted ones."""
        out = {self.task: (self.task, self.rl.task.task_settings())}
        for task, settings in self.eval.shifted_tasks().items():
            out[f"shifted:{task}"] = (task, settings)
        return out

    def out_dir(self) -> Path:
        return Path(self.study.out_dir or f"outputs/studies/{self.study.name}")

    def validate(self) -> None:
        """Checks that look outside the config (models on disk, task scorers); run before any stage."""
        check_model_spec(self.sft.model.hf_path, "sft.model.hf_path")
        if self.behavior.file:
            if not Path(self.behavior.file).is_file():
                raise ValueError(f"behavior.file: {self.behavior.file!r} does not exist")
        elif self.behavior.model:
            check_model_spec(self.behavior.model, "behavior.model")
        elif self.behavior.shots == self.student_shots and not self.behavior.system:
            raise ValueError("behavior: πβ would be the student's own prompt (behavior.model='' with behavior.shots == "
                             f"rl.task.num_shots == {self.student_shots} and no behavior.system); give behavior.model, "
                             "more behavior.shots or a behavior.system so that πβ differs from πθ")
        import reasoning_gym.factory

        known = set(reasoning_gym.factory.DATASETS)
        for name, (task, settings) in self.suites().items():
            key = "rl.task.tasks" if name == self.task else "eval.shifted"
            if task not in known:
                raise ValueError(f"{key}: {task!r} is not a reasoning-gym task, so it has no scorer")
            try:
                reasoning_gym.create_dataset(task, size=1, seed=0, **settings)
            except Exception as exc:  # the task's own config validation
                raise ValueError(f"{key}: settings {settings} of task {task!r} are refused: {exc}") from None
        for arm, overrides in self.study.arm_override_map().items():
            from pear_mega.config_tools import apply_overrides

            try:
                out = apply_overrides(self.sft, overrides)
            except ValueError as exc:
                raise ValueError(f"study.arm_overrides[{arm!r}]: {exc}") from None
            if out.loss.kind != self.sft.loss.kind:
                raise ValueError(f"study.arm_overrides[{arm!r}]: loss.kind is set by the arm's name (a kd arm, e.g. "
                                 "'kd_token', distils), not by an override")
        if self.behavior.file and self.teacher_top_k:
            from pear_mega.sft.losses import build_loss

            kd = replace(self.sft, loss=replace(self.sft.loss, kind="kd"))
            try:
                build_loss(kd, vocab_size=0).check_data([self.behavior.file])
            except ValueError as exc:
                raise ValueError(f"behavior.file: the kd arms need a teacher top-K in it: {exc}") from None


def _placeholder_model():
    from pear_mega.sft.config import ModelConfig

    return ModelConfig(hf_path="pretrained:tiny")


def _placeholder_data():
    from pear_mega.sft.config import DataConfig

    # Replaced by the study's behavior data in every SFT stage.
    return DataConfig(train_files=("<behavior data>",), seq_length=256)
