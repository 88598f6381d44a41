"""``pear_mega.weight_sync.WeightSync`` on its own: a real megatron model (tiny llama, tensor parallel
over 2 gloo processes) and a real vLLM engine on rank 0, placed by an ``EngineGroup`` as the RL
trainer places it, without the trainer.

For each transport — ``collective`` (the shards gathered over the process groups) and ``auto``
(two ranks on one CPU host: host shared memory) — the trainer's weights change, then:

1. ``verify`` before the push must fail on every rank (rank 0: ``RefitVerificationError``, rank 1:
   the error named), so the check cannot pass on stale weights;
2. ``push`` loads the whole model (every HF tensor, the tied ``lm_head`` included) and returns the
   same metrics on every rank; rank 1 only drains its side of the gather;
3. ``verify`` after it agrees with the trainer's own log-probs within ``refit.tol``.
"""

import datetime

import pytest
import torch
import torch.multiprocessing as mp
from refit_helpers import free_port, perturb, probe_ids, trainer_logprobs  # isort: skip

WORLD = 2
NOISE = 0.02  # absolute, on weights of std 0.02: the probe log-probs move by far more than TOL
TOL = 1e-4  # fp32 on both sides


def _rank_main(rank: int, port: int, model_dir: str, probes, results) -> None:
    import torch.distributed as dist

    from pear_mega.engine import EngineConfig, RefitVerificationError, RolloutEngine
    from pear_mega.models import ModelArch, build_gpt_model, load_hf_checkpoint
    from pear_mega.parallel import ParallelConfig, destroy_parallel, init_parallel
    from pear_mega.rl.config import RefitConfig
    from pear_mega.rl.engine_group import EngineGroup, EnginePlacement
    from pear_mega.weight_sync import WeightSync

    torch.set_num_threads(1)  # 2 processes on 2 cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=180))
    group, syncs = None, {}
    try:
        ctx = init_parallel(ParallelConfig(tensor_parallel=2, timeout_s=180))
        arch = ModelArch.from_hf(model_dir)
        model = build_gpt_model(arch, ctx)
        load_hf_checkpoint(model, model_dir, arch, ctx)
        model.eval()
        # The trainer's order: groups and staging before the engine (vLLM makes process groups of its own).
        group = EngineGroup(ctx, EnginePlacement(WORLD), timeout_s=180)
        for transport in ("collective", "auto"):
            syncs[transport] = WeightSync(group, arch, ctx, RefitConfig(transport=transport, tol=TOL, bucket_mb=1),
                                          torch.float32, timeout_s=180, log=lambda message: None)
        group.start(lambda env: RolloutEngine(EngineConfig(model=model_dir, max_model_len=64, kv_cache_gib=1 / 32),
                                              launch_env=env))
        row = {"staged": {t: s.staging is not None for t, s in syncs.items()}}
        for seed, (transport, sync) in enumerate(syncs.items(), 1):
            perturb(model, ctx.tp_rank, seed, NOISE)
            logps = trainer_logprobs(model, ctx, arch, *probes)
            try:
                sync.verify(*probes, logps)
                row[f"{transport}/stale"] = "passed"
            except RefitVerificationError:
                row[f"{transport}/stale"] = "RefitVerificationError"
            except RuntimeError as exc:
                row[f"{transport}/stale"] = "RuntimeError: rank 0" if "rank 0 failed" in str(exc) else repr(exc)
            row[transport] = {**sync.push(model), **sync.verify(*probes, logps)}
        results[rank] = row
    finally:
        for sync in syncs.values():
            sync.close()
        if group is not None:
            group.close()
        destroy_parallel(keep_process_group=True)
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_push_and_verify_both_transports(tmp_path):
    from pear_mega.models import ModelArch, SafetensorsReader
    from pear_mega.pretrained import tiny_model

    model_dir = str(tiny_model(tmp_path / "tiny-llama"))
    arch = ModelArch.from_hf(model_dir)
    reader = SafetensorsReader(model_dir)
    hf_bytes = sum(reader.get(name).numel() * 4 for name in reader.names() if not name.endswith("rotary_emb.inv_freq"))
    if arch.tie_word_embeddings and "lm_head.weight" not in reader.names():
        hf_bytes += reader.get("model.embed_tokens.weight").numel() * 4  # sent again as lm_head.weight
    results = mp.Manager().dict()
    mp.start_processes(_rank_main, args=(free_port(), model_dir, probe_ids(model_dir), results), nprocs=WORLD,
                       start_method="spawn")
    rows = dict(results)
    assert sorted(rows) == [0, 1], rows
    assert rows[0]["staged"] == rows[1]["staged"] == {"collective": False, "auto": True}, rows
    for transport in ("collective", "auto"):
        assert rows[0][f"{transport}/stale"] == "RefitVerificationError", rows
        assert rows[1][f"{transport}/stale"] == "RuntimeError: rank 0", rows
        metrics = rows[0][transport]
        assert metrics == rows[1][transport], "push/verify return rank 0's metrics on every rank"
        assert metrics["weight_sync/bytes"] == hf_bytes, (metrics, hf_bytes)
        assert metrics["weight_sync/buckets"] >= 2 and metrics["timing/weight_sync"] > 0, metrics
        assert metrics["refit/max_abs_logp_diff"] < TOL, metrics
