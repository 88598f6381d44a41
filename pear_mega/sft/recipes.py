"""Named PEAR-SFT recipes: functions returning an ``SFTConfig``.

``python -m pear_mega.train_sft --recipe NAME [dotted.key=value ...]``. Variants are derived from a
base recipe in a few lines with ``dataclasses.replace``. Paths under ``outputs/`` are what
``make quickstart`` and ``tools/collect_logprobs.py`` write; override them for your own data.
"""

from __future__ import annotations

from dataclasses import replace

from pear_mega.config_tools import RecipeRegistry
from pear_mega.kd import KDConfig
from pear_mega.optim import OptimConfig
from pear_mega.parallel import ParallelConfig
from pear_mega.pear import PearConfig
from pear_mega.sft.config import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    LossConfig,
    ModelConfig,
    SFTConfig,
    TrainConfig,
)

RECIPES = RecipeRegistry("sft")


@RECIPES.register
def debug_sft() -> SFTConfig:
    """CPU, seconds per step: a 6.8M-parameter random model with the SmolLM2 tokenizer."""
    return SFTConfig(
        name="debug_sft",
        model=ModelConfig(hf_path="outputs/models/tiny-llama"),
        data=DataConfig(train_files=("outputs/data/behavior.jsonl",), seq_length=256),
        pear=PearConfig(level="token"),
        optim=OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=2, clip_grad=1.0),
        train=TrainConfig(steps=20, global_batch_packs=2),
        checkpoint=CheckpointConfig(dir="outputs/ckpt/debug_sft", save_interval=10),
        logging=LoggingConfig(tensorboard_dir="outputs/tb/debug_sft"),
    )


@RECIPES.register
def smollm2_pear_sft() -> SFTConfig:
    """CPU: the pretrained SmolLM2-135M-Instruct on its own sampled answers (the quickstart)."""
    return SFTConfig(
        name="smollm2_pear_sft",
        model=ModelConfig(hf_path="outputs/models/smollm2-135m-instruct"),
        data=DataConfig(train_files=("outputs/data/behavior.jsonl",), seq_length=512),
        pear=PearConfig(level="token"),
        optim=OptimConfig(lr=2e-5, min_lr=2e-6, warmup_steps=2, clip_grad=1.0),
        train=TrainConfig(steps=12, global_batch_packs=2),
        checkpoint=CheckpointConfig(dir="outputs/ckpt/smollm2_pear_sft", export_hf="outputs/models/smollm2_pear_sft"),
        logging=LoggingConfig(tensorboard_dir="outputs/tb/smollm2_pear_sft"),
    )


@RECIPES.register
def smollm2_plain_sft() -> SFTConfig:
    """The plain-SFT baseline of ``smollm2_pear_sft``: identical except every weight is 1."""
    base = smollm2_pear_sft()
    return replace(
        base, name="smollm2_plain_sft", pear=replace(base.pear, level="none"),
        checkpoint=CheckpointConfig(dir="outputs/ckpt/smollm2_plain_sft", export_hf="outputs/models/smollm2_plain_sft"),
        logging=LoggingConfig(tensorboard_dir="outputs/tb/smollm2_plain_sft"),
    )


@RECIPES.register
def qwen3_8b_pear_sft() -> SFTConfig:
    """One 8xH100 node: Qwen3-8B, bf16, TP=2 x DP=4, 8k-token packs, distributed optimizer."""
    return SFTConfig(
        name="qwen3_8b_pear_sft",
        model=ModelConfig(hf_path="/models/Qwen3-8B", dtype="bfloat16", use_te=True),
        data=DataConfig(train_files=("/data/pear/train.jsonl",), seq_length=8192),
        pear=PearConfig(level="block", block_size=4),
        parallel=ParallelConfig(tensor_parallel=2, pipeline_parallel=1),
        optim=OptimConfig(lr=1e-5, min_lr=1e-6, warmup_steps=50, weight_decay=0.01, use_distributed_optimizer=True),
        train=TrainConfig(steps=2000, global_batch_packs=64),
        checkpoint=CheckpointConfig(dir="/checkpoints/qwen3_8b_pear_sft", save_interval=200),
        logging=LoggingConfig(tensorboard_dir="/checkpoints/qwen3_8b_pear_sft/tb"),
    )


