"""``tools/convert_hf.py import`` streamed one rank at a time in one process.

The streaming import builds no megatron model and no process group: for each (pp_rank, tp_rank)
the mapping table computes the rank's tensors and ``save_checkpoint_streaming`` writes them as
that rank's dist-checkpoint files. Checked against real megatron-core:

- (a) streamed TP=2 x PP=2 imports of the tiny llama / qwen3 / qwen2 models: on 4 gloo ranks,
  every rank's own ``GPTModel.sharded_state_dict(prefix="model.")`` (what megatron's save writes
  from it) equals what the streaming writer writes for that rank (keys, offsets, shapes,
  ShardedObjects, data), and ``load_checkpoint`` reads the checkpoint at TP=2 x PP=2 and at TP=1
  into the parameters of an in-memory HF -> megatron load, bit for bit (logits identical);
- (b) peak RSS of a streamed SmolLM2-135M import at TP=3 against the whole-model path.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from tests.models.launcher import REPO, rows

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


def _assert_same_checkpoint(streamed: Path, reference: Path) -> int:
    """Same keys, global shapes and dtypes, and every global tensor bit-exact (chunks may differ:
    the two may be written at different layouts); returns the number of tensors compared."""
    s_tensors, s_objects = _layout(streamed)
    r_tensors, r_objects = _layout(reference)
    assert sorted(s_tensors) == sorted(r_tensors), set(s_tensors) ^ set(r_tensors)
    assert s_objects == r_objects, set(s_objects) ^ set(r_objects)
    for key, (size, dtype, _) in r_tensors.items():
        assert s_tensors[key][:2] == (size, dtype), f"{key}: {s_tensors[key][:2]} vs {(size, dtype)}"
        a, b = _global_tensor(streamed, key, size, dtype), _global_tensor(reference, key, size, dtype)
        assert torch.equal(a, b), f"{key}: streamed tensor differs from {reference.name}"
    return len(r_tensors)


# ----------------------------------------------------------------------------- (a) TP2 x PP2


def _sharded_entries(sharded) -> tuple[dict, set]:
    """Main-replica megatron ShardedTensors by ``(key, global offset)`` and ShardedObject unique keys."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, is_main_replica

    tensors, objects = {}, set()
    for sh in sharded:
        if not is_main_replica(sh.replica_id):
            continue
        if isinstance(sh, ShardedObject):
            assert sh.data is None, sh
            objects.add(sh.unique_key)
        else:
            tensors[(sh.key, tuple(sh.global_offset))] = sh
    return tensors, objects


_FIELDS = ("global_shape", "local_shape", "axis_fragmentations", "prepend_axis_num", "allow_shape_mismatch", "dtype")


def _compare_sharded(real_sd, mine) -> dict:
    real_t, real_o = _sharded_entries(real_sd)
    mine_t, mine_o = _sharded_entries(mine)
    both = set(real_t) & set(mine_t)
    return {
        "count": len(real_t) + len(real_o),
        "only_real": sorted(map(str, set(real_t) - set(mine_t))) + sorted(real_o - mine_o),
        "only_streamed": sorted(map(str, set(mine_t) - set(real_t))) + sorted(mine_o - real_o),
        "fields_differ": sorted(str(k) for k in both if any(getattr(real_t[k], f) != getattr(mine_t[k], f) for f in _FIELDS)),
        "data_differ": sorted(str(k) for k in both if not torch.equal(real_t[k].data.detach(), mine_t[k].data)),
    }


