"""Answer extraction and verifiable rewards on known strings (real reasoning-gym and math-verify)."""

import ast
import pathlib
import threading

import pytest
import torch

from pear_mega import rewards as R


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Answer: 42", "42"),
        ("Let me think.\nAnswer: 7\nUser: next question", "7"),
        ("Answer: 3\nWait, no.\nanswer : -4.", "-4"),  # last marker wins, case-insensitive
        ("Answer:\n\n  12 ", "12"),  # blank lines after the marker are skipped
        ("Answer: $\\frac{1}{2}$", "\\frac{1}{2}"),
        ("Answer: **15**", "15"),
        ("so \\boxed{5} is it", "5"),
        ("\\boxed{1} then \\boxed{\\frac{2}{3}}", "\\frac{2}{3}"),  # last box, nested braces
        ("Answer: \\boxed{9}", "9"),  # box after the marker wins
        ("\\boxed{9}\nAnswer: 10", "10"),  # marker after the box wins
        ("\\fbox{8}", "8"),
        ("The result is 42", None),  # no marker
        ("Answer:   ", None),  # empty
        ("\\boxed{12", None),  # unbalanced
        ("Answer: " + "9" * 300, None),  # over MAX_ANSWER_CHARS
    ],
)
def test_extract_answer(text, expected):
    assert R.extract_answer(text) == expected


@pytest.mark.parametrize(
    "response, gold, reward",
    [
        ("Answer: 42", "42", 1.0),
        ("Answer: 41", "42", 0.0),
        ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
        ("Answer: \\frac12", "1/2", 1.0),
        ("Answer: $\\sqrt{18}$", "3\\sqrt{2}", 1.0),
        ("Answer: 042", "42", 1.0),
        ("Answer: 10.0", "10", 1.0),
        ("no answer here", "42", 0.0),
    ],
)
def test_math_reward(response, gold, reward):
    assert R.math_reward(response, gold).reward == reward


def test_math_reward_off_main_thread():
    # math-verify's default timeouts use signal.alarm, which raises off the main thread
    out = {}
    t = threading.Thread(target=lambda: out.update(r=R.math_reward("\\boxed{\\frac{1}{2}}", "0.5")))
    t.start()
    t.join(30)
    assert out["r"].reward == 1.0


def test_reasoning_gym_rebuilt_and_stored_entries():
    scorer = R.ReasoningGymScorer()
    # products, seed 1, item 1 is "1 * 5" = 5 (reasoning-gym 0.1.25)
    entry = scorer.entry("products", seed=1, index=1)
    assert entry["answer"] == "5"
    assert scorer.score("Answer: 5", entry).reward == 1.0
    assert scorer.score("Answer: 6", entry).reward == 0.0
    # basic_arithmetic with a 1-digit, 2-term config: seed 1, item 0 is "5 - 3" = 2
    cfg = {"min_digits": 1, "max_digits": 1, "min_terms": 2, "max_terms": 2}
    sample = {"source": "reasoning_gym", "task": "basic_arithmetic", "seed": 1, "index": 0, "config": cfg}
    assert R.score_sample("Answer: 2", sample, scorer=scorer).reward == 1.0
    stored = {"entry": scorer.entry("basic_arithmetic", 1, 0, config=cfg), "config": cfg}
    assert R.score_sample("blah\n\\boxed{2}", stored, scorer=scorer).reward == 1.0


def test_data_prompts_meta_is_a_reward_sample():
    from pear_mega.data.prompts import reasoning_gym_prompts

    rows = reasoning_gym_prompts("products", size=2, seed=1, min_digits=1, max_digits=1)
    metas = [r["meta"] for r in rows]
    golds = [m["answer"] for m in metas]
    rewards, _, _ = R.compute_rewards([f"Answer: {golds[0]}", "Answer: -1"], metas)
    torch.testing.assert_close(rewards, torch.tensor([1.0, 0.0]))
    # the same items rebuilt from (task, seed, index, config) agree with the stored entries
    scorer = R.ReasoningGymScorer()
    assert [scorer.entry("products", 1, i, config=metas[i]["config"])["answer"] for i in range(2)] == golds


def test_compute_rewards_counts_extraction_failures():
    samples = [
        {"task": "products", "seed": 1, "index": 1},
        {"task": "products", "seed": 1, "index": 1},
        {"answer": "42"},
        {"source": "math", "answer": "42"},
    ]
    responses = ["Answer: 5", "I think five", "\\boxed{42}", "forty-two"]
    rewards, metrics, outs = R.compute_rewards(responses, samples)
    torch.testing.assert_close(rewards, torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert float(metrics["reward/extract_fail_frac"]) == 0.5
    assert float(metrics["reward/mean"]) == 0.5
    assert [o.answer for o in outs] == ["5", None, "42", None]
    threaded, _, _ = R.compute_rewards(responses, samples, num_workers=2)
    torch.testing.assert_close(threaded, rewards)


def test_bad_samples_name_row_and_field():
    with pytest.raises(ValueError, match="row 1: reasoning-gym sample needs field 'index'"):
        R.compute_rewards(["a", "b"], [{"answer": "1"}, {"task": "products", "seed": 0}])
    with pytest.raises(ValueError, match="row 0: field 'source'"):
        R.compute_rewards(["a"], [{"question": "?"}])
    with pytest.raises(ValueError, match="not allowed"):
        R.score_sample("Answer: 1+1", {"task": "countdown", "seed": 0, "index": 0})
    with pytest.raises(ValueError, match="cannot be parsed"):
        R.math_reward("Answer: 1", "")


def _names(node) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _scorer_evaluates_answer(path: pathlib.Path) -> bool:
    """Does a score_answer in this file pass the answer (or a value derived from it) to
    eval / exec / parse_expr / sympify? Taint is propagated through assignments to a fixpoint."""
    for fn in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(fn, ast.FunctionDef) and fn.name == "score_answer"):
            continue
        tainted = {fn.args.args[1].arg}  # (self, answer, entry)
        changed = True
        while changed:
            changed = False
            for node in ast.walk(fn):
                if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    if _names(node.value) & tainted:
                        new = set().union(*(_names(t) for t in targets)) - tainted
                        if new:
                            tainted |= new
                            changed = True
        for call in ast.walk(fn):
            if isinstance(call, ast.Call):
                f = call.func
                name = f.id if isinstance(f, ast.Name) else getattr(f, "attr", "")
                args = set().union(set(), *(_names(a) for a in call.args))
                if name in ("eval", "exec", "parse_expr", "sympify") and args & tainted:
                    return True
    return False


def test_unsafe_task_list_covers_every_evaluating_scorer():
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    root = pathlib.Path(reasoning_gym.__file__).parent
    evaluating = {p.stem for p in root.rglob("*.py") if _scorer_evaluates_answer(p)}
    # file stems equal the task names for these tasks
    assert evaluating, "the scan found nothing: reasoning-gym's layout changed"
    assert evaluating <= R.UNSAFE_TASKS, evaluating - R.UNSAFE_TASKS
    assert R.UNSAFE_TASKS <= set(DATASETS), R.UNSAFE_TASKS - set(DATASETS)
