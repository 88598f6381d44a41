"""Report generation from a fixture: files, numbers recomputed here, partial studies, the claim rule."""

import copy
import json
import math
import re
from pathlib import Path

import pytest

from pear_mega.study.report import verdict, write_report

FIXTURE = Path(__file__).parent / "fixtures" / "results_small.json"
T975 = {1: 12.706204736174696, 2: 4.302652729749464}  # t_{0.975, df}: tan(0.475π) and the df = 2 closed form
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def results():
    return json.loads(FIXTURE.read_text())


def _pass1(run, phase, suite):
    """pass@1 of a run: the mean over prompts of c / n (no pass@k estimator involved)."""
    e = run["eval"][phase][suite]
    return sum(c / e["n"] for c in e["correct"]) / len(e["correct"])


def _seed_ci(values):
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
    half = T975[len(values) - 1] * sd / math.sqrt(len(values))
    return m, m - half, m + half


def _runs(results, arm):
    return sorted((r for r in results["runs"] if r["arm"] == arm), key=lambda r: r["seed"])


def _strict_json(path):
    def refuse(name):
        raise AssertionError(f"{path} holds {name}")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_report_from_fixture(tmp_path, results):
    paths = write_report(copy.deepcopy(results), tmp_path / "out")
    for name in ("report.md", "results.json", "pass_at_k.png", "reward.png", "kl_to_init.png", "sparsity.png",
                 "pear_weights.png", "alignment.png"):
        assert paths[name] == tmp_path / "out" / name and paths[name].is_file(), name
        if name.endswith(".png"):
            assert paths[name].read_bytes()[:8] == PNG
    saved = _strict_json(paths["results.json"])
    assert saved["runs"] == results["runs"] and saved["study"] == results["study"]  # the input, unchanged
    md = paths["report.md"].read_text()
    assert "python -m pear_mega.study --recipe tiny_fixture" in md and "`0123abc`" in md and "2-core CPU" in md
    assert "| ess_fraction | 0.61 |" in md  # probe
    assert "All 6 runs (arms × seeds) are complete." in md

    # pass@1 after RL, per arm, with the seed interval
    for arm in ("none", "token"):
        m, lo, hi = _seed_ci([_pass1(r, "post", "leg_counting") for r in _runs(results, arm)])
        assert f"| {arm} | pass@1 | post | 3 | {m:.3f} | [{lo:.3f}, {hi:.3f}] |" in md
    # the paired difference token − none after RL, seed by seed
    diffs = [_pass1(t, "post", "leg_counting") - _pass1(n, "post", "leg_counting")
             for t, n in zip(_runs(results, "token"), _runs(results, "none"))]
    m, lo, hi = _seed_ci(diffs)
    assert f"| token − none | post | leg_counting | pass@1 | 3 | {m:+.3f} | [{lo:+.3f}, {hi:+.3f}] |" in md
    # the RL gain of token
    gains = [_pass1(r, "post", "basic_arithmetic") - _pass1(r, "pre", "basic_arithmetic") for r in _runs(results, "token")]
    m, lo, hi = _seed_ci(gains)
    assert f"| token | basic_arithmetic | pass@1 | 3 | {m:+.3f} | [{lo:+.3f}, {hi:+.3f}] |" in md
    # PEAR ESS fraction: per run the mean over SFT steps, then over seeds
    ess = [sum(h["pear/ess"] for h in r["sft_history"]) / len(r["sft_history"]) for r in _runs(results, "token")]
    m, lo, hi = _seed_ci(ess)
    assert re.search(rf"^\| token \| [^|]+ \| {m:.3f} \[{lo:.3f}, {hi:.3f}\] \|", md, re.M)
    # alignment overall
    m, lo, hi = _seed_ci([r["alignment"]["overall"] for r in _runs(results, "none")])
    assert f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}] |" in md


