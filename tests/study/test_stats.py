"""Study statistics against hand computations and a straightforward loop implementation."""

import math

import numpy as np
import pytest

from pear_mega.study import stats

# Student t quantiles t_{p, df} from printed tables (e.g. NIST/SEMATECH e-Handbook, table 1.3.6.7.2).
T_TABLE = [(0.975, 1, 12.7062), (0.975, 2, 4.3027), (0.975, 3, 3.1824), (0.975, 4, 2.7764), (0.975, 5, 2.5706),
           (0.975, 10, 2.2281), (0.975, 30, 2.0423), (0.95, 5, 2.0150), (0.995, 9, 3.2498), (0.9, 20, 1.3253)]
T975_2 = 4.302652729749464  # (2p − 1) / √(2p(1 − p)) at p = 0.975: the df = 2 closed form


@pytest.mark.parametrize("p, df, expected", T_TABLE)
def test_t_quantile_matches_tables(p, df, expected):
    assert stats.t_quantile(p, df) == pytest.approx(expected, abs=1e-4)
    assert stats.t_quantile(1 - p, df) == pytest.approx(-expected, abs=1e-4)


@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.999])
def test_t_quantile_closed_forms(p):
    assert stats.t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)  # Cauchy
    assert stats.t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)


def test_t_quantile_large_df_approaches_normal():
    assert stats.t_quantile(0.975, 1e6) == pytest.approx(1.959964, abs=1e-5)
    with pytest.raises(ValueError, match="p must be in"):
        stats.t_quantile(1.0, 3)


def test_seed_interval_by_hand():
    # mean 0.4, sd = √((0.04 + 0 + 0.04) / 2) = 0.2, half width = t_{0.975,2} · 0.2 / √3
    r = stats.seed_interval([0.2, 0.4, 0.6])
    half = T975_2 * 0.2 / math.sqrt(3)
    assert r["n"] == 3
    assert r["mean"] == pytest.approx(0.4)
    assert (r["lo"], r["hi"]) == pytest.approx((0.4 - half, 0.4 + half), abs=1e-9)
    one = stats.seed_interval([0.3])
    assert one["mean"] == 0.3 and math.isnan(one["lo"]) and math.isnan(one["hi"])
    assert stats.seed_interval([])["n"] == 0


def test_prompt_pass_at_k_by_hand():
    got = stats.prompt_pass_at_k({"n": 4, "correct": [0, 1, 2, 4]}, 2)
    # 1 − C(n−c, 2)/C(4, 2): c=0 → 0, c=1 → 1 − 3/6, c=2 → 1 − 1/6, c=4 → 1
    np.testing.assert_allclose(got, [0.0, 0.5, 5 / 6, 1.0])
    np.testing.assert_allclose(stats.prompt_pass_at_k({"n": 4, "correct": [0, 1, 3]}, 1), [0, 0.25, 0.75])
    with pytest.raises(ValueError, match=r"where: k=5 needs 1 <= k <= n=4"):
        stats.prompt_pass_at_k({"n": 4, "correct": [1]}, 5, "where")
    with pytest.raises(ValueError, match=r"correct\[1\] = 7"):
        stats.prompt_pass_at_k({"n": 4, "correct": [1, 7]}, 1, "where")


