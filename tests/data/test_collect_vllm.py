"""vLLM collection against an independent transformers computation (SmolLM2-135M-Instruct, fp32).

One engine for the module. Every check goes through the data loader's layout: HF runs a forward
pass over the *training example's* tokens and ``log_softmax(logits / T)`` at each label position
must equal the stored ``behavior_logprobs`` there — this checks the vLLM log-probs (generate and
score mode), the stored token ids and the packed-shifted alignment together.
"""

import pytest
import torch

from pear_mega.data import DataError, parse_row, tokenize_conversation

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

TOL = 1e-4


@pytest.fixture(scope="module")
def model_dir():
    from pear_mega.pretrained import smollm2_135m_instruct

    return str(smollm2_135m_instruct())


@pytest.fixture(scope="module")
def llm(model_dir):
    from pear_mega.collect import close_llm, make_llm

    engine = make_llm(model_dir, seed=0, max_model_len=1024, cpu_kv_cache_gib=0.25)
    yield engine
    close_llm(engine)


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts():
    from pear_mega.data.prompts import reasoning_gym_prompts

    return reasoning_gym_prompts("basic_arithmetic", 2, seed=0, max_terms=2, max_digits=1)


def hf_logits(hf, tokens):
    with torch.no_grad():
        return hf(input_ids=tokens[None]).logits[0].float()


def top_p_logprobs(logits, top_p):
    """log of the renormalized nucleus distribution (smallest top set with mass >= top_p), written
    independently of vLLM's ascending-cumsum form; also how close each row is to the nucleus edge."""
    probs = logits.softmax(-1)
    sorted_p, order = probs.sort(-1, descending=True)
    mass_above = sorted_p.cumsum(-1) - sorted_p
    keep_sorted = mass_above < top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    margin = (mass_above - top_p).abs().min(-1).values
    masked = torch.where(keep, logits, torch.tensor(float("-inf")))
    return masked.log_softmax(-1), margin


def stored_vs_hf(tokenizer, hf, row, temperature=1.0, top_p=1.0):
    """(stored behavior log-probs, HF reference) at the example's label positions."""
    ex = tokenize_conversation(tokenizer, parse_row(row, "<test>", 0), token_check="decode")
    mask = ex.labels != -100
    logits = hf_logits(hf, ex.tokens) / temperature
    if top_p < 1.0:
        ref, margin = top_p_logprobs(logits, top_p)
        mask &= margin > 1e-5  # a token on the nucleus edge is a coin flip in fp32: leave it out
    else:
        ref = logits.log_softmax(-1)
    labels = ex.labels.clamp(min=0)
    return ex.behavior_logprobs[mask], ref.gather(-1, labels[:, None])[:, 0][mask], int(mask.sum())


T = 0.7


@pytest.fixture(scope="module")
def tempered(llm, tokenizer, prompts):
    """Rows sampled at temperature T (2 prompts x 2 samples) and the collection report."""
    from pear_mega.collect import SamplingConfig, generate

    return generate(llm, tokenizer, prompts, SamplingConfig(n=2, temperature=T, max_tokens=12), behavior="smollm2")


def test_generate_logprobs_are_the_tempered_sampling_distribution(hf, tokenizer, tempered):
    rows, report = tempered
    assert report.rows == len(rows) == 4 and not report.dropped
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    # The 2-shot prompt makes the model answer and end its turn: the end-of-turn path is exercised.
    assert any(row["meta"]["finish_reason"] == "stop" for row in rows)
    for row in rows:
        msg = row["messages"][-1]
        assert row["meta"]["behavior"]["temperature"] == T and row["meta"]["task"] == "basic_arithmetic"
        assert row["meta"]["behavior"] == {"model": "smollm2", "temperature": T, "top_p": 1.0, "top_k": 0,
                                           "logprobs_mode": "processed_logprobs", "max_tokens": 12}
        if row["meta"]["finish_reason"] == "stop":  # the model ended its turn: the token is stored
            assert msg["token_ids"][-1] == im_end
        stored, ref, n = stored_vs_hf(tokenizer, hf, row, temperature=T)
        assert n == len(msg["token_ids"])
        err = (stored - ref).abs().max().item()
        assert err <= TOL, f"max |vLLM - HF| = {err:.2e} over {n} tokens"
        # The check can fail: the untempered model's log-probs are far from the stored ones.
        _, raw, _ = stored_vs_hf(tokenizer, hf, row, temperature=1.0)
        assert (stored - raw).abs().max().item() > 1e-2