def _check_rank(args: dict) -> dict:
    """One rank of a world of 4: per layout and model, an in-memory HF -> megatron load and a
    ``load_checkpoint`` of the streamed checkpoint, compared (parameters, logits); at the streamed
    layout also the model's own sharded state dict against ``rank_sharded_tensors`` of this rank."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import apply_factories

    from pear_mega.models import (
        ModelArch,
        SafetensorsReader,
        build_gpt_model,
        load_checkpoint,
        load_hf_checkpoint,
        model_sharded_state_dict,
        read_checkpoint_meta,
    )
    from pear_mega.models.dist_writer import rank_sharded_tensors
    from pear_mega.models.mapping import canonical_name, iter_megatron_shard
    from pear_mega.parallel import destroy_parallel
    from tests.models import scenarios

    out = []
    for tp, pp in args["layouts"]:
        ctx = scenarios._init(tp, pp)
        for hf_dir, ckpt in args["models"].items():
            arch = ModelArch.from_hf(hf_dir)
            meta = read_checkpoint_meta(ckpt)
            row = {"layout": [tp, pp], "model": Path(hf_dir).name,
                   "saved_layout": [meta.tensor_parallel, meta.pipeline_parallel]}  # fmt: skip
            in_memory = build_gpt_model(arch, ctx, padded_vocab_size=meta.padded_vocab_size)
            load_hf_checkpoint(in_memory, hf_dir, arch, ctx)
            streamed = build_gpt_model(arch, ctx, padded_vocab_size=meta.padded_vocab_size)
            load_checkpoint(streamed, ckpt, arch, ctx)
            a, b = dict(in_memory.named_parameters()), dict(streamed.named_parameters())
            row["params_differ"] = sorted(n for n in a if not torch.equal(a[n], b[n]))
            if [tp, pp] == row["saved_layout"]:
                real_sd = model_sharded_state_dict(in_memory)
                apply_factories(real_sd)
                reader = SafetensorsReader(hf_dir, mmap=False)
                shards = iter_megatron_shard(reader.get, arch, ctx.tp_rank, tp, ctx.pp_rank, pp, "te",
                                             padded_vocab_size=meta.padded_vocab_size)  # fmt: skip
                named = ((canonical_name(n, arch, ctx.pp_rank, pp), t) for n, t in shards)
                mine = rank_sharded_tensors(named, arch, ctx.tp_rank, tp, ctx.pp_rank, pp)
                row["sharded"] = _compare_sharded(nested_values(real_sd), mine)
            ref = torch.load(Path(hf_dir) / "ref.pt")
            logits_a = scenarios._probe_logits(in_memory, ctx, ref)
            logits_b = scenarios._probe_logits(streamed, ctx, ref)
            if scenarios._reporter(ctx):
                row["vs_in_memory"] = max((logits_a[k] - logits_b[k]).abs().max().item() for k in ("packed", "single"))
                row.update(scenarios._compare(logits_b, ref, arch))
            out.append(row)
            del in_memory, streamed
        destroy_parallel(keep_process_group=True)
    destroy_parallel()
    return {"rows": out}


def _rank_main(rank: int, world: int, port: int, args: dict, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(_check_rank(args)))


def _run_world(args: dict, world: int, timeout: float) -> list[dict]:
    """``_check_rank`` on ``world`` spawned gloo ranks; a failed rank or the timeout stops them all."""
    import torch.multiprocessing as mp

    from tests.models.launcher import _free_port

    out_dir = tempfile.mkdtemp(prefix="pear-streaming-")
    procs = mp.start_processes(_rank_main, args=(world, _free_port(), args, out_dir), nprocs=world, join=False,
                               start_method="spawn")  # fmt: skip
    deadline = time.monotonic() + timeout
    try:
        while not procs.join(timeout=1.0):  # raises (after stopping the others) when a rank fails
            if time.monotonic() > deadline:
                raise AssertionError(f"{world} ranks timed out after {timeout:.0f} s")
    finally:
        for proc in procs.processes:
            if proc.is_alive():
                proc.kill()
            proc.join()
    results = [json.loads((Path(out_dir) / f"rank{r}.json").read_text()) for r in range(world)]
    shutil.rmtree(out_dir, ignore_errors=True)
    return results


@pytest.fixture(scope="module")
def streamed_world(tiny_models, tmp_path_factory) -> list[dict]:
    """Streamed TP=2 x PP=2 imports of the tiny models, checked by 4 ranks at TP2 x PP2 and TP1 x DP4."""
    from pear_mega.models import convert

    root = tmp_path_factory.mktemp("streaming")
    ckpts = {
        tiny_models[fam]: str(convert.import_hf(tiny_models[fam], root / fam, tp=2, pp=2, progress=False))
        for fam in FAMILIES
    }
    return rows(_run_world({"layouts": [[2, 2], [1, 1]], "models": ckpts}, world=4, timeout=360))


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_streamed_tp2pp2_is_what_megatron_ranks_save(streamed_world):
    """On every rank of TP=2 x PP=2 the model's own ``sharded_state_dict(prefix="model.")`` (main
    replicas, after megatron's factories: what ``dist_checkpointing.save`` writes from the rank)
    equals ``rank_sharded_tensors`` of that rank: keys, offsets, shapes, ShardedObjects, data."""
    checked = [r for r in streamed_world if "sharded" in r]
    assert sorted(r["model"] for r in checked) == sorted(FAMILIES * 4)
    for row in checked:
        where = f"{row['model']} rank at tp,pp={row['layout']}"
        sharded = row["sharded"]
        assert sharded["count"] >= 4, f"{where}: {sharded}"
        assert not sharded["only_real"] and not sharded["only_streamed"], f"{where}: {sharded}"
        assert not sharded["fields_differ"] and not sharded["data_differ"], f"{where}: {sharded}"


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_streamed_tp2pp2_loads_at_tp2pp2_and_tp1_like_in_memory(streamed_world):
    """``load_checkpoint`` of the streamed checkpoint gives the parameters of an in-memory HF ->
    megatron load bit for bit, hence bit-identical logits, at TP=2 x PP=2 and at TP=1 (x DP=4)."""
    assert len(streamed_world) == 4 * 2 * len(FAMILIES)  # ranks x layouts x models
    for row in streamed_world:
        assert row["saved_layout"] == [2, 2]
        assert not row["params_differ"], f"{row['model']} at {row['layout']}: {row['params_differ']}"
    reports = [r for r in streamed_world if "vs_in_memory" in r]
    assert sorted((r["model"], tuple(r["layout"])) for r in reports) == sorted(
        (f, layout) for f in FAMILIES for layout in ((2, 2), (1, 1))
    )
    for row in reports:
        where = f"{row['model']} loaded at tp,pp={row['layout']}"
        print(where, {k: row[k] for k in ("vs_in_memory", "packed", "single")})
        assert row["vs_in_memory"] == 0.0, f"{where}: logits differ from the in-memory load by {row['vs_in_memory']:.3e}"
        assert row["packed"] <= HF_LOGIT_TOL and row["single"] <= HF_LOGIT_TOL, f"{where}: vs HF {row}"
        assert row["padded_columns_max"] == 0.0, f"{where}: padded vocab columns are not zero"


# ----------------------------------------------------------------------------- (b) peak memory

_MEASURE = """
import json, sys

