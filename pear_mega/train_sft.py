"""PEAR-SFT entry point.

    python -m pear_mega.train_sft --recipe debug_sft train.steps=5
    torchrun --nproc-per-node 2 -m pear_mega.train_sft --recipe debug_sft parallel.tensor_parallel=2
    python -m pear_mega.train_sft --list-recipes
"""

from __future__ import annotations


def _trainer(cfg):
    from pear_mega.sft.trainer import SFTTrainer

    return SFTTrainer(cfg)


def main(argv: list[str] | None = None) -> None:
    from pear_mega.config_tools import run_recipe_cli
    from pear_mega.sft.recipes import RECIPES

    run_recipe_cli(__doc__, RECIPES, _trainer, argv)


if __name__ == "__main__":
    main()
