"""Bad rows: every problem names file, row and field; skip_bad_rows counts them by reason."""

import json

import pytest
import torch

from pear_mega.data import DataConfig, DataError, PackSource, build_packs, load_examples, parse_row


def _with(row, **changes):
    row = json.loads(json.dumps(row))
    row["messages"][1].update(changes)
    return row


@pytest.mark.parametrize("change, field, reason, message", [
    ({"logprobs": None}, "messages[1].logprobs", "missing_field", "missing"),
    ({"token_ids": None}, "messages[1].token_ids", "missing_field", "missing"),
    ({"logprobs": [-0.1, -0.2]}, "messages[1].logprobs", "length_mismatch", "has 2 values but"),
    ({"logprobs": [-0.1, float("nan"), -0.3, -0.4, -0.5, -0.6]}, "messages[1].logprobs", "non_finite_logprobs",
     "element 1 is nan"),
    ({"logprobs": [-0.1, -0.2, float("-inf"), -0.4, -0.5, -0.6]}, "messages[1].logprobs", "non_finite_logprobs",
     "element 2 is -inf"),
    ({"logprobs": [-0.1, -0.2, -0.3, 0.5, -0.5, -0.6]}, "messages[1].logprobs", "invalid_value", "not a log-prob"),
    ({"token_ids": [1, 2, "x", 4, 5, 6]}, "messages[1].token_ids", "invalid_value", "element 2 is 'x'"),
    ({"content": None}, "messages[1].content", "missing_field", "must be a string"),
])
def test_bad_row_names_field(tokenizer, chat_row, change, field, reason, message):
    row = _with(chat_row("q", "Answer: 42"), **change)
    with pytest.raises(DataError) as err:
        parse_row(row, "train.jsonl", 3)
    assert (err.value.file, err.value.row, err.value.field, err.value.reason) == ("train.jsonl", 3, field, reason)
    assert str(err.value).startswith(f"train.jsonl: row 3: field '{field}': ")
    assert message in str(err.value)


