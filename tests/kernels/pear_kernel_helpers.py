"""Shared helpers for the fused PEAR loss tests: random packs, error-reporting comparisons and the
tensor-parallel worker (a plain module, so that spawned ranks can import it by name)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, fields
from datetime import timedelta
from pathlib import Path

import torch

from pear_mega.pear import PearConfig

# Compiled Triton needs CUDA tensors; the interpreter (CPU machines) takes CPU tensors.
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1" else "cpu"

# (atol, rtol) per dtype. bf16: both sides see the same bf16 logits and accumulate in fp32, so the
# forward differs only by summation order; the gradient is rounded to bf16 (2^-8 relative).
TOLERANCES = {
    torch.float32: dict(fwd=(2e-5, 1e-5), grad=(1e-7, 1e-4)),
    torch.bfloat16: dict(fwd=(1e-4, 1e-4), grad=(1e-6, 1.6e-2)),
}


@dataclass
class Pack:
    logits: torch.Tensor  # [T, V]
    labels: torch.Tensor  # [T] int64, -100 = no loss
    beta: torch.Tensor  # [T] fp32
    cu: torch.Tensor  # [B+1] int32


def make_pack(
    seqlens: list[int],
    vocab: int,
    *,
    dtype=torch.float32,
    mask_frac: float = 0.25,
    masked_seqs: tuple[int, ...] = (),
    seed: int = 0,
    scale: float = 3.0,
    last_masked: bool = True,
    device: str = DEVICE,
) -> Pack:
    """Random packed batch. Sequences listed in ``masked_seqs`` have no loss token at all; with
    ``last_masked`` the last position of every sequence has label -100 (shifted-label layout)."""
    gen = torch.Generator().manual_seed(seed)
    T = sum(seqlens)
    logits = (torch.randn(T, vocab, generator=gen) * scale).to(dtype)
    labels = torch.randint(0, vocab, (T,), generator=gen)
    labels[torch.rand(T, generator=gen) < mask_frac] = -100
    bounds = [0]
    for n in seqlens:
        bounds.append(bounds[-1] + n)
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        if b > a and last_masked:
            labels[b - 1] = -100
        if i in masked_seqs:
            labels[a:b] = -100
    # Behavior log-probs near the target's own so that δ spans both clip bounds.
    logp = torch.log_softmax(logits.float(), -1).gather(1, labels.clamp_min(0)[:, None]).squeeze(1)
    beta = torch.where(labels != -100, logp + torch.randn(T, generator=gen) * 0.3, 0.0)
    cu = torch.tensor(bounds, dtype=torch.int32)
    return Pack(logits.to(device), labels.to(device), beta.to(device), cu.to(device))


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> None:
    """allclose with the max / mean error in the failure message."""
    got_f, want_f = got.detach().double().cpu(), want.detach().double().cpu()
    assert got_f.shape == want_f.shape, f"{name}: shape {tuple(got_f.shape)} != {tuple(want_f.shape)}"
    err = (got_f - want_f).abs()
    bound = atol + rtol * want_f.abs()
    if not bool(torch.all(err <= bound)) or not bool(torch.all(torch.isfinite(got_f) == torch.isfinite(want_f))):
        worst = int((err - bound).argmax()) if err.numel() else 0
        raise AssertionError(
            f"{name}: max err {err.max().item():.3e}, mean err {err.mean().item():.3e} "
            f"(atol {atol}, rtol {rtol}); worst flat index {worst}: got {got_f.flatten()[worst].item():.6e} "
            f"want {want_f.flatten()[worst].item():.6e}"
        )


def compare_outputs(out, ref, grad, ref_grad, dtype, prefix: str = "") -> None:
    tol = TOLERANCES[dtype]
    assert_close(prefix + "loss", out.loss, ref.loss, *tol["fwd"])
    assert_close(prefix + "logprobs", out.logprobs, ref.logprobs, *tol["fwd"])
    assert_close(prefix + "log_weights", out.log_weights, ref.log_weights, *tol["fwd"])
    assert_close(prefix + "entropy", out.entropy, ref.entropy, *tol["fwd"])
    assert grad.dtype == ref_grad.dtype, f"{prefix}grad dtype {grad.dtype} != {ref_grad.dtype}"
    assert_close(prefix + "grad", grad, ref_grad, *tol["grad"])


def pear_tp_case(x: torch.Tensor, case: dict, tp_group, vocab_start: int, backend: str):
    """``fused_pear_loss`` of ``case`` on one rank's vocab shard ``x`` (a ``run_tp`` case runner)."""
    from pear_mega.kernels import fused_pear_loss

    return fused_pear_loss(
        x, case["labels"], case["beta"], case["cu"], PearConfig(**case["config"]), tp_group=tp_group,
        vocab_start=vocab_start, vocab_size=case["vocab_size"], backend=backend,
    )  # fmt: skip


