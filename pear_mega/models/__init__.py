"""megatron-core GPT models from HF configs, and weights between HF and megatron.

    arch = ModelArch.from_hf(hf_dir)
    model = build_gpt_model(arch, ctx)                 # ctx from pear_mega.parallel.init_parallel
    load_hf_checkpoint(model, hf_dir, arch, ctx)
    position_ids, mask, packed = attention_inputs(cu_seqlens, seq_len, ctx.device)
    logits = model(input_ids, position_ids, mask, packed_seq_params=packed)   # [1, s, V_pad/tp]

Importing this package is cheap: megatron is imported inside the functions.
"""

from pear_mega.models.arch import ModelArch, RopeScaling
from pear_mega.models.build import (
    SPEC_LOCAL,
    SPEC_TE,
    attention_inputs,
    build_gpt_model,
    layer_spec,
    transformer_config,
)
from pear_mega.models.checkpoint import (
    CheckpointMeta,
    SafetensorsReader,
    hf_tensor_senders,
    iter_hf_tensors,
    load_checkpoint,
    load_hf_checkpoint,
    model_sharded_state_dict,
    read_checkpoint_meta,
    save_checkpoint,
    save_hf_checkpoint,
    unwrap_model,
)
from pear_mega.models.forward import forward_logits
from pear_mega.models.mapping import (
    hf_tensor_names,
    hf_to_megatron_shard,
    megatron_to_hf,
)

__all__ = [
    "SPEC_LOCAL",
    "SPEC_TE",
    "CheckpointMeta",
    "ModelArch",
    "RopeScaling",
    "SafetensorsReader",
    "attention_inputs",
    "build_gpt_model",
    "forward_logits",
    "hf_tensor_names",
    "hf_to_megatron_shard",
    "hf_tensor_senders",
    "iter_hf_tensors",
    "layer_spec",
    "load_checkpoint",
    "load_hf_checkpoint",
    "megatron_to_hf",
    "model_sharded_state_dict",
    "read_checkpoint_meta",
    "save_checkpoint",
    "save_hf_checkpoint",
    "transformer_config",
    "unwrap_model",
]
