"""Colocated GRPO / PPO entry point (megatron-core trainer + in-process vLLM on rank 0).

    python -m pear_mega.train_rl --recipe debug_grpo train.steps=5
    python -m pear_mega.train_rl --recipe smollm2_grpo --metrics-out outputs/metrics/grpo.jsonl
    torchrun --nproc-per-node 2 -m pear_mega.train_rl --recipe debug_grpo parallel.tensor_parallel=2
    python -m pear_mega.train_rl --list-recipes
"""

from __future__ import annotations


def _trainer(cfg):
    from pear_mega.rl.trainer import RLTrainer

    return RLTrainer(cfg)


def main(argv: list[str] | None = None) -> None:
    from pear_mega.config_tools import run_recipe_cli
    from pear_mega.rl.recipes import RECIPES

    run_recipe_cli(__doc__, RECIPES, _trainer, argv, example_override="algorithm.grpo.kl_coef=0.01")


if __name__ == "__main__":
    main()
