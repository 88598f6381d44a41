"""Reward settings refused at config time, and math-verify bounded in worker threads."""

import json
import time

import pytest

from pear_mega.rl.config import TaskConfig
from pear_mega.rewards import check_prompt_answers, check_task_names, compute_rewards


def test_unsafe_reasoning_gym_task_is_refused_at_config_time():
    with pytest.raises(ValueError, match=r"task.tasks: reasoning-gym task\(s\) \['countdown'\] score answers by "
                                         "evaluating them as code"):
        TaskConfig(tasks=("basic_arithmetic", "countdown"))


def test_unknown_reasoning_gym_task_is_refused_before_the_run():
    check_task_names(("basic_arithmetic", "leg_counting"), "task.tasks", known_only=True)
    with pytest.raises(ValueError, match=r"task.tasks: unknown reasoning-gym task\(s\) \['basic_arithmetik'\]"):
        check_task_names(("basic_arithmetik",), "task.tasks", known_only=True)


def test_unparseable_math_gold_answer_is_refused_naming_the_row(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "1+1?", "answer": "2"},
            {"prompt": "q", "answer": "x", "meta": {"source": "reasoning_gym", "task": "basic_arithmetic"}},
            {"prompt": "empty?", "answer": "$$"}]  # parses to nothing: scoring it would raise
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=rf"task.prompts_file: {path}: row 2: field 'answer': math gold answer "
                                         r"'\$\$' cannot be parsed"):
        check_prompt_answers(str(path), "task.prompts_file")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    check_prompt_answers(str(path), "task.prompts_file")


@pytest.mark.timeout(120)
def test_math_verify_is_bounded_in_worker_threads():
    """A power tower held a worker thread for minutes (math-verify's signal timeout is off there)."""
    start = time.perf_counter()
    rewards, _, outs = compute_rewards(["\\boxed{9^{9^{9^{9}}}}", "Answer: 4"],
                                       [{"source": "math", "answer": "1"}, {"source": "math", "answer": "4"}],
                                       num_workers=2)
    elapsed = time.perf_counter() - start
    assert rewards.tolist() == [0.0, 1.0] and outs[0].answer == "9^{9^{9^{9}}}"
    assert elapsed < 60, elapsed
