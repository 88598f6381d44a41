"""The study's orchestration without its heavy processes: configuration checks, the commands the
stages run, the manifest (skipping, resuming after a kill, rerunning only a changed arm), the
grouping of evaluations and the student's prompt of the behavior rows.

The stage processes are replaced by functions that write the stage's outputs (the real ones run
in tests/study/test_study_e2e.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from pear_mega.config_tools import apply_overrides
from pear_mega.study.__main__ import main as study_main
from pear_mega.study.config import parse_arm
from pear_mega.study.recipes import RECIPES
from pear_mega.study.stages import (
    Manifest,
    StudyError,
    StudyPlan,
    collect_results,
    overrides_for,
    restrict_to_student_prompt,
    run_stages,
)


def _tiny(tmp_path: Path, *overrides: str):
    return RECIPES.build("tiny_study", [f"study.out_dir={tmp_path / 'study'}", *overrides])


class FakeProcesses:
    """Replaces every stage's process: writes the outputs (for evaluations a results.json with
    per-prompt counts) and records which stages ran, in which batches."""

    def __init__(self, plan: StudyPlan, fail_at: str | None = None):
        self.batches: list[list[str]] = []
        self.fail_at = fail_at
        for stage in plan.stages:
            stage.run = self.run

    def run(self, stages, log: Path) -> None:
        self.batches.append([s.id for s in stages])
        for stage in stages:
            if stage.id == self.fail_at:
                raise KeyboardInterrupt  # the study is killed in the middle of this stage
            for path in stage.outputs:
                path.parent.mkdir(parents=True, exist_ok=True)
                if path.name == "results.json":
                    suites = [{"name": name, "n": 2, "correct_counts": [1, 0, 2, 0]} for name in stage.inputs["suites"]]
                    path.write_text(json.dumps({"suites": suites}))
                elif path.suffix == ".jsonl":
                    path.write_text(json.dumps({"step": 1, "pear/ess": 0.9}) + "\n")
                else:
                    path.write_text("{}")

    @property
    def ran(self) -> list[str]:
        return [i for b in self.batches for i in b]


def _quiet(_line: str) -> None:
    pass


def test_arm_names():
    assert parse_arm("token").level == "token" and parse_arm("token").steps_multiplier == 1
    assert parse_arm("none_3x").level == "none" and parse_arm("none_3x").steps_multiplier == 3
    with pytest.raises(ValueError, match="study.arms: unknown arm 'tokens'"):
        parse_arm("tokens")


@pytest.mark.parametrize("name, level, mult, loss", [
    ("kd", "none", 1, "kd"), ("kd_token", "token", 1, "kd"), ("kd_sequence_3x", "sequence", 3, "kd"),
    ("kd_2x", "none", 2, "kd"), ("block", "block", 1, "nll"),
])
def test_kd_arm_names(name, level, mult, loss):
    arm = parse_arm(name)
    assert (arm.name, arm.level, arm.steps_multiplier, arm.loss) == (name, level, mult, loss)


@pytest.mark.parametrize("name, message", [("kd_none", "write unweighted distillation as 'kd'"),
                                           ("kd_tokens", "unknown arm 'kd_tokens'"), ("kdtoken", "unknown arm")])
def test_bad_kd_arm_names_are_refused(name, message):
    with pytest.raises(ValueError, match=f"study.arms: {message}"):
        parse_arm(name)


@pytest.mark.parametrize("override, key", [
    ("study.arms=[none,foo]", "study.arms"),
    ("study.baseline=block", "study.baseline"),
    ('study.arm_overrides={"block": ["pear.gamma=0.9"]}', "study.arm_overrides"),
    ("eval.ks=[1,8]", "eval.ks"),
    ("behavior.temperature=0", "behavior.temperature"),
    ("eval.seed=0", "eval.seed"),
    ("rl.rollout.max_model_len=512", "the key moved to rl.rollout.engine.max_model_len"),
])
def test_bad_config_is_refused_naming_the_key(tmp_path, capsys, override, key):
    assert study_main(["--recipe", "tiny_study", f"study.out_dir={tmp_path / 'study'}", override]) == 2
    assert key in capsys.readouterr().err
    assert not (tmp_path / "study").exists()


@pytest.mark.parametrize("overrides, key", [
    (["study.arms=[none,kd_token]", "behavior.kd_top_k=0"], "behavior.kd_top_k"),  # nothing to distil
    (["behavior.kd_top_k=-1"], "behavior.kd_top_k"),
    (["sft.loss.kind=kd"], "sft.loss.kind"),  # the arm names set the loss
    (["sft.pear.target_temperature=0.5", "study.arms=[none,kd_token]"], "study.arms"),  # the KD loss refuses it
    (["study.arms=[none,kd_none]"], "study.arms"),
])
def test_bad_kd_config_is_refused_naming_the_key(tmp_path, capsys, overrides, key):
    assert study_main(["--recipe", "tiny_study", f"study.out_dir={tmp_path / 'study'}", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bad configuration: ") and key in err, err
    assert not (tmp_path / "study").exists()


def test_overrides_apply_in_an_order_in_which_each_is_valid(tmp_path, capsys):
    """The baseline may be named before the arms that hold it (one at a time in the given order it
    would be refused: 'kd_token' is not an arm yet)."""
    args = ["--print-config", "--recipe", "tiny_study", f"study.out_dir={tmp_path / 'study'}"]
    assert study_main([*args, "study.baseline=kd_token", "study.arms=[kd,kd_token]"]) == 0
    study = json.loads(capsys.readouterr().out)["study"]
    assert study["arms"] == ["kd", "kd_token"] and study["baseline"] == "kd_token"
    assert study_main([*args, "study.seeds=[1]", "study.seeds=[2]"]) == 0  # the given order where valid
    assert json.loads(capsys.readouterr().out)["study"]["seeds"] == [2]
    assert study_main([*args, "study.baseline=block", "study.arms=[kd,kd_token]"]) == 2
    assert "study.baseline 'block' is not one of study.arms" in capsys.readouterr().err


@pytest.mark.parametrize("arms, baseline", [("[none,token]", "none"), ("[token,none]", "none"), ("[kd_token,kd]", "kd_token")])
def test_default_baseline_is_plain_sft_else_the_first_arm(tmp_path, arms, baseline):
    cfg = _tiny(tmp_path, f"study.arms={arms}")
    assert cfg.study.baseline_arm == baseline
    plan = StudyPlan(cfg)
    FakeProcesses(plan)
    run_stages(plan, print_fn=_quiet)
    assert collect_results(plan, {})["baseline"] == baseline


def test_kd_top_k_zero_is_fine_without_a_kd_arm(tmp_path):
    assert _tiny(tmp_path, "behavior.kd_top_k=0").teacher_top_k == 0


@pytest.mark.parametrize("override, key", [
    ('study.arm_overrides={"token": ["loss.kind=kd"]}', "study.arm_overrides"),  # the name sets the loss
    ("behavior.model=/nonexistent/model", "behavior.model"),
    ('eval.shifted={"no_such_task": {}}', "eval.shifted"),
    ('eval.shifted={"products": {"max_digits": -3}}', "eval.shifted"),
    ('study.arm_overrides={"token": ["pear.no_such_key=1"]}', "study.arm_overrides"),
    ("behavior.shots=0", "behavior"),  # πβ would be the student's own prompt
])
def test_bad_config_outside_the_dataclasses_is_refused_before_any_stage(tmp_path, capsys, override, key):
    assert study_main(["--recipe", "tiny_study", f"study.out_dir={tmp_path / 'study'}", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bad configuration: ") and key in err
    assert not (tmp_path / "study").exists()


def test_stage_commands_reproduce_the_study_configs(tmp_path):
    """The per-arm SFT / RL configs are passed as recipe + overrides; they must rebuild exactly."""
    from pear_mega.rl.recipes import RECIPES as RL
    from pear_mega.sft.recipes import RECIPES as SFT

    cfg = _tiny(tmp_path, 'study.arm_overrides={"token": ["pear.gamma=0.95", "pear.delta_clip=[-0.5,0.5]"]}')
    plan = StudyPlan(cfg)
    for arm in cfg.study.arms:
        sft = plan.sft_config(arm, 1)
        assert apply_overrides(SFT.build(cfg.study.sft_recipe), overrides_for(SFT, cfg.study.sft_recipe, sft)) == sft
        rl = plan.rl_config(arm, 1)
        assert apply_overrides(RL.build(cfg.study.rl_recipe), overrides_for(RL, cfg.study.rl_recipe, rl)) == rl
        assert rl.model.hf_path == str(plan.sft_model(arm, 1)) and rl.rollout.engine.seed == cfg.rl.rollout.engine.seed + 1
    token = plan.sft_config("token", 0)
    assert token.pear.level == "token" and token.pear.gamma == 0.95 and token.pear.delta_clip == (-0.5, 0.5)
    # Paired design: the arms differ in the PEAR level (and the arm's own overrides) only.
    none = plan.sft_config("none", 0)
    assert replace(token, pear=none.pear, name=none.name, checkpoint=none.checkpoint, logging=none.logging) == none
    assert none.data.seed == cfg.sft.data.seed and plan.sft_config("none", 1).data.seed == cfg.sft.data.seed + 1


def test_kd_arm_distils_with_the_studys_kd_settings(tmp_path):
    """A kd arm's SFT is the study's ``sft`` with loss.kind=kd: its KD settings are ``sft.loss.kd``
    (and the arm's own overrides); the command line rebuilds it; otherwise it equals the NLL arm."""
    from pear_mega.sft.recipes import RECIPES as SFT

    cfg = _tiny(tmp_path, "study.arms=[none,token,kd,kd_token_2x]", "sft.loss.kd.mode=topk_renorm",
                'study.arm_overrides={"kd": ["loss.kd.nll_weight=0.1"]}')
    plan = StudyPlan(cfg)
    kd, kd_token, token = plan.sft_config("kd", 0), plan.sft_config("kd_token_2x", 0), plan.sft_config("token", 0)
    assert kd.loss.kind == "kd" and kd.pear.level == "none" and kd.loss.kd.nll_weight == 0.1
    assert kd_token.loss.kind == "kd" and kd_token.pear.level == "token" and kd_token.loss.kd.nll_weight == 0.0
    assert kd.loss.kd.mode == kd_token.loss.kd.mode == token.loss.kd.mode == "topk_renorm"
    assert kd_token.train.steps == 2 * token.train.steps
    assert plan.sft_config("none", 0).loss.kind == token.loss.kind == "nll"
    assert replace(kd_token, loss=token.loss, train=token.train, name=token.name, checkpoint=token.checkpoint,
                   logging=token.logging) == token
    for sft in (kd, kd_token):
        assert apply_overrides(SFT.build(cfg.study.sft_recipe), overrides_for(SFT, cfg.study.sft_recipe, sft)) == sft


def _behavior_command(plan: StudyPlan, monkeypatch) -> list[str]:
    """The command the behavior stage runs (the process is not started)."""
    import pear_mega.study.stages as stages

    seen = []

    def fake(cmd, log, env=None, cwd=None):
        seen.append(cmd)
        raise StudyError("not run")

    monkeypatch.setattr(stages, "_run_process", fake)
    with pytest.raises(StudyError, match="not run"):
        plan.stages[0].run([plan.stages[0]], plan.dir / "behavior.log")
    return seen[0]


def test_behavior_stage_collects_the_top_k_only_for_a_kd_arm(tmp_path, monkeypatch):
    plain = StudyPlan(_tiny(tmp_path))
    assert "--top-k" not in _behavior_command(plain, monkeypatch)
    # Without a kd arm the K is not collected, so it does not change the data (nor the hash).
    assert StudyPlan(_tiny(tmp_path, "behavior.kd_top_k=5")).stages[0].hash == plain.stages[0].hash
    kd = StudyPlan(_tiny(tmp_path, "study.arms=[none,kd_token]", "behavior.kd_top_k=5"))
    cmd = _behavior_command(kd, monkeypatch)
    assert cmd[cmd.index("--top-k") + 1] == "5"
    # Data collected without the top-K (or with another K) is not reused for a kd arm.
    assert kd.stages[0].hash != plain.stages[0].hash
    assert StudyPlan(_tiny(tmp_path, "study.arms=[none,kd_token]")).stages[0].hash != kd.stages[0].hash
    assert StudyPlan(_tiny(tmp_path, "study.arms=[none,kd]", "behavior.kd_top_k=5")).stages[0].hash == kd.stages[0].hash


def test_behavior_file_without_top_k_is_refused_for_a_kd_arm(tmp_path, capsys):
    data = tmp_path / "plain.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "1+1"}, {
        "role": "assistant", "content": "2", "token_ids": [17], "logprobs": [-0.1]}]}) + "\n")
    args = ["--recipe", "tiny_study", f"study.out_dir={tmp_path / 'study'}", f"behavior.file={data}"]
    assert study_main([*args, "study.arms=[none,kd]"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bad configuration: behavior.file") and "topk_ids" in err, err
    assert not (tmp_path / "study").exists()


def test_stronger_sft_arm_multiplies_the_steps(tmp_path):
    cfg = _tiny(tmp_path, "study.arms=[none,none_3x]")
    plan = StudyPlan(cfg)
    assert plan.sft_config("none_3x", 0).train.steps == 3 * cfg.sft.train.steps
    assert plan.sft_config("none_3x", 0).pear.level == "none"


def test_skip_resume_and_rerun_only_what_changed(tmp_path):
    cfg = _tiny(tmp_path)
    plan = StudyPlan(cfg)
    first = FakeProcesses(plan, fail_at="rl/token/seed0")
    with pytest.raises(KeyboardInterrupt):
        run_stages(plan, print_fn=_quiet)
    done_before_kill = set(first.ran) - {"rl/token/seed0"}
    assert "rl/none/seed0" in done_before_kill

    # A killed study continues: what finished is skipped, the interrupted stage reruns.
    plan = StudyPlan(cfg)
    second = FakeProcesses(plan)
    status = run_stages(plan, print_fn=_quiet)
    assert second.ran[0] == "rl/token/seed0"
    assert {i for i, s in status.items() if s == "skipped"} == done_before_kill
    assert set(status) == {s.id for s in plan.stages}

    # Nothing left: everything is skipped.
    plan = StudyPlan(cfg)
    third = FakeProcesses(plan)
    run_stages(plan, print_fn=_quiet)
    assert third.ran == []

    # One arm's settings change: only that arm's chains rerun.
    changed = _tiny(tmp_path, 'study.arm_overrides={"token": ["pear.gamma=0.9"]}')
    plan = StudyPlan(changed)
    fourth = FakeProcesses(plan)
    run_stages(plan, print_fn=_quiet)
    assert set(fourth.ran) == {f"{k}/token/seed{s}" for k in ("sft", "eval_pre", "rl", "eval_post", "alignment")
                               for s in (0, 1)}

    # A new seed and a new arm: only their stages run.
    grown = replace(changed, study=replace(changed.study, seeds=(0, 1, 2), arms=("none", "token", "block")))
    plan = StudyPlan(grown)
    fifth = FakeProcesses(plan)
    run_stages(plan, print_fn=_quiet)
    expected = {f"{k}/{a}/seed{s}" for k in ("sft", "eval_pre", "rl", "eval_post", "alignment")
                for a, s in [("block", 0), ("block", 1), ("none", 2), ("token", 2), ("block", 2)]}
    assert set(fifth.ran) == expected


@pytest.mark.parametrize("override", [
    "behavior.temperature=0.7",
    # A first kd arm: the data is collected again, with the top-K, and every arm reruns on the new
    # rows (the arms stay paired on the same data).
    "study.arms=[none,token,kd_token]",
])
def test_a_changed_behavior_setting_reruns_everything_downstream(tmp_path, override):
    cfg = _tiny(tmp_path)
    plan = StudyPlan(cfg)
    FakeProcesses(plan)
    run_stages(plan, print_fn=_quiet)
    plan = StudyPlan(_tiny(tmp_path, override))
    fake = FakeProcesses(plan)
    run_stages(plan, print_fn=_quiet)
    assert set(fake.ran) == {s.id for s in plan.stages}


def test_a_missing_output_reruns_its_stage(tmp_path):
    cfg = _tiny(tmp_path)
    plan = StudyPlan(cfg)
    FakeProcesses(plan)
    run_stages(plan, print_fn=_quiet)
    (plan.run_dir("eval_post", "none", 1) / "results.json").unlink()
    plan = StudyPlan(cfg)
    fake = FakeProcesses(plan)
    run_stages(plan, print_fn=_quiet)
    assert fake.ran == ["eval_post/none/seed1"]


def test_evaluations_of_a_seed_share_one_process(tmp_path):
    plan = StudyPlan(_tiny(tmp_path))
    fake = FakeProcesses(plan)
    run_stages(plan, print_fn=_quiet)
    assert ["eval_pre/none/seed0", "eval_pre/token/seed0"] in fake.batches
    assert ["eval_post/none/seed1", "eval_post/token/seed1"] in fake.batches
    assert all(len(b) == 1 for b in fake.batches if not b[0].startswith("eval"))
    # Every stage of the batch is recorded on its own.
    manifest = Manifest(plan.dir / "manifest.json")
    assert all(manifest.done(s) for s in plan.stages)


def test_until_stops_after_a_kind(tmp_path):
    plan = StudyPlan(_tiny(tmp_path))
    fake = FakeProcesses(plan)
    run_stages(plan, until="eval_pre", print_fn=_quiet)
    assert {i.split("/")[0] for i in fake.ran} == {"behavior", "sft", "eval_pre"}
    with pytest.raises(StudyError, match="--until must be one of"):
        run_stages(plan, until="nope", print_fn=_quiet)


def test_results_pair_runs_by_arm_and_seed(tmp_path):
    plan = StudyPlan(_tiny(tmp_path))
    FakeProcesses(plan)
    run_stages(plan, print_fn=_quiet)
    results = collect_results(plan, {"name": "t"})
    assert [(r["arm"], r["seed"]) for r in results["runs"]] == [("none", 0), ("token", 0), ("none", 1), ("token", 1)]
    assert results["suites"] == ["basic_arithmetic", "shifted:products"]
    run = results["runs"][0]
    assert run["eval"]["pre"]["basic_arithmetic"] == {"n": 2, "correct": [1, 0, 2, 0]}
    assert run["sft_history"] == [{"step": 1, "pear/ess": 0.9}] and run["alignment"] == {}


def test_behavior_rows_get_the_students_prompt():
    from pear_mega.data.prompts import reasoning_gym_prompts

    settings = {"max_digits": 1, "min_digits": 1}
    teacher = reasoning_gym_prompts("products", 3, 5, num_shots=4, **settings)
    rows = [{"messages": [*t["messages"], {"role": "assistant", "content": "Answer: 1", "token_ids": [1],
                                           "logprobs": [-0.5]}], "meta": t["meta"]} for t in teacher]
    out = restrict_to_student_prompt(rows, student_shots=0)
    for row, t in zip(out, teacher):
        assert row["messages"] == [{"role": "user", "content": t["meta"]["question"]}, rows[0]["messages"][-1]]
        assert row["meta"]["behavior_prompt_messages"] == 9
    student = reasoning_gym_prompts("products", 3, 5, num_shots=1, **settings)
    out = restrict_to_student_prompt(rows, student_shots=1)
    assert [r["messages"][:-1] for r in out] == [s["messages"] for s in student]
    rows[1]["meta"] = {**rows[1]["meta"], "question": "something else"}
    with pytest.raises(StudyError, match="behavior row 1"):
        restrict_to_student_prompt(rows, student_shots=0)


@pytest.mark.slow
def test_one_engine_evaluates_each_model_as_a_fresh_engine_would(tmp_path):
    """The evaluations of a seed share one vLLM engine, reloaded per model and reseeded: the same
    model evaluated second draws exactly what it draws first, and another seed draws otherwise."""
    from pear_mega.pretrained import tiny_model
    from pear_mega.study.stages import main as worker

    model = tiny_model(tmp_path / "tiny")
    other = tiny_model(tmp_path / "tiny-other", seed=1)
    suites = {"basic_arithmetic": ["basic_arithmetic", {"max_digits": 1}]}
    common = {"suites": suites, "size": 3, "seed": 11, "num_shots": 0, "n": 2, "ks": [1, 2], "temperature": 1.0,
              "max_tokens": 6, "max_model_len": 256}
    runs = [{**common, "model": str(m), "out": str(tmp_path / name), "engine_seed": s}
            for m, name, s in [(model, "a", 0), (other, "b", 0), (model, "c", 0), (model, "d", 1)]]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"runs": runs}))
    worker(["eval", str(spec)])
    texts = {name: [e["response"] for e in json.loads((tmp_path / name / "results.json").read_text())["suites"][0]
                    ["examples"]] for name in "abcd"}
    assert texts["a"] == texts["c"]
    assert texts["a"] != texts["b"]  # the reload took effect
    assert texts["a"] != texts["d"]  # another seed samples otherwise
