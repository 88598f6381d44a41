"""Update alignment on a tiny model's HF directories against a direct computation; curve helpers by hand."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from pear_mega.study import diagnostics


def _kind(name: str) -> str:
    """Reference kind of an HF tensor name, written independently of the module's patterns."""
    if name == "lm_head.weight":
        return "lm_head"
    if "embed_tokens" in name:
        return "embedding"
    if name.endswith("norm.weight"):  # input/post_attention layernorms, the final norm, q_norm/k_norm
        return "norm"
    if ".self_attn." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    raise AssertionError(name)


def _write(tensors: dict, src_dir, dst_dir):
    dst_dir.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst_dir / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(src_dir / "config.json", dst_dir / "config.json")
    return dst_dir


def _perturbed_dirs(init_dir, root, extra: dict | None = None):
    """SFT = init + a; RL = SFT + b with b = −0.5 a on attention (cos −1), 2 a on the MLP (cos +1),
    a + noise on norms, fresh noise on embedding and lm_head. Returns (init, sft, rl) dirs and tensors."""
    g = torch.Generator().manual_seed(0)
    init = {**load_file(str(init_dir / "model.safetensors")), **(extra or {})}
    sft, rl = {}, {}
    for name, t in init.items():
        a = 0.01 * torch.randn(t.shape, generator=g)
        noise = 0.01 * torch.randn(t.shape, generator=g)
        b = {"attention": -0.5 * a, "mlp": 2.0 * a, "norm": a + noise}.get(_kind(name), noise)
        sft[name] = t + a
        rl[name] = sft[name] + b
    if extra:  # a tied lm_head stays equal to the embedding in every checkpoint
        for d in (sft, rl):
            d["lm_head.weight"] = d["model.embed_tokens.weight"].clone()
    dirs = (_write(init, init_dir, root / "init"), _write(sft, init_dir, root / "sft"), _write(rl, init_dir, root / "rl"))
    return dirs, (init, sft, rl)


def _reference(init, sft, rl, skip=()):
    """cos per kind and overall from flattened, concatenated float64 vectors."""
    vecs: dict[str, tuple[list, list]] = {}
    for name in init:
        if name in skip:
            continue
        a = (sft[name].double() - init[name].double()).flatten()
        b = (rl[name].double() - sft[name].double()).flatten()
        vecs.setdefault(_kind(name), ([], []))[0].append(a)
        vecs[_kind(name)][1].append(b)

    def cos(a, b):
        return float(torch.dot(a, b) / (a.norm() * b.norm()))

    per_kind = {k: cos(torch.cat(a), torch.cat(b)) for k, (a, b) in vecs.items()}
    all_a = torch.cat([x for a, _ in vecs.values() for x in a])
    all_b = torch.cat([x for _, b in vecs.values() for x in b])
    return cos(all_a, all_b), per_kind


@pytest.mark.parametrize("family, tied", [("llama", True), ("qwen2", False), ("qwen3", True)])
def test_update_alignment_matches_direct_computation(tmp_path, family, tied):
    from pear_mega.pretrained import tiny_model

    base = tiny_model(tmp_path / "base", family=family, hidden_size=64, intermediate_size=128,
                      tie_word_embeddings=tied)
    (init_d, sft_d, rl_d), (init, sft, rl) = _perturbed_dirs(base, tmp_path)
    got = diagnostics.update_alignment(init_d, sft_d, rl_d)
    overall, per_kind = _reference(init, sft, rl)
    assert got["overall"] == pytest.approx(overall, abs=1e-9)
    assert set(got["per_kind"]) == set(per_kind)
    for kind, value in per_kind.items():
        assert got["per_kind"][kind] == pytest.approx(value, abs=1e-9), kind
    assert got["per_kind"]["attention"] == pytest.approx(-1.0, abs=1e-9)
    assert got["per_kind"]["mlp"] == pytest.approx(1.0, abs=1e-9)
    assert ("lm_head" in got["per_kind"]) == (not tied)
    if family == "qwen2":  # QKV biases are attention parameters
        assert any(n.endswith("q_proj.bias") for n in init)
    if family == "qwen3":  # q_norm / k_norm are norms
        assert any(n.endswith("q_norm.weight") for n in init)


def test_tied_lm_head_is_not_counted_twice(tmp_path):
    from pear_mega.pretrained import tiny_model

    base = tiny_model(tmp_path / "base", hidden_size=64, intermediate_size=128, tie_word_embeddings=True)
    embed = load_file(str(base / "model.safetensors"))["model.embed_tokens.weight"]
    (init_d, sft_d, rl_d), (init, sft, rl) = _perturbed_dirs(base, tmp_path, {"lm_head.weight": embed.clone()})
    got = diagnostics.update_alignment(init_d, sft_d, rl_d)
    once, per_kind = _reference(init, sft, rl, skip=("lm_head.weight",))
    twice, _ = _reference(init, sft, rl)
    assert abs(once - twice) > 1e-6  # the test can tell the two apart
    assert got["overall"] == pytest.approx(once, abs=1e-9)
    assert "lm_head" not in got["per_kind"]


def test_update_alignment_refuses_mismatched_checkpoints(tmp_path):
    from pear_mega.pretrained import tiny_model

    base = tiny_model(tmp_path / "base", hidden_size=64, intermediate_size=128)
    (init_d, sft_d, rl_d), (init, sft, rl) = _perturbed_dirs(base, tmp_path)
    del rl["model.norm.weight"]
    (rl_d / "model.safetensors").unlink()
    save_file(rl, str(rl_d / "model.safetensors"))
    with pytest.raises(ValueError, match=r"rl and .*sft hold different tensors, e\.g\. \['model\.norm\.weight'\]"):
        diagnostics.update_alignment(init_d, sft_d, rl_d)
    # no update at all has no direction
    same = diagnostics.update_alignment(init_d, init_d, sft_d)
    assert math.isnan(same["overall"])
    assert json.loads((init_d / "config.json").read_text())["model_type"] == "llama"


