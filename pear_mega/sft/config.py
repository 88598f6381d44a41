"""Typed configuration of a PEAR-SFT run.

One nested dataclass per concern; each validates itself in ``__post_init__`` and cross-field
checks live in ``SFTConfig.__post_init__``. The ``data`` section is the data pipeline's own
``pear_mega.data.DataConfig`` (re-exported here), so ``data.*`` keys mean the same in the trainer
and in the library. Recipes (``pear_mega.sft.recipes``) are functions that return an
``SFTConfig``; the command line overrides single fields with ``dotted.key=value``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from pear_mega.data.config import DataConfig
from pear_mega.kd import KDConfig
from pear_mega.optim import OptimConfig
from pear_mega.parallel import ParallelConfig
from pear_mega.pear import PearConfig
from pear_mega.run_config import DTYPES, CheckpointConfig, ModelConfig, check_context_length

__all__ = ["DTYPES", "CheckpointConfig", "DataConfig", "LoggingConfig", "LossConfig", "ModelConfig", "SFTConfig",
           "TrainConfig", "check_context_length"]


LOSS_KINDS = ("nll", "kd")


@dataclass(frozen=True)
class LossConfig:
    """The per-token loss the PEAR weights multiply (``pear_mega.sft.losses``)."""

    kind: str = "nll"
    """"nll": PEAR-SFT, −log πθ of the data's tokens; "kd": distillation to the teacher top-K stored
    with the data (collected with ``tools/collect_logprobs.py --top-k K``), settings in ``loss.kd``."""
    kd: KDConfig = field(default_factory=KDConfig)
    """Distillation mode and KL / NLL weights (``pear_mega.kd``); used when kind = "kd"."""

    def __post_init__(self):
        if self.kind not in LOSS_KINDS:
            raise ValueError(f"loss.kind must be one of {LOSS_KINDS}, got {self.kind!r}")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    """Optimizer steps."""
    global_batch_packs: int = 8
    """Packs per optimizer step over all data-parallel ranks (= microbatches x DP size)."""
    log_interval: int = 1
    """Log every N steps (and the last one)."""
    max_bad_steps: int = 3
    """Consecutive steps with a non-finite loss or grad norm (skipped) before the run stops."""

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"train.steps must be >= 1, got {self.steps}")
        if self.log_interval < 1:
            raise ValueError(f"train.log_interval must be >= 1, got {self.log_interval}")
        if self.global_batch_packs < 1:
            raise ValueError(f"train.global_batch_packs must be >= 1, got {self.global_batch_packs}")
        if self.max_bad_steps < 1:
            raise ValueError(f"train.max_bad_steps must be >= 1, got {self.max_bad_steps}")


@dataclass(frozen=True)
class LoggingConfig:
    tensorboard_dir: str = ""
    """TensorBoard event directory ("" = no tensorboard)."""
    progress_bar: bool = True
    histogram_interval: int = 10
    """Write a histogram of the PEAR log-weights every N steps (0 = never)."""

    def __post_init__(self):
        if self.histogram_interval < 0:
            raise ValueError(f"logging.histogram_interval must be >= 0, got {self.histogram_interval}")


@dataclass(frozen=True)
class SFTConfig:
    name: str = "sft"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pear: PearConfig = field(default_factory=PearConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        if not self.model.hf_path:
            raise ValueError("model.hf_path is required (an HF checkpoint directory)")
        if not self.data.train_files:
            raise ValueError("data.train_files is required (jsonl/parquet files with behavior log-probs)")
        if self.checkpoint.export_hf and not self.checkpoint.dir:
            raise ValueError("checkpoint.export_hf needs checkpoint.dir (export reads the final checkpoint)")
        if self.loss.kind == "kd" and self.pear.target_temperature != 1.0:
            raise ValueError(f"pear.target_temperature={self.pear.target_temperature} is not supported with "
                             "loss.kind=kd (the distillation loss takes πθ at temperature 1)")

    def data_source(self) -> DataConfig:
        """The data config the trainer loads: ``data`` with the model's tokenizer
        (``model.hf_path``) unless ``data.tokenizer_path`` names another."""
        return replace(self.data, tokenizer_path=self.data.tokenizer_path or self.model.hf_path)

    def validate_run(self) -> None:
        """Checks of the final config (after every override; the CLI and the trainer run them
        before anything is built): settings that an override order could make transiently
        inconsistent, and those that need the model's config.json.

        Raises:
            ValueError naming the key: warmup longer than the run, ``data.seq_length`` beyond the
            model's context; naming file, row and field: ``loss.kind=kd`` on data without a top-K.
        """
        self.optim.check_steps(self.train.steps, "train.steps")
        check_context_length(self.model.hf_path, self.data.seq_length, "data.seq_length")
        from pear_mega.sft.losses import build_loss

        build_loss(self, vocab_size=0).check_data(self.data.train_files)  # e.g. loss.kind=kd without top-K
