"""The memory planner against a hand calculation, and recipe/override handling."""

import pytest

from pear_mega.config_tools import apply_overrides
from pear_mega.plan import Layout, Shape, main, plan_memory
from pear_mega.sft.recipes import RECIPES


def test_plan_memory_matches_hand_calculation():
    # hidden 64, ffn 128, 4 layers, 4 heads of 16, 2 KV heads, vocab 1000, untied; TP=2, PP=2, DP=2.
    shape = Shape(hidden=64, ffn=128, layers=4, heads=4, kv_heads=2, head_dim=16, vocab=1000, tied=False)
    # layer = 64*(64+2*32) + 64*64 + 3*64*128 + 2*64 = 8192 + 4096 + 24576 + 128 = 36992
    assert shape.layer_params() == 36992
    lay = Layout(tp=2, pp=2, dp=2, seq_length=32, microbatches=4, bf16=True,
                 distributed_optimizer=True, recompute=False, inplace_loss=True)
    mem = plan_memory(shape, lay, overhead_gib=0.0)
    # stage: 2 layers * 36992 / 2 = 36992; embedding shard 1000*64/2 = 32000.
    # first = 36992 + 32000 = 68992; last = 36992 + 64 + 32000 = 69056 -> worst = 69056.
    assert mem["params_per_gpu"] == 69056
    assert mem["weights"] == 69056 * 2
    assert mem["grads"] == 69056 * 4
    assert mem["optimizer"] == 69056 * 12 / 2
    # one layer, one microbatch: 2*(4*32*64 + 32*(64+64+128)/2 + 32*5*128/2) = 2*(8192+4096+10240) = 45056
    # 2 layers * 45056 * min(pp=2, mb=4)=2 -> 180224
    assert mem["activations"] == 180224
    # logits 32*1000/2*2 = 32000 (in place) + stats 32*4*6 = 768
    assert mem["loss"] == 32768
    assert mem["total"] == pytest.approx(69056 * (2 + 4 + 6) + 180224 + 32768)


def test_plan_rejects_bad_layout():
    shape = Shape(hidden=64, ffn=128, layers=4, heads=4, kv_heads=2, head_dim=16, vocab=1000, tied=True)
    with pytest.raises(ValueError, match="KV heads"):
        plan_memory(shape, Layout(tp=4, pp=1, dp=1, seq_length=8, microbatches=1))
    with pytest.raises(ValueError, match="layers"):
        plan_memory(shape, Layout(tp=1, pp=3, dp=1, seq_length=8, microbatches=1))


def test_70b_recipe_fits_on_h100_nodes(capsys):
    assert main(["--recipe", "llama3_70b_pear_sft", "--gpus", "32"]) == 0
    out = capsys.readouterr().out
    assert "FITS" in out and "70.55B" in out
    # Without pipeline parallelism the same model does not fit on one node.
    assert main(["--recipe", "llama3_70b_pear_sft", "--gpus", "8", "parallel.pipeline_parallel=1"]) == 1


def test_overrides_are_typed_and_validated():
    cfg = RECIPES.build("debug_sft", ["pear.level=block", "pear.delta_clip=-0.1,0.2", "optim.lr=3e-4",
                                      "train.steps=7", "model.use_te=none"])
    assert cfg.pear.level == "block" and cfg.pear.delta_clip == (-0.1, 0.2)
    assert cfg.optim.lr == 3e-4 and cfg.train.steps == 7 and cfg.model.use_te is None
    with pytest.raises(ValueError, match="gamma"):
        apply_overrides(cfg, ["pear.gamma=1.5"])
    with pytest.raises(ValueError, match="unknown key 'stepz'"):
        apply_overrides(cfg, ["train.stepz=3"])
    with pytest.raises(ValueError, match="not an integer"):
        apply_overrides(cfg, ["train.steps=three"])
    with pytest.raises(ValueError, match="unknown sft recipe"):
        RECIPES.build("nope")


def test_data_keys_are_the_data_pipelines_and_the_tokenizer_defaults_to_the_model():
    from pear_mega.data import DataConfig

    cfg = RECIPES.build("debug_sft", ['data.train_files=["a.jsonl","b.parquet"]', "data.seq_length=128",
                                      "data.token_check=retokenize", "data.skip_bad_rows=true", "data.seed=7"])
    assert type(cfg.data) is DataConfig
    assert cfg.data.train_files == ("a.jsonl", "b.parquet") and cfg.data.seq_length == 128
    assert cfg.data.token_check == "retokenize" and cfg.data.skip_bad_rows and cfg.data.seed == 7
    source = cfg.data_source()  # what the trainer loads
    assert source.tokenizer_path == cfg.model.hf_path and source.train_files == cfg.data.train_files
    assert apply_overrides(cfg, ["data.tokenizer_path=tok"]).data_source().tokenizer_path == "tok"
    # validation errors name the key
    with pytest.raises(ValueError, match="data.token_check must be one of"):
        apply_overrides(cfg, ["data.token_check=strict"])
    with pytest.raises(ValueError, match="data.seq_length must be >= 8"):
        apply_overrides(cfg, ["data.seq_length=4"])
    with pytest.raises(ValueError, match="data.train_files is required"):
        apply_overrides(cfg, ["data.train_files=[]"])