def test_generate_logprobs_follow_top_p(llm, hf, tokenizer, prompts):
    from pear_mega.collect import SamplingConfig, generate

    rows, _ = generate(llm, tokenizer, prompts[:1], SamplingConfig(n=3, temperature=1.0, top_p=0.6, max_tokens=8))
    checked = 0
    for row in rows:
        stored, ref, n = stored_vs_hf(tokenizer, hf, row, top_p=0.6)
        assert (stored - ref).abs().max().item() <= TOL
        checked += n
    assert checked >= 6


def test_generated_rows_load_as_training_packs(tokenizer, tempered, tmp_path):
    from pear_mega.data import PackSource, write_jsonl

    rows, _ = tempered
    path = str(tmp_path / "behavior.jsonl")
    write_jsonl(path, rows)
    src = PackSource(train_files=[path], tokenizer_path="unused", seq_length=1024, token_check="decode",
                     cache_dir=str(tmp_path / "hf"), tokenizer=tokenizer, shuffle=False)
    pack = src.next_pack()
    stored = [lp for r in rows for lp in r["messages"][-1]["logprobs"]]
    trained = [t for r in rows for t in r["messages"][-1]["token_ids"]]
    mask = pack["labels"] != -100
    assert pack["labels"][mask].tolist() == trained
    torch.testing.assert_close(pack["behavior_logprobs"][mask], torch.tensor(stored), atol=0, rtol=0)


def test_score_matches_hf(llm, hf, tokenizer):
    from pear_mega.collect import score

    rows = [
        {"prompt": "What is 2+3?", "response": "Answer: 5", "meta": {"id": 1}},
        {"messages": [{"role": "system", "content": "You answer briefly."},
                      {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "Hello! How can I help?"},
                      {"role": "user", "content": "Name a color."},
                      {"role": "assistant", "content": "Blue."}]},
    ]
    scored, report = score(llm, tokenizer, rows, behavior="smollm2")
    assert report.rows == 2
    assert scored[0]["meta"] == {"id": 1, "behavior": {"model": "smollm2", "temperature": 1.0, "top_p": 1.0, "top_k": 0,
                                                       "logprobs_mode": "prompt_logprobs", "scored": True}}
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert scored[0]["response_token_ids"] == tokenizer("Answer: 5", add_special_tokens=False)["input_ids"] + [im_end]
    assert [m.get("token_ids", [None])[-1] for m in scored[1]["messages"]] == [None, None, im_end, None, im_end]
    for row in scored:
        stored, ref, n = stored_vs_hf(tokenizer, hf, row)
        ids = row.get("response_token_ids") or [t for m in row["messages"] for t in m.get("token_ids", [])]
        assert n == len(ids)
        err = (stored - ref).abs().max().item()
        assert err <= TOL, f"max |vLLM - HF| = {err:.2e} over {n} tokens"
    last_only, _ = score(llm, tokenizer, rows[1:], last_turn_only=True)
    assert "token_ids" not in last_only[0]["messages"][2] and "token_ids" in last_only[0]["messages"][4]


def test_score_refuses_other_temperatures_and_bad_rows(llm, tokenizer):
    from pear_mega.collect import score

    with pytest.raises(ValueError, match="temperature=0.5 is not supported"):
        score(llm, tokenizer, [{"prompt": "a", "response": "b"}], temperature=0.5)
    rows = [{"prompt": "a", "response": "b"}, {"prompt": "a"}]
    with pytest.raises(DataError, match="data.jsonl: row 1: field 'response': must be a string, got missing"):
        score(llm, tokenizer, rows, file="data.jsonl")
    scored, report = score(llm, tokenizer, rows, file="data.jsonl", skip_bad_rows=True)
    assert len(scored) == 1 and report.dropped == {"missing_field": 1}
