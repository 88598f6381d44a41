"""``ModelArch``: the architecture of an HF decoder checkpoint, read from its ``config.json``.

Supported families (``model_type``), all pre-norm RMSNorm decoders with SwiGLU MLPs, RoPE and
grouped-query attention:

=========  ====================================  ==========================================
family     HF architectures                       what differs
=========  ====================================  ==========================================
llama      LlamaForCausalLM (SmolLM2, Llama 2/3)  no biases; llama3 / linear RoPE scaling
qwen2      Qwen2ForCausalLM (Qwen2, Qwen2.5)      bias on q/k/v projections
qwen3      Qwen3ForCausalLM                       RMSNorm on q and k per head (QK-norm),
                                                  explicit ``head_dim``
=========  ====================================  ==========================================

Both config styles are read: transformers 5 (``rope_parameters = {rope_theta, rope_type, ...}``)
and transformers 4 (``rope_theta`` + ``rope_scaling``). Anything the megatron model would compute
differently from HF (sliding windows, attention/MLP biases on Llama, other RoPE types, non-SiLU
activations) raises instead of converting silently.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3")
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling that megatron's ``RotaryEmbedding`` can reproduce exactly.

    - ``linear``: positions divided by ``factor`` (megatron ``seq_len_interpolation_factor``).
    - ``llama3``: Llama-3.1 wavelength-dependent scaling (megatron ``rope_scaling=True``;
      ``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings`` are applied by
      ``pear_mega.models.build`` because megatron's constructor fixes them at 1, 4, 8192).
    """

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelArch:
    """Shapes and options of one decoder checkpoint; see the module docstring for families."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    rope_scaling: RopeScaling | None = None
    initializer_range: float = 0.02
    hf_config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """The full config.json this arch was read from (written back on export)."""

    def __post_init__(self) -> None:
        if self.family not in SUPPORTED_FAMILIES:
            raise ValueError(f"ModelArch.family must be one of {SUPPORTED_FAMILIES}, got {self.family!r}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_attention_heads", "num_kv_heads", "head_dim"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelArch.{name} must be a positive int, got {value!r}")
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelArch.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )

    @property
    def architecture(self) -> str:
        """The HF class name (``config.json`` ``architectures[0]``)."""
        return _ARCHITECTURES[self.family]

    @property
    def heads_per_group(self) -> int:
        """Query heads sharing one key/value head."""
        return self.num_attention_heads // self.num_kv_heads

    def check_tensor_parallel(self, tp_size: int) -> None:
        """Raise ValueError when ``tp_size`` does not split the attention heads evenly."""
        if self.num_attention_heads % tp_size or self.num_kv_heads % tp_size:
            divisors = [d for d in range(1, self.num_kv_heads + 1) if self.num_kv_heads % d == 0
                        and self.num_attention_heads % d == 0]  # fmt: skip
            raise ValueError(
                f"tensor_parallel={tp_size} must divide both the {self.num_attention_heads} query heads "
                f"and the {self.num_kv_heads} key/value heads of this {self.family} model; "
                f"possible sizes: {divisors}"
            )

    def check_pipeline_parallel(self, pp_size: int) -> None:
        """Raise ValueError when ``pp_size`` does not split the layers evenly."""
        if self.num_layers % pp_size:
            raise ValueError(
                f"pipeline_parallel={pp_size} must divide the number of layers ({self.num_layers})"
            )

    def padded_vocab_size(self, tp_size: int, make_vocab_size_divisible_by: int = 128) -> int:
        """Vocabulary rounded up to a multiple of ``lcm(make_vocab_size_divisible_by, tp_size)``.

        Megatron splits the embedding and output layer by rows across TP ranks, so the row count
        must divide by ``tp_size``; rounding further to a fixed multiple (megatron's
        ``make_vocab_size_divisible_by``, default 128) keeps the padded size the same for every
        power-of-two TP size, so a checkpoint saved at TP=2 loads at TP=1 or 4. Padded rows are
        zero in the embedding and output layer and are masked out of the loss through the loss's
        ``vocab_size`` argument.
        """
        if make_vocab_size_divisible_by < 1 or tp_size < 1:
            raise ValueError("padded_vocab_size: tp_size and make_vocab_size_divisible_by must be >= 1")
        multiple = math.lcm(make_vocab_size_divisible_by, tp_size)
        return -(-self.vocab_size // multiple) * multiple

    @classmethod
    def from_hf(cls, source: str | os.PathLike | dict[str, Any] | Any) -> ModelArch:
        """Read an HF directory, ``config.json`` path, config dict or ``PretrainedConfig``.

        Raises:
            FileNotFoundError: no config.json at the path.
            ValueError: an unknown ``model_type`` or an inconsistent config.
            NotImplementedError: a known family using a feature megatron would compute differently.
        """
        origin = "config dict"
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no HF config.json")
            origin = str(path)
            config = json.loads(path.read_text())
        elif isinstance(source, dict):
            config = dict(source)
        elif hasattr(source, "to_dict"):
            config = source.to_dict()
        else:
            raise TypeError(f"ModelArch.from_hf: expected a path, dict or PretrainedConfig, got {type(source)}")
        return _parse(config, origin)


def _require(config: dict[str, Any], key: str, origin: str):
    if key not in config or config[key] is None:
        raise ValueError(f"{origin}: field {key!r} is missing")
    return config[key]


def _rope(config: dict[str, Any], origin: str) -> tuple[float, RopeScaling | None]:
    params = config.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params and isinstance(params["full_attention"], dict):
        params = params["full_attention"]
    if isinstance(params, dict):  # transformers >= 5
        theta = params.get("rope_theta", config.get("rope_theta"))
        scaling = params
    else:  # transformers 4
        theta = config.get("rope_theta")
        scaling = config.get("rope_scaling") or {}
    if theta is None:
        theta = 10000.0
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if scaling.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) != 1.0:
        raise NotImplementedError(f"{origin}: partial_rotary_factor != 1 is not supported")
    if rope_type == "default":
        return float(theta), None
    if rope_type == "linear":
        return float(theta), RopeScaling("linear", float(scaling["factor"]))
    if rope_type == "llama3":
        return float(theta), RopeScaling(
            "llama3",
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
            high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                scaling.get("original_max_position_embeddings", config.get("max_position_embeddings", 8192))
            ),
        )
    raise NotImplementedError(
        f"{origin}: RoPE scaling type {rope_type!r} is not supported (megatron-core 0.16 reproduces "
        "'default', 'linear' and 'llama3' only)"
    )


def _parse(config: dict[str, Any], origin: str) -> ModelArch:
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_FAMILIES:
        archs = config.get("architectures")
        raise ValueError(
            f"{origin}: unsupported architecture model_type={model_type!r} (architectures={archs}); "
            f"supported: {', '.join(_ARCHITECTURES.values())}"
        )
    hidden = int(_require(config, "hidden_size", origin))
    heads = int(_require(config, "num_attention_heads", origin))
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = config.get("head_dim") or hidden // heads
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise NotImplementedError(f"{origin}: hidden_act={act!r} is not supported (SwiGLU needs 'silu')")
    if config.get("mlp_bias"):
        raise NotImplementedError(f"{origin}: mlp_bias=True is not supported")
    if model_type in ("llama", "qwen3") and config.get("attention_bias"):
        # Megatron can bias q/k/v (add_qkv_bias) but not o_proj without biasing the MLP as well.
        raise NotImplementedError(f"{origin}: attention_bias=True is not supported for {model_type}")
    if config.get("use_sliding_window"):
        raise NotImplementedError(f"{origin}: sliding-window attention is not supported")
    rope_theta, rope_scaling = _rope(config, origin)
    return ModelArch(
        family=model_type,
        vocab_size=int(_require(config, "vocab_size", origin)),
        hidden_size=hidden,
        intermediate_size=int(_require(config, "intermediate_size", origin)),
        num_layers=int(_require(config, "num_hidden_layers", origin)),
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(head_dim),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        rope_scaling=rope_scaling,
        initializer_range=float(config.get("initializer_range", 0.02)),
        hf_config=config,
    )
