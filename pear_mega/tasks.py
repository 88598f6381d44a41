"""Task sources: where prompts come from and how responses are rewarded, in one registry keyed by
``task.source``, below both RL (``pear_mega.rl.experience.PromptSource``) and evaluation.

A ``TaskSource`` gives, for a task config (``pear_mega.rl.config.TaskConfig``):

* ``prompts(task, vocab_size) -> rows`` — ``{"prompt": chat messages | token ids, "target": reward
  sample (``pear_mega.rewards.compute_rewards`` schema), "answer": gold answer str}``;
* ``probe_response(row, tokenizer, eot, rng, vocab_size) -> token ids`` — the fixed response of a
  refit-verification probe;
* ``score(texts, token_ids, rows, vocab_size, state) -> (rewards [N], metrics)`` — verifier rewards
  (``state``: a dict the source may keep a scorer in);
* ``demos`` — the few-shot format demonstrations plain prompts get.

    reasoning_gym  procedural reasoning-gym tasks, few-shot chat prompts (``pear_mega.data.prompts``),
                   scored by the task's own verifier
    jsonl          a prompts file with gold answers (``load_prompt_file``), math-verify (or a stored
                   reasoning-gym sample), ``MATH_DEMOS`` for plain prompts
    synthetic      random token prompts and a dense token-level reward (mechanics tests)

A new source is one ``register`` call (and its settings in ``TaskConfig``). The row builders
(``reasoning_gym_rows``, ``math_prompt``, ``load_math_file``) and ``verified_rewards`` also build
and score the evaluation suites (``pear_mega.evaluation``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pear_mega.data.prompts import MATH_DEMOS


@dataclass(frozen=True)
class TaskSource:
    name: str
    prompts: Callable
    probe_response: Callable
    score: Callable
    demos: tuple = ()


TASK_SOURCES: dict[str, TaskSource] = {}


def register(source: TaskSource) -> TaskSource:
    if source.name in TASK_SOURCES:
        raise ValueError(f"task source {source.name!r} is already registered")
    TASK_SOURCES[source.name] = source
    return source


def task_source(name: str) -> TaskSource:
    if name not in TASK_SOURCES:
        raise ValueError(f"task.source must be one of {tuple(TASK_SOURCES)}, got {name!r}")
    return TASK_SOURCES[name]


# ------------------------------------------------------------------------------ verified sources


def _answer_probe(row: dict, tokenizer, eot: int | None, rng, vocab_size: int) -> list[int]:
    """``Answer: <gold>`` + end of turn."""
    ids = list(tokenizer.encode(f"Answer: {row['answer']}", add_special_tokens=False))
    return ids + ([eot] if eot is not None else [])


def verified_rewards(texts: Sequence[str], targets: Sequence[dict], state: dict):
    """``pear_mega.rewards.compute_rewards`` of ``texts`` against the reward samples ``targets``
    with the scorer kept in ``state`` (made on first use): ``(rewards [N], metrics, [RewardOutput])``."""
    from pear_mega.rewards import ReasoningGymScorer, compute_rewards

    if "scorer" not in state:
        state["scorer"] = ReasoningGymScorer()
    return compute_rewards(list(texts), list(targets), state["scorer"])


def _verified_score(texts: Sequence[str], token_ids, rows: Sequence[dict], vocab_size: int, state: dict):
    rewards, metrics, _ = verified_rewards(texts, [r["target"] for r in rows], state)
    return rewards, {k: float(v) for k, v in metrics.items()}


def reasoning_gym_rows(name: str, size: int, seed: int, num_shots: int = 2, settings: dict | None = None) -> list[dict]:
    """``size`` rows of the reasoning-gym task ``name``: few-shot chat prompts of
    ``pear_mega.data.prompts``, the item's description as the reward sample."""
    from pear_mega.data.prompts import reasoning_gym_prompts

    return [{"prompt": item["messages"], "target": item["meta"], "answer": item["meta"]["answer"]}
            for item in reasoning_gym_prompts(name, size, seed, num_shots=num_shots, **dict(settings or {}))]


def _reasoning_gym_prompts(task, vocab_size: int) -> list[dict]:
    return [row for name in task.tasks
            for row in reasoning_gym_rows(name, task.size, task.seed, task.num_shots, task.task_settings())]


