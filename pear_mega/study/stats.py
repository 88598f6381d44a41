"""Statistics of a study: pass@k per arm with intervals over seeds and over prompts, paired differences.

Notation. An arm ``a`` (an SFT objective followed by identical GRPO) is run once per seed ``s``; each
run is evaluated before (``pre``) and after (``post``) RL on suites of held-out prompts ``i = 1..P``,
the same prompts in the same order in every arm. A prompt's ``n`` samples of which ``c`` are correct
give the unbiased per-prompt estimate ``x_{a,s,i} = pass@k(n, c, k)`` (``pear_mega.evaluation.pass_at_k``)
and the run's score ``X_{a,s} = (1/P) Σ_i x_{a,s,i}``.

- **Seed interval** (what a new seed would give): mean ``X̄ = (1/S) Σ_s X_s`` and the t-interval
  ``X̄ ± t_{1−α/2, S−1} · sd(X) / √S`` (sd with the ``S − 1`` denominator). Undefined for ``S < 2``.
- **Prompt bootstrap** (what other prompts would give, the samples held): replicate ``b`` draws, for
  each seed independently, ``P`` prompt indices with replacement and takes
  ``X*_b = (1/S) Σ_s (1/P) Σ_j x_{s, idx_{b,s,j}}``; the interval is the ``(α/2, 1 − α/2)`` percentiles
  of ``X*`` (numpy's linear interpolation). Draw order, so the numbers are reproducible: one
  ``numpy.random.default_rng(seed)`` per interval, and for each seed in order one
  ``integers(0, P, size=(n_boot, P))`` matrix.
- **Paired difference** against the baseline arm, over the seeds both arms have:
  ``d_{s,i} = x_{a,s,i} − x_{base,s,i}``; seed interval on ``D_s = (1/P) Σ_i d_{s,i}`` and the prompt
  bootstrap of ``d`` (the same indices for both arms, which is what pairing by prompt means).
- **RL gain**: ``g_{a,s,i} = x^{post}_{a,s,i} − x^{pre}_{a,s,i}``, same intervals; and its paired
  difference ``g_{a,s,i} − g_{base,s,i}``.

All intervals are two-sided at ``level`` (0.95), unadjusted for the number of comparisons.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from pear_mega.evaluation import pass_at_k

PHASES = ("pre", "post")
LEVEL = 0.95
N_BOOT = 2000
BOOT_SEED = 0


# ----------------------------------------------------------------------------- Student t quantile
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes §6.4)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta ``I_x(a, b) = B(x; a, b) / B(a, b)`` for ``a, b > 0``, ``0 <= x <= 1``.

    ``I_x(a,b) = x^a (1−x)^b / (a B(a,b)) · CF(a,b,x)`` where the continued fraction converges for
    ``x < (a+1)/(a+b+2)``; otherwise the symmetry ``I_x(a,b) = 1 − I_{1−x}(b,a)`` is used.
    """
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """CDF of Student's t with ``df`` degrees of freedom: for ``t > 0``,
    ``F(t) = 1 − ½ I_{df/(df+t²)}(df/2, ½)``, and ``F(−t) = 1 − F(t)``."""
    if df <= 0:
        raise ValueError(f"t_cdf: df must be > 0, got {df}")
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Inverse of :func:`t_cdf`: the ``t`` with ``F(t) = p`` (bisection to 1e-12; e.g. ``t_{0.975,2} = 4.3027``)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if p == 0.5:
        return 0.0
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    while hi - lo > 1e-12 * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


# ----------------------------------------------------------------------------- intervals
def seed_interval(values: Sequence[float], level: float = LEVEL) -> dict:
    """Mean and t-interval over seeds: ``X̄ ± t_{(1+level)/2, S−1} · sd / √S``, ``sd² = Σ(X−X̄)²/(S−1)``.

    Returns ``{"mean", "lo", "hi", "n"}``; ``lo``/``hi`` are NaN for fewer than two values (no spread
    to estimate), ``mean`` is NaN for none.
    """
    x = np.asarray(values, dtype=np.float64)
    s = len(x)
    if s == 0:
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
    mean = float(x.mean())
    if s < 2:
        return {"mean": mean, "lo": math.nan, "hi": math.nan, "n": 1}
    half = t_quantile((1.0 + level) / 2.0, s - 1) * float(x.std(ddof=1)) / math.sqrt(s)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": s}


