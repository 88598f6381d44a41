"""Config values refused at config time (naming the key), the command line's error handling,
the schedule a resume uses, pickle-free RNG state and the checkpoint-directory lock (in process)."""

import json
import math
import subprocess
import sys

import pytest
import torch

from pear_mega.config_tools import apply_overrides, run_recipe_cli
from pear_mega.optim import OptimConfig, TrainingStopped
from pear_mega.sft.recipes import RECIPES


@pytest.mark.parametrize(("override", "message"), [
    ("optim.lr=inf", "optim.lr must be a finite number > 0, got inf"),
    ("optim.lr=1e39", "optim.lr must be a finite number > 0, got 1e+39"),  # finite in Python, inf in float32
    ("optim.lr=nan", "optim.lr must be a finite number > 0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay must be a finite number >= 0"),
    ("optim.adam_eps=-1e-8", "optim.adam_eps must be a finite number > 0"),
    ("optim.adam_eps=0", "optim.adam_eps must be a finite number > 0"),
    ("optim.clip_grad=inf", "optim.clip_grad must be a finite number >= 0"),
    ("train.log_interval=0", "train.log_interval must be >= 1"),
    ("logging.histogram_interval=-1", "logging.histogram_interval must be >= 0"),
    ("pear.delta_clip=[-0.1,nan]", "delta_clip"),
])
def test_bad_values_are_refused_naming_the_key(override, message):
    with pytest.raises(ValueError, match=message.replace("+", r"\+")) as info:
        RECIPES.build("debug_sft", [override])
    assert "JSONDecodeError" not in repr(info.value) and "Expecting value" not in str(info.value)


def test_run_level_checks_see_the_final_config(tmp_path):
    from pear_mega.pretrained import tiny_model

    model = tiny_model(tmp_path / "m", hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1)
    base = [f"model.hf_path={model}"]
    # the override order does not matter: warmup is checked against the final train.steps
    RECIPES.build("debug_sft", [*base, "train.steps=1", "optim.warmup_steps=0"]).validate_run()
    with pytest.raises(ValueError, match=r"optim.warmup_steps \(2\) exceeds the run's 1 optimizer steps \(train.steps\)"):
        RECIPES.build("debug_sft", [*base, "train.steps=1"]).validate_run()
    limit = json.loads((model / "config.json").read_text())["max_position_embeddings"]
    with pytest.raises(ValueError, match=rf"data.seq_length={limit + 1} exceeds the model's max_position_embeddings={limit}"):
        RECIPES.build("debug_sft", [*base, f"data.seq_length={limit + 1}"]).validate_run()


def _cli(*args, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pear_mega.train_sft", *args], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    return proc.returncode, proc.stdout, proc.stderr


def test_cli_prints_a_config_error_alone_with_status_2(tmp_path):
    rc, _, err = _cli("--recipe", "debug_sft", "train.log_interval=0", tmp_path=tmp_path)
    assert rc == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.strip().endswith(": error: train.log_interval must be >= 1, got 0")


def test_cli_accepts_overrides_after_options(tmp_path, capsys):
    run_recipe_cli("doc", RECIPES, lambda cfg: None,
                   ["--recipe", "debug_sft", "--metrics-out", str(tmp_path / "m.jsonl"), "train.steps=7",
                    "--print-config", "optim.lr=0.002"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["train"]["steps"] == 7 and printed["optim"]["lr"] == 0.002


class _StoppingTrainer:
    """Logs two steps through a real MetricsWriter, then stops as a diverged run does."""

    def __init__(self, cfg):
        from pear_mega.metrics_log import MetricsWriter

        self.metrics = MetricsWriter(0, 3, progress_bar=False)
        self.closed = False

    def train(self):
        self.metrics.log(1, {"train/loss": 1.0})
        self.metrics.log(2, {"train/loss": 0.5})
        raise TrainingStopped("step 3: the optimizer update made parameters non-finite")

    def close(self):
        self.closed = True


def test_metrics_are_written_as_the_run_goes_and_a_stopped_run_exits_1(tmp_path, monkeypatch, capsys):
    from pear_mega.pretrained import tiny_model

    model = tiny_model(tmp_path / "m", hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1)
    out = tmp_path / "metrics.jsonl"
    made = []

    def make(cfg):
        made.append(_StoppingTrainer(cfg))
        return made[-1]

    with pytest.raises(SystemExit) as info:
        run_recipe_cli("doc", RECIPES, make, ["--recipe", "debug_sft", "--metrics-out", str(out),
                                              f"model.hf_path={model}"])
    assert info.value.code == 1
    assert "step 3: the optimizer update made parameters non-finite" in capsys.readouterr().err
    assert [json.loads(line)["step"] for line in out.read_text().splitlines()] == [1, 2]
    assert made[0].closed


def _scheduler(cfg: OptimConfig, steps: int):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    # megatron's param groups carry max_lr / min_lr, which the scheduler prefers to its own
    opt = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(2))], "max_lr": cfg.lr,
                              "min_lr": cfg.min_lr}], lr=cfg.lr)
    decay = max(steps, cfg.warmup_steps + 1)
    return OptimizerParamScheduler(opt, init_lr=0.0 if cfg.warmup_steps else cfg.lr, max_lr=cfg.lr,
                                   min_lr=cfg.min_lr, lr_warmup_steps=cfg.warmup_steps, lr_decay_steps=decay,
                                   lr_decay_style=cfg.decay_style, start_wd=cfg.weight_decay,
                                   end_wd=cfg.weight_decay, wd_incr_steps=decay, wd_incr_style="constant"), opt


