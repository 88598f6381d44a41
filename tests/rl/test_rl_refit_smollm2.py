"""Refit parity on the real SmolLM2-135M (9 query / 3 KV heads): a megatron trainer over gloo
(3 processes) with the vLLM engine on rank 0, the trainer's layout. One engine serves both
layouts, one after the other in the same process group:

- TP=3: the model sharded over the 3 ranks; q/k/v heads, the vocabulary and the MLP split 3 ways;
- TP=3 again, through host shared memory (``HostStaging``: every rank writes its shards in place,
  the engine reads the full tensors there), after a second perturbation;
- TP=1 (DP=3): rank 0 holds the whole model, the other replicas send nothing.

Each phase changes the trainer's weights (random noise on every parameter, seeded per shard so
replicated norms stay identical across TP ranks), refits the engine through ``iter_hf_tensors`` →
``RolloutEngine.update_weights``, and compares on short probe sequences the engine's log-probs
with the trainer's own (megatron forward, vocab-parallel cross entropy, as the RL trainer computes
them) and with transformers on the refitted HF tensors. The engine's log-probs before the refit
must differ clearly, so the check cannot pass on stale weights.
"""

import datetime

import pytest
import torch
import torch.multiprocessing as mp
from refit_helpers import free_port, perturb, probe_ids, trainer_logprobs  # isort: skip

WORLD = 3
NOISE = 5e-3  # absolute, on weights of typical magnitude 0.02-0.1: log-probs move by ~0.1-1 nat
TOL = 1e-4  # fp32 everywhere; the measured gaps (engine, trainer, transformers) are 2-4e-5


def _trainer(tp: int, seed: int, model_dir: str, probes) -> tuple:
    """Split the world at ``tp``, build the megatron model, change its weights and take the
    trainer's probe log-probs (while this split is the active one). Returns (ctx, model, logps);
    at TP=1 the replicas other than rank 0 only join the collectives (no load, no forward)."""
    from pear_mega.models import ModelArch, build_gpt_model, load_hf_checkpoint
    from pear_mega.parallel import ParallelConfig, init_parallel

    ctx = init_parallel(ParallelConfig(tensor_parallel=tp, timeout_s=180))
    arch = ModelArch.from_hf(model_dir)
    model = build_gpt_model(arch, ctx)
    logps = None
    if ctx.dp_rank == 0:
        load_hf_checkpoint(model, model_dir, arch, ctx)
        perturb(model, ctx.tp_rank, seed, NOISE)
        logps = trainer_logprobs(model, ctx, arch, *probes)
    return ctx, model, logps


def _refit_and_compare(ctx, model, trainer_logps, model_dir: str, engine, probes, staging=None) -> dict | None:
    """Refit the engine from the trainer (every rank drives its side of the gather, or writes its
    shards into ``staging``); on rank 0 compare engine, trainer and transformers log-probs."""
    from transformers import AutoModelForCausalLM

    from pear_mega.models import ModelArch, iter_hf_tensors
    from pear_mega.engine import hf_sequence_logprobs

    tensors = iter_hf_tensors(model, ModelArch.from_hf(model_dir), ctx, dst=0, staging=staging)
    result = None
    if engine is not None:
        prompts, responses = probes
        before = engine.logprobs_of(prompts, responses)
        refitted = {}

        def recorded():
            for name, tensor in tensors:
                refitted[name] = tensor.clone()
                yield name, tensor

        stats = engine.update_weights(recorded())
        after = engine.logprobs_of(prompts, responses)
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        hf.load_state_dict(refitted, strict=True)
        reference = [hf_sequence_logprobs(hf, p, r) for p, r in zip(prompts, responses)]

        def gap(xs, ys) -> float:
            return max(float((x - y).abs().max()) for x, y in zip(xs, ys))

        result = {"engine_vs_trainer": gap(after, trainer_logps), "engine_vs_hf": gap(after, reference),
                  "trainer_vs_hf": gap(trainer_logps, reference), "refit_moved": gap(after, before),
                  "tensors": stats.num_tensors, "bytes": stats.bytes}
    for _ in tensors:
        pass
    return result


def _rank_main(rank: int, port: int, model_dir: str, probes, results) -> None:
    import torch.distributed as dist

    from pear_mega.parallel import destroy_parallel

    torch.set_num_threads(1)  # 3 processes on 2 cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=180))
    from pear_mega.models import ModelArch
    from pear_mega.models.staging import HostStaging

    engine = staging = None
    try:
        # Both splits are made before the engine starts: vLLM's setup on rank 0 creates process
        # groups of its own, after which a new split of the trainer's world would hang (torch
        # names groups by a per-process counter that the other ranks did not advance).
        tp1 = _trainer(1, 2, model_dir, probes)
        destroy_parallel(keep_process_group=True)
        tp3 = _trainer(3, 1, model_dir, probes)
        ctx, model, _ = tp3
        arch = ModelArch.from_hf(model_dir)
        assert HostStaging.unavailable(arch, torch.float32, ctx, readers=[0]) is None
        staging = HostStaging.create(arch, torch.float32, ctx, readers=[0])  # before the engine, like the trainer
        if rank == 0:
            from pear_mega.engine import EngineConfig, RolloutEngine

            engine = RolloutEngine(EngineConfig(model=model_dir, max_model_len=64, kv_cache_gib=1 / 32))
        row = _refit_and_compare(*tp3, model_dir, engine, probes)
        if row is not None:
            results["tp3"] = row
        perturb(model, ctx.tp_rank, 3, NOISE)  # new weights, so that the staged refit must move the engine
        row = _refit_and_compare(ctx, model, trainer_logprobs(model, ctx, arch, *probes), model_dir, engine, probes,
                                 staging=staging)
        if row is not None:
            results["tp3_staged"] = row
        row = _refit_and_compare(*tp1, model_dir, engine, probes)  # TP=1 needs no process group of its split
        if row is not None:
            results["tp1"] = row
    finally:
        if engine is not None:
            engine.close()
        if staging is not None:
            staging.close()
        destroy_parallel(keep_process_group=True)
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_refit_parity_smollm2_tp3_staged_and_tp1():
    from pear_mega.models import ModelArch
    from pear_mega.pretrained import smollm2_135m_instruct
    from pear_mega.engine import checkpoint_tensor_names

    model_dir = str(smollm2_135m_instruct())
    arch = ModelArch.from_hf(model_dir)
    assert (arch.num_attention_heads, arch.num_kv_heads) == (9, 3)
    results = mp.Manager().dict()
    mp.start_processes(_rank_main, args=(free_port(), model_dir, probe_ids(model_dir), results), nprocs=WORLD,
                       start_method="spawn")
    names = checkpoint_tensor_names(model_dir) | {"lm_head.weight"}
    for phase in ("tp3", "tp3_staged", "tp1"):
        row = results[phase]
        print(f"{phase}: {row}")
        assert row["tensors"] == len(names)  # every weight, lm_head included, on every refit
        assert row["refit_moved"] > 100 * TOL, "the perturbation did not change the engine's log-probs"
        assert row["engine_vs_trainer"] <= TOL
        assert row["engine_vs_hf"] <= TOL
        assert row["trainer_vs_hf"] <= TOL
