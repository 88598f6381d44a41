"""``tools/convert_hf.py import`` streamed one rank at a time in one process.

The streaming import builds no megatron model and no process group: for each (pp_rank, tp_rank)
the mapping table computes the rank's tensors and ``save_checkpoint_streaming`` writes them as
that rank's dist-checkpoint files. Checked against real megatron-core:

- (a) a streamed TP=2 x PP=2 import of the tiny llama / qwen3 / qwen2 models is the checkpoint
  that 4 gloo ranks save after an in-memory HF -> megatron load (same keys, global shapes, chunks
  and dtypes; every tensor bit-exact), and ``load_checkpoint`` reads it at TP=2 x PP=2 and at
  TP=1 with logits bit-identical to in-memory HF -> megatron loads at those layouts;
- (b) peak RSS of a streamed SmolLM2-135M import at TP=3 against the whole-model path.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.models.launcher import REPO, rows, run_ranks

FAMILIES = ("llama", "qwen3", "qwen2")
HF_LOGIT_TOL = 1e-4  # megatron vs transformers, fp32 (as in test_parallel_models)


# ----------------------------------------------------------------------------- helpers


def _layout(ckpt: Path) -> tuple[dict, list[str]]:
    """``{key: (global shape, dtype, sorted chunks)}`` of a dist checkpoint's tensors, and its
    byte-object keys, from ``.metadata``."""
    meta = pickle.loads((ckpt / ".metadata").read_bytes())
    tensors, objects = {}, []
    for key, md in meta.state_dict_metadata.items():
        if hasattr(md, "chunks"):
            chunks = sorted((tuple(c.offsets), tuple(c.sizes)) for c in md.chunks)
            tensors[key] = (tuple(md.size), md.properties.dtype, chunks)
        else:
            objects.append(key)
    return tensors, sorted(objects)


def _global_tensor(ckpt: Path, key: str, size, dtype) -> torch.Tensor:
    """One global tensor of a dist checkpoint, assembled from its chunks (no process group)."""
    import torch.distributed.checkpoint as dcp

    out = {key: torch.empty(size, dtype=dtype)}
    dcp.load(out, storage_reader=dcp.FileSystemReader(str(ckpt)), no_dist=True)
    return out[key]


def _assert_same_checkpoint(streamed: Path, reference: Path, *, same_chunks: bool = True) -> int:
    """Same keys, shapes, dtypes (and chunks), and every global tensor bit-exact; returns the count."""
    s_tensors, s_objects = _layout(streamed)
    r_tensors, r_objects = _layout(reference)
    assert sorted(s_tensors) == sorted(r_tensors), set(s_tensors) ^ set(r_tensors)
    assert s_objects == r_objects, set(s_objects) ^ set(r_objects)
    for key, (size, dtype, chunks) in r_tensors.items():
        assert s_tensors[key][:2] == (size, dtype), f"{key}: {s_tensors[key][:2]} vs {(size, dtype)}"
        if same_chunks:
            assert s_tensors[key][2] == chunks, f"{key}: chunks {s_tensors[key][2]} vs {chunks}"
        a, b = _global_tensor(streamed, key, size, dtype), _global_tensor(reference, key, size, dtype)
        assert torch.equal(a, b), f"{key}: streamed tensor differs from {reference.name}"
    return len(r_tensors)


def _view(ckpt: Path, view: Path, probe_logits: Path) -> str:
    """A directory of links to ``ckpt``'s files plus ``probe_logits.pt`` -> ``probe_logits``.

    The reshard step of ``scenarios.run_steps`` compares the logits of a loaded checkpoint with
    the ``probe_logits.pt`` beside it; the links let one streamed checkpoint be compared with the
    in-memory load of each layout (written by an earlier step of the same run).
    """
    view.mkdir()
    for item in ckpt.iterdir():
        (view / item.name).symlink_to(item)
    (view / "probe_logits.pt").symlink_to(probe_logits)
    return str(view)


# ----------------------------------------------------------------------------- (a) TP2 x PP2


@pytest.fixture(scope="module")
def streamed_world(tiny_models, tmp_path_factory) -> dict:
    from pear_mega.models import convert

    root = tmp_path_factory.mktemp("streaming")
    streamed, inmem22, inmem11, views = {}, {}, {}, {}
    for fam in FAMILIES:
        streamed[fam] = convert.import_hf(tiny_models[fam], root / f"{fam}_streamed", tp=2, pp=2, progress=False)
        inmem22[fam], inmem11[fam] = root / f"{fam}_inmem_tp2pp2", root / f"{fam}_inmem_tp1"
        views[fam] = {
            (2, 2): _view(streamed[fam], root / f"{fam}_view22", inmem22[fam] / "probe_logits.pt"),
            (1, 1): _view(streamed[fam], root / f"{fam}_view11", inmem11[fam] / "probe_logits.pt"),
        }
    models = [tiny_models[f] for f in FAMILIES]
    steps = [
        # In-memory HF -> megatron loads: logits (the references) and, at TP2 x PP2, the checkpoint
        # 4 ranks save.
        {"kind": "parity", "layout": [2, 2], "models": models, "save": {tiny_models[f]: str(inmem22[f]) for f in FAMILIES}},
        {"kind": "parity", "layout": [1, 1], "models": models, "save": {tiny_models[f]: str(inmem11[f]) for f in FAMILIES}},
    ] + [
        {"kind": "reshard", "layout": list(layout), "ckpt": views[f][layout], "model": tiny_models[f]}
        for f in FAMILIES for layout in ((2, 2), (1, 1))
    ]  # fmt: skip
    results = run_ranks("run_steps", 4, {"steps": steps}, timeout=420)
    return {"streamed": streamed, "inmem22": inmem22, "parity": rows(results, "parity"),
            "reshard": rows(results, "reshard")}  # fmt: skip


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_streamed_tp2pp2_equals_the_checkpoint_of_four_ranks(streamed_world):
    for fam in FAMILIES:
        streamed, reference = streamed_world["streamed"][fam], streamed_world["inmem22"][fam]
        count = _assert_same_checkpoint(streamed, reference)
        assert count >= 8, f"{fam}: only {count} tensors compared"  # stacked layer keys
        s_meta, r_meta = (json.loads((d / "pear_mega.json").read_text()) for d in (streamed, reference))
        assert s_meta == r_meta, f"{fam}: pear_mega.json differs"
        assert (s_meta["tensor_parallel"], s_meta["pipeline_parallel"]) == (2, 2)
        # One file set per rank, as 4 ranks write them.
        prefixes = {p.name.split("_")[2] for p in streamed.glob("__*_*.distcp")}
        assert prefixes == {"0", "1", "2", "3"}, prefixes
        assert (streamed / "hf" / "config.json").is_file() and (streamed / "metadata.json").is_file()


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_streamed_tp2pp2_loads_at_tp2pp2_and_tp1_like_in_memory(streamed_world):
    """Same weights, same layout, same forward: the logits are bit-identical to the in-memory load."""
    assert {r["family"] for r in streamed_world["parity"]} == set(FAMILIES)
    got = {(Path(r["ckpt"]).name.split("_")[0], tuple(r["layout"])) for r in streamed_world["reshard"]}
    assert got == {(f, layout) for f in FAMILIES for layout in ((2, 2), (1, 1))}, got
    for row in streamed_world["reshard"]:
        where = f"{Path(row['ckpt']).name} loaded at tp,pp={row['layout']}"
        print(where, {k: row[k] for k in ("vs_saved", "packed", "single")})
        assert row["saved_layout"] == [2, 2], where
        assert row["vs_saved"] == 0.0, f"{where}: logits differ from the in-memory load by {row['vs_saved']:.3e}"
        assert row["packed"] <= HF_LOGIT_TOL and row["single"] <= HF_LOGIT_TOL, f"{where}: vs HF {row}"
        assert row["padded_columns_max"] == 0.0, f"{where}: padded vocab columns are not zero"


# ----------------------------------------------------------------------------- (b) peak memory

_MEASURE = """
import json, resource, sys
mode, hf, out = sys.argv[1:4]
if mode == "baseline":  # what the import path imports, nothing converted
    import torch, megatron.core.dist_checkpointing, safetensors
    import pear_mega.models.convert, pear_mega.models.checkpoint
    code = 0
