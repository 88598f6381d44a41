"""Tensor parallelism: fused_pear_loss on two gloo ranks, each holding half of the vocabulary, must
equal the single-rank result on the concatenated logits (both backends), including vocab padding
that covers part of, or all of, the last rank's shard."""

import pytest
import torch

from pear_mega.kernels import fused_pear_loss
from pear_mega.pear import PearConfig, reference_pear_loss

from pear_kernel_helpers import DEVICE, TOLERANCES, assert_close, make_pack, run_tp  # isort: skip

WORLD = 2
CASES = {
    "block": dict(pack=dict(seqlens=[9, 1, 13], vocab=2000, masked_seqs=(1,)),
                  config=dict(level="block", block_size=3, gamma=0.97, delta_clip=(-0.3, 0.3)), vocab_size=None),
    "token_weights": dict(pack=dict(seqlens=[6, 11], vocab=1000),
                          config=dict(level="token", normalization="weights"), vocab_size=None),
    # rank 1 holds columns [512, 1024) of which [1000, 1024) are padding
    "padded": dict(pack=dict(seqlens=[7, 8], vocab=1024), config=dict(level="sequence"), vocab_size=1000),
    # rank 1's whole shard is padding: it contributes nothing to the softmax
    "padded_shard": dict(pack=dict(seqlens=[5, 5], vocab=1024), config=dict(level="token"), vocab_size=500),
}  # fmt: skip


def _build_cases():
    cases = {}
    for i, (name, spec) in enumerate(CASES.items()):
        pack = make_pack(seed=20 + i, device="cpu", **spec["pack"])
        if spec["vocab_size"] is not None:
            v = spec["vocab_size"]
            pack.labels = torch.where(pack.labels >= v, pack.labels % v, pack.labels)
            pack.logits[:, v:] = 30.0  # large, so that including padding would be visible
        cases[name] = dict(logits=pack.logits, labels=pack.labels, beta=pack.beta, cu=pack.cu,
                           config=spec["config"], vocab_size=spec["vocab_size"])  # fmt: skip
    return cases


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_tp2_matches_tp1(tmp_path):
    cases = _build_cases()
    ranks = run_tp(cases, tmp_path, timeout_s=100, world=WORLD)
    tol = TOLERANCES[torch.float32]
    for name, case in cases.items():
        config = PearConfig(**case["config"])
        x_ref = case["logits"].clone().requires_grad_()
        ref = reference_pear_loss(x_ref, case["labels"], case["beta"], case["cu"], config, vocab_size=case["vocab_size"])
        ref.loss.backward()
        for backend in ("triton", "torch"):
            x = case["logits"].to(DEVICE, copy=True).requires_grad_()
            on = {k: case[k].to(DEVICE) for k in ("labels", "beta", "cu")}
            tp1 = fused_pear_loss(x, on["labels"], on["beta"], on["cu"], config,
                                  vocab_size=case["vocab_size"], backend=backend)  # fmt: skip
            tp1.loss.backward()
            grad_tp2 = torch.cat([ranks[r][(name, backend)]["grad"] for r in range(WORLD)], dim=1)
            for r in range(WORLD):
                got = ranks[r][(name, backend)]
                p = f"{name}/{backend}/rank{r}/"
                assert_close(p + "loss", got["loss"], tp1.loss, *tol["fwd"])
                assert_close(p + "logprobs", got["logprobs"], tp1.logprobs, *tol["fwd"])
                assert_close(p + "log_weights", got["log_weights"], tp1.log_weights, *tol["fwd"])
                assert_close(p + "entropy", got["entropy"], tp1.entropy, *tol["fwd"])
                assert_close(p + "loss vs reference", got["loss"], ref.loss, *tol["fwd"])
            assert_close(f"{name}/{backend}/grad", grad_tp2, x.grad, *tol["grad"])
            assert_close(f"{name}/{backend}/grad vs reference", grad_tp2, x_ref.grad, *tol["grad"])
