"""Multi-rank scenarios run by ``conftest.run_ranks`` (one process per rank, gloo, CPU).

Each public function takes ``args`` with a list of ``steps`` and runs them in order in one
process group (re-splitting it between steps), so one spawn pays the start-up cost of torch +
megatron once for several checks. Results are plain JSON rows; the tests assert on them.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from pear_mega.models import (
    ModelArch,
    SafetensorsReader,
    attention_inputs,
    build_gpt_model,
    forward_logits,
    iter_hf_tensors,
    load_checkpoint,
    load_hf_checkpoint,
    model_sharded_state_dict,
    read_checkpoint_meta,
    save_checkpoint,
)
from pear_mega.parallel import ParallelConfig, destroy_parallel, init_parallel


def _init(tp: int, pp: int):
    return init_parallel(ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, timeout_s=300))


def _full_logits(model, ctx, ids, cu):
    """Gathered logits ``[s, V_pad]`` on every last-stage rank, None elsewhere."""
    position_ids, mask, packed = attention_inputs(cu, ids.shape[1], ctx.device)
    model.eval()
    with torch.no_grad():
        logits = forward_logits(model, ctx, ids, position_ids, mask, packed)
    if not ctx.is_last_stage:
        return None
    if ctx.tp_size > 1:
        parts = [torch.empty_like(logits) for _ in range(ctx.tp_size)]
        dist.all_gather(parts, logits.contiguous(), group=ctx.tp_group)
        logits = torch.cat(parts, dim=-1)
    return logits[0]


def _reporter(ctx) -> bool:
    return ctx.is_last_stage and ctx.tp_rank == 0 and ctx.dp_rank == 0


def _compare(logits, ref, arch) -> dict:
    """Max |diff| of the real vocabulary on the packed and the single-sequence probes."""
    n = int(ref["cu"][-1])
    return {
        "packed": (logits["packed"][:n, : arch.vocab_size] - ref["packed"]).abs().max().item(),
        "single": (logits["single"][:, : arch.vocab_size] - ref["single"]).abs().max().item(),
        "padded_columns_max": logits["packed"][:, arch.vocab_size :].abs().max().item()
        if logits["packed"].shape[-1] > arch.vocab_size
        else 0.0,
    }


def _probe_logits(model, ctx, ref):
    ids = ref["ids"].to(ctx.device)
    packed = _full_logits(model, ctx, ids, ref["cu"])
    single = _full_logits(model, ctx, ids, torch.tensor([0, ids.shape[1]]))
    return None if packed is None else {"packed": packed, "single": single}


def _roundtrip(model, arch, ctx, hf_dir, staging=None) -> dict | None:
    """``iter_hf_tensors`` vs the HF safetensors, bit-exact, on rank 0 (with ``staging``: on
    each of its readers)."""
    readers = [0] if staging is None else staging.readers
    reader = SafetensorsReader(hf_dir) if ctx.rank in readers else None
    seen, mismatched = [], []
    for name, tensor in iter_hf_tensors(model, arch, ctx, dst=0, staging=staging):
        seen.append(name)
        source = "model.embed_tokens.weight" if name == "lm_head.weight" and arch.tie_word_embeddings else name
        if not torch.equal(tensor.cpu(), reader.get(source)):
            mismatched.append(name)
    if ctx.rank not in readers:
        assert not seen, f"iter_hf_tensors yielded on rank {ctx.rank}, not a reader {readers}"
        return None
    expected = set(reader.names()) | {"lm_head.weight"}
    return {"mismatched": mismatched, "missing": sorted(expected - set(seen)), "extra": sorted(set(seen) - expected),
            "count": len(seen)}  # fmt: skip


def _staged_roundtrips(model, arch, ctx, hf_dir) -> list[dict]:
    """The same round trip through host shared memory (``HostStaging``): every rank writes its
    shards in place, readers rank 0 and the last rank check them; three syncs into the same
    mapping, the weights perturbed in between on the writers and restored before the last, so
    that a sync reading stale or half-written tensors fails."""
    from pear_mega.models.staging import HostStaging

    readers = sorted({0, ctx.world_size - 1})
    assert HostStaging.unavailable(arch, torch.float32, ctx, readers) is None
    staging = HostStaging.create(arch, torch.float32, ctx, readers)
    out = []
    try:
        saved = [p.detach().clone() for p in model.parameters()]
        for perturbed in (False, True, False):
            with torch.no_grad():
                for p, s in zip(model.parameters(), saved):
                    p.copy_(s + 1.0 if perturbed else s)
            rt = _roundtrip(model, arch, ctx, hf_dir, staging)
            if rt is not None:
                out.append({"rank": ctx.rank, "perturbed": perturbed, **rt})
    finally:
        staging.close()
    return out


def _step_parity(step: dict) -> list[dict]:
    """Build at ``layout``, load each HF model, compare logits with HF and tensors bit-exactly;
    optionally save a checkpoint (and the logits) for the reshard step."""
    tp, pp = step["layout"]
    ctx = _init(tp, pp)
    out = []
    for hf_dir in step["models"]:
        arch = ModelArch.from_hf(hf_dir)
        ref = torch.load(Path(hf_dir) / "ref.pt")
        model = build_gpt_model(arch, ctx)
        load_hf_checkpoint(model, hf_dir, arch, ctx)
        logits = _probe_logits(model, ctx, ref)
        row = {"layout": [tp, pp], "model": hf_dir, "family": arch.family}
        if _reporter(ctx):
            row.update(_compare(logits, ref, arch))
        if step.get("roundtrip"):
            rt = _roundtrip(model, arch, ctx, hf_dir)
            if rt is not None:
                row["roundtrip"] = rt
            staged = _staged_roundtrips(model, arch, ctx, hf_dir) if ctx.world_size > 1 else []
            if staged:
                row["staged"] = staged
        save = step.get("save", {}).get(hf_dir)
        if save:
            save_checkpoint(model, save, arch, ctx, hf_files_from=hf_dir)
            if _reporter(ctx):
                torch.save(logits, Path(save) / "probe_logits.pt")
        if len(row) > 3:
            out.append(row)
        del model
    destroy_parallel(keep_process_group=True)
    return out


def _step_reshard(step: dict) -> list[dict]:
    """Load a checkpoint written at another layout; compare logits with the saved ones and HF."""
    tp, pp = step["layout"]
    ctx = _init(tp, pp)
    meta = read_checkpoint_meta(step["ckpt"])
    arch = meta.arch
    model = build_gpt_model(arch, ctx, padded_vocab_size=meta.padded_vocab_size)
    load_checkpoint(model, step["ckpt"], arch, ctx)
    ref = torch.load(Path(step["model"]) / "ref.pt")
    logits = _probe_logits(model, ctx, ref)
    out = []
    if _reporter(ctx):
        saved = torch.load(Path(step["ckpt"]) / "probe_logits.pt")
        row = {"layout": [tp, pp], "saved_layout": [meta.tensor_parallel, meta.pipeline_parallel], "ckpt": step["ckpt"]}
        if step.get("trained"):  # trained weights: only "differs from the HF start" is known
            row["trained_vs_hf"] = _compare(logits, ref, arch)["packed"]
        else:
            row.update(_compare(logits, ref, arch))
        row["vs_saved"] = max((logits[k] - saved[k]).abs().max().item() for k in ("packed", "single"))
        out.append(row)
    destroy_parallel(keep_process_group=True)
    return out


def _train_batches(vocab: int, steps: int):
    gen = torch.Generator().manual_seed(7)
    batches = []
    for _ in range(steps):
        ids = torch.randint(0, vocab, (1, 32), generator=gen)
        cu = torch.tensor([0, 20, 32])
        labels = torch.full((1, 32), -100)
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            labels[0, a : b - 1] = ids[0, a + 1 : b]  # next token within each sequence
        batches.append((ids, cu, labels))
    return batches


def _step_train(step: dict) -> list[dict]:
    """A few steps of megatron DDP + megatron Adam with vocab_parallel_cross_entropy.

    Every data-parallel replica sees the same batch, so the averaged gradient equals the
    single-replica one and TP=1 x DP=2 is the TP=1 baseline.
    """
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    tp, pp = step["layout"]
    ctx = _init(tp, pp)
    arch = ModelArch.from_hf(step["model"])
    model = build_gpt_model(arch, ctx)
    load_hf_checkpoint(model, step["model"], arch, ctx)
    ddp = DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=False),
        module=model,
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.01, clip_grad=1.0, params_dtype=torch.float32),
        [ddp],
    )
    ddp.train()
    losses, grad_norms = [], []
    for ids, cu, labels in _train_batches(arch.vocab_size, step["steps"]):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        position_ids, mask, packed = attention_inputs(cu, ids.shape[1], ctx.device)
        logits = ddp(ids, position_ids, mask, packed_seq_params=packed)  # [1, s, V_pad / tp]
        loss_mask = (labels != -100).float()
        per_token = vocab_parallel_cross_entropy(
            logits.transpose(0, 1).contiguous(), labels.clamp(min=0).transpose(0, 1).contiguous()
        )  # [s, 1]
        loss = (per_token.transpose(0, 1) * loss_mask).sum() / loss_mask.sum()
        loss.backward()
        finalize_model_grads([ddp])
        ok, grad_norm, _ = optimizer.step()
        assert ok, "optimizer step failed"
        losses.append(loss.item())
        grad_norms.append(float(grad_norm))
    if step.get("save"):
        # A trainer-style checkpoint: model + optimizer + a common object, then the probe logits
        # of the trained model for the reshard step.
        extra = {"optimizer": optimizer.sharded_state_dict(model_sharded_state_dict(model)), "iteration": 3}
        save_checkpoint(ddp, step["save"], arch, ctx, extra=extra)
        logits = _probe_logits(model, ctx, torch.load(Path(step["model"]) / "ref.pt"))
        if _reporter(ctx):
            torch.save(logits, Path(step["save"]) / "probe_logits.pt")
    destroy_parallel(keep_process_group=True)
    if ctx.rank != 0:
        return []
    return [{"layout": [tp, pp], "losses": losses, "grad_norms": grad_norms}]


def _step_tp_error(step: dict) -> list[dict]:
    """build_gpt_model at a TP size that does not divide the heads must raise ValueError."""
    tp, pp = step["layout"]
    ctx = _init(tp, pp)
    arch = ModelArch.from_hf(step["model"])
    try:
        build_gpt_model(arch, ctx)
        message = None
    except ValueError as exc:
        message = str(exc)
    destroy_parallel(keep_process_group=True)
    return [{"layout": [tp, pp], "error": message}] if ctx.rank == 0 else []


def _step_staging_unavailable(step: dict) -> list[dict]:
    """``HostStaging.unavailable``: the reason for a missing directory, None for a writable one
    with room for the model."""
    from pear_mega.models.staging import HostStaging, staging_layout

    ctx = _init(1, 1)
    arch = ModelArch.from_hf(step["model"])
    st = os.statvfs(step["dir"])
    rows = [{
        "fits": st.f_bavail * st.f_frsize >= staging_layout(arch, torch.float32, 1)[2],
        "missing": HostStaging.unavailable(arch, torch.float32, ctx, [0], directory="/nonexistent/pear_mega"),
        "ok": HostStaging.unavailable(arch, torch.float32, ctx, [0], directory=step["dir"]),
    }]
    destroy_parallel(keep_process_group=True)
    return rows


def _step_tool(step: dict) -> list[dict]:
    """Run tools/convert_hf.py's main() in this process group; rank 0 reports the exit code."""
    import importlib.util

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("convert_hf", root / "tools" / "convert_hf.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    code = tool.main(step["argv"])
    return [{"argv": step["argv"], "exit": code}] if int(os.environ["RANK"]) == 0 else []


_STEPS = {
    "parity": _step_parity,
    "reshard": _step_reshard,
    "train": _step_train,
    "tp_error": _step_tp_error,
    "staging_unavailable": _step_staging_unavailable,
    "tool": _step_tool,
}


def run_steps(args: dict) -> dict:
    """Run ``args["steps"]`` in order; returns ``{step kind: [rows]}``."""
    out: dict[str, list] = {}
    try:
        for step in args["steps"]:
            out.setdefault(step["kind"], []).extend(_STEPS[step["kind"]](step))
    finally:
        destroy_parallel()
    return out
