"""Fast checks of the RL trainer's pure parts: config validation, recipes and overrides, packing in
the shifted layout, pack trimming, prompt files, the differentiable entropy and the value head."""

import json
import re

import pytest
import torch

from pear_mega.pear import IGNORE_INDEX
from pear_mega.rl.config import RLConfig, RolloutSettings, TaskConfig
from pear_mega.rl.experience import (
    PromptSource,
    RolloutSequence,
    build_pack,
    gather_from_pack,
    load_prompt_file,
    plan_microbatches,
    scatter_to_pack,
    trim_packs,
)
from pear_mega.rl.recipes import RECIPES


def _seq(group, prompt, response, reward=0.0, weight=1.0):
    return RolloutSequence(group, list(prompt), list(response), [-0.5] * len(response), reward, reward, weight)


def test_recipes_build_and_overrides():
    for name in RECIPES.names():
        cfg = RECIPES.build(name)
        assert isinstance(cfg, RLConfig)
        assert cfg.algorithm.grpo.group_size == cfg.rollout.n
    cfg = RECIPES.build("debug_grpo", ["rollout.n=4", "algorithm.grpo.kl_coef=0.05", "algorithm.grpo.kl_estimator=k2",
                                       'rollout.stop=["\\n"]', "algorithm.name=ppo"])
    assert cfg.algorithm.grpo.group_size == 4 and cfg.policy is cfg.algorithm.ppo
    assert cfg.algorithm.grpo.kl_estimator == "k2" and cfg.rollout.stop == ("\n",)


