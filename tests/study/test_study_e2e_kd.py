"""A distillation arm of the tiny study end to end, through ``python -m pear_mega.study``: its own
file so that a second test worker runs it beside the two-arm study (``tests/conftest.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _study(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pear_mega.study", "--recipe", "tiny_study", f"study.out_dir={out}", *extra]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tiny_study_kd_arm_end_to_end(tmp_path):
    """A distillation arm alone, one seed: the behavior stage stores πβ's top-K with the rows (through
    the student's re-prompting), the arm's SFT trains on it with loss.kind=kd and logs its KD
    statistics, then the same evaluation / GRPO / report as any arm."""
    out = tmp_path / "study"
    k = 4
    result = subprocess.run(_study(out, "study.arms=[kd_token]", "study.seeds=[0]", "study.alignment=false",
                                   f"behavior.kd_top_k={k}"),
                            cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True,
                            timeout=850)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "distillation during SFT" in result.stdout

    rows = [json.loads(line) for line in (out / "data" / "behavior.jsonl").read_text().splitlines()]
    for row in rows:
        answer = row["messages"][-1]
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert len(answer["topk_ids"]) == len(answer["token_ids"]) and {len(ids) for ids in answer["topk_ids"]} == {k}
    assert "loss.kind=kd" in (out / "logs" / "sft__kd_token__seed0.log").read_text().splitlines()[0]

    results = json.loads((out / "report" / "results.json").read_text())
    [run] = results["runs"]
    assert (run["arm"], run["seed"]) == ("kd_token", 0) and len(run["rl_history"]) == 2
    for h in run["sft_history"]:
        assert h["kd/kl"] >= 0.0 and 0.0 < h["kd/teacher_mass"] <= 1.0 + 1e-6
        assert h["pear/ess"] < 1.0  # PEAR-weighted: πβ (2-shot) differs from πθ (0-shot)
    kl = results["summary"]["diagnostics"]["kd_token"]["sft"]["kd/kl"]
    assert kl["n"] == 1 and kl["mean"] >= 0.0
    assert "Distillation arms (loss.kind=kd)" in (out / "report" / "report.md").read_text()
