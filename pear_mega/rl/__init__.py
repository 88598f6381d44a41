"""RL building blocks: policy losses and advantages (``algorithms``), verifiable rewards
(``rewards``), the colocated vLLM rollout engine with weight refit (``rollout``), and update
sparsity / drift metrics (``metrics``). vLLM is imported only when an engine is built.
"""

from pear_mega.rl.algorithms import GRPOConfig, PolicyLossConfig, PPOConfig
from pear_mega.rl.rollout import (
    RefitStats,
    RefitVerificationError,
    RolloutConfig,
    RolloutEngine,
    RolloutSample,
)

__all__ = [
    "GRPOConfig",
    "PPOConfig",
    "PolicyLossConfig",
    "RefitStats",
    "RefitVerificationError",
    "RolloutConfig",
    "RolloutEngine",
    "RolloutSample",
]
