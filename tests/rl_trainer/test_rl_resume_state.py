"""RL resume restores the checkpoint's RNG after the rollout engine's start (which reseeds torch)."""

import pytest

from tests.rl_trainer.conftest import RUNNER, run_rl

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


@pytest.mark.timeout(900)
def test_rl_resume_restores_rng_after_engine_start(rl_model, tmp_path):
    base = [f"model.hf_path={rl_model}", "rollout.stop=[\"e\"]", f"checkpoint.dir={tmp_path / 'ckpt'}",
            "logging.tensorboard_dir=", "logging.progress_bar=false", "parallel.timeout_s=180"]
    run_rl(tmp_path, 1, [*base, "train.steps=1"], timeout=400)
    got = run_rl(tmp_path, 1, [*base, "train.steps=2"], timeout=400,
                 runner=RUNNER.with_name("resume_state_runner.py"))
    assert got["step"] == 1
    assert got["torch_rng_restored"], "the engine's start overwrote the restored RNG state"
    assert got["data_state"]["prompts"]["cursor"] > 0  # the prompt position came back from trainer_state.json
