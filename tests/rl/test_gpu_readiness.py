"""GPU-path decisions that a CPU can check: the engine worker's device, the refit check on
mean / p99 with a looser max, sleep level 2 refusing to wake without a refit."""

import types

import pytest
import torch

from pear_mega.rl.config import RefitConfig
from pear_mega.engine import (
    EngineConfig,
    RefitVerificationError,
    RolloutEngine,
    _uni_executor_device,
    engine_device_index,
    refit_difference_stats,
)


def test_engine_device_is_the_ranks_own():
    assert engine_device_index(1, None, current=3) == 3  # one-worker engine: this rank's device, not 0
    assert engine_device_index(4, {"LOCAL_RANK": "5"}, current=5) == 5
    with pytest.raises(ValueError, match="LOCAL_RANK=2 but this trainer rank is on cuda:5"):
        engine_device_index(4, {"LOCAL_RANK": "2"}, current=5)


@pytest.mark.slow
def test_uni_executor_takes_the_given_device():
    from vllm.v1.executor.uniproc_executor import UniProcExecutor

    fake = types.SimpleNamespace(vllm_config=types.SimpleNamespace(
        device_config=types.SimpleNamespace(device=torch.device("cuda"))))
    original = UniProcExecutor.__dict__["_distributed_args"]
    assert UniProcExecutor._distributed_args(fake)[2] == 0  # vLLM's own choice for "cuda": GPU 0
    with _uni_executor_device(3):
        init_method, rank, local_rank = UniProcExecutor._distributed_args(fake)
        assert (rank, local_rank) == (0, 3) and init_method
    assert UniProcExecutor.__dict__["_distributed_args"] is original
    with _uni_executor_device(None):  # CPU and tensor-parallel engines: untouched
        assert UniProcExecutor.__dict__["_distributed_args"] is original


def test_refit_difference_stats_by_hand():
    d = torch.tensor([0.0, 0.1, 0.2, 0.3, 4.0])
    s = refit_difference_stats(d)
    # mean 4.6 / 5; p99 at rank 0.99·4 = 3.96 between 0.3 and 4.0: 0.3 + 0.96·3.7
    assert s == pytest.approx({"mean": 0.92, "p99": 3.852, "max": 4.0})
    assert refit_difference_stats(torch.zeros(0)) == {"mean": 0.0, "p99": 0.0, "max": 0.0}


def _verify(engine_lps, trainer_lps, **kw):
    stub = types.SimpleNamespace(logprobs_of=lambda prompts, responses: engine_lps)
    return RolloutEngine.verify_refit(stub, [[1]] * len(engine_lps), [[2]] * len(engine_lps), trainer_lps, **kw)


def test_refit_check_tolerates_one_rare_token_but_not_a_broken_refit():
    trainer = [torch.zeros(150), torch.zeros(100)]
    one_rare = [torch.zeros(150), torch.zeros(100)]
    one_rare[1][7] = 0.8  # one token of 250 off by 0.8 nats: p99 stays small
    stats = _verify(one_rare, trainer, tol=0.05, max_tol=1.0)
    assert stats["max"] == pytest.approx(0.8) and stats["p99"] < 0.05
    shifted = [torch.full((150,), 0.2), torch.full((100,), 0.2)]  # every token moved: a broken refit
    with pytest.raises(RefitVerificationError, match=r"differ by up to 0.2 nats .*mean 0.2, p99 0.2"):
        _verify(shifted, trainer, tol=0.05, max_tol=1.0)
    one_rare[0][3] = 2.0  # beyond the looser max
    with pytest.raises(RefitVerificationError, match="max <= 1"):
        _verify(one_rare, trainer, tol=0.05, max_tol=1.0)
    with pytest.raises(RefitVerificationError, match="max <= 0.5"):  # default max_tol = 10·tol
        _verify(one_rare, trainer, tol=0.05)


def test_refit_max_tol_validation():
    assert RefitConfig(tol=0.1, max_tol=0.0).max_tol == 0.0
    with pytest.raises(ValueError, match="refit.max_tol"):
        RefitConfig(tol=0.1, max_tol=0.05)


def test_sleep_level_2_needs_a_refit_before_waking():
    engine = object.__new__(RolloutEngine)
    engine.config, engine.sleeping = EngineConfig(model="unused", sleep_level=2), True
    with pytest.raises(RuntimeError, match="slept at level 2 .*refit it with update_weights"):
        engine._wake_all()


def test_refit_broadcast_groups_are_shared_between_stages():
    from pear_mega.rl.engine_group import broadcast_group_ranks

    # 8 ranks, PP=4 (senders 0, 2, 4, 6), every rank hosts an engine: one set for all stages
    every = broadcast_group_ranks({0: 0, 1: 2, 2: 4, 3: 6}, list(range(8)))
    assert set(every.values()) == {tuple(range(8))} and len(every) == 4
    # engines on ranks 0-1 only: each stage's sender joins them
    two = broadcast_group_ranks({0: 0, 1: 4}, [0, 1])
    assert two == {0: (0, 1), 1: (0, 1, 4)}
