"""The PEAR-SFT trainer on real megatron-core (gloo, CPU), launched under torchrun.

What is checked:
- the trainer's loss on a step equals an independent reference (HF transformers forward +
  the pure-PyTorch PEAR reference) for PEAR and for plain SFT, and the two differ as the math says;
- TP=1, TP=2, PP=2 and DP=2 give the same losses for the same global batch;
- resuming from a checkpoint continues bit-identically;
- a crash while saving leaves the previous checkpoint published and loadable;
- non-finite steps are not applied, and repeated ones stop the run with the checkpoint intact.
"""

import json

import pytest
import torch

from tests.sft.conftest import run_sft

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def _base(assets, tmp_path, name, steps=3, extra=()):
    return [
        f"model.hf_path={assets['model']}",
        f'data.train_files=["{assets["data"]}"]',
        "data.seq_length=128",
        f"train.steps={steps}",
        "train.global_batch_packs=2",
        f"checkpoint.dir={tmp_path / name}",
        "checkpoint.save_interval=0",
        f"logging.tensorboard_dir={tmp_path / ('tb_' + name)}",
        "logging.progress_bar=false",
        *extra,
    ]


def _losses(result):
    return [h["train/loss"] for h in result["history"]]


@pytest.fixture(scope="module")
def baseline(sft_assets, tmp_path_factory):
    """TP=1, 5 steps, PEAR token level, checkpoints every 2 steps: the run the others compare with."""
    tmp_path = tmp_path_factory.mktemp("baseline")
    return run_sft(tmp_path, 1, _base(sft_assets, tmp_path, "full", steps=5, extra=["checkpoint.save_interval=2"]))


@pytest.mark.timeout(600)
def test_parallel_layouts_give_identical_losses(sft_assets, tmp_path, baseline):
    # 5 steps x 2 packs cross the end of the first epoch (9 packs, odd): the data of a step must not
    # depend on the data-parallel layout there either.
    ref = baseline
    layouts = {
        "tp2": (2, ["parallel.tensor_parallel=2"]),
        "pp2": (2, ["parallel.pipeline_parallel=2"]),
        "dp2": (2, []),
        "dp2_distributed_optimizer": (2, ["optim.use_distributed_optimizer=true", "checkpoint.save_interval=2"]),
    }
    for name, (nproc, extra) in layouts.items():
        got = run_sft(tmp_path, nproc, _base(sft_assets, tmp_path, name, steps=5, extra=extra))
        diff = max(abs(a - b) for a, b in zip(_losses(ref), _losses(got)))
        print(f"{name}: losses {_losses(got)} vs TP=1 {_losses(ref)}; max diff {diff:.2e}")
        assert len(got["history"]) == 5
        assert diff <= 1e-5, name
        # PEAR statistics come from the same tokens whatever the layout.
        assert got["history"][-1]["pear/weight_mean"] == pytest.approx(ref["history"][-1]["pear/weight_mean"], abs=1e-5)


@pytest.mark.timeout(600)
def test_resume_is_bit_identical_and_interrupted_save_is_atomic(sft_assets, tmp_path, baseline):
    full = baseline
    # Same run, but the save at step 4 crashes between writing and publishing the checkpoint.
    crashed = run_sft(tmp_path, 1, _base(sft_assets, tmp_path, "resumed", steps=5,
                                         extra=["checkpoint.save_interval=2"]), "--crash-in-save-at", "4")
    assert "simulated crash" in crashed["error"]
    ckpt = tmp_path / "resumed"
    assert (ckpt / "latest").read_text() == "iter_0000002"
    assert (ckpt / "iter_0000004.tmp").exists() and not (ckpt / "iter_0000004").exists()
    # Resume from the published step-2 checkpoint and finish: the trajectory is the uninterrupted one.
    resumed = run_sft(tmp_path, 1, _base(sft_assets, tmp_path, "resumed", steps=5,
                                         extra=["checkpoint.save_interval=2"]))
    assert [h["step"] for h in resumed["history"]] == [3, 4, 5]
    assert _losses(resumed) == _losses(full)[2:], "resume must continue bit-identically"
    assert resumed["param_sums"] == full["param_sums"]
    assert (ckpt / "latest").read_text() == "iter_0000005"
    assert not (ckpt / "iter_0000004.tmp").exists()  # stale partial saves are cleaned up


