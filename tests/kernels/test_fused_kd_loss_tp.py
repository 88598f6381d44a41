"""Tensor parallelism: fused_pear_kd_loss on two gloo ranks, each holding half of the vocabulary,
must equal the float64 reference and the single-rank result on the concatenated logits (both
backends): teacher ids spread over both shards, vocab padding over part of or all of rank 1's shard,
and a peaked student whose top-K mass Q → 1 sits on either rank."""

import pytest
import torch

from pear_mega.kd import KDConfig, reference_pear_kd_loss
from pear_mega.kernels import fused_pear_kd_loss
from pear_mega.pear import PearConfig

from kd_kernel_helpers import KD_TOLERANCES, kd_tp_case, make_topk  # isort: skip
from pear_kernel_helpers import DEVICE, assert_close, make_pack, run_tp  # isort: skip

WORLD = 2
OUTPUTS = ("loss", "logprobs", "log_weights", "kd", "teacher_mass", "student_mass", "kd_tail")
CASES = {
    "tail_block": dict(pack=dict(seqlens=[9, 1, 13], vocab=2000, masked_seqs=(1,)), K=5,
                       pear=dict(level="block", block_size=3, gamma=0.97, delta_clip=(-0.3, 0.3)),
                       kd=dict(mode="topk_tail", nll_weight=0.3), vocab_size=None),
    # rank 1 holds columns [512, 1024) of which [1000, 1024) are padding
    "renorm_padded": dict(pack=dict(seqlens=[7, 8], vocab=1024), K=4, pear=dict(level="sequence"),
                          kd=dict(mode="topk_renorm", nll_weight=0.5), vocab_size=1000),
    # rank 1's whole shard is padding: it contributes nothing to the softmax and holds no teacher id
    "topk_padded_shard": dict(pack=dict(seqlens=[5, 5], vocab=1024), K=3,
                              pear=dict(level="token", normalization="weights"), kd=dict(mode="topk"),
                              vocab_size=500),
    "tail_peaked": dict(pack=dict(seqlens=[6, 7], vocab=600, mask_frac=0.0), K=6, pear=dict(level="token"),
                        kd=dict(mode="topk_tail"), vocab_size=None, peak=35.0),
}  # fmt: skip


def _build_cases():
    cases = {}
    for i, (name, spec) in enumerate(CASES.items()):
        pack = make_pack(seed=40 + i, device="cpu", **spec["pack"])
        v = spec["vocab_size"] or spec["pack"]["vocab"]
        pack.labels = torch.where(pack.labels >= v, pack.labels % v, pack.labels)
        ids, lp = make_topk(pack.labels.numel(), v, spec["K"], seed=60 + i, labels=pack.labels, device="cpu")
        if spec["vocab_size"] is not None:
            pack.logits[:, v:] = 30.0  # large, so that including padding would be visible
        if "peak" in spec:
            rows = torch.arange(pack.labels.numel())
            pack.logits[rows, torch.where(ids[:, 0] >= 0, ids[:, 0], 3)] += spec["peak"]
        cases[name] = dict(logits=pack.logits, labels=pack.labels, beta=pack.beta, cu=pack.cu, ids=ids, lp=lp,
                           pear=spec["pear"], kd=spec["kd"], vocab_size=spec["vocab_size"])  # fmt: skip
    shard = cases["tail_block"]["logits"].shape[1] // WORLD
    both = cases["tail_block"]["ids"]
    assert ((both >= 0) & (both < shard)).any() and (both >= shard).any(), "ids must spread over both shards"
    return cases


@pytest.mark.multiprocess
@pytest.mark.timeout(150)
def test_tp2_matches_reference_and_tp1(tmp_path):
    cases = _build_cases()
    ranks = run_tp(cases, tmp_path, timeout_s=130, run_case=kd_tp_case, world=WORLD)
    tol = KD_TOLERANCES[torch.float32]
    for name, case in cases.items():
        pear, kd = PearConfig(**case["pear"]), KDConfig(**case["kd"])
        args = (case["labels"], case["beta"], case["ids"], case["lp"], case["cu"], pear, kd)
        x_ref = case["logits"].clone().requires_grad_()
        ref = reference_pear_kd_loss(x_ref, *args, vocab_size=case["vocab_size"])
        ref.loss.backward()
        for backend in ("triton", "torch"):
            x = case["logits"].to(DEVICE, copy=True).requires_grad_()
            tp1 = fused_pear_kd_loss(x, *(a.to(DEVICE) if torch.is_tensor(a) else a for a in args),
                                     vocab_size=case["vocab_size"], backend=backend)  # fmt: skip
            tp1.loss.backward()
            grad_tp2 = torch.cat([ranks[r][(name, backend)]["grad"] for r in range(WORLD)], dim=1)
            for r in range(WORLD):
                got = ranks[r][(name, backend)]
                for out in OUTPUTS:
                    p = f"{name}/{backend}/rank{r}/{out}"
                    assert_close(p, got[out], getattr(tp1, out), *tol["fwd"])
                    assert_close(p + " vs reference", got[out], getattr(ref, out), *tol["fwd"])
            assert_close(f"{name}/{backend}/grad", grad_tp2, x.grad, *tol["grad"])
            assert_close(f"{name}/{backend}/grad vs reference", grad_tp2, x_ref.grad, *tol["grad"])