def test_update_sums_in_chunks():
    g = torch.Generator().manual_seed(1)
    init, sft, rl = (torch.randn(5, 7, generator=g, dtype=torch.bfloat16) for _ in range(3))
    a, b = sft.double() - init.double(), rl.double() - sft.double()
    expected = (float((a * b).sum()), float((a * a).sum()), float((b * b).sum()))
    for chunk in (1, 6, 35, 1000):  # ragged last chunk, exact fit, one chunk
        assert diagnostics._update_sums(init, sft, rl, chunk=chunk) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("name, kind", [
    ("model.embed_tokens.weight", "embedding"), ("lm_head.weight", "lm_head"), ("model.norm.weight", "norm"),
    ("model.layers.3.input_layernorm.weight", "norm"), ("model.layers.0.post_attention_layernorm.weight", "norm"),
    ("model.layers.1.self_attn.q_norm.weight", "norm"), ("model.layers.1.self_attn.k_norm.weight", "norm"),
    ("model.layers.1.self_attn.q_proj.weight", "attention"), ("model.layers.1.self_attn.v_proj.bias", "attention"),
    ("model.layers.1.self_attn.o_proj.weight", "attention"), ("model.layers.2.mlp.gate_proj.weight", "mlp"),
    ("model.layers.2.mlp.up_proj.weight", "mlp"), ("model.layers.2.mlp.down_proj.weight", "mlp"),
])
def test_param_kind(name, kind):
    assert diagnostics.param_kind(name) == kind


def test_param_kind_refuses_unknown_names():
    with pytest.raises(ValueError, match="transformer.h.0.attn.c_attn.weight"):
        diagnostics.param_kind("transformer.h.0.attn.c_attn.weight")


def test_curve_band_and_history_reductions():
    runs = [
        [{"step": 1, "x": 1.0}, {"step": 2, "x": 3.0}],
        [{"step": 1, "x": 3.0}, {"step": 2, "y": 5.0}, {"step": 3, "x": math.nan}],
        [{"step": 2, "x": 6.0}],
    ]
    band = diagnostics.curve_band(runs, "x")
    assert band == {"step": [1, 2], "mean": [2.0, 4.5], "lo": [1.0, 3.0], "hi": [3.0, 6.0], "n": [2, 2]}
    assert diagnostics.curve_band(runs, "z")["step"] == []
    assert diagnostics.history_mean(runs[0], "x") == 2.0
    assert diagnostics.history_last(runs[1], "x") == 3.0  # the NaN at step 3 is not a value
    assert math.isnan(diagnostics.history_last(runs[0], "y"))


def test_summarize_diagnostics_by_hand():
    results = {"arms": ["none", "token"], "runs": [
        {"arm": "token", "seed": 0, "sft_history": [{"step": 1, "pear/ess": 0.5}, {"step": 2, "pear/ess": 0.7}],
         "rl_history": [{"step": 1, "drift/kl_to_init_k3": 0.1}, {"step": 2, "drift/kl_to_init_k3": 0.2}],
         "alignment": {"overall": -0.2, "per_kind": {"mlp": 0.1}}},
        {"arm": "token", "seed": 1, "sft_history": [{"step": 1, "pear/ess": 0.9}],
         "rl_history": [{"step": 1, "drift/kl_to_init_k3": 0.4}], "alignment": None},
    ]}
    d = diagnostics.summarize_diagnostics(results)
    ess = d["token"]["sft"]["pear/ess"]  # per-run means 0.6 and 0.9; t_{0.975,1} · sd / √2, sd = 0.3 / √2
    half = 12.706204736174696 * (0.3 / math.sqrt(2)) / math.sqrt(2)
    assert (ess["mean"], ess["lo"], ess["hi"], ess["n"]) == pytest.approx((0.75, 0.75 - half, 0.75 + half, 2))
    assert d["token"]["rl"]["drift/kl_to_init_k3"]["mean"] == pytest.approx(0.3)  # last steps 0.2 and 0.4
    assert d["token"]["alignment"]["overall"]["n"] == 1 and d["token"]["alignment"]["overall"]["mean"] == -0.2
    assert list(d["token"]["alignment"]["per_kind"]) == ["mlp"]
    assert d["none"]["sft"]["pear/ess"]["n"] == 0


def test_summarize_diagnostics_includes_the_kd_statistics_of_kd_arms():
    results = {"arms": ["none", "kd_token"], "runs": [
        {"arm": "kd_token", "seed": s, "sft_history": [{"step": 1, "kd/kl": kl, "kd/teacher_mass": 0.9},
                                                       {"step": 2, "kd/kl": kl / 2, "kd/teacher_mass": 0.9}],
         "rl_history": [], "alignment": None} for s, kl in ((0, 0.4), (1, 0.8))
    ] + [{"arm": "none", "seed": 0, "sft_history": [{"step": 1, "pear/ess": 1.0}], "rl_history": [],
          "alignment": None}]}
    d = diagnostics.summarize_diagnostics(results)
    kl = d["kd_token"]["sft"]["kd/kl"]  # per-run means 0.3 and 0.6
    assert kl["n"] == 2 and kl["mean"] == pytest.approx(0.45)
    assert d["kd_token"]["sft"]["kd/teacher_mass"]["mean"] == pytest.approx(0.9)
    assert set(diagnostics.SFT_KD_KEYS) <= set(d["none"]["sft"]) and d["none"]["sft"]["kd/kl"]["n"] == 0
