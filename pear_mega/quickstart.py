"""The CPU quickstart (``make quickstart``): a PEAR study at a tiny size, one seed, on 2 cores.

    python -m pear_mega.quickstart [--out outputs] [dotted.key=value ...]

The design of ``python -m pear_mega.study`` (recipe ``quickstart_study``):

1. **πβ ≠ πθ.** The behavior policy is SmolLM2-135M-Instruct *shown four solved examples*
   before each one-digit +/− question (a few-shot-prompted teacher); it samples answers through
   vLLM and the log-prob of every sampled token is stored. The student is the same model asked
   the question *zero-shot*, so the two policies differ from the first step (context
   distillation): the PEAR weights, built from log πθ − log πβ, spread away from 1.
2. **Two SFT arms from one init on the same data in the same order:** plain SFT (``none``) and
   PEAR at token level (``token``), in megatron-core.
3. **pass@k before RL** on held-out prompts of the training task and of a shifted task
   (one-digit products), **the identical GRPO run from each arm**, and **pass@k after RL**.
4. The alignment of each arm's SFT update with its RL update, and a report.

Every stage is its own process through the public entry points; its full output (vLLM,
megatron) is in ``<out>/logs/``, and its tail is printed if it fails. The terminal shows one line
per stage, the PEAR weight table, the pass@k table and where the report, plots and logs are.
Run it again and finished stages are skipped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs", help="where data, models, logs and the report go")
    parser.add_argument("overrides", nargs="*", help="study overrides, e.g. sft.train.steps=12 study.arms=[none,block]")
    args = parser.parse_args(argv)

    from pear_mega.platform import quiet_fallback_warnings
    from pear_mega.study.recipes import RECIPES
    from pear_mega.study.run import run_study

    quiet_fallback_warnings()
    overrides = [f"study.out_dir={args.out}", *args.overrides]
    try:
        cfg = RECIPES.build("quickstart_study", overrides)
    except ValueError as exc:
        print(f"bad configuration: {exc}", file=sys.stderr)
        return 2
    # The SmolLM2 recipes of the trainers (smollm2_pear_sft, smollm2_grpo) read the model here.
    link = Path(args.out) / "models" / "smollm2-135m-instruct"
    if not link.exists():
        from pear_mega.pretrained import smollm2_135m_instruct

        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(smollm2_135m_instruct().resolve(), target_is_directory=True)
    b = cfg.behavior
    print(f"PEAR quickstart: πβ = SmolLM2-135M-Instruct with {b.shots} demonstrations, πθ = the same model zero-shot; "
          f"arms {', '.join(cfg.study.arms)}; {cfg.sft.train.steps} SFT steps, {cfg.rl.train.steps} GRPO steps each; "
          f"seed {cfg.study.seeds[0]}.")
    command = " ".join(["python -m pear_mega.quickstart", *(["--out", args.out] if args.out != "outputs" else []),
                        *args.overrides])
    return run_study(cfg, recipe="quickstart_study", command=command)


if __name__ == "__main__":
    raise SystemExit(main())
