"""Fixtures of the SFT trainer tests: a tiny model sharing SmolLM2's tokenizer and a small dataset."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

RUNNER = Path(__file__).with_name("sft_runner.py")


def write_behavior_dataset(path: Path, tokenizer_dir: Path, rows: int = 12, seed: int = 0) -> Path:
    """Arithmetic prompt/response rows whose behavior log-probs are deterministic pseudo-random.

    The trainer tests check mechanics (layouts, resume, guards) against themselves and the loss
    against an independent reference on the same numbers, so πβ need not be a real model here.
    """
    import random

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(rows):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            response = f"Let me add. {a} + {b} = {a + b}. Answer: {a + b}"
            ids = tok.encode(response, add_special_tokens=False) + [end]
            lps = [round(-rng.uniform(0.05, 4.0), 4) for _ in ids]
            f.write(json.dumps({"prompt": f"What is {a} + {b}?", "response": response,
                                "response_token_ids": ids, "behavior_logprobs": lps}) + "\n")
    return path


@pytest.fixture(scope="session")
def sft_assets(tmp_path_factory):
    from pear_mega.pretrained import tiny_model

    root = tmp_path_factory.mktemp("sft_assets")
    model = tiny_model(root / "tiny-llama", hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2)
    data = write_behavior_dataset(root / "behavior.jsonl", model)
    return {"model": model, "data": data}


def run_sft(tmp_path: Path, nproc: int, overrides: list[str], *extra: str, timeout: int = 240) -> dict:
    """Launch tests/sft/sft_runner.py under torchrun with ``nproc`` ranks; return its JSON result."""
    out = tmp_path / f"metrics-{os.getpid()}-{len(list(tmp_path.glob('metrics-*')))}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(RUNNER), "--out", str(out), *extra, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0 or not out.exists():
        raise AssertionError(f"sft run failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())