def test_resume_uses_the_configs_schedule_unless_told_to_keep_the_checkpoints():
    from pear_mega.optim import restore_schedule, schedule_group_settings

    old, _ = _scheduler(OptimConfig(lr=10.0, min_lr=0.0, warmup_steps=2), steps=8)
    old.step(increment=4)
    saved = json.loads(json.dumps(old.state_dict()))  # as stored in trainer_state.json

    saved_groups = [{"max_lr": 10.0, "min_lr": 0.0}]  # what the optimizer's own load brings back

    new, opt = _scheduler(OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=2), steps=20)
    config_groups = schedule_group_settings(opt)
    opt.param_groups[0].update(saved_groups[0])
    changes = restore_schedule(new, saved, keep_schedule=False, config_groups=config_groups)
    assert "optim.lr: 10.0 -> 0.001" in changes and "decay length (train.steps): 8 -> 20" in changes
    # step 4 of a 20-step cosine after 2 warmup steps: 2 of 18 decay steps done
    expected = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * 2 / 18))
    assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12) and new.num_steps == 4

    kept, opt = _scheduler(OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=2), steps=20)
    config_groups = schedule_group_settings(opt)
    opt.param_groups[0].update(saved_groups[0])
    changes = restore_schedule(kept, saved, keep_schedule=True, config_groups=config_groups)
    assert "optim.lr: 10.0 -> 10.0 (config: 0.001)" in changes
    expected = 0.5 * 10.0 * (1 + math.cos(math.pi * 2 / 6))
    assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)


def test_rng_state_round_trips_through_safetensors(tmp_path):
    import random

    import numpy as np
    from safetensors.torch import load_file, save_file

    from pear_mega.checkpointing import rng_state, set_rng_state

    random.seed(3)
    random.gauss(0, 1)  # a cached gaussian in python's state
    np.random.seed(4)
    np.random.standard_normal()
    torch.manual_seed(5)
    save_file(rng_state(), str(tmp_path / "rng.safetensors"))
    expected = (random.random(), random.gauss(0, 1), np.random.standard_normal(), torch.rand(3))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    set_rng_state(load_file(str(tmp_path / "rng.safetensors")))
    got = (random.random(), random.gauss(0, 1), np.random.standard_normal(), torch.rand(3))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


def test_checkpoint_dir_lock_names_its_holder(tmp_path):
    from pear_mega.checkpointing import CheckpointDirLocked, try_lock_dir

    code = ("import sys, time; from pear_mega.checkpointing import try_lock_dir; "
            f"f = try_lock_dir({str(tmp_path)!r}); print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CheckpointDirLocked, match=rf"checkpoint.dir {tmp_path} is in use by pid {holder.pid} on host"):
            try_lock_dir(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    lock = try_lock_dir(tmp_path)  # free again once the holder is gone
    lock.close()


def test_delta_clip_list_parses_without_json():
    cfg = apply_overrides(RECIPES.build("debug_sft"), ["pear.delta_clip=[-0.1,0.2]"])
    assert cfg.pear.delta_clip == (-0.1, 0.2)
