"""The update path with and without the log π_old recompute pass, in one process without a rollout
engine (run by tests/rl_trainer/test_logprob_reuse.py; a few seconds on CPU).

    python tests/rl_trainer/logprob_reuse_local.py --model TINY_HF_DIR --out result.json

The RL trainer's policy, optimizer and reference model are built as ``RLTrainer.__init__`` builds
them (no vLLM: the batch is a fixed set of sequences); on it: the loss forward + backward of the
recompute path (``algorithm.logprob_recompute=always``) and of the reuse path (``auto``) without an
optimizer step, then ``train.steps`` = 3 steps of recompute → advantages → update → rollout
metrics on the reuse path (``logging.kl_to_init_interval=2``). Writes losses, gradient differences,
log π_old / entropy of both paths and the steps' metrics as JSON.
"""

import argparse
import json
from dataclasses import replace


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


def loss_and_grads(trainer, seqs, recompute: str) -> dict:
    """One forward + backward of the policy loss over ``seqs`` (no optimizer step)."""
    from pear_mega.models import unwrap_model
    from pear_mega.rl.experience import gather_from_pack, plan_microbatches

    cfg = trainer.cfg
    trainer.cfg = replace(cfg, algorithm=replace(cfg.algorithm, logprob_recompute=recompute))
    try:
        exp, flags = trainer.recompute(seqs)
        trainer.advantages(seqs, exp)
        packs = plan_microbatches(seqs, 0, 1, cfg.train.seq_length, trainer.pad_id)[0]
        trainer._attach(packs, seqs, exp)
        for chunk in trainer.policy:
            chunk.zero_grad_buffer()
        reduced = trainer._run_schedule(trainer.policy, packs, trainer._policy_loss, forward_only=False)
        metrics, _ = trainer._reduce_metrics(reduced)
        for pack, out in zip(packs, reduced if "old" in reduced[0] else []):
            exp.logp_old.update(gather_from_pack(pack, out["old"]["logp"]))
            exp.entropy.update(gather_from_pack(pack, out["old"]["entropy"]))
        grads = {n: p.main_grad.detach().clone() for n, p in unwrap_model(trainer.policy[0]).named_parameters()}
    finally:
        trainer.cfg = cfg
    return {"metrics": metrics, "grads": grads, "exp": exp, "recomputed": flags["train/logprob_recomputed"]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch

    from pear_mega.trainer_core import TrainerCore

    trainer = build(args.model)
    seqs = sequences(trainer.arch.vocab_size)
    always = loss_and_grads(trainer, seqs, "always")
    auto = loss_and_grads(trainer, seqs, "auto")

    def flat(exp, key):
        return torch.cat([getattr(exp, key)[i] for i in exp.ids]).tolist()

    result = {
        "recomputed": [always["recomputed"], auto["recomputed"]],
        "metrics": [always["metrics"], auto["metrics"]],
        "grad_max_abs_diff": max(float((g - auto["grads"][n]).abs().max()) for n, g in always["grads"].items()),
        "grad_max_abs": max(float(g.abs().max()) for g in always["grads"].values()),
        "grads_equal": all(torch.equal(g, auto["grads"][n]) for n, g in always["grads"].items()),
        "logp_old": [flat(always["exp"], "logp_old"), flat(auto["exp"], "logp_old")],
        "entropy": [flat(always["exp"], "entropy"), flat(auto["exp"], "entropy")],
    }
    # full updates on the reuse path: π_old and the entropy filled from their forward, before the step
    result["steps"] = []
    for step in range(trainer.cfg.train.steps):
        trainer.step = step
        exp, metrics = trainer.recompute(seqs)
        metrics.update(trainer.advantages(seqs, exp))
        metrics.update(trainer.update(seqs, exp))
        metrics.update(trainer._rollout_metrics(exp, have_old=True))
        result["steps"].append({"metrics": metrics, "logp_old": flat(exp, "logp_old")})
    with open(args.out, "w") as f:
        json.dump(result, f)
    TrainerCore.close(trainer)  # no engine to close


if __name__ == "__main__":
    main()
