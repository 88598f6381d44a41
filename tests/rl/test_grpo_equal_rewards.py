"""GRPO gives exactly zero advantage to a group whose rewards are all equal (float rounding of the
group mean must not be amplified by 1 / (std + ε))."""

import pytest
import torch

from pear_mega.rl import algorithms as A


@pytest.mark.parametrize(
    "value,n,float32_advantage",
    # float32 statistics with ε = 1e-6 gave these advantages (one ulp of the mean divided by ε)
    [(0.7, 8, 0.056), (0.99, 8, 0.106), (2.7611, 12, 0.318)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equal_rewards_have_exactly_zero_advantage(value, n, float32_advantage, dtype):
    rewards = torch.full((n,), value, dtype=dtype)
    adv, m = A.grpo_advantages(rewards, group_size=n)
    assert torch.equal(adv, torch.zeros(n)), adv
    assert m["train/reward_group_std_mean"].item() == 0.0
    adv, _ = A.grpo_advantages(rewards, group_size=n, normalize_std=False)
    assert torch.equal(adv, torch.zeros(n))


def test_float32_statistics_would_not_be_zero():
    # the defect being guarded against: the old float32 formula on 0.7 × 8
    r = torch.full((1, 8), 0.7)
    old = (r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, keepdim=True) + 1e-6)
    assert old.abs().max().item() > 0.01


def test_equal_group_next_to_informative_group():
    # group 1: partial credit all equal → 0; group 2: [0.7, 0.7, 0.7, 0.2]: mean .575,
    # unbiased std sqrt((3·.125² + .375²)/3) = .25 → .5, .5, .5, −1.5
    rewards = torch.tensor([0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.2])
    adv, _ = A.grpo_advantages(rewards, group_size=4)
    assert torch.equal(adv[:4], torch.zeros(4))
    torch.testing.assert_close(adv[4:], torch.tensor([0.5, 0.5, 0.5, -1.5]), atol=1e-5, rtol=0)
