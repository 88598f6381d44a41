"""fused_pear_kd_loss (Triton under the interpreter on CPU, and the chunked PyTorch backend) against
the float64 reference of pear_mega.kd: loss, every per-token output and the gradient, for every
mode and PEAR level; the coarse-grained KL checked independently; the analytic gradient checked by
finite differences and against the closed form q − τ."""

import math

import pytest
import torch

from pear_mega.kd import KD_MODES, STUDENT_TAIL_FLOOR, KDConfig, pear_kd_loss_eager, reference_pear_kd_loss, topk_kl
from pear_mega.kernels import KDLossOutput, fused_pear_kd_loss, pear_log_weights
from pear_mega.pear import PearConfig, reference_log_weights

from kd_kernel_helpers import KD_TOLERANCES, compare_kd, make_topk  # isort: skip
from pear_kernel_helpers import DEVICE, assert_close, make_pack  # isort: skip

BACKENDS = ["triton", "torch"]
LEVELS = ["none", "token", "block", "sequence"]
PEAR = dict(block_size=3, gamma=0.9, delta_clip=(-0.3, 0.2), log_weight_clip=(-0.25, 0.4))


def _case(seqlens, vocab, K, *, seed=0, dtype=torch.float32, **pack_kw):
    pack = make_pack(seqlens, vocab, dtype=dtype, seed=seed, **pack_kw)
    ids, lp = make_topk(pack.labels.numel(), vocab, K, seed=seed + 100, labels=pack.labels)
    return pack, ids, lp


def _run(pack, ids, lp, pear, kd, backend, **kw):
    x = pack.logits.clone().requires_grad_()
    before = pack.logits.clone()
    out = fused_pear_kd_loss(x, pack.labels, pack.beta, ids, lp, pack.cu, pear, kd, backend=backend, **kw)
    out.loss.backward()
    assert torch.equal(x.detach(), before), "the logits were modified without inplace_backward"
    return out, x.grad


def _reference(pack, ids, lp, pear, kd, **kw):
    x = pack.logits.clone().requires_grad_()
    ref = reference_pear_kd_loss(x, pack.labels, pack.beta, ids, lp, pack.cu, pear, kd, **kw)
    ref.loss.backward()
    return ref, x.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("mode", KD_MODES)
def test_every_mode_and_level(mode, level, backend):
    # odd K = 5, an empty and a fully masked sequence, empty slots, labels in and out of the top-K
    pack, ids, lp = _case([10, 0, 1, 13, 7], 1000, 5, seed=1, masked_seqs=(3,))
    pear = PearConfig(level=level, **PEAR)
    kd = KDConfig(mode=mode, kl_weight=1.0, nll_weight=0.3)
    out, grad = _run(pack, ids, lp, pear, kd, backend)
    ref, ref_grad = _reference(pack, ids, lp, pear, kd)
    assert isinstance(out, KDLossOutput) and out.loss.dim() == 0
    compare_kd(out, ref, grad, ref_grad, torch.float32, prefix=f"{mode}/{level}/{backend}/")
    masked = pack.labels == -100
    assert torch.all(grad[masked] == 0), "rows without loss must get exactly zero gradient"
    for name in ("kd", "logprobs", "log_weights", "teacher_mass", "student_mass", "kd_tail"):
        assert torch.all(getattr(out, name)[masked] == 0), f"{name} must be 0 off the loss mask"
    if level in ("token", "block"):  # the lower clip is active: a missing PEAR weight would fail
        assert (out.log_weights[~masked] == -0.25).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", ["T1_K1", "T23_K7", "T9_V32000_K3", "many_short_K2"])
