"""What loading a checkpoint may run, and checkpoints that are broken or from another layer spec.

- a checkpoint whose ``.metadata`` or ``common.pt`` pickle calls a function is refused by
  ``tools/convert_hf.py export`` / ``verify`` (and every other load) before anything runs;
- a missing ``.metadata`` or a truncated shard file is a one-line error, not a traceback;
- a local-spec checkpoint loads into a model whose modules ask for ``_extra_state`` objects the
  checkpoint lacks (what TransformerEngine layers do), built here without TE;
- NaN weights are refused on import, a failed import leaves nothing behind, and an export into
  a directory of an earlier export leaves no stale weight files.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch


class _Opens:
    """Unpickling this calls ``open(path, "w")``: a stand-in for any code a crafted checkpoint runs."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def ckpt(tiny_models, tmp_path):
    from pear_mega.models import convert

    return convert.import_hf(tiny_models["llama"], tmp_path / "ckpt", progress=False)


def _export(ckpt_dir, out, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_hf", Path(__file__).parents[2] / "tools" / "convert_hf.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    rc = tool.main(["export", str(ckpt_dir), str(out)])
    return rc, capsys.readouterr().err


def test_export_refuses_an_index_pickle_that_runs_code(ckpt, tmp_path, capsys):
    marker = tmp_path / "ran"
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(_Opens(marker), f)
    rc, err = _export(ckpt, tmp_path / "hf", capsys)
    assert rc == 2 and "the pickle refers to io.open" in err and "refusing to load it" in err
    assert not marker.exists()


def test_export_refuses_a_common_pickle_that_runs_code(ckpt, tmp_path, capsys):
    marker = tmp_path / "ran"
    torch.save({"optimizer": _Opens(marker)}, ckpt / "common.pt")
    rc, err = _export(ckpt, tmp_path / "hf", capsys)
    assert rc == 2 and "common.pt: holds objects other than tensors and plain data" in err
    assert not marker.exists()


def test_pickled_objects_are_never_requested(ckpt):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from pear_mega.models.checkpoint import UnsafeCheckpointError, check_safe_to_load

    check_safe_to_load(ckpt)  # an imported checkpoint is safe
    with pytest.raises(UnsafeCheckpointError, match="requested as a pickled object"):
        check_safe_to_load(ckpt, {"rng": ShardedObject("rng_state", None, (1,), (0,))})


def test_missing_index_and_truncated_shards_are_one_line_errors(ckpt, tmp_path, capsys):
    broken = tmp_path / "truncated"
    shutil.copytree(ckpt, broken)
    shard = max(broken.glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    rc, err = _export(broken, tmp_path / "hf1", capsys)
    assert rc == 2 and f"{broken}: cannot load the checkpoint" in err and "Traceback" not in err
    (ckpt / ".metadata").unlink()
    rc, err = _export(ckpt, tmp_path / "hf2", capsys)
    assert rc == 2 and "no .metadata" in err and "Traceback" not in err


def test_local_checkpoint_loads_into_a_model_that_asks_for_extra_state(tiny_models, ckpt):
    """TE modules carry ``_extra_state`` (FP8 metadata) the local spec never writes (TE's fused
    layer-norm linears, its core attention). Give a local model's layer norm such extra state (the
    module then asks for an ``_extra_state`` object, as TE's do) and load the local checkpoint."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from pear_mega.models import ModelArch, build_gpt_model, load_checkpoint, model_sharded_state_dict
    from pear_mega.parallel import ParallelConfig, destroy_parallel, init_parallel

    arch = ModelArch.from_hf(tiny_models["llama"])
    ctx = init_parallel(ParallelConfig())
    try:
        model = build_gpt_model(arch, ctx, dtype=torch.float32, use_te=False)
        norm = model.decoder.layers[0].input_layernorm
        norm.__class__ = type("WithExtraState", (type(norm),), {"get_extra_state": lambda self: None,
                                                                 "set_extra_state": lambda self, state: None})
        asked = [k for k, v in model_sharded_state_dict(model).items()
                 if isinstance(v, ShardedObject) and "input_layernorm._extra_state" in k]
        assert asked, "the model must ask for an extra-state object the checkpoint lacks"
        load_checkpoint(model, ckpt, arch, ctx)
        from safetensors.torch import load_file

        hf = load_file(str(Path(tiny_models["llama"]) / "model.safetensors"))
        got = model.decoder.layers[0].mlp.linear_fc2.weight
        assert torch.equal(got, hf["model.layers.0.mlp.down_proj.weight"])
    finally:
        destroy_parallel()


def test_nan_weights_are_refused_on_import_and_leave_nothing_behind(tiny_models, tmp_path):
    from safetensors.torch import load_file, save_file

    from pear_mega.models import convert

    bad = tmp_path / "bad_hf"
    shutil.copytree(tiny_models["llama"], bad)
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "ckpt"
    with pytest.raises(ValueError, match=r"tensor 'model.layers.1.mlp.up_proj.weight' has 1 non-finite values"):
        convert.import_hf(bad, out, tp=1, pp=2, progress=False)
    assert not out.exists()  # a retry into the same directory starts clean
    out.mkdir()
    with pytest.raises(ValueError, match="non-finite"):
        convert.import_hf(bad, out, progress=False, streaming=False)
    assert out.is_dir() and not any(out.iterdir())
    convert.import_hf(tiny_models["llama"], out, tp=1, pp=2, progress=False)
    assert (out / "pear_mega.json").is_file()


def test_export_into_an_earlier_export_leaves_no_stale_weights(tiny_models, tmp_path):
    from safetensors.torch import load_file

    from pear_mega.models import ModelArch, SafetensorsReader, save_hf_checkpoint

    arch = ModelArch.from_hf(tiny_models["llama"])
    tensors = load_file(str(Path(tiny_models["llama"]) / "model.safetensors"))
    out = tmp_path / "hf"
    save_hf_checkpoint(iter(tensors.items()), out, arch, max_shard_bytes=64 * 1024)
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    save_hf_checkpoint(iter(tensors.items()), out, arch)
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    reader = SafetensorsReader(out)
    assert set(reader.names()) == set(tensors) - ({"lm_head.weight"} if arch.tie_word_embeddings else set())
