"""Named GRPO / PPO recipes: functions returning an ``RLConfig``.

``python -m pear_mega.train_rl --recipe NAME [dotted.key=value ...]``; variants are derived from a
base recipe with ``dataclasses.replace``. ``outputs/`` paths are what ``make quickstart`` writes.
"""

from __future__ import annotations

import json
from dataclasses import replace

from pear_mega.config_tools import RecipeRegistry
from pear_mega.optim import OptimConfig
from pear_mega.parallel import ParallelConfig
from pear_mega.rl.algorithms import GRPOConfig, PPOConfig
from pear_mega.rl.config import (
    AlgorithmConfig,
    CheckpointConfig,
    CriticConfig,
    LoggingConfig,
    ModelConfig,
    RefitConfig,
    RLConfig,
    RolloutSettings,
    TaskConfig,
    TrainConfig,
    rl_engine,
)

RECIPES = RecipeRegistry("rl")

# One-digit additions and subtractions: the task the quickstart's SFT data comes from.
ARITHMETIC_1DIGIT = json.dumps({"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1,
                                "operators": ["+", "-"], "allow_parentheses": False, "allow_negation": False})


@RECIPES.register
def debug_grpo() -> RLConfig:
    """CPU, seconds per step: the 6.8M-parameter random model on the synthetic dense reward.

    Create the model once with ``pear_mega.pretrained.tiny_model("outputs/models/tiny-llama")``.
    The reward (fraction of response tokens in the lower half of the vocabulary) is one a random
    model can raise at a high learning rate (``pear_mega.rl.experience``). The random model's
    logits are nearly flat (std ≈ 0.2 over 49k tokens); sampling — and training, the trainer's
    log-probs use the same temperature — at T = 0.1 makes the policy peaked enough that a group's
    samples share tokens, and the mean reward goes from ≈0.4 to ≈0.9 in about 8 steps.
    """
    return RLConfig(
        name="debug_grpo",
        model=ModelConfig(hf_path="outputs/models/tiny-llama"),
        task=TaskConfig(source="synthetic", size=64, seed=0),
        rollout=RolloutSettings(prompts_per_step=8, n=8, temperature=0.1, max_tokens=8,
                                engine=rl_engine(max_model_len=128, kv_cache_gib=0.25)),
        algorithm=AlgorithmConfig(name="grpo", grpo=GRPOConfig(kl_coef=0.0, tis_cap=2.0)),
        optim=OptimConfig(lr=3e-3, clip_grad=1.0, decay_style="constant"),
        train=TrainConfig(steps=20, seq_length=256),
        refit=RefitConfig(tol=1e-3, num_probes=2),
        checkpoint=CheckpointConfig(dir="outputs/ckpt/debug_grpo", save_interval=10),
        logging=LoggingConfig(tensorboard_dir="outputs/tb/debug_grpo"),
    )


@RECIPES.register
def smollm2_grpo() -> RLConfig:
    """CPU, the quickstart's RL stage: SmolLM2-135M-Instruct (or an SFT export of it) on 2-shot
    one-digit arithmetic, GRPO with a k3 KL loss to the initial policy, a few short steps."""
    return RLConfig(
        name="smollm2_grpo",
        model=ModelConfig(hf_path="outputs/models/smollm2-135m-instruct"),
        task=TaskConfig(source="reasoning_gym", tasks=("basic_arithmetic",), task_config=ARITHMETIC_1DIGIT,
                        size=256, seed=7, num_shots=2),
        rollout=RolloutSettings(prompts_per_step=4, n=4, temperature=1.0, max_tokens=12, stop=("\n",),
                                engine=rl_engine(max_model_len=512)),
        algorithm=AlgorithmConfig(name="grpo", grpo=GRPOConfig(kl_coef=0.01, kl_estimator="k3", kl_mode="loss",
                                                               tis_cap=2.0)),
        optim=OptimConfig(lr=2e-6, warmup_steps=0, clip_grad=1.0, decay_style="constant"),
        train=TrainConfig(steps=4, seq_length=512),
        refit=RefitConfig(tol=2e-3, num_probes=2),
        checkpoint=CheckpointConfig(dir="outputs/ckpt/smollm2_grpo", export_hf="outputs/models/smollm2_grpo"),
        logging=LoggingConfig(tensorboard_dir="outputs/tb/smollm2_grpo"),
    )


def _grpo_variant(name: str, **grpo) -> RLConfig:
    """``smollm2_grpo`` with other GRPO loss settings, its own output paths."""
    base = smollm2_grpo()
    return replace(
        base, name=name, algorithm=replace(base.algorithm, grpo=replace(base.algorithm.grpo, **grpo)),
        checkpoint=CheckpointConfig(dir=f"outputs/ckpt/{name}", export_hf=f"outputs/models/{name}"),
        logging=LoggingConfig(tensorboard_dir=f"outputs/tb/{name}"),
    )


@RECIPES.register
def smollm2_gspo() -> RLConfig:
    """``smollm2_grpo`` with GSPO's sequence-level importance ratios (arXiv 2507.18071): the
    length-normalized sequence log-ratio, clipped per sequence at the paper's ε = 3e-4 / 4e-4, the
    mean over each response's tokens then over responses. Override on any GRPO recipe with
    ``algorithm.grpo.ratio=sequence algorithm.grpo.loss_agg=seq_mean_token_mean``."""
    return _grpo_variant("smollm2_gspo", ratio="sequence", loss_agg="seq_mean_token_mean", clip_eps_low=3e-4,
                         clip_eps_high=4e-4)


