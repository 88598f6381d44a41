"""Teacher top-K collection with vLLM (``top_k_logprobs``) against an independent transformers
computation (SmolLM2-135M-Instruct, fp32). One engine for the module.

At every trained position of the loaded example, the stored top-K must be HF's K most likely next
tokens with their log-probs: at temperature 1 for ``score`` and for ``generate`` at top_p = 1, and
under the renormalized nucleus (fewer than K where the nucleus is smaller) for ``generate`` at
top_p < 1.
"""

import pytest
import torch

from pear_mega.data import parse_row, tokenize_conversation

from tests.data.test_collect_vllm import hf_logits, top_p_logprobs  # isort: skip

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

TOL = 1e-4
K = 5


@pytest.fixture(scope="module")
def model_dir():
    from pear_mega.pretrained import smollm2_135m_instruct

    return str(smollm2_135m_instruct())


@pytest.fixture(scope="module")
def llm(model_dir):
    from pear_mega.collect import close_llm, make_llm

    engine = make_llm(model_dir, seed=0, max_model_len=1024, cpu_kv_cache_gib=0.25, max_logprobs=K)
    yield engine
    close_llm(engine)


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts():
    from pear_mega.data.prompts import reasoning_gym_prompts

    return reasoning_gym_prompts("basic_arithmetic", 1, seed=0, max_terms=2, max_digits=1)


def _reference(tokenizer, hf, row, top_p=1.0):
    """(HF log-probs [n, V] at the trained positions, in span order; stored top-K per position)."""
    span = parse_row(row, "<test>", 0).spans
    ex = tokenize_conversation(tokenizer, parse_row(row, "<test>", 0), token_check="decode")
    logits = hf_logits(hf, ex.tokens)[ex.labels != -100]
    ref = top_p_logprobs(logits, top_p)[0] if top_p < 1 else logits.log_softmax(-1)
    ids = [pos for s in span for pos in s.topk_ids]
    lps = [pos for s in span for pos in s.topk_logprobs]
    assert len(ids) == ref.shape[0]
    return ref, ids, lps


def _check_positions(ref, ids, lps, k=K):
    """Stored values equal HF's at the stored ids; the stored ids are HF's top ids (ties aside)."""
    short = 0
    for t, (pos_ids, pos_lps) in enumerate(zip(ids, lps)):
        want = ref[t, pos_ids]
        assert (torch.tensor(pos_lps) - want).abs().max().item() <= TOL, f"position {t}"
        finite = int(torch.isfinite(ref[t]).sum())
        assert len(pos_ids) == min(k, finite), f"position {t}: {len(pos_ids)} entries, {finite} possible"
        short += len(pos_ids) < k
        if len(pos_ids) < finite:  # nothing left out is more likely than the least likely kept
            rest = ref[t].clone()
            rest[pos_ids] = float("-inf")
            assert rest.max().item() <= min(pos_lps) + TOL, f"position {t}"
        assert pos_lps == sorted(pos_lps, reverse=True)
    return short


def test_generate_stores_the_top_k_of_the_sampling_distribution(llm, hf, tokenizer, prompts):
    from pear_mega.collect import SamplingConfig, generate

    rows, report = generate(llm, tokenizer, prompts, SamplingConfig(n=2, max_tokens=8), top_k_logprobs=K)
    assert report.rows == 2 and rows[0]["meta"]["behavior"]["topk_logprobs"] == K
    for row in rows:
        ref, ids, lps = _reference(tokenizer, hf, row)
        assert _check_positions(ref, ids, lps) == 0
    nucleus, _ = generate(llm, tokenizer, prompts, SamplingConfig(n=3, top_p=0.6, max_tokens=8), top_k_logprobs=K)
    short = 0
    for row in nucleus:
        ref, ids, lps = _reference(tokenizer, hf, row, top_p=0.6)
        short += _check_positions(ref, ids, lps)
    assert short > 0, "top_p = 0.6 must leave some positions with fewer than K tokens"


def test_score_stores_the_top_k_at_temperature_one(llm, hf, tokenizer):
    from pear_mega.collect import score

    rows = [
        {"prompt": "What is 2+3?", "response": "Answer: 5"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}]},
    ]
    scored, report = score(llm, tokenizer, rows, behavior="smollm2", top_k_logprobs=K)
    assert report.rows == 2 and scored[0]["meta"]["behavior"]["topk_logprobs"] == K
    assert len(scored[0]["response_topk_ids"]) == len(scored[0]["response_token_ids"])
    assert "topk_ids" in scored[1]["messages"][1] and "topk_ids" in scored[1]["messages"][3]
    for row in scored:
        ref, ids, lps = _reference(tokenizer, hf, row)
        assert _check_positions(ref, ids, lps) == 0
    # scoring again without a top-K drops the stale one
    again, _ = score(llm, tokenizer, scored, behavior="smollm2")
    assert "response_topk_ids" not in again[0] and "topk_logprobs" not in again[1]["messages"][3]
    assert "topk_logprobs" not in again[0]["meta"]["behavior"]
