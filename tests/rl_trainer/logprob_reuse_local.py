"""The update path with and without the log π_old recompute pass, in one process without a rollout
engine (run by tests/rl_trainer/test_logprob_reuse.py; a few seconds on CPU).

    python tests/rl_trainer/logprob_reuse_local.py --model TINY_HF_DIR --out result.json

The RL trainer's policy, optimizer and reference model are built as ``RLTrainer.__init__`` builds
them (no vLLM: the batch is a fixed set of sequences); on it: the loss forward + backward of the
recompute path (``algorithm.logprob_recompute=always``) and of the reuse path (``auto``) without an
optimizer step, then ``train.steps`` = 3 steps of recompute → advantages → update → rollout
metrics on the reuse path (``logging.kl_to_init_interval=2``). Writes losses, gradient differences,
log π_old / entropy of both paths (``logprob_reuse_runner.compare_paths``) and the steps' metrics as JSON.
"""

import argparse
import json

from logprob_reuse_runner import compare_paths, per_token  # isort: skip


def build(model: str):
    import torch

    from pear_mega.optim import build_optimizer
    from pear_mega.rl.recipes import RECIPES
    from pear_mega.rl.trainer import RLTrainer

    cfg = RECIPES.build("debug_grpo", [f"model.hf_path={model}", "checkpoint.dir=", "logging.tensorboard_dir=",
                                       "train.steps=3", "optim.lr=1e-2",
                                       "logging.kl_to_init_interval=2"])
    trainer = object.__new__(RLTrainer)  # the trainer's parts without the rollout engine
    trainer._start(cfg)
    trainer.estimator = cfg.algorithm.estimator
    trainer.tp_group = None
    trainer.pad_id = 0
    trainer.policy = [trainer._make_trainable(trainer._build_model(cfg.model.hf_path))]
    trainer.optimizer, trainer.scheduler = build_optimizer(trainer.policy, cfg.optim, 3, trainer.dtype)
    trainer.ref = trainer._build_frozen()
    trainer.kl_in_reward = False
    torch.manual_seed(0)
    return trainer


def sequences(vocab: int, groups: int = 2, n: int = 4):
    import torch

    from pear_mega.rl.experience import RolloutSequence

    g = torch.Generator().manual_seed(1)
    seqs = []
    for k in range(groups * n):
        prompt = torch.randint(1, vocab, (5 + k % 3,), generator=g).tolist()
        response = torch.randint(1, vocab, (3 + k % 4,), generator=g).tolist()
        seqs.append(RolloutSequence(k // n, prompt, response, [-1.0] * len(response), float(k % 2), float(k % 2)))
    return seqs


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from pear_mega.trainer_core import TrainerCore

    trainer = build(args.model)
    seqs = sequences(trainer.arch.vocab_size)
    result = compare_paths(trainer, seqs)
    # full updates on the reuse path: π_old and the entropy filled from their forward, before the step
    result["steps"] = []
    for step in range(trainer.cfg.train.steps):
        trainer.step = step
        exp, metrics = trainer.recompute(seqs)
        metrics.update(trainer.advantages(seqs, exp))
        metrics.update(trainer.update(seqs, exp))
        metrics.update(trainer._rollout_metrics(exp, have_old=True))
        result["steps"].append({"metrics": metrics, "logp_old": per_token(exp, "logp_old")})
    with open(args.out, "w") as f:
        json.dump(result, f)
    TrainerCore.close(trainer)  # no engine to close


if __name__ == "__main__":
    main()
