"""PearConfig.target_temperature τ: the PEAR weight compares log softmax(logits/τ) of πθ with πβ.

Checked against an independent float64 computation of the tempered log-probs, then the fused loss
(both backends, fp32 and bf16, with vocab padding) against the reference at τ ≠ 1 — loss, per-token
outputs and the gradient — and at tensor-parallel size 2 on gloo ranks.
"""


import pytest
import torch

from pear_mega.kernels import fused_pear_loss
from pear_mega.kernels.pear_torch import pear_loss_eager
from pear_mega.pear import PearConfig, reference_log_weights, reference_pear_loss

from pear_kernel_helpers import TOLERANCES, assert_close, compare_outputs, make_pack, run_tp  # isort: skip

BACKENDS = ["triton", "torch"]
TEMPERATURES = [0.6, 1.7]


def _config(level: str, tau: float) -> PearConfig:
    # wide clips, so that a change of τ shows in the weights instead of being clipped away
    return PearConfig(level=level, block_size=3, gamma=0.97, delta_clip=(-2.0, 2.0), log_weight_clip=(-20.0, 20.0),
                      target_temperature=tau)


def _run(fn, pack, config, **kw):
    x = pack.logits.clone().requires_grad_()
    out = fn(x, pack.labels, pack.beta, pack.cu, config, **kw)
    out.loss.backward()
    return out, x.grad


@pytest.mark.parametrize("tau", TEMPERATURES)
def test_reference_weights_use_tempered_logprobs(tau):
    pack = make_pack([9, 13], 300, seed=3, device="cpu")
    config = _config("token", tau)
    ref = reference_pear_loss(pack.logits, pack.labels, pack.beta, pack.cu, config)
    # independent: float64 log-softmax of logits/τ, then the reference scan
    mask = pack.labels != -100
    logp_tau = torch.log_softmax(pack.logits.double() / tau, -1).gather(1, pack.labels.clamp_min(0)[:, None])[:, 0]
    want = reference_log_weights(torch.where(mask, logp_tau, 0.0), pack.beta, mask, pack.cu, config)
    assert_close("log_weights", ref.log_weights, want, 1e-5, 1e-5)
    # τ really enters: the weights differ from τ = 1, the loss term (logprobs at τ = 1) does not
    ref1 = reference_pear_loss(pack.logits, pack.labels, pack.beta, pack.cu, _config("token", 1.0))
    assert (ref.log_weights - ref1.log_weights).abs().max() > 0.1
    assert torch.equal(ref.logprobs, ref1.logprobs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("level", ["token", "block", "sequence"])
@pytest.mark.parametrize("tau", TEMPERATURES)
def test_fused_matches_reference_at_temperature(tau, level, dtype, backend):
    pack = make_pack([10, 0, 1, 19, 7], 1000, dtype=dtype, masked_seqs=(3,), seed=11)
    config = _config(level, tau)
    out, grad = _run(fused_pear_loss, pack, config, backend=backend)
    ref, ref_grad = _run(reference_pear_loss, pack, config)
    compare_outputs(out, ref, grad, ref_grad, dtype, prefix=f"tau={tau}/{level}/{backend}/")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_at_temperature_with_vocab_padding(backend):
    pack = make_pack([7, 8], 1024, seed=5)
    v = 1000
    pack.labels = torch.where(pack.labels >= v, pack.labels % v, pack.labels)
    pack.logits[:, v:] = 30.0  # large: counting the padding would show
    config = _config("block", 0.6)
    out, grad = _run(fused_pear_loss, pack, config, backend=backend, vocab_size=v)
    ref, ref_grad = _run(reference_pear_loss, pack, config, vocab_size=v)
    compare_outputs(out, ref, grad, ref_grad, torch.float32, prefix=f"padded/{backend}/")


def test_eager_loss_at_temperature():
    pack = make_pack([6, 11], 500, seed=8, device="cpu")
    config = _config("token", 0.6)
    eager = pear_loss_eager(pack.logits, pack.labels, pack.beta, pack.cu, config)
    ref = reference_pear_loss(pack.logits, pack.labels, pack.beta, pack.cu, config)
    assert_close("loss", eager, ref.loss, 2e-5, 1e-5)


@pytest.mark.parametrize("value", [0.0, -1.0, float("inf"), float("nan"), True, "1"])
def test_target_temperature_validation(value):
    with pytest.raises(ValueError, match="target_temperature"):
        PearConfig(target_temperature=value)


CASES = {
    "block_t06": dict(pack=dict(seqlens=[9, 1, 13], vocab=2000, masked_seqs=(1,)),
                      config=dict(level="block", block_size=3, delta_clip=(-2.0, 2.0), target_temperature=0.6)),
    "token_t17_weights": dict(pack=dict(seqlens=[6, 11], vocab=1000),
                              config=dict(level="token", normalization="weights", target_temperature=1.7)),
}  # fmt: skip


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_tp2_at_temperature_matches_reference(tmp_path):
    world = 2
    cases = {}
    for i, (name, spec) in enumerate(CASES.items()):
        pack = make_pack(seed=40 + i, device="cpu", **spec["pack"])
        cases[name] = dict(logits=pack.logits, labels=pack.labels, beta=pack.beta, cu=pack.cu,
                           config=spec["config"], vocab_size=None)  # fmt: skip
    ranks = run_tp(cases, tmp_path, timeout_s=100, world=world)
    tol = TOLERANCES[torch.float32]
    for name, case in cases.items():
        config = PearConfig(**case["config"])
        x = case["logits"].clone().requires_grad_()
        ref = reference_pear_loss(x, case["labels"], case["beta"], case["cu"], config)
        ref.loss.backward()
        for backend in BACKENDS:
            for r in range(world):
                got, p = ranks[r][(name, backend)], f"{name}/{backend}/rank{r}/"
                assert_close(p + "loss", got["loss"], ref.loss, *tol["fwd"])
                assert_close(p + "logprobs", got["logprobs"], ref.logprobs, *tol["fwd"])
                assert_close(p + "log_weights", got["log_weights"], ref.log_weights, *tol["fwd"])
            grad = torch.cat([ranks[r][(name, backend)]["grad"] for r in range(world)], dim=1)
            assert_close(f"{name}/{backend}/grad", grad, x.grad, *tol["grad"])


def test_truncated_sampling_warning():
    from pear_mega.pear import truncated_sampling_warning

    full = {"model": "m", "temperature": 0.7, "top_p": 1.0, "top_k": 0, "logprobs_mode": "processed_logprobs"}
    nucleus = {**full, "top_p": 0.95}
    topk = {**full, "top_k": 20}
    token = PearConfig(level="token")
    assert truncated_sampling_warning([(full, 5), (None, 2), ({}, 1)], token) is None
    msg = truncated_sampling_warning([(full, 5), (nucleus, 2), (topk, 1), (nucleus, 1)], token)
    assert "3 rows from model='m' temperature=0.7 top_p=0.95 top_k=0" in msg
    assert "1 rows from model='m' temperature=0.7 top_p=1.0 top_k=20" in msg
    assert truncated_sampling_warning([(nucleus, 3)], PearConfig(level="none")) is None
