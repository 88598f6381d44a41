"""The SFT loss seam without megatron: loss.kind config, the recipes, and the loss objects on one pack
(against the references and a brute-force top-K overlap)."""

from types import SimpleNamespace

import pytest
import torch

from pear_mega.kd import KDConfig, reference_pear_kd_loss
from pear_mega.pear import PearConfig, reference_pear_loss
from pear_mega.sft.config import LossConfig
from pear_mega.sft.losses import PearKDLoss, PearNLLLoss
from pear_mega.sft.recipes import RECIPES

CTX = SimpleNamespace(tp_size=1, tp_rank=0, tp_group=None)


def _pack(T=24, V=50, K=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (T,), generator=gen)
    labels[[0, 7, 8, 23]] = -100
    ids = torch.stack([torch.randperm(V, generator=gen)[:K] for _ in range(T)])
    ids[3, 1:] = -1  # one teacher id only
    lps = torch.log_softmax(torch.randn(T, K + 2, generator=gen), -1)[:, :K]
    return {"labels": labels, "behavior_logprobs": -torch.rand(T, generator=gen), "topk_ids": ids,
            "topk_logprobs": lps, "cu_seqlens": torch.tensor([0, 9, T], dtype=torch.int32)}, \
        torch.randn(T, V, generator=gen) * 2  # fmt: skip


def test_loss_config_and_recipes():
    assert LossConfig().kind == "nll"
    with pytest.raises(ValueError, match="loss.kind must be one of"):
        LossConfig(kind="kl")
    cfg = RECIPES.build("smollm2_pear_kd", ["loss.kd.mode=topk_renorm"])
    assert cfg.loss == LossConfig(kind="kd", kd=KDConfig(mode="topk_renorm"))
    assert RECIPES.build("qwen3_8b_pear_kd").loss.kd.nll_weight == 0.1
    with pytest.raises(ValueError, match="pear.target_temperature=0.5 is not supported with loss.kind=kd"):
        RECIPES.build("smollm2_pear_kd", ["pear.target_temperature=0.5"])
    with pytest.raises(ValueError, match="KDConfig.mode must be one of"):
        RECIPES.build("smollm2_pear_kd", ["loss.kd.mode=full"])


@pytest.mark.parametrize("normalization", ["tokens", "sequences", "weights"])
def test_loss_objects_match_the_references(normalization):
    pack, logits = _pack()
    pear = PearConfig(level="token", normalization=normalization)
    mask = pack["labels"] != -100
    n_seq, n_tok = 2, int(mask.sum())
    count = {"tokens": n_tok, "sequences": n_seq, "weights": n_tok}[normalization]
    # megatron's contract: Σ G·s·ℓ (normalizer 1), or n · the self-normalized loss for "weights"
    factor = n_tok if normalization == "weights" else 1.0
    nll = PearNLLLoss(pear, vocab_size=50)(logits.clone().requires_grad_(), pack, CTX)
    ref = reference_pear_loss(logits, pack["labels"], pack["behavior_logprobs"], pack["cu_seqlens"], pear,
                              normalizer=None if normalization == "weights" else 1.0)  # fmt: skip
    assert int(nll.count) == count
    assert float(nll.loss_sum) == pytest.approx(float(ref.loss) * factor, abs=1e-4)
    kd_cfg = KDConfig(nll_weight=0.5)
    kd = PearKDLoss(pear, kd_cfg, vocab_size=50)(logits.clone().requires_grad_(), pack, CTX)
    kref = reference_pear_kd_loss(logits, pack["labels"], pack["behavior_logprobs"], pack["topk_ids"],
                                  pack["topk_logprobs"], pack["cu_seqlens"], pear, kd_cfg,
                                  normalizer=None if normalization == "weights" else 1.0)  # fmt: skip
    assert int(kd.count) == count
    assert float(kd.loss_sum) == pytest.approx(float(kref.loss) * factor, abs=1e-4)
    torch.testing.assert_close(kd.per_token, torch.where(mask, kref.kd - 0.5 * kref.logprobs, 0.0), atol=2e-5, rtol=0)


