"""Build an RL trainer that resumes from ``checkpoint.dir`` and report, on rank 0, whether the RNG
state right after start-up (engine started, weights synced) is the one the checkpoint stored.

    torchrun --nproc-per-node 1 tests/rl_trainer/resume_state_runner.py --out result.json -- dotted.key=value ...
"""

import argparse
import json


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import torch
    from safetensors.torch import load_file

    from pear_mega.checkpointing import RNG_DIR, latest_checkpoint
    from pear_mega.rl.recipes import RECIPES
    from pear_mega.rl.trainer import RLTrainer

    cfg = RECIPES.build("debug_grpo", args.overrides)
    trainer = RLTrainer(cfg)
    now = torch.get_rng_state()
    if trainer.ctx.rank == 0:
        saved = load_file(str(latest_checkpoint(cfg.checkpoint.dir) / RNG_DIR / "pp0_tp0_cp0_dp0.safetensors"))
        with open(args.out, "w") as f:
            json.dump({"step": trainer.step, "torch_rng_restored": bool(torch.equal(now, saved["torch"])),
                       "data_state": trainer.data_state}, f)
    trainer.close()


if __name__ == "__main__":
    main()
