"""Policy-loss building blocks against hand-computed values (the arithmetic is written out)."""

import math

import pytest
import torch

from pear_mega.rl import algorithms as A


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(torch.as_tensor(actual).float(), torch.as_tensor(expected).float(), atol=atol, rtol=0)


# ---------------------------------------------------------------------------- advantages


def test_grpo_advantages_std_normalized():
    # group [1,0,0,1]: mean .5, unbiased std sqrt(4·.25/3) = .577350 → ±.5/.577350 = ±.866025
    # group [1,1,1,0]: mean .75, std sqrt((3·.0625 + .5625)/3) = .5 → .5, .5, .5, −1.5
    # group [1,1,1,1]: all equal → 0
    rewards = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1])
    adv, m = A.grpo_advantages(rewards, group_size=4)
    close(adv, [0.866025, -0.866025, -0.866025, 0.866025, 0.5, 0.5, 0.5, -1.5, 0, 0, 0, 0])
    close(m["train/reward_group_std_mean"], (0.577350 + 0.5 + 0) / 3)


def test_grpo_advantages_dr_grpo_no_std():
    rewards = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 0])
    adv, _ = A.grpo_advantages(rewards, group_size=4, normalize_std=False)
    close(adv, [0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75])


def test_grpo_advantages_bad_shape():
    with pytest.raises(ValueError, match="divisible by group_size=4"):
        A.grpo_advantages(torch.zeros(6), group_size=4)


def test_gae_hand_computed():
    # γ=.9, λ=.5, r=[0,0,1], V=[.5,.6,.7]
    # δ2 = 1 − .7 = .3                  A2 = .3
    # δ1 = .9·.7 − .6 = .03             A1 = .03 + .45·.3 = .165
    # δ0 = .9·.6 − .5 = .04             A0 = .04 + .45·.165 = .11425
    adv, ret = A.gae(torch.tensor([0.0, 0, 1]), torch.tensor([0.5, 0.6, 0.7]), torch.ones(3), 0.9, 0.5)
    close(adv, [0.11425, 0.165, 0.3])
    close(ret, [0.61425, 0.765, 1.0])
    # γ = λ = 1: A_t = (sum of future rewards) − V_t
    adv, _ = A.gae(torch.tensor([0.0, 0, 1]), torch.tensor([0.5, 0.6, 0.7]), torch.ones(3), 1.0, 1.0)
    close(adv, [0.5, 0.4, 0.3])


def test_gae_masked_positions_are_transparent():
    # a masked position (value 9, reward 5) between the tokens must not change anything; padded
    # rows give the same numbers as the unpadded episode.
    rewards = torch.tensor([[0.0, 0, 5, 0, 1], [0, 0, 0, 1, 0]])
    values = torch.tensor([[0.0, 0.5, 9, 0.6, 0.7], [0, 0.5, 0.6, 0.7, 0]])
    mask = torch.tensor([[0.0, 1, 0, 1, 1], [0, 1, 1, 1, 0]])
    adv, ret = A.gae(rewards, values, mask, 0.9, 0.5)
    close(adv, [[0, 0.11425, 0, 0.165, 0.3], [0, 0.11425, 0.165, 0.3, 0]])
    close(ret, [[0, 0.61425, 0, 0.765, 1.0], [0, 0.61425, 0.765, 1.0, 0]])


def test_gae_packed_matches_per_sequence():
    r = torch.tensor([0.0, 0, 1, 0, 1])
    v = torch.tensor([0.5, 0.6, 0.7, 0.2, 0.4])
    adv, _ = A.gae_packed(r, v, torch.ones(5), torch.tensor([0, 3, 5]), 0.9, 0.5)
    # second episode: δ1 = 1 − .4 = .6; δ0 = .9·.4 − .2 = .16, A0 = .16 + .45·.6 = .43
    close(adv, [0.11425, 0.165, 0.3, 0.43, 0.6])


def test_token_level_rewards_kl_penalty_and_last_token():
    mask = torch.tensor([[0.0, 1, 1, 0], [0, 1, 1, 1]])
    kl = torch.full((2, 4), 0.5)
    r = A.token_level_rewards(torch.tensor([2.0, 3.0]), mask, kl, kl_coef=0.1)
    close(r, [[0, -0.05, 1.95, 0], [0, -0.05, -0.05, 2.95]])


def test_kl_penalized_sequence_rewards():
    # β = .1: row 0 KL sum over mask = .1 + .2 = .3 → 1 − .03; row 1: 1.5 → 0 − .15
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 1]])
    close(A.kl_penalized_rewards(torch.tensor([1.0, 0.0]), kl, mask, 0.1), [0.97, -0.15])


# ---------------------------------------------------------------------------- losses


