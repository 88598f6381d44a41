"""Colocated GRPO / PPO entry point (megatron-core trainer + in-process vLLM on rank 0).

    python -m pear_mega.train_rl --recipe debug_grpo train.steps=5
    python -m pear_mega.train_rl --recipe smollm2_grpo --metrics-out outputs/metrics/grpo.jsonl
    torchrun --nproc-per-node 2 -m pear_mega.train_rl --recipe debug_grpo parallel.tensor_parallel=2
    python -m pear_mega.train_rl --list-recipes
"""

from __future__ import annotations

import argparse
import json


def main(argv: list[str] | None = None) -> None:
    from pear_mega.config_tools import to_dict
    from pear_mega.rl.recipes import RECIPES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", help=f"one of: {', '.join(RECIPES.names())}")
    parser.add_argument("--list-recipes", action="store_true", help="print the recipe names and exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--metrics-out", default="", help="write the per-step metrics here as JSON lines")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. algorithm.grpo.kl_coef=0.01")
    args = parser.parse_args(argv)
    if args.list_recipes:
        print("\n".join(RECIPES.names()))
        return
    if not args.recipe:
        parser.error("--recipe is required")
    cfg = RECIPES.build(args.recipe, args.overrides)
    if args.print_config:
        print(json.dumps(to_dict(cfg), indent=2))
        return

    from pear_mega.rl.trainer import RLTrainer

    trainer = RLTrainer(cfg)
    try:
        trainer.train()
        if args.metrics_out:
            trainer.metrics.dump(args.metrics_out)
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
