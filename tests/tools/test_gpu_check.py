"""tools/gpu_check.py in its dry-run mode (CPU, Triton interpreter): every stage runs or is skipped
with a reason, the JSON and markdown reports are written, and it needs nothing beyond torch, triton,
transformers, numpy and megatron-core (and their own dependencies) on the path — no vLLM, no
Transformer Engine, no install of this repository."""

import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ALLOWED = ("torch", "triton", "transformers", "numpy", "megatron-core")


def _closure(names) -> set[str]:
    """The allowed distributions and their required (non-extra) dependencies, recursively."""
    from packaging.requirements import Requirement

    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        seen.add(key)
        for line in metadata.requires(name) or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def _minimal_site(dest: Path) -> Path:
    """A directory holding links to the top-level modules of the allowed distributions only."""
    dest.mkdir()
    for dist_name in _closure(ALLOWED):
        dist = metadata.distribution(dist_name)
        tops = {Path(str(f)).parts[0] for f in dist.files or []}
        for top in tops:
            if top.endswith((".dist-info", ".egg-info")) or top in ("..", "__pycache__") or top.startswith("."):
                continue
            src = Path(dist.locate_file(top))
            if src.exists() and not (dest / top).exists():
                (dest / top).symlink_to(src)
        (dest / f"{dist.metadata['Name']}-{dist.version}.dist-info").symlink_to(Path(dist._path))  # versions
    return dest


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_dry_run_with_only_the_allowed_packages(tmp_path):
    site = _minimal_site(tmp_path / "site")
    out = tmp_path / "report"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "TRITON"))}
    env["PYTHONPATH"] = str(site)
    # -S: no site-packages, so neither the venv's other packages nor this repository's install
    proc = subprocess.run([sys.executable, "-S", str(ROOT / "tools" / "gpu_check.py"), "--out", str(out), "--dry-run"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=560, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    status = {s["name"]: s["status"] for s in report["stages"]}
    assert status == {"environment": "passed", "kernel_compile": "skipped", "kernels_vs_reference": "passed",
                      "kernels_real_shapes": "skipped", "vocab_split": "passed", "megatron_tiny": "passed",
                      "te_spec": "skipped", "optimizer_offload": "skipped", "loss_benchmark": "skipped"}, report
    for s in report["stages"]:
        if s["status"] == "skipped":
            assert "CUDA" in s["reason"]
    env_report = report["environment"]
    assert env_report["device"] == "cpu" and env_report["vllm"] is None and env_report["transformer_engine"] is None
    assert env_report["megatron_core"] == "0.16.1"
    tiny = next(s for s in report["stages"] if s["name"] == "megatron_tiny")["details"]
    assert tiny["max_abs_logit_diff"] < 1e-3 and tiny["optimizer"]
    md = (out / "gpu_check.md").read_text()
    assert re.search(r"\| kernels_real_shapes \| skipped \| [\d.]+ \| needs a CUDA device", md)
