"""megatron-core models vs transformers at TP/PP layouts, checkpoints, resharding, training.

Real megatron-core on gloo (CPU, fp32). Each world size is one spawn running several checks
(see ``scenarios.py``); the fixtures below run them once per module and the tests read the rows.
Tolerances: fp32 logits within 1e-4 of HF (observed ~3e-7 on the tiny models), tensors through
HF -> megatron -> HF bit-exact, TP=2 training losses within 1e-5 of TP=1.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.models.launcher import rows, run_ranks

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

LOGIT_TOL = 1e-4
FAMILIES = ("llama", "qwen2", "qwen3")


def _check_parity(row: dict) -> None:
    where = f"{row.get('family', '')} layout tp,pp={row['layout']}"
    assert row["packed"] <= LOGIT_TOL, f"{where}: packed-batch max |logit diff| {row['packed']:.3e}"
    assert row["single"] <= LOGIT_TOL, f"{where}: single-sequence max |logit diff| {row['single']:.3e}"
    assert row["padded_columns_max"] == 0.0, f"{where}: padded vocab columns are not zero"


def _check_roundtrip(row: dict) -> None:
    rt = row["roundtrip"]
    where = f"{row['family']} layout tp,pp={row['layout']}"
    assert not rt["mismatched"], f"{where}: tensors differ after HF -> megatron -> HF: {rt['mismatched']}"
    assert not rt["missing"] and not rt["extra"], f"{where}: missing {rt['missing']} extra {rt['extra']}"


def _check_staged(parity_rows: list[dict], world_size: int) -> None:
    """The round trip through host shared memory (``HostStaging``), read on rank 0 and the last
    rank: three syncs, the second of weights perturbed by +1 (every tensor must differ from HF)."""
    got = {}
    for row in parity_rows:
        for rt in row.get("staged", []):
            where = f"{row['family']} layout tp,pp={row['layout']} reader {rt['rank']}"
            assert not rt["missing"] and not rt["extra"], f"{where}: missing {rt['missing']} extra {rt['extra']}"
            if rt["perturbed"]:
                assert len(rt["mismatched"]) == rt["count"], f"{where}: stale tensors read after a change"
            else:
                assert not rt["mismatched"], f"{where}: tensors differ from HF: {rt['mismatched']}"
            got.setdefault((tuple(row["layout"]), row["family"], rt["rank"]), []).append(rt["perturbed"])
    checked = {(tuple(r["layout"]), r["family"]) for r in parity_rows if "roundtrip" in r}
    assert set(got) == {(lay, f, r) for lay, f in checked for r in (0, world_size - 1)}
    assert all(v == [False, True, False] for v in got.values())


@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mcore_ckpts")


@pytest.fixture(scope="module")
def world2(tiny_models, smollm2_dir, ckpt_root) -> dict:
    models = [tiny_models[f] for f in FAMILIES]
    llama_ckpt = str(ckpt_root / "llama_tp2")
    trained_ckpt = str(ckpt_root / "qwen2_trained_tp2")
    steps = [
        {"kind": "parity", "layout": [2, 1], "models": models, "roundtrip": True,
         "save": {tiny_models["llama"]: llama_ckpt}},
        {"kind": "parity", "layout": [1, 2], "models": models, "roundtrip": True},
        {"kind": "reshard", "layout": [1, 2], "ckpt": llama_ckpt, "model": tiny_models["llama"]},
        {"kind": "reshard", "layout": [1, 1], "ckpt": llama_ckpt, "model": tiny_models["llama"]},
        {"kind": "train", "layout": [2, 1], "model": tiny_models["qwen2"], "steps": 3, "save": trained_ckpt},
        {"kind": "train", "layout": [1, 1], "model": tiny_models["qwen2"], "steps": 3},
        {"kind": "reshard", "layout": [1, 2], "ckpt": trained_ckpt, "model": tiny_models["qwen2"], "trained": True},
        {"kind": "tp_error", "layout": [2, 1], "model": smollm2_dir},
    ]  # fmt: skip
    results = run_ranks("run_steps", 2, {"steps": steps}, timeout=480)
    return {k: rows(results, k) for k in ("parity", "reshard", "train", "tp_error")} | {"trained_ckpt": trained_ckpt}


@pytest.fixture(scope="module")
def world4(tiny_models, ckpt_root) -> dict:
    models = [tiny_models[f] for f in FAMILIES]
    saves = {tiny_models[f]: str(ckpt_root / f"{f}_tp2pp2") for f in FAMILIES}
    steps = [{"kind": "parity", "layout": [2, 2], "models": models, "roundtrip": True, "save": saves},
             # TP=2 x DP=2: staged with readers 0 and 3, rank 2 (DP replica 1) neither writes nor reads
             {"kind": "parity", "layout": [2, 1], "models": [tiny_models["llama"]], "roundtrip": True}]
    results = run_ranks("run_steps", 4, {"steps": steps}, timeout=480)
    return {"parity": rows(results, "parity"), "ckpts": saves}


@pytest.fixture(scope="module")
def world1(tiny_models, smollm2_dir, world4, ckpt_root) -> dict:
    """TP=1 parity, and the conversion tool end to end (import, verify, export)."""
    qwen2 = tiny_models["qwen2"]
    imported = str(ckpt_root / "qwen2_imported")
    exports = {f: str(ckpt_root / f"{f}_exported") for f in FAMILIES}
    steps = [
        {"kind": "parity", "layout": [1, 1], "models": [tiny_models[f] for f in FAMILIES] + [smollm2_dir]},
        {"kind": "staging_unavailable", "model": tiny_models["llama"], "dir": str(ckpt_root)},
        {"kind": "tool", "argv": ["import", qwen2, imported, "--tp", "2"]},
        {"kind": "tool", "argv": ["verify", qwen2, imported, "--tol", "1e-4"]},
        {"kind": "tool", "argv": ["verify", tiny_models["llama"], imported, "--tol", "1e-4"]},
    ] + [
        {"kind": "tool", "argv": ["export", world4["ckpts"][tiny_models[f]], exports[f]]} for f in FAMILIES
    ]  # fmt: skip
    results = run_ranks("run_steps", 1, {"steps": steps}, timeout=480)
    return {"parity": rows(results, "parity"), "tool": rows(results, "tool"), "exports": exports,
            "staging": rows(results, "staging_unavailable")}


@pytest.mark.timeout(900)
def test_tp2_and_pp2_match_hf_and_roundtrip(world2):
    got = {(tuple(r["layout"]), r["family"]) for r in world2["parity"] if "packed" in r}
    assert got == {(layout, f) for layout in ((2, 1), (1, 2)) for f in FAMILIES}
    for row in world2["parity"]:
        if "packed" in row:
            _check_parity(row)
        if "roundtrip" in row:
            _check_roundtrip(row)
    assert sum("roundtrip" in r for r in world2["parity"]) == 6
    _check_staged(world2["parity"], 2)


@pytest.mark.timeout(900)
def test_checkpoint_saved_at_tp2_loads_at_pp2_and_tp1(world2):
    reshard = [r for r in world2["reshard"] if r["ckpt"] != world2["trained_ckpt"]]
    assert sorted(tuple(r["layout"]) for r in reshard) == [(1, 1), (1, 2)]
    for row in reshard:
        assert row["saved_layout"] == [2, 1]
        _check_parity(row)
        assert row["vs_saved"] <= 1e-5, f"layout {row['layout']}: logits differ from TP=2 by {row['vs_saved']:.3e}"


@pytest.mark.timeout(900)
def test_training_tp2_matches_tp1(world2):
    by_layout = {tuple(r["layout"]): r for r in world2["train"]}
    tp2, tp1 = by_layout[(2, 1)], by_layout[(1, 1)]
    assert len(tp1["losses"]) == 3
    diffs = [abs(a - b) for a, b in zip(tp2["losses"], tp1["losses"])]
    assert max(diffs) <= 1e-5, f"losses TP=2 {tp2['losses']} vs TP=1 {tp1['losses']}"
    assert tp1["losses"][-1] < tp1["losses"][0], f"training did not reduce the loss: {tp1['losses']}"
    for a, b in zip(tp2["grad_norms"], tp1["grad_norms"]):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(b)), f"grad norms {tp2['grad_norms']} vs {tp1['grad_norms']}"


@pytest.mark.timeout(900)
def test_trainer_checkpoint_with_optimizer_loads_model_only_at_pp2(world2):
    """A TP=2 checkpoint holding model + optimizer + iteration loads (model part) at PP=2."""
    (row,) = [r for r in world2["reshard"] if r["ckpt"] == world2["trained_ckpt"]]
    assert row["saved_layout"] == [2, 1] and row["layout"] == [1, 2]
    assert row["vs_saved"] <= 1e-5, f"trained-model logits differ after reload: {row['vs_saved']:.3e}"
    assert row["trained_vs_hf"] > 1e-3, "the reloaded model still has the untrained weights"


@pytest.mark.timeout(900)
def test_smollm2_tp2_is_a_clear_error(world2):
    (row,) = world2["tp_error"]
    assert row["error"] is not None, "TP=2 on 9 query / 3 KV heads should raise"
    assert "9 query heads" in row["error"] and "3 key/value heads" in row["error"], row["error"]


@pytest.mark.timeout(900)
def test_tp2_pp2_matches_hf_and_roundtrip(world4):
    got = {(tuple(r["layout"]), r["family"]) for r in world4["parity"] if "packed" in r}
    assert got == {((2, 2), f) for f in FAMILIES} | {((2, 1), "llama")}
    for row in world4["parity"]:
        if "packed" in row:
            _check_parity(row)
        if "roundtrip" in row:
            _check_roundtrip(row)
    assert sum("roundtrip" in r for r in world4["parity"]) == 4
    _check_staged(world4["parity"], 4)


@pytest.mark.timeout(900)
def test_tp1_matches_hf_tiny_and_smollm2(world1):
    families = sorted(r["family"] for r in world1["parity"])
    assert families == sorted(FAMILIES + ("llama",))  # the three tiny ones and SmolLM2 (llama)
    for row in world1["parity"]:
        print(row)
        _check_parity(row)


@pytest.mark.timeout(900)
def test_host_staging_names_why_it_cannot_be_used(world1):
    (row,) = world1["staging"]
    assert row["missing"] == "/nonexistent/pear_mega is missing or not writable"
    assert row["fits"] and row["ok"] is None


@pytest.mark.timeout(900)
def test_tool_import_verify_export(world1, tiny_models):
    codes = [(r["argv"][0], Path(r["argv"][1]).name, r["exit"]) for r in world1["tool"]]
    assert codes[0] == ("import", "qwen2", 0), codes
    assert codes[1] == ("verify", "qwen2", 0), codes
    # Verifying against a different model must fail (the check can fail).
    assert codes[2][0] == "verify" and codes[2][2] != 0, codes
    assert all(code == 0 for kind, _, code in codes[3:]), codes


@pytest.mark.timeout(900)
def test_export_of_tp2_pp2_checkpoint_is_bit_exact(world1, tiny_models):
    """HF -> megatron (TP=2, PP=2) -> dist checkpoint -> export at TP=1 -> HF: every tensor equal."""
    for family in FAMILIES:
        original = load_file(str(Path(tiny_models[family]) / "model.safetensors"))
        exported_dir = Path(world1["exports"][family])
        exported = load_file(str(exported_dir / "model.safetensors"))
        assert sorted(exported) == sorted(original), family
        for name, tensor in original.items():
            assert torch.equal(exported[name], tensor), f"{family}: {name} differs after the round trip"
        assert (exported_dir / "config.json").is_file()


@pytest.mark.timeout(900)
def test_exported_checkpoint_loads_in_transformers(world1, tiny_models):
    from transformers import AutoModelForCausalLM

    ref = torch.load(Path(tiny_models["qwen3"]) / "ref.pt")
    model = AutoModelForCausalLM.from_pretrained(world1["exports"]["qwen3"], dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(ref["ids"]).logits[0]
    assert (logits - ref["single"]).abs().max().item() == 0.0


@pytest.fixture(scope="module")
def world3(smollm2_dir) -> list[dict]:
    steps = [{"kind": "parity", "layout": [3, 1], "models": [smollm2_dir]}]
    return rows(run_ranks("run_steps", 3, {"steps": steps}, timeout=480), "parity")


@pytest.mark.timeout(900)
def test_smollm2_tp3_matches_hf(world3):
    (row,) = world3
    print(row)
    assert row["layout"] == [3, 1]
    _check_parity(row)
