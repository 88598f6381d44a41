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


def _drift_logging(logging):
    """The study's RL diagnostics: the KL to the SFT model at every RL step (its curve), not every
    ``logging.kl_to_init_interval``-th as a plain RL run logs it."""
    return replace(logging, kl_to_init=True, kl_to_init_interval=1)


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
                   rollout=replace(rl.rollout, prompts_per_step=4, n=4, max_tokens=12),
                   train=replace(rl.train, steps=8, seq_length=256),
                   # The refit is checked every 4th step (each check costs ~7 s on 2 cores, a fifth of a step).
                   refit=replace(rl.refit, verify_interval=4),
                   logging=_drift_logging(rl.logging)),
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
        sft=replace(cfg.sft, train=replace(cfg.sft.train, steps=6)),
        rl=replace(cfg.rl, train=replace(cfg.rl.train, steps=3)),
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
                   rollout=replace(rl.rollout, prompts_per_step=2, n=2, max_tokens=8,
                                   engine=replace(rl.rollout.engine, max_model_len=256, kv_cache_gib=0.25)),
                   train=replace(rl.train, steps=2, seq_length=256), logging=_drift_logging(rl.logging)),
        eval=EvalSettings(size=4, n=2, ks=(1, 2), max_tokens=8, shifted=json.dumps({"products": PRODUCTS_1DIGIT})),
    )


# Public config values of Qwen2.5-1.5B-Instruct (planning needs no download).
QWEN25_1P5B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                   num_key_value_heads=2, head_dim=128, vocab_size=151936, tie_word_embeddings=True)


@RECIPES.register
def qwen25_1p5b_logic_gpu_study() -> StudyConfig:
    """NOT RUN (no GPU cluster was available). One 8xH100 node: a 1.5B instruct student on a 7B teacher's samples.

    πβ is Qwen2.5-7B-Instruct (same tokenizer as the student: the stored token ids are trained
    as they are) answering reasoning-gym ``knights_knaves`` with two demonstrations; the student,
    Qwen2.5-1.5B-Instruct, is trained on the zero-shot prompt. Arms: all four PEAR levels and a
    3x-steps plain-SFT arm, 3 seeds; identical GRPO (DAPO-style clip-higher, token-level loss)
    from each; pass@1/pass@8 on held-out knights_knaves and on the shifted zebra_puzzles and
    propositional_logic. Set the model paths, then
    ``python -m pear_mega.study --recipe qwen25_1p5b_logic_gpu_study``.

    Memory per GPU (``pear_mega.plan``: ``plan_memory`` / ``plan_rl`` with the shape in
    ``QWEN25_1P5B``, 80 GiB H100, 4 GiB overhead): SFT at TP=1 x DP=8, two 4096-token packs per GPU,
    distributed optimizer, no recompute: 27.9 GiB (activations 12.0). GRPO at TP=1 x DP=8 with one
    vLLM engine per GPU (gpu_memory_utilization 0.35, allowed range [0.062, 0.662]), reference
    model and update-sparsity copies on the GPU: 55.0 GiB during rollouts, 45.5 GiB while training;
    KV cache 23.1 GiB = 423 full 2048-token sequences. Fits.

    Time (an estimate, not a measurement): behavior data 2048 prompts x 4 answers (~0.6M tokens
    from the 7B at ~2.5k tok/s per GPU on 8 GPUs): ~1 min; SFT 300 steps of 16 x 4096 tokens
    (~6·1.5e9·2e7 FLOPs at 35 % of 8 x 990 TFLOPS): ~1 min plus start-up; GRPO 150 steps of 64
    prompts x 8 samples of <= 1024 tokens (rollout-bound, ~20 s per step): ~50 min per run;
    evaluation 3 suites x 200 prompts x 8 samples on one engine: ~10 min per model. 15 chains
    (5 arms x 3 seeds): ~15 x (50 + 2 x 10 + 5) min ≈ 19 hours on the node.
    """
    sft = SFT_RECIPES.build("qwen3_8b_pear_sft")
    rl = RL_RECIPES.build("llama3_70b_grpo")
    student, teacher = "/models/Qwen2.5-1.5B-Instruct", "/models/Qwen2.5-7B-Instruct"
    logic = json.dumps({})
    return StudyConfig(
        study=StudySettings(name="qwen25_1p5b_logic", out_dir="/checkpoints/studies/qwen25_1p5b_logic",
                            seeds=(0, 1, 2), arms=("none", "token", "block", "sequence", "none_3x"),
                            sft_recipe="qwen3_8b_pear_sft", rl_recipe="llama3_70b_grpo", nproc_per_node=8),
        behavior=BehaviorConfig(model=teacher, shots=2, prompts=2048, task_seed=0, n=4, temperature=1.0,
                                max_tokens=1024),
        sft=replace(sft, model=replace(sft.model, hf_path=student, recompute_activations=False),
                    data=replace(sft.data, seq_length=4096),
                    parallel=replace(sft.parallel, tensor_parallel=1, pipeline_parallel=1),
                    optim=replace(sft.optim, lr=1e-5, min_lr=1e-6, warmup_steps=20),
                    train=replace(sft.train, steps=300, global_batch_packs=16),
                    logging=replace(sft.logging, histogram_interval=50)),
        rl=replace(rl, model=replace(rl.model, hf_path=student, recompute_activations=False),
                   task=replace(rl.task, source="reasoning_gym", tasks=("knights_knaves",), task_config=logic,
                                size=4096, seed=7, num_shots=0, prompts_file=""),
                   rollout=replace(rl.rollout, prompts_per_step=64, n=8, max_tokens=1024, num_engines=0,
                                   engine=replace(rl.rollout.engine, max_model_len=2048, tensor_parallel_size=1,
                                                  gpu_memory_utilization=0.35)),
                   parallel=replace(rl.parallel, tensor_parallel=1, pipeline_parallel=1),
                   algorithm=replace(rl.algorithm, minibatches=1),
                   optim=replace(rl.optim, lr=1e-6),
                   train=replace(rl.train, steps=150, seq_length=4096),
                   refit=replace(rl.refit, tol=0.5, verify_interval=10, bucket_mb=512),
                   logging=replace(_drift_logging(rl.logging), update_sparsity=True)),
        eval=EvalSettings(size=200, n=8, ks=(1, 8), max_tokens=1024,
                          shifted=json.dumps({"zebra_puzzles": {}, "propositional_logic": {}})),
    )
