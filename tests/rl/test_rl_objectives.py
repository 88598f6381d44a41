"""The three RL objectives added through the policy-loss seams, against hand-computed values:
GSPO's sequence-level ratios, the original GRPO aggregation (mean over each response's tokens,
then over responses) and Dr.GRPO's constant normalizer (responses × generation budget).

One pack of two responses (and their prompts): tokens 0-3 are sequence 0 (prompt token 0,
response tokens 1-3), tokens 4-6 sequence 1 (prompt token 4, response tokens 5-6), token 7 is
padding. What the trainer returns per microbatch is (Σ loss, count); megatron divides by the
global Σ count, so the value compared is loss / count."""

import math

import pytest
import torch

from pear_mega.rl import algorithms as A
from pear_mega.rl.recipes import RECIPES

CU = torch.tensor([0, 4, 7], dtype=torch.int32)
MASK = torch.tensor([0, 1, 1, 1, 0, 1, 1, 0], dtype=torch.float32)
A0, A1 = 1.0, -0.5  # group-relative advantages of the two responses
ADV = torch.tensor([0, A0, A0, A0, 0, A1, A1, 0], dtype=torch.float32)


def _run(config, log_ratio, max_len=4):
    logp_old = torch.full((8,), -1.0)
    logp = (logp_old + torch.tensor(log_ratio, dtype=torch.float32)).requires_grad_()
    ctx = A.LossContext(cu_seqlens=CU, max_response_len=max_len)
    weights, count = A.loss_aggregation(config, MASK, ctx)
    loss, metrics = A.policy_loss(config, logp, logp_old, ADV, MASK, normalizer=1.0, token_weights=weights,
                                  context=ctx)
    (loss / count).backward()
    return float(loss.detach() / count), logp.grad, metrics, int(count)


def test_gspo_sequence_ratio_clipped_per_sequence():
    cfg = A.GRPOConfig(ratio="sequence", loss_agg="seq_mean_token_mean", tis_cap=None)
    # sequence 0: log-ratios 0.1, 0.2, 0.3 → s_0 = e^0.2 = 1.2214 > 1.2, A_0 > 0: clipped, no gradient
    # sequence 1: log-ratios −0.05, 0.05 → s_1 = e^0 = 1: ℓ = −s_1·A_1 = 0.5, ∂/∂logp_t = −A_1·s_1/|y_1| = 0.25
    value, grad, m, count = _run(cfg, [0.0, 0.1, 0.2, 0.3, 0.0, -0.05, 0.05, 0.0])
    expected = ((-1.2 * A0) + (-1.0 * A1)) / 2
    assert count == 2
    assert value == pytest.approx(expected, abs=1e-6)  # −0.35
    torch.testing.assert_close(grad, torch.tensor([0, 0, 0, 0, 0, 0.25, 0.25, 0]) / 2, atol=1e-6, rtol=0)
    # every token of sequence 0 is clipped, none of sequence 1; the metric carries the aggregation's
    # weights (1/|y_i| per token), so it is the share of responses clipped: 1 of 2
    assert float(m["train/pg_clip_frac"]) == pytest.approx(0.5, abs=1e-6)
    # the token-level ratio clips only the tokens beyond 1.2 (e^0.2, e^0.3), not e^0.1: a different loss
    token_value, _, _, _ = _run(A.GRPOConfig(loss_agg="seq_mean_token_mean", tis_cap=None),
                                [0.0, 0.1, 0.2, 0.3, 0.0, -0.05, 0.05, 0.0])
    assert token_value == pytest.approx(((-(math.exp(0.1) + 1.2 + 1.2) / 3) * A0
                                         + (-(math.exp(-0.05) + math.exp(0.05)) / 2) * A1) / 2, abs=1e-6)
    assert abs(token_value - value) > 1e-3


def test_gspo_unclipped_gradient_is_the_sequence_ratio_over_length():
    cfg = A.GRPOConfig(ratio="sequence", loss_agg="seq_mean_token_mean", tis_cap=None)
    r = [0.0, 0.02, -0.04, 0.05, 0.0, 0.1, -0.02, 0.0]
    s0, s1 = math.exp((0.02 - 0.04 + 0.05) / 3), math.exp((0.1 - 0.02) / 2)
    value, grad, _, _ = _run(cfg, r)
    assert value == pytest.approx((-s0 * A0 - s1 * A1) / 2, abs=1e-6)
    want = torch.tensor([0, -A0 * s0 / 3, -A0 * s0 / 3, -A0 * s0 / 3, 0, -A1 * s1 / 2, -A1 * s1 / 2, 0]) / 2
    torch.testing.assert_close(grad, want.float(), atol=1e-6, rtol=0)


