"""Run a study: validate, plan, run or skip each stage, write the report, print the summary."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from pear_mega.config_tools import to_dict
from pear_mega.study.config import StudyConfig, parse_arm
from pear_mega.study.stages import (
    StudyError,
    StudyPlan,
    collect_results,
    probe_summary,
    run_stages,
    study_lock,
)

# Seconds per stage kind on 2 CPU cores for SmolLM2-135M at the CPU study's sizes: the ETA until a
# stage of the kind has run (then its measured time is used).
ESTIMATES = {"behavior": 60.0, "sft": 80.0, "eval_pre": 45.0, "rl": 150.0, "eval_post": 45.0, "alignment": 10.0}


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    gpu = "no GPU"
    try:
        import torch

        from pear_mega.platform import use_gpu

        if use_gpu():
            gpu = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return f"{cpu}, {os.cpu_count()} cores{mem}, {gpu}, Python {platform.python_version()}"


def git_commit() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_study_report(plan: StudyPlan, meta: dict) -> dict[str, Path] | None:
    """results.json / report.md / PNGs in <study dir>/report from the finished runs (None: none yet)."""
    from pear_mega.study.report import write_report

    probe_path = plan.dir / "probe.json"
    probe = json.loads(probe_path.read_text()) if probe_path.is_file() else None
    results = collect_results(plan, meta, probe)
    if not results["runs"]:
        return None
    return write_report(results, plan.dir / "report")


def summary_table(plan: StudyPlan) -> str:
    """Mean pass@k over the finished seeds per arm and suite, before and after RL (no intervals:
    those are in report.md)."""
    from pear_mega.evaluation import mean_pass_at_k

    results = collect_results(plan, {})
    ks = plan.cfg.eval.ks
    head = ["arm", "seeds", "suite", *[f"pass@{k} pre→post RL" for k in ks]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in plan.cfg.study.arms:
        runs = [r for r in results["runs"] if r["arm"] == arm]
        if not runs:
            continue
        for suite in results["suites"]:
            cells = []
            for k in ks:
                pre = [mean_pass_at_k(r["eval"]["pre"][suite]["correct"], r["eval"]["pre"][suite]["n"], k) for r in runs]
                post = [mean_pass_at_k(r["eval"]["post"][suite]["correct"], r["eval"]["post"][suite]["n"], k)
                        for r in runs]
                cells.append(f"{sum(pre) / len(pre):.3f} → {sum(post) / len(post):.3f}")
            lines.append(f"| {arm} | {len(runs)} | {suite} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pear_weight_table(plan: StudyPlan) -> str:
    """PEAR weight statistics of each arm's SFT run (first seed), first and last step."""
    keys = [("pear/weight_mean", "weight mean"), ("pear/weight_min", "min"), ("pear/weight_max", "max"),
            ("pear/ess", "ESS frac"), ("pear/clip_low_frac", "at low clip"), ("pear/clip_high_frac", "at high clip"),
            ("pear/delta_clip_frac", "δ clipped"), ("train/nll", "NLL")]
    return _sft_table(plan, plan.cfg.study.arms, keys)


def kd_table(plan: StudyPlan) -> str:
    """Distillation statistics of each kd arm's SFT run (first seed), first and last step ('' without kd arms)."""
    arms = [arm for arm in plan.cfg.study.arms if parse_arm(arm).loss == "kd"]
    keys = [("kd/kl", "KL"), ("kd/kl_tail", "KL tail"), ("kd/teacher_mass", "πβ top-K mass"),
            ("kd/student_mass", "πθ mass on it"), ("kd/topk_overlap", "top-K overlap"), ("train/nll", "NLL")]
    return _sft_table(plan, arms, keys) if arms else ""


def _sft_table(plan: StudyPlan, arms, keys: list[tuple[str, str]]) -> str:
    """Markdown table of SFT metrics ``keys`` ((key, column name)) at the first and last step of each arm (first seed)."""
    seed = plan.cfg.study.seeds[0]
    lines = ["| arm | step | " + " | ".join(n for _, n in keys) + " |", "|---|---|" + "---|" * len(keys)]
    for arm in arms:
        path = plan.run_dir("sft", arm, seed) / "metrics.jsonl"
        if not path.is_file():
            continue
        hist = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for rec in (hist[0], hist[-1]):
            lines.append(f"| {arm} | {int(rec['step'])} | " + " | ".join(f"{rec.get(k, float('nan')):.3f}" for k, _ in keys)
                         + " |")
    return "\n".join(lines)


def run_study(cfg: StudyConfig, *, recipe: str, command: str, until: str | None = None,
              report_only: bool = False, print_fn=print) -> int:
    """Validate, then run the study; returns the process exit code (2: bad configuration, 1: a stage failed)."""
    try:
        cfg.validate()
    except ValueError as exc:
        print(f"bad configuration: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    plan = StudyPlan(cfg)
    meta = {"name": cfg.study.name, "recipe": recipe, "command": command, "commit": git_commit(),
            "machine": machine_description(), "config_hash": plan.config_hash(), "config": to_dict(cfg)}
    try:
        with study_lock(plan.dir):
            (plan.dir / "study.json").write_text(json.dumps(meta, indent=2))
            if not report_only:
                print_fn(f"study {cfg.study.name}: {len(cfg.study.seeds)} seed(s) x arms {', '.join(cfg.study.arms)} "
                         f"-> {plan.dir}  (logs: {plan.dir / 'logs'})")
                run_stages(plan, until=until, estimates=ESTIMATES, print_fn=print_fn,
                           live=print_fn is print and sys.stdout.isatty(),
                           on_seed_done=None if until else (lambda seed: write_study_report(plan, meta)))
            if until in ("sft", "eval_pre"):
                probe = probe_summary(plan)
                (plan.dir / "probe.json").write_text(json.dumps(probe, indent=2))
                print_fn(f"\nprobe numbers: {plan.dir / 'probe.json'}")
            paths = write_study_report(plan, meta) if until is None or report_only else None
    except StudyError as exc:
        print_fn(f"\nstudy stopped: {exc}")
        return 1
    print_fn("\nPEAR weights during SFT (seed {}):\n{}".format(cfg.study.seeds[0], pear_weight_table(plan)))
    if kd := kd_table(plan):
        print_fn(f"\ndistillation during SFT (seed {cfg.study.seeds[0]}):\n{kd}")
    if until is None or report_only:
        print_fn("\nmean pass@k over seeds, before → after the identical GRPO run:\n" + summary_table(plan))
    if paths:
        print_fn(f"\nreport: {paths.get('report.md', plan.dir / 'report' / 'report.md')} "
                 f"(plots and results.json next to it)")
    print_fn(f"total {time.perf_counter() - start:.0f} s")
    return 0
