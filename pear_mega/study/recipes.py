"""Named studies: functions returning a ``StudyConfig``.

``python -m pear_mega.study --recipe NAME [dotted.key=value ...]``. Each study nests an SFT recipe's
config (``sft``) and an RL recipe's config (``rl``) and derives them with ``dataclasses.replace``;
``study.sft_recipe`` / ``study.rl_recipe`` name the recipes the per-stage commands are written
against, so every stage's log starts with a command a user can rerun by hand.
"""

from __future__ import annotations

import json
from dataclasses import replace

from pear_mega.config_tools import RecipeRegistry
from pear_mega.rl.recipes import ARITHMETIC_1DIGIT
from pear_mega.rl.recipes import RECIPES as RL_RECIPES
from pear_mega.sft.recipes import RECIPES as SFT_RECIPES
from pear_mega.study.config import BehaviorConfig, EvalSettings, StudyConfig, StudySettings

RECIPES = RecipeRegistry("study")

# The shifted suite of the arithmetic studies: one-digit products (a skill the +/- data never shows).
PRODUCTS_1DIGIT = {"min_digits": 1, "max_digits": 1}


def _smollm2(name: str, *, out_dir: str = "") -> StudyConfig:
    """SmolLM2-135M-Instruct on one-digit +/−: πβ is the same model with 4 demonstrations
    (context distillation), the student answers zero-shot, so SFT teaches the answer format and
    its log-ratios to πβ are far from 0 (PEAR's weights spread), while RL keeps headroom."""
    sft = SFT_RECIPES.build("smollm2_pear_sft")
    rl = RL_RECIPES.build("smollm2_grpo")
    return StudyConfig(
        study=StudySettings(name=name, out_dir=out_dir, seeds=(0, 1, 2), arms=("none", "token"),
                            sft_recipe="smollm2_pear_sft", rl_recipe="smollm2_grpo"),
        behavior=BehaviorConfig(shots=4, prompts=64, task_seed=0, n=4, temperature=1.0, max_tokens=12),
        sft=replace(sft, model=replace(sft.model, hf_path="pretrained:smollm2_135m_instruct"),
                    data=replace(sft.data, seq_length=512),
                    optim=replace(sft.optim, lr=5e-5, min_lr=5e-6),
                    train=replace(sft.train, steps=12, global_batch_packs=2),
                    logging=replace(sft.logging, histogram_interval=0)),
        rl=replace(rl, model=replace(rl.model, hf_path="pretrained:smollm2_135m_instruct"),
                   task=replace(rl.task, num_shots=0, seed=7),
                   algorithm=replace(rl.algorithm, grpo=replace(rl.algorithm.grpo, kl_coef=0.0)),
                   optim=replace(rl.optim, lr=1e-5),
                   rollout=replace(rl.rollout, prompts_per_step=8, n=4, max_tokens=12),
                   train=replace(rl.train, steps=8, seq_length=256)),
        eval=EvalSettings(size=64, n=4, ks=(1, 4), max_tokens=12, shifted=json.dumps({"products": PRODUCTS_1DIGIT})),
    )


@RECIPES.register
def smollm2_cpu_study() -> StudyConfig:
    """The CPU study of docs/studies/smollm2_cpu_study: 3 seeds x {none, token} (2 cores, < 1 hour)."""
    return _smollm2("smollm2_cpu_study")


@RECIPES.register
def quickstart_study() -> StudyConfig:
    """``make quickstart``: the CPU study's design at a tiny size, one seed (minutes on 2 cores)."""
    cfg = _smollm2("quickstart", out_dir="outputs/quickstart")
    return replace(
        cfg,
        study=replace(cfg.study, seeds=(0,)),
        behavior=replace(cfg.behavior, prompts=32),
        sft=replace(cfg.sft, train=replace(cfg.sft.train, steps=8)),
        rl=replace(cfg.rl, train=replace(cfg.rl.train, steps=4),
                   rollout=replace(cfg.rl.rollout, prompts_per_step=4)),
        eval=replace(cfg.eval, size=24),
    )


@RECIPES.register
def tiny_study() -> StudyConfig:
    """CI: a 6.8M-parameter random model (SmolLM2 tokenizer), 2 arms x 2 seeds, a few steps each.

    The numbers mean nothing (the model answers at random); the test checks the mechanics: every
    stage, the manifest, skipping and resuming, the report."""
    sft = SFT_RECIPES.build("debug_sft")
    rl = RL_RECIPES.build("smollm2_grpo")
    tiny = "pretrained:tiny"
    return StudyConfig(
        study=StudySettings(name="tiny_study", seeds=(0, 1), arms=("none", "token"), sft_recipe="debug_sft",
                            rl_recipe="smollm2_grpo"),
        behavior=BehaviorConfig(shots=2, prompts=8, n=2, max_tokens=8),
        sft=replace(sft, model=replace(sft.model, hf_path=tiny), data=replace(sft.data, seq_length=256),
                    train=replace(sft.train, steps=2, global_batch_packs=1),
                    logging=replace(sft.logging, histogram_interval=0)),
        rl=replace(rl, model=replace(rl.model, hf_path=tiny),
                   task=replace(rl.task, num_shots=0, size=16, task_config=ARITHMETIC_1DIGIT),
                   rollout=replace(rl.rollout, prompts_per_step=2, n=2, max_tokens=8, max_model_len=256,
                                   kv_cache_gib=0.25),
                   train=replace(rl.train, steps=2, seq_length=256)),
        eval=EvalSettings(size=4, n=2, ks=(1, 2), max_tokens=8, shifted=json.dumps({"products": PRODUCTS_1DIGIT})),
    )