def test_top_k_overlap_against_brute_force():
    pack, logits = _pack(seed=3)
    pack["topk_ids"][5] = torch.topk(logits[5], 3).indices  # a full match
    result = PearKDLoss(PearConfig(), KDConfig(), vocab_size=50)(logits.clone().requires_grad_(), pack, CTX)
    names = dict(zip(PearKDLoss.extra_names, result.sums.tolist()))
    hits, slots = 0, 0
    for t in range(logits.shape[0]):
        if pack["labels"][t] == -100:
            continue
        teacher = [int(i) for i in pack["topk_ids"][t] if i >= 0]
        student = torch.topk(logits[t], len(teacher)).indices.tolist()
        hits += len(set(student) & set(teacher))
        slots += len(teacher)
    assert names["kd_overlap"] == hits and names["kd_teacher_ids"] == slots and hits >= 3
    with pytest.raises(ValueError, match="this pack holds no teacher top-K"):
        PearKDLoss(PearConfig(), KDConfig(), 50)(logits, {k: v for k, v in pack.items() if k != "topk_ids"}, CTX)


def test_kd_refuses_data_without_top_k_naming_file_row_and_field(tmp_path):
    import json

    rows = [{"prompt": "1+1?", "response": "2", "response_token_ids": [17], "behavior_logprobs": [-0.1],
             "response_topk_ids": [[17, 18]], "response_topk_logprobs": [[-0.1, -3.0]]},
            {"messages": [{"role": "user", "content": "1+1?"},
                          {"role": "assistant", "content": "2", "token_ids": [17], "logprobs": [-0.1]}]}]
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text(json.dumps(rows[0]) + "\n")
    bad.write_text(json.dumps(rows[1]) + "\n")
    loss = PearKDLoss(PearConfig(), KDConfig(), 50)
    loss.check_data([str(good)])
    with pytest.raises(ValueError, match=r"loss\.kind=kd needs a teacher top-K .*bad\.jsonl: row 0: field "
                                         r"messages\[1\]\.topk_ids is missing"):
        loss.check_data([str(good), str(bad)])
    PearNLLLoss(PearConfig(), 50).check_data([str(bad)])  # the NLL needs none


def test_inputs_are_checked_once_at_load_not_per_microbatch(monkeypatch):
    """The loss call skips the kernels' value checks (a device→host sync per microbatch); the loaded
    packs are checked once by check_packs, which still refuses a bad label or teacher id."""
    import pear_mega.kernels.kd_loss as kd_loss
    import pear_mega.kernels.pear_loss as pear_loss

    pack, logits = _pack()
    calls = []
    for module in (pear_loss, kd_loss):
        for name in ("_check_values", "_check_topk_values"):
            if hasattr(module, name):
                real = getattr(module, name)
                monkeypatch.setattr(module, name, lambda *a, _real=real: (calls.append(1), _real(*a))[1])
    pear = PearConfig(level="token")
    PearNLLLoss(pear, vocab_size=50)(logits.clone().requires_grad_(), pack, CTX)
    PearKDLoss(pear, KDConfig(), vocab_size=50)(logits.clone().requires_grad_(), pack, CTX)
    assert calls == []

    good = SimpleNamespace(**pack)
    PearKDLoss(pear, KDConfig(), vocab_size=50).check_packs([good], ["train.jsonl"])
    assert len(calls) == 2
    bad_label = SimpleNamespace(**{**pack, "labels": pack["labels"].clone().index_fill_(0, torch.tensor([2]), 50)})
    with pytest.raises(ValueError, match=r"data \(train.jsonl\): .*labels\[2\] = 50"):
        PearNLLLoss(pear, vocab_size=50).check_packs([bad_label], ["train.jsonl"])
    bad_id = SimpleNamespace(**{**pack, "topk_ids": pack["topk_ids"].clone().index_fill_(0, torch.tensor([1]), 77)})
    with pytest.raises(ValueError, match=r"data \(train.jsonl\): .*topk_ids\[1, 0\] = 77"):
        PearKDLoss(pear, KDConfig(), vocab_size=50).check_packs([bad_id], ["train.jsonl"])