def tp_worker(rank: int, world: int, init_file: str, case_file: str, out_dir: str, run_case) -> None:
    """One tensor-parallel rank: ``run_case(x, case, tp_group, vocab_start, backend)`` on its vocab
    shard ``x`` for every case and backend; saves the loss, every per-token output and the shard
    gradient. ``run_case`` is a module-level function so that it reaches the spawned rank by name."""
    import torch.distributed as dist

    # Ranks share CPU tensors over gloo, so Triton runs under the interpreter even on a GPU machine
    # (set before pear_mega.kernels loads triton).
    os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        cases = torch.load(case_file, weights_only=False)
        results = {}
        for name, case in cases.items():
            logits, shard = case["logits"], case["logits"].shape[1] // world
            for backend in ("triton", "torch"):
                x = logits[:, rank * shard : (rank + 1) * shard].clone().requires_grad_()
                out = run_case(x, case, dist.group.WORLD, rank * shard, backend)
                out.loss.backward()
                results[(name, backend)] = {f.name: getattr(out, f.name).detach() for f in fields(out)}
                results[(name, backend)]["grad"] = x.grad.clone()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_tp(cases: dict, tmp_path: Path, timeout_s: float, run_case=pear_tp_case, world: int = 2) -> list[dict]:
    """Run ``cases`` (each with ``logits`` [T, V], split by columns) on ``world`` spawned gloo ranks
    (``tp_worker``); returns each rank's ``{(case, backend): {output: tensor, "grad": shard grad}}``."""
    import torch.multiprocessing as mp

    case_file = tmp_path / "cases.pt"
    torch.save(cases, case_file)
    ctx = mp.start_processes(
        tp_worker, args=(world, str(tmp_path / "init"), str(case_file), str(tmp_path), run_case),
        nprocs=world, join=False, start_method="spawn",
    )  # fmt: skip
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"TP ranks did not finish in {timeout_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def aot_compile_all(capability: int = 90) -> list[str]:
    """Compile every Triton kernel of the PEAR loss for a CUDA target without a GPU (ahead of time,
    through ptxas), for each constexpr variant the launchers use. Needs TRITON_INTERPRET unset."""
    import triton
    from pear_mega.kernels import pear_triton as pt
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", capability, 32)
    row = {"stride_row": "i64", "labels_ptr": "*i64", "T": "i32", "vocab_start": "i32"}
    seq = {"cu_ptr": "*i32", "labels_ptr": "*i64", "logp_ptr": "*fp32", "logpb_ptr": "*fp32",
           "count_ptr": "*i32", "total_ptr": "*fp32", "scratch_ptr": "*fp32", "delta_lo": "fp32", "delta_hi": "fp32"}
    variants = []
    for dt in ("fp32", "bf16"):
        for block_t, block_v in ((1, 4096), (1, 8192)):  # the GPU tiles of _row_blocks
            c = {"BLOCK_T": block_t, "BLOCK_V": block_v, "num_warps": 8}
            for with_temp in (False, True):  # target_temperature == 1 / != 1
                variants.append((pt._row_stats_kernel, {"logits_ptr": f"*{dt}", **row, "stats_ptr": "*fp32",
                                                        "n_valid": "i32", "inv_temp": "fp32", "BLOCK_T": "constexpr",
                                                        "BLOCK_V": "constexpr", "WITH_TEMP": "constexpr"},
                                 {**c, "WITH_TEMP": with_temp}))
            variants.append((pt._grad_kernel, {"logits_ptr": f"*{dt}", **row, "grad_ptr": f"*{dt}", "stride_grad": "i64",
                                               "logz_ptr": "*fp32", "coef_ptr": "*fp32", "V_local": "i32", "n_valid": "i32",
                                               "BLOCK_T": "constexpr", "BLOCK_V": "constexpr"}, c))
    for store in (False, True):
        variants.append((pt._seq_scan_kernel, {**seq, "STORE_RANKED": "constexpr", "BLOCK": "constexpr"},
                         {"STORE_RANKED": store, "BLOCK": 1024}))
    for level in range(4):
        variants.append((pt._log_weights_kernel, {**seq, "logw_ptr": "*fp32", "inv_count_ptr": "*fp32", "logw_lo": "fp32",
                                                  "logw_hi": "fp32", "log_gamma": "fp32", "block_size": "i32",
                                                  "LEVEL": "constexpr", "BLOCK": "constexpr"}, {"LEVEL": level, "BLOCK": 1024}))
    done = []
    for fn, signature, constexprs in variants:
        signature = {name: signature[name] for name in fn.arg_names}  # the kernel's argument order
        options = {"num_warps": constexprs.pop("num_warps")} if "num_warps" in constexprs else {}
        source = ASTSource(fn, signature, constexprs=constexprs)
        compiled = triton.compile(source, target=target, options=options)
        assert "cubin" in compiled.asm, f"{fn.__name__}: no cubin produced"
        done.append(f"{fn.__name__}{constexprs}")
    return done