@RECIPES.register
def smollm2_pear_kd() -> SFTConfig:
    """CPU: ``smollm2_pear_sft`` with PEAR on the top-32 distillation loss (``topk_tail``) instead of the
    NLL, on answers whose top-32 was stored when they were sampled. The teacher is the same model at
    temperature 0.7 (the stored top-32 is that of the sampling distribution), so the student learns
    its sharper distribution; a pipeline demo that runs on CPU::

        python tools/collect_logprobs.py generate --model outputs/models/smollm2-135m-instruct \\
            --reasoning-gym basic_arithmetic --size 32 -n 4 --temperature 0.7 --max-tokens 16 --top-k 32 \\
            --out outputs/data/behavior_top32.jsonl
    """
    base = smollm2_pear_sft()
    return replace(
        base, name="smollm2_pear_kd", data=replace(base.data, train_files=("outputs/data/behavior_top32.jsonl",)),
        loss=LossConfig(kind="kd", kd=KDConfig(mode="topk_tail")),
        checkpoint=CheckpointConfig(dir="outputs/ckpt/smollm2_pear_kd", export_hf="outputs/models/smollm2_pear_kd"),
        logging=LoggingConfig(tensorboard_dir="outputs/tb/smollm2_pear_kd"),
    )


@RECIPES.register
def qwen3_8b_pear_kd() -> SFTConfig:
    """``qwen3_8b_pear_sft`` distilled from a teacher's stored top-32 (``topk_tail`` KL plus 0.1 × the
    NLL of the data's tokens), e.g. scored by a larger model::

        python tools/collect_logprobs.py score --model /models/Qwen3-32B --data /data/pear/train.jsonl \\
            --top-k 32 --out /data/pear/train_top32.parquet
    """
    base = qwen3_8b_pear_sft()
    return replace(
        base, name="qwen3_8b_pear_kd", data=replace(base.data, train_files=("/data/pear/train_top32.parquet",)),
        loss=LossConfig(kind="kd", kd=KDConfig(mode="topk_tail", kl_weight=1.0, nll_weight=0.1)),
        checkpoint=CheckpointConfig(dir="/checkpoints/qwen3_8b_pear_kd", save_interval=200),
        logging=LoggingConfig(tensorboard_dir="/checkpoints/qwen3_8b_pear_kd/tb"),
    )


@RECIPES.register
def llama3_70b_pear_sft() -> SFTConfig:
    """4 nodes x 8 H100 (80 GB): Llama-3-70B, bf16, TP=8 x PP=4 x DP=1, recompute, 8k packs.

    ``python -m pear_mega.plan --recipe llama3_70b_pear_sft`` prints the per-GPU memory budget.
    """
    return SFTConfig(
        name="llama3_70b_pear_sft",
        model=ModelConfig(hf_path="/models/Llama-3.3-70B-Instruct", dtype="bfloat16", recompute_activations=True,
                          use_te=True),
        data=DataConfig(train_files=("/data/pear/train.jsonl",), seq_length=8192),
        pear=PearConfig(level="block", block_size=4),
        parallel=ParallelConfig(tensor_parallel=8, pipeline_parallel=4),
        optim=OptimConfig(lr=5e-6, min_lr=5e-7, warmup_steps=50, weight_decay=0.01, use_distributed_optimizer=True),
        train=TrainConfig(steps=1000, global_batch_packs=64),
        checkpoint=CheckpointConfig(dir="/checkpoints/llama3_70b_pear_sft", save_interval=100),
        logging=LoggingConfig(tensorboard_dir="/checkpoints/llama3_70b_pear_sft/tb"),
    )
