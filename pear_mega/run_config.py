"""Settings shared by the SFT and RL configs (``pear_mega.sft.config``, ``pear_mega.rl.config``):
the model to train and its checkpoints, and the check of sequence lengths against the model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class ModelConfig:
    """Which model to train and how it is materialized."""

    hf_path: str = ""
    """HF checkpoint directory (config.json, safetensors, tokenizer) to start from."""
    load_weights: bool = True
    """Load the HF weights (False: random init from the config; for tests and benchmarks)."""
    dtype: str = "float32"
    """Parameter dtype: float32 (CPU) or bfloat16 (GPU, with fp32 main params in the optimizer)."""
    use_te: bool | None = None
    """TransformerEngine layer spec: None = when transformer_engine imports and CUDA is present."""
    recompute_activations: bool = False
    """Full activation recompute per layer: roughly halves activation memory for ~20-30% time."""

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {DTYPES}, got {self.dtype!r}")


@dataclass(frozen=True)
class CheckpointConfig:
    dir: str = ""
    """Where checkpoints go ("" = no checkpoints)."""
    save_interval: int = 0
    """Save every N steps (0 = only at the end)."""
    resume: bool = True
    """Continue from ``dir/latest`` when it exists."""
    export_hf: str = ""
    """Export the final model as an HF directory here ("" = no export)."""
    keep_schedule: bool = False
    """On resume, keep the learning-rate schedule stored in the checkpoint (its lr, min_lr, warmup,
    decay style and length) instead of this config's. Default: the config wins, and every setting
    that differs from the checkpoint's is printed (old -> new)."""

    def __post_init__(self):
        if self.save_interval < 0:
            raise ValueError(f"checkpoint.save_interval must be >= 0, got {self.save_interval}")


def check_context_length(hf_path: str, length: int, key: str) -> None:
    """``length`` tokens must fit the model's ``max_position_embeddings`` (RoPE tables end there)."""
    config = Path(hf_path) / "config.json"
    if not config.is_file():
        raise ValueError(f"model.hf_path: {config} does not exist (an HF checkpoint directory is expected)")
    try:
        limit = json.loads(config.read_text()).get("max_position_embeddings")
    except ValueError as exc:
        raise ValueError(f"model.hf_path: {config} is not valid JSON ({exc})") from None
    if isinstance(limit, int) and length > limit:
        raise ValueError(f"{key}={length} exceeds the model's max_position_embeddings={limit} ({config})")
