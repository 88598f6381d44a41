"""One RL step without redundant forward passes (``algorithm.logprob_recompute``,
``logging.kl_to_init_interval``).

Which passes run is decided by ``RLConfig.recomputes_old_logprobs`` / ``runs_reference_pass``
(checked here case by case). On a tiny model (real megatron, one process, no engine: a fixed batch)
the reuse path gives the recompute path's step-1 loss, metrics, gradients, log π_old and entropy
bit for bit, and the logged-only KL appears on the interval's steps and the last one only; the
same end to end with 2 ranks (DP=2) and the vLLM engine.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pear_mega.rl.algorithms import GRPOConfig, PPOConfig
from pear_mega.rl.config import AlgorithmConfig, LoggingConfig, RLConfig, TaskConfig, TrainConfig
from pear_mega.run_config import ModelConfig


def _cfg(steps=10, interval=1, kl_to_init=True, **algorithm) -> RLConfig:
    return RLConfig(model=ModelConfig(hf_path="unused"), task=TaskConfig(source="synthetic"),
                    algorithm=AlgorithmConfig(**algorithm), train=TrainConfig(steps=steps),
                    logging=LoggingConfig(kl_to_init=kl_to_init, kl_to_init_interval=interval))


def test_old_logprob_pass_skipped_only_where_redundant():
    assert not _cfg().recomputes_old_logprobs  # defaults: one update per batch, kl_coef = 0
    assert not _cfg(grpo=GRPOConfig(kl_coef=0.01, kl_mode="loss")).recomputes_old_logprobs
    assert not _cfg(grpo=GRPOConfig(entropy_coef=0.01, tis_cap=2.0)).recomputes_old_logprobs
    assert not _cfg(name="ppo").recomputes_old_logprobs  # the critic's values have their own pass
    # π_old needed before or across optimizer steps: the pass stays
    assert _cfg(logprob_recompute="always").recomputes_old_logprobs
    assert _cfg(ppo_epochs=2).recomputes_old_logprobs
    assert _cfg(minibatches=2).recomputes_old_logprobs
    assert _cfg(grpo=GRPOConfig(kl_coef=0.01, kl_mode="reward")).recomputes_old_logprobs
    assert _cfg(name="ppo", ppo=PPOConfig(kl_coef=0.01, kl_mode="reward")).recomputes_old_logprobs


def test_reference_pass_steps():
    def steps(cfg):
        return [s + 1 for s in range(cfg.train.steps) if cfg.runs_reference_pass(s)]

    assert steps(_cfg(steps=5)) == [1, 2, 3, 4, 5]
    assert steps(_cfg(steps=10, interval=4)) == [4, 8, 10]  # and the last step's final KL
    assert steps(_cfg(steps=8, interval=4)) == [4, 8]
    assert steps(_cfg(steps=3, interval=4, kl_to_init=False)) == []
    # a KL in the objective needs π_ref every step, whatever the logging interval
    assert steps(_cfg(steps=3, interval=4, grpo=GRPOConfig(kl_coef=0.01))) == [1, 2, 3]
    # the default: a logged-only KL every 10th step and the last
    default = RLConfig(model=ModelConfig(hf_path="unused"), task=TaskConfig(source="synthetic"),
                       train=TrainConfig(steps=25))
    assert steps(default) == [10, 20, 25]


def test_studies_log_the_kl_to_init_every_rl_step():
    """The studies' drift curves read the KL at every RL step, whatever the RL default."""
    from pear_mega.study.recipes import RECIPES

    for name in RECIPES.names():
        rl = RECIPES.build(name).rl
        assert rl.logging.kl_to_init and rl.logging.kl_to_init_interval == 1, name


def test_bad_values_name_the_key():
    with pytest.raises(ValueError, match="algorithm.logprob_recompute"):
        AlgorithmConfig(logprob_recompute="never")
    with pytest.raises(ValueError, match="logging.kl_to_init_interval"):
        LoggingConfig(kl_to_init_interval=0)


