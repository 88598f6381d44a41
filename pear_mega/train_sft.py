"""PEAR-SFT entry point.

    python -m pear_mega.train_sft --recipe debug_sft train.steps=5
    torchrun --nproc-per-node 2 -m pear_mega.train_sft --recipe debug_sft parallel.tensor_parallel=2
    python -m pear_mega.train_sft --list-recipes
"""

from __future__ import annotations

import argparse
import json


def main(argv: list[str] | None = None) -> None:
    from pear_mega.config_tools import to_dict
    from pear_mega.sft.recipes import RECIPES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", help=f"one of: {', '.join(RECIPES.names())}")
    parser.add_argument("--list-recipes", action="store_true", help="print the recipe names and exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--metrics-out", default="", help="write the per-step metrics here as JSON lines")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. optim.lr=1e-4")
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

    from pear_mega.platform import quiet_fallback_warnings
    from pear_mega.sft.trainer import SFTTrainer

    quiet_fallback_warnings()

    trainer = SFTTrainer(cfg)
    try:
        trainer.train()
        if args.metrics_out:
            trainer.metrics.dump(args.metrics_out)
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
