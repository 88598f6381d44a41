"""The CUDA attention path of the local spec (expanded K/V instead of ``enable_gqa``; no mask and
``is_causal`` for a one-sequence pack) computes what the CPU path computes, checked on CPU."""

import pytest
import torch
import torch.nn.functional as F

from pear_mega.models.build import attention_inputs, sdpa_inputs


def _qkv(seed=0, b=1, heads=8, groups=2, s=11, d=16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, heads, s, d, generator=g), torch.randn(b, groups, s, d, generator=g),
            torch.randn(b, groups, s, d, generator=g))


def _attend(q, k, v, attention_mask, expand_kv):
    k, v, mask, is_causal, gqa = sdpa_inputs(q, k, v, attention_mask, True, expand_kv=expand_kv)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)


@pytest.mark.parametrize("cu", [[0, 4, 9, 11], [0, 11], [0, 7]])
def test_expanded_kv_equals_enable_gqa(cu):
    q, k, v = _qkv()
    _, mask, _ = attention_inputs(torch.tensor(cu), 11, "cpu", use_te=False, causal_without_mask=False)
    cpu_path = _attend(q, k, v, mask, expand_kv=False)
    ek, ev, m, is_causal, gqa = sdpa_inputs(q, k, v, mask, True, expand_kv=True)
    assert ek.shape == q.shape and not gqa and m is not None and not is_causal
    torch.testing.assert_close(_attend(q, k, v, mask, expand_kv=True), cpu_path, atol=1e-6, rtol=1e-6)


def test_single_sequence_pack_runs_causal_without_mask():
    q, k, v = _qkv(seed=1)
    positions, none_mask, packed = attention_inputs(torch.tensor([0, 11]), 11, "cpu", use_te=False,
                                                    causal_without_mask=True)
    assert none_mask is None and packed is None and positions.tolist() == [list(range(11))]
    _, mask, _ = attention_inputs(torch.tensor([0, 11]), 11, "cpu", use_te=False, causal_without_mask=False)
    _, _, m, is_causal, _ = sdpa_inputs(q, k, v, none_mask, True, expand_kv=True)
    assert m is None and is_causal
    torch.testing.assert_close(_attend(q, k, v, none_mask, expand_kv=True), _attend(q, k, v, mask, expand_kv=False),
                               atol=1e-6, rtol=1e-6)


def test_packs_with_several_sequences_or_padding_keep_their_mask():
    for cu in ([0, 4, 11], [0, 7]):  # two sequences; one sequence + padding
        _, mask, _ = attention_inputs(torch.tensor(cu), 11, "cpu", use_te=False, causal_without_mask=True)
        assert mask is not None and mask.shape == (1, 1, 11, 11)
    _, mask, _ = attention_inputs(torch.tensor([0, 11]), 11, "cpu", use_te=False)  # CPU default: the mask
    assert mask is not None
