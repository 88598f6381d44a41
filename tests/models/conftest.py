"""Fixtures for the model tests: tiny random HF models (llama, qwen2, qwen3) and SmolLM2-135M,
each with HF reference logits for the probe batch (``ref.pt``). The rank launcher is in
``launcher.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

VOCAB = 1000
PROBE_LENGTHS = (13, 9)  # two packed sequences...
PROBE_SEQ_LEN = 24  # ...and two padding tokens after them


# ----------------------------------------------------------------------------- tiny HF models


def _make_tiny(path: Path, family: str) -> Path:
    import torch
    import transformers

    common = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
    }
    if family == "llama":
        # Tied embeddings and llama3 RoPE scaling (a short original context so it bites).
        scaling = {
            "rope_type": "llama3",
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        config = transformers.LlamaConfig(tie_word_embeddings=True, rope_theta=10000.0, rope_scaling=scaling, **common)
        cls = transformers.LlamaForCausalLM
    elif family == "qwen2":
        config = transformers.Qwen2Config(tie_word_embeddings=False, rope_theta=1e6, **common)
        cls = transformers.Qwen2ForCausalLM
    elif family == "qwen3":
        # head_dim 32 != hidden / heads = 16: the explicit head_dim path.
        config = transformers.Qwen3Config(tie_word_embeddings=True, head_dim=32, rope_theta=1e6, **common)
        cls = transformers.Qwen3ForCausalLM
    else:
        raise ValueError(family)
    torch.manual_seed({"llama": 1, "qwen2": 2, "qwen3": 3}[family])
    model = cls(config).float()
    with torch.no_grad():
        # HF initialises norms to 1 and biases to 0, which would hide swapped or dropped tensors.
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.2 * torch.randn_like(param))
    model.save_pretrained(path, safe_serialization=True)
    return path


def probe_batch(vocab_size: int, seed: int = 0):
    """``(ids [1, s], cu_seqlens [B+1])``: two packed sequences plus two padding tokens."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (1, PROBE_SEQ_LEN), generator=gen)
    cu = torch.tensor([0, PROBE_LENGTHS[0], sum(PROBE_LENGTHS)])
    return ids, cu


def write_reference(hf_dir: Path) -> Path:
    """HF logits for the probe batch, each packed sequence run on its own, saved to ``ref.pt``."""
    import torch
    from transformers import AutoModelForCausalLM

    out = hf_dir / "ref.pt"
    if out.is_file():
        return out
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    ids, cu = probe_batch(vocab)
    with torch.no_grad():
        packed = torch.cat([model(ids[:, cu[i] : cu[i + 1]]).logits[0] for i in range(len(cu) - 1)])
        single = model(ids).logits[0]
    torch.save({"ids": ids, "cu": cu, "packed": packed, "single": single}, out)
    del model
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """``{family: HF dir}`` for tiny random llama / qwen2 / qwen3 models, with reference logits."""
    root = tmp_path_factory.mktemp("tiny_hf")
    out = {}
    for family in ("llama", "qwen2", "qwen3"):
        path = _make_tiny(root / family, family)
        write_reference(path)
        out[family] = str(path)
    return out


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> str:
    """SmolLM2-135M-Instruct as an HF dir (converted once from the PyPI GGUF), with reference logits."""
    try:
        from pear_mega.pretrained import smollm2_135m_instruct

        path = smollm2_135m_instruct()
    except (ImportError, FileNotFoundError) as exc:
        pytest.skip(f"SmolLM2-135M-Instruct is not available: {exc}")
    ref_dir = tmp_path_factory.mktemp("smollm2_ref")
    # The reference goes next to a link to the checkpoint (the cache directory is shared).
    for item in Path(path).iterdir():
        (ref_dir / item.name).symlink_to(item)
    write_reference(ref_dir)
    return str(ref_dir)
