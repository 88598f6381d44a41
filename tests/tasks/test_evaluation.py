"""pass@k estimator, math-file validation, and the evaluation driver end to end (tiny model, vLLM)."""

import json
import math
from pathlib import Path

import pytest

from pear_mega.evaluation import (
    SuiteResult,
    mean_pass_at_k,
    pass_at_k,
    results_table,
    write_results,
)
from pear_mega.tasks import load_math_file

AIME_SAMPLE = Path(__file__).resolve().parents[1] / "data_files" / "aime_sample.jsonl"


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (8, 2, 1, 0.25),  # pass@1 = c/n
        (8, 2, 8, 1.0),  # n − c < k
        (10, 3, 2, 1 - 21 / 45),  # 1 − C(7,2)/C(10,2) = .533333
        (5, 0, 3, 0.0),
        (100, 1, 10, 0.1),  # 1 − C(99,10)/C(100,10) = 1 − 90/100
        (8, 8, 1, 1.0),
    ],
)
def test_pass_at_k_known_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_exact_binomials_for_large_n():
    n, c, k = 200, 10, 50
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)
    assert mean_pass_at_k([0, 2, 8], 8, 1) == pytest.approx((0 + 0.25 + 1) / 3)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 5)


def test_load_math_file_and_errors(tmp_path):
    rows = load_math_file(AIME_SAMPLE)
    assert len(rows) == 5 and rows[4]["answer"] == "11"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1?", "answer": "2"}\n{"problem": "x", "answr": "3"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: row 1: field 'answer'"):
        load_math_file(bad)
    bad.write_text('{"problem": "", "answer": "2"}\n')
    with pytest.raises(ValueError, match=r"row 0: field 'problem'"):
        load_math_file(bad)
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match=r"row 0: not valid JSON"):
        load_math_file(bad)


def test_results_table_and_files(tmp_path):
    results = [
        SuiteResult("products", 2, 8, {1: 0.25, 8: 0.5}, 0.3, 0.1, [2, 2]),
        SuiteResult("aime_sample", 5, 8, {1: 0.0, 8: 0.0}, 0.0, 0.9, [0] * 5),
    ]
    table = results_table(results)
    assert "| products | 2 | 8 | 0.250 | 0.500 | 0.300 | 0.100 |" in table
    paths = write_results(results, tmp_path, {"model": "/x/tiny"})
    data = json.loads(paths["json"].read_text())
    assert data["suites"][0]["pass_at_k"] == {"1": 0.25, "8": 0.5}
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_evaluate_cli_end_to_end(tmp_path):
    from pear_mega.evaluate import main
    from pear_mega.pretrained import tiny_model

    model = tiny_model(tmp_path / "tiny")
    out = tmp_path / "eval"
    main(["--model", str(model), "--tasks", "products", "--task-size", "2", "--math-file", str(AIME_SAMPLE),
          "--n", "2", "--k", "1,2", "--max-tokens", "4", "--max-model-len", "512", "--out", str(out)])
    data = json.loads((out / "results.json").read_text())
    names = [s["name"] for s in data["suites"]]
    assert names == ["products", "aime_sample"]
    for s in data["suites"]:
        assert set(s["pass_at_k"]) == {"1", "2"} and 0.0 <= s["pass_at_k"]["1"] <= s["pass_at_k"]["2"] <= 1.0
    assert data["suites"][1]["prompts"] == 5 and len(data["suites"][1]["correct_counts"]) == 5
    assert (out / "pass_at_k.png").stat().st_size > 1000


def test_suites_are_the_task_registrys_prompts(tmp_path):
    """Evaluation prompts what RL trains on: a reasoning-gym suite is the registry's rows of the
    task, a math file's suite the ``jsonl`` source's rows of the same problems."""
    from pear_mega.evaluation import math_suite, reasoning_gym_suite
    from pear_mega.rl.config import TaskConfig
    from pear_mega.tasks import load_math_file, task_source

    task = TaskConfig(source="reasoning_gym", tasks=("basic_arithmetic",), size=4, seed=7, num_shots=1,
                      task_config='{"max_terms": 2}')
    rows = task_source("reasoning_gym").prompts(task, 1000)
    suite = reasoning_gym_suite("basic_arithmetic", 4, 7, 1, {"max_terms": 2})
    assert suite.prompts == [r["prompt"] for r in rows] and suite.targets == [r["target"] for r in rows]

    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": r["problem"], "answer": r["answer"]}) + "\n"
                                    for r in load_math_file(AIME_SAMPLE)))
    rows = task_source("jsonl").prompts(TaskConfig(source="jsonl", prompts_file=str(prompts_file), num_shots=2), 1000)
    suite = math_suite(AIME_SAMPLE, num_shots=2)
    assert suite.prompts == [r["prompt"] for r in rows] and suite.targets == [r["target"] for r in rows]
