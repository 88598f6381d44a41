"""Teacher top-K stored with the responses (distillation data): rows load with it, every bad value is
a DataError naming file, row and field (positions with fewer than K entries are fine), and parquet
list columns round-trip exactly."""

import json
import math

import pytest
import torch

from pear_mega.data import DataConfig, DataError, load_examples, parse_row, read_rows, write_rows
from pear_mega.data.format import TOPK_MASS_TOLERANCE


def _topk(n, k=3, vocab=100, seed=0):
    """n positions of k distinct ids and log-probs of a distribution with mass outside the top-K."""
    ids = [[(seed + 7 * t + 13 * j) % vocab for j in range(k)] for t in range(n)]
    lps = [[math.log(0.5 / (j + 1)) for j in range(k)] for _ in range(n)]  # 0.5 + 0.25 + 0.17 < 1
    return ids, lps


def _row(chat_row, **changes):
    row = chat_row("q", "Answer: 42")
    n = len(row["messages"][1]["token_ids"])
    ids, lps = _topk(n)
    row["messages"][1].update(topk_ids=ids, topk_logprobs=lps)
    row["messages"][1].update(changes)
    return json.loads(json.dumps(row))


def test_row_with_top_k_loads_and_fewer_than_k_is_allowed(chat_row):
    row = _row(chat_row)
    row["messages"][1]["topk_ids"][0] = [5]  # one entry only
    row["messages"][1]["topk_logprobs"][0] = [-0.2]
    row["messages"][1]["topk_ids"][1] = []  # none (e.g. all masked out)
    row["messages"][1]["topk_logprobs"][1] = []
    span = parse_row(row, "t.jsonl", 0).spans[0]
    assert span.topk_ids[0] == [5] and span.topk_ids[1] == [] and len(span.topk_ids) == len(span.token_ids)
    assert span.topk_logprobs[2] == row["messages"][1]["topk_logprobs"][2]
    assert span.topk_ids_field == "messages[1].topk_ids"
    assert parse_row(chat_row("q", "Answer: 42"), "t.jsonl", 0).spans[0].topk_ids is None  # optional


def _edit(path, value):
    def change(row):
        target = row["messages"][1]
        *keys, last = path
        for key in keys:
            target = target[key]
        target[last] = value
        return row

    return change


@pytest.mark.parametrize("change, field, reason, message", [
    (_edit(["topk_logprobs"], None), "messages[1].topk_logprobs", "missing_field", "missing"),
    (_edit(["topk_ids"], None), "messages[1].topk_ids", "missing_field", "missing"),
    (_edit(["topk_ids"], [[1, 2, 3]]), "messages[1].topk_ids", "length_mismatch", "has 1 positions but the span"),
    (_edit(["topk_ids"], "x"), "messages[1].topk_ids", "invalid_value", "one list per token"),
    (_edit(["topk_ids", 2], 7), "messages[1].topk_ids[2]", "invalid_value", "must be a list"),
    (_edit(["topk_logprobs", 1], [-0.1, -0.2]), "messages[1].topk_logprobs[1]", "length_mismatch",
     "has 2 values but 'messages[1].topk_ids[1]' has 3 ids"),
    (_edit(["topk_ids", 3], [4, -1, 5]), "messages[1].topk_ids[3]", "invalid_value", "element 1 is -1"),
    (_edit(["topk_ids", 3], [4, 2.5, 5]), "messages[1].topk_ids[3]", "invalid_value", "element 1 is 2.5"),
    (_edit(["topk_ids", 0], [4, 9, 4]), "messages[1].topk_ids[0]", "invalid_value", "holds token id 4 twice"),
    (_edit(["topk_logprobs", 4], [-0.1, float("nan"), -2.0]), "messages[1].topk_logprobs[4]",
     "non_finite_logprobs", "element 1 is nan"),
    (_edit(["topk_logprobs", 4], [-0.1, -1.0, None]), "messages[1].topk_logprobs[4]", "non_finite_logprobs",
     "element 2 is null"),
    (_edit(["topk_logprobs", 2], [0.5, -1.0, -2.0]), "messages[1].topk_logprobs[2]", "invalid_value",
     "not a log-probability"),
    (_edit(["topk_logprobs", 5], [-0.1, -1.5, -2.0]), "messages[1].topk_logprobs[5]", "invalid_value",
     "the probabilities sum to 1.263"),
])
def test_bad_top_k_names_file_row_and_field(chat_row, change, field, reason, message):
    row = change(_row(chat_row))
    with pytest.raises(DataError) as err:
        parse_row(row, "kd.jsonl", 4)
    assert (err.value.file, err.value.row, err.value.field, err.value.reason) == ("kd.jsonl", 4, field, reason)
    assert str(err.value).startswith(f"kd.jsonl: row 4: field '{field}': ") and message in str(err.value)


def test_mass_tolerance_and_top_k_only_on_trained_messages(chat_row):
    row = _row(chat_row)
    row["messages"][1]["topk_logprobs"][0] = [math.log(0.6), math.log(0.4 + TOPK_MASS_TOLERANCE / 2), -30.0]
    parse_row(row, "kd.jsonl", 0)  # rounding above 1 within the tolerance is accepted
    row["messages"].insert(0, {"role": "assistant", "content": "demo", "topk_ids": [[1]], "topk_logprobs": [[-1.0]]})
    with pytest.raises(DataError, match=r"field 'messages\[0\]\.topk_ids': only trained messages"):
        parse_row(row, "kd.jsonl", 0)


