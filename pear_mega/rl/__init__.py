"""RL building blocks: policy losses and advantages (``algorithms``), advantage estimators
(``estimators``), rollouts as training data (``experience``), update sparsity / drift metrics
(``metrics``) and the trainer. The colocated vLLM engine is ``pear_mega.engine``, the weight sync
``pear_mega.weight_sync``.
"""

from pear_mega.rl.algorithms import GRPOConfig, PolicyLossConfig, PPOConfig

__all__ = ["GRPOConfig", "PPOConfig", "PolicyLossConfig"]