def test_claims_follow_the_intervals(tmp_path, results):
    md = write_report(results, tmp_path)["report.md"].read_text()
    section = md.split("## What the intervals support")[1].split("## Plots")[0]
    bullets = [line for line in section.splitlines() if line.startswith("- ")]
    assert len(bullets) == 8  # 2 suites × 2 k, after RL and for the RL gain
    summary = json.loads((tmp_path / "results.json").read_text())["summary"]["stats"]
    claimed = 0
    for r in [x for x in summary["paired_diff"] if x["phase"] == "post"] + summary["rl_gain_diff"]:
        line = next(b for b in bullets if f"pass@{r['k']} on {r['suite']}" in b
                    and ("RL gain" in b) == ("phase" not in r))
        both_exclude = (r["lo"] > 0 and r["boot_lo"] > 0) or (r["hi"] < 0 and r["boot_hi"] < 0)
        assert ("**higher**" in line or "**lower**" in line) == both_exclude, line
        if not both_exclude:
            assert "no difference" in line
        if r["lo"] <= 0 <= r["hi"] and r["boot_lo"] <= 0 <= r["boot_hi"]:
            assert f"width {r['hi'] - r['lo']:.3f}" in line
        claimed += both_exclude
    assert claimed == 1  # the fixture holds one clear effect: token's RL gain in pass@1 on leg_counting
    assert "RL gain of `token` vs `none`, pass@1 on leg_counting: **higher**" in section


def test_partial_study_names_missing_runs(tmp_path, results):
    results["runs"] = [r for r in results["runs"] if (r["arm"], r["seed"]) != ("token", 2)]
    none1 = next(r for r in results["runs"] if (r["arm"], r["seed"]) == ("none", 1))
    del none1["eval"]["post"]["basic_arithmetic"]
    none1["alignment"] = None
    paths = write_report(results, tmp_path)
    md = paths["report.md"].read_text()
    assert "**Partial study**: 2 of 6 runs are missing or incomplete" in md
    assert "- arm `token` seed 2: missing run" in md
    assert "- arm `none` seed 1: missing post/basic_arithmetic" in md
    # the token rows use the two seeds present
    m, lo, hi = _seed_ci([_pass1(r, "post", "leg_counting") for r in _runs(results, "token")])
    assert f"| token | pass@1 | post | 2 | {m:.3f} | [{lo:.3f}, {hi:.3f}] |" in md
    # token − none after RL on basic_arithmetic: only seed 0 has both post evaluations
    assert re.search(r"\| token − none \| post \| basic_arithmetic \| pass@1 \| 1 \| [+-]\d\.\d{3} \| n/a \|", md)
    assert "from a single seed; no interval over seeds, so no difference is claimed" in md
    _strict_json(paths["results.json"])


def test_single_run_study_renders(tmp_path, results):
    results["seeds"] = [0]
    results["runs"] = [r for r in results["runs"] if r["seed"] == 0]
    for r in results["runs"]:
        r["rl_history"] = []
    paths = write_report(results, tmp_path)
    assert "reward.png" not in paths and "kl_to_init.png" not in paths  # nothing logged, no empty plot
    md = paths["report.md"].read_text()
    assert "| none | pass@1 | pre | 1 |" in md and "(1 seed)" in md
    assert "**higher**" not in md and "**lower**" not in md


def test_study_without_finished_runs_renders(tmp_path, results):
    results["runs"] = []
    paths = write_report(results, tmp_path)
    assert sorted(paths) == ["report.md", "results.json"]  # no empty plots
    md = paths["report.md"].read_text()
    assert "**Partial study**: 6 of 6 runs are missing" in md and "- arm `token` seed 1: missing run" in md
    assert "No post-RL comparison is available: nothing is claimed." in md


