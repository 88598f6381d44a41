"""What the multi-process RL tests share: a free TCP port for a gloo world, the chat probes and their
token ids, and the seeded per-shard perturbation that makes a refit move the engine."""

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