else:
    sys.path.insert(0, "tools")
    import convert_hf
    code = convert_hf.main(["import", hf, out, "--tp", "3"] + (["--whole-model"] if mode == "whole" else []))
usage = resource.getrusage(resource.RUSAGE_SELF)
print("PEAK " + json.dumps({"exit": code, "maxrss_mib": usage.ru_maxrss / 1024}))
"""


def _peak_rss_mib(mode: str, hf_dir: str, out: Path) -> float:
    """Peak resident set (MiB) of a fresh interpreter running one import (``ru_maxrss``)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", _MEASURE, mode, hf_dir, str(out)], cwd=str(REPO), env=env,
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PEAK ")]
    assert proc.returncode == 0 and lines, f"{mode}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    result = json.loads(lines[-1][5:])
    assert result["exit"] == 0, f"{mode}: tool exit {result['exit']}\n{proc.stderr[-3000:]}"
    return result["maxrss_mib"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_streamed_import_peak_memory_is_one_shard_not_the_model(smollm2_dir, tmp_path):
    """SmolLM2-135M (538 MB fp32) at TP=3: the streamed import holds one rank's shard (~1/3 of
    the model, here ~180 MB) plus one HF tensor (the 113 MB embedding at most); the whole-model
    path holds the model. Both checkpoints must hold the same global tensors."""
    baseline = _peak_rss_mib("baseline", smollm2_dir, tmp_path / "unused")
    streamed = _peak_rss_mib("stream", smollm2_dir, tmp_path / "streamed")
    whole = _peak_rss_mib("whole", smollm2_dir, tmp_path / "whole")
    model_mib = (Path(smollm2_dir) / "model.safetensors").stat().st_size / 2**20
    print(
        f"\npeak RSS, SmolLM2-135M import at TP=3 (model {model_mib:.0f} MiB fp32): baseline interpreter + "
        f"imports {baseline:.0f} MiB; streamed {streamed:.0f} MiB (+{streamed - baseline:.0f}); "
        f"whole model {whole:.0f} MiB (+{whole - baseline:.0f})"
    )
    assert streamed - baseline < 0.6 * model_mib, "the streamed import holds more than ~one shard + one tensor"
    assert streamed - baseline < 0.5 * (whole - baseline), "streaming does not save memory over the whole model"
    # Same global tensors (the whole-model path saves from one rank; chunks differ, values must not).
    _assert_same_checkpoint(tmp_path / "streamed", tmp_path / "whole", same_chunks=False)


# ----------------------------------------------------------------------------- in-process checks


def test_plain_reads_equal_memory_mapped_reads(tmp_path):
    """``SafetensorsReader(mmap=False)`` (header parsed here) returns what ``safe_open`` returns,
    over an index of two files and several dtypes; a truncated file is a clear error."""
    from safetensors.torch import save_file

    from pear_mega.models import SafetensorsReader

    gen = torch.Generator().manual_seed(0)
    first = {"a": torch.randn(3, 5, generator=gen), "b": torch.randn(7, generator=gen).to(torch.bfloat16)}
    second = {"c": torch.randint(-9, 9, (2, 2, 2), generator=gen), "d": torch.tensor(1.5, dtype=torch.float16),
              "e": torch.zeros(0, 4)}  # fmt: skip
    save_file(first, str(tmp_path / "part-1.safetensors"))
    save_file(second, str(tmp_path / "part-2.safetensors"))
    index = {"weight_map": {**dict.fromkeys(first, "part-1.safetensors"), **dict.fromkeys(second, "part-2.safetensors")}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    mapped, plain = SafetensorsReader(tmp_path), SafetensorsReader(tmp_path, mmap=False)
    assert sorted(plain.names()) == sorted(mapped.names()) == ["a", "b", "c", "d", "e"]
    for name in plain.names():
        got, want = plain.get(name), mapped.get(name)
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), name
    with pytest.raises(KeyError, match="'zz' is not in the checkpoint"):
        plain.get("zz")
    data = (tmp_path / "part-1.safetensors").read_bytes()
    (tmp_path / "part-1.safetensors").write_bytes(data[:-8])
    with pytest.raises(ValueError, match="part-1.safetensors: tensor .* data_offsets"):
        SafetensorsReader(tmp_path, mmap=False)


def test_streamed_bf16_tp1_pp2_holds_the_hf_tensors(tiny_models, tmp_path):
    """bfloat16 import (PP=2, tied llama): the global embedding is the HF one cast and zero-padded,
    stacked layer tensors hold every layer, the tied output copy is not written."""
    from safetensors.torch import load_file

    from pear_mega.models import ModelArch, convert

    hf_dir = Path(tiny_models["llama"])
    out = convert.import_hf(hf_dir, tmp_path / "ckpt", tp=1, pp=2, dtype="bfloat16", progress=False)
    arch = ModelArch.from_hf(hf_dir)
    hf = load_file(str(hf_dir / "model.safetensors"))
    tensors, objects = _layout(out)
    assert "model.output_layer.weight" not in tensors  # tied: megatron never saves the copy
    assert all(dtype == torch.bfloat16 for _, dtype, _ in tensors.values())
    size, dtype, chunks = tensors["model.embedding.word_embeddings.weight"]
    emb = _global_tensor(out, "model.embedding.word_embeddings.weight", size, dtype)
    assert size[0] == arch.padded_vocab_size(1) > arch.vocab_size
    assert torch.equal(emb[: arch.vocab_size], hf["model.embed_tokens.weight"].to(torch.bfloat16))
    assert not emb[arch.vocab_size :].any()
    size, dtype, chunks = tensors["model.decoder.layers.mlp.linear_fc2.weight"]
    assert size[0] == arch.num_layers and len(chunks) == arch.num_layers
    fc2 = _global_tensor(out, "model.decoder.layers.mlp.linear_fc2.weight", size, dtype)
    for layer in range(arch.num_layers):
        assert torch.equal(fc2[layer], hf[f"model.layers.{layer}.mlp.down_proj.weight"].to(torch.bfloat16)), layer
    assert len(objects) == 4 * arch.num_layers  # the linears' _extra_state, one per layer
    meta = json.loads((out / "pear_mega.json").read_text())
    assert (meta["tensor_parallel"], meta["pipeline_parallel"], meta["dtype"]) == (1, 2, "bfloat16")


def test_streaming_errors_are_clear(tiny_models, tmp_path):
    from pear_mega.models import ModelArch, convert
    from pear_mega.models.checkpoint import rank_sharded_tensors

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(FileExistsError, match="not empty"):
        convert.import_hf(tiny_models["qwen2"], tmp_path / "full", tp=2)
    arch = ModelArch.from_hf(tiny_models["qwen2"])
    norm = ("decoder.final_layernorm.weight", torch.ones(arch.hidden_size))
    with pytest.raises(ValueError, match="is not a tensor of pipeline stage 0 of 2"):
        rank_sharded_tensors([norm], arch, 0, 1, 0, 2)
    with pytest.raises(ValueError, match="stage tensors not given: .*output_layer.weight"):
        rank_sharded_tensors([norm], arch, 0, 1, 1, 2)
