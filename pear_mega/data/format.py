"""The on-disk format of offline data with behavior log-probs, and its validation.

Files are local ``.jsonl`` / ``.json`` (one JSON object per line, or one JSON array) or
``.parquet`` — files HF ``datasets`` loads as they are (``read_rows`` says how we read them). A row is either a chat conversation or a prompt/response pair:

    {"messages": [{"role": "system", "content": "..."},            # optional
                  {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "...",
                   "token_ids": [int, ...],                         # what πβ produced / scored
                   "logprobs": [float, ...]}],                      # log πβ(token_ids[k] | ...)
     "meta": {...}}                                                 # optional, free-form

    {"prompt": "...", "response": "...",
     "response_token_ids": [int, ...], "behavior_logprobs": [float, ...],
     "system": "...",                                               # optional
     "meta": {...}}

A prompt/response row is the conversation ``[system?], user: prompt, assistant: response`` whose
assistant message carries ``response_token_ids`` / ``behavior_logprobs``.

Teacher top-K (for distillation, ``tools/collect_logprobs.py --top-k K``), optional on a trained
message: ``"topk_ids": [[int, ...], ...]`` and ``"topk_logprobs": [[float, ...], ...]`` (prompt/
response rows: ``response_topk_ids`` / ``response_topk_logprobs``), one list per token of
``token_ids`` holding the teacher's most likely next tokens at that position and their log-probs.
A position may hold fewer than K entries (tokens masked by the sampling's top-p / top-k are left
out); ids are unique within a position, log-probs finite and <= 0, and their probabilities sum to
at most 1 + ``TOPK_MASS_TOLERANCE``.

Loss spans: every assistant message carrying ``token_ids`` *and* ``logprobs`` is trained on; an
assistant message with neither is context (e.g. a few-shot demonstration); one with only one of
the two is an error. ``token_ids`` are the behavior model's own tokens of the assistant content —
the tokens that are trained — and ``logprobs[k] = log πβ(token_ids[k] | conversation so far)``
under the distribution the token was actually sampled from (after temperature / top-p). When the
behavior model ended its turn itself, ``token_ids`` ends with the end-of-turn token (e.g.
``<|im_end|>``, which vLLM returns when it stops on it) and that token is trained too; the
``content`` string never contains it. See ``pear_mega.data.tokenize`` for the alignment rules.

Every problem is a ``DataError`` naming file, row (0-based) and field. NaN / ±Infinity (JSON
literals, or nulls in a list) are reported as non-finite log-probs.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
# A log-probability a hair above 0 is fp rounding of log(1); anything larger is not a log-prob.
MAX_LOGPROB = 1e-3
# Log-probs are trained in float32 (packs store them so): a value beyond float32's range is finite
# in Python but -inf once packed, so it is refused here, where the file and row are known.
FLOAT32_MAX = 3.4028234663852886e38
# Σ exp over a position's stored top-K: above 1 only by the rounding of the engine's log-softmax.
TOPK_MASS_TOLERANCE = 1e-3


class DataError(ValueError):
    """A bad row. ``reason`` is a short key used to count skipped rows (``skip_bad_rows``)."""

    def __init__(self, file: str, row: int | None, field: str | None, message: str, reason: str):
        self.file, self.row, self.field, self.reason = file, row, field, reason
        where = str(file)
        if row is not None:
            where += f": row {row}"
        if field is not None:
            where += f": field '{field}'"
        super().__init__(f"{where}: {message}")


@dataclass
class LossSpan:
    """One trained assistant message: its behavior tokens and their log πβ."""

    message_index: int
    token_ids: list[int]
    logprobs: list[float]
    ids_field: str
    """Field name for error messages, e.g. ``messages[3].token_ids`` or ``response_token_ids``."""
    logprobs_field: str
    topk_ids: list[list[int]] | None = None
    """Teacher top-K ids per token (variable length per position), or None when not stored."""
    topk_logprobs: list[list[float]] | None = None
    topk_ids_field: str | None = None
    """Field name of ``topk_ids`` for error messages (``messages[3].topk_ids``, ``response_topk_ids``)."""


@dataclass
class Conversation:
    """A parsed row: chat messages (role/content only) and the loss spans among them."""

    file: str
    row: int
    messages: list[dict[str, str]]
    spans: list[LossSpan] = field(default_factory=list)
    prompt_response: bool = False
    """True when the row was a prompt/response row (the fields it writes back differ)."""

    def error(self, field: str | None, message: str, reason: str) -> DataError:
        return DataError(self.file, self.row, field, message, reason)

    def content_field(self, message_index: int) -> str:
        if self.prompt_response:
            return "response" if self.messages[message_index]["role"] == "assistant" else "prompt"
        return f"messages[{message_index}].content"


def _present(row: dict, key: str) -> bool:
    return key in row and row[key] is not None


def _check_ids(ids: Any, conv: Conversation, name: str) -> list[int]:
    if not isinstance(ids, (list, tuple)):
        raise conv.error(name, f"must be a list of token ids, got {type(ids).__name__}", "invalid_value")
    if len(ids) == 0:
        raise conv.error(name, "is empty (an assistant span needs at least one token)", "invalid_value")
    out = []
    for k, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise conv.error(name, f"element {k} is {t!r}, not a non-negative integer token id", "invalid_value")
        out.append(int(t))
    return out


def _check_logprobs(lps: Any, n: int, conv: Conversation, name: str, ids_name: str) -> list[float]:
    if not isinstance(lps, (list, tuple)):
        raise conv.error(name, f"must be a list of floats, got {type(lps).__name__}", "invalid_value")
    if len(lps) != n:
        raise conv.error(name, f"has {len(lps)} values but '{ids_name}' has {n} tokens", "length_mismatch")
    out = []
    for k, v in enumerate(lps):
        if v is None or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            shown = "null" if v is None else repr(v)
            raise conv.error(name, f"element {k} is {shown}: log-probs must be finite", "non_finite_logprobs")
        if abs(v) > FLOAT32_MAX:
            raise conv.error(name, f"element {k} is {v!r}: outside float32's range (|x| <= {FLOAT32_MAX:.4g}), "
                             "where log-probs are trained", "non_finite_logprobs")
        if v > MAX_LOGPROB:
            raise conv.error(name, f"element {k} is {v} > 0: not a log-probability", "invalid_value")
        out.append(float(v))
    return out


def _check_text(value: Any, conv: Conversation, name: str) -> str:
    if not isinstance(value, str):
        got = "missing" if value is None else f"a {type(value).__name__}"
        raise conv.error(name, f"must be a string, got {got}", "missing_field" if value is None else "invalid_value")
    return value


def parse_row(row: dict, file: str, index: int, *, require_logprobs: bool = True) -> Conversation:
    """Validate one row and return its ``Conversation``.

    Args:
        row: the row as read (``None`` values count as absent: Arrow fills missing keys so).
        require_logprobs: False for rows that are still to be scored (``collect score``): token ids
            and log-probs are then ignored if present and no loss span is required.
    Raises:
        DataError naming file, row and field.
    """
    conv = Conversation(file=str(file), row=index, messages=[])
    if isinstance(row, _BadLine):
        raise row.error
    if not isinstance(row, dict):
        raise conv.error(None, f"a row must be a JSON object, got {type(row).__name__}", "invalid_value")
    if _present(row, "messages"):
        _parse_chat(row, conv, require_logprobs)
    elif _present(row, "prompt") or _present(row, "response"):
        _parse_prompt_response(row, conv, require_logprobs)
    else:
        raise conv.error("messages", "missing: a row needs 'messages' or 'prompt' + 'response'", "missing_field")
    if require_logprobs and not conv.spans:
        where = "response_token_ids" if conv.prompt_response else "messages"
        raise conv.error(where, "no assistant message carries 'token_ids' and 'logprobs': nothing to train on",
                         "missing_field")
    return conv


def _parse_chat(row: dict, conv: Conversation, require_logprobs: bool) -> None:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise conv.error("messages", "must be a non-empty list of {role, content} objects", "invalid_value")
    for i, m in enumerate(messages):
        name = f"messages[{i}]"
        if not isinstance(m, dict):
            raise conv.error(name, f"must be an object, got {type(m).__name__}", "invalid_value")
        role = m.get("role")
        if role not in ROLES:
            reason = "missing_field" if role is None else "invalid_value"
            raise conv.error(f"{name}.role", f"must be one of {ROLES}, got {role!r}", reason)
        content = _check_text(m.get("content"), conv, f"{name}.content")
        conv.messages.append({"role": role, "content": content})
        if not require_logprobs:
            continue
        has_ids, has_lps = _present(m, "token_ids"), _present(m, "logprobs")
        if not (has_ids or has_lps):
            for key in ("topk_ids", "topk_logprobs"):
                if _present(m, key):
                    raise conv.error(f"{name}.{key}", "only trained messages (with token_ids and logprobs) carry a "
                                     "teacher top-K", "invalid_value")
            continue
        if role != "assistant":
            raise conv.error(f"{name}.token_ids", f"only assistant messages carry token_ids/logprobs, "
                             f"this one has role {role!r}", "invalid_value")
        if not has_ids:
            raise conv.error(f"{name}.token_ids", "missing (the message has 'logprobs')", "missing_field")
        if not has_lps:
            raise conv.error(f"{name}.logprobs", "missing (the message has 'token_ids')", "missing_field")
        ids = _check_ids(m["token_ids"], conv, f"{name}.token_ids")
        lps = _check_logprobs(m["logprobs"], len(ids), conv, f"{name}.logprobs", f"{name}.token_ids")
        conv.spans.append(LossSpan(i, ids, lps, f"{name}.token_ids", f"{name}.logprobs",
                                   *_parse_topk(m, conv, len(ids), f"{name}.", "topk_ids", "topk_logprobs")))


def _parse_prompt_response(row: dict, conv: Conversation, require_logprobs: bool) -> None:
    conv.prompt_response = True
    prompt = _check_text(row.get("prompt"), conv, "prompt")
    response = _check_text(row.get("response"), conv, "response")
    if _present(row, "system"):
        conv.messages.append({"role": "system", "content": _check_text(row["system"], conv, "system")})
    conv.messages.append({"role": "user", "content": prompt})
    conv.messages.append({"role": "assistant", "content": response})
    if not require_logprobs:
        return
    for key in ("response_token_ids", "behavior_logprobs"):
        if not _present(row, key):
            raise conv.error(key, "missing", "missing_field")
    ids = _check_ids(row["response_token_ids"], conv, "response_token_ids")
    lps = _check_logprobs(row["behavior_logprobs"], len(ids), conv, "behavior_logprobs", "response_token_ids")
    conv.spans.append(LossSpan(len(conv.messages) - 1, ids, lps, "response_token_ids", "behavior_logprobs",
                               *_parse_topk(row, conv, len(ids), "", "response_topk_ids", "response_topk_logprobs")))


def _parse_topk(obj: dict, conv: Conversation, n: int, prefix: str, ids_key: str, lps_key: str) -> tuple:
    """``(topk_ids, topk_logprobs, ids field name)`` of a trained span, all None when not stored."""
    ids_name, lps_name = prefix + ids_key, prefix + lps_key
    has_ids, has_lps = _present(obj, ids_key), _present(obj, lps_key)
    if not (has_ids or has_lps):
        return None, None, None
    if not has_ids:
        raise conv.error(ids_name, f"missing (the span has '{lps_name}')", "missing_field")
    if not has_lps:
        raise conv.error(lps_name, f"missing (the span has '{ids_name}')", "missing_field")
    all_ids, all_lps = obj[ids_key], obj[lps_key]
    for name, value in ((ids_name, all_ids), (lps_name, all_lps)):
        if not isinstance(value, (list, tuple)):
            raise conv.error(name, f"must be a list with one list per token, got {type(value).__name__}",
                             "invalid_value")
        if len(value) != n:
            raise conv.error(name, f"has {len(value)} positions but the span has {n} tokens", "length_mismatch")
    out_ids, out_lps = [], []
    for k, (ids, lps) in enumerate(zip(all_ids, all_lps)):
        where_ids, where_lps = f"{ids_name}[{k}]", f"{lps_name}[{k}]"
        if not isinstance(ids, (list, tuple)) or not isinstance(lps, (list, tuple)):
            bad = where_ids if not isinstance(ids, (list, tuple)) else where_lps
            raise conv.error(bad, "must be a list (the top-K of one position)", "invalid_value")
        if len(ids) != len(lps):
            raise conv.error(where_lps, f"has {len(lps)} values but '{where_ids}' has {len(ids)} ids",
                             "length_mismatch")
        for j, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise conv.error(where_ids, f"element {j} is {t!r}, not a non-negative integer token id",
                                 "invalid_value")
        if len(set(ids)) != len(ids):
            dup = next(t for t in ids if ids.count(t) > 1)
            raise conv.error(where_ids, f"holds token id {dup} twice: the top-K ids of a position are unique",
                             "invalid_value")
        values = _check_logprobs(lps, len(ids), conv, where_lps, where_ids)
        mass = math.fsum(math.exp(v) for v in values)
        if mass > 1.0 + TOPK_MASS_TOLERANCE:
            raise conv.error(where_lps, f"the probabilities sum to {mass:.6g} > 1 (+{TOPK_MASS_TOLERANCE:g}): not "
                             "the top-K of one distribution", "invalid_value")
        out_ids.append([int(t) for t in ids])
        out_lps.append(values)
    return out_ids, out_lps, ids_name


def file_format(path: str) -> str:
    """The ``datasets`` builder name for a data file: "json" or "parquet"."""
    lower = str(path).lower()
    if lower.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        return "json"
    if lower.endswith(".parquet"):
        return "parquet"
    raise DataError(str(path), None, None, "unknown file type: use .jsonl, .json or .parquet", "invalid_file")


def read_rows(path: str, cache_dir: str | None = None) -> Iterator[dict]:
    """Yield the rows of one data file (as dicts), in file order.

    JSON lines are parsed with Python's ``json`` (exact floats; ``NaN``/``Infinity`` literals come
    through as such and are then reported): HF ``datasets``' JSON reader stores nested objects in
    its ``Json`` type through ujson at reduced precision (measured: -4.8592769656e-05 read back as
    -4.85928e-05), which would perturb stored log-probs. Parquet goes through ``datasets`` (native
    Arrow types, exact). Row ``N`` is the N-th non-empty line / record, as ``datasets`` counts.
    """
    fmt = file_format(path)
    if not os.path.isfile(path):
        raise DataError(str(path), None, None, "no such file", "invalid_file")
    if fmt == "json":
        yield from _read_json(str(path))
        return
    import datasets

    try:
        ds = datasets.load_dataset(fmt, data_files=[str(path)], split="train", cache_dir=cache_dir)
    except Exception as exc:  # the reader's own message says what is malformed; add the file
        raise DataError(str(path), None, None, f"cannot be read as {fmt}: {exc}", "invalid_file") from exc
    yield from ds


def _read_json(path: str) -> Iterator[dict]:
    """Rows of a .json / .jsonl (optionally gzipped) file. Lines are decoded one at a time, so a
    line that is not UTF-8 is a bad row like a line that is not JSON (``skip_bad_rows`` skips
    both); a gzip stream that ends early or is corrupt is a ``DataError`` naming the row it broke at."""
    opener = gzip.open if path.endswith(".gz") else open
    index = 0
    try:
        with opener(path, "rb") as f:
            head = f.read(1024).lstrip()
            f.seek(0)
            if head.startswith(b"["):  # one JSON array of rows
                try:
                    rows = json.loads(f.read().decode("utf-8"))
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise DataError(path, None, None, f"invalid JSON: {exc}", "invalid_file") from exc
                yield from rows
                return
            for line_no, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as exc:
                    yield _BadLine(DataError(path, index, None, f"line {line_no} is not valid UTF-8: {exc}",
                                             "invalid_utf8"))
                except json.JSONDecodeError as exc:
                    # A broken line is a bad row: skip_bad_rows may skip it like any other.
                    yield _BadLine(DataError(path, index, None, f"line {line_no} is not valid JSON: {exc}",
                                             "invalid_json"))
                else:
                    yield row
                index += 1
    except (EOFError, OSError, zlib.error) as exc:
        # gzip raises EOFError for a truncated stream, BadGzipFile (an OSError) / zlib.error for corrupt data
        raise DataError(path, index, None, f"the file ends early or is corrupt after {index} rows "
                        f"({type(exc).__name__}: {exc})", "invalid_file") from exc


class _BadLine:
    """Stands in for a row that could not be parsed; ``parse_row`` raises its error."""

    def __init__(self, error: DataError):
        self.error = error


def write_rows(path: str, rows: list[dict]) -> None:
    """Write rows as jsonl, or as parquet (nested lists as Arrow list columns: the format for large
    collections, e.g. with a teacher top-K per token) when ``path`` ends in ``.parquet``."""
    if file_format(path) == "json":
        write_jsonl(path, rows)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    os.replace(tmp, path)


def write_jsonl(path: str, rows: list[dict]) -> None:
    """Write rows as jsonl (parent directories created; non-finite floats are refused)."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n" for row in rows)
    os.replace(tmp, path)