def test_prompt_response_rows_and_vocabulary(tokenizer, chat_row, write_jsonl):
    chat = chat_row("q", "Answer: 42")
    ids, lps = _topk(len(chat["messages"][1]["token_ids"]))
    row = {"prompt": "q", "response": "Answer: 42", "response_token_ids": chat["messages"][1]["token_ids"],
           "behavior_logprobs": chat["messages"][1]["logprobs"], "response_topk_ids": ids,
           "response_topk_logprobs": lps}
    span = parse_row(row, "pr.jsonl", 0).spans[0]
    assert span.topk_ids == ids and span.topk_ids_field == "response_topk_ids"
    bad = json.loads(json.dumps(row))
    bad["response_topk_ids"][2][1] = len(tokenizer) + 5
    path = write_jsonl([row, bad])
    cfg = DataConfig(train_files=[path], tokenizer_path="unused", seq_length=256)
    with pytest.raises(DataError, match=rf"{path}: row 1: field 'response_topk_ids\[2\]': token id "
                                        rf"{len(tokenizer) + 5} is outside the tokenizer's vocabulary"):
        load_examples(cfg, tokenizer)
    examples, stats = load_examples(DataConfig(train_files=[path], tokenizer_path="unused", seq_length=256,
                                               skip_bad_rows=True), tokenizer)  # fmt: skip
    assert len(examples) == 1 and stats.skipped == {"invalid_value": 1}


def test_parquet_list_columns_round_trip(chat_row, tmp_path):
    rows = [_row(chat_row), _row(chat_row)]
    rows[1]["messages"][1]["topk_ids"][0] = [3]  # ragged positions
    rows[1]["messages"][1]["topk_logprobs"][0] = [-1e-9]
    path = str(tmp_path / "kd.parquet")
    write_rows(path, rows)
    back = list(read_rows(path))
    for got, want in zip(back, rows):
        g, w = parse_row(got, path, 0).spans[0], parse_row(want, "mem", 0).spans[0]
        assert g.topk_ids == w.topk_ids and g.topk_logprobs == w.topk_logprobs  # exact floats
    write_rows(str(tmp_path / "kd.jsonl"), rows)
    assert list(read_rows(str(tmp_path / "kd.jsonl"))) == rows


def test_packs_carry_the_top_k_shifted_with_the_labels(tokenizer, chat_row, write_jsonl):
    from pear_mega.data import build_packs
    from pear_mega.data.loader import fingerprint

    with_topk = _row(chat_row)
    with_topk["messages"][1]["topk_ids"][1] = [9]  # a short position
    with_topk["messages"][1]["topk_logprobs"][1] = [0.0005]  # a hair above 0: clamped to 0
    plain = chat_row("q2", "Answer: 7")
    path = write_jsonl([with_topk, plain])
    cfg = DataConfig(train_files=[path], tokenizer_path="unused", seq_length=256, shuffle=False)
    packs, _ = build_packs(cfg, tokenizer)
    assert len(packs) == 1
    pack = packs[0].as_dict()
    ids, lps, labels = pack["topk_ids"], pack["topk_logprobs"], pack["labels"]
    assert ids.shape == lps.shape == (256, 3)
    first = int(packs[0].cu_seqlens[1])
    rows = (labels[:first] != -100).nonzero().flatten()
    stored = with_topk["messages"][1]
    assert labels[rows].tolist() == stored["token_ids"]
    for k, t in enumerate(rows.tolist()):
        n = len(stored["topk_ids"][k])
        assert ids[t, :n].tolist() == stored["topk_ids"][k] and (ids[t, n:] == -1).all()
        assert lps[t, :n].tolist() == pytest.approx([min(v, 0.0) for v in stored["topk_logprobs"][k]], abs=1e-7)
    off = torch.ones(256, dtype=torch.bool)
    off[rows] = False
    assert (ids[off] == -1).all() and (lps[off] == 0).all()  # context, the plain row and the pad tail
    changed = json.loads(json.dumps(with_topk))
    changed["messages"][1]["topk_logprobs"][0][0] -= 0.5
    other, _ = build_packs(DataConfig(train_files=[write_jsonl([changed, plain], "b.jsonl")], tokenizer_path="unused",
                                      seq_length=256, shuffle=False), tokenizer)  # fmt: skip
    assert fingerprint(other) != fingerprint(packs)
    assert "topk_ids" not in build_packs(DataConfig(train_files=[write_jsonl([plain], "c.jsonl")], tokenizer_path="unused",
                                                    seq_length=256), tokenizer)[0][0].as_dict()  # fmt: skip


def test_cli_top_k_and_output_type_fail_before_an_engine_starts(tmp_path):
    import importlib.util
    from pathlib import Path

    tool = Path(__file__).resolve().parents[2] / "tools" / "collect_logprobs.py"
    spec = importlib.util.spec_from_file_location("collect_logprobs_topk", tool)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    with pytest.raises(SystemExit, match="score: --top-k must be >= 0, got -1"):
        cli.main(["score", "--model", "m", "--out", str(tmp_path / "o.jsonl"), "--data", "d.jsonl", "--top-k", "-1"])
    with pytest.raises(SystemExit, match=r"--out: .*o\.csv: unknown file type"):
        cli.main(["score", "--model", "m", "--out", str(tmp_path / "o.csv"), "--data", "d.jsonl", "--top-k", "4"])