def _ppo_inputs():
    # ratios 1.5, .5, 1.1, .7, 5; advantages 1, 1, −1, −1, −1; ε = .2
    ratios = torch.tensor([1.5, 0.5, 1.1, 0.7, 5.0])
    logp_old = torch.tensor([-1.0, -2.0, -0.5, -3.0, -4.0])
    logp = (logp_old + ratios.log()).requires_grad_(True)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, -1.0])
    return logp, logp_old, adv


def test_ppo_clipped_surrogate():
    # per-token −min(ρA, clip(ρ)A):
    #   ρ=1.5 A=1 : −min(1.5, 1.2) = −1.2 (clipped)   ρ=.5 A=1 : −min(.5, .8) = −.5
    #   ρ=1.1 A=−1: −min(−1.1, −1.1) = 1.1             ρ=.7 A=−1: −min(−.7, −.8) = .8 (clipped)
    #   ρ=5 A=−1  : −min(−5, −1.2) = 5
    # sum = 5.2, N = 5 → 1.04
    logp, logp_old, adv = _ppo_inputs()
    loss, m = A.ppo_policy_loss(logp, logp_old, adv, torch.ones(5))
    close(loss, 1.04)
    close(m["train/pg_clip_frac"], 2 / 5)
    close(m["train/ratio_max"], 5.0)
    # ∂ℓ/∂logp = −A·ρ where unclipped, 0 where clipped: [0, −.5, 1.1, 0, 5] / 5
    loss.backward()
    close(logp.grad, [0, -0.1, 0.22, 0, 1.0])


def test_ppo_dual_clip_and_global_normalizer():
    # dual clip c=3 bounds the ρ=5, A=−1 token at −c·A = 3: sum = −1.2 −.5 + 1.1 + .8 + 3 = 3.2
    logp, logp_old, adv = _ppo_inputs()
    loss, m = A.ppo_policy_loss(logp, logp_old, adv, torch.ones(5), dual_clip=3.0, normalizer=10.0)
    close(loss, 0.32)
    close(m["train/pg_dual_clip_frac"], 1 / 5)
    loss.backward()
    close(logp.grad, [0, -0.05, 0.11, 0, 0])


def test_ppo_mask_asymmetric_clip_and_is_weights():
    logp, logp_old, adv = _ppo_inputs()
    mask = torch.tensor([1.0, 1, 1, 0, 0])
    # clip-higher ε_high=.6: ρ=1.5 is no longer clipped → −1.5; tokens 0..2: −1.5 −.5 + 1.1 = −.9
    loss, _ = A.ppo_policy_loss(logp, logp_old, adv, mask, clip_eps_high=0.6)
    close(loss, -0.9 / 3)
    # TIS weights [2, 1, .5]: 2·(−1.2) − .5 + .5·1.1 = −2.35
    w = torch.tensor([2.0, 1.0, 0.5, 1.0, 1.0])
    loss, _ = A.ppo_policy_loss(logp, logp_old, adv, mask, is_weights=w)
    close(loss, -2.35 / 3)


def test_value_loss_clipped():
    # V=1, V_old=.5 → V_clip = .7; (1−2)² = 1, (.7−2)² = 1.69 → 1.69 (clipped)
    # V=2, V_old=2, R=1 → 1
    # loss = ½·(1.69 + 1)/2 = .6725; unclipped: ½·(1 + 1)/2 = .5
    v = torch.tensor([1.0, 2.0], requires_grad=True)
    args = (torch.tensor([0.5, 2.0]), torch.tensor([2.0, 1.0]), torch.ones(2))
    loss, m = A.value_loss(v, *args, clip_eps=0.2)
    close(loss, 0.6725)
    close(m["train/vf_clip_frac"], 0.5)
    loss.backward()
    close(v.grad, [0.0, 0.5])  # clipped token has no gradient; ½·2·(2−1)/2 = .5
    loss, _ = A.value_loss(v, *args, clip_eps=None)
    close(loss, 0.5)


def test_kl_estimators():
    # p = .5, p_ref = .25: log r = log .5 = −.693147
    # k1 = .693147, k2 = ½·.480453 = .240227, k3 = .5 − 1 + .693147 = .193147
    logp, logp_ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    close(A.kl_penalty(logp, logp_ref, "k1"), [0.693147])
    close(A.kl_penalty(logp, logp_ref, "k2"), [0.240227])
    close(A.kl_penalty(logp, logp_ref, "k3"), [0.193147])
    loss, _ = A.kl_loss(logp.repeat(2), logp_ref.repeat(2), torch.tensor([1.0, 0.0]), "k3")
    close(loss, 0.193147)
    with pytest.raises(ValueError, match="estimator"):
        A.kl_penalty(logp, logp_ref, "k4")


