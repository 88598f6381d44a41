"""The command line and the output of the RL test runners (scripts launched under torchrun by
``conftest.run_rl``): ``--out result.json`` and trailing ``dotted.key=value`` recipe overrides in,
rank 0's view as JSON out."""

import argparse
import json


def runner_args(add_flags=None) -> argparse.Namespace:
    """``--out`` and the overrides; ``add_flags(parser)`` adds a runner's own flags."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    if add_flags is not None:
        add_flags(parser)
    parser.add_argument("overrides", nargs="*")
    return parser.parse_args()


def write_result(trainer, path: str, result: dict) -> None:
    """``result`` as JSON at ``path``, written by rank 0 only."""
    if trainer.ctx.rank == 0:
        with open(path, "w") as f:
            json.dump(result, f)