def test_malformed_results_are_refused_before_writing(tmp_path, results):
    results["runs"][0]["arm"] = "blocks"
    with pytest.raises(ValueError, match=r"results\['runs'\]\[0\]: arm 'blocks'"):
        write_report(results, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("lo, hi, blo, bhi, expected", [
    (0.01, 0.2, 0.02, 0.3, "**higher**"),
    (-0.3, -0.01, -0.2, -0.05, "**lower**"),
    (-0.05, 0.2, 0.02, 0.3, "no difference established"),
    (-0.05, 0.2, -0.01, 0.3, "no difference detected"),
])
def test_verdict_rule(lo, hi, blo, bhi, expected):
    r = {"mean": (lo + hi) / 2, "lo": lo, "hi": hi, "boot_lo": blo, "boot_hi": bhi, "n": 3}
    text = verdict(r, "x")
    assert expected in text
    if expected == "no difference detected":
        assert f"width {hi - lo:.3f}" in text
    single = verdict({**r, "n": 1, "lo": math.nan, "hi": math.nan}, "x")
    assert "single seed" in single and "**" not in single


def test_kd_arm_is_reported_like_any_arm_with_its_distillation_statistics(tmp_path, results):
    """A kd arm gets the paired difference against the baseline, and its SFT distillation
    statistics (mean over steps, then over seeds) get their own table; NLL arms have none."""
    results["arms"] = ["none", "kd_token"]
    for run in _runs(results, "token"):
        run["arm"] = "kd_token"
        for i, h in enumerate(run["sft_history"]):
            h.update({"kd/kl": 0.5 + 0.1 * i + 0.05 * run["seed"], "kd/teacher_mass": 0.9, "kd/student_mass": 0.4,
                      "kd/topk_overlap": 0.25})
    md = write_report(copy.deepcopy(results), tmp_path)["report.md"].read_text()
    diffs = [_pass1(t, "post", "leg_counting") - _pass1(n, "post", "leg_counting")
             for t, n in zip(_runs(results, "kd_token"), _runs(results, "none"))]
    m, lo, hi = _seed_ci(diffs)
    assert f"| kd_token − none | post | leg_counting | pass@1 | 3 | {m:+.3f} | [{lo:+.3f}, {hi:+.3f}] |" in md
    kl = [sum(h["kd/kl"] for h in r["sft_history"]) / len(r["sft_history"]) for r in _runs(results, "kd_token")]
    m, lo, hi = _seed_ci(kl)
    assert re.search(rf"^\| kd_token \| {m:.3f} \[{lo:.3f}, {hi:.3f}\] \| 0\.900 ", md, re.M), md
    assert not re.search(r"^\| none \| n/a \| n/a", md, re.M)  # the NLL arm has no row in that table
    assert "Distillation arms (loss.kind=kd)" in md


def test_report_without_kd_arm_has_no_distillation_table(tmp_path, results):
    assert "Distillation arms" not in write_report(results, tmp_path)["report.md"].read_text()


def test_tiny_values_are_shown_with_significant_digits(tmp_path, results):
    """A relative drift of ~1e-5 (lr 2e-6 for a few steps) is not printed as 0.000."""
    from pear_mega.study.report import _f

    assert (_f(1.234e-5), _f(-4.5e-6, sign=True), _f(0.0), _f(0.0123), _f(2e-4, sign=True)) == \
        ("1.23e-05", "-4.50e-06", "0.000", "0.012", "+2.00e-04")  # fmt: skip
    for i, run in enumerate(results["runs"]):
        for h in run["rl_history"]:
            h["drift/param_rel_l2_to_init"] = (1.0 + 0.1 * i) * 1e-5
    md = write_report(copy.deepcopy(results), tmp_path / "out")["report.md"].read_text()
    lines = md.splitlines()
    start = lines.index("| arm | reward | KL to init | cum. sparsity | rel. drift | alignment |") + 2
    drift = [line.split(" | ")[4] for line in lines[start:start + 2]]
    assert drift and all("e-05" in cell and "0.000" not in cell for cell in drift), drift
