"""The tiny study end to end, through ``python -m pear_mega.study`` as a user runs it: a
6.8M-parameter random model, 2 arms x 2 seeds, every stage a real process (vLLM collection,
megatron SFT, vLLM evaluation, colocated GRPO, alignment), killed once in the middle and continued.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _study(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pear_mega.study", "--recipe", "tiny_study", f"study.out_dir={out}", *extra]


def _manifest(out: Path) -> dict:
    path = out / "manifest.json"
    return json.loads(path.read_text())["stages"] if path.is_file() else {}


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_tiny_study_killed_then_continued_writes_the_report(tmp_path):
    out = tmp_path / "study"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Kill the study (and the stage process it runs) once the first SFT run has finished.
    proc = subprocess.Popen(_study(out), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 600
    while "sft/none/seed0" not in _manifest(out):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "the first SFT stage did not finish in 10 minutes"
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = set(_manifest(out))
    assert {"behavior", "sft/none/seed0"} <= finished

    result = subprocess.run(_study(out), cwd=REPO, env=env, capture_output=True, text=True, timeout=1100)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    for stage in finished:  # what finished before the kill is not redone
        assert any(stage in line and "skipped (done)" in line for line in lines), (stage, result.stdout)
    assert any("rl/token/seed1" in line and "done in" in line for line in lines)
    assert all("ETA" in line for line in lines if line.startswith("["))

    manifest = _manifest(out)
    assert len(manifest) == 1 + 2 * 2 * 5
    report = out / "report"
    results = json.loads((report / "results.json").read_text())
    assert [(r["arm"], r["seed"]) for r in results["runs"]] == [("none", 0), ("token", 0), ("none", 1), ("token", 1)]
    for run in results["runs"]:
        for when in ("pre", "post"):
            for suite in ("basic_arithmetic", "shifted:products"):
                evaluation = run["eval"][when][suite]
                assert evaluation["n"] == 2 and len(evaluation["correct"]) == 4
        assert len(run["sft_history"]) == 2 and len(run["rl_history"]) == 2
        if run["arm"] == "none":  # plain SFT: every weight is 1
            assert run["sft_history"][0]["pear/ess"] == pytest.approx(1.0)
        assert set(run["alignment"]["per_kind"]) and -1.0 <= run["alignment"]["overall"] <= 1.0
    token = [r for r in results["runs"] if r["arm"] == "token"]
    assert all(r["sft_history"][0]["pear/ess"] < 1.0 for r in token)  # πβ (2-shot) differs from πθ (0-shot)
    assert (report / "report.md").is_file() and (report / "pass_at_k.png").is_file()

    # The same held-out prompts for every arm and seed, each model evaluated with its seed's sampling.
    specs = {}
    for when in ("eval_pre", "eval_post"):
        for arm in ("none", "token"):
            for seed in (0, 1):
                meta = json.loads((out / "runs" / when / arm / f"seed{seed}" / "results.json").read_text())["meta"]
                specs[(when, arm, seed)] = meta
    assert len({json.dumps([m["suites"], m["size"], m["seed"]]) for m in specs.values()}) == 1
    assert {m["engine_seed"] for k, m in specs.items() if k[2] == 1} == {1}

    # Each stage's log starts with the command it ran; the behavior rows carry the student's prompt.
    assert (out / "logs" / "sft__token__seed1.log").read_text().startswith("$ ")
    row = json.loads((out / "data" / "behavior.jsonl").read_text().splitlines()[0])
    assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
    assert row["meta"]["behavior_prompt_messages"] == 5  # 2 demonstrations + the question

    # Run again: nothing to do.
    again = subprocess.run(_study(out), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    assert sum("skipped (done)" in line for line in again.stdout.splitlines()) == 21
