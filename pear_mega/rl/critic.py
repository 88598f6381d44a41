"""The PPO value model: the policy's megatron GPT trunk with a scalar value head.

``build_critic`` builds a ``GPTModel`` exactly like the policy (same family, layer spec, TP/PP
split), loads the trunk from an HF checkpoint, and replaces the output layer by ``ValueHead``:

    V(s_t) = w · h_t + b        h_t [s, b, H] the final-norm hidden state at position t

so the model returns values ``[1, s, 1]`` instead of vocab-parallel logits. In the packed shifted
layout the value at position ``t`` is the value of the state *before* emitting ``labels[t]``
(the response token at that position), which is what GAE pairs with the token reward.

The head is untied (``share_embeddings_and_output_weights`` is switched off: the embedding stays
an input embedding only) and replicated on every tensor-parallel rank: its input is the full
hidden state (gathered along the sequence under sequence parallelism), so its gradient is the same
on every TP rank and megatron counts it once in the gradient norm (it carries no
``tensor_model_parallel`` flag). It starts at zero — V ≡ 0 — so the first advantages are the
plain discounted returns. Only the last pipeline stage has it.
"""

from __future__ import annotations

import torch


class ValueHead(torch.nn.Module):
    """Scalar head with the call signature of megatron's output layer: ``(hidden, weight=None,
    runtime_gather_output=None) -> (values [s, b, 1], None)``."""

    def __init__(self, hidden_size: int, dtype: torch.dtype, device, sequence_parallel: bool = False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, hidden_size, dtype=dtype, device=device))
        self.bias = torch.nn.Parameter(torch.zeros(1, dtype=dtype, device=device))
        self.sequence_parallel = sequence_parallel

    def forward(self, hidden_states: torch.Tensor, weight=None, runtime_gather_output=None):
        if self.sequence_parallel:
            from megatron.core.tensor_parallel import (
                gather_from_sequence_parallel_region,
            )

            hidden_states = gather_from_sequence_parallel_region(hidden_states)
        values = torch.nn.functional.linear(hidden_states, self.weight, self.bias)
        return values.float(), None


def build_critic(arch, ctx, hf_path: str, *, dtype: torch.dtype, use_te: bool | None = None,
                 load_weights: bool = True):
    """This rank's value model: ``build_gpt_model`` + HF trunk weights + ``ValueHead``.

    Returns the ``GPTModel`` (``pear_*`` attributes kept, so ``pear_mega.checkpointing`` saves and
    loads it like the policy); it maps ``(input_ids [1, s], positions, mask)`` to ``[1, s, 1]``.
    """
    from pear_mega.models import build_gpt_model, load_hf_checkpoint

    model = build_gpt_model(arch, ctx, dtype=dtype, use_te=use_te)
    if load_weights:
        load_hf_checkpoint(model, hf_path, arch, ctx)
    if ctx.is_last_stage:
        device = next(model.parameters()).device
        model.output_layer = ValueHead(arch.hidden_size, dtype, device, sequence_parallel=model.config.sequence_parallel)
    # Tied or not, the critic has no output embedding to share: megatron then skips the
    # first/last-stage embedding all-reduce and saves output_layer.* as the head's own tensors.
    model.share_embeddings_and_output_weights = False
    return model