def test_original_grpo_aggregation_mean_over_tokens_then_responses():
    r = [0.0, 0.1, 0.0, -0.1, 0.0, 0.05, 0.0, 0.0]  # all ratios inside [0.8, 1.2]: no clipping
    tok = [-math.exp(0.1) * A0, -1.0 * A0, -math.exp(-0.1) * A0, -math.exp(0.05) * A1, -1.0 * A1]
    seq_mean = (sum(tok[:3]) / 3 + sum(tok[3:]) / 2) / 2
    value, grad, _, count = _run(A.GRPOConfig(loss_agg="seq_mean_token_mean", tis_cap=None), r)
    assert count == 2 and value == pytest.approx(seq_mean, abs=1e-6)
    token_mean, _, _, n = _run(A.GRPOConfig(tis_cap=None), r)
    assert n == 5 and token_mean == pytest.approx(sum(tok) / 5, abs=1e-6)
    assert abs(seq_mean - token_mean) > 1e-3
    # one response per microbatch gives the same global value: Σ loss over Σ count
    cfg = A.GRPOConfig(loss_agg="seq_mean_token_mean", tis_cap=None)
    total, counts = 0.0, 0
    for keep in ([1, 2, 3], [5, 6]):
        mask = torch.zeros(8)
        mask[keep] = 1
        ctx = A.LossContext(cu_seqlens=CU, max_response_len=4)
        w, c = A.loss_aggregation(cfg, mask, ctx)
        logp_old = torch.full((8,), -1.0)
        loss, _ = A.policy_loss(cfg, logp_old + torch.tensor(r), logp_old, ADV, mask, normalizer=1.0,
                                token_weights=w, context=ctx)
        total, counts = total + float(loss), counts + int(c)
    assert total / counts == pytest.approx(seq_mean, abs=1e-6)


def test_dr_grpo_constant_normalizer():
    r = [0.0, 0.1, 0.0, -0.1, 0.0, 0.05, 0.0, 0.0]
    tok = [-math.exp(0.1) * A0, -1.0 * A0, -math.exp(-0.1) * A0, -math.exp(0.05) * A1, -1.0 * A1]
    value, grad, _, count = _run(A.GRPOConfig(loss_agg="seq_mean_token_sum_norm", normalize_std=False,
                                              tis_cap=None), r, max_len=6)
    assert count == 2 * 6 and value == pytest.approx(sum(tok) / 12, abs=1e-6)
    # ∂/∂logp_t = −A·ρ_t / (G·L_max) on every loss token
    want = torch.tensor([0, -A0 * math.exp(0.1), -A0, -A0 * math.exp(-0.1), 0, -A1 * math.exp(0.05), -A1, 0]) / 12
    torch.testing.assert_close(grad, want.float(), atol=1e-6, rtol=0)
    # Dr.GRPO's advantages: mean-centred, not divided by the std
    adv, _ = A.grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4, normalize_std=False)
    torch.testing.assert_close(adv, torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_recipes_and_overrides_select_the_objectives():
    gspo = RECIPES.build("smollm2_gspo").policy
    assert (gspo.ratio, gspo.loss_agg, gspo.clip_eps_low, gspo.clip_eps_high) == (
        "sequence", "seq_mean_token_mean", 3e-4, 4e-4)
    assert RECIPES.build("smollm2_grpo_seq_mean").policy.loss_agg == "seq_mean_token_mean"
    dr = RECIPES.build("smollm2_dr_grpo").policy
    assert dr.loss_agg == "seq_mean_token_sum_norm" and dr.normalize_std is False
    over = RECIPES.build("smollm2_grpo", ["algorithm.grpo.ratio=sequence", "algorithm.grpo.loss_agg=seq_mean_token_mean"])
    assert (over.policy.ratio, over.policy.loss_agg) == ("sequence", "seq_mean_token_mean")
    with pytest.raises(ValueError, match="loss_agg must be one of"):
        RECIPES.build("smollm2_grpo", ["algorithm.grpo.loss_agg=seq_sum"])
    with pytest.raises(ValueError, match="ratio must be one of"):
        RECIPES.build("smollm2_grpo", ["algorithm.grpo.ratio=group"])
    with pytest.raises(ValueError, match="dual_clip is not defined for ratio='sequence'"):
        A.GRPOConfig(ratio="sequence", dual_clip=3.0)