def status(field):  # of this program image: /proc/self/status, in MiB
    return int(dict(line.split(":", 1) for line in open("/proc/self/status"))[field].split()[0]) / 1024

sys.path.insert(0, "tools")
import torch, megatron.core.dist_checkpointing, safetensors, convert_hf
import pear_mega.models.convert, pear_mega.models.checkpoint
baseline = status("VmRSS")  # interpreter + the import path's modules, nothing converted
hf, out, *flags = sys.argv[1:]
code = convert_hf.main(["import", hf, out, "--tp", "3", *flags])
# VmHWM, not ru_maxrss: ru_maxrss carries over through exec from the forked (large) test process.
print("PEAK " + json.dumps({"exit": code, "baseline_mib": baseline, "peak_mib": status("VmHWM")}))
"""


def _peak_rss_mib(hf_dir: str, out: Path, *flags: str) -> tuple[float, float]:
    """``(baseline, peak)`` resident set (MiB) of a fresh interpreter running one import."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", _MEASURE, hf_dir, str(out), *flags], cwd=str(REPO), env=env,
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PEAK ")]
    assert proc.returncode == 0 and lines, f"import {flags}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    result = json.loads(lines[-1][5:])
    assert result["exit"] == 0, f"import {flags}: tool exit {result['exit']}\n{proc.stderr[-3000:]}"
    return result["baseline_mib"], result["peak_mib"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_streamed_import_peak_memory_is_one_shard_not_the_model(smollm2_dir, tmp_path):
    """SmolLM2-135M (513 MiB fp32) at TP=3. Streamed, the import holds one rank's shard (1/3 of
    the model, ~171 MiB) plus at most one HF tensor (the 108 MiB embedding): under 0.6 of the
    model. The whole-model path holds the whole model. Both checkpoints hold the same tensors."""
    baseline, streamed = _peak_rss_mib(smollm2_dir, tmp_path / "streamed")
    whole_baseline, whole = _peak_rss_mib(smollm2_dir, tmp_path / "whole", "--whole-model")
    model_mib = (Path(smollm2_dir) / "model.safetensors").stat().st_size / 2**20
    print(
        f"\npeak RSS, SmolLM2-135M import at TP=3 (model {model_mib:.0f} MiB fp32): interpreter + torch/megatron "
        f"imports {baseline:.0f} MiB; streamed {streamed:.0f} MiB (+{streamed - baseline:.0f}); "
        f"whole model {whole:.0f} MiB (+{whole - whole_baseline:.0f} over its own {whole_baseline:.0f})"
    )
    assert streamed - baseline < 0.6 * model_mib, "the streamed import holds more than one shard + one tensor"
    assert streamed - baseline < 0.5 * (whole - baseline), "streaming does not save memory over the whole model"
    # Same global tensors (the whole-model path saves from one rank: chunks differ, values must not).
    assert _assert_same_checkpoint(tmp_path / "streamed", tmp_path / "whole") >= 8


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
    from pear_mega.models.dist_writer import rank_sharded_tensors

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
