"""Chat-template layout of behavior tokens, the end-of-turn rule and the alignment checks.

The reference layout is transformers' own ``apply_chat_template(tokenize=True)`` (an independent
tokenization path); the loss positions are written out by hand.
"""

import copy

import pytest
import torch

from pear_mega.data import DataError, parse_row, tokenize_conversation

IM_END = "<|im_end|>"


def hf_ids(tokenizer, messages):
    return list(tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"])


def loss_positions(example):
    """Positions p of trained tokens (labels[p-1] = tokens[p])."""
    return [p + 1 for p in (example.labels != -100).nonzero().flatten().tolist()]


def layout(tokenizer, row, **kwargs):
    return tokenize_conversation(tokenizer, parse_row(row, "f.jsonl", 7), **kwargs)


def test_single_turn_layout_hand_checked(tokenizer, chat_row):
    row = chat_row("What is 2+3?", "Answer: 5", logprobs=[-0.1, -0.2, -0.3, -0.4, -0.5])
    ex = layout(tokenizer, row)
    ref = hf_ids(tokenizer, row["messages"])
    assert ex.tokens.tolist() == ref
    n = len(ref)
    # The rendered text ends "<|im_start|>assistant\nAnswer: 5<|im_end|>\n": five trained tokens, then "\n".
    assert tokenizer.convert_ids_to_tokens(ref[n - 9:]) == ["ass", "istant", "Ċ", "Answer", ":", "Ġ", "5", IM_END, "Ċ"]
    assert loss_positions(ex) == [n - 6, n - 5, n - 4, n - 3, n - 2]
    expected_labels = torch.full((n,), -100)
    expected_labels[n - 7:n - 2] = torch.tensor(ref[n - 6:n - 1])
    assert torch.equal(ex.labels, expected_labels)
    expected_blp = torch.zeros(n)
    expected_blp[n - 7:n - 2] = torch.tensor([-0.1, -0.2, -0.3, -0.4, -0.5])
    torch.testing.assert_close(ex.behavior_logprobs, expected_blp, atol=0, rtol=0)
    assert ex.labels[-1] == -100 and ex.num_loss_tokens == 5


def test_unfinished_turn_end_token_is_context(tokenizer, chat_row):
    # A sample cut at max_tokens has no <|im_end|>: the template still writes one, untrained.
    row = chat_row("What is 2+3?", "Answer: 5", end_turn=False, logprobs=[-0.1, -0.2, -0.3, -0.4])
    ex = layout(tokenizer, row)
    ref = hf_ids(tokenizer, row["messages"])
    assert ex.tokens.tolist() == ref
    n = len(ref)
    assert loss_positions(ex) == [n - 6, n - 5, n - 4, n - 3]
    assert ex.labels[n - 3] == -100  # predicting <|im_end|> is not trained


def test_multi_turn_spans_and_context_assistant(tokenizer):
    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids(IM_END)]

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "Answer: 2"},  # a demonstration: context only
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "Answer: 4", "token_ids": ids("Answer: 4"), "logprobs": [-1.0] * 5},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "It is 6", "token_ids": ids("It is 6"), "logprobs": [-2.0] * 5},
    ]
    ex = layout(tokenizer, {"messages": messages})
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    ref = hf_ids(tokenizer, plain)
    assert ex.tokens.tolist() == ref
    trained = [ref[p] for p in loss_positions(ex)]
    assert trained == messages[4]["token_ids"] + messages[6]["token_ids"]
    assert ex.behavior_logprobs[ex.labels != -100].tolist() == [-1.0] * 5 + [-2.0] * 5


def test_prompt_response_row_equals_chat_row(tokenizer, chat_row):
    chat = chat_row("Say hi", "Hi there!")
    msg = chat["messages"][1]
    pr = {"prompt": "Say hi", "response": "Hi there!", "response_token_ids": msg["token_ids"],
          "behavior_logprobs": msg["logprobs"]}
    a, b = layout(tokenizer, chat), layout(tokenizer, pr)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.behavior_logprobs, b.behavior_logprobs)


