"""Run a short SFT job for the trainer tests (launched under torchrun by tests/sft/test_trainer.py).

    torchrun --nproc-per-node N tests/sft/sft_runner.py --out metrics.json [--nan-steps 2,3]
        [--crash-in-save-at 4] -- dotted.key=value ...

Writes the per-step metrics of rank 0 as JSON. ``--nan-steps`` makes the loss of those steps NaN
(to exercise the non-finite guard); ``--crash-in-save-at`` raises between writing and publishing
the checkpoint of that step (to exercise atomic saves).
"""

import argparse
import json
import math
import os


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--nan-steps", default="")
    parser.add_argument("--crash-in-save-at", type=int, default=-1)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from pear_mega.sft.recipes import RECIPES
    from pear_mega.sft.trainer import NonFiniteError, SFTTrainer

    cfg = RECIPES.build("debug_sft", args.overrides)
    trainer = SFTTrainer(cfg)
    nan_steps = {int(s) for s in args.nan_steps.split(",") if s}
    if nan_steps:
        original = trainer._loss_func

        def poisoned(pack, logits):
            loss, count, stats = original(pack, logits)
            if trainer.step + 1 in nan_steps:  # trainer.step counts completed steps
                loss = loss * math.nan
                stats["sums"] = stats["sums"] * math.nan
            return loss, count, stats

        trainer._loss_func = poisoned
    if args.crash_in_save_at >= 0:
        original_save = trainer.save

        def crashing_save(before_publish=None):
            if trainer.step == args.crash_in_save_at:
                def crash():
                    raise RuntimeError("simulated crash during checkpoint save")
                return original_save(before_publish=crash)
            return original_save()

        trainer.save = crashing_save
    result = {"history": [], "error": None}
    try:
        result["history"] = trainer.train()
    except (NonFiniteError, RuntimeError) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["history"] = trainer.metrics.history
    if trainer.ctx.rank == 0:
        params = {}
        for name, p in trainer.model[0].module.named_parameters():
            params[name] = float(p.detach().double().sum())
        result["param_sums"] = params
        with open(args.out, "w") as f:
            json.dump(result, f)
    trainer.close()
    if result["error"] and os.environ.get("SFT_RUNNER_RAISE"):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
