"""Shared helpers for the fused PEAR distillation loss tests: random teacher top-K, the comparison
with the reference and the tensor-parallel case runner (a plain module, so that spawned ranks import it)."""

from __future__ import annotations

import torch

from pear_kernel_helpers import DEVICE, assert_close  # isort: skip

# (atol, rtol). The kernel's per-row statistics are fp32 and its per-token algebra fp64; the
# reference is fp64 throughout. bf16: both see the same bf16 logits; the gradient is rounded to bf16.
KD_TOLERANCES = {
    torch.float32: dict(fwd=(2e-5, 1e-5), grad=(3e-7, 1e-4)),
    torch.bfloat16: dict(fwd=(1e-4, 1e-4), grad=(1e-6, 1.6e-2)),
}


def make_topk(
    T: int,
    vocab: int,
    K: int,
    *,
    seed: int = 0,
    empty_frac: float = 0.15,
    labels: torch.Tensor | None = None,
    in_topk_frac: float = 0.3,
    device: str = DEVICE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher top-K ``(ids [T, K] int64, logprobs [T, K] fp32)``: unique ids per row drawn over the
    whole vocabulary (so they spread over TP shards), a fraction of empty slots (-1, at random
    positions), row 0 with every slot empty, row 1 whose K slots hold all of the teacher's mass
    (P = 1). With ``labels``, about ``in_topk_frac`` of the loss rows get their label as a teacher id."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(vocab, generator=gen)[:K] for _ in range(T)])
    # the teacher's distribution over K + 5 candidates (mass outside the top K), sorted like a top-K
    logits = torch.randn(T, K + 5, generator=gen) * 2.0
    logprobs = torch.log_softmax(logits, -1).sort(dim=1, descending=True).values[:, :K]
    if T > 1:
        logprobs[1] = torch.log_softmax(logits[1, :K], -1)
    if labels is not None:
        labels = labels.cpu()
        pick = (labels >= 0) & (torch.rand(T, generator=gen) < in_topk_frac)
        for t in pick.nonzero().flatten().tolist():
            if int(labels[t]) not in ids[t].tolist():
                ids[t, int(torch.randint(0, K, (1,), generator=gen))] = int(labels[t])
    ids[torch.rand(T, K, generator=gen) < empty_frac] = -1
    ids[0] = -1
    if T > 1:  # full, with the teacher's whole mass
        ids[1] = torch.randperm(vocab, generator=gen)[:K]
    logprobs = torch.where(ids >= 0, logprobs, -7.0)  # arbitrary value in empty slots: ignored
    return ids.to(device), logprobs.float().to(device)


def compare_kd(out, ref, grad, ref_grad, dtype, prefix: str = "") -> None:
    tol = KD_TOLERANCES[dtype]
    for name in ("loss", "logprobs", "log_weights", "kd", "teacher_mass", "student_mass", "kd_tail"):
        assert_close(prefix + name, getattr(out, name), getattr(ref, name), *tol["fwd"])
    assert grad.dtype == ref_grad.dtype, f"{prefix}grad dtype {grad.dtype} != {ref_grad.dtype}"
    assert_close(prefix + "grad", grad, ref_grad, *tol["grad"])


def kd_tp_case(x: torch.Tensor, case: dict, tp_group, vocab_start: int, backend: str):
    """``fused_pear_kd_loss`` of ``case`` on one rank's vocab shard ``x`` (a ``run_tp`` case runner)."""
    from pear_mega.kernels import KDConfig, fused_pear_kd_loss
    from pear_mega.pear import PearConfig

    return fused_pear_kd_loss(
        x, case["labels"], case["beta"], case["ids"], case["lp"], case["cu"], PearConfig(**case["pear"]),
        KDConfig(**case["kd"]), tp_group=tp_group, vocab_start=vocab_start, vocab_size=case["vocab_size"],
        backend=backend,
    )  # fmt: skip


def aot_compile_kd(capability: int = 90) -> list[str]:
    """Compile the distillation loss's own Triton kernels for a CUDA target without a GPU (through
    ptxas), at the GPU tiles of ``pear_triton._row_blocks``. Needs TRITON_INTERPRET unset."""
    import triton
    from pear_mega.kernels import kd_triton as kt
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", capability, 32)
    done = []
    for dt in ("fp32", "bf16"):
        for block_v in (4096, 8192):
            signature = {"logits_ptr": f"*{dt}", "stride_row": "i64", "labels_ptr": "*i64", "ids_ptr": "*i64",
                         "stats_ptr": "*fp32", "xk_ptr": "*fp32", "T": "i32", "K": "i32", "n_valid": "i32",
                         "vocab_start": "i32", "BLOCK_T": "constexpr", "BLOCK_V": "constexpr"}  # fmt: skip
            source = ASTSource(kt._kd_row_stats_kernel, signature, constexprs={"BLOCK_T": 1, "BLOCK_V": block_v})
            compiled = triton.compile(source, target=target, options={"num_warps": 8})
            assert "cubin" in compiled.asm
            done.append(f"_kd_row_stats_kernel {dt} {block_v}")
        signature = {"out_ptr": f"*{dt}", "stride_out": "i64", "cols_ptr": "*i64", "vals_ptr": "*fp32", "N": "i32",
                     "S": "i32", "BLOCK": "constexpr"}  # fmt: skip
        compiled = triton.compile(ASTSource(kt._scatter_slots_kernel, signature, constexprs={"BLOCK": 1024}),
                                  target=target)  # fmt: skip
        assert "cubin" in compiled.asm
        done.append(f"_scatter_slots_kernel {dt}")
    return done
