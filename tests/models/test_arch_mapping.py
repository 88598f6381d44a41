"""In-process checks of the pieces that need no process group: ModelArch parsing, the HF <->
megatron mapping (hand-computed layouts and exact round trips at every TP/PP split), packed
attention inputs, ParallelConfig validation and the conversion tool's CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pear_mega.models import (
    ModelArch,
    SafetensorsReader,
    attention_inputs,
    hf_to_megatron_shard,
    megatron_to_hf,
)
from pear_mega.models.mapping import (
    all_tensor_maps,
    canonical_name,
    hf_tensor_names,
    hf_tensor_shape,
    place_shard,
    stage_tensor_maps,
)
from pear_mega.parallel import ParallelConfig

REPO = Path(__file__).resolve().parents[2]


def _llama_config(**overrides) -> dict:
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 3,
        "hidden_size": 1,
        "intermediate_size": 4,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 1,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
    }
    config.update(overrides)
    return config


# ----------------------------------------------------------------------------- ModelArch


def test_arch_reads_all_three_families(tiny_models):
    llama = ModelArch.from_hf(tiny_models["llama"])
    qwen2 = ModelArch.from_hf(tiny_models["qwen2"])
    qwen3 = ModelArch.from_hf(tiny_models["qwen3"])
    assert (llama.family, llama.tie_word_embeddings, llama.qkv_bias, llama.qk_norm) == ("llama", True, False, False)
    assert llama.rope_scaling is not None and llama.rope_scaling.rope_type == "llama3"
    assert llama.rope_scaling.original_max_position_embeddings == 64 and llama.rope_scaling.factor == 4.0
    assert (qwen2.family, qwen2.tie_word_embeddings, qwen2.qkv_bias, qwen2.rope_theta) == ("qwen2", False, True, 1e6)
    assert (qwen3.qk_norm, qwen3.head_dim, qwen3.hidden_size) == (True, 32, 64)
    assert llama.num_attention_heads == 4 and llama.num_kv_heads == 2 and llama.heads_per_group == 2


def test_arch_reads_transformers4_style_rope():
    arch = ModelArch.from_hf(_llama_config(rope_theta=5e5, rope_scaling={"type": "linear", "factor": 2.0}))
    assert arch.rope_theta == 5e5 and arch.rope_scaling.rope_type == "linear" and arch.rope_scaling.factor == 2.0


def test_arch_errors_are_clear():
    with pytest.raises(ValueError, match="unsupported architecture model_type='gpt2'.*LlamaForCausalLM"):
        ModelArch.from_hf({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(NotImplementedError, match="RoPE scaling type 'yarn'"):
        ModelArch.from_hf(_llama_config(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}))
    with pytest.raises(NotImplementedError, match="sliding-window"):
        ModelArch.from_hf(_llama_config(model_type="qwen2", use_sliding_window=True))
    with pytest.raises(ValueError, match="'vocab_size' is missing"):
        ModelArch.from_hf({k: v for k, v in _llama_config().items() if k != "vocab_size"})


def test_tp_must_divide_query_and_kv_heads():
    smol_like = ModelArch.from_hf(_llama_config(num_attention_heads=9, num_key_value_heads=3))
    smol_like.check_tensor_parallel(3)
    with pytest.raises(ValueError, match=r"9 query heads and the 3 key/value heads.*possible sizes: \[1, 3\]"):
        smol_like.check_tensor_parallel(2)


@pytest.mark.parametrize(
    "vocab, tp, expected", [(1000, 1, 1024), (1000, 2, 1024), (1000, 4, 1024), (1000, 3, 1152), (49152, 3, 49152)]
)
def test_padded_vocab_size(vocab, tp, expected):
    assert ModelArch.from_hf(_llama_config(vocab_size=vocab)).padded_vocab_size(tp) == expected


# ----------------------------------------------------------------------------- mapping


def test_qkv_gate_up_and_vocab_layouts_by_hand():
    """Hand-written megatron layouts for 4 query heads in 2 KV groups, head_dim 1, hidden 1."""
    arch = ModelArch.from_hf(_llama_config())
    hf = {name: torch.zeros(hf_tensor_shape(arch, name)) for name in hf_tensor_names(arch, include_tied_lm_head=False)}
    hf["model.layers.0.self_attn.q_proj.weight"] = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    hf["model.layers.0.self_attn.k_proj.weight"] = torch.tensor([[10.0], [11.0]])
    hf["model.layers.0.self_attn.v_proj.weight"] = torch.tensor([[20.0], [21.0]])
    hf["model.layers.0.mlp.gate_proj.weight"] = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    hf["model.layers.0.mlp.up_proj.weight"] = torch.tensor([[10.0], [11.0], [12.0], [13.0]])
    hf["model.embed_tokens.weight"] = torch.tensor([[5.0], [6.0], [7.0]])
    full = hf_to_megatron_shard(hf.__getitem__, arch, 0, 1, 0, 1, "local", padded_vocab_size=4)
    qkv = full["decoder.layers.0.self_attention.linear_qkv.weight"].flatten().tolist()
    assert qkv == [0, 1, 10, 20, 2, 3, 11, 21]  # [q heads of group 0, k0, v0, q heads of group 1, k1, v1]
    assert full["decoder.layers.0.mlp.linear_fc1.weight"].flatten().tolist() == [0, 1, 2, 3, 10, 11, 12, 13]
    assert full["embedding.word_embeddings.weight"].flatten().tolist() == [5, 6, 7, 0]  # zero padding row
    rank1 = hf_to_megatron_shard(hf.__getitem__, arch, 1, 2, 0, 1, "local", padded_vocab_size=4)
    assert rank1["decoder.layers.0.self_attention.linear_qkv.weight"].flatten().tolist() == [2, 3, 11, 21]
    assert rank1["decoder.layers.0.mlp.linear_fc1.weight"].flatten().tolist() == [2, 3, 12, 13]
    assert rank1["embedding.word_embeddings.weight"].flatten().tolist() == [7, 0]


def test_place_shard_by_hand():
    """Rank 1 of 2 on the hand-written layout above: where its shard lands in the HF tensors."""
    arch = ModelArch.from_hf(_llama_config())
    qkv = torch.tensor([[2.0], [3.0], [11.0], [21.0]])  # group 1: q heads 2 and 3, k1, v1
    placed = place_shard("decoder.layers.0.self_attention.linear_qkv.weight", qkv, 1, 2, arch)
    assert [(n.split(".")[-2], idx, t.flatten().tolist()) for n, idx, t in placed] == [
        ("q_proj", (slice(2, 4),), [2.0, 3.0]), ("k_proj", (slice(1, 2),), [11.0]), ("v_proj", (slice(1, 2),), [21.0])]
    fc1 = torch.tensor([[2.0], [3.0], [12.0], [13.0]])  # gate rows 2-3, up rows 2-3
    placed = place_shard("decoder.layers.0.mlp.linear_fc1.weight", fc1, 1, 2, arch)
    assert [(n.split(".")[-2], idx, t.flatten().tolist()) for n, idx, t in placed] == [
        ("gate_proj", (slice(2, 4),), [2.0, 3.0]), ("up_proj", (slice(2, 4),), [12.0, 13.0])]
    # vocab 3 padded to 4: rank 1 holds rows 2 and 3 (padding); only row 2 is placed
    (name, idx, t), = place_shard("embedding.word_embeddings.weight", torch.tensor([[7.0], [0.0]]), 1, 2, arch)
    assert (name, idx, t.flatten().tolist()) == ("model.embed_tokens.weight", (slice(2, 3),), [7.0])
    (name, idx, t), = place_shard("decoder.layers.0.self_attention.linear_proj.weight", torch.ones(1, 2), 1, 2, arch)
    assert idx == (slice(None), slice(2, 4))
    assert place_shard("decoder.final_layernorm.weight", torch.ones(1), 1, 2, arch) == []  # rank 0 writes it


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_placed_shards_rebuild_every_hf_tensor(tiny_models, family):
    """Each rank's shards written in place (``place_shard``) rebuild the HF tensors bit-exactly and
    cover every element: the full tensors start as NaN, and every (tp, pp) split must fill them."""
    arch = ModelArch.from_hf(tiny_models[family])
    reader = SafetensorsReader(tiny_models[family])
    for tp in (1, 2):
        for pp in (1, 2):
            full = {n: torch.full(hf_tensor_shape(arch, n), float("nan")) for n in reader.names()}
            for pp_rank in range(pp):
                for tp_rank in range(tp):
                    shard = hf_to_megatron_shard(reader.get, arch, tp_rank, tp, pp_rank, pp, "local")
                    for name, tensor in shard.items():
                        canonical = canonical_name(name, arch, pp_rank, pp)
                        if canonical == "output_layer.weight" and arch.tie_word_embeddings:
                            continue
                        for hf_name, index, source in place_shard(canonical, tensor, tp_rank, tp, arch):
                            full[hf_name][index].copy_(source)
            for name in reader.names():
                assert torch.equal(full[name], reader.get(name)), f"{family} tp={tp} pp={pp}: {name}"


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("layout", ["local", "te"])
def test_mapping_round_trip_is_exact_at_every_split(tiny_models, family, layout):
    """HF -> shards at (tp, pp) -> megatron_to_hf == HF, bit-exact, and the shards cover each stage."""
    arch = ModelArch.from_hf(tiny_models[family])
    reader = SafetensorsReader(tiny_models[family])
    for tp in (1, 2):
        for pp in (1, 2):
            rebuilt = {}
            for pp_rank in range(pp):
                shards = [hf_to_megatron_shard(reader.get, arch, r, tp, pp_rank, pp, layout) for r in range(tp)]
                names = set(shards[0])
                expected = {canonical_name(x, arch, pp_rank, pp) for x in names}
                assert expected == {e.megatron for e in stage_tensor_maps(arch, pp_rank, pp)}
                for name in names:
                    canonical = canonical_name(name, arch, pp_rank, pp)
                    if canonical == "output_layer.weight" and arch.tie_word_embeddings:
                        continue
                    for hf_name, tensor in megatron_to_hf(canonical, [s[name] for s in shards], arch):
                        rebuilt[hf_name] = tensor
            assert sorted(rebuilt) == sorted(reader.names()), (tp, pp)
            for name in reader.names():
                assert torch.equal(rebuilt[name], reader.get(name)), f"{family} tp={tp} pp={pp}: {name}"


def test_te_and_local_layouts_name_the_norms_differently(tiny_models):
    arch = ModelArch.from_hf(tiny_models["llama"])
    reader = SafetensorsReader(tiny_models["llama"])
    te = hf_to_megatron_shard(reader.get, arch, 0, 1, 1, 2, "te")
    local = hf_to_megatron_shard(reader.get, arch, 0, 1, 1, 2, "local")
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in te
    assert "decoder.layers.0.input_layernorm.weight" in local
    assert "decoder.layers.0.pre_mlp_layernorm.weight" in local
    # Stage 1 of 2 holds global layer 1 as its local layer 0, and the (tied) output layer copy.
    assert torch.equal(te["decoder.layers.0.mlp.linear_fc2.weight"], reader.get("model.layers.1.mlp.down_proj.weight"))
    assert torch.equal(te["output_layer.weight"][: arch.vocab_size], reader.get("model.embed_tokens.weight"))
    assert len(all_tensor_maps(arch)) == 1 + 6 * 2 + 1  # embedding, 6 per layer, final norm (tied)


def test_missing_shard_and_mismatched_vocab_are_clear_errors(tmp_path, tiny_models):
    index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002.safetensors: shard listed"):
        SafetensorsReader(tmp_path)

    arch = ModelArch.from_hf(tiny_models["qwen2"])
    reader = SafetensorsReader(tiny_models["qwen2"])
    bad = tmp_path / "bad"
    bad.mkdir()
    tensors = {n: reader.get(n) for n in reader.names()}
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"][:999].clone()
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model.embed_tokens.weight has shape \(999, 64\).*\(1000, 64\).*vocabulary"):
        hf_to_megatron_shard(SafetensorsReader(bad).get, arch, 0, 1, 0, 1, "local")
    del tensors["model.norm.weight"]
    tensors["model.embed_tokens.weight"] = reader.get("model.embed_tokens.weight")
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(KeyError, match="'model.norm.weight' is not in the checkpoint"):
        hf_to_megatron_shard(SafetensorsReader(bad).get, arch, 0, 1, 0, 1, "local")


# ----------------------------------------------------------------------------- attention inputs


def test_attention_inputs_block_diagonal_causal_by_hand():
    position_ids, mask, packed = attention_inputs(torch.tensor([0, 2, 3]), 5, "cpu", use_te=False)
    assert packed is None
    assert position_ids.tolist() == [[0, 1, 0, 0, 1]]  # tokens 3..4 are padding: their own block
    allowed = [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 1],
    ]
    assert mask.shape == (1, 1, 5, 5) and mask.dtype == torch.bool
    assert (~mask[0, 0]).int().tolist() == allowed  # True = masked, megatron's convention


def test_attention_inputs_rejects_bad_boundaries():
    with pytest.raises(ValueError, match="start at 0"):
        attention_inputs(torch.tensor([1, 3]), 4, "cpu", use_te=False)
    with pytest.raises(ValueError, match="end at <= seq_len=4"):
        attention_inputs(torch.tensor([0, 5]), 4, "cpu", use_te=False)
    with pytest.raises(ValueError, match="use_te=True needs Transformer Engine"):
        attention_inputs(torch.tensor([0, 4]), 4, "cpu", use_te=True)


# ----------------------------------------------------------------------------- parallel config


def test_parallel_config_validation():
    with pytest.raises(ValueError, match="ParallelConfig.tensor_parallel must be a positive int"):
        ParallelConfig(tensor_parallel=0)
    with pytest.raises(ValueError, match="sequence_parallel needs tensor_parallel > 1"):
        ParallelConfig(sequence_parallel=True)
    cfg = ParallelConfig(tensor_parallel=2, pipeline_parallel=2)
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by .* = 4"):
        cfg.check_world(6, gpu=False)
    cfg.check_world(8, gpu=False)
    with pytest.raises(ValueError, match="sequence_parallel needs a GPU"):
        ParallelConfig(tensor_parallel=2, sequence_parallel=True).check_world(2, gpu=False)
    with pytest.raises(ValueError, match="context_parallel=2 needs a GPU"):
        ParallelConfig(context_parallel=2).check_world(2, gpu=False)


# ----------------------------------------------------------------------------- tool CLI


def _tool(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert_hf.py"), *argv],
        check=False, capture_output=True, text=True, timeout=120, cwd=str(REPO),
    )  # fmt: skip


def test_tool_help_documents_the_three_commands():
    out = _tool("--help")
    assert out.returncode == 0
    for word in ("import", "export", "verify", "worked example", "torchrun"):
        assert word in out.stdout


def test_tool_rejects_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    out = _tool("import", str(tmp_path), str(tmp_path / "out"))
    assert out.returncode == 2
    assert "unsupported architecture model_type='gpt2'" in out.stderr
