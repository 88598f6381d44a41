"""Run a short SFT job for tests/sft/test_reliability.py (launched under torchrun).

    torchrun --nproc-per-node N tests/sft/reliability_runner.py --out result.json
        [--poison-update-at K] -- dotted.key=value ...

Writes rank 0's per-step metrics, parameter sums and the error (if any) as JSON.
``--poison-update-at K`` makes the optimizer update of step K write a NaN into one parameter
after a finite gradient (what an overflowing learning rate does), to exercise the check of the
parameters after the update.
"""

import argparse
import json


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--poison-update-at", type=int, default=-1)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import torch

    from pear_mega.optim import TrainingStopped
    from pear_mega.sft.recipes import RECIPES
    from pear_mega.sft.trainer import SFTTrainer

    try:
        trainer = SFTTrainer(RECIPES.build("debug_sft", args.overrides))
    except ValueError as exc:  # a refused resume: report it (every rank raises the same)
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_rank() == 0:
            with open(args.out, "w") as f:
                json.dump({"history": [], "error": f"{type(exc).__name__}: {exc}"}, f)
        return
    if args.poison_update_at > 0:
        for opt in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
            original = opt.step_with_ready_grads

            def poisoned(original=original, opt=opt):
                applied = original()
                if trainer.step + 1 == args.poison_update_at:  # trainer.step counts completed steps
                    with torch.no_grad():
                        opt.get_parameters()[0].view(-1)[0] = float("nan")
                return applied

            opt.step_with_ready_grads = poisoned
    result = {"history": [], "error": None}
    try:
        trainer.train()
    except TrainingStopped as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    result["history"] = trainer.metrics.history
    if trainer.ctx.rank == 0:
        result["param_sums"] = {name: float(p.detach().double().sum())
                                for name, p in trainer.model[0].module.named_parameters()}
        with open(args.out, "w") as f:
            json.dump(result, f)
    trainer.close()


if __name__ == "__main__":
    main()
