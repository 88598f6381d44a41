r"""Verifiable rewards: reasoning-gym tasks and math answers. No reward executes model output.

Answer extraction (one rule for every task, ``extract_answer``):

1. Find the last ``Answer:`` marker (case-insensitive, e.g. ``answer :``) and the last
   ``\boxed{`` / ``\fbox{``. The one that starts **later** in the response wins, so
   ``Answer: \boxed{7}`` gives ``7`` and a trailing correction after an earlier box is honoured.
2. ``\boxed{...}``: the content inside balanced braces (nested braces allowed). Unbalanced → fail.
   ``Answer:``: the text after the marker up to the end of its line (leading blank lines skipped).
3. Cleaning: strip whitespace, one pair of surrounding ``$…$`` / ``\(…\)`` / ``\[…\]`` / ``**…**``,
   and one trailing ``.``. An empty result or one longer than ``MAX_ANSWER_CHARS`` → fail.

A failed extraction scores 0 and is counted (``reward/extract_fail_frac``).

Scoring:
- reasoning-gym: the dataset's own ``score_answer(answer, entry)``. The entry comes from the
  sample (``{"entry": {...}}``) or is rebuilt from ``{"task", "seed", "index"[, "size"]}``
  (reasoning-gym items depend only on seed and index, not on the dataset size). Tasks whose
  scorer runs ``eval``/``sympy.parse_expr`` on the answer are refused (``UNSAFE_TASKS``).
- math: ``math_verify.verify(parse(gold), parse(answer))``; both are wrapped in ``$…$`` so LaTeX
  (``\frac12``, ``\sqrt{18}``) and plain numbers (``0.5``) compare as the same value. math-verify
  parses LaTeX with its own grammar (latex2sympy), never Python ``eval``. Its timeouts use
  ``signal.alarm``, which only works in the main thread; off the main thread (``compute_rewards``
  with ``num_workers``) each thread's comparisons run in a child process of its own that is
  killed past ``MATH_TIMEOUT_S`` (the answer scores 0): a short answer such as
  ``9^{9^{9^{9}}}`` can otherwise hold a worker for minutes inside one big-integer power.

Config-time checks (``RLConfig.validate_run``): ``check_task_names`` refuses unknown and unsafe
reasoning-gym tasks, ``check_prompt_answers`` unparseable math gold answers of a prompts file.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

MAX_ANSWER_CHARS = 256
MATH_TIMEOUT_S = 5

# reasoning-gym tasks whose score_answer evaluates the model's answer as code: eval() on the
# answer string (string_insertion, spiral_matrix, binary_matrix, n_queens) or sympy's parse_expr,
# which is eval-based (countdown, puzzle24, the integration and polynomial tasks); codeio runs
# code. Found by scanning reasoning-gym 0.1.25's scorers (tests/rl re-runs the scan).
UNSAFE_TASKS = frozenset(
    {
        "string_insertion",
        "spiral_matrix",
        "binary_matrix",
        "n_queens",
        "countdown",
        "puzzle24",
        "simple_integration",
        "intermediate_integration",
        "polynomial_multiplication",
        "codeio",
    }
)

_ANSWER_RE = re.compile(r"answer\s*:", re.IGNORECASE)
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_WRAPPERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"), ("**", "**"))


@dataclass(frozen=True)
class RewardOutput:
    reward: float
    answer: str | None
    """The extracted answer; None when extraction failed (reward 0)."""


def _boxed_content(text: str, open_brace: int) -> str | None:
    """Content between ``text[open_brace] == '{'`` and its matching ``}``; None if unbalanced."""
    depth = 0
    for i in range(open_brace, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_brace + 1 : i]
    return None


def _clean(answer: str) -> str | None:
    answer = answer.strip()
    for left, right in _WRAPPERS:
        if len(answer) >= len(left) + len(right) and answer.startswith(left) and answer.endswith(right):
            answer = answer[len(left) : len(answer) - len(right)].strip()
            break
    if answer.endswith("."):
        answer = answer[:-1].rstrip()
    if not answer or len(answer) > MAX_ANSWER_CHARS:
        return None
    return answer


def extract_answer(text: str) -> str | None:
    """The answer of a response by the module's rule (last ``Answer:`` or last ``\\boxed{}``,
    whichever is later); None when there is none."""
    answer_match = None
    for answer_match in _ANSWER_RE.finditer(text):
        pass
    boxed_match = None
    for boxed_match in _BOXED_RE.finditer(text):
        pass
    if boxed_match is not None and (answer_match is None or boxed_match.start() > answer_match.start()):
        content = _boxed_content(text, boxed_match.end() - 1)
        return None if content is None else _clean(content)
    if answer_match is None:
        return None
    rest = text[answer_match.end() :].lstrip()
    return _clean(rest.split("\n", 1)[0])


# --------------------------------------------------------------------------------------------
# reasoning-gym
# --------------------------------------------------------------------------------------------


class ReasoningGymScorer:
    """Scores answers with reasoning-gym's own verifiers; datasets are built once and cached.

    ``config`` is the task's keyword configuration (e.g. ``{"min_digits": 1, "max_digits": 1}``),
    passed to ``reasoning_gym.create_dataset``: some scorers read it, and rebuilt entries depend on it.
    """

    def __init__(self) -> None:
        self._datasets: dict[tuple[str, int, int, str], Any] = {}
        self._lock = threading.Lock()

    def dataset(self, task: str, seed: int, size: int, config: Mapping | None = None):
        """``reasoning_gym.create_dataset(task, size=size, seed=seed, **config)``, cached."""
        if task in UNSAFE_TASKS:
            raise ValueError(
                f"reasoning-gym task {task!r}: its score_answer evaluates the answer as code "
                "(eval / sympy parse_expr); it is not allowed as a reward"
            )
        config = dict(config or {})
        key = (task, seed, size, json.dumps(config, sort_keys=True, default=str))
        with self._lock:
            if key not in self._datasets:
                import reasoning_gym

                self._datasets[key] = reasoning_gym.create_dataset(task, size=size, seed=seed, **config)
            return self._datasets[key]

    def entry(self, task: str, seed: int, index: int, size: int | None = None, config: Mapping | None = None) -> dict:
        """Rebuild item ``index`` of ``create_dataset(task, seed=seed, **config)``.

        reasoning-gym items depend on (seed, index) only, so without ``size`` one dataset per
        (task, seed, config) is kept and grown in powers of two as larger indices arrive.
        """
        if size is not None:
            if not 0 <= index < size:
                raise ValueError(f"reasoning-gym {task!r}: index {index} outside [0, size={size})")
            return self.dataset(task, seed, size, config)[index]
        if index < 0:
            raise ValueError(f"reasoning-gym {task!r}: index {index} < 0")
        grown = 64
        while grown <= index:
            grown *= 2
        return self.dataset(task, seed, grown, config)[index]

    def score(self, response: str, entry: Mapping, config: Mapping | None = None) -> RewardOutput:
        """``score_answer(extract_answer(response), entry)``; the task is ``entry.metadata.source_dataset``."""
        task = entry.get("metadata", {}).get("source_dataset")
        if not task:
            raise ValueError("reasoning-gym entry has no metadata.source_dataset")
        answer = extract_answer(response)
        if answer is None:
            return RewardOutput(0.0, None)
        # The scorer needs a dataset instance only for its config; no item of it is read.
        ds = self.dataset(task, 0, 1, config)
        return RewardOutput(float(ds.score_answer(answer, dict(entry))), answer)


# --------------------------------------------------------------------------------------------
# math
# --------------------------------------------------------------------------------------------


def math_parse(text: str):
    """math-verify's parse of ``text`` (as ``$text$`` first, then as it is); empty when unparseable."""
    from math_verify import parse

    timeout = MATH_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    parsed = parse(f"${text}$", parsing_timeout=timeout)
    return parsed if parsed else parse(text, parsing_timeout=timeout)


