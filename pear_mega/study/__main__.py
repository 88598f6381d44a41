"""``python -m pear_mega.study --recipe NAME [dotted.key=value ...]``: run (or continue) a study.

    python -m pear_mega.study --list-recipes
    python -m pear_mega.study --recipe tiny_study
    python -m pear_mega.study --recipe smollm2_cpu_study study.seeds=[0,1,2,3]   # adds one seed's chains
    python -m pear_mega.study --recipe smollm2_cpu_study --until eval_pre        # a probe: data, SFT, pre-RL eval
    python -m pear_mega.study --recipe smollm2_cpu_study --report-only           # the report from what exists

Stages whose outputs exist for the same resolved config are skipped (``manifest.json`` in the
study directory); see ``pear_mega.study.stages``. The report (``report.md``, ``results.json``,
PNGs) goes to ``<study dir>/report`` and is refreshed after every seed.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    from pear_mega.study.recipes import RECIPES
    from pear_mega.study.run import run_study
    from pear_mega.study.stages import apply_in_valid_order

    parser = argparse.ArgumentParser(prog="python -m pear_mega.study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", help=f"one of: {', '.join(RECIPES.names())}")
    parser.add_argument("--list-recipes", action="store_true", help="print the recipe names and exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--until", default=None, help="stop after this stage kind (behavior, sft, eval_pre, rl, ...)")
    parser.add_argument("--report-only", action="store_true", help="write the report from the finished stages")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. study.seeds=[0,1,2] sft.train.steps=20")
    args = parser.parse_args(argv)
    if args.list_recipes:
        for name in RECIPES.names():
            doc = (RECIPES._recipes[name].__doc__ or "").strip().splitlines()
            print(f"{name:<22} {doc[0] if doc else ''}")
        return 0
    if not args.recipe:
        parser.error("--recipe is required")
    try:
        # One at a time, so that the message names the override that failed; in an order in which
        # each is valid, so e.g. study.baseline=kd may come before the study.arms that contain it.
        cfg, _ = apply_in_valid_order(RECIPES.build(args.recipe), args.overrides)
    except ValueError as exc:
        print(f"bad configuration: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        from pear_mega.config_tools import to_dict

        print(json.dumps(to_dict(cfg), indent=2))
        return 0
    command = " ".join(["python -m pear_mega.study", "--recipe", args.recipe, *args.overrides])
    return run_study(cfg, recipe=args.recipe, command=command, until=args.until, report_only=args.report_only)


if __name__ == "__main__":
    raise SystemExit(main())
