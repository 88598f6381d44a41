"""The rollout engine on rank 0 of a 2-rank gloo trainer: vLLM must neither hang on the trainer's
default process group (its group setup would be a collective rank 1 never joins) nor destroy the
trainer's groups when it shuts down."""

import datetime

import pytest
import torch
import torch.multiprocessing as mp
from refit_helpers import free_port  # isort: skip


def _rank_main(rank: int, port: int, model_dir: str, results) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=90))
    try:
        group = dist.new_group([0, 1])
        if rank == 0:
            from transformers import AutoModelForCausalLM

            from pear_mega.engine import (
                EngineConfig,
                RolloutEngine,
                hf_sequence_logprobs,
            )

            engine = RolloutEngine(EngineConfig(model=model_dir, max_model_len=128, kv_cache_gib=1 / 16))
            samples = engine.generate([[1, 502, 33]], n=2, max_tokens=3)
            hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            with torch.no_grad():
                hf.model.norm.weight.mul_(1.5)
            engine.update_weights(hf.named_parameters())
            ref = [hf_sequence_logprobs(hf, [1, 502, 33], [40, 41])]
            results["diff"] = engine.verify_refit([[1, 502, 33]], [[40, 41]], ref, tol=1e-4)
            results["samples"] = len(samples)
            results["world_seen"] = dist.get_world_size()
        t = torch.tensor([float(rank + 1)])
        dist.all_reduce(t)
        if rank == 0:
            engine.close()
        u = torch.tensor([float(rank + 1)])
        dist.all_reduce(u, group=group)  # the trainer's groups survive the engine's shutdown
        results[rank] = (t.item(), u.item())
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(240)
def test_engine_on_rank0_of_a_two_rank_trainer(tmp_path):
    from pear_mega.pretrained import tiny_model

    model_dir = str(tiny_model(tmp_path / "tiny"))
    results = mp.Manager().dict()
    mp.start_processes(_rank_main, args=(free_port(), model_dir, results), nprocs=2, start_method="spawn")
    assert results[0] == (3.0, 3.0) and results[1] == (3.0, 3.0)
    assert results["samples"] == 2 and results["world_seen"] == 2
    assert results["diff"]["max"] <= 1e-4
