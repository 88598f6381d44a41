"""Benchmark the fused PEAR loss: forward+backward time and peak extra memory.

GPU (CUDA present), sizes T×V in {4096, 16384} × {32768, 151936}, bf16 by default:
    python benchmarks/bench_pear_loss.py --csv runs/bench_pear_loss_gpu.csv
compares the fused Triton kernel (fresh-gradient and in-place backward) with the vectorized eager
reference ``pear_mega.kernels.pear_torch.pear_loss_eager``, ``torch.compile`` of it, and plain
``F.cross_entropy``; it also reports the HBM floor — the logits read twice and the gradient
written once, bytes / ``--hbm-gbps`` (3350 GB/s = H100 SXM) — and the fused kernel's ratio to it.

CPU (no CUDA), smaller default sizes, fp32, about a minute on 2 cores:
    python benchmarks/bench_pear_loss.py --sizes 1024x32000,2048x49152
compares the chunked PyTorch backend with the eager reference and plain ``F.cross_entropy``
(``--compile`` adds torch.compile of the reference, which takes minutes to build on CPU). CPU peak
memory is the sampled growth of the process RSS, a rough figure.

Distillation (``--kd K``): the fused PEAR top-K KD loss (``fused_pear_kd_loss``, mode and weights
from ``--kd-mode`` / ``--kd-nll-weight``) against the eager reference ``pear_mega.kd.pear_kd_loss_eager``
(log_softmax + gather + sums) and the fused NLL path it should cost about as much as; the methods run
alternately (ABC, CBA, …) so that machine noise hits every side alike, and each method's peak extra
memory comes from a fresh subprocess (peak RSS over one step minus the RSS with the inputs built):
    python benchmarks/bench_pear_loss.py --kd 32 --sizes 2048x49152

Prints a markdown table (device in its header) and writes CSV with ``--csv``.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from pear_mega.platform import use_gpu

GPU_SIZES = "4096x32768,4096x151936,16384x32768,16384x151936"
CPU_SIZES = "1024x32000,1024x49152,2048x32000,2048x49152"


@dataclass
class Row:
    device: str
    T: int
    V: int
    dtype: str
    method: str
    fwd_bwd_ms: float
    peak_extra_mib: float
    hbm_floor_ms: float | None = None
    ratio_to_floor: float | None = None
    loss_diff_vs_eager: float | None = None
    time_vs_fused_nll: float | None = None
    extra_vs_logits: float | None = None


def _make_inputs(T: int, V: int, dtype: torch.dtype, device: str, seq_len: int = 512, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = (torch.randn(T, V, generator=gen, device=device) * 2).to(dtype)
    labels = torch.randint(0, V, (T,), generator=gen, device=device)
    labels[torch.rand(T, generator=gen, device=device) < 0.1] = -100
    beta = -torch.rand(T, generator=gen, device=device) * 10
    bounds = list(range(0, T, seq_len)) + [T]
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    return logits, labels, beta, cu


class _RssSampler:
    """Peak RSS growth of this process while active (CPU has no allocator peak counter)."""

    def __init__(self, period_s: float = 0.002):
        import psutil

        self._proc, self._period, self._stop = psutil.Process(), period_s, threading.Event()
        self.base = self.peak = self._proc.memory_info().rss

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self._period)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _measure(step, device: str, warmup: int, iters: int) -> tuple[float, float]:
    """(median fwd+bwd ms, peak extra MiB) of ``step()``."""
    cuda = device == "cuda"
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    sampler = _RssSampler() if not cuda else None
    if sampler:
        sampler.__enter__()
    try:
        for _ in range(iters):
            t0 = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
    finally:
        if sampler:
            sampler.__exit__()
    peak = (torch.cuda.max_memory_allocated() - base) if cuda else (sampler.peak - sampler.base)
    return statistics.median(times), peak / 2**20


def _methods(args, device: str):
    from pear_mega.kernels import fused_pear_loss

    from pear_mega.kernels.pear_torch import pear_loss_eager

    def fused(inplace: bool):
        backend = "triton" if device == "cuda" else "torch"
        return lambda x, y, b, cu, cfg: fused_pear_loss(
            x, y, b, cu, cfg, inplace_backward=inplace, backend=backend, check_inputs=False
        ).loss

    methods = {
        "fused" if device == "cuda" else "fused (torch chunked)": fused(False),
        "fused inplace": fused(True),
        "eager reference": pear_loss_eager,
        "F.cross_entropy (no PEAR)": lambda x, y, b, cu, cfg: F.cross_entropy(x.float(), y, ignore_index=-100),
    }
    if device == "cuda" or args.compile:
        methods["torch.compile(reference)"] = torch.compile(pear_loss_eager, dynamic=False)
    return methods


def _fwd_bwd_step(fn, x, labels, beta, cu, cfg):
    """A closure running one forward+backward of ``fn``; the last loss lands in the returned dict."""
    last = {}

    def step():
        loss = fn(x, labels, beta, cu, cfg)
        # autograd.grad, not backward(): the gradient is dropped right away (so the memory baseline
        # holds none), and an in-place gradient is not cloned by AccumulateGrad as it would be for
        # a leaf whose own storage is the gradient (in training the logits are not a leaf).
        torch.autograd.grad(loss, x)
        last["loss"] = loss.detach()

    return step, last


def bench_size(T: int, V: int, args, device: str, device_name: str) -> list[Row]:
    from pear_mega.kernels.pear_torch import pear_loss_eager
    from pear_mega.pear import PearConfig

    dtype = getattr(torch, args.dtype)
    cfg = PearConfig(level=args.level)
    logits, labels, beta, cu = _make_inputs(T, V, dtype, device)
    with torch.no_grad():
        eager_loss = pear_loss_eager(logits, labels, beta, cu, cfg).item()
    rows = []
    floor_ms = None
    if device == "cuda":
        floor_ms = 3 * T * V * logits.element_size() / (args.hbm_gbps * 1e9) * 1e3
    for name, fn in _methods(args, device).items():
        x = logits.clone().requires_grad_()
        step, last = _fwd_bwd_step(fn, x, labels, beta, cu, cfg)
        try:
            ms, mib = _measure(step, device, args.warmup, args.iters)
        except torch.OutOfMemoryError:
            print(f"  {name}: out of memory at T={T} V={V}")
            torch.cuda.empty_cache()
            continue
        finally:
            del x, step
        diff = None if "cross_entropy" in name or "inplace" in name else abs(last["loss"].item() - eager_loss)
        ratio = ms / floor_ms if floor_ms and name.startswith("fused") else None
        rows.append(Row(device_name, T, V, args.dtype, name, round(ms, 3), round(mib, 1),
                        round(floor_ms, 3) if floor_ms else None, round(ratio, 2) if ratio else None,
                        diff))  # fmt: skip
        print(f"  {name:28s} {ms:9.2f} ms  {mib:9.1f} MiB", flush=True)
    return rows


def _kd_inputs(T: int, V: int, K: int, dtype: torch.dtype, device: str, seed: int = 0):
    """Pack inputs plus the teacher top-K: ids unique per row (one per vocab bucket of V // K ids, so
    they spread over the vocabulary) and log-probs of a teacher with mass outside the top-K. The logits
    are filled in place: no [T, V] temporary raises the peak RSS before the measured step."""
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = torch.empty(T, V, dtype=dtype, device=device).normal_(0.0, 2.0, generator=gen)
    labels = torch.randint(0, V, (T,), generator=gen, device=device)
    labels[torch.rand(T, generator=gen, device=device) < 0.1] = -100
    beta = -torch.rand(T, generator=gen, device=device) * 10
    cu = torch.tensor(list(range(0, T, 512)) + [T], dtype=torch.int32, device=device)
    bucket = V // K
    ids = torch.arange(K, device=device) * bucket + torch.randint(0, bucket, (T, K), generator=gen, device=device)
    teacher = torch.randn(T, K + 8, generator=gen, device=device) * 2
    lp = torch.log_softmax(teacher, -1).sort(dim=1, descending=True).values[:, :K].contiguous()
    return logits, labels, beta, cu, ids, lp


def _kd_methods(args, device: str) -> dict:
    """name → fn(x, labels, beta, cu, ids, lp) returning the loss."""
    from pear_mega.kd import KDConfig, pear_kd_loss_eager
    from pear_mega.kernels import fused_pear_kd_loss, fused_pear_loss
    from pear_mega.pear import PearConfig

    pear, kd = PearConfig(level=args.level), KDConfig(mode=args.kd_mode, nll_weight=args.kd_nll_weight)
    backend = "triton" if device == "cuda" else "torch"

    def nll(inplace):
        return lambda x, y, b, cu, ids, lp: fused_pear_loss(
            x, y, b, cu, pear, inplace_backward=inplace, backend=backend, check_inputs=False
        ).loss

    def fused_kd(inplace):
        return lambda x, y, b, cu, ids, lp: fused_pear_kd_loss(
            x, y, b, ids, lp, cu, pear, kd, inplace_backward=inplace, backend=backend, check_inputs=False
        ).loss

    return {
        "fused NLL": nll(False),
        "fused NLL inplace": nll(True),
        "fused KD": fused_kd(False),
        "fused KD inplace": fused_kd(True),
        "eager KD reference": lambda x, y, b, cu, ids, lp: pear_kd_loss_eager(x, y, b, ids, lp, cu, pear, kd),
    }


def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _kd_memory_probe(name: str, T: int, V: int, args, device: str, out) -> None:
    """Subprocess body: the peak RSS growth (bytes) of one fwd+bwd step of one method, after a warm-up
    step (lazy library set-up is not the method's memory), sent to ``out``. Linux: the high-water
    mark VmHWM is reset through /proc/self/clear_refs right before the measured step."""
    torch.set_num_threads(args.threads)
    logits, labels, beta, cu, ids, lp = _kd_inputs(T, V, args.kd, getattr(torch, args.dtype), device)
    fn = _kd_methods(args, device)[name]
    x = logits.requires_grad_()
    torch.autograd.grad(fn(x, labels, beta, cu, ids, lp), x)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _vm_kib("VmRSS")
    torch.autograd.grad(fn(x, labels, beta, cu, ids, lp), x)
    out.put((_vm_kib("VmHWM") - base) * 1024)


def _kd_peak_extra(name: str, T: int, V: int, args, device: str) -> float:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_kd_memory_probe, args=(name, T, V, args, device, out))
    # glibc in the child maps every block >= 64 KiB on its own and unmaps it on free, so that RSS
    # follows the live tensors instead of a heap that keeps what the warm-up step freed.
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        proc.start()
    finally:
        if saved is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
    try:
        peak = out.get(timeout=600)
    finally:
        proc.join(60)
    return peak / 2**20


def bench_kd_size(T: int, V: int, args, device: str, device_name: str) -> list[Row]:
    """The ``--kd`` comparison at one size (see the module doc)."""
    dtype = getattr(torch, args.dtype)
    inputs = _kd_inputs(T, V, args.kd, dtype, device)
    logits, rest = inputs[0], inputs[1:]
    methods = _kd_methods(args, device)
    xs = {name: logits.clone().requires_grad_() for name in methods}
    losses, times = {}, {name: [] for name in methods}

    def step(name):
        loss = methods[name](xs[name], *rest)
        torch.autograd.grad(loss, xs[name])
        losses[name] = loss.detach()

    for name in methods:
        for _ in range(args.warmup):
            step(name)
    for i in range(args.iters):
        for name in methods if i % 2 == 0 else reversed(list(methods)):  # alternate which side goes first
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(name)
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t0) * 1e3)
    xs.clear()  # free the copies before the memory probes
    logits_mib = logits.numel() * logits.element_size() / 2**20
    with torch.no_grad():
        eager = methods["eager KD reference"](logits, *rest).item()
    ms = {name: statistics.median(t) for name, t in times.items()}
    rows = []
    for name in methods:
        mib = _kd_peak_extra(name, T, V, args, device) if device == "cpu" else float("nan")
        nll = ms["fused NLL inplace" if "inplace" in name else "fused NLL"]
        diff = abs(losses[name].item() - eager) if "KD" in name and "inplace" not in name else None
        rows.append(Row(device_name, T, V, args.dtype, f"{name} (K={args.kd}, {args.kd_mode})" if "KD" in name else name,
                        round(ms[name], 2), round(mib, 1), loss_diff_vs_eager=diff,
                        time_vs_fused_nll=round(ms[name] / nll, 3), extra_vs_logits=round(mib / logits_mib, 3)))  # fmt: skip
        print(f"  {name:24s} {ms[name]:9.2f} ms  ({ms[name] / nll:.2f}x fused NLL)  {mib:8.1f} MiB extra "
              f"({mib / logits_mib:.3f}x logits)", flush=True)  # fmt: skip
    return rows


def _markdown(rows: list[Row], device_name: str) -> str:
    head = f"PEAR loss fwd+bwd on {device_name} ({rows[0].dtype if rows else ''}, torch {torch.__version__})\n\n"
    kd = any(r.time_vs_fused_nll is not None for r in rows)
    cols = ["T", "V", "method", "fwd+bwd ms", "peak extra MiB", "HBM floor ms", "× floor", "|Δloss| vs eager"]
    if kd:
        cols[5:7] = ["× fused NLL time", "extra / logits"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        vals = [r.T, r.V, r.method, f"{r.fwd_bwd_ms:.2f}", f"{r.peak_extra_mib:.0f}",
                "" if r.hbm_floor_ms is None else f"{r.hbm_floor_ms:.2f}",
                "" if r.ratio_to_floor is None else f"{r.ratio_to_floor:.2f}",
                "" if r.loss_diff_vs_eager is None else f"{r.loss_diff_vs_eager:.1e}"]  # fmt: skip
        if kd:
            vals[5:7] = [f"{r.time_vs_fused_nll:.2f}", f"{r.extra_vs_logits:.3f}"]
        lines.append("| " + " | ".join(str(v) for v in vals) + " |")
    return head + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=None, help="comma-separated TxV (default depends on the device)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default bf16 GPU, fp32 CPU")
    parser.add_argument("--level", default="token", choices=["none", "token", "block", "sequence"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=None, help="timed iterations (default 10 GPU, 3 CPU)")
    parser.add_argument("--hbm-gbps", type=float, default=3350.0, help="peak HBM bandwidth (H100 SXM: 3350)")
    parser.add_argument("--compile", action="store_true", help="on CPU, also time torch.compile(reference)")
    parser.add_argument("--csv", default=None, help="write the rows to this CSV file")
    parser.add_argument("--kd", type=int, default=None, metavar="K",
                        help="benchmark the fused top-K distillation loss with K teacher ids per token")  # fmt: skip
    parser.add_argument("--kd-mode", default="topk_tail", choices=["topk_tail", "topk_renorm", "topk"])
    parser.add_argument("--kd-nll-weight", type=float, default=0.0)
    args = parser.parse_args()
    args.threads = torch.get_num_threads()

    device = "cuda" if use_gpu() else "cpu"
    device_name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    args.dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    args.iters = args.iters or (10 if device == "cuda" else 3)
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in (args.sizes or (GPU_SIZES if device == "cuda" else CPU_SIZES)).split(",")]  # fmt: skip

    rows = []
    for T, V in sizes:
        print(f"T={T} V={V} {args.dtype} on {device_name}", flush=True)
        rows += (bench_kd_size if args.kd else bench_size)(T, V, args, device, device_name)
    print()
    print(_markdown(rows, device_name))
    if args.csv:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0]).keys()) if rows else ["device"])
            writer.writeheader()
            writer.writerows(asdict(r) for r in rows)
        print(f"\nwrote {args.csv}")


if __name__ == "__main__":
    main()