def test_shapes_and_dtypes(shape, dtype, backend):
    spec = {
        "T1_K1": (dict(seqlens=[2], vocab=300, last_masked=False), 1),
        "T23_K7": (dict(seqlens=[9, 14], vocab=777), 7),
        "T9_V32000_K3": (dict(seqlens=[4, 5], vocab=32000, mask_frac=0.0), 3),
        "many_short_K2": (dict(seqlens=[1, 2, 3, 1, 4, 2, 1], vocab=257, last_masked=False), 2),
    }[shape]
    pack, ids, lp = _case(dtype=dtype, seed=2, K=spec[1], **spec[0])
    for mode in KD_MODES:
        kd = KDConfig(mode=mode, nll_weight=0.5)
        out, grad = _run(pack, ids, lp, PearConfig(), kd, backend)
        ref, ref_grad = _reference(pack, ids, lp, PearConfig(), kd)
        compare_kd(out, ref, grad, ref_grad, dtype, prefix=f"{shape}/{mode}/{backend}/")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalization", ["tokens", "sequences", "weights", 7.0])
def test_normalizations(normalization, backend):
    pack, ids, lp = _case([6, 11, 4], 500, 4, seed=3)
    if isinstance(normalization, float):
        pear, kw = PearConfig(level="block", **PEAR), dict(normalizer=normalization)
    else:
        pear, kw = PearConfig(level="token", normalization=normalization, **PEAR), {}
    kd = KDConfig()
    out, grad = _run(pack, ids, lp, pear, kd, backend, **kw)
    ref, ref_grad = _reference(pack, ids, lp, pear, kd, **kw)
    compare_kd(out, ref, grad, ref_grad, torch.float32, prefix=f"{normalization}/{backend}/")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", KD_MODES)
def test_peaked_student(mode, backend):
    """Q → 1: the student puts almost all its mass on a teacher id. 1 − Q ≈ 1e-14 (gap 35) must keep
    its relative precision (an fp32 1 − Q would be 0); at gap 120 it underflows and is floored."""
    pack, ids, lp = _case([7, 6], 400, 4, seed=4, mask_frac=0.0)
    logits = pack.logits.float()
    rows = torch.arange(logits.shape[0], device=logits.device)
    top = torch.where(ids[:, 0] >= 0, ids[:, 0], 5)
    logits[rows, top] += 35.0
    logits[7:, :] = pack.logits[7:].float()  # the second sequence: extreme peak, tail under the floor
    logits[rows[7:], top[7:]] += 120.0
    pack.logits = logits
    kd = KDConfig(mode=mode)
    out, grad = _run(pack, ids, lp, PearConfig(level="token", **PEAR), kd, backend)
    ref, ref_grad = _reference(pack, ids, lp, PearConfig(level="token", **PEAR), kd)
    compare_kd(out, ref, grad, ref_grad, torch.float32, prefix=f"peaked/{mode}/{backend}/")
    assert torch.isfinite(grad).all()
    if mode == "topk_tail":
        # what a floored 1 − Q would give: the head (mode "topk") + (1 − P)(log(1 − P) − log floor)
        head, _ = _run(pack, ids, lp, PearConfig(level="token", **PEAR), KDConfig(mode="topk"), backend)
        one_m_p = out.teacher_mass.neg().add(1).clamp(0, 1)
        floored = head.kd + one_m_p * (one_m_p.clamp_min(1e-30).log() - math.log(STUDENT_TAIL_FLOOR))
        loss_row = pack.labels != -100
        first = loss_row & (torch.arange(13, device=loss_row.device) < 7) & (one_m_p > 0.05)
        first[:2] = False  # row 0 has no teacher ids, row 1 all of the teacher's mass
        gap = (floored - out.kd)[first]
        assert gap.numel() > 2 and torch.all(gap > 1.0), "gap 35: 1 − Q must be resolved, not floored"
        second = loss_row & (torch.arange(13, device=loss_row.device) >= 7)
        assert_close("gap 120: floored", out.kd[second], floored[second], 2e-5, 1e-5)


