"""The RL memory plan (pear_mega.plan.plan_rl): hand-computed bytes for a small model, the refusal
of a run that cannot fit (with the numbers), and the 70B GRPO recipe on an 80 GB H100."""

import pytest

from pear_mega.plan import GIB, KNOWN_ARCHS, Layout, RolloutLayout, Shape, check_rl_plan, main, plan_rl

# hidden 64, ffn 128, 2 layers, 4 heads of 16, 2 KV heads, vocab 100, untied
SMALL = Shape(hidden=64, ffn=128, layers=2, heads=4, kv_heads=2, head_dim=16, vocab=100, tied=False)
M = 4 * 2**20  # a 4 MiB "GPU"


def _small(**rollout):
    lay = Layout(tp=1, pp=1, dp=1, seq_length=32, microbatches=1, inplace_loss=False)
    ro = RolloutLayout(engine_tp=2, max_model_len=64, refit_bucket_bytes=2**20, engine_overhead_gib=0.0, **rollout)
    return plan_rl(SMALL, lay, ro, M, overhead_gib=0.0)


def test_small_model_by_hand():
    # layer: 64·(64+2·32) + 64·64 + 3·64·128 + 2·64 = 8192 + 4096 + 24576 + 128 = 36992
    # worst stage (PP=1, untied): 2 layers + embedding + output layer = 73984 + 6400 + 6400 = 86784
    # model: 73984 + 2·6400 + 64 (final norm) = 86848
    p = _small()
    P = 86784
    assert p["params_per_gpu"] == P
    assert (p["weights"], p["grads"], p["optimizer"], p["reference"]) == (2 * P, 4 * P, 12 * P, 2 * P)
    assert p["engine_weights"] == 86848 * 2 / 2
    assert p["kv_per_token"] == 2 * 2 * 1 * 16 * 2  # K and V, 2 layers, 2 KV heads / R=2, head 16, bf16
    resident = 2 * P + 4 * P + 2 * P  # weights, grads, reference (no sparsity copies, no overhead)
    assert p["u_max"] == (M - resident - 12 * P) / M  # = 0.586181640625
    assert p["utilization"] == 0.58  # the largest whole percent under u_max
    assert p["u_min"] == (86848 + 64 * 128) / M
    assert p["phase_rollout"] == pytest.approx(resident + 12 * P + 0.58 * M)
    assert p["phase_refit"] == resident + 12 * P + 86848 + 2 * 2**20
    # activations: 2 layers · 2 bytes · (4·32·64 + 32·(64 + 2·32 + 2·64) + 32·5·128) = 147456
    # loss: logits 32·100·2 bytes, ×2 with the gradient, + 32·4·6 per-token stats = 13568
    assert p["activations"] == 147456 and p["loss"] == 13568
    assert p["phase_train"] == resident + 12 * P + 147456 + 13568
    assert p["kv_cache"] == pytest.approx(0.58 * M - 86848)
    assert p["host"] == 86848  # sleep level 1: the engine weights in host memory
    assert p["fits"] == 1.0


def test_offloaded_optimizer_leaves_the_engine_more():
    P = 86784
    p = _small(offload_optimizer=True, sleep_level=2)
    assert p["u_max"] == (M - 8 * P) / M
    assert p["phase_rollout"] == pytest.approx(8 * P + p["utilization"] * M)
    assert p["phase_train"] == 8 * P + 12 * P + 147456 + 13568  # back on the device for the update
    assert p["host"] == 12 * P  # the optimizer; level 2 keeps no weight copy


def test_utilization_outside_the_plan_does_not_fit():
    assert _small(gpu_memory_utilization=0.6)["fits"] == 0.0  # above u_max = 0.586
    assert _small(gpu_memory_utilization=0.02)["fits"] == 0.0  # below u_min: no room for one sequence


def _rl_config(**engine):
    from pear_mega.rl.config import ModelConfig, RLConfig, RolloutSettings, rl_engine

    return RLConfig(name="small", model=ModelConfig(hf_path="unused", dtype="bfloat16"),
                    rollout=RolloutSettings(max_tokens=16, engine=rl_engine(max_model_len=64, tensor_parallel_size=1,
                                                                            **engine)))


def test_check_rl_plan_refuses_with_the_numbers():
    shape = Shape(hidden=64, ffn=128, layers=2, heads=4, kv_heads=2, head_dim=16, vocab=100, tied=False)
    with pytest.raises(ValueError, match=r"does not fit the GPU memory[\s\S]*\| optimizer \|[\s\S]*DOES NOT FIT in "
                                         r"0\.0 GiB: gpu_memory_utilization 0\.90"):
        check_rl_plan(_rl_config(gpu_memory_utilization=0.9), shape, world_size=1, gpu_mem_bytes=8 * 2**20)
    plan = check_rl_plan(_rl_config(), shape, world_size=1, gpu_mem_bytes=8 * GIB)
    assert 0 < plan["utilization"] <= plan["u_max"]


def test_offload_optimizer_needs_bf16():
    from pear_mega.rl.config import ModelConfig, RLConfig, RolloutSettings

    with pytest.raises(ValueError, match="rollout.offload_optimizer needs model.dtype=bfloat16"):
        RLConfig(model=ModelConfig(hf_path="unused"), rollout=RolloutSettings(offload_optimizer=True))


def test_llama3_70b_grpo_fits_an_80gb_h100(capsys):
    from pear_mega.plan import rl_layouts
    from pear_mega.rl.recipes import RECIPES

    h100 = 79.1 * GIB  # what an 80 GB H100 reports
    shape = Shape.from_hf(KNOWN_ARCHS["llama3_70b_grpo"])
    cfg = RECIPES.build("llama3_70b_grpo", [])
    plan = plan_rl(shape, *rl_layouts(cfg, 32), h100)
    assert plan["fits"] == 1.0 and plan["kv_sequences"] > 64
    # the recipe as it was (optimizer on the device, a reference model, half the GPU for vLLM):
    # ≈ 46 GiB of trainer state + 39.6 GiB of engine while awake: more than the device
    old = RECIPES.build("llama3_70b_grpo", ["rollout.offload_optimizer=false", "logging.kl_to_init=true",
                                            "rollout.engine.gpu_memory_utilization=0.5",
                                            "rollout.engine.sleep_level=1"])
    before = plan_rl(shape, *rl_layouts(old, 32), h100)
    assert before["fits"] == 0.0 and before["phase_rollout"] / GIB == pytest.approx(85.8, abs=0.1)
    assert main(["--recipe", "llama3_70b_grpo", "--gpus", "32", "--gpu-mem-gib", "79.1"]) == 0
    assert "FITS in 79.1 GiB" in capsys.readouterr().out
