"""The study report: ``results.json`` (the input and its summary), ``report.md`` and PNG plots.

``write_report(results, out_dir)`` takes the study's results dict (schema in ``pear_mega.study``:
study header, arms, baseline, seeds, ks, suites, probe, runs with per-prompt correct counts and
per-step histories) and computes every number it states (``pear_mega.study.stats`` for pass@k,
``pear_mega.study.diagnostics`` for weights, drift and alignment). A partial study (missing runs or
evaluations) renders with what is there and names what is not.

The "what the intervals support" section follows one rule: a difference is stated only where both
the 95 % interval over seeds and the prompt-bootstrap interval exclude 0; otherwise the report says
that no difference was detected and gives the interval and its width.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from pear_mega.study import diagnostics, stats

CURVES = (
    ("reward.png", "rl_history", ("rollout/reward_mean",), "RL reward (mean over the rollout batch)"),
    ("kl_to_init.png", "rl_history", ("drift/kl_to_init_k3",), "KL(πθ ‖ π_SFT) during RL (k3)"),
    ("sparsity.png", "rl_history", ("update/cum_sparsity", "update/step_sparsity"), "RL update sparsity"),
    ("pear_weights.png", "sft_history", diagnostics.SFT_WEIGHT_KEYS, "PEAR weights during SFT"),
)
"""(file, history, metric keys, title) of the curve plots: mean over seeds with the min/max band."""


# ----------------------------------------------------------------------------- formatting
def _f(x, digits: int = 3, sign: bool = False) -> str:
    """A number with ``digits`` decimals (``+`` for differences); ``n/a`` for None/NaN. A non-zero
    number that those decimals would show as 0 (a relative drift of 1e-5) gets ``digits``
    significant digits instead."""
    if x is None or not math.isfinite(x):
        return "n/a"
    plus = "+" if sign else ""
    if x != 0 and abs(x) < 0.5 * 10**-digits:
        return f"{x:{plus}.{digits - 1}e}"
    return f"{x:{plus}.{digits}f}"


def _iv(lo, hi, sign: bool = False) -> str:
    """``[lo, hi]`` or ``n/a`` when the interval is undefined (fewer than two seeds)."""
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return "n/a"
    return f"[{_f(lo, sign=sign)}, {_f(hi, sign=sign)}]"


def _mean_iv(r: Mapping | None, sign: bool = False) -> str:
    """``mean [lo, hi]`` of a seed interval record."""
    if r is None or r.get("n", 0) == 0:
        return "n/a"
    if r["n"] < 2:
        return f"{_f(r['mean'], sign=sign)} (1 seed)"
    return f"{_f(r['mean'], sign=sign)} {_iv(r['lo'], r['hi'], sign)}"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Markdown table lines."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def _json_safe(x):
    """NaN/inf → None (strict JSON), tuples → lists, Paths → str, recursively."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item") and callable(x.item):  # numpy / torch scalars
        return _json_safe(x.item())
    return x


# ----------------------------------------------------------------------------- the verdict rule
def excludes_zero(lo, hi) -> int:
    """+1 when the interval lies above 0, −1 below, 0 when it contains 0 or is undefined."""
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return 0
    return 1 if lo > 0 else -1 if hi < 0 else 0


def verdict(r: Mapping, what: str) -> str:
    """One sentence on a difference record (``stats.interval`` fields) that never claims more than its
    intervals: a direction only when the seed t-interval and the prompt bootstrap both exclude 0 on
    the same side."""
    seeds, boot = excludes_zero(r["lo"], r["hi"]), excludes_zero(r["boot_lo"], r["boot_hi"])
    d = _f(r["mean"], sign=True)
    if r["n"] < 2:
        return (f"{what}: {d} from a single seed; no interval over seeds, so no difference is claimed "
                f"(prompt bootstrap {_iv(r['boot_lo'], r['boot_hi'], True)}).")
    width = r["hi"] - r["lo"]
    seed_txt = f"95 % CI over {r['n']} seeds {_iv(r['lo'], r['hi'], True)}"
    boot_txt = f"prompt bootstrap {_iv(r['boot_lo'], r['boot_hi'], True)}"
    if seeds != 0 and seeds == boot:
        return f"{what}: **{'higher' if seeds > 0 else 'lower'}**, {d} ({seed_txt}, {boot_txt})."
    if seeds != 0 or boot != 0:
        return (f"{what}: no difference established, {d}: only one of the two intervals excludes 0 "
                f"({seed_txt}, {boot_txt}).")
    return f"{what}: no difference detected, {d} ({seed_txt}, width {_f(width)}; {boot_txt})."


