"""What the multi-process RL tests share: a free TCP port for a gloo world, the chat probes and their
token ids, the seeded per-shard perturbation that makes a refit move the engine, and the trainer's
own log-probs of the probes."""

import socket

import torch

PROBES = [
    ([{"role": "user", "content": "What is 3 times 4?"}], "Answer: 12"),
    ([{"role": "user", "content": "Name a primary color."}], "Blue is a primary color."),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def perturb(model, tp_rank: int, seed: int, noise: float) -> None:
    """Add noise to every parameter; the same noise on every TP rank for replicated ones."""
    from pear_mega.models import unwrap_model

    with torch.no_grad():
        for i, (_, p) in enumerate(unwrap_model(model).named_parameters()):
            shard = tp_rank if getattr(p, "tensor_model_parallel", False) else 0
            g = torch.Generator().manual_seed(seed * 1_000_003 + i * 101 + shard)
            p.add_(torch.randn(p.shape, generator=g) * noise)


def probe_ids(model_dir: str):
    """Chat prompts as the engine encodes them (template with the generation prompt) and answers."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tok.encode(tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True),
                          add_special_tokens=False) for m, _ in PROBES]
    return prompts, [tok.encode(a, add_special_tokens=False) for _, a in PROBES]


def trainer_logprobs(model, ctx, arch, prompts, responses) -> list[torch.Tensor]:
    """log π_trainer(response_t | ...) at temperature 1 from the vocab-parallel logits (collective
    over the TP group; every TP rank gets the result)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from pear_mega.models import attention_inputs, forward_logits

    model.eval()
    out = []
    for p, r in zip(prompts, responses):
        ids = torch.tensor([p + r])
        position_ids, mask, packed = attention_inputs(torch.tensor([0, ids.shape[1]]), ids.shape[1], ctx.device)
        with torch.no_grad():
            logits = forward_logits(model, ctx, ids, position_ids, mask, packed)[0].float()  # [s, V_pad/tp]
        v_local = logits.shape[-1]
        n_valid = max(0, min(v_local, arch.vocab_size - ctx.tp_rank * v_local))
        logits = logits.masked_fill(torch.arange(v_local) >= n_valid, float("-inf"))
        logp = -vocab_parallel_cross_entropy(logits[:-1].unsqueeze(1), ids[0, 1:].unsqueeze(1))[:, 0]
        out.append(logp[len(p) - 1 :])
    return out