def _math_equal_here(gold: str, answer: str) -> bool:
    from math_verify import verify

    timeout = MATH_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    gold_parsed = math_parse(gold)
    if not gold_parsed:
        raise ValueError(f"math gold answer {gold!r} cannot be parsed")
    answer_parsed = math_parse(answer)
    return bool(answer_parsed) and bool(verify(gold_parsed, answer_parsed, timeout_seconds=timeout))


def math_server() -> None:
    """Child process loop (``_MathProcess``): JSON lines ``[gold, answer]`` on stdin,
    ``[ok, result or error message]`` on stdout."""
    import sys

    replies, sys.stdout = sys.stdout, sys.stderr  # anything the libraries print stays off the protocol
    for line in sys.stdin:
        gold, answer = json.loads(line)
        try:
            reply = [True, _math_equal_here(gold, answer)]
        except ValueError as exc:
            reply = [False, str(exc)]
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


class _MathProcess:
    """One thread's child process for math comparisons (a fresh interpreter running
    ``math_server``, so nothing of the parent is re-imported or forked), killed and replaced
    after a timeout."""

    _local = threading.local()

    def __init__(self) -> None:
        import subprocess
        import sys

        self.process = subprocess.Popen(
            [sys.executable, "-c", "from pear_mega.rewards import math_server; math_server()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.warm = False

    def close(self) -> None:
        self.process.kill()
        self.process.wait()

    @classmethod
    def equal(cls, gold: str, answer: str, timeout: float) -> bool:
        import select

        worker = getattr(cls._local, "worker", None)
        if worker is None or worker.process.poll() is not None:
            worker = cls._local.worker = cls()
        worker.process.stdin.write(json.dumps([gold, answer]) + "\n")
        worker.process.stdin.flush()
        # the first call also waits for the child's start (its imports); later ones only for the work
        wait = timeout + (0 if worker.warm else 60)
        ready, _, _ = select.select([worker.process.stdout], [], [], wait)
        line = worker.process.stdout.readline() if ready else ""
        if not line:
            worker.close()
            cls._local.worker = None
            return False
        worker.warm = True
        ok, result = json.loads(line)
        if not ok:
            raise ValueError(result)
        return bool(result)


def math_equal(gold: str, answer: str) -> bool:
    """Whether ``answer`` equals ``gold`` as a math value (math-verify). Off the main thread the
    comparison runs in the thread's child process, bounded by ``MATH_TIMEOUT_S`` (module docstring)."""
    if threading.current_thread() is threading.main_thread():
        return _math_equal_here(gold, answer)
    return _MathProcess.equal(gold, answer, MATH_TIMEOUT_S)


def check_math_gold(gold: str, where: str) -> None:
    """Raise ValueError naming ``where`` when math-verify cannot parse the gold answer."""
    if not math_parse(str(gold)):
        raise ValueError(f"{where}: math gold answer {gold!r} cannot be parsed by math-verify")


def check_task_names(tasks, key: str, known_only: bool) -> None:
    """Refuse unsafe reasoning-gym tasks (``UNSAFE_TASKS``) and, with ``known_only``, names
    reasoning-gym does not know (imports reasoning_gym). ValueError names ``key``."""
    unsafe = sorted(set(tasks) & UNSAFE_TASKS)
    if unsafe:
        raise ValueError(f"{key}: reasoning-gym task(s) {unsafe} score answers by evaluating them as code "
                         "(eval / sympy parse_expr) and are not allowed as rewards")
    if known_only:
        from reasoning_gym.factory import DATASETS

        unknown = sorted(set(tasks) - set(DATASETS))
        if unknown:
            raise ValueError(f"{key}: unknown reasoning-gym task(s) {unknown}; known: {', '.join(sorted(DATASETS))}")


def check_prompt_answers(path: str, key: str) -> None:
    """Every math-scored row of a prompts jsonl has a gold answer math-verify parses (rows whose
    ``meta`` is a reasoning-gym sample are scored by reasoning-gym and skipped)."""
    from pathlib import Path

    from pear_mega.data.prompts import gold_answer, iter_jsonl_objects

    if not Path(path).is_file():
        raise ValueError(f"{key}: {path}: no such file")
    for i, row in iter_jsonl_objects(path):
        meta = row.get("meta")
        if isinstance(meta, dict) and meta.get("source") == "reasoning_gym":
            continue
        check_math_gold(gold_answer(row, path, i), f"{key}: {path}: row {i}: field 'answer'")


def math_reward(response: str, gold: str) -> RewardOutput:
    """1 if the extracted answer equals ``gold`` (math-verify), else 0."""
    answer = extract_answer(response)
    if answer is None:
        return RewardOutput(0.0, None)
    return RewardOutput(1.0 if math_equal(str(gold), answer) else 0.0, answer)


# --------------------------------------------------------------------------------------------
# batch
# --------------------------------------------------------------------------------------------


def _sample_kind(sample: Mapping, row: int) -> str:
    kind = sample.get("source")
    if kind is None:
        kind = "reasoning_gym" if ("entry" in sample or "task" in sample) else "math" if "answer" in sample else None
    if kind not in ("reasoning_gym", "math"):
        raise ValueError(
            f"reward sample row {row}: field 'source' must be 'reasoning_gym' or 'math' (or give 'entry'/'task' "
            f"or 'answer'), got keys {sorted(sample)}"
        )
    return kind


def score_sample(response: str, sample: Mapping, row: int = 0, scorer: ReasoningGymScorer | None = None) -> RewardOutput:
    """Score one response against one sample description (schema in ``compute_rewards``)."""
    kind = _sample_kind(sample, row)
    if kind == "math":
        if "answer" not in sample:
            raise ValueError(f"reward sample row {row}: math sample needs field 'answer'")
        return math_reward(response, str(sample["answer"]))
    scorer = scorer or ReasoningGymScorer()
    config = sample.get("config")
    if "entry" in sample:
        return scorer.score(response, sample["entry"], config)
    if "metadata" in sample and "answer" in sample:
        # the row meta of pear_mega.data.prompts.reasoning_gym_prompts: the entry is stored inline
        metadata = sample["metadata"]
        metadata = json.loads(metadata) if isinstance(metadata, str) else dict(metadata)
        entry = {"question": sample.get("question", ""), "answer": str(sample["answer"]), "metadata": metadata}
        if "source_dataset" not in metadata and "task" in sample:
            entry["metadata"]["source_dataset"] = sample["task"]
        return scorer.score(response, entry, config)
    for field in ("task", "seed", "index"):
        if field not in sample:
            raise ValueError(f"reward sample row {row}: reasoning-gym sample needs field {field!r} (or 'entry')")
    entry = scorer.entry(str(sample["task"]), int(sample["seed"]), int(sample["index"]), sample.get("size"), config)
    return scorer.score(response, entry, config)


def compute_rewards(
    responses: Sequence[str],
    samples: Sequence[Mapping],
    scorer: ReasoningGymScorer | None = None,
    num_workers: int = 0,
) -> tuple[Tensor, dict[str, Tensor], list[RewardOutput]]:
    """Rewards for a batch of responses, one sample description per response.

    A sample is one of
        ``{"source": "reasoning_gym", "task": str, "seed": int, "index": int[, "size": int][, "config": dict]}``
        ``{"source": "reasoning_gym", "entry": <a reasoning-gym item>[, "config": dict]}``
        the ``meta`` of ``pear_mega.data.prompts.reasoning_gym_prompts`` rows
            (``task, index, seed, config, question, answer, metadata``: the entry is taken inline)
        ``{"source": "math", "answer": str}``
    (``source`` may be left out: ``entry``/``task`` mean reasoning-gym, ``answer`` means math).

    Returns:
        rewards ``[N]`` float32, metrics (``reward/mean``, ``reward/extract_fail_frac``),
        the per-response ``RewardOutput`` list (extracted answers, for logging).
    """
    if len(responses) != len(samples):
        raise ValueError(f"compute_rewards: {len(responses)} responses but {len(samples)} samples")
    scorer = scorer or ReasoningGymScorer()
    jobs = list(zip(responses, samples, range(len(samples))))
    if num_workers > 0:
        with ThreadPoolExecutor(num_workers) as pool:
            outs = list(pool.map(lambda j: score_sample(j[0], j[1], j[2], scorer), jobs))
    else:
        outs = [score_sample(r, s, i, scorer) for r, s, i in jobs]
    rewards = torch.tensor([o.reward for o in outs], dtype=torch.float32)
    fails = torch.tensor([o.answer is None for o in outs], dtype=torch.float32)
    metrics = {
        "reward/mean": rewards.mean() if len(outs) else torch.zeros(()),
        "reward/extract_fail_frac": fails.mean() if len(outs) else torch.zeros(()),
    }
    return rewards, metrics, outs
