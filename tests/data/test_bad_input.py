"""Bad data that used to slip through or lose its location: every error names file, row and field,
and row-level faults are skippable."""

import gzip
import json

import pytest

from pear_mega.data import DataConfig, DataError, load_examples


def _cfg(path, **kw):
    return DataConfig(train_files=[str(path)], tokenizer_path="unused", seq_length=256, **kw)


def test_logprob_beyond_float32_is_refused_with_its_location(tokenizer, chat_row, write_jsonl):
    # -1e300 is finite in Python but -inf in the float32 packs are trained in.
    good = chat_row("q", "Answer: 1")
    bad = chat_row("q", "Answer: 22")
    bad["messages"][1]["logprobs"][2] = -1e300
    path = write_jsonl([good, bad])
    with pytest.raises(DataError, match=rf"{path}: row 1: field 'messages\[1\]\.logprobs': element 2 is -1e\+300: "
                                        "outside float32's range"):
        load_examples(_cfg(path), tokenizer)
    examples, stats = load_examples(_cfg(path, skip_bad_rows=True), tokenizer)
    assert len(examples) == 1 and stats.skipped == {"non_finite_logprobs": 1}
    # the largest float32 magnitude is still a number
    bad["messages"][1]["logprobs"][2] = -3.4e38
    (_, ex), _ = load_examples(_cfg(write_jsonl([good, bad], "edge.jsonl")), tokenizer)
    assert ex.behavior_logprobs.isfinite().all()


def test_non_utf8_line_is_a_skippable_bad_row(tokenizer, chat_row, tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = json.dumps(chat_row("q", "Answer: 1")).encode()
    broken = json.dumps(chat_row("caf\u00e9?", "Answer: 2")).replace("\\u00e9", "\u00e9").encode("latin-1")
    path.write_bytes(good + b"\n" + broken + b"\n" + good + b"\n")
    with pytest.raises(DataError, match=rf"{path}: row 1: line 2 is not valid UTF-8"):
        load_examples(_cfg(path), tokenizer)
    examples, stats = load_examples(_cfg(path, skip_bad_rows=True), tokenizer)
    assert [e.source for e in examples] == [f"{path}:0", f"{path}:2"] and stats.skipped == {"invalid_utf8": 1}


def test_truncated_gzip_names_the_file_and_row(tokenizer, chat_row, tmp_path):
    rows = [json.dumps(chat_row("q", f"Answer: {i}")) for i in range(40)]
    whole = gzip.compress(("\n".join(rows) + "\n").encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=rf"{path}: row \d+: the file ends early or is corrupt after \d+ rows"):
        load_examples(_cfg(path), tokenizer)
    # a whole file of the same rows loads
    path.write_bytes(whole)
    examples, _ = load_examples(_cfg(path), tokenizer)
    assert len(examples) == 40


def test_the_trainer_and_the_library_check_tokens_the_same_way_by_default():
    import dataclasses

    from pear_mega.data.config import TOKEN_CHECK_DEFAULT
    from pear_mega.sft.config import SFTConfig

    # one config class, so one default: the trainer's data section is the library's DataConfig
    (data_field,) = (f for f in dataclasses.fields(SFTConfig) if f.name == "data")
    assert data_field.default_factory is DataConfig
    assert _cfg("x.jsonl").token_check == DataConfig().token_check == TOKEN_CHECK_DEFAULT == "decode"