# ----------------------------------------------------------------------------- markdown
def _header(results: Mapping, summary: Mapping) -> list[str]:
    """Title, command, commit, machine, configuration, design and the missing runs."""
    st = results["study"]
    lines = [f"# Study: {st.get('name', '?')}", "",
             f"Recipe `{st.get('recipe', '?')}` · commit `{st.get('commit', '?')}` · machine: {st.get('machine', '?')} "
             f"· config hash `{st.get('config_hash', '?')}`", "", "```", str(st.get("command", "?")), "```", "",
             f"Arms: {', '.join(results['arms'])} (baseline `{results['baseline']}`) · seeds: "
             f"{', '.join(map(str, results['seeds']))} · k: {', '.join(map(str, results['ks']))} · suites: "
             f"{', '.join(results['suites'])}.", ""]
    if st.get("config"):
        lines += ["<details><summary>Resolved configuration</summary>", "", "```json",
                  json.dumps(_json_safe(st["config"]), indent=1, sort_keys=True), "```", "", "</details>", ""]
    missing = summary["missing"]
    if missing:
        lines.append(f"**Partial study**: {len(missing)} of {len(results['arms']) * len(results['seeds'])} runs "
                     "are missing or incomplete; the statistics below use the seeds present:")
        lines += [f"- arm `{m['arm']}` seed {m['seed']}: missing {', '.join(m['missing'])}" for m in missing]
    else:
        lines.append(f"All {len(results['arms']) * len(results['seeds'])} runs (arms × seeds) are complete.")
    lines += ["", "Intervals: mean over seeds with the 95 % Student-t interval over seeds, and a 95 % percentile "
              f"interval of a prompt-level bootstrap ({summary['stats']['n_boot']} replicates, prompts resampled "
              "within each seed); differences are paired by seed and prompt.", ""]
    return lines


