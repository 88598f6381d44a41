"""PEAR on the distillation loss in the SFT trainer (``loss.kind=kd``), real megatron-core on gloo.

- one step's loss equals an independent reference: transformers' forward on the same packs + the
  float64 ``reference_pear_kd_loss``; the KD metrics (KL, head + tail, teacher / student mass, top-K
  overlap) agree with that reference;
- TP=2 gives the losses and KD metrics of TP=1 (the overlap gathers the student's top-K over shards);
- loss.kind=kd on data without a stored top-K stops with a message naming the key and the files.
"""

import json
import random

import pytest
import torch

from tests.sft.conftest import run_sft

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

K = 4


@pytest.fixture(scope="module")
def kd_data(sft_assets, tmp_path_factory):
    """The trainer tests' rows plus a pseudo-random teacher top-K per response token (some shorter)."""
    rng = random.Random(7)
    path = tmp_path_factory.mktemp("kd_data") / "behavior_top4.jsonl"
    with open(sft_assets["data"]) as src, open(path, "w") as dst:
        for line in src:
            row = json.loads(line)
            ids, lps = [], []
            for _ in row["response_token_ids"]:
                k = rng.choice([K, K, K, 2])
                ids.append(rng.sample(range(200), k))  # small ids: the tiny model's vocab is SmolLM2's
                mass = [rng.uniform(0.05, 0.2) for _ in range(k)]
                lps.append(sorted((round(float(torch.tensor(m).log()), 5) for m in mass), reverse=True))
            row["response_topk_ids"], row["response_topk_logprobs"] = ids, lps
            dst.write(json.dumps(row) + "\n")
    return path


def _args(assets, data, tmp_path, name, extra=()):
    return [f"model.hf_path={assets['model']}", f'data.train_files=["{data}"]', "data.seq_length=128",
            "train.steps=1", "train.global_batch_packs=2", "optim.warmup_steps=0", f"checkpoint.dir={tmp_path / name}",
            "checkpoint.save_interval=0", "logging.progress_bar=false", "loss.kind=kd", "loss.kd.nll_weight=0.25",
            *extra]  # fmt: skip


def _reference(assets, data):
    """(loss, per-token sums) of the first step: HF forward + reference_pear_kd_loss on its two packs."""
    from transformers import AutoModelForCausalLM

    from pear_mega.data import PackSource
    from pear_mega.kd import KDConfig, reference_pear_kd_loss
    from pear_mega.pear import PearConfig

    hf = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32).eval()
    source = PackSource(train_files=[str(data)], tokenizer_path=str(assets["model"]), seq_length=128, seed=1234)
    kd = KDConfig(mode="topk_tail", nll_weight=0.25)
    total, count, sums = 0.0, 0, dict(kl=0.0, tail=0.0, p=0.0, q=0.0)
    for _ in range(2):
        p = source.next_pack()
        cu = p["cu_seqlens"].tolist()
        with torch.no_grad():
            logits = torch.cat([hf(p["tokens"][a:b].unsqueeze(0)).logits[0] for a, b in zip(cu[:-1], cu[1:])])
            out = reference_pear_kd_loss(logits, p["labels"], p["behavior_logprobs"], p["topk_ids"],
                                         p["topk_logprobs"], p["cu_seqlens"], PearConfig(level="token"), kd,
                                         normalizer=1.0)  # fmt: skip
        total += float(out.loss)
        count += int((p["labels"] != -100).sum())
        for key, value in (("kl", out.kd), ("tail", out.kd_tail), ("p", out.teacher_mass), ("q", out.student_mass)):
            sums[key] += float(value.double().sum())
    return total / count, {k: v / count for k, v in sums.items()}


@pytest.mark.timeout(600)
def test_kd_loss_matches_reference_and_tp2(sft_assets, kd_data, tmp_path):
    tp1 = run_sft(tmp_path, 1, _args(sft_assets, kd_data, tmp_path, "tp1"))["history"][0]
    loss, per_token = _reference(sft_assets, kd_data)
    print(f"trainer {tp1['train/loss']:.6f} reference {loss:.6f}")
    assert tp1["train/loss"] == pytest.approx(loss, abs=2e-5)
    assert tp1["kd/kl"] == pytest.approx(per_token["kl"], abs=2e-5)
    assert tp1["kd/kl_tail"] == pytest.approx(per_token["tail"], abs=2e-5)
    assert tp1["kd/kl_head"] + tp1["kd/kl_tail"] == pytest.approx(tp1["kd/kl"], abs=1e-9)
    assert tp1["kd/teacher_mass"] == pytest.approx(per_token["p"], abs=1e-6)
    assert tp1["kd/student_mass"] == pytest.approx(per_token["q"], abs=1e-6)
    assert 0.0 <= tp1["kd/topk_overlap"] <= 1.0 and "train/entropy" not in tp1
    tp2 = run_sft(tmp_path, 2, _args(sft_assets, kd_data, tmp_path, "tp2", ["parallel.tensor_parallel=2"]))
    for key in ("train/loss", "train/nll", "kd/kl", "kd/kl_tail", "kd/teacher_mass", "kd/student_mass",
                "kd/topk_overlap", "pear/weight_mean"):
        assert tp2["history"][0][key] == pytest.approx(tp1[key], abs=2e-5), key


@pytest.mark.timeout(300)
def test_kd_needs_a_stored_top_k(sft_assets, tmp_path):
    with pytest.raises(AssertionError, match=r"loss\.kind=kd needs a teacher top-K with every row of data\.train_files"):
        run_sft(tmp_path, 1, _args(sft_assets, sft_assets["data"], tmp_path, "no_topk"))
