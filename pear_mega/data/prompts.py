"""Chat prompts for reasoning-gym tasks, and the answer format they ask for.

Small instruct models rarely follow a zero-shot "give the answer after `Answer:`" instruction
(SmolLM2-135M: 2-18% of samples), but with two demonstrations whose assistant turns are only
``Answer: <gold>`` they follow the format in 78-99% of samples (docs/platform_notes). So a prompt
is: [system?] then, per demonstration, ``user: question`` / ``assistant: Answer: gold``, then
``user: question``. Demonstrations come from the same task drawn with a different seed, so they
never repeat the question.

The reasoning-gym entry is kept in the row's ``meta`` (task, index, seed, dataset config, gold
answer, metadata as JSON) so rewards can be computed later (``pear_mega.rewards`` reads this
``meta`` directly).

Also the readers of local prompt and math files shared by RL and evaluation: ``iter_jsonl_objects``
(errors name file and row), ``gold_answer`` (the ``answer`` field) and the math format
demonstrations ``MATH_DEMOS``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ANSWER_PREFIX = "Answer:"
# Demonstrations are drawn from a dataset seeded apart from the questions' (seed + this offset).
DEMO_SEED_OFFSET = 1_000_003


def few_shot_messages(question: str, demonstrations: list[tuple[str, str]], system: str | None = None
                      ) -> list[dict[str, str]]:
    """The chat messages of a few-shot prompt; each demonstration is ``(question, gold answer)``."""
    messages = [{"role": "system", "content": system}] if system else []
    for demo_q, demo_a in demonstrations:
        messages.append({"role": "user", "content": demo_q})
        messages.append({"role": "assistant", "content": f"{ANSWER_PREFIX} {demo_a}"})
    messages.append({"role": "user", "content": question})
    return messages


def reasoning_gym_prompts(task: str, size: int, seed: int, *, num_shots: int = 2, system: str | None = None,
                          **task_config: Any) -> list[dict]:
    """Prompts for ``size`` entries of a reasoning-gym task.

    Args:
        task: a registered reasoning-gym dataset name, e.g. "basic_arithmetic".
        size, seed: passed to ``reasoning_gym.create_dataset``.
        num_shots: demonstrations per prompt (drawn with seed ``seed + DEMO_SEED_OFFSET``).
        task_config: extra dataset settings (e.g. ``max_digits=1``), stored in meta.
    Returns:
        ``[{"messages": [...], "meta": {"task", "index", "seed", "config", "answer", "metadata", "question"}}]``
    """
    import reasoning_gym

    if size < 1:
        raise ValueError(f"reasoning_gym_prompts: size must be >= 1, got {size}")
    if num_shots < 0:
        raise ValueError(f"reasoning_gym_prompts: num_shots must be >= 0, got {num_shots}")
    dataset = reasoning_gym.create_dataset(task, size=size, seed=seed, **task_config)
    demos: list[tuple[str, str]] = []
    if num_shots:
        demo_ds = reasoning_gym.create_dataset(task, size=num_shots, seed=seed + DEMO_SEED_OFFSET, **task_config)
        demos = [(e["question"], str(e["answer"])) for e in demo_ds]
    items = []
    for index, entry in enumerate(dataset):
        items.append({
            "messages": few_shot_messages(entry["question"], demos, system),
            "meta": {
                "task": task,
                "index": index,
                "seed": seed,
                "config": task_config,
                "question": entry["question"],
                "answer": str(entry["answer"]),
                "metadata": json.dumps(entry.get("metadata", {}), default=str),
            },
        })
    return items


# Format demonstrations for math prompts (answer-only turns, like the reasoning-gym prompts).
MATH_DEMOS = (
    ("What is the sum of the first five positive odd integers?", "25"),
    ("Find the remainder when 100 is divided by 7.", "2"),
)


def iter_jsonl_objects(path: str | Path):
    """Yield ``(row_index, object)`` for each non-blank line of a jsonl file; errors name file and row."""
    with open(path) as fh:
        for i, line in enumerate(fh):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: row {i}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}: row {i}: expected a JSON object")  # noqa: TRY004 (bad data, not a bad call)
            yield i, row


def gold_answer(row: Mapping, path: str | Path, i: int) -> str:
    """The row's ``answer`` field as a string (a non-empty string or an integer, else an error)."""
    answer = row.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, (str, int)) or not str(answer).strip():
        raise ValueError(f"{path}: row {i}: field 'answer' must be a non-empty string or an integer")
    return str(answer)