def math_prompt(problem: str, num_shots: int = 2) -> list[dict]:
    """A plain problem as chat messages after ``num_shots`` of the ``Answer:`` format demonstrations
    (``MATH_DEMOS``)."""
    from pear_mega.data.prompts import few_shot_messages

    return few_shot_messages(problem, list(MATH_DEMOS[:num_shots]))


def load_math_file(path: str | Path) -> list[dict]:
    """Rows ``{"problem", "answer"}`` of an AIME-format jsonl file; errors name file, row and field."""
    from pear_mega.data.prompts import gold_answer, iter_jsonl_objects
    from pear_mega.rewards import math_parse

    rows = []
    for i, row in iter_jsonl_objects(path):
        problem = row.get("problem")
        if not isinstance(problem, str) or not problem.strip():
            raise ValueError(f"{path}: row {i}: field 'problem' must be a non-empty string")
        answer = gold_answer(row, path, i)
        if not math_parse(answer):
            raise ValueError(f"{path}: row {i}: field 'answer' {row['answer']!r} is not a parseable math answer")
        rows.append({"problem": problem, "answer": answer})
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def load_prompt_file(path: str, num_shots: int = 2) -> list[dict]:
    """Rows of a prompts jsonl: ``{"prompt": str | "messages": [...], "answer": str | int[, "meta": {...}]}``.

    A plain ``prompt`` gets the math few-shot demonstrations of ``pear_mega.data.prompts`` (the
    ``Answer:`` format); the reward is math-verify against ``answer`` unless ``meta`` is a
    reasoning-gym sample description. Errors name the file, row and field.
    """
    from pear_mega.data.prompts import gold_answer, iter_jsonl_objects

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"task.prompts_file {path}: no such file")
    rows = []
    for i, row in iter_jsonl_objects(path):
        answer = gold_answer(row, path, i)
        if "messages" in row:
            messages = row["messages"]
            if (not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages)
                    or messages[-1].get("role") != "user"):
                raise ValueError(f"{path}: row {i}: field 'messages' must be a list of chat messages ending "
                                 "with a user turn")
        elif isinstance(row.get("prompt"), str) and row["prompt"].strip():
            messages = math_prompt(row["prompt"], num_shots)
        else:
            raise ValueError(f"{path}: row {i}: field 'prompt' (a non-empty string) or 'messages' is required")
        meta = row.get("meta")
        target = dict(meta) if isinstance(meta, dict) and meta.get("source") == "reasoning_gym" else \
            {"source": "math", "answer": answer}
        rows.append({"prompt": messages, "target": target, "answer": answer})
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


# ------------------------------------------------------------------------------ synthetic


def _synthetic_prompts(task, vocab_size: int) -> list[dict]:
    rng = random.Random(task.seed)
    low = min(256, vocab_size // 4)  # skip the special / byte tokens at the start of the vocab
    return [{"prompt": [rng.randrange(low, vocab_size) for _ in range(task.synthetic_prompt_tokens)],
             "target": {"source": "synthetic"}, "answer": ""} for _ in range(task.size)]


def _synthetic_probe(row: dict, tokenizer, eot: int | None, rng, vocab_size: int) -> list[int]:
    return [rng.randrange(256, vocab_size) for _ in range(6)]


def _low_ids_score(texts, token_ids: Sequence[Sequence[int]], rows, vocab_size: int, state: dict):
    """The fraction of response tokens with id < vocab/2 (a random policy scores 0.5)."""
    import torch

    half = vocab_size // 2
    rewards = torch.tensor([sum(t < half for t in ids) / max(len(ids), 1) for ids in token_ids], dtype=torch.float32)
    return rewards, {"reward/mean": float(rewards.mean())}


register(TaskSource("reasoning_gym", _reasoning_gym_prompts, _answer_probe, _verified_score))
register(TaskSource("jsonl", lambda task, vocab_size: load_prompt_file(task.prompts_file, task.num_shots),
                    _answer_probe, _verified_score, demos=MATH_DEMOS))
register(TaskSource("synthetic", _synthetic_prompts, _synthetic_probe, _low_ids_score))