def test_k3_gradient_is_reverse_kl_gradient():
    # ∂k3/∂logp = 1 − r with r = p_ref/p: here 1 − .5 = .5
    logp = torch.tensor([math.log(0.5)], requires_grad=True)
    A.kl_penalty(logp, torch.tensor([math.log(0.25)]), "k3").sum().backward()
    close(logp.grad, [0.5])


def test_entropy():
    close(A.entropy_from_logits(torch.zeros(2, 4)), [math.log(4)] * 2)  # 1.386294
    loss, m = A.entropy_bonus(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 1.0, 0.0]))
    close(loss, -1.5)
    close(m["train/entropy"], 1.5)


def test_truncated_is_and_mismatch_metrics():
    # π_old/π_rollout = .5, 3, 1 → capped at 2: .5, 2, 1; fourth token masked
    logp_rollout = torch.tensor([-1.0, -2.0, -3.0, -1.0])
    logp_old = logp_rollout + torch.tensor([math.log(0.5), math.log(3.0), 0.0, 5.0])
    mask = torch.tensor([1.0, 1, 1, 0])
    w, m = A.truncated_is_weights(logp_old, logp_rollout, mask, cap=2.0)
    close(w, [0.5, 2.0, 1.0, 0.0])
    close(m["rollout/tis_weight_mean"], 3.5 / 3)
    close(m["rollout/tis_clip_frac"], 1 / 3)
    mm = A.mismatch_metrics(
        torch.tensor([0.1, -0.3, 0.05, 2.0]), torch.zeros(4), mask
    )
    close(mm["rollout/logp_abs_diff_mean"], 0.15)
    close(mm["rollout/logp_abs_diff_max"], 0.3)


def test_dynamic_sampling():
    keep, m = A.dynamic_sampling_mask(torch.tensor([1.0, 1, 0, 1, 0, 0]), group_size=2)
    assert keep.tolist() == [False, False, True, True, False, False]
    assert int(m["rollout/dynamic_sampling_dropped_groups"]) == 2
    assert int(m["rollout/dynamic_sampling_kept_groups"]) == 1


def test_overlong_shaping():
    # L_max = 10, L_cache = 4 → penalty starts after 6 tokens: |y| = 5, 6, 8, 10 → 0, 0, −.5, −1
    rewards = torch.tensor([1.0, 1, 1, 0])
    lengths = torch.tensor([5, 6, 8, 10])
    truncated = torch.tensor([False, False, False, True])
    r, keep, _ = A.overlong_shaping(rewards, lengths, truncated, "soft_penalty", 10, 4, 1.0)
    close(r, [1.0, 1.0, 0.5, -1.0])
    close(keep, [1.0, 1, 1, 1])
    r, keep, m = A.overlong_shaping(rewards, lengths, truncated, "mask", 10)
    close(r, rewards)
    close(keep, [1.0, 1, 1, 0])
    close(m["rollout/truncated_frac"], 0.25)


def test_policy_loss_combines_terms():
    logp, logp_old, adv = _ppo_inputs()
    mask = torch.ones(5)
    logp_ref = logp_old - 0.1
    ent = torch.full((5,), 2.0)
    cfg = A.GRPOConfig(kl_coef=0.5, entropy_coef=0.01, tis_cap=None)
    loss, m = A.policy_loss(cfg, logp, logp_old, adv, mask, logp_ref=logp_ref, entropy=ent)
    pg, _ = A.ppo_policy_loss(logp, logp_old, adv, mask)
    kl, _ = A.kl_loss(logp, logp_ref, mask, "k3")
    close(loss, pg + 0.5 * kl - 0.01 * 2.0)
    assert "train/kl_ref_k3" in m and "train/entropy" in m
    with pytest.raises(ValueError, match="logp_ref"):
        A.policy_loss(cfg, logp, logp_old, adv, mask, entropy=ent)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"group_size": 1}, "group_size"),
        ({"clip_eps_low": 1.5}, "clip_eps_low"),
        ({"dual_clip": 0.5}, "dual_clip"),
        ({"kl_estimator": "k5"}, "kl_estimator"),
        ({"overlong_mode": "soft_penalty"}, "overlong_buffer"),
        ({"tis_cap": 0.5}, "tis_cap"),
    ],
)
def test_grpo_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        A.GRPOConfig(**kwargs)


def test_ppo_config_validation():
    assert A.PPOConfig().kl_mode == "reward"
    with pytest.raises(ValueError, match="lam"):
        A.PPOConfig(lam=1.5)
    with pytest.raises(ValueError, match="value_clip"):
        A.PPOConfig(value_clip=0.0)