def _coarse_grained_kl(logits, ids, lp):
    """KL between teacher and student over the bins {k_1, …, k_K, rest}, float64, one row at a time."""
    out = []
    q_all = torch.softmax(logits.double().cpu(), -1)
    for t in range(logits.shape[0]):
        keep = ids[t].cpu() >= 0
        k, a = ids[t].cpu()[keep], lp[t].cpu().double()[keep]
        p_bins = torch.cat([a.exp(), (1 - a.exp().sum()).clamp(0, 1).reshape(1)])
        q_bins = torch.cat([q_all[t, k], (1 - q_all[t, k].sum()).reshape(1)])
        out.append(float(torch.special.xlogy(p_bins, p_bins).sum() - torch.special.xlogy(p_bins, q_bins).sum()))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_tail_is_the_coarse_grained_kl_and_never_negative(backend):
    # a student close to the teacher, so that the plain truncated sum goes negative on some rows
    pack, ids, lp = _case([16, 16], 200, 6, seed=5, mask_frac=0.0, last_masked=False)
    logits = torch.randn(32, 200, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 0.5
    valid = ids.cpu() >= 0
    rows, slots = valid.nonzero(as_tuple=True)
    logits[rows, ids.cpu()[rows, slots]] = lp.cpu().double()[rows, slots] + 8.0  # Q > P mostly
    pack.logits = logits.float().to(DEVICE)
    exact = _coarse_grained_kl(pack.logits, ids, lp)
    ref, _ = _reference(pack, ids, lp, PearConfig(level="none"), KDConfig(mode="topk_tail"))
    out, _ = _run(pack, ids, lp, PearConfig(level="none"), KDConfig(mode="topk_tail"), backend)
    truncated, _ = _run(pack, ids, lp, PearConfig(level="none"), KDConfig(mode="topk"), backend)
    assert_close("reference vs exact coarse KL", ref.kd, exact, 1e-6, 1e-6)
    assert_close("kernel vs exact coarse KL", out.kd, exact, 2e-5, 1e-5)
    assert torch.all(ref.kd >= 0) and torch.all(out.kd >= -1e-6)
    assert (truncated.kd < -1e-3).any(), "the test data must make the truncated sum negative somewhere"
    assert_close("head = kd − kd_tail = the truncated sum", out.kd - out.kd_tail, truncated.kd, 2e-5, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_is_q_minus_tau(backend):
    """The closed form of the issue: ∂KL_t/∂x_j = q_j − τ_j with τ_j = p_j on the top-K ids and
    q_j (1 − P)/(1 − Q) elsewhere (level "none", one sequence: G = 1, coef = 1/n)."""
    pack, ids, lp = _case([12], 150, 5, seed=6, mask_frac=0.0, last_masked=False)
    out, grad = _run(pack, ids, lp, PearConfig(level="none"), KDConfig(), backend)
    q = torch.softmax(pack.logits.double().cpu(), -1)
    ids_c, p = ids.cpu(), torch.where(ids.cpu() >= 0, lp.cpu().double().exp(), 0.0)
    valid = ids_c >= 0
    in_k = torch.zeros_like(q, dtype=torch.bool)
    rows, slots = valid.nonzero(as_tuple=True)
    in_k[rows, ids_c[rows, slots]] = True
    P, Q = p.sum(1, keepdim=True), (q * in_k).sum(1, keepdim=True)
    tau = q * (1 - P).clamp(0, 1) / (1 - Q)
    tau[rows, ids_c[rows, slots]] = p[rows, slots]
    assert_close("q − τ", grad, (q - tau) / 12, 3e-7, 1e-4)


@pytest.mark.parametrize("mode", KD_MODES)
def test_reference_gradient_by_finite_differences(mode):
    """The reference's gradient (through the floor's custom derivative too) against central finite
    differences in float64; the kernels are compared with the reference's gradient everywhere else."""
    pack, ids, lp = _case([4, 3], 23, 3, seed=7, device="cpu")
    peaked = pack.logits.double()
    peaked[2, int(ids[2, 0])] += 80.0  # row 2: 1 − Q under the floor (where it is not floored, for topk)

    def kl(x):
        return topk_kl(torch.log_softmax(x, -1), ids, lp.double(), mode)[0]

    assert torch.autograd.gradcheck(kl, (pack.logits.double().requires_grad_(),), eps=1e-6, atol=1e-8)
    if mode == "topk_tail":
        # under the floor the value is flat in 1 − Q; the gradient is the tail term's linearized at
        # the floor (pear_mega.kd): it sums to 0 over the vocabulary and matches the closed form
        x = peaked.requires_grad_()
        grad = torch.autograd.grad(kl(x)[2], x)[0][2]
        q = torch.softmax(peaked.detach()[2], -1)
        keep = ids[2] >= 0
        k, p = ids[2][keep], lp[2].double()[keep].exp()
        outside = torch.ones_like(q, dtype=torch.bool)
        outside[k] = False
        P, Q, tail = p.sum(), q[k].sum(), q[outside].sum()  # tail = 1 − Q without cancellation
        assert tail < STUDENT_TAIL_FLOOR
        want = q * (P - (1 - P) * Q / STUDENT_TAIL_FLOOR)
        want[k] = q[k] - p - (1 - P) * (1 - tail / STUDENT_TAIL_FLOOR) * q[k]
        assert_close("floored gradient", grad, want, 1e-12, 1e-9)
        assert abs(float(grad.sum())) < 1e-12
    else:
        assert torch.autograd.gradcheck(kl, (peaked.requires_grad_(),), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_inplace_backward_and_vocab_padding(backend, dtype):
    pack, ids, lp = _case([11, 6], 1024, 5, seed=8, dtype=dtype)
    pack.labels = torch.where(pack.labels >= 1000, pack.labels - 24, pack.labels)
    ids = torch.where(ids >= 1000, ids - 900, ids)
    ids = torch.where((ids[:, :, None] == ids[:, None, :]).sum(-1) > 1, -1, ids)  # unique again
    pack.logits[:, 1000:] = 40.0  # would dominate the softmax if it were not excluded
    kd = KDConfig(mode="topk_tail", nll_weight=1.0)
    ref, ref_grad = _reference(pack, ids, lp, PearConfig(), kd, vocab_size=1000)
    leaf = pack.logits.clone().requires_grad_()
    logits = leaf * 1  # an intermediate, like the output of the LM head
    out = fused_pear_kd_loss(logits, pack.labels, pack.beta, ids, lp, pack.cu, PearConfig(), kd,
                             vocab_size=1000, inplace_backward=True, backend=backend)  # fmt: skip
    out.loss.backward()
    compare_kd(out, ref, leaf.grad, ref_grad, dtype)
    assert torch.all(leaf.grad[:, 1000:] == 0)
    assert_close("inplace buffer", logits.detach(), leaf.grad, 0.0, 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_matches_reference_and_log_weights_export(backend):
    pack, ids, lp = _case([9, 5, 12], 300, 4, seed=9)
    pear = PearConfig(level="block", **PEAR)
    for mode in KD_MODES:
        kd = KDConfig(mode=mode, nll_weight=0.1)
        ref, _ = _reference(pack, ids, lp, pear, kd)
        eager = pear_kd_loss_eager(pack.logits, pack.labels, pack.beta, ids, lp, pack.cu, pear, kd)
        assert_close(f"eager {mode}", eager, ref.loss, *KD_TOLERANCES[torch.float32]["fwd"])
    mask = pack.labels != -100
    lp_theta = torch.where(mask, -torch.rand(pack.labels.shape, device=DEVICE), 0.0)
    log_w, inv_count, nonempty = pear_log_weights(lp_theta, pack.beta, pack.labels, pack.cu, pear, backend=backend)
    assert_close("pear_log_weights", log_w, reference_log_weights(lp_theta, pack.beta, mask, pack.cu, pear), 2e-5, 1e-5)
    assert int(nonempty) == 3 and torch.all((inv_count > 0) == mask)


def _bad_call(backend="torch", **overrides):
    pack, ids, lp = _case([4, 5], 32, 3, seed=10, mask_frac=0.0, last_masked=False)
    args = dict(logits=pack.logits, labels=pack.labels, behavior_logprobs=pack.beta, topk_ids=ids,
                topk_logprobs=lp, cu_seqlens=pack.cu, pear_config=PearConfig(), kd_config=KDConfig(),
                backend=backend)  # fmt: skip
    for key, value in overrides.items():
        args[key] = value(args[key].clone()) if callable(value) else value
    return fused_pear_kd_loss(**args)


def _set(index, value):
    def edit(t):
        t[index] = value
        return t

    return edit


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(topk_ids=_set((3, 1), 32)), r"topk_ids\[3, 1\] = 32 is outside \[0, 32\)"),
        (dict(topk_ids=_set((2, 0), -2)), r"topk_ids\[2, 0\] = -2 is outside"),
        (dict(topk_logprobs=_set((4, 2), 0.5)), r"topk_logprobs\[4, 2\] = 0.5 must be finite and <= 0"),
        (dict(topk_logprobs=_set((5, 1), float("nan"))), r"topk_logprobs\[5, 1\] = nan"),
        (dict(topk_ids=lambda t: torch.cat([t[:, :1], t[:, :1], t[:, 2:]], 1)), r"row 1 holds id .* twice"),
        (dict(topk_ids=lambda t: t[:, :0]), r"topk_ids must be \[9, K\] with K >= 1"),
        (dict(topk_ids=lambda t: t.float()), "topk_ids must be int64"),
        (dict(topk_logprobs=lambda t: t[:, :2]), "topk_logprobs must have the shape of topk_ids"),
        (dict(labels=_set(3, 32)), r"fused_pear_kd_loss: labels\[3\] = 32 is outside"),
        (dict(kd_config=dict(mode="topk")), "kd_config must be a KDConfig"),
        (dict(pear_config=PearConfig(target_temperature=0.7)), "target_temperature must be 1"),
    ],
)
def test_bad_inputs(overrides, message):
    with pytest.raises(ValueError, match=message):
        _bad_call(**overrides)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(logits=lambda t: t[:, None]), r"logits must be \[T, V_local\]"),
        (dict(behavior_logprobs=lambda t: t[:-1]), r"behavior_logprobs must have shape \[9\]"),
        (dict(cu_seqlens=_set(0, 1)), r"cu_seqlens\[0\] must be 0"),
        (dict(vocab_size=0), "vocab_size must be a positive int"),
        (dict(normalizer=0.0), "normalizer must be finite and > 0"),
        (dict(backend="cuda"), "backend must be one of"),
    ],
)
def test_checks_shared_with_fused_pear_loss_name_this_function(overrides, message):
    with pytest.raises(ValueError, match=rf"^fused_pear_kd_loss: {message}"):
        _bad_call(**overrides)


def test_empty_slots_may_hold_anything_and_kdconfig_is_validated():
    # an empty slot's log-prob is ignored, even a NaN; row 2 starts with an empty slot
    out = _bad_call(topk_ids=_set((2, 0), -1), topk_logprobs=_set((2, 0), float("nan")))
    assert torch.isfinite(out.loss)
    for kwargs, message in [
        (dict(mode="kl"), "KDConfig.mode must be one of"),
        (dict(kl_weight=-1.0), "KDConfig.kl_weight must be a finite number >= 0"),
        (dict(nll_weight=float("inf")), "KDConfig.nll_weight must be a finite number >= 0"),
        (dict(kl_weight=0.0), "both 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            KDConfig(**kwargs)
