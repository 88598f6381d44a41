"""The update's loss and gradients with and without the log π_old recompute pass (launched under
torchrun by tests/rl_trainer/test_logprob_reuse.py).

    torchrun --nproc-per-node N tests/rl_trainer/logprob_reuse_runner.py --out result.json -- dotted.key=value ...

On one rollout batch: the recompute path (``algorithm.logprob_recompute=always``) and the reuse path
(``auto``, one update per batch) each run the policy loss forward and backward over the same packs
without an optimizer step; rank 0 writes both losses, the largest gradient difference over this
rank's parameters (max over ranks), and log π_old / entropy of each path. Then the trainer trains
``train.steps`` steps on the reuse path and the history is written too.
"""

from dataclasses import replace

from runner_io import runner_args, write_result  # isort: skip


def loss_and_grads(trainer, seqs, recompute: str) -> dict:
    """One forward + backward of the policy loss over ``seqs`` (no optimizer step)."""
    from pear_mega.models import unwrap_model
    from pear_mega.rl.experience import gather_from_pack, plan_microbatches

    cfg = trainer.cfg
    trainer.cfg = replace(cfg, algorithm=replace(cfg.algorithm, logprob_recompute=recompute))
    try:
        exp, flags = trainer.recompute(seqs)
        trainer.advantages(seqs, exp)
        packs = plan_microbatches(seqs, trainer.ctx.dp_rank, trainer.ctx.dp_size, cfg.train.seq_length,
                                  trainer.pad_id)[0]
        trainer._attach(packs, seqs, exp)
        for chunk in trainer.policy:
            chunk.zero_grad_buffer()
        reduced = trainer._run_schedule(trainer.policy, packs, trainer._policy_loss, forward_only=False)
        metrics, _ = trainer._reduce_metrics(reduced)
        for pack, out in zip(packs, reduced if "old" in (reduced or [{}])[0] else []):
            exp.logp_old.update(gather_from_pack(pack, out["old"]["logp"]))
            exp.entropy.update(gather_from_pack(pack, out["old"]["entropy"]))
        grads = {n: p.main_grad.detach().clone() for n, p in unwrap_model(trainer.policy[0]).named_parameters()}
    finally:
        trainer.cfg = cfg
    return {"metrics": metrics, "grads": grads, "exp": exp, "recomputed": flags["train/logprob_recomputed"]}


def compare_paths(trainer, seqs) -> dict:
    """Both paths over ``seqs``: which one recomputed, their metrics, the largest gradient
    difference and gradient (max over this rank's parameters, then over ranks), whether this rank's
    gradients are bit-equal, and each path's log π_old / entropy per token."""
    import torch
    import torch.distributed as dist

    always = loss_and_grads(trainer, seqs, "always")
    auto = loss_and_grads(trainer, seqs, "auto")
    grad_diff = torch.zeros(2, dtype=torch.float64)
    for name, g in always["grads"].items():
        grad_diff[0] = max(grad_diff[0], float((g - auto["grads"][name]).abs().max()))
        grad_diff[1] = max(grad_diff[1], float(g.abs().max()))
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(grad_diff, op=dist.ReduceOp.MAX)
    return {
        "recomputed": [always["recomputed"], auto["recomputed"]],
        "metrics": [always["metrics"], auto["metrics"]],
        "grad_max_abs_diff": float(grad_diff[0]), "grad_max_abs": float(grad_diff[1]),
        "grads_equal": all(torch.equal(g, auto["grads"][n]) for n, g in always["grads"].items()),
        "logp_old": [per_token(always["exp"], "logp_old"), per_token(auto["exp"], "logp_old")],
        "entropy": [per_token(always["exp"], "entropy"), per_token(auto["exp"], "entropy")],
    }


def per_token(exp, key: str) -> list[float]:
    """``exp.<key>`` of every sequence, concatenated in ``exp.ids`` order ([] when empty)."""
    import torch

    values = getattr(exp, key)
    return torch.cat([values[i] for i in exp.ids]).tolist() if exp.ids and values else []


def main():
    from pear_mega.rl.recipes import RECIPES
    from pear_mega.rl.trainer import RLTrainer

    args = runner_args()
    trainer = RLTrainer(RECIPES.build("debug_grpo", args.overrides))
    seqs, _ = trainer.generate()
    result = compare_paths(trainer, seqs)
    result["history"] = trainer.train()
    write_result(trainer, args.out, result)
    trainer.close()


if __name__ == "__main__":
    main()