@pytest.mark.slow
def test_reuse_path_equals_recompute_path_in_process(rl_model, tmp_path):
    out = tmp_path / "result.json"
    cmd = [sys.executable, str(Path(__file__).with_name("logprob_reuse_local.py")), "--model", str(rl_model),
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0 and out.exists(), proc.stderr[-6000:]
    result = json.loads(out.read_text())
    assert result["recomputed"] == [1.0, 0.0]
    always, auto = result["metrics"]
    assert always["train/loss_tokens"] > 0 and always["train/pg_loss"] != 0 and result["grad_max_abs"] > 0
    # same logits, same kernel: the detached log π_old of the update's forward is the recompute pass's
    assert auto == always
    assert result["grads_equal"] and result["grad_max_abs_diff"] == 0.0
    assert result["logp_old"][1] == result["logp_old"][0] and result["entropy"][1] == result["entropy"][0]

    steps = result["steps"]
    assert steps[0]["logp_old"] == result["logp_old"][0]  # filled by the update, before its optimizer step
    assert [s["metrics"]["train/logprob_recomputed"] for s in steps] == [0.0, 0.0, 0.0]
    assert [s["metrics"]["train/step_applied"] for s in steps] == [1.0, 1.0, 1.0]
    assert steps[1]["logp_old"] != steps[0]["logp_old"]  # π_old follows the updated policy
    # logging.kl_to_init_interval=2 over 3 steps: step 2 and the last one
    assert ["drift/kl_to_init_k3" in s["metrics"] for s in steps] == [False, True, True]
    assert steps[2]["metrics"]["drift/kl_to_init_k3"] > 0
    assert all(s["metrics"]["rollout/entropy"] > 0 for s in steps)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_reuse_path_matches_recompute_path(rl_model, tmp_path):
    from tests.rl_trainer.conftest import run_rl

    overrides = [f"model.hf_path={rl_model}", "train.steps=3", "checkpoint.dir=", "logging.tensorboard_dir=",
                 "logging.progress_bar=false", "parallel.timeout_s=180", "rollout.prompts_per_step=4",
                 "logging.kl_to_init_interval=2", 'rollout.stop=["e"]']
    result = run_rl(tmp_path, 2, overrides, timeout=400, runner=Path(__file__).with_name("logprob_reuse_runner.py"))
    assert result["recomputed"] == [1.0, 0.0]
    always, auto = result["metrics"]
    assert set(always) == set(auto)
    for key in always:
        assert auto[key] == pytest.approx(always[key], rel=1e-6, abs=1e-7), key
    assert always["train/loss_tokens"] > 0 and always["train/pg_loss"] != 0
    assert result["grad_max_abs"] > 0
    assert result["grad_max_abs_diff"] <= 1e-6 * result["grad_max_abs"]
    assert len(result["logp_old"][0]) == len(result["logp_old"][1]) > 0
    assert result["logp_old"][1] == pytest.approx(result["logp_old"][0], abs=1e-6)
    assert result["entropy"][1] == pytest.approx(result["entropy"][0], abs=1e-6)
    print("gradients bit-equal:", result["grads_equal"], "max |Δgrad|:", result["grad_max_abs_diff"])

    history = result["history"]
    assert [h["train/logprob_recomputed"] for h in history] == [0.0, 0.0, 0.0]
    # interval 2 over 3 steps: the logged KL on step 2 and on the last step only
    assert ["drift/kl_to_init_k3" in h for h in history] == [False, True, True]
    assert all(math.isfinite(h["rollout/entropy"]) and h["rollout/entropy"] > 0 for h in history)
    # on-policy: the differentiable log-prob (megatron's cross entropy) vs the fused kernel's π_old
    assert all(h["train/ratio_mean"] == pytest.approx(1.0, abs=1e-5) for h in history)
