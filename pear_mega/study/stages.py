"""The stages of a study and the runner that skips what is done.

A study directory holds ``manifest.json``: per stage, the hash of its resolved inputs (its own
config plus the hashes of the stages it reads) and the files it wrote. A stage is skipped when
the manifest has its current hash and its outputs exist; otherwise its old outputs are removed
and it runs again, so an interrupted study continues where it stopped, and adding a seed or an
arm — or changing one arm's settings — runs only the stages whose inputs changed.

The chain, per seed and arm (every stage a subprocess through a public entry point, its full
output in ``logs/<stage>.log``)::

    behavior                 tools/collect_logprobs.py generate (πβ: model + k-shot prompt) → rows
                             re-prompted with the student's prompt (demonstrations stripped);
                             with a kd arm also πβ's top-K per answer token (--top-k K)
    sft/<arm>/seed<s>        python -m pear_mega.train_sft --recipe R ... pear.level=<level>
                             (kd arms: ... loss.kind=kd)
    eval_pre/<arm>/seed<s>   pass@k of the SFT model (pear_mega.evaluation, engine seed s)
    rl/<arm>/seed<s>         python -m pear_mega.train_rl --recipe R ... model.hf_path=<SFT model>
    eval_post/<arm>/seed<s>  pass@k of the RL model on the same prompts
    alignment/<arm>/seed<s>  cos(θ_SFT − θ_0, θ_RL − θ_SFT) (pear_mega.study.diagnostics)

Paired design: every arm of a seed reads the same behavior rows in the same pack order
(``data.seed`` depends on the seed only), runs the same GRPO recipe with the same rollout engine
seed, and is evaluated on the same held-out prompts with the same sampling seed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from pear_mega.config_tools import apply_overrides, to_dict
from pear_mega.study.config import StudyConfig, is_pretrained, parse_arm
from pear_mega.study.diagnostics import SFT_KD_KEYS

KINDS = ("behavior", "sft", "eval_pre", "rl", "eval_post", "alignment")
LOG_TAIL_LINES = 25


class StudyError(RuntimeError):
    """A stage failed (its log's tail is in the message) or the study cannot run."""


# ---------------------------------------------------------------------------- the stages
@dataclass
class Stage:
    id: str
    kind: str
    inputs: dict
    """The resolved settings this stage's outputs depend on (hashed with its dependencies' hashes)."""
    outputs: list[Path]
    run: Callable[[list[Stage], Path], None]
    """run(stages, log_path): produce the outputs of ``stages`` (this one, or this one and the
    next stages of its ``group``); raise StudyError on failure."""
    deps: list[str] = field(default_factory=list)
    arm: str | None = None
    seed: int | None = None
    workdirs: list[Path] = field(default_factory=list)
    """Removed before the stage runs (what an interrupted or outdated run left)."""
    group: str = ""
    """Consecutive pending stages of one group run as one process (the evaluations of a seed's
    arms share one engine start: it costs more than the evaluation of a small model)."""
    hash: str = ""


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_diff_overrides(base, target, prefix: str = "") -> list[str]:
    """``dotted.key=value`` strings that turn config ``base`` into ``target`` (leaf fields that differ)."""
    out = []
    for f in dataclasses.fields(target):
        a, b = getattr(base, f.name), getattr(target, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(b):
            out += config_diff_overrides(a, b, key + ".")
        elif a != b:
            out.append(f"{key}={_override_text(b)}")
    return out


def _override_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (tuple, list)):
        return json.dumps(list(value))
    return str(value)


def apply_in_valid_order(config, items: list[str]):
    """Apply ``dotted.key=value`` ``items``, each as soon as it is valid; returns (config, order).

    Each override re-runs the config's validation, so an item valid only together with a later one
    waits for it: a longer response limit for the larger context it needs, ``study.baseline=kd``
    for ``study.arms=[kd,kd_token]``. After every applied item the search restarts at the first
    pending one, so where the given order is valid it is kept (of two values of a key, the last wins).

    Raises:
        ValueError naming the first item that never becomes valid.
    """
    pending, order = list(items), []
    while pending:
        first_error = None
        for item in pending:
            try:
                config = apply_overrides(config, [item])
            except ValueError as exc:
                key = item.split("=", 1)[0]
                first_error = first_error or ValueError(str(exc) if key in str(exc) else f"override {item!r}: {exc}")
                continue
            order.append(item)
            pending.remove(item)
            break
        else:
            raise first_error
    return config, order


def overrides_for(registry, recipe: str, target) -> list[str]:
    """Overrides of ``recipe`` that reproduce ``target`` exactly, in an order every step of which is
    valid (``apply_in_valid_order``). Raises when ``target`` cannot be reached."""
    base = registry.build(recipe)
    current, order = apply_in_valid_order(base, config_diff_overrides(base, target))
    if current != target:
        raise StudyError(f"the {registry.kind} recipe {recipe!r} with overrides does not reproduce the study's config "
                         f"(a field the command line cannot set?): {order}")
    return order


def _run_process(cmd: list[str], log: Path, env: dict | None = None, cwd: Path | None = None) -> None:
    """Run ``cmd`` with its stdout and stderr in ``log``; on failure raise with the log's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(_quote(c) for c in cmd)}\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                              cwd=cwd)
    if proc.returncode != 0:
        lines = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        raise StudyError(f"exit code {proc.returncode}; last lines of {log}:\n" + "\n".join("    " + s for s in lines))


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


class StudyPlan:
    """The stages of a study, in run order (behavior, then per seed: per arm the chain)."""

    def __init__(self, cfg: StudyConfig, out_dir: Path | None = None):
        self.cfg = cfg
        self.dir = Path(out_dir or cfg.out_dir()).resolve()
        self.init_model = self._resolve_model(cfg.sft.model.hf_path, "init")
        self.behavior_model = (self._resolve_model(cfg.behavior.model, "behavior") if cfg.behavior.model
                               else self.init_model)
        self.stages: list[Stage] = []
        self._build()

    # -------------------------------------------------------------- paths
    def _resolve_model(self, spec: str, role: str) -> Path:
        """An HF directory; ``pretrained:NAME`` is made (once) on first use."""
        if not is_pretrained(spec):
            return Path(spec).resolve()
        name = spec.split(":", 1)[1]
        from pear_mega import pretrained

        if name == "tiny":
            return pretrained.tiny_model(self.dir / "models" / f"tiny-{role}").resolve()
        return getattr(pretrained, name)().resolve()

    def behavior_file(self) -> Path:
        return self.dir / "data" / "behavior.jsonl"

    def sft_model(self, arm: str, seed: int) -> Path:
        return self.dir / "models" / "sft" / arm / f"seed{seed}"

    def rl_model(self, arm: str, seed: int) -> Path:
        return self.dir / "models" / "rl" / arm / f"seed{seed}"

    def run_dir(self, kind: str, arm: str, seed: int) -> Path:
        return self.dir / "runs" / kind / arm / f"seed{seed}"

    # -------------------------------------------------------------- configs
    def sft_config(self, arm_name: str, seed: int):
        """The arm's SFTConfig: the study's ``sft`` with the arm's loss, level, steps and data order."""
        cfg = parse_arm(arm_name).sft_config(self.cfg.sft)
        run = self.run_dir("sft", arm_name, seed)
        out = replace(
            cfg, name=f"{self.cfg.study.name}_sft_{arm_name}_seed{seed}",
            model=replace(cfg.model, hf_path=str(self.init_model)),
            data=replace(cfg.data, train_files=(str(self.behavior_file()),), seed=cfg.data.seed + seed),
            checkpoint=replace(cfg.checkpoint, dir=str(run / "ckpt"), save_interval=0, resume=False,
                               export_hf=str(self.sft_model(arm_name, seed))),
            logging=replace(cfg.logging, tensorboard_dir=str(run / "tb"), progress_bar=False),
        )
        overrides = self.cfg.study.arm_override_map().get(arm_name, [])
        return apply_overrides(out, overrides)

    def rl_config(self, arm_name: str, seed: int):
        """The identical GRPO run from the arm's SFT model (only the start point differs between arms)."""
        cfg = self.cfg.rl
        run = self.run_dir("rl", arm_name, seed)
        return replace(
            cfg, name=f"{self.cfg.study.name}_rl_{arm_name}_seed{seed}",
            model=replace(cfg.model, hf_path=str(self.sft_model(arm_name, seed))),
            rollout=replace(cfg.rollout, engine=replace(cfg.rollout.engine, seed=cfg.rollout.engine.seed + seed)),
            checkpoint=replace(cfg.checkpoint, dir="", save_interval=0, resume=False,
                               export_hf=str(self.rl_model(arm_name, seed))),
            logging=replace(cfg.logging, tensorboard_dir=str(run / "tb"), progress_bar=False),
        )

    def eval_spec(self, model: Path, seed: int, out: Path) -> dict:
        e = self.cfg.eval
        return {"model": str(model), "out": str(out), "suites": {k: list(v) for k, v in self.cfg.suites().items()},
                "size": e.size, "seed": e.seed, "num_shots": self.cfg.student_shots, "n": e.n, "ks": list(e.ks),
                "temperature": e.temperature, "max_tokens": e.max_tokens, "engine_seed": seed,
                "max_model_len": self.cfg.rl.rollout.engine.max_model_len}

    # -------------------------------------------------------------- the plan
    def _build(self) -> None:
        cfg = self.cfg
        b = cfg.behavior
        # kd_top_k enters the hash as "top_k" and only when it is collected: without a kd arm the
        # data is the same whatever its value (and the studies from before the kd arms keep their
        # hashes); with one, data collected without the top-K is never reused.
        behavior = {k: v for k, v in to_dict(b).items() if k != "kd_top_k"}
        behavior_inputs = {"behavior": behavior, "model": str(self.behavior_model), "task": cfg.task,
                           "task_config": cfg.rl.task.task_settings(), "student_shots": cfg.student_shots}
        if b.file:
            behavior_inputs["file_sha256"] = hashlib.sha256(Path(b.file).read_bytes()).hexdigest()
        elif cfg.teacher_top_k:
            behavior_inputs["top_k"] = cfg.teacher_top_k
        self._add(Stage("behavior", "behavior", behavior_inputs,
                        [self.behavior_file(), self.behavior_file().with_suffix(".json")], self._run_behavior,
                        workdirs=[self.behavior_file().with_name("behavior_teacher_prompt.jsonl")]))
        # Per seed, kind by kind over the arms: the evaluations of a seed's arms run back to back
        # (one engine, see Stage.group); a seed's chains are complete when its last stage is.
        for seed in cfg.study.seeds:
            for kind in KINDS[1:]:
                for arm in cfg.study.arms:
                    self._add_stage(kind, arm, seed)

    def _add_stage(self, kind: str, arm: str, seed: int) -> None:
        cfg, tag = self.cfg, f"{arm}/seed{seed}"
        sft_model, rl_model = self.sft_model(arm, seed), self.rl_model(arm, seed)
        if kind == "sft":
            sft, run_dir = self.sft_config(arm, seed), self.run_dir("sft", arm, seed)
            self._add(Stage(f"sft/{tag}", "sft", {"config": to_dict(sft), "recipe": cfg.study.sft_recipe},
                            [sft_model / "config.json", run_dir / "metrics.jsonl"], self._sft_runner(sft, arm, seed),
                            ["behavior"], arm, seed, workdirs=[sft_model, run_dir]))
        elif kind == "rl":
            rl, run_dir = self.rl_config(arm, seed), self.run_dir("rl", arm, seed)
            self._add(Stage(f"rl/{tag}", "rl", {"config": to_dict(rl), "recipe": cfg.study.rl_recipe},
                            [rl_model / "config.json", run_dir / "metrics.jsonl"], self._rl_runner(rl, arm, seed),
                            [f"sft/{tag}"], arm, seed, workdirs=[rl_model, run_dir]))
        elif kind in ("eval_pre", "eval_post"):
            model, dep = (sft_model, f"sft/{tag}") if kind == "eval_pre" else (rl_model, f"rl/{tag}")
            out = self.run_dir(kind, arm, seed)
            self._add(Stage(f"{kind}/{tag}", kind, self.eval_spec(model, seed, out), [out / "results.json"],
                            self._run_eval, [dep], arm, seed, workdirs=[out], group=f"{kind}/seed{seed}"))
        elif kind == "alignment" and cfg.study.alignment:
            out = self.run_dir("alignment", arm, seed) / "alignment.json"
            self._add(Stage(f"alignment/{tag}", "alignment", {"init": str(self.init_model)}, [out],
                            self._alignment_runner(arm, seed, out), [f"sft/{tag}", f"rl/{tag}"], arm, seed,
                            workdirs=[out.parent]))

    def _add(self, stage: Stage) -> None:
        known = {s.id: s for s in self.stages}
        stage.hash = _hash({"kind": stage.kind, "inputs": stage.inputs, "deps": [known[d].hash for d in stage.deps]})
        self.stages.append(stage)

    def config_hash(self) -> str:
        return _hash([s.hash for s in self.stages])

    # -------------------------------------------------------------- runners
    def _run_behavior(self, stages: list[Stage], log: Path) -> None:
        cfg, b = self.cfg, self.cfg.behavior
        out = self.behavior_file()
        out.parent.mkdir(parents=True, exist_ok=True)
        record = {"behavior": to_dict(b), "model": str(self.behavior_model), "task": cfg.task,
                  "student_shots": cfg.student_shots}
        if b.file:
            shutil.copyfile(b.file, out)
        else:
            raw = out.with_name("behavior_teacher_prompt.jsonl")
            cmd = [sys.executable, str(_repo_root() / "tools" / "collect_logprobs.py"), "generate",
                   "--model", str(self.behavior_model), "--out", str(raw), "--reasoning-gym", cfg.task,
                   "--size", str(b.prompts), "--task-seed", str(b.task_seed), "--task-config", cfg.rl.task.task_config,
                   "--shots", str(b.shots), "-n", str(b.n), "--temperature", str(b.temperature),
                   "--top-p", str(b.top_p), "--max-tokens", str(b.max_tokens), "--seed", str(b.engine_seed),
                   "--max-model-len", str(cfg.rl.rollout.engine.max_model_len)]
            if cfg.rl.rollout.engine.kv_cache_gib is not None:  # None: the collector's own default
                cmd += ["--cpu-kv-cache-gib", str(cfg.rl.rollout.engine.kv_cache_gib)]
            if b.system:
                cmd += ["--system", b.system]
            if cfg.teacher_top_k:  # the kd arms' targets, kept through restrict_to_student_prompt
                cmd += ["--top-k", str(cfg.teacher_top_k)]
            _run_process(cmd, log, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
            from pear_mega.data import read_rows, write_jsonl

            rows = restrict_to_student_prompt(list(read_rows(str(raw))), cfg.student_shots)
            write_jsonl(str(out), rows)
            record["rows"] = len(rows)
            record["collect"] = log.read_text(errors="replace").strip().splitlines()[-1]
        out.with_suffix(".json").write_text(json.dumps(record, indent=2))

    def _launcher(self) -> list[str]:
        """``python -m`` (one process) or ``torchrun --standalone --nproc-per-node N -m``."""
        n = self.cfg.study.nproc_per_node
        if n == 1:
            return [sys.executable, "-m"]
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m"]

    def _sft_runner(self, sft, arm: str, seed: int):
        def run(stages: list[Stage], log: Path) -> None:
            from pear_mega.sft.recipes import RECIPES

            overrides = overrides_for(RECIPES, self.cfg.study.sft_recipe, sft)
            metrics = self.run_dir("sft", arm, seed) / "metrics.jsonl"
            _run_process([*self._launcher(), "pear_mega.train_sft", "--recipe", self.cfg.study.sft_recipe,
                          "--metrics-out", str(metrics), *overrides], log, cwd=_repo_root())
            if not self.cfg.study.keep_sft_checkpoints:
                shutil.rmtree(sft.checkpoint.dir, ignore_errors=True)
        return run

    def _rl_runner(self, rl, arm: str, seed: int):
        def run(stages: list[Stage], log: Path) -> None:
            from pear_mega.rl.recipes import RECIPES

            overrides = overrides_for(RECIPES, self.cfg.study.rl_recipe, rl)
            metrics = self.run_dir("rl", arm, seed) / "metrics.jsonl"
            _run_process([*self._launcher(), "pear_mega.train_rl", "--recipe", self.cfg.study.rl_recipe,
                          "--metrics-out", str(metrics), *overrides], log, cwd=_repo_root())
        return run

    def _run_eval(self, stages: list[Stage], log: Path) -> None:
        """pass@k of the stages' models in one process (one engine, reloaded per model)."""
        for stage in stages:
            Path(stage.inputs["out"]).mkdir(parents=True, exist_ok=True)
        spec = Path(stages[0].inputs["out"]) / "spec.json"
        spec.write_text(json.dumps({"runs": [stage.inputs for stage in stages]}, indent=2))
        _run_process([sys.executable, "-m", "pear_mega.study.stages", "eval", str(spec)], log,
                     env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})

    def _alignment_runner(self, arm: str, seed: int, out: Path):
        def run(stages: list[Stage], log: Path) -> None:
            out.parent.mkdir(parents=True, exist_ok=True)
            spec = out.with_name("spec.json")
            spec.write_text(json.dumps({"init": str(self.init_model), "sft": str(self.sft_model(arm, seed)),
                                        "rl": str(self.rl_model(arm, seed)), "out": str(out)}, indent=2))
            _run_process([sys.executable, "-m", "pear_mega.study.stages", "alignment", str(spec)], log)
        return run


def restrict_to_student_prompt(rows: list[dict], student_shots: int) -> list[dict]:
    """Give each behavior row the student's prompt: the same question with ``student_shots``
    demonstrations (drawn exactly as ``pear_mega.data.prompts`` draws them for RL and evaluation)
    and no system message. The answer, its token ids and πβ log-probs are kept as they are."""
    from pear_mega.data.prompts import reasoning_gym_prompts

    cache: dict[tuple, dict[int, dict]] = {}
    out = []
    for i, row in enumerate(rows):
        meta = row.get("meta") or {}
        try:
            key = (meta["task"], meta["seed"], json.dumps(meta["config"], sort_keys=True))
            index = int(meta["index"])
        except (KeyError, TypeError, ValueError):
            raise StudyError(f"behavior row {i}: meta lacks the reasoning-gym task/seed/config/index") from None
        if key not in cache:
            size = 1 + max(int(r["meta"]["index"]) for r in rows if (r["meta"]["task"], r["meta"]["seed"]) == key[:2])
            items = reasoning_gym_prompts(key[0], size, key[1], num_shots=student_shots, **meta["config"])
            cache[key] = {item["meta"]["index"]: item for item in items}
        item = cache[key][index]
        if item["meta"]["question"] != meta.get("question"):
            raise StudyError(f"behavior row {i}: its question is not item {index} of {key[0]} (seed {key[1]})")
        answer = row["messages"][-1]
        if answer["role"] != "assistant":
            raise StudyError(f"behavior row {i}: the last message is not the sampled answer")
        out.append({**row, "messages": [*item["messages"], answer],
                    "meta": {**meta, "behavior_prompt_messages": len(row["messages"]) - 1}})
    return out


# ---------------------------------------------------------------------------- the runner
class Manifest:
    """``manifest.json``: stage id → {hash, outputs, seconds, finished}; written atomically."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {"stages": {}}

    def done(self, stage: Stage) -> bool:
        entry = self.data["stages"].get(stage.id)
        return bool(entry) and entry["hash"] == stage.hash and all(p.exists() for p in stage.outputs)

    def record(self, stage: Stage, seconds: float) -> None:
        self.data["stages"][stage.id] = {"hash": stage.hash, "kind": stage.kind,
                                         "outputs": [str(p) for p in stage.outputs], "seconds": round(seconds, 2),
                                         "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.save()

    def forget(self, stage: Stage) -> None:
        if self.data["stages"].pop(stage.id, None) is not None:
            self.save()

    def seconds(self, stage_id: str) -> float | None:
        entry = self.data["stages"].get(stage_id)
        return entry["seconds"] if entry else None

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, sort_keys=True))
        os.replace(tmp, self.path)


@contextlib.contextmanager
def study_lock(directory: Path):
    """One study process per directory (a second one would overwrite the first one's outputs)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StudyError(f"another study is running in {directory}") from None
        yield


def _fmt(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def _clear_outputs(stage: Stage) -> None:
    """Remove what an earlier (other-hash or interrupted) run of the stage left."""
    for path in [*stage.outputs, *stage.workdirs]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def run_stages(plan: StudyPlan, *, until: str | None = None, seeds: tuple[int, ...] | None = None,
               estimates: dict[str, float] | None = None, print_fn=print,
               on_seed_done: Callable[[int], None] | None = None, live: bool = False) -> dict[str, str]:
    """Run (or skip) every stage in order. Returns stage id → 'ran' | 'skipped'.

    Args:
        until: stop after this stage kind (e.g. 'eval_pre' for a probe).
        seeds: only these seeds' chains (default: all).
        estimates: seconds per stage kind for the ETA before a stage of that kind has run.
        on_seed_done: called after the last stage of each seed (e.g. to refresh the report).
        live: also print a "running" line before each stage (``print_fn`` must accept ``end``).
    """
    if until is not None and until not in KINDS:
        raise StudyError(f"--until must be one of {KINDS}, got {until!r}")
    kinds = KINDS[:KINDS.index(until) + 1] if until else KINDS
    stages = [s for s in plan.stages if s.kind in kinds and (seeds is None or s.seed is None or s.seed in seeds)]
    manifest = Manifest(plan.dir / "manifest.json")
    measured: dict[str, list[float]] = {}
    for s in stages:  # durations of earlier runs of this study inform the ETA
        seconds = manifest.seconds(s.id)
        if seconds is not None:
            measured.setdefault(s.kind, []).append(seconds)
    start = time.perf_counter()
    status: dict[str, str] = {}
    width = max(len(s.id) for s in stages)

    def eta(rest: list[Stage]) -> float | None:
        total = 0.0
        for s in rest:
            if manifest.done(s):
                continue
            times = measured.get(s.kind)
            guess = sum(times) / len(times) if times else (estimates or {}).get(s.kind)
            if guess is None:
                return None
            total += guess
        return total

    digits = len(str(len(stages)))
    i = 0
    while i < len(stages):
        stage = stages[i]
        if manifest.done(stage):
            batch = [stage]
            status[stage.id] = "skipped"
            print_fn(f"[{i + 1:>{digits}}/{len(stages)}] {stage.id:<{width}}  skipped (done)  "
                     f"| elapsed {_fmt(time.perf_counter() - start)} | ETA {_fmt(eta(stages[i + 1:]))}")
        else:
            batch = [stage]
            while (stage.group and i + len(batch) < len(stages) and stages[i + len(batch)].group == stage.group
                   and not manifest.done(stages[i + len(batch)])):
                batch.append(stages[i + len(batch)])
            for s in batch:
                manifest.forget(s)
                _clear_outputs(s)
            log = plan.dir / "logs" / f"{(stage.group if len(batch) > 1 else stage.id).replace('/', '__')}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text("")
            if live:  # a terminal: say what runs now; the stage's own line overwrites this one
                print_fn(f"[{i + 1:>{digits}}/{len(stages)}] {stage.id:<{width}}  running ... "
                         f"| elapsed {_fmt(time.perf_counter() - start)} | ETA {_fmt(eta(stages[i:]))}", end="\r")
            t0 = time.perf_counter()
            try:
                stage.run(batch, log)
            except StudyError as exc:
                print_fn(f"[{i + 1:>{digits}}/{len(stages)}] {stage.id:<{width}}  FAILED after "
                         f"{_fmt(time.perf_counter() - t0)}: {exc}")
                raise StudyError(f"stage {stage.id} failed; full log: {log}") from exc
            seconds = time.perf_counter() - t0
            for j, s in enumerate(batch):
                missing = [str(p) for p in s.outputs if not p.exists()]
                if missing:
                    raise StudyError(f"stage {s.id} finished without writing {missing}; log: {log}")
                manifest.record(s, seconds / len(batch))
                measured.setdefault(s.kind, []).append(seconds / len(batch))
                status[s.id] = "ran"
                took = f"done in {_fmt(seconds):>5}" if j == 0 else "done (same process)"
                print_fn(f"[{i + j + 1:>{digits}}/{len(stages)}] {s.id:<{width}}  {took:<19} "
                         f"| elapsed {_fmt(time.perf_counter() - start)} | ETA {_fmt(eta(stages[i + j + 1:]))}")
        i += len(batch)
        last = batch[-1]
        if last.seed is not None and on_seed_done is not None and all(s.seed != last.seed for s in stages[i:]):
            on_seed_done(last.seed)
    return status


# ---------------------------------------------------------------------------- results
def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _eval_results(path: Path) -> dict:
    data = json.loads(path.read_text())
    return {s["name"]: {"n": s["n"], "correct": s["correct_counts"]} for s in data["suites"]}


def collect_results(plan: StudyPlan, study_meta: dict, probe: dict | None = None) -> dict:
    """The ``results`` dict of ``pear_mega.study.report.write_report`` from the finished stages:
    every (arm, seed) whose post-RL evaluation exists is a run."""
    cfg = plan.cfg
    manifest = Manifest(plan.dir / "manifest.json")
    by_id = {s.id: s for s in plan.stages}
    runs = []
    for seed in cfg.study.seeds:
        for arm in cfg.study.arms:
            tag = f"{arm}/seed{seed}"
            if not all(manifest.done(by_id[f"{k}/{tag}"]) for k in ("eval_pre", "eval_post")):
                continue
            align = by_id.get(f"alignment/{tag}")
            runs.append({
                "arm": arm, "seed": seed,
                "eval": {"pre": _eval_results(plan.run_dir("eval_pre", arm, seed) / "results.json"),
                         "post": _eval_results(plan.run_dir("eval_post", arm, seed) / "results.json")},
                "sft_history": _read_jsonl(plan.run_dir("sft", arm, seed) / "metrics.jsonl"),
                "rl_history": _read_jsonl(plan.run_dir("rl", arm, seed) / "metrics.jsonl"),
                "alignment": (json.loads(align.outputs[0].read_text()) if align is not None and manifest.done(align)
                              else None),
            })
    return {"study": study_meta, "arms": list(cfg.study.arms), "baseline": cfg.study.baseline_arm,
            "seeds": list(cfg.study.seeds), "ks": list(cfg.eval.ks), "suites": list(cfg.suites()),
            "probe": probe, "runs": runs}


def probe_summary(plan: StudyPlan) -> dict:
    """The numbers that say whether a setting is worth a study: how far πβ is from πθ (PEAR weight
    statistics over the SFT run) and the headroom RL has (pre-RL pass@k), for the first seed."""
    cfg = plan.cfg
    seed = cfg.study.seeds[0]
    out: dict = {"config_hash": plan.config_hash(), "seed": seed}
    meta = plan.behavior_file().with_suffix(".json")
    if meta.is_file():
        out["behavior"] = json.loads(meta.read_text())
    pear_keys = ("pear/ess", "pear/weight_mean", "pear/weight_min", "pear/weight_max", "pear/clip_low_frac",
                 "pear/clip_high_frac", "pear/delta_clip_frac", "train/nll", "train/loss")
    for arm in cfg.study.arms:
        hist = _read_jsonl(plan.run_dir("sft", arm, seed) / "metrics.jsonl")
        entry: dict = {}
        if hist:
            keys = (*pear_keys, *SFT_KD_KEYS) if parse_arm(arm).loss == "kd" else pear_keys
            entry["sft_first"] = {k: hist[0].get(k) for k in keys}
            entry["sft_last"] = {k: hist[-1].get(k) for k in keys}
            entry["sft_mean"] = {k: sum(h.get(k, 0.0) for h in hist) / len(hist) for k in keys}
        pre = plan.run_dir("eval_pre", arm, seed) / "results.json"
        if pre.is_file():
            entry["pre_rl"] = {s["name"]: {"pass_at_k": s["pass_at_k"], "extract_fail_frac": s["extract_fail_frac"]}
                               for s in json.loads(pre.read_text())["suites"]}
        out[arm] = entry
    return out


# ---------------------------------------------------------------------------- subprocess workers
def _eval_worker(spec_path: str) -> None:
    """pass@k of each model of the spec on the study's suites (``pear_mega.evaluation``), each
    written to its ``out``/results.json. One engine: built on the first model, reloaded in place
    with the next one's weights; the sampler is reseeded with the run's ``engine_seed`` before each
    model, so every model of a seed draws the same random numbers (as a fresh engine would)."""
    import torch

    from pear_mega.evaluation import evaluate_suites, reasoning_gym_suite, results_table, write_results
    from pear_mega.models.checkpoint import SafetensorsReader
    from pear_mega.engine import EngineConfig, RolloutEngine

    runs = json.loads(Path(spec_path).read_text())["runs"]
    shared = ("suites", "size", "seed", "num_shots", "max_model_len")
    for run in runs[1:]:
        if any(run[k] != runs[0][k] for k in shared):
            raise ValueError(f"{spec_path}: runs evaluated by one engine must share {shared}")
    first = runs[0]
    suites = []
    for name, (task, settings) in first["suites"].items():
        suite = reasoning_gym_suite(task, first["size"], first["seed"], first["num_shots"], settings)
        suite.name = name
        suites.append(suite)
    engine = RolloutEngine(EngineConfig(model=first["model"], max_model_len=first["max_model_len"],
                                        seed=first["engine_seed"]))
    try:
        for i, run in enumerate(runs):
            if i:
                reader = SafetensorsReader(run["model"])
                engine.update_weights((name, reader.get(name)) for name in reader.names())
            torch.manual_seed(run["engine_seed"])
            start = time.perf_counter()
            results = evaluate_suites(engine, suites, n=run["n"], ks=run["ks"], temperature=run["temperature"],
                                      max_tokens=run["max_tokens"])
            write_results(results, run["out"], {**run, "seconds": time.perf_counter() - start})
            print(f"{run['model']}:\n{results_table(results)}", flush=True)
    finally:
        engine.close()


def _alignment_worker(spec_path: str) -> None:
    from pear_mega.study.diagnostics import update_alignment

    spec = json.loads(Path(spec_path).read_text())
    result = update_alignment(spec["init"], spec["sft"], spec["rl"])
    Path(spec["out"]).write_text(json.dumps(result, indent=2))
    print(json.dumps(result), flush=True)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    workers = {"eval": _eval_worker, "alignment": _alignment_worker}
    if len(argv) != 2 or argv[0] not in workers:
        raise SystemExit(f"usage: python -m pear_mega.study.stages {{{','.join(workers)}}} SPEC.json")
    workers[argv[0]](argv[1])


if __name__ == "__main__":
    main()
