"""Update sparsity and drift on tiny tensors whose answers are known by hand."""

import math
import os

import pytest
import torch
import torch.multiprocessing as mp
from refit_helpers import free_port  # isort: skip

from pear_mega.rl.metrics import ParamSnapshot, kl_to_initial_policy


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual).double(), torch.as_tensor(expected).double(), atol=atol, rtol=0)


def test_sparsity_and_l2_drift_over_two_steps():
    a = torch.zeros(4)
    b = torch.ones(2)
    snap = ParamSnapshot([("a", a), ("b", b)], tol=1e-6)
    # step 1: a[1] += 1e-3, b[1] += 1 → 2 of 6 changed (step and cumulative)
    a[1] = 1e-3
    b[1] = 2.0
    m = snap.update([("a", a), ("b", b)])
    close(m["update/step_changed_frac"], 2 / 6)
    close(m["update/cum_changed_frac"], 2 / 6)
    close(m["update/step_sparsity"], 4 / 6)
    # ‖θ−θ₀‖ = sqrt(1e-6 + 1) ; ‖θ₀‖ = sqrt(2)
    close(m["drift/param_l2_to_init"], math.sqrt(1.000001), atol=1e-6)
    close(m["drift/param_rel_l2_to_init"], math.sqrt(1.000001) / math.sqrt(2), atol=1e-6)
    # step 2: only a[2] changes (to 5): step 1/6, cumulative 3/6, ‖θ−θ₀‖ = sqrt(26.000001)
    a[2] = 5.0
    m = snap.update([("a", a), ("b", b)])
    close(m["update/step_changed_frac"], 1 / 6)
    close(m["update/cum_changed_frac"], 3 / 6)
    close(m["drift/param_l2_to_init"], math.sqrt(26.000001), atol=1e-6)


def test_tolerance_hides_small_changes_and_errors_are_clear():
    a = torch.zeros(4)
    snap = ParamSnapshot([("a", a)], tol=1e-2)
    a += torch.tensor([1e-3, 0.5, -0.5, 0.0])  # only |Δ| = .5 exceeds 1e-2: 2 of 4
    close(snap.update([("a", a)])["update/step_changed_frac"], 0.5)
    with pytest.raises(ValueError, match="'zzz' was not in the snapshot"):
        snap.update([("a", a), ("zzz", a)])
    with pytest.raises(ValueError, match="missing"):
        snap.update([])


def test_counted_predicate_skips_duplicates():
    snap = ParamSnapshot([("w", torch.zeros(3)), ("norm", torch.zeros(5))], counted=lambda n, p: n != "norm")
    m = snap.update([("w", torch.tensor([1.0, 0, 0])), ("norm", torch.ones(5))])
    close(m["update/step_changed_frac"], 1 / 3)


def test_kl_to_initial_policy_k3():
    # r = .25/.5 = .5 → k3 = .5 − 1 + ln 2 = .193147; second token r = 1 → 0; third masked
    logp = torch.log(torch.tensor([0.5, 0.3, 0.1]))
    logp_init = torch.log(torch.tensor([0.25, 0.3, 0.9]))
    m = kl_to_initial_policy(logp, logp_init, torch.tensor([1.0, 1.0, 0.0]))
    close(m["drift/kl_to_init_k3"], 0.193147 / 2, atol=1e-6)


def _rank_main(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=__import__("datetime").timedelta(seconds=60))
    try:
        # rank 0 holds a 4-element shard, rank 1 a 2-element shard; 1 + 2 elements change
        shard = torch.zeros(4) if rank == 0 else torch.zeros(2)
        snap = ParamSnapshot([("w", shard)])
        shard[0] = 3.0
        if rank == 1:
            shard[:] = 2.0
        m = snap.update([("w", shard)])
        results[rank] = (float(m["update/cum_changed_frac"]), float(m["drift/param_l2_to_init"]))
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_counts_are_summed_over_ranks():
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    manager = mp.Manager()
    results = manager.dict()
    mp.start_processes(_rank_main, args=(free_port(), results), nprocs=2, start_method="spawn", join=True)
    # global: 3 of 6 changed; ‖Δ‖ = sqrt(9 + 4 + 4) = sqrt(17)
    for rank in (0, 1):
        frac, l2 = results[rank]
        assert frac == pytest.approx(0.5)
        assert l2 == pytest.approx(math.sqrt(17))