def _flat(d: Mapping, prefix: str = "") -> list[tuple[str, object]]:
    """Nested mapping → ``[(dotted key, value)]``."""
    out = []
    for k, v in d.items():
        if isinstance(v, Mapping):
            out += _flat(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def _cell(v, width: int = 80) -> str:
    """A table cell: floats to 4 significant digits, None as n/a, long text cut, pipes escaped."""
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else "n/a"
    text = "n/a" if v is None else str(v)
    text = text if len(text) <= width else text[: width - 1] + "…"
    return text.replace("|", "\\|").replace("\n", " ")


def _probe(probe: Mapping | None) -> list[str]:
    """The probe's numbers as recorded (whatever keys the study wrote)."""
    lines = ["## Probe", ""]
    if not probe:
        return [*lines, "No probe was recorded.", ""]
    return [*lines, *_table(("quantity", "value"), [(k, _cell(v)) for k, v in _flat(probe)]), ""]


def _pass_at_k(results: Mapping, s: Mapping) -> list[str]:
    """One table per suite: arm × pass@k × phase with both intervals."""
    lines = ["## pass@k per arm", ""]
    for suite in results["suites"]:
        rows = []
        for arm in results["arms"]:
            for k in results["ks"]:
                for ph in stats.PHASES:
                    r = stats.find(s["pass_at_k"], arm=arm, suite=suite, k=k, phase=ph)
                    if r is not None:
                        rows.append((arm, f"pass@{k}", ph, str(r["n"]), _f(r["mean"]), _iv(r["lo"], r["hi"]),
                                     _iv(r["boot_lo"], r["boot_hi"])))
        lines += [f"### {suite}", ""]
        lines += _table(("arm", "metric", "phase", "seeds", "mean", "95 % CI (seeds)", "95 % CI (prompt bootstrap)"),
                        rows) if rows else ["No evaluation of this suite."]
        lines.append("")
    return lines


def _differences(results: Mapping, s: Mapping) -> list[str]:
    """Paired differences against the baseline, RL gains and their differences."""
    base = results["baseline"]
    lines = [f"## Paired differences against `{base}`", "",
             "arm − baseline, paired by seed and prompt (pre = after SFT, post = after the identical GRPO).", ""]
    rows = [(f"{r['arm']} − {base}", r["phase"], r["suite"], f"pass@{r['k']}", str(r["n"]), _f(r["mean"], sign=True),
             _iv(r["lo"], r["hi"], True), _iv(r["boot_lo"], r["boot_hi"], True)) for r in s["paired_diff"]]
    head = ("difference", "phase", "suite", "metric", "seeds", "mean", "95 % CI (seeds)", "95 % CI (prompt bootstrap)")
    lines += (_table(head, rows) if rows else ["No pair of runs to compare."]) + [""]
    lines += ["## RL gain (post − pre)", ""]
    rows = [(r["arm"], r["suite"], f"pass@{r['k']}", str(r["n"]), _f(r["mean"], sign=True), _iv(r["lo"], r["hi"], True),
             _iv(r["boot_lo"], r["boot_hi"], True)) for r in s["rl_gain"]]
    head = ("arm", "suite", "metric", "seeds", "mean gain", "95 % CI (seeds)", "95 % CI (prompt bootstrap)")
    lines += (_table(head, rows) if rows else ["No run has both evaluations."]) + [""]
    rows = [(f"{r['arm']} − {base}", r["suite"], f"pass@{r['k']}", str(r["n"]), _f(r["mean"], sign=True),
             _iv(r["lo"], r["hi"], True), _iv(r["boot_lo"], r["boot_hi"], True)) for r in s["rl_gain_diff"]]
    if rows:
        lines += ["Difference of RL gains against the baseline:", "",
                  *_table(("difference", "suite", "metric", "seeds", "mean", "95 % CI (seeds)",
                           "95 % CI (prompt bootstrap)"), rows), ""]
    return lines


def _diagnostics(results: Mapping, d: Mapping) -> list[str]:
    """PEAR weight statistics during SFT; drift, sparsity and alignment of RL."""
    lines = ["## PEAR weights during SFT", "",
             "Per run the mean over SFT steps; then mean [95 % CI] over seeds. ESS fraction = (Σ G)² / (n Σ G²) "
             "over a step's n loss tokens (1 = uniform weights); clip fractions = share of loss tokens whose "
             "log-weight sits at the lower / upper bound.", ""]
    names = {"pear/weight_mean": "weight mean", "pear/ess": "ESS fraction", "pear/clip_low_frac": "at lower clip",
             "pear/clip_high_frac": "at upper clip"}
    rows = [(arm, *(_mean_iv(d[arm]["sft"][k]) for k in diagnostics.SFT_WEIGHT_KEYS)) for arm in results["arms"]]
    lines += [*_table(("arm", *(names[k] for k in diagnostics.SFT_WEIGHT_KEYS)), rows), ""]
    kd_arms = [arm for arm in results["arms"] if any(d[arm]["sft"][k]["n"] for k in diagnostics.SFT_KD_KEYS)]
    if kd_arms:
        names = {"kd/kl": "KL per token", "kd/teacher_mass": "πβ top-K mass P", "kd/student_mass": "πθ mass Q on it",
                 "kd/topk_overlap": "top-K overlap"}
        rows = [(arm, *(_mean_iv(d[arm]["sft"][k]) for k in diagnostics.SFT_KD_KEYS)) for arm in kd_arms]
        lines += ["Distillation arms (loss.kind=kd): per run the mean over SFT steps of the KL to πβ's stored "
                  "top-K, its mass P, πθ's mass Q on the same ids and the share of πβ's top-K among πθ's; "
                  "then mean [95 % CI] over seeds.", "",
                  *_table(("arm", *(names[k] for k in diagnostics.SFT_KD_KEYS)), rows), ""]
    lines += ["## Drift, sparsity and alignment during RL", "",
              "At the last logged RL step: reward, KL to the SFT checkpoint (k3), cumulative update sparsity "
              "(share of parameters unchanged since the RL start), ‖θ − θ_SFT‖ / ‖θ_SFT‖; alignment = "
              "cos(θ_SFT − θ_0, θ_RL − θ_SFT). Mean [95 % CI] over seeds.", ""]
    rows = [(arm, *(_mean_iv(d[arm]["rl"][k]) for k in diagnostics.RL_LAST_KEYS),
             _mean_iv(d[arm]["alignment"]["overall"], sign=True)) for arm in results["arms"]]
    lines += [*_table(("arm", "reward", "KL to init", "cum. sparsity", "rel. drift", "alignment"), rows), ""]
    kinds = [k for k in diagnostics.KINDS if any(k in d[a]["alignment"]["per_kind"] for a in results["arms"])]
    if kinds:
        rows = [(arm, *(_mean_iv(d[arm]["alignment"]["per_kind"].get(k), sign=True) for k in kinds))
                for arm in results["arms"]]
        lines += ["Alignment per parameter kind:", "", *_table(("arm", *kinds), rows), ""]
    return lines


def _support(results: Mapping, s: Mapping) -> list[str]:
    """The after-RL comparisons put through :func:`verdict`, one line each."""
    base = results["baseline"]
    post = [r for r in s["paired_diff"] if r["phase"] == "post"]
    lines = ["## What the intervals support", "",
             "A difference is stated only where both the 95 % interval over seeds and the prompt-bootstrap "
             "interval exclude 0 (each comparison on its own, not adjusted for the number of comparisons); "
             "otherwise no difference was detected at this number of seeds and prompts.", ""]
    bullets = [verdict(r, f"`{r['arm']}` vs `{base}`, pass@{r['k']} on {r['suite']} after RL") for r in post]
    bullets += [verdict(r, f"RL gain of `{r['arm']}` vs `{base}`, pass@{r['k']} on {r['suite']}")
                for r in s["rl_gain_diff"]]
    if bullets:
        claimed = sum("**higher**" in b or "**lower**" in b for b in bullets)
        lines += [f"Comparisons with a difference by this rule: {claimed} of {len(bullets)}.", ""]
    lines += [f"- {b}" for b in bullets]
    if not post and not s["rl_gain_diff"]:
        lines.append("- No post-RL comparison is available: nothing is claimed.")
    if s["missing"]:
        lines.append(f"- {len(s['missing'])} runs are missing or incomplete (listed at the top); the intervals use "
                     "the seeds present.")
    return [*lines, ""]


def render_markdown(results: Mapping, summary: Mapping, plots: Sequence[str]) -> str:
    """The report text (``summary`` from :func:`summarize`; ``plots`` = PNG file names to link)."""
    lines = _header(results, summary) + _probe(results.get("probe"))
    lines += _pass_at_k(results, summary["stats"]) + _differences(results, summary["stats"])
    lines += _diagnostics(results, summary["diagnostics"]) + _support(results, summary["stats"])
    if plots:
        lines += ["## Plots", "", *(f"![{Path(p).stem}]({p})" for p in plots), ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots
def _figure(nrows: int, ncols: int, w: float = 4.2, h: float = 3.2):
    """A pyplot-free figure (no global backend state): the Agg canvas renders it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w * ncols, h * nrows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _err(r: Mapping | None) -> tuple[float, float, float]:
    """(mean, below, above) for an error bar; zero-length where the interval is undefined."""
    if r is None:
        return math.nan, 0.0, 0.0
    lo, hi = r["lo"], r["hi"]
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return r["mean"], 0.0, 0.0
    return r["mean"], r["mean"] - lo, hi - r["mean"]


def plot_pass_at_k(results: Mapping, s: Mapping, path: Path) -> bool:
    """Bars of pass@k per arm, pre and post RL, with the 95 % seed interval; one panel per suite × k.
    False when no run has an evaluation."""
    import numpy as np

    if not s["pass_at_k"]:
        return False

    arms, ks, suites = results["arms"], results["ks"], results["suites"]
    fig, axes = _figure(len(suites), len(ks), w=max(3.5, 1.1 * len(arms) + 1.5))
    x = np.arange(len(arms))
    for i, suite in enumerate(suites):
        for j, k in enumerate(ks):
            ax = axes[i][j]
            for off, ph in ((-0.2, "pre"), (0.2, "post")):
                e = [_err(stats.find(s["pass_at_k"], arm=a, suite=suite, k=k, phase=ph)) for a in arms]
                ax.bar(x + off, [v[0] for v in e], 0.4, yerr=[[v[1] for v in e], [v[2] for v in e]], capsize=3,
                       label=f"{ph} RL")
            ax.set_xticks(x, arms)
            ax.set_ylim(0, 1.3)  # room above 1 for the legend and for t-intervals, which are not clipped
            ax.axhline(1.0, color="grey", linewidth=0.5)
            ax.set_title(f"{suite}: pass@{k}", fontsize=9)
            ax.legend(fontsize=7, loc="upper left", ncols=2)
    fig.suptitle("pass@k, mean over seeds (error bars: 95 % t-interval over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def plot_curves(results: Mapping, history: str, keys: Sequence[str], title: str, path: Path) -> bool:
    """Mean over seeds and min/max band per arm of each metric in ``keys``; False when nothing was logged."""
    bands = {(arm, key): diagnostics.curve_band([r.get(history) or [] for r in results["runs"] if r["arm"] == arm], key)
             for arm in results["arms"] for key in keys}
    keys = [k for k in keys if any(bands[a, k]["step"] for a in results["arms"])]
    if not keys:
        return False
    fig, axes = _figure(1, len(keys))
    for ax, key in zip(axes[0], keys):
        for arm in results["arms"]:
            b = bands[arm, key]
            if b["step"]:
                (line,) = ax.plot(b["step"], b["mean"], label=arm)
                ax.fill_between(b["step"], b["lo"], b["hi"], color=line.get_color(), alpha=0.2)
        ax.set_xlabel("step")
        ax.set_title(key, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title} (mean, min-max over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def plot_alignment(results: Mapping, d: Mapping, path: Path) -> bool:
    """Bars of the update alignment per arm, overall and per kind, with the 95 % seed interval."""
    import numpy as np

    kinds = [k for k in diagnostics.KINDS if any(k in d[a]["alignment"]["per_kind"] for a in results["arms"])]
    groups = ["overall", *kinds]
    arms = [a for a in results["arms"] if d[a]["alignment"]["overall"]["n"] > 0]
    if not arms:
        return False
    fig, axes = _figure(1, 1, w=max(5.0, 1.2 * len(groups) + 2))
    ax, x, width = axes[0][0], np.arange(len(groups)), 0.8 / len(arms)
    for j, arm in enumerate(arms):
        al = d[arm]["alignment"]
        e = [_err(al["overall"] if g == "overall" else al["per_kind"].get(g)) for g in groups]
        ax.bar(x + (j - (len(arms) - 1) / 2) * width, [v[0] for v in e], width,
               yerr=[[v[1] for v in e], [v[2] for v in e]], capsize=3, label=arm)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(x, groups)
    ax.set_ylabel("cos(θ_SFT − θ_0, θ_RL − θ_SFT)")
    ax.set_title("Alignment of the RL update with the SFT update", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


# ----------------------------------------------------------------------------- entry point
def summarize(results: Mapping) -> dict:
    """``{"stats": stats.summarize(results), "diagnostics": diagnostics.summarize_diagnostics(results)}``."""
    s = stats.summarize(results)
    return {"stats": s, "missing": s["missing"], "diagnostics": diagnostics.summarize_diagnostics(results, s["level"])}


def write_report(results: dict, out_dir: Path) -> dict[str, Path]:
    """Write ``results.json`` (the input plus ``"summary"``), ``report.md`` and the PNGs into ``out_dir``.

    Returns ``{file name: path}`` of what was written (a curve plot is left out when its metric was
    never logged). A malformed ``results`` is refused before anything is written.
    """
    summary = summarize(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    if plot_pass_at_k(results, summary["stats"], out / "pass_at_k.png"):
        paths["pass_at_k.png"] = out / "pass_at_k.png"
    for name, history, keys, title in CURVES:
        if plot_curves(results, history, keys, title, out / name):
            paths[name] = out / name
    if plot_alignment(results, summary["diagnostics"], out / "alignment.png"):
        paths["alignment.png"] = out / "alignment.png"
    paths["results.json"] = out / "results.json"
    paths["results.json"].write_text(json.dumps(_json_safe({**results, "summary": summary}), indent=1) + "\n")
    paths["report.md"] = out / "report.md"
    paths["report.md"].write_text(render_markdown(results, summary, [p.name for p in paths.values()
                                                                     if p.suffix == ".png"]))
    return paths