@RECIPES.register
def smollm2_grpo_seq_mean() -> RLConfig:
    """``smollm2_grpo`` with the original GRPO loss aggregation (DeepSeekMath, arXiv 2402.03300,
    Eq. 3): the mean over each response's tokens, then over responses
    (``algorithm.grpo.loss_agg=seq_mean_token_mean``)."""
    return _grpo_variant("smollm2_grpo_seq_mean", loss_agg="seq_mean_token_mean")


@RECIPES.register
def smollm2_dr_grpo() -> RLConfig:
    """``smollm2_grpo`` as Dr.GRPO (arXiv 2503.20783): mean-centered advantages without the std
    division and the constant normalizer number of responses × ``rollout.max_tokens``
    (``algorithm.grpo.normalize_std=false algorithm.grpo.loss_agg=seq_mean_token_sum_norm``)."""
    return _grpo_variant("smollm2_dr_grpo", normalize_std=False, loss_agg="seq_mean_token_sum_norm")


@RECIPES.register
def smollm2_ppo() -> RLConfig:
    """CPU: the same task with PPO — a critic (SmolLM2 trunk + scalar head), GAE, KL as a token
    reward penalty, 2 minibatches per rollout batch."""
    base = smollm2_grpo()
    return replace(
        base, name="smollm2_ppo",
        algorithm=AlgorithmConfig(name="ppo", ppo=PPOConfig(kl_coef=0.02, kl_estimator="k1", kl_mode="reward",
                                                            gamma=1.0, lam=0.95, value_clip=0.2),
                                  minibatches=2),
        critic=CriticConfig(optim=OptimConfig(lr=1e-5, clip_grad=1.0, decay_style="constant")),
        checkpoint=CheckpointConfig(dir="outputs/ckpt/smollm2_ppo", export_hf="outputs/models/smollm2_ppo"),
        logging=LoggingConfig(tensorboard_dir="outputs/tb/smollm2_ppo"),
    )


@RECIPES.register
def llama3_70b_grpo() -> RLConfig:
    """4 nodes x 8 H100: Llama-3-70B-Instruct, bf16, trainer TP=8 x PP=4, DAPO-style GRPO on
    math (clip-higher, dynamic sampling, soft over-long penalty, token-level loss).

    Rollouts: four vLLM engines of tensor parallel size 8, one per node, inside the trainer
    processes (``pear_mega.rl.engine_group``); each samples a quarter of the prompts. The engines
    sleep during training at level 2 (weights discarded, KV cache freed: every wake follows a
    refit), each refit broadcasts the full bf16 HF tensors (~141 GB in 1 GiB buckets) to every
    rank, and every engine is verified against the trainer on probe prompts every 10 steps.

    Memory (``python -m pear_mega.plan --recipe llama3_70b_grpo --gpus 32 --gpu-mem-gib 79.1``):
    with DP = 1 the optimizer state is 25.4 GiB per GPU, so it lives in host memory while the
    engine is awake (``rollout.offload_optimizer``); no reference model is kept (the KL coefficient
    is 0 and ``logging.kl_to_init`` is off); the engine's share of the GPU is the largest the plan
    leaves (``rollout.engine.gpu_memory_utilization=0``), checked again on the device at start-up. Launch with
    ``torchrun --nnodes 4 --nproc-per-node 8 -m pear_mega.train_rl --recipe llama3_70b_grpo``
    (the rendezvous flags of ``examples/pear_70b.sh``). Not run: no GPU cluster was available.
    """
    return RLConfig(
        name="llama3_70b_grpo",
        model=ModelConfig(hf_path="/models/Llama-3.3-70B-Instruct", dtype="bfloat16", recompute_activations=True,
                          use_te=True),
        task=TaskConfig(source="jsonl", prompts_file="/data/rl/math_train.jsonl", num_shots=0, seed=0),
        rollout=RolloutSettings(prompts_per_step=64, n=16, temperature=1.0, max_tokens=4096, offload_optimizer=True,
                                num_engines=0,
                                engine=rl_engine(max_model_len=6144, gpu_memory_utilization=0.0, sleep_level=2,
                                                 enforce_eager=False, tensor_parallel_size=8)),
        algorithm=AlgorithmConfig(
            name="grpo", minibatches=4,
            grpo=GRPOConfig(clip_eps_low=0.2, clip_eps_high=0.28, kl_coef=0.0, tis_cap=2.0, dynamic_sampling=True,
                            overlong_mode="soft_penalty", overlong_buffer=512)),
        parallel=ParallelConfig(tensor_parallel=8, pipeline_parallel=4),
        optim=OptimConfig(lr=1e-6, warmup_steps=10, weight_decay=0.01, clip_grad=1.0, decay_style="constant",
                          use_distributed_optimizer=True),
        train=TrainConfig(steps=500, seq_length=8192),
        refit=RefitConfig(tol=1.0, verify_interval=10, bucket_mb=1024),
        checkpoint=CheckpointConfig(dir="/checkpoints/llama3_70b_grpo", save_interval=20),
        logging=LoggingConfig(tensorboard_dir="/checkpoints/llama3_70b_grpo/tb", update_sparsity=False,
                              kl_to_init=False),
    )
