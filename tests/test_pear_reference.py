"""The readable PEAR reference (pear_mega.pear): hand-computed cases and properties."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from pear_mega.pear import (
    PearConfig,
    reference_log_weights,
    reference_pear_loss,
    weight_stats,
)

LN_HALF = math.log(0.5)


def _log_weights(delta, mask, cu, **cfg):
    """Log weights for given raw δ (logp_beta = 0, logp_theta = δ)."""
    delta = torch.tensor(delta, dtype=torch.float32)
    return reference_log_weights(
        delta, torch.zeros_like(delta), torch.tensor(mask), torch.tensor(cu), PearConfig(**cfg)
    )


# One sequence, 4 loss tokens, raw δ = [0.1, -0.2, 0.5, 0.05] → clipped to (-0.08, 0.3):
# [0.1, -0.08, 0.3, 0.05]; γ = 0.5.
RAW = [0.1, -0.2, 0.5, 0.05]
ONE_SEQ = dict(mask=[True] * 4, cu=[0, 4])


@pytest.mark.parametrize(
    "cfg, expected",
    [
        # token: n_later·ln γ + Σ later clipped δ
        (dict(level="token"), [3 * LN_HALF + 0.27, 2 * LN_HALF + 0.35, LN_HALF + 0.05, 0.0]),
        # literal values of the line above
        (dict(level="token"), [-1.8094415, -1.0362944, -0.6431472, 0.0]),
        # block B=2: blocks {0,1},{2,3}; block 0 ends at token 1 with 2 later tokens, Σ later = 0.35
        (dict(level="block", block_size=2), [-1.0362944, -1.0362944, 0.0, 0.0]),
        # block B=3: blocks {0,1,2},{3}; block 0 ends at token 2 with 1 later token, Σ later = 0.05
        (dict(level="block", block_size=3), [-0.6431472, -0.6431472, -0.6431472, 0.0]),
        # block B >= n: one block, nothing later
        (dict(level="block", block_size=8), [0.0, 0.0, 0.0, 0.0]),
        # sequence: Σ all clipped δ = 0.37, no discount
        (dict(level="sequence"), [0.37, 0.37, 0.37, 0.37]),
        (dict(level="none"), [0.0, 0.0, 0.0, 0.0]),
        # final clip (-1.2, 5): token values below -1.2 are raised to it
        (dict(level="token", log_weight_clip=(-1.2, 5.0)), [-1.2, -1.0362944, -0.6431472, 0.0]),
    ],
)
def test_hand_computed_single_sequence(cfg, expected):
    got = _log_weights(RAW, ONE_SEQ["mask"], ONE_SEQ["cu"], gamma=0.5, **cfg)
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-6, rtol=0)


def test_masked_span_inside_sequence_is_skipped():
    # Loss tokens at 0,1,4,5; positions 2,3 masked (a user turn) with a huge δ that must not count,
    # and they add no discount: same weights as the 4-token sequence above.
    raw = [0.1, -0.2, 9.0, -9.0, 0.5, 0.05]
    mask = [True, True, False, False, True, True]
    got = _log_weights(raw, mask, [0, 6], gamma=0.5, level="token")
    expected = torch.tensor([-1.8094415, -1.0362944, 0.0, 0.0, -0.6431472, 0.0])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    got = _log_weights(raw, mask, [0, 6], gamma=0.5, level="block", block_size=2)
    expected = torch.tensor([-1.0362944, -1.0362944, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_two_packed_sequences():
    # cu = [0, 3, 5], γ = 0.9 (ln γ = -0.1053605). seq 1 δ = [0.2, 0.1, -0.05], seq 2 δ = [0.3, 0.25]
    raw = [0.2, 0.1, -0.05, 0.3, 0.25]
    got = _log_weights(raw, [True] * 5, [0, 3, 5], gamma=0.9, level="token")
    expected = torch.tensor([-0.1607210, -0.1553605, 0.0, 0.1446395, 0.0])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    got = _log_weights(raw, [True] * 5, [0, 3, 5], gamma=0.9, level="token", log_weight_clip=(-0.16, 0.1))
    expected = torch.tensor([-0.16, -0.1553605, 0.0, 0.1, 0.0])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    got = _log_weights(raw, [True] * 5, [0, 3, 5], level="sequence")
    torch.testing.assert_close(got, torch.tensor([0.25, 0.25, 0.25, 0.55, 0.55]), atol=1e-6, rtol=0)


def test_hand_computed_loss_entropy_and_normalizations():
    # V = 2. Row 0 logits [0, 0] → p(label 0) = 1/2; row 1 logits [ln 3, 0] → p(label 0) = 3/4;
    # row 2 has no loss. logp_β = [ln 0.5 − 0.1, ln 0.75 − 0.2] → δ = [0.1, 0.2]; γ = 1, token level:
    # log G = [δ_1, 0] = [0.2, 0] → G = [1.2214028, 1].
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [0.0, 0.0]])
    labels = torch.tensor([0, 0, -100])
    beta = torch.tensor([math.log(0.5) - 0.1, math.log(0.75) - 0.2, 0.0])
    cu = torch.tensor([0, 3], dtype=torch.int32)
    nll = [0.6931472, 0.2876821]
    cfg = dict(level="token", gamma=1.0)
    out = reference_pear_loss(logits, labels, beta, cu, PearConfig(**cfg))
    torch.testing.assert_close(out.logprobs, torch.tensor([-nll[0], -nll[1], 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.log_weights, torch.tensor([0.2, 0.0, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.entropy, torch.tensor([0.6931472, 0.5623351, 0.6931472]), atol=1e-6, rtol=0)
    # tokens: (1.2214028·0.6931472 + 0.2876821) / 2
    assert out.loss.item() == pytest.approx(0.5671470, abs=1e-6)
    out = reference_pear_loss(logits, labels, beta, cu, PearConfig(normalization="sequences", **cfg))
    assert out.loss.item() == pytest.approx(0.5671470, abs=1e-6)  # one sequence: same mean
    out = reference_pear_loss(logits, labels, beta, cu, PearConfig(normalization="weights", **cfg))
    assert out.loss.item() == pytest.approx(0.5106206, abs=1e-6)  # / (1.2214028 + 1)
    out = reference_pear_loss(logits, labels, beta, cu, PearConfig(**cfg), normalizer=10.0)
    assert out.loss.item() == pytest.approx(0.1134294, abs=1e-6)  # explicit global count


def test_sequences_normalization_two_sequences():
    # Level none, V = 2, uniform logits: every loss token has NLL ln 2. Seq 1 has 1 loss token,
    # seq 2 has 3, seq 3 none. "sequences": (ln2/1 + 3·ln2/3) / 2 nonempty sequences = ln 2.
    # Break the symmetry: seq 2 logits [ln 3, 0] with label 0 → NLL 0.2876821 each.
    logits = torch.zeros(6, 2)
    logits[1:4, 0] = math.log(3.0)
    labels = torch.tensor([0, 0, 0, 0, -100, -100])
    cu = torch.tensor([0, 1, 4, 6])
    out = reference_pear_loss(logits, labels, torch.zeros(6), cu, PearConfig(level="none", normalization="sequences"))
    assert out.loss.item() == pytest.approx((0.6931472 + 0.2876821) / 2, abs=1e-6)
    out = reference_pear_loss(logits, labels, torch.zeros(6), cu, PearConfig(level="none"))
    assert out.loss.item() == pytest.approx((0.6931472 + 3 * 0.2876821) / 4, abs=1e-6)


def test_weight_stats_hand_computed():
    cfg = PearConfig(log_weight_clip=(-2.0, 1.0))
    log_w = torch.tensor([0.0, math.log(2.0), -2.0, 1.0, 0.0])
    mask = torch.tensor([True, True, True, True, False])
    lp_theta = torch.tensor([0.0, 0.5, 0.0, -0.1, 7.0])  # δ = [0, 0.5, 0, -0.1, masked]
    stats = weight_stats(log_w, mask, cfg, lp_theta, torch.zeros(5))
    g = [1.0, 2.0, math.exp(-2.0), math.e]
    assert stats["pear/weight_mean"].item() == pytest.approx(sum(g) / 4, rel=1e-6)
    assert stats["pear/weight_min"].item() == pytest.approx(math.exp(-2.0), rel=1e-6)
    assert stats["pear/weight_max"].item() == pytest.approx(math.e, rel=1e-6)
    assert stats["pear/ess"].item() == pytest.approx(sum(g) ** 2 / (4 * sum(x * x for x in g)), rel=1e-6)
    assert stats["pear/clip_low_frac"].item() == pytest.approx(0.25)
    assert stats["pear/clip_high_frac"].item() == pytest.approx(0.25)
    assert stats["pear/delta_clip_frac"].item() == pytest.approx(0.5)  # 0.5 > 0.3 and -0.1 < -0.08
    assert stats["pear/num_tokens"].item() == 4
    empty = weight_stats(log_w, torch.zeros(5, dtype=torch.bool), cfg)
    assert all(v.item() == 0.0 for v in empty.values())


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(level="tokens"), "level"),
        (dict(normalization="mean"), "normalization"),
        (dict(gamma=0.0), "gamma"),
        (dict(gamma=1.5), "gamma"),
        (dict(delta_clip=(0.1, 0.3)), "delta_clip"),
        (dict(delta_clip=(-0.1, -0.05)), "delta_clip"),
        (dict(delta_clip=(-0.1,)), "delta_clip"),
        (dict(log_weight_clip=(1.0, -1.0)), "log_weight_clip"),
        (dict(log_weight_clip=(float("nan"), 1.0)), "log_weight_clip"),
        (dict(block_size=0), "block_size"),
        (dict(block_size=2.0), "block_size"),
    ],
)
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=f"PearConfig.{field}"):
        PearConfig(**kwargs)


# ---------------------------------------------------------------------------------------------
# Properties over random packs


@st.composite
def packs(draw, max_seqs=4, max_len=7, vocab=5):
    lens = draw(st.lists(st.integers(0, max_len), min_size=1, max_size=max_seqs).filter(lambda x: sum(x) > 0))
    T = sum(lens)
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, vocab, generator=gen) * 2
    labels = torch.randint(0, vocab, (T,), generator=gen)
    drop = torch.rand(T, generator=gen) < draw(st.sampled_from([0.0, 0.3, 0.7]))
    labels[drop] = -100
    beta = -torch.rand(T, generator=gen) * 3
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32)
    return logits, labels, beta, cu


configs = st.builds(
    PearConfig,
    level=st.sampled_from(["none", "token", "block", "sequence"]),
    gamma=st.floats(0.5, 1.0),
    delta_clip=st.tuples(st.floats(-2.0, 0.0), st.floats(0.0, 2.0)),
    log_weight_clip=st.tuples(st.floats(-5.0, 0.0), st.floats(0.0, 3.0)),
    block_size=st.integers(1, 4),
    normalization=st.sampled_from(["tokens", "sequences", "weights"]),
)


@settings(max_examples=40, deadline=None)
@given(pack=packs(), gamma=st.floats(0.5, 1.0))
def test_block_size_one_equals_token(pack, gamma):
    logits, labels, beta, cu = pack
    token = reference_pear_loss(logits, labels, beta, cu, PearConfig(level="token", gamma=gamma))
    block = reference_pear_loss(logits, labels, beta, cu, PearConfig(level="block", block_size=1, gamma=gamma))
    torch.testing.assert_close(block.log_weights, token.log_weights, atol=1e-6, rtol=0)
    torch.testing.assert_close(block.loss, token.loss)


@settings(max_examples=30, deadline=None)
@given(pack=packs())
def test_level_none_is_plain_nll(pack):
    logits, labels, beta, cu = pack
    out = reference_pear_loss(logits, labels, beta, cu, PearConfig(level="none"))
    if (labels != -100).any():
        torch.testing.assert_close(out.loss, F.cross_entropy(logits, labels, ignore_index=-100))
    else:
        assert out.loss.item() == 0.0
    assert torch.all(out.log_weights == 0)


@settings(max_examples=30, deadline=None)
@given(pack=packs(), cfg=configs)
def test_weights_are_detached(pack, cfg):
    logits, labels, beta, cu = pack
    x = logits.clone().requires_grad_()
    out = reference_pear_loss(x, labels, beta, cu, cfg)
    out.loss.backward()
    mask = labels != -100
    g = torch.where(mask, out.log_weights.exp(), 0.0)
    if cfg.normalization == "sequences":
        counts = torch.stack([mask[a:b].sum() for a, b in zip(cu[:-1], cu[1:])])
        per_tok = torch.repeat_interleave(counts, (cu[1:] - cu[:-1]).long())
        g = g / per_tok.clamp_min(1)
        norm = (counts > 0).sum().clamp_min(1)
    elif cfg.normalization == "tokens":
        norm = mask.sum().clamp_min(1)
    else:
        norm = g.sum() if mask.any() else torch.tensor(1.0)
    onehot = F.one_hot(torch.where(mask, labels, 0), logits.shape[1]).float()
    expected = g[:, None] * (torch.softmax(logits, -1) - onehot) / norm
    torch.testing.assert_close(x.grad, expected, atol=1e-6, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(pack=packs(), cfg=configs)
def test_clip_bounds_hold(pack, cfg):
    logits, labels, beta, cu = pack
    out = reference_pear_loss(logits, labels, beta, cu, cfg)
    lo, hi = cfg.log_weight_clip
    mask = labels != -100
    lw = out.log_weights[mask]
    if cfg.level != "none":
        assert torch.all(lw >= lo - 1e-6) and torch.all(lw <= hi + 1e-6)
    assert torch.all(out.log_weights[~mask] == 0)
    # δ clip bounds the unclipped weight too: |log G| <= n_later·(|ln γ| + max|δ|)
    assert torch.isfinite(out.loss)


@settings(max_examples=30, deadline=None)
@given(pack=packs(max_seqs=3), cfg=configs)
def test_packed_sequences_do_not_leak(pack, cfg):
    logits, labels, beta, cu = pack
    out = reference_pear_loss(logits, labels, beta, cu, cfg)
    # Perturb everything after the first sequence: its weights must not move.
    first_end = int(cu[1])
    logits2 = logits.clone()
    logits2[first_end:] = torch.randn_like(logits2[first_end:]) * 3
    beta2 = beta.clone()
    beta2[first_end:] -= 1.0
    out2 = reference_pear_loss(logits2, labels, beta2, cu, cfg)
    torch.testing.assert_close(out2.log_weights[:first_end], out.log_weights[:first_end], atol=0, rtol=0)
    # And a sequence's weights equal those of the same sequence evaluated alone.
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        alone = reference_pear_loss(
            logits[a:b], labels[a:b], beta[a:b], torch.tensor([0, b - a]), cfg
        ) if b > a else None
        if alone is not None:
            torch.testing.assert_close(alone.log_weights, out.log_weights[a:b], atol=1e-6, rtol=0)