def prompt_bootstrap(
    per_seed: Sequence[np.ndarray], n_boot: int = N_BOOT, seed: int = BOOT_SEED, level: float = LEVEL
) -> tuple[float, float]:
    """Percentile interval of the prompt bootstrap of ``(1/S) Σ_s mean_i v_{s,i}`` (module docstring).

    Args:
        per_seed: one array ``[P_s]`` of per-prompt values per seed (differences for a paired interval).
    Returns ``(lo, hi)``; NaN when there is nothing to resample.
    """
    arrays = [np.asarray(v, dtype=np.float64) for v in per_seed]
    if not arrays or any(a.size == 0 for a in arrays):
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    replicates = np.zeros(n_boot, dtype=np.float64)
    for v in arrays:
        idx = rng.integers(0, v.size, size=(n_boot, v.size))
        replicates += v[idx].mean(axis=1)
    replicates /= len(arrays)
    alpha = 1.0 - level
    lo, hi = np.percentile(replicates, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def interval(per_seed: Mapping[int, np.ndarray], level: float = LEVEL, n_boot: int = N_BOOT,
             boot_seed: int = BOOT_SEED) -> dict:
    """Both intervals for per-prompt values keyed by seed: the seed t-interval of the per-seed means
    and the prompt bootstrap. Returns ``{"seeds", "per_seed", "mean", "lo", "hi", "n", "boot_lo", "boot_hi"}``."""
    seeds = sorted(per_seed)
    means = [float(np.mean(per_seed[s])) for s in seeds]
    out = {"seeds": seeds, "per_seed": means, **seed_interval(means, level)}
    out["boot_lo"], out["boot_hi"] = prompt_bootstrap([per_seed[s] for s in seeds], n_boot, boot_seed, level)
    return out


# ----------------------------------------------------------------------------- results → per-prompt values
def prompt_pass_at_k(entry: Mapping, k: int, where: str = "") -> np.ndarray:
    """Per-prompt pass@k ``[P]`` of one evaluation entry ``{"n": int, "correct": [int per prompt]}``."""
    n, correct = entry.get("n"), entry.get("correct")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{where}: 'n' must be a positive integer, got {n!r}")
    if not isinstance(correct, list) or not correct:
        raise ValueError(f"{where}: 'correct' must be a non-empty list of counts")
    if not 1 <= k <= n:
        raise ValueError(f"{where}: k={k} needs 1 <= k <= n={n} (study.ks and the evaluation's n disagree)")
    for i, c in enumerate(correct):
        if not isinstance(c, int) or isinstance(c, bool) or not 0 <= c <= n:
            raise ValueError(f"{where}: correct[{i}] = {c!r} is not an integer count in [0, {n}]")
    return np.array([pass_at_k(n, c, k) for c in correct], dtype=np.float64)


def _run_key(run: Mapping) -> tuple[str, int]:
    """``(arm, seed)`` of a run."""
    return run["arm"], run["seed"]


def check_results(results: Mapping) -> None:
    """Refuse a malformed ``results`` dict with a message naming the key (before any computation)."""
    for key, kind in (("study", dict), ("arms", list), ("baseline", str), ("seeds", list), ("ks", list),
                      ("suites", list), ("runs", list)):
        if not isinstance(results.get(key), kind):
            raise ValueError(f"results[{key!r}] must be a {kind.__name__}, got {type(results.get(key)).__name__}")
    for key in ("seeds", "ks"):
        bad = [v for v in results[key] if not isinstance(v, int) or isinstance(v, bool) or (key == "ks" and v < 1)]
        if bad:
            raise ValueError(f"results[{key!r}] must hold {'positive ' if key == 'ks' else ''}integers, got {bad}")
    if results["baseline"] not in results["arms"]:
        raise ValueError(f"results['baseline'] = {results['baseline']!r} is not one of results['arms'] {results['arms']}")
    seen = set()
    for j, run in enumerate(results["runs"]):
        where = f"results['runs'][{j}]"
        if not isinstance(run, dict) or "arm" not in run or "seed" not in run:
            raise ValueError(f"{where}: needs 'arm' and 'seed'")
        if run["arm"] not in results["arms"]:
            raise ValueError(f"{where}: arm {run['arm']!r} is not one of results['arms'] {results['arms']}")
        if run["seed"] not in results["seeds"]:
            raise ValueError(f"{where}: seed {run['seed']!r} is not one of results['seeds'] {results['seeds']}")
        if _run_key(run) in seen:
            raise ValueError(f"{where}: arm {run['arm']!r} seed {run['seed']} appears twice")
        seen.add(_run_key(run))
        for phase, suites in (run.get("eval") or {}).items():
            if phase not in PHASES:
                raise ValueError(f"{where}['eval']: phase {phase!r} is not one of {PHASES}")
            for suite in suites:
                if suite not in results["suites"]:
                    raise ValueError(f"{where}['eval'][{phase!r}]: suite {suite!r} is not in results['suites']")


def missing_runs(results: Mapping) -> list[dict]:
    """Expected ``(arm, seed)`` runs that are absent, or present without an evaluation phase/suite.

    Returns ``[{"arm", "seed", "missing": [what]}]`` where ``what`` is ``"run"`` or ``"phase/suite"``.
    """
    runs = {_run_key(r): r for r in results["runs"]}
    out = []
    for arm in results["arms"]:
        for seed in results["seeds"]:
            run = runs.get((arm, seed))
            if run is None:
                out.append({"arm": arm, "seed": seed, "missing": ["run"]})
                continue
            ev = run.get("eval") or {}
            lost = [f"{p}/{s}" for p in PHASES for s in results["suites"] if s not in (ev.get(p) or {})]
            if lost:
                out.append({"arm": arm, "seed": seed, "missing": lost})
    return out


def per_prompt_values(results: Mapping, arm: str, phase: str, suite: str, k: int) -> dict[int, np.ndarray]:
    """``{seed: x_{arm,seed,·}}`` per-prompt pass@k ``[P]`` for the runs that have this evaluation."""
    out = {}
    for j, run in enumerate(results["runs"]):
        if run["arm"] != arm:
            continue
        entry = ((run.get("eval") or {}).get(phase) or {}).get(suite)
        if entry is not None:
            out[run["seed"]] = prompt_pass_at_k(entry, k, f"results['runs'][{j}]['eval'][{phase!r}][{suite!r}]")
    return out


def paired(a: Mapping[int, np.ndarray], b: Mapping[int, np.ndarray], what: str) -> dict[int, np.ndarray]:
    """Per-prompt differences ``a − b`` over the seeds both have; prompts must match in number."""
    out = {}
    for seed in sorted(set(a) & set(b)):
        if a[seed].shape != b[seed].shape:
            raise ValueError(f"{what}, seed {seed}: {a[seed].size} vs {b[seed].size} prompts; "
                             "paired differences need the same prompts in the same order")
        out[seed] = a[seed] - b[seed]
    return out


# ----------------------------------------------------------------------------- the summary
def summarize(results: Mapping, level: float = LEVEL, n_boot: int = N_BOOT, boot_seed: int = BOOT_SEED) -> dict:
    """All pass@k statistics of a study (module docstring), as lists of flat records.

    Returns ``{"level", "n_boot", "boot_seed", "missing", "pass_at_k", "paired_diff", "rl_gain",
    "rl_gain_diff"}``; each list item carries its keys (``arm``, ``phase``, ``suite``, ``k``, and
    ``baseline`` for differences) plus the fields of :func:`interval`. Records with no seed are left out.
    """
    check_results(results)
    base = results["baseline"]
    kw = dict(level=level, n_boot=n_boot, boot_seed=boot_seed)
    out = {"level": level, "n_boot": n_boot, "boot_seed": boot_seed, "missing": missing_runs(results),
           "pass_at_k": [], "paired_diff": [], "rl_gain": [], "rl_gain_diff": []}
    for suite in results["suites"]:
        for k in results["ks"]:
            vals = {(arm, ph): per_prompt_values(results, arm, ph, suite, k) for arm in results["arms"] for ph in PHASES}
            gains = {arm: paired(vals[arm, "post"], vals[arm, "pre"], f"arm {arm!r} post − pre on {suite!r}")
                     for arm in results["arms"]}
            for arm in results["arms"]:
                key = {"arm": arm, "suite": suite, "k": k}
                for ph in PHASES:
                    if vals[arm, ph]:
                        out["pass_at_k"].append({**key, "phase": ph, **interval(vals[arm, ph], **kw)})
                if gains[arm]:
                    out["rl_gain"].append({**key, **interval(gains[arm], **kw)})
                if arm == base:
                    continue
                for ph in PHASES:
                    d = paired(vals[arm, ph], vals[base, ph], f"{arm!r} − {base!r} ({ph}) on {suite!r}")
                    if d:
                        out["paired_diff"].append({**key, "baseline": base, "phase": ph, **interval(d, **kw)})
                dg = paired(gains[arm], gains[base], f"RL gain {arm!r} − {base!r} on {suite!r}")
                if dg:
                    out["rl_gain_diff"].append({**key, "baseline": base, **interval(dg, **kw)})
    return out


def find(records: Sequence[Mapping], **keys) -> dict | None:
    """The record of ``records`` whose fields equal ``keys`` (None when there is none)."""
    for r in records:
        if all(r.get(k) == v for k, v in keys.items()):
            return dict(r)
    return None