@pytest.mark.parametrize("override, field", [
    ("rollout.temperature=0", "rollout.temperature"),
    ("algorithm.name=dpo", "algorithm.name"),
    ("algorithm.grpo.kl_estimator=k4", "kl_estimator"),
    ("task.task_config=[1]", "task.task_config"),
    ("train.seq_length=8", "train.seq_length"),
    ("rollout.engine.max_model_len=8", "rollout.engine.max_model_len"),
    ("rollout.engine.dtype=auto", "rollout.engine.dtype"),
    ("rollout.engine.model=x", "rollout.engine.model"),
    ("refit.tol=0", "refit.tol"),
    ("rollout.engine_threads=-1", "rollout.engine_threads"),
    ("refit.transport=nccl", "refit.transport"),
    ("task.source=jsonl", "task.prompts_file"),
])
def test_invalid_overrides_name_the_field(override, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        RECIPES.build("debug_grpo", [override])


@pytest.mark.parametrize("old, new", [
    ("rollout.max_model_len=512", "rollout.engine.max_model_len"),
    ("rollout.engine_seed=3", "rollout.engine.seed"),
    ("rollout.kv_cache_gib=0.5", "rollout.engine.kv_cache_gib"),
    ("rollout.gpu_memory_utilization=0.4", "rollout.engine.gpu_memory_utilization"),
])
def test_moved_rollout_keys_name_their_new_place(old, new):
    """The engine's settings moved under rollout.engine: the old key fails, naming the new one."""
    with pytest.raises(ValueError, match=f"override {re.escape(old.split('=')[0])}: the key moved to {re.escape(new)}$"):
        RECIPES.build("debug_grpo", [old])
    value = old.split("=")[1]
    engine = RECIPES.build("debug_grpo", [f"{new}={value}"]).rollout.engine
    assert str(getattr(engine, new.rsplit(".", 1)[1])) == value


# Every field of rollout.engine set away from the RL default; the trainer fills the other three.
_ENGINE_OVERRIDES = {
    "dtype": "bfloat16", "max_model_len": "200", "kv_cache_gib": "0.5", "seed": "5", "enable_sleep_mode": "false",
    "sleep_level": "2", "max_num_seqs": "7", "enforce_eager": "false", "enable_prefix_caching": "false",
    "block_size": "64", "num_threads": "2", "tensor_parallel_size": "2", "keep_freed_memory": "false",
}
_FILLED = ("model", "gpu_memory_utilization")


def test_engine_config_is_the_nested_one_filled_in():
    """The engine each rank builds is ``rollout.engine`` with the model and the memory share (and a
    '' dtype) filled in: every other field reaches it as configured (no field-by-field copy)."""
    import dataclasses

    from pear_mega.engine import EngineConfig

    names = {f.name for f in dataclasses.fields(EngineConfig)}
    assert names == set(_ENGINE_OVERRIDES) | set(_FILLED), "a new engine field: add it to _ENGINE_OVERRIDES"
    default = RECIPES.build("debug_grpo")
    cfg = RECIPES.build("debug_grpo", [f"rollout.engine.{k}={v}" for k, v in _ENGINE_OVERRIDES.items()])
    engine = cfg.engine_config(0.42)
    assert type(engine) is EngineConfig
    for name in _ENGINE_OVERRIDES:
        assert getattr(engine, name) == getattr(cfg.rollout.engine, name) != getattr(default.rollout.engine, name), name
    assert engine.model == cfg.model.hf_path and engine.gpu_memory_utilization == 0.42
    # RL's own defaults: dtype '' = the trainer's, the share from the memory plan, freed memory kept
    assert default.rollout.engine.dtype == "" and default.engine_config(0.3).dtype == default.model.dtype
    assert default.rollout.engine.gpu_memory_utilization == 0.0 and default.rollout.engine.keep_freed_memory
    assert dataclasses.replace(engine, model="", gpu_memory_utilization=0.0) == cfg.rollout.engine


def test_trainer_starts_the_engine_of_its_config(monkeypatch):
    """``RLTrainer._start_engine`` builds ``RLConfig.engine_config`` with the planned memory share."""
    import pear_mega.engine
    from pear_mega.rl.trainer import RLTrainer

    class Started(Exception):
        pass

    seen = []

    def fake_engine(config, launch_env=None):
        seen.append(config)
        raise Started

    class Group:
        def start(self, factory):
            return factory(None)

    monkeypatch.setattr(pear_mega.engine, "RolloutEngine", fake_engine)
    trainer = object.__new__(RLTrainer)  # the start-up step alone
    trainer.cfg, trainer.engine_utilization, trainer.rollout = RECIPES.build("debug_grpo", ["rollout.engine.seed=3"]), 0.25, Group()
    with pytest.raises(Started):
        trainer._start_engine()
    assert seen == [trainer.cfg.engine_config(0.25)] and seen[0].seed == 3


def test_engine_refuses_to_start_unfilled():
    from pear_mega.engine import EngineConfig, RolloutEngine

    with pytest.raises(ValueError, match="model, dtype must be set before the engine starts"):
        RolloutEngine(EngineConfig(dtype=""))
    with pytest.raises(ValueError, match="gpu_memory_utilization must be set"):
        EngineConfig(model="m", gpu_memory_utilization=0.0).check_startable(gpu=True)
    EngineConfig(model="m", gpu_memory_utilization=0.0).check_startable(gpu=False)  # unused on CPU


def test_grpo_needs_two_samples():
    with pytest.raises(ValueError, match="rollout.n"):
        RLConfig(model=RECIPES.build("debug_grpo").model, rollout=RolloutSettings(n=1))


def test_build_pack_shifted_layout():
    seqs = [_seq(0, [5, 6, 7], [8, 9]), _seq(0, [10], [11, 12, 13])]
    pack = build_pack(seqs, [0, 1], 12, pad_id=0)
    assert pack["tokens"].tolist() == [5, 6, 7, 8, 9, 10, 11, 12, 13, 0, 0, 0]
    ign = IGNORE_INDEX
    # labels[t] = tokens[t+1] on response tokens only; last position of each sequence -100
    assert pack["labels"].tolist() == [ign, ign, 8, 9, ign, 11, 12, 13, ign, ign, ign, ign]
    assert pack["cu_seqlens"].tolist() == [0, 5, 9, 12]
    assert pack["starts"] == [2, 5] and pack["lengths"] == [2, 3]
    values = {0: torch.tensor([1.0, 2.0]), 1: torch.tensor([3.0, 4.0, 5.0])}
    per_token = scatter_to_pack(pack, values)
    assert per_token.tolist() == [0, 0, 1, 2, 0, 3, 4, 5, 0, 0, 0, 0]
    back = gather_from_pack(pack, per_token)
    assert all(torch.equal(back[i], values[i]) for i in values)
    with pytest.raises(ValueError, match="do not fit"):
        build_pack(seqs, [0, 1], 8, pad_id=0)


def test_trim_packs_cuts_to_content():
    seqs = [_seq(0, [1] * 10, [2] * 5), _seq(0, [1] * 30, [2] * 40)]
    packs = [build_pack(seqs, [0], 256, 0), build_pack(seqs, [1], 256, 0)]
    packs[0]["loss_mask"] = torch.ones(256)
    trimmed, length = trim_packs(packs, multiple=64)
    assert length == 128
    assert trimmed[0]["tokens"].shape == (128,) and trimmed[0]["loss_mask"].shape == (128,)
    assert trimmed[0]["cu_seqlens"].tolist() == [0, 15, 128]
    assert trimmed[1]["cu_seqlens"].tolist() == [0, 70, 128]
    assert torch.equal(trimmed[1]["labels"], packs[1]["labels"][:128])


def test_plan_microbatches_pads_ranks_equally_and_counts_tokens():
    # sequence i lives on DP rank i % 2: rank 0 gets three 7-token sequences (3 packs of 8),
    # rank 1 two 3-token ones (1 pack) and is padded with 2 empty packs
    seqs = [_seq(0, [1, 2], [3] * (5 if i % 2 == 0 else 1), weight=0.0 if i == 4 else 1.0) for i in range(5)]
    per_rank = [plan_microbatches(seqs, r, 2, 8, 0, minibatches=1, with_totals=True) for r in range(2)]
    packs0, packs1 = per_rank[0][0][0], per_rank[1][0][0]
    assert len(packs0) == len(packs1) == 3
    assert [p["seq_ids"] for p in packs0] == [[0], [2], [4]]
    assert [p["seq_ids"] for p in packs1] == [[1, 3], [], []]
    assert packs1[2]["num_loss_tokens"] == 0 and (packs1[2]["labels"] == IGNORE_INDEX).all()
    assert per_rank[0][1] == [5 + 1 + 5 + 1]  # sequence 4 has loss weight 0
    two = plan_microbatches(seqs, 0, 1, 8, 0, minibatches=2, shuffle_seed=(1, 2, 3))
    assert sorted(i for part in two for p in part for i in p["seq_ids"]) == [0, 1, 2, 3, 4]


def test_prompt_source_cursor_order_and_state():
    task = TaskConfig(source="synthetic", size=5, seed=3)
    a, b = PromptSource(task, None, 1000), PromptSource(task, None, 1000)
    first = a.take(7)  # crosses into the second epoch
    assert sorted(map(str, (r["prompt"] for r in first[:5]))) == sorted(map(str, (r["prompt"] for r in a.rows)))
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.take(3) == a.take(3)
    with pytest.raises(ValueError, match="num_prompts"):
        PromptSource(TaskConfig(source="synthetic", size=6, seed=3), None, 1000).load_state_dict(a.state_dict())
    rewards, _ = a.score(["", ""], [[1, 2, 600, 700], [999]], [{}, {}])
    assert rewards.tolist() == [0.5, 0.0]


def test_prompt_file_errors_name_row_and_field(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text(json.dumps({"prompt": "What is 2+2?", "answer": 4}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "1+1?"}], "answer": "2"}) + "\n")
    rows = load_prompt_file(str(good))
    assert rows[0]["target"] == {"source": "math", "answer": "4"}
    assert rows[0]["prompt"][-1] == {"role": "user", "content": "What is 2+2?"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "answer": "1"}) + "\n" + json.dumps({"prompt": "y"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl: row 1: field 'answer'"):
        load_prompt_file(str(bad))
    bad.write_text(json.dumps({"messages": [{"role": "assistant", "content": "x"}], "answer": "1"}) + "\n")
    with pytest.raises(ValueError, match=r"row 0: field 'messages'"):
        load_prompt_file(str(bad))


def test_vocab_parallel_entropy_matches_reference_and_gradient():
    from pear_mega.rl.algorithms import entropy_from_logits
    from pear_mega.rl.trainer import vocab_parallel_entropy

    z = torch.randn(5, 37, dtype=torch.float64, requires_grad=True)
    ours = vocab_parallel_entropy(z)
    ref = entropy_from_logits(z)
    assert torch.allclose(ours.double(), ref.double(), atol=1e-5)
    (g_ours,) = torch.autograd.grad(ours.sum(), z)
    (g_ref,) = torch.autograd.grad(entropy_from_logits(z).sum(), z)
    assert torch.allclose(g_ours.double(), g_ref.double(), atol=1e-5)


def test_value_head_shape_and_zero_init():
    from pear_mega.rl.critic import ValueHead

    head = ValueHead(16, torch.float32, "cpu")
    hidden = torch.randn(7, 1, 16)
    values, bias = head(hidden, weight=None, runtime_gather_output=None)
    assert values.shape == (7, 1, 1) and bias is None and torch.count_nonzero(values) == 0
    with torch.no_grad():
        head.weight.fill_(1.0)
    assert torch.allclose(head(hidden)[0][:, 0, 0], hidden[:, 0].sum(-1))


def test_engine_placement_layout():
    from pear_mega.rl.engine_group import EnginePlacement

    p = EnginePlacement(world_size=8, tensor_parallel_size=4, num_engines=2)
    assert [p.engine_of(r) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [p.worker_of(r) for r in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    p = EnginePlacement(world_size=5, tensor_parallel_size=2, num_engines=2)
    assert [p.engine_of(r) for r in range(5)] == [0, 0, 1, 1, None] and p.num_hosts == 4
    assert EnginePlacement.from_settings(64, 8, 0).num_engines == 8
    assert EnginePlacement.from_settings(4, 1, 1) == EnginePlacement(4, 1, 1)
    # 7 prompts over 3 engines: contiguous chunks of ceil(7/3) = 3, the last one short
    p = EnginePlacement(world_size=3, tensor_parallel_size=1, num_engines=3)
    assert [list(p.chunk(7, e)) for e in range(3)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert [list(p.chunk(2, e)) for e in range(3)] == [[0], [1], []]
    with pytest.raises(ValueError, match="only 4"):
        EnginePlacement(world_size=4, tensor_parallel_size=4, num_engines=2)
    with pytest.raises(ValueError, match=">= 1"):
        EnginePlacement(world_size=4, tensor_parallel_size=0, num_engines=1)
    with pytest.raises(ValueError, match="rollout.num_engines"):
        RECIPES.build("debug_grpo", ["rollout.num_engines=-1"])
    with pytest.raises(ValueError, match="rollout.engine.tensor_parallel_size"):
        RECIPES.build("debug_grpo", ["rollout.engine.tensor_parallel_size=0"])


def test_engine_threads_take_the_waiting_ranks_cores(monkeypatch):
    import os

    from pear_mega.cpu.threads import torch_threads
    from pear_mega.rl.engine_group import engine_threads_for

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # 16 cores: one engine rank on the host takes all of them, four share them
        assert engine_threads_for(1) == 16 and engine_threads_for(4) == 4
        # never fewer than the trainer's own threads (17 engine ranks on 16 cores: 1)
        assert engine_threads_for(17) == 1
        with torch_threads(3):
            assert torch.get_num_threads() == 3
        assert torch.get_num_threads() == 1
        with pytest.raises(RuntimeError), torch_threads(2):
            raise RuntimeError("engine call failed")
        assert torch.get_num_threads() == 1  # restored on errors too
        with torch_threads(None):
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
