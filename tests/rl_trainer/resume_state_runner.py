"""Build an RL trainer that resumes from ``checkpoint.dir`` and report, on rank 0, whether the RNG
state right after start-up (engine started, weights synced) is the one the checkpoint stored.

    torchrun --nproc-per-node 1 tests/rl_trainer/resume_state_runner.py --out result.json -- dotted.key=value ...
"""

from runner_io import runner_args, write_result  # isort: skip


def main():
    import torch
    from safetensors.torch import load_file

    from pear_mega.checkpointing import RNG_DIR, latest_checkpoint
    from pear_mega.rl.recipes import RECIPES
    from pear_mega.rl.trainer import RLTrainer

    args = runner_args()
    cfg = RECIPES.build("debug_grpo", args.overrides)
    trainer = RLTrainer(cfg)
    now = torch.get_rng_state()
    if trainer.ctx.rank == 0:  # rank 0's RNG file
        saved = load_file(str(latest_checkpoint(cfg.checkpoint.dir) / RNG_DIR / "pp0_tp0_cp0_dp0.safetensors"))
        write_result(trainer, args.out, {"step": trainer.step, "data_state": trainer.data_state,
                                         "torch_rng_restored": bool(torch.equal(now, saved["torch"]))})
    trainer.close()


if __name__ == "__main__":
    main()