def _rendered_ids(tokenizer, row):
    msgs = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    ref = hf_ids(tokenizer, msgs)
    start = len(ref) - 6  # first content token of "Answer: 5<|im_end|>\n"
    return ref, start


@pytest.mark.parametrize("shift", [-3, -1, 1, 2])
def test_shift_by_template_tokens_is_detected(tokenizer, chat_row, shift):
    """The known failure: stored ids taken a few positions off, through chat-template tokens."""
    row = chat_row("What is 2+3?", "Answer: 5")
    ref, start = _rendered_ids(tokenizer, row)
    n = len(row["messages"][1]["token_ids"])
    row["messages"][1]["token_ids"] = ref[start + shift:start + shift + n]
    row["messages"][1]["logprobs"] = [-0.5] * len(row["messages"][1]["token_ids"])  # the rendering ends early
    sign = r"\+" if shift > 0 else ""
    with pytest.raises(DataError, match=rf"f\.jsonl: row 7: field 'messages\[1\]\.token_ids': token_ids are "
                                        rf"shifted by {sign}{shift} tokens") as err:
        layout(tokenizer, row)
    assert err.value.reason == "alignment" and err.value.row == 7


def test_other_tokens_error_names_row(tokenizer, chat_row):
    row = chat_row("What is 2+3?", "Answer: 5")
    row["messages"][1]["token_ids"] = chat_row("x", "Answer: 6")["messages"][1]["token_ids"]
    with pytest.raises(DataError, match=r"row 7: field 'messages\[1\]\.token_ids': the token ids decode to "
                                        r"'Answer: 6' but the content is 'Answer: 5'"):
        layout(tokenizer, row)


def test_non_canonical_tokens_need_decode_check(tokenizer, chat_row):
    row = chat_row("What is 2+3?", "Answer: 5")
    pieces = tokenizer("Ans", add_special_tokens=False)["input_ids"] + tokenizer(
        "wer: 5", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(pieces) == ["Ans", "wer", ":", "Ġ", "5"]
    row["messages"][1]["token_ids"] = pieces + [tokenizer.convert_tokens_to_ids(IM_END)]
    row["messages"][1]["logprobs"] = [-0.5] * 6
    with pytest.raises(DataError, match="not its re-tokenization.*token_check='decode'"):
        layout(tokenizer, row)
    ex = layout(tokenizer, row, token_check="decode")
    assert [ex.tokens[p].item() for p in loss_positions(ex)] == row["messages"][1]["token_ids"]


def test_foreign_end_token_is_an_error(tokenizer, chat_row):
    row = chat_row("What is 2+3?", "Answer: 5")
    row["messages"][1]["token_ids"][-1] = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    with pytest.raises(DataError, match=r"end with the special token \['<\|endoftext\|>'\] but the chat template "
                                        r"closes the turn with \['<\|im_end\|>'\]"):
        layout(tokenizer, row)


def test_template_that_rewrites_content_is_an_error(tokenizer, chat_row):
    trimming = copy.deepcopy(tokenizer)
    trimming.chat_template = tokenizer.chat_template.replace("message['content']", "message['content'] | trim")
    row = chat_row("What is 2+3?", " Answer: 5")
    with pytest.raises(DataError, match=r"field 'messages\[1\]\.content': the chat template does not render"):
        layout(trimming, row)


def test_truncation(tokenizer, chat_row):
    row = chat_row("What is 2+3?", "Answer: 5")
    n = len(layout(tokenizer, row))
    with pytest.raises(DataError, match=rf"row 7: the tokenized conversation has {n} tokens, more than the "
                                        rf"sequence length {n - 3}") as err:
        layout(tokenizer, row, max_length=n - 3)
    assert err.value.reason == "too_long"
    ex = layout(tokenizer, row, max_length=n - 3, truncate=True)
    full = layout(tokenizer, row)
    assert len(ex) == n - 3 and ex.truncated
    assert torch.equal(ex.tokens, full.tokens[:n - 3])
    # The loss mask simply ends: the cut's last position has no next token.
    assert torch.equal(ex.labels[:n - 4], full.labels[:n - 4]) and ex.labels[-1] == -100
    assert ex.num_loss_tokens == 3
