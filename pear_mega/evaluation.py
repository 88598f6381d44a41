"""pass@k evaluation: n samples per prompt through the rollout engine, scored by verifiable rewards.

The unbiased pass@k estimator (Chen et al. 2021, "Evaluating Large Language Models Trained on
Code", Eq. 1): with n samples of a prompt of which c are correct,

    pass@k = 1 − C(n−c, k) / C(n, k) = 1 − Π_{i=n−c+1}^{n} (1 − k/i)

(the product form avoids the huge binomials), averaged over prompts. A sample is correct when its
reward is at least ``correct_threshold`` (1.0: reasoning-gym's partial credit does not count).

Suites: held-out reasoning-gym tasks (a seed the training data does not use) and local math files
in AIME format, one JSON object per line: ``{"problem": str, "answer": str | int}``. Their prompts,
few-shot demonstrations and scorer are those of the task registry (``pear_mega.tasks``), the
ones RL trains on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pear_mega.tasks import load_math_file, math_prompt, reasoning_gym_rows, verified_rewards

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one prompt: n samples, c correct (see module docstring)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def mean_pass_at_k(correct_counts: Sequence[int], n: int, k: int) -> float:
    """pass@k averaged over prompts, given each prompt's number of correct samples out of n."""
    if not correct_counts:
        raise ValueError("mean_pass_at_k: no prompts")
    return float(np.mean([pass_at_k(n, c, k) for c in correct_counts]))


@dataclass
class EvalSuite:
    """Prompts (chat messages) and, per prompt, the reward sample description
    (``pear_mega.rewards.compute_rewards`` schema)."""

    name: str
    prompts: list[list[dict]]
    targets: list[dict]

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.targets) or not self.prompts:
            raise ValueError(f"suite {self.name!r}: {len(self.prompts)} prompts and {len(self.targets)} targets")


def reasoning_gym_suite(task: str, size: int, seed: int, num_shots: int = 2, config: Mapping | None = None) -> EvalSuite:
    """``size`` prompts of a reasoning-gym task (``pear_mega.tasks.reasoning_gym_rows``)."""
    rows = reasoning_gym_rows(task, size, seed, num_shots, dict(config or {}))
    return EvalSuite(task, [r["prompt"] for r in rows], [r["target"] for r in rows])


def math_suite(path: str | Path, num_shots: int = 2) -> EvalSuite:
    """The problems of an AIME-format file (``pear_mega.tasks.load_math_file``), few-shot prompted,
    scored by math-verify against their answers."""
    rows = load_math_file(path)
    return EvalSuite(
        Path(path).stem,
        [math_prompt(r["problem"], num_shots) for r in rows],
        [{"source": "math", "answer": r["answer"]} for r in rows],
    )


@dataclass
class SuiteResult:
    name: str
    prompts: int
    n: int
    pass_at: dict[int, float]
    reward_mean: float
    extract_fail_frac: float
    correct_counts: list[int] = field(repr=False)
    examples: list[dict] = field(repr=False, default_factory=list)


def evaluate_suites(
    engine,
    suites: Sequence[EvalSuite],
    n: int = 8,
    ks: Sequence[int] = (1, 8),
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_tokens: int = 64,
    correct_threshold: float = 1.0,
    num_examples: int = 3,
) -> list[SuiteResult]:
    """Sample ``n`` responses per prompt with ``engine`` (a ``pear_mega.engine.RolloutEngine``) and
    compute pass@k."""
    if any(k < 1 or k > n for k in ks):
        raise ValueError(f"every k must be in [1, n={n}], got {list(ks)}")
    scorer_state: dict = {}
    results = []
    for suite in suites:
        samples = engine.generate(suite.prompts, n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens)
        targets = [suite.targets[s.prompt_index] for s in samples]
        rewards, metrics, outs = verified_rewards([s.text for s in samples], targets, scorer_state)
        correct = (rewards >= correct_threshold).view(len(suite.prompts), n).sum(dim=1).tolist()
        examples = [
            {"prompt": suite.prompts[s.prompt_index][-1]["content"], "response": s.text,
             "extracted": o.answer, "reward": o.reward}
            for s, o in list(zip(samples, outs))[:num_examples]
        ]
        results.append(SuiteResult(
            suite.name, len(suite.prompts), n, {k: mean_pass_at_k(correct, n, k) for k in ks},
            float(metrics["reward/mean"]), float(metrics["reward/extract_fail_frac"]), correct, examples,
        ))
    return results


def results_table(results: Sequence[SuiteResult]) -> str:
    """A markdown table: suite, prompts, n, pass@k..., mean reward, extraction failures."""
    ks = sorted({k for r in results for k in r.pass_at})
    head = ["suite", "prompts", "n", *[f"pass@{k}" for k in ks], "reward mean", "extract fail"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r.name, str(r.prompts), str(r.n), *[f"{r.pass_at[k]:.3f}" if k in r.pass_at else "-" for k in ks],
                 f"{r.reward_mean:.3f}", f"{r.extract_fail_frac:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(results: Sequence[SuiteResult], out_dir: str | Path, meta: Mapping | None = None) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and ``pass_at_k.png`` (grouped bars) into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "meta": dict(meta or {}),
        "suites": [
            {"name": r.name, "prompts": r.prompts, "n": r.n,
             "pass_at_k": {str(k): v for k, v in r.pass_at.items()},
             "reward_mean": r.reward_mean, "extract_fail_frac": r.extract_fail_frac,
             "correct_counts": r.correct_counts, "examples": r.examples}
            for r in results
        ],
    }
    paths = {"json": out / "results.json", "markdown": out / "results.md", "plot": out / "pass_at_k.png"}
    paths["json"].write_text(json.dumps(payload, indent=2))
    paths["markdown"].write_text(results_table(results) + "\n")

    ks = sorted({k for r in results for k in r.pass_at})
    width = 0.8 / max(len(ks), 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(results) + 2), 3.5))
    x = np.arange(len(results))
    for j, k in enumerate(ks):
        vals = [r.pass_at.get(k, math.nan) for r in results]
        bars = ax.bar(x + (j - (len(ks) - 1) / 2) * width, vals, width, label=f"pass@{k}")
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(x, [r.name for r in results], rotation=15)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("pass@k")
    title = (meta or {}).get("model", "")
    ax.set_title(f"pass@k ({Path(str(title)).name})" if title else "pass@k")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["plot"], dpi=120)
    plt.close(fig)
    return paths