@pytest.mark.timeout(600)
def test_non_finite_steps_are_skipped_then_stop_the_run(sft_assets, tmp_path, baseline):
    clean = baseline
    one_bad = run_sft(tmp_path, 1, _base(sft_assets, tmp_path, "one_bad", steps=3), "--nan-steps", "2")
    applied = [h["train/step_applied"] for h in one_bad["history"]]
    assert applied == [1.0, 0.0, 1.0]
    assert one_bad["error"] is None
    # A skipped step leaves the weights as they were: step 3 then sees step-1 weights.
    assert _losses(one_bad)[0] == _losses(clean)[0]
    assert _losses(one_bad)[2] != _losses(clean)[2]

    stopped = run_sft(tmp_path, 1, _base(sft_assets, tmp_path, "stopped", steps=6,
                                         extra=["checkpoint.save_interval=1", "train.max_bad_steps=2"]),
                      "--nan-steps", "3,4,5,6")
    assert stopped["error"].startswith("NonFiniteError") and "iter_0000002" in stopped["error"]
    assert (tmp_path / "stopped" / "latest").read_text() == "iter_0000002"
    assert len(stopped["history"]) == 3  # steps 1, 2 logged, step 3 logged; step 4 raised before logging


@pytest.mark.timeout(300)
def test_pear_and_plain_sft_losses_match_an_independent_reference(sft_assets, tmp_path, baseline):
    """One step's loss from the trainer vs transformers + the loop reference on the same packs."""
    from transformers import AutoModelForCausalLM

    from pear_mega.data import PackSource
    from pear_mega.pear import PearConfig, reference_pear_loss

    hf = AutoModelForCausalLM.from_pretrained(sft_assets["model"], dtype=torch.float32).eval()
    source = PackSource(train_files=[str(sft_assets["data"])], tokenizer_path=str(sft_assets["model"]),
                        seq_length=128, seed=1234)
    packs = [source.next_pack() for _ in range(2)]

    def reference(level):
        cfg = PearConfig(level=level)
        total, count = 0.0, 0
        for p in packs:
            cu = p["cu_seqlens"].tolist()
            logits = torch.cat([hf(p["tokens"][a:b].unsqueeze(0)).logits[0] for a, b in zip(cu[:-1], cu[1:])]
                               + ([hf(p["tokens"][cu[-1]:].unsqueeze(0)).logits[0]] if cu[-1] < len(p["tokens"]) else []))
            with torch.no_grad():
                out = reference_pear_loss(logits, p["labels"], p["behavior_logprobs"], p["cu_seqlens"], cfg,
                                          normalizer=1.0)
            total += float(out.loss)
            count += int((p["labels"] != -100).sum())
        return total / count

    results = {}
    for level in ("token", "none"):
        got = baseline if level == "token" else run_sft(
            tmp_path, 1, _base(sft_assets, tmp_path, f"ref_{level}", steps=1,
                                    extra=[f"pear.level={level}", "optim.warmup_steps=0"]))
        results[level] = got["history"][0]
        expected = reference(level)
        print(f"{level}: trainer {got['history'][0]['train/loss']:.6f} reference {expected:.6f}")
        assert got["history"][0]["train/loss"] == pytest.approx(expected, abs=2e-5)
    # Plain SFT is the loss-token mean NLL; PEAR reweights the same NLLs by weights G <= e^5, here < 1.
    assert results["none"]["train/loss"] == pytest.approx(results["none"]["train/nll"], abs=1e-6)
    assert results["token"]["train/nll"] == pytest.approx(results["none"]["train/nll"], abs=1e-6)
    assert results["token"]["pear/weight_mean"] < 1.0
    assert results["token"]["train/loss"] < results["none"]["train/loss"]
    assert json.dumps(results)  # metrics are plain numbers
