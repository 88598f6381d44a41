"""fused_pear_loss (Triton backend under the interpreter on CPU, and the chunked PyTorch backend)
against the loop reference of pear_mega.pear: loss, every per-token output and the gradient."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pear_mega.kernels import PearLossOutput, fused_pear_loss
from pear_mega.kernels.pear_torch import log_weights_torch
from pear_mega.kernels.pear_torch import pear_loss_eager
from pear_mega.pear import PearConfig, reference_log_weights, reference_pear_loss

from pear_kernel_helpers import DEVICE, TOLERANCES, assert_close, compare_outputs, make_pack  # isort: skip

BACKENDS = ["triton", "torch"]
NON_DEFAULT = PearConfig(level="block", block_size=2, gamma=0.95, delta_clip=(-0.2, 0.25), log_weight_clip=(-1.5, 0.5))

SHAPES = {
    # T = 1 with a loss token
    "T1_V1000": dict(seqlens=[1], vocab=1000, last_masked=False),
    # T not a multiple of the row block; an empty, a one-token and a fully masked sequence
    "T37_V1000": dict(seqlens=[10, 0, 1, 19, 7], vocab=1000, masked_seqs=(3,)),
    "T20_V32000": dict(seqlens=[8, 12], vocab=32000),
    "T12_V50257": dict(seqlens=[5, 7], vocab=50257),
    # many short packed sequences, including one-token ones
    "many_short": dict(seqlens=[1, 2, 3, 1, 4, 2, 1, 3, 2, 1, 5, 1, 2, 2, 3, 1], vocab=257, last_masked=False),
    # no loss token anywhere: loss 0, zero gradient, no NaN
    "all_masked": dict(seqlens=[3, 4], vocab=64, mask_frac=1.0),
}


def _run(pack, config, backend, **kw):
    x = pack.logits.clone().requires_grad_()
    before = pack.logits.clone()
    out = fused_pear_loss(x, pack.labels, pack.beta, pack.cu, config, backend=backend, **kw)
    out.loss.backward()
    assert torch.equal(x.detach(), before), "the logits were modified without inplace_backward"
    return out, x.grad


def _reference(pack, config, **kw):
    x = pack.logits.clone().requires_grad_()
    ref = reference_pear_loss(x, pack.labels, pack.beta, pack.cu, config, **kw)
    ref.loss.backward()
    return ref, x.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_matches_reference_over_shapes(shape, dtype, backend):
    pack = make_pack(dtype=dtype, seed=list(SHAPES).index(shape), **SHAPES[shape])
    out, grad = _run(pack, NON_DEFAULT, backend)
    ref, ref_grad = _reference(pack, NON_DEFAULT)
    assert isinstance(out, PearLossOutput)
    assert out.loss.dim() == 0 and out.logprobs.dtype == torch.float32
    compare_outputs(out, ref, grad, ref_grad, dtype, prefix=f"{shape}/{backend}/")
    masked = pack.labels == -100
    assert torch.all(grad[masked] == 0), "rows without loss must get exactly zero gradient"
    assert torch.all(out.logprobs[masked] == 0) and torch.all(out.log_weights[masked] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalization", ["tokens", "sequences", "weights"])
@pytest.mark.parametrize("level", ["none", "token", "block", "sequence"])
def test_every_level_and_normalization(level, normalization, backend):
    pack = make_pack(**SHAPES["T37_V1000"], seed=3)
    cfg = PearConfig(level=level, normalization=normalization, block_size=3, gamma=0.9,
                     delta_clip=(-0.3, 0.2), log_weight_clip=(-0.6, 0.4))  # fmt: skip
    out, grad = _run(pack, cfg, backend)
    ref, ref_grad = _reference(pack, cfg)
    compare_outputs(out, ref, grad, ref_grad, torch.float32, prefix=f"{level}/{normalization}/{backend}/")
    if level in ("token", "block"):  # the lower clip is active here, so a missing clip fails
        assert (out.log_weights[pack.labels != -100] == -0.6).any()
    # the vectorized eager loss used by the benchmark has the same semantics
    eager = pear_loss_eager(pack.logits, pack.labels, pack.beta, pack.cu, cfg)
    assert_close("pear_loss_eager", eager, ref.loss, *TOLERANCES[torch.float32]["fwd"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalizer", [7.0, "tensor"])
def test_explicit_normalizer(backend, normalizer):
    pack = make_pack(**SHAPES["T37_V1000"], seed=4)
    norm = torch.tensor(123.0, device=DEVICE) if normalizer == "tensor" else normalizer
    for normalization in ("tokens", "sequences", "weights"):
        cfg = PearConfig(normalization=normalization)
        out, grad = _run(pack, cfg, backend, normalizer=norm)
        ref, ref_grad = _reference(pack, cfg, normalizer=norm)
        compare_outputs(out, ref, grad, ref_grad, torch.float32, prefix=f"{normalization}/")


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_padding_is_excluded(backend):
    pack = make_pack([9, 14], 1024, seed=5)
    pack.labels = torch.where(pack.labels >= 1000, pack.labels - 24, pack.labels)
    pack.logits[:, 1000:] = 40.0  # would dominate the softmax if it were not excluded
    out, grad = _run(pack, NON_DEFAULT, backend, vocab_size=1000)
    ref, ref_grad = _reference(pack, NON_DEFAULT, vocab_size=1000)
    compare_outputs(out, ref, grad, ref_grad, torch.float32, prefix="padded/")
    assert torch.all(grad[:, 1000:] == 0)
    assert torch.all(out.entropy <= math.log(1000) + 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_inplace_backward(backend, dtype):
    pack = make_pack([11, 6], 777, dtype=dtype, seed=6)
    ref, ref_grad = _reference(pack, NON_DEFAULT)
    leaf = pack.logits.clone().requires_grad_()
    logits = leaf * 1  # an intermediate, like the output of the LM head
    out = fused_pear_loss(logits, pack.labels, pack.beta, pack.cu, NON_DEFAULT, inplace_backward=True, backend=backend)
    out.loss.backward()
    compare_outputs(out, ref, leaf.grad, ref_grad, dtype)
    # The gradient was written over the logits' own storage.
    assert_close("inplace buffer", logits.detach(), leaf.grad, 0.0, 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_scales_with_upstream_grad(backend):
    pack = make_pack([8, 8], 300, seed=7)
    x = pack.logits.clone().requires_grad_()
    out = fused_pear_loss(x, pack.labels, pack.beta, pack.cu, NON_DEFAULT, backend=backend)
    (out.loss * 2.5).backward()
    _, ref_grad = _reference(pack, NON_DEFAULT)
    assert_close("grad×2.5", x.grad, 2.5 * ref_grad, *TOLERANCES[torch.float32]["grad"])


@pytest.mark.parametrize("level", ["none", "token", "block", "sequence"])
def test_scan_over_long_sequences(level):
    """Sequences longer than the scan chunk (1024) exercise the carries across chunks."""
    from pear_mega.kernels.pear_triton import log_weights_triton

    gen = torch.Generator().manual_seed(8)
    T = 2600
    cu = torch.tensor([0, 2100, 2101, 2600], dtype=torch.int32)
    labels = torch.randint(0, 50, (T,), generator=gen)
    labels[300:700] = -100  # a masked span crossing a chunk boundary
    labels[torch.rand(T, generator=gen) < 0.1] = -100
    lp = -torch.rand(T, generator=gen) * 2
    lb = lp + torch.randn(T, generator=gen) * 0.05
    cfg = PearConfig(level=level, block_size=5, gamma=0.999, log_weight_clip=(-3.0, 3.0))
    lp, lb, labels, cu = lp.to(DEVICE), lb.to(DEVICE), labels.to(DEVICE), cu.to(DEVICE)
    mask = labels != -100
    ref = reference_log_weights(lp, lb, mask, cu, cfg)
    got_triton, inv_triton, nonempty = log_weights_triton(lp, lb, labels, cu, cfg)
    got_torch, inv_torch, _ = log_weights_torch(lp, lb, mask, cu, cfg)
    assert_close(f"{level}/triton", got_triton, ref, 2e-5, 1e-5)
    assert_close(f"{level}/torch", got_torch, ref, 2e-5, 1e-5)
    counts = torch.tensor([int(mask[a:b].sum()) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])
    per_token = torch.repeat_interleave(counts, (cu[1:] - cu[:-1]).long().cpu()).to(DEVICE)
    expected_inv = torch.where(mask, 1.0 / per_token, 0.0)
    assert_close("inv_count/triton", inv_triton, expected_inv, 1e-7, 1e-6)
    assert_close("inv_count/torch", inv_torch, expected_inv, 1e-7, 1e-6)
    assert int(nonempty) == int((counts > 0).sum())


def _bad(**overrides):
    pack = make_pack([4, 5], 32, seed=9)
    args = dict(logits=pack.logits, labels=pack.labels, behavior_logprobs=pack.beta, cu_seqlens=pack.cu,
                config=PearConfig())  # fmt: skip
    args.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in overrides.items()})
    return args


def _labels_with(index, value):
    labels = make_pack([4, 5], 32, seed=9).labels.clone()
    labels[index] = value
    return labels


def _beta_with(index, value):
    beta = make_pack([4, 5], 32, seed=9).beta.clone()
    beta[index] = value
    return beta


_LOSS_ROW = int(torch.nonzero(make_pack([4, 5], 32, seed=9, device="cpu").labels != -100)[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(logits=torch.zeros(9)), r"logits must be \[T, V_local\]"),
        (dict(logits=torch.zeros(9, 32, dtype=torch.int64)), "logits dtype"),
        (dict(labels=torch.zeros(8, dtype=torch.int64)), r"labels must have shape \[9\]"),
        (dict(labels=torch.zeros(9)), "labels must be int64"),
        (dict(behavior_logprobs=torch.zeros(8)), r"behavior_logprobs must have shape \[9\]"),
        (dict(labels=_labels_with(3, 32)), r"labels\[3\] = 32 is outside \[0, 32\)"),
        (dict(labels=_labels_with(5, -1)), r"labels\[5\] = -1 is outside"),
        (dict(behavior_logprobs=_beta_with(_LOSS_ROW, float("nan"))), rf"behavior_logprobs\[{_LOSS_ROW}\] = nan"),
        (dict(behavior_logprobs=_beta_with(_LOSS_ROW, float("-inf"))), rf"behavior_logprobs\[{_LOSS_ROW}\] = -inf"),
        (dict(cu_seqlens=torch.tensor([0.0, 9.0])), "cu_seqlens must be int32 or int64"),
        (dict(cu_seqlens=torch.tensor([1, 9], dtype=torch.int32)), r"cu_seqlens\[0\] must be 0"),
        (dict(cu_seqlens=torch.tensor([0, 8], dtype=torch.int32)), r"cu_seqlens\[-1\] must equal T = 9"),
        (dict(cu_seqlens=torch.tensor([0, 6, 4, 9], dtype=torch.int32)), r"non-decreasing.*cu_seqlens\[2\]"),
        (dict(cu_seqlens=torch.tensor([0], dtype=torch.int32)), r"cu_seqlens must be \[B\+1\]"),
        (dict(config=dict(level="token")), "config must be a PearConfig"),
        (dict(normalizer=0.0), "normalizer must be finite and > 0"),
        (dict(normalizer=torch.ones(2)), "normalizer must be 0-dim"),
        (dict(vocab_size=0), "vocab_size must be a positive int"),
    ],
)
def test_bad_inputs(overrides, message, backend):
    with pytest.raises(ValueError, match=message):
        fused_pear_loss(**_bad(**overrides), backend=backend)


def test_bad_backend_and_masked_nonfinite_beta_is_fine():
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_pear_loss(**_bad(), backend="cuda")
    pack = make_pack([4, 5], 32, seed=9)
    beta = pack.beta.clone()
    beta[pack.labels == -100] = float("nan")  # ignored where there is no loss
    out = fused_pear_loss(pack.logits, pack.labels, beta, pack.cu, PearConfig(), backend="torch")
    assert torch.isfinite(out.loss)


@settings(max_examples=25, deadline=None)
@given(
    lens=st.lists(st.integers(0, 9), min_size=1, max_size=5).filter(lambda x: sum(x) > 0),
    vocab=st.sampled_from([1, 2, 33, 130]),
    mask_frac=st.sampled_from([0.0, 0.4, 0.9]),
    seed=st.integers(0, 10_000),
    cfg=st.builds(
        PearConfig,
        level=st.sampled_from(["none", "token", "block", "sequence"]),
        gamma=st.floats(0.3, 1.0),
        delta_clip=st.tuples(st.floats(-1.0, 0.0), st.floats(0.0, 1.0)),
        log_weight_clip=st.tuples(st.floats(-3.0, 0.0), st.floats(0.0, 2.0)),
        block_size=st.integers(1, 5),
        normalization=st.sampled_from(["tokens", "sequences", "weights"]),
    ),
    backend=st.sampled_from(BACKENDS),
)
def test_random_packs_match_reference(lens, vocab, mask_frac, seed, cfg, backend):
    pack = make_pack(lens, vocab, mask_frac=mask_frac, seed=seed, last_masked=False)
    out, grad = _run(pack, cfg, backend)
    ref, ref_grad = _reference(pack, cfg)
    compare_outputs(out, ref, grad, ref_grad, torch.float32, prefix=f"{cfg}/{backend}/")