def test_rows_without_any_loss_span(chat_row):
    with pytest.raises(DataError, match="row 0: field 'messages': no assistant message carries"):
        parse_row({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "f", 0)
    with pytest.raises(DataError, match="row 0: field 'behavior_logprobs': missing"):
        parse_row({"prompt": "q", "response": "a", "response_token_ids": [1]}, "f", 0)
    with pytest.raises(DataError, match="row 0: field 'messages': missing"):
        parse_row({"text": "q"}, "f", 0)
    with pytest.raises(DataError, match=r"field 'messages\[0\].token_ids': only assistant messages"):
        parse_row({"messages": [{"role": "user", "content": "q", "token_ids": [1], "logprobs": [-1.0]}]}, "f", 0)


def test_nan_in_file_names_file_row_field(tokenizer, chat_row, write_jsonl, tmp_path):
    # json.dumps writes the bare literal NaN.
    good = chat_row("q", "Answer: 1")
    bad = _with(chat_row("q", "Answer: 22"), logprobs=[-0.1, float("nan"), -0.3, -0.4, -0.5, -0.6])
    path = write_jsonl([good, bad])
    cfg = DataConfig(train_files=[path], tokenizer_path="unused", seq_length=256, cache_dir=str(tmp_path / "hf"))
    with pytest.raises(DataError, match=rf"{path}: row 1: field 'messages\[1\]\.logprobs': element 1 is nan: "
                                        r"log-probs must be finite"):
        load_examples(cfg, tokenizer)


def test_broken_json_line_is_a_bad_row(tokenizer, chat_row, tmp_path):
    path = tmp_path / "broken.jsonl"
    good = json.dumps(chat_row("q", "Answer: 1"))
    path.write_text(good + "\n\n" + '{"messages": [' + "\n" + good + "\n")
    cfg = DataConfig(train_files=[str(path)], tokenizer_path="unused", seq_length=256)
    with pytest.raises(DataError, match=rf"{path}: row 1: line 3 is not valid JSON"):
        load_examples(cfg, tokenizer)
    examples, stats = load_examples(DataConfig(**{**cfg.__dict__, "skip_bad_rows": True}), tokenizer)
    assert [e.source for e in examples] == [f"{path}:0", f"{path}:2"] and stats.skipped == {"invalid_json": 1}


def test_logprobs_are_read_exactly(tokenizer, chat_row, write_jsonl):
    # Values with many digits at many scales: the float32 stored must be the float32 of the value written.
    lps = [-4.8592769656281265e-05, -0.008444218515250481, -12.345678901234, -3.0000001e-09, -0.5, -7.77777777]
    path = write_jsonl([chat_row("q", "Answer: 42", logprobs=lps)])
    (ex,), _ = load_examples(DataConfig(train_files=[path], tokenizer_path="unused"), tokenizer)
    assert ex.behavior_logprobs[ex.labels != -100].tolist() == torch.tensor(lps, dtype=torch.float32).tolist()


def test_skip_bad_rows_counts_by_reason(tokenizer, chat_row, write_jsonl, tmp_path):
    rows = [
        chat_row("q", "Answer: 1"),
        _with(chat_row("q", "Answer: 2"), logprobs=None),
        _with(chat_row("q", "Answer: 33"), logprobs=[-0.1, float("inf"), -0.3, -0.4, -0.5, -0.6]),
        _with(chat_row("q", "Answer: 4"), logprobs=[-0.1]),
        chat_row("q", "Answer: 5 " + "and more " * 80),  # too long for 64 tokens
        _with(chat_row("q", "Answer: 6"), content="Answer: 7"),  # ids do not decode to the content
        chat_row("q", "Answer: 8"),
    ]
    path = write_jsonl(rows)
    cfg = DataConfig(train_files=[path], tokenizer_path="unused", seq_length=64, skip_bad_rows=True,
                     cache_dir=str(tmp_path / "hf"))
    examples, stats = load_examples(cfg, tokenizer)
    assert [e.source for e in examples] == [f"{path}:0", f"{path}:6"]
    assert stats.rows == 7 and stats.examples == 2
    assert stats.skipped == {"missing_field": 1, "non_finite_logprobs": 1, "length_mismatch": 1, "too_long": 1,
                             "alignment": 1}
    assert "row 4" in stats.first_error["too_long"]
    assert "skipped 5 rows" in stats.summary()


def test_truncate_drops_rows_left_without_loss_tokens(tokenizer, chat_row, write_jsonl, tmp_path):
    long_prompt = chat_row("word " * 80, "Answer: 1")  # the answer starts after position 64
    long_answer = chat_row("q", "Answer: 2 " + "and more " * 80)
    path = write_jsonl([long_prompt, long_answer])
    cfg = DataConfig(train_files=[path], tokenizer_path="unused", seq_length=64, truncate=True,
                     cache_dir=str(tmp_path / "hf"))
    examples, stats = load_examples(cfg, tokenizer)
    assert len(examples) == 1 and examples[0].source == f"{path}:1"
    assert len(examples[0]) == 64 and examples[0].labels[-1] == -100
    assert stats.truncated == 1 and stats.skipped == {"truncated_no_loss_tokens": 1}


def test_parquet_and_jsonl_agree(tokenizer, chat_row, write_jsonl, tmp_path):
    import pandas as pd

    rows = [chat_row("q", f"Answer: {k}", meta={"k": k}) for k in range(3)]
    answer = chat_row("p", "Answer: 9")["messages"][1]
    rows.append({"prompt": "p", "response": "Answer: 9", "response_token_ids": answer["token_ids"],
                 "behavior_logprobs": answer["logprobs"]})
    jsonl = write_jsonl(rows)
    parquet = str(tmp_path / "data.parquet")
    pd.DataFrame(rows).to_parquet(parquet)
    cache = str(tmp_path / "hf")
    a, _ = load_examples(DataConfig(train_files=[jsonl], tokenizer_path="unused", cache_dir=cache), tokenizer)
    b, _ = load_examples(DataConfig(train_files=[parquet], tokenizer_path="unused", cache_dir=cache), tokenizer)
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert x.tokens.tolist() == y.tokens.tolist() and x.labels.tolist() == y.labels.tolist()
        assert x.behavior_logprobs.tolist() == y.behavior_logprobs.tolist()


def test_data_config_validation():
    with pytest.raises(ValueError, match="data.train_files must be a list"):
        DataConfig(train_files="a.jsonl", tokenizer_path="t")
    with pytest.raises(ValueError, match="data.seq_length must be >= 8"):
        DataConfig(train_files=["a.jsonl"], tokenizer_path="t", seq_length=4)
    with pytest.raises(ValueError, match="data.token_check must be one of"):
        DataConfig(train_files=["a.jsonl"], tokenizer_path="t", token_check="strict")
    with pytest.raises(DataError, match="unknown file type"):
        load_examples(DataConfig(train_files=["a.csv"], tokenizer_path="t"), tokenizer=object())


def test_nothing_to_load_is_refused_before_loading_naming_the_key():
    # A trainer nests an empty DataConfig and fills it in later, so these are load-time checks.
    with pytest.raises(ValueError, match="data.train_files is required"):
        load_examples(DataConfig(tokenizer_path="t"), tokenizer=object())
    with pytest.raises(ValueError, match="data.tokenizer_path is required"):
        build_packs(DataConfig(train_files=["a.jsonl"]))
    with pytest.raises(ValueError, match="data.tokenizer_path is required"):
        PackSource(train_files=["a.jsonl"])
