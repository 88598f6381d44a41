"""Few-shot reasoning-gym prompts and the collection command line (no engine started)."""

import importlib.util
import json
from pathlib import Path

import pytest

from pear_mega.data.prompts import (
    DEMO_SEED_OFFSET,
    few_shot_messages,
    reasoning_gym_prompts,
)

ROOT = Path(__file__).resolve().parents[2]


def test_few_shot_messages_layout():
    msgs = few_shot_messages("Q?", [("a?", "1"), ("b?", "2")], system="sys")
    assert msgs == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "a?"}, {"role": "assistant", "content": "Answer: 1"},
        {"role": "user", "content": "b?"}, {"role": "assistant", "content": "Answer: 2"},
        {"role": "user", "content": "Q?"},
    ]


def test_reasoning_gym_prompts_keep_the_entry():
    import reasoning_gym

    items = reasoning_gym_prompts("basic_arithmetic", 3, seed=5, max_terms=2)
    entries = list(reasoning_gym.create_dataset("basic_arithmetic", size=3, seed=5, max_terms=2))
    demos = list(reasoning_gym.create_dataset("basic_arithmetic", size=2, seed=5 + DEMO_SEED_OFFSET, max_terms=2))
    for k, (item, entry) in enumerate(zip(items, entries)):
        assert item["messages"] == few_shot_messages(entry["question"], [(d["question"], d["answer"]) for d in demos])
        meta = item["meta"]
        assert (meta["task"], meta["index"], meta["seed"], meta["answer"]) == ("basic_arithmetic", k, 5, entry["answer"])
        assert meta["config"] == {"max_terms": 2} and json.loads(meta["metadata"]) == json.loads(json.dumps(entry["metadata"]))
    with pytest.raises(ValueError, match="size must be >= 1"):
        reasoning_gym_prompts("basic_arithmetic", 0, seed=0)


def _cli():
    spec = importlib.util.spec_from_file_location("collect_logprobs", ROOT / "tools" / "collect_logprobs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_refuses_before_starting_an_engine(tmp_path):
    cli = _cli()
    with pytest.raises(SystemExit, match="--temperature 0.5 is not supported"):
        cli.main(["score", "--model", "m", "--out", str(tmp_path / "o.jsonl"), "--data", "d.jsonl",
                  "--temperature", "0.5"])
    with pytest.raises(ValueError, match="sampling.temperature must be > 0"):
        cli.main(["generate", "--model", "m", "--out", str(tmp_path / "o.jsonl"), "--reasoning-gym",
                  "basic_arithmetic", "--temperature", "0"])
    with pytest.raises(SystemExit):  # argparse: one prompt source is required
        cli.main(["generate", "--model", "m", "--out", str(tmp_path / "o.jsonl")])
