"""Fixtures of the data tests: the SmolLM2 tokenizer and writers of small data files."""

import json

import pytest


@pytest.fixture(scope="session")
def tokenizer():
    from pear_mega.data import load_tokenizer
    from pear_mega.pretrained import smollm2_135m_instruct

    return load_tokenizer(str(smollm2_135m_instruct()))


@pytest.fixture
def write_jsonl(tmp_path):
    """write_jsonl(rows, name) -> path; rows are written as given (NaN/Infinity allowed)."""

    def write(rows, name="data.jsonl"):
        path = tmp_path / name
        with open(path, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        return str(path)

    return write


@pytest.fixture(scope="session")
def chat_row(tokenizer):
    """chat_row(user, answer, logprobs=None, end_turn=True, meta=None) -> a generated-style chat row:
    token ids = the answer's tokens (+ <|im_end|> when the turn ended)."""
    return lambda *args, **kwargs: _chat_row(tokenizer, *args, **kwargs)


def _chat_row(tokenizer, user, answer, logprobs=None, end_turn=True, meta=None):
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if end_turn:
        ids = ids + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    if logprobs is None:
        logprobs = [-0.1 * (k + 1) for k in range(len(ids))]
    row = {"messages": [{"role": "user", "content": user},
                        {"role": "assistant", "content": answer, "token_ids": ids, "logprobs": logprobs}]}
    if meta is not None:
        row["meta"] = meta
    return row