def _percentile_linear(values, q):
    """The q-th percentile with linear interpolation between order statistics (numpy's default)."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _bootstrap_loop(per_seed, n_boot, seed, level=0.95):
    """The prompt bootstrap written as plain loops over replicates, seeds and draws."""
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, len(v), size=(n_boot, len(v))) for v in per_seed]  # the documented draw order
    reps = []
    for b in range(n_boot):
        total = 0.0
        for v, idx in zip(per_seed, draws):
            total += sum(v[j] for j in idx[b]) / len(v)
        reps.append(total / len(per_seed))
    a = (1 - level) / 2 * 100
    return _percentile_linear(reps, a), _percentile_linear(reps, 100 - a)


def test_prompt_bootstrap_matches_loop():
    rng = np.random.default_rng(7)
    per_seed = [rng.uniform(size=5), rng.uniform(size=5), rng.uniform(size=4)]
    got = stats.prompt_bootstrap(per_seed, n_boot=300, seed=11)
    assert got == pytest.approx(_bootstrap_loop(per_seed, 300, 11), abs=1e-12)
    assert stats.prompt_bootstrap(per_seed, n_boot=300, seed=11) == got  # fixed seed: reproducible
    # every replicate lies between the smallest and the largest per-prompt value
    assert min(map(min, per_seed)) <= got[0] <= got[1] <= max(map(max, per_seed))


def _study(correct, n=2, ks=(1,)):
    """A results dict from ``correct[(arm, seed, phase)] = [counts per prompt]`` on one suite ``s``."""
    runs = {}
    for (arm, seed, phase), counts in correct.items():
        run = runs.setdefault((arm, seed), {"arm": arm, "seed": seed, "eval": {}})
        run["eval"].setdefault(phase, {})["s"] = {"n": n, "correct": counts}
    return {"study": {}, "arms": ["none", "token"], "baseline": "none", "seeds": [0, 1], "ks": list(ks),
            "suites": ["s"], "probe": None, "runs": list(runs.values())}


CORRECT = {
    ("none", 0, "pre"): [0, 1, 2], ("none", 0, "post"): [1, 1, 2],
    ("none", 1, "pre"): [1, 1, 0], ("none", 1, "post"): [1, 2, 0],
    ("token", 0, "pre"): [0, 2, 2], ("token", 0, "post"): [2, 2, 2],
    ("token", 1, "pre"): [0, 1, 0], ("token", 1, "post"): [2, 1, 1],
}


def test_summarize_by_hand():
    s = stats.summarize(_study(CORRECT), n_boot=200, boot_seed=3)
    frac = {key: np.array(c) / 2 for key, c in CORRECT.items()}  # pass@1 = c / n per prompt
    t_half = 12.706204736174696  # t_{0.975, 1}: two seeds

    def expect(per_seed_arrays, record):
        means = [float(v.mean()) for v in per_seed_arrays]
        m = sum(means) / 2
        half = t_half * abs(means[0] - means[1]) / math.sqrt(2) / math.sqrt(2)  # sd of two = |a − b| / √2
        assert record["per_seed"] == pytest.approx(means)
        assert (record["mean"], record["lo"], record["hi"]) == pytest.approx((m, m - half, m + half), abs=1e-9)
        assert (record["boot_lo"], record["boot_hi"]) == pytest.approx(_bootstrap_loop(per_seed_arrays, 200, 3),
                                                                       abs=1e-12)

    r = stats.find(s["pass_at_k"], arm="token", phase="post", suite="s", k=1)
    expect([frac["token", 0, "post"], frac["token", 1, "post"]], r)
    # token post: seed 0 = 1.0, seed 1 = (1 + 0.5 + 0.5)/3 = 2/3
    assert r["per_seed"] == pytest.approx([1.0, 2 / 3])

    d = stats.find(s["paired_diff"], arm="token", phase="post", suite="s", k=1)
    expect([frac["token", sd, "post"] - frac["none", sd, "post"] for sd in (0, 1)], d)
    g = stats.find(s["rl_gain"], arm="none", suite="s", k=1)
    expect([frac["none", sd, "post"] - frac["none", sd, "pre"] for sd in (0, 1)], g)
    gd = stats.find(s["rl_gain_diff"], arm="token", suite="s", k=1)
    expect([(frac["token", sd, "post"] - frac["token", sd, "pre"]) - (frac["none", sd, "post"] - frac["none", sd, "pre"])
            for sd in (0, 1)], gd)
    assert s["missing"] == []
    assert stats.find(s["paired_diff"], arm="none") is None  # the baseline is not compared with itself


def test_summarize_partial_study_uses_common_seeds():
    partial = {key: c for key, c in CORRECT.items() if key[:2] != ("token", 1)}
    del partial["none", 0, "post"]
    s = stats.summarize(_study(partial), n_boot=50)
    assert s["missing"] == [{"arm": "none", "seed": 0, "missing": ["post/s"]},
                            {"arm": "token", "seed": 1, "missing": ["run"]}]
    assert stats.find(s["paired_diff"], arm="token", phase="pre")["seeds"] == [0]
    assert stats.find(s["paired_diff"], arm="token", phase="post") is None  # no seed has both post runs
    single = stats.find(s["pass_at_k"], arm="token", phase="pre")
    assert single["n"] == 1 and math.isnan(single["lo"])


def test_bad_results_are_refused_naming_the_key():
    bad = _study(CORRECT)
    bad["runs"][0]["arm"] = "blocks"
    with pytest.raises(ValueError, match=r"results\['runs'\]\[0\]: arm 'blocks' is not one of"):
        stats.summarize(bad)
    with pytest.raises(ValueError, match=r"results\['baseline'\]"):
        stats.summarize({**_study(CORRECT), "baseline": "sequence"})
    with pytest.raises(ValueError, match=r"results\['runs'\]\[0\]: seed 5 is not one of results\['seeds'\]"):
        stats.summarize({**_study(CORRECT), "runs": [{**bad["runs"][0], "arm": "none", "seed": 5}]})
    with pytest.raises(ValueError, match=r"results\['ks'\] must hold positive integers, got \[0\]"):
        stats.summarize({**_study(CORRECT), "ks": [1, 0]})
    with pytest.raises(ValueError, match=r"k=3 needs 1 <= k <= n=2"):
        stats.summarize(_study(CORRECT, ks=(1, 3)))
    uneven = dict(CORRECT)
    uneven["token", 0, "post"] = [2, 2]
    with pytest.raises(ValueError, match="same prompts in the same order"):
        stats.summarize(_study(uneven))
