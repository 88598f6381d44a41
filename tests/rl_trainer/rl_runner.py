"""Run a short RL job for the trainer tests (launched under torchrun by tests/rl_trainer).

    torchrun --nproc-per-node N tests/rl_trainer/rl_runner.py --out result.json [--corrupt-refit-check] \
        -- dotted.key=value ...

Writes rank 0's view as JSON: the per-step metrics, every step's rollout rewards / response
lengths (for independent recomputation of the loss), the probe sequences with the engine's and the
trainer's log-probs after the last weight sync, and with ``--corrupt-refit-check`` the error the
refit verification raised after the policy was changed without a weight sync.
"""

from runner_io import runner_args, write_result  # isort: skip


def _flags(parser) -> None:
    parser.add_argument("--recipe", default="debug_grpo")
    parser.add_argument("--corrupt-refit-check", action="store_true")


def main():
    args = runner_args(_flags)

    import torch

    from pear_mega.models import unwrap_model
    from pear_mega.rl.recipes import RECIPES
    from pear_mega.engine import RefitVerificationError
    from pear_mega.rl.trainer import RLTrainer

    trainer = RLTrainer(RECIPES.build(args.recipe, args.overrides))
    rollouts = []
    generate = trainer.generate

    def recording_generate():
        seqs, metrics = generate()
        rollouts.append({"rewards": [s.reward for s in seqs], "lengths": [len(s.response_ids) for s in seqs],
                         "groups": [s.group for s in seqs], "loss_weights": [s.loss_weight for s in seqs]})
        return seqs, metrics

    trainer.generate = recording_generate
    # torch threads: after start-up, inside the engine's generate (on the engine rank), after training
    threads = {"after_start": torch.get_num_threads(), "engine_threads": trainer.rollout.engine_threads,
               "in_generate": []}
    if trainer.engine is not None:
        engine_generate = trainer.engine.generate

        def counting_generate(*a, **k):
            threads["in_generate"].append(torch.get_num_threads())
            return engine_generate(*a, **k)

        trainer.engine.generate = counting_generate
    result = {"history": trainer.train(), "rollouts": rollouts, "threads": threads,
              "transport": "collective" if trainer.staging is None else "shared_memory"}
    threads["after_train"] = torch.get_num_threads()
    trainer_probes = trainer.probe_logprobs()
    rank0 = trainer.ctx.rank == 0
    prompts = [s.prompt_ids for s in trainer.probe_seqs]
    responses = [s.response_ids for s in trainer.probe_seqs]
    if trainer.engine is not None:  # every worker of an engine makes the same calls
        engine_probes = trainer.engine.logprobs_of(prompts, responses)
    if rank0:
        result["probes"] = {
            "prompts": prompts, "responses": responses,
            "engine": [t.tolist() for t in engine_probes],
            "trainer": [t.tolist() for t in trainer_probes],
        }
    if trainer.estimator.needs_critic and trainer.ctx.is_last_stage:
        head = unwrap_model(trainer.critic[0]).output_layer
        result["value_head_abs_sum"] = float(head.weight.detach().abs().sum() + head.bias.detach().abs().sum())
    if args.corrupt_refit_check:
        gpt = unwrap_model(trainer.policy[0])
        if trainer.ctx.is_last_stage:
            with torch.no_grad():
                gpt.decoder.final_layernorm.weight.mul_(1.5)  # the engine keeps the old weights
        try:
            trainer.verify_refit()
            result["corrupt_error"] = None
        except (RefitVerificationError, RuntimeError) as exc:
            result["corrupt_error"] = f"{type(exc).__name__}: {exc}"
    write_result(trainer, args.out, result)
    trainer.close()


if __name__ == "__main__":
    main()
