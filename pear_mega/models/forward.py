"""Forward-only logits through every pipeline stage (evaluation, conversion checks, tests)."""

from __future__ import annotations

import torch


def forward_logits(model, ctx, input_ids: torch.Tensor, position_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None, packed_seq_params=None) -> torch.Tensor | None:  # fmt: skip
    """Run one batch forward and return this TP rank's logits on the last stage.

    With ``pp > 1`` this drives megatron's pipeline schedule (``forward_only``, one microbatch);
    every rank of the model-parallel group must call it with the same shapes.

    Args:
        input_ids: ``[b, s]`` token ids (needed on the first stage; any tensor of that shape elsewhere).
        position_ids, attention_mask, packed_seq_params: from ``attention_inputs``.
    Returns:
        Vocab-parallel logits ``[b, s, V_pad / tp]`` on the last stage, None on the others.
    """
    if ctx.pp_size == 1:
        return model(input_ids, position_ids, attention_mask, packed_seq_params=packed_seq_params)

    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch = {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "attention_mask": attention_mask,
        "packed_seq_params": packed_seq_params,
    }

    def forward_step(data_iterator, chunk):
        data = next(data_iterator)
        output = chunk(data["input_ids"], data["position_ids"], data["attention_mask"],
                       packed_seq_params=data["packed_seq_params"])  # fmt: skip

        def collect(output_tensor, non_loss_data=False):
            return output_tensor

        return output, collect

    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([batch]),
        model=[model],
        num_microbatches=1,
        seq_length=input_ids.shape[1],
        micro_batch_size=input_ids.shape[0],
        forward_only=True,
        collect_non_loss_data=True,
    )
    return outputs[0] if ctx.is_last_stage else None
