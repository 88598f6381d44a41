"""The RL algorithm registry: what each estimator needs, and unknown or half-registered names
refused when the config is built."""

import pytest

from pear_mega.rl.config import AlgorithmConfig
from pear_mega.rl.estimators import ESTIMATORS, Estimator, grpo_advantages, register
from pear_mega.rl.recipes import RECIPES


def test_registered_estimators_declare_their_needs():
    grpo, ppo = AlgorithmConfig(name="grpo"), AlgorithmConfig(name="ppo")
    assert not grpo.estimator.needs_critic and grpo.estimator.group_relative and grpo.policy is grpo.grpo
    assert ppo.estimator.needs_critic and not ppo.estimator.group_relative and ppo.policy is ppo.ppo


def test_unknown_algorithm_is_a_config_error():
    with pytest.raises(ValueError, match=r"algorithm.name must be one of \('grpo', 'ppo'.*got 'gpro'"):
        AlgorithmConfig(name="gpro")
    with pytest.raises(ValueError, match="algorithm.name must be one of"):
        RECIPES.build("smollm2_grpo", ["algorithm.name=reinforce"])


def test_half_registered_algorithm_is_a_config_error():
    register(Estimator("halfway", settings="halfway", advantages=grpo_advantages))
    register(Estimator("no_advantages", settings="grpo", advantages=None))
    try:
        with pytest.raises(ValueError, match=r"algorithm.name='halfway': its settings field algorithm.halfway is not"):
            AlgorithmConfig(name="halfway")
        with pytest.raises(ValueError, match=r"algorithm.name='no_advantages': the estimator has no advantage"):
            AlgorithmConfig(name="no_advantages")
        with pytest.raises(ValueError, match="already registered"):
            register(Estimator("grpo", settings="grpo", advantages=grpo_advantages))
    finally:
        ESTIMATORS.pop("halfway")
        ESTIMATORS.pop("no_advantages")
