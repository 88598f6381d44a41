"""megatron-core ``GPTModel`` from a ``ModelArch``: config, layer spec, attention inputs.

Layer spec, chosen once per model (and logged):

- **TE** (``get_gpt_layer_with_transformer_engine_spec``) when Transformer Engine imports and CUDA
  is present: fused layernorm+linear (``linear_qkv.layer_norm_weight``), TE attention, packed
  sequences as THD through ``PackedSeqParams``.
- **local** (``get_gpt_layer_local_spec``) otherwise, with megatron's unfused core attention
  swapped for ``SDPAttention`` (``torch.nn.functional.scaled_dot_product_attention``): the
  unfused one materializes the ``[s, s]`` scores and fills the mask separately, which made it most of
  the gap to HF's training step on CPU (docs/benchmarks.md, "SFT step"). Packed
  sequences are expressed as a block-diagonal causal mask. The norms are cast to the model dtype.
  On CPU the linear layers run ``pear_mega.cpu.linear`` (bf16 GEMMs in fp32, weight
  gradients accumulated into DDP's buffer), and ``SDPAttention`` computes bf16 attention in fp32.

The model takes ``input_ids [1, s]`` and returns vocab-parallel logits ``[1, s, V_pad / tp]`` on the
last pipeline stage (``parallel_output=True``: the full vocabulary is never gathered; the loss is
computed on the shards). ``V_pad = arch.padded_vocab_size(tp)``; the padded logit columns are zero
and must be masked by the loss (its ``vocab_size`` argument).

RoPE and packing: with the local spec megatron applies RoPE at absolute pack positions
``0..s-1``. Rotary attention scores depend only on the distance between query and key, and the
block-diagonal mask keeps every query inside its own sequence, so this equals RoPE at positions
reset per sequence (up to float rounding). ``attention_inputs`` still returns the reset
``position_ids`` (the THD path and learned position embeddings use them).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from pear_mega.models.arch import ModelArch

logger = logging.getLogger(__name__)

SPEC_TE = "te"
SPEC_LOCAL = "local"


def _sdpa_attention_class():
    """Build ``SDPAttention`` lazily: importing megatron at module import time is not allowed."""
    global SDPAttention
    if SDPAttention is not None:
        return SDPAttention
    from megatron.core import tensor_parallel
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    class _SDPAttention(DotProductAttention):
        """Megatron core attention computed by ``F.scaled_dot_product_attention``.

        Inputs ``query [sq, b, np, hn]``, ``key``/``value [sk, b, ng, hn]`` (this rank's heads; ``ng``
        KV groups, query head ``i`` uses group ``i // (np/ng)``, the same grouping as SDPA's
        ``enable_gqa``), ``attention_mask`` bool ``[b|1, 1, sq, sk]`` with True = masked (megatron's
        convention) or None for plain causal attention. Returns ``[sq, b, np * hn]``.

            out = softmax(q k^T * softmax_scale + mask) v
        """

        def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                    attention_bias=None, packed_seq_params=None):  # fmt: skip
            if packed_seq_params is not None:
                raise ValueError(
                    "SDPAttention (local layer spec) does not take packed_seq_params: pass the "
                    "block-diagonal attention_mask from attention_inputs(..., use_te=False)"
                )
            if attention_bias is not None:
                raise ValueError("SDPAttention does not support attention_bias")
            mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
            sq, b = query.shape[0], query.shape[1]
            q = query.permute(1, 2, 0, 3)  # [b, np, sq, hn]
            k = key.permute(1, 2, 0, 3)  # [b, ng, sk, hn]
            v = value.permute(1, 2, 0, 3)
            k, v, mask, is_causal, gqa = sdpa_inputs(q, k, v, attention_mask, mask_type == AttnMaskType.causal,
                                                     expand_kv=q.is_cuda)
            dropout_p = self.attention_dropout.p if self.training else 0.0
            dtype = q.dtype
            if q.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
                # On CPUs without bf16 instructions torch's flash kernel is 4-7x slower in bf16
                # than in fp32; in fp32 it is fast and at least as precise.
                q, k, v = q.float(), k.float(), v.float()
            if dropout_p > 0.0 and not self.config.sequence_parallel:
                with tensor_parallel.get_cuda_rng_tracker().fork():
                    out = torch.nn.functional.scaled_dot_product_attention(
                        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=self.softmax_scale, enable_gqa=gqa,
                    )  # fmt: skip
            else:
                out = torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                    scale=self.softmax_scale, enable_gqa=gqa,
                )  # fmt: skip
            return out.to(dtype).permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)

    _SDPAttention.__name__ = _SDPAttention.__qualname__ = "SDPAttention"
    SDPAttention = _SDPAttention
    return SDPAttention


SDPAttention: Any = None


def sdpa_inputs(q, k, v, attention_mask, causal: bool, expand_kv: bool):
    """``(k, v, attn_mask, is_causal, enable_gqa)`` for ``scaled_dot_product_attention``.

    q ``[b, np, sq, hn]``, k/v ``[b, ng, sk, hn]``; ``attention_mask`` bool, True = masked (megatron),
    or None for plain causal attention when ``causal``. ``expand_kv`` (CUDA): repeat each KV group
    for its ``np / ng`` query heads instead of ``enable_gqa=True``: no fused CUDA kernel takes
    ``enable_gqa`` together with a mask, and PyTorch would fall back to the math kernel
    (``O(s²)`` memory per head); with expanded K/V the memory-efficient kernel takes the mask, and a
    single-sequence pack (no mask, ``is_causal``) runs flash attention. Same values either way.
    """
    if attention_mask is not None:
        mask, is_causal = ~attention_mask, False  # SDPA: True = attend
    else:
        mask, is_causal = None, causal
    gqa = q.shape[1] != k.shape[1]
    if gqa and expand_kv:
        group = q.shape[1] // k.shape[1]  # query head i uses KV group i // group, as enable_gqa does
        k, v, gqa = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), False
    return k, v, mask, is_causal, gqa


def resolve_use_te(use_te: bool | None) -> bool:
    """``use_te=None`` means: TE when it imports and CUDA is present. ``True`` without TE raises."""
    from pear_mega.platform import te_available, use_gpu

    if use_te is False:
        return False
    gpu = use_gpu()
    te = te_available() if (gpu or use_te) else False  # raises when TE is installed but broken
    if use_te is None:
        return te and gpu
    if not (te and gpu):
        missing = " and ".join(x for x, ok in (("Transformer Engine", te), ("a CUDA device", gpu)) if not ok)
        raise ValueError(f"use_te=True needs Transformer Engine and a CUDA device; missing here: {missing}")
    return True


def layer_spec(arch: ModelArch, use_te: bool):
    """The transformer layer ``ModuleSpec`` for ``arch`` (TE or local + SDPA, see module docstring)."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_norm)
    spec = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=arch.qk_norm, normalization="RMSNorm")
    attn = spec.submodules.self_attention
    attn_sub = dataclasses.replace(attn.submodules, core_attention=_sdpa_attention_class())
    attn = dataclasses.replace(attn, submodules=attn_sub)
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, self_attention=attn))


def transformer_config(arch: ModelArch, ctx, dtype: torch.dtype = torch.float32, use_te: bool = False):
    """megatron ``TransformerConfig`` reproducing the HF model's forward pass exactly.

    Dropouts are 0 (HF inference semantics; these families train without dropout). Fusions that
    need TE/apex kernels stay off on CPU.
    """
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    gpu = ctx.device.type == "cuda"
    cfg = ctx.config
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.intermediate_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=float(arch.hf_config.get("attention_dropout", 0.0) or 0.0),
        init_method_std=arch.initializer_range,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=ctx.tp_size,
        pipeline_model_parallel_size=ctx.pp_size,
        context_parallel_size=ctx.cp_size,
        sequence_parallel=cfg.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not gpu,
        # The pipeline schedules take `seq_length` per call, so packs may change length between
        # calls; within one call every microbatch has the same length (no shape exchange).
        variable_seq_lengths=False,
        apply_rope_fusion=gpu and use_te,
        # no bias and no dropout in these models: the fused op would only add a compile (and a
        # recompile per new RL sequence length) for an identity
        bias_dropout_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        masked_softmax_fusion=False,
    )


def build_gpt_model(
    arch: ModelArch,
    ctx,
    *,
    dtype: torch.dtype = torch.float32,
    use_te: bool | None = None,
    make_vocab_size_divisible_by: int = 128,
    padded_vocab_size: int | None = None,
):
    """Build this rank's ``GPTModel`` (pre/post_process from the pipeline stage in ``ctx``).

    Args:
        arch: the architecture (``ModelArch.from_hf``).
        ctx: ``pear_mega.parallel.ParallelContext``.
        dtype: parameter dtype (fp32 on CPU; bf16 on GPU).
        use_te: None = TE spec when available on GPU, else the local spec with SDPA.
        make_vocab_size_divisible_by: see ``ModelArch.padded_vocab_size``.
        padded_vocab_size: an explicit padded vocabulary (e.g. the one a checkpoint was saved
            with); must be ``>= arch.vocab_size`` and divisible by the TP size.
    Returns:
        The model, with ``pear_spec_layout`` ("te" | "local") and ``pear_arch`` attributes.
    Raises:
        ValueError: TP does not divide the heads, PP does not divide the layers, bad vocab padding.
    """
    from megatron.core.models.gpt import GPTModel

    arch.check_tensor_parallel(ctx.tp_size)
    arch.check_pipeline_parallel(ctx.pp_size)
    te = resolve_use_te(use_te)
    if padded_vocab_size is None:
        padded_vocab_size = arch.padded_vocab_size(ctx.tp_size, make_vocab_size_divisible_by)
    if padded_vocab_size < arch.vocab_size or padded_vocab_size % ctx.tp_size:
        raise ValueError(
            f"padded_vocab_size={padded_vocab_size} must be >= vocab_size={arch.vocab_size} and "
            f"divisible by tensor_parallel={ctx.tp_size}"
        )
    config = transformer_config(arch, ctx, dtype=dtype, use_te=te)
    spec = layer_spec(arch, te)
    scaling = arch.rope_scaling
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab_size,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=ctx.is_first_stage,
        post_process=ctx.is_last_stage,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=arch.rope_theta,
        rope_scaling=scaling is not None and scaling.rope_type == "llama3",
        rope_scaling_factor=scaling.factor if scaling is not None and scaling.rope_type == "llama3" else 8.0,
        seq_len_interpolation_factor=scaling.factor if scaling is not None and scaling.rope_type == "linear" else None,
    )
    if scaling is not None and scaling.rope_type == "llama3" and hasattr(model, "rotary_pos_emb"):
        rope = model.rotary_pos_emb
        dim = arch.head_dim
        base = 1.0 / (arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=rope.inv_freq.device) / dim))
        # Megatron's constructor fixes low/high_freq_factor and the original context at 1, 4, 8192.
        rope.inv_freq = rope._apply_scaling(
            base,
            factor=scaling.factor,
            low_freq_factor=scaling.low_freq_factor,
            high_freq_factor=scaling.high_freq_factor,
            original_max_position_embeddings=scaling.original_max_position_embeddings,
        )
    if not te:
        _fix_local_norm_dtype(model, dtype)
    if ctx.device.type == "cuda":
        model = model.to(ctx.device)
    else:
        from pear_mega.cpu.linear import install_cpu_linear

        install_cpu_linear(model)
    model.pear_spec_layout = SPEC_TE if te else SPEC_LOCAL
    model.pear_arch = arch
    model.pear_padded_vocab_size = padded_vocab_size
    if ctx.rank == 0:
        logger.info(
            "GPTModel %s: %s layer spec (%s), tp=%d pp=%d, vocab %d padded to %d, dtype %s",
            arch.family, "Transformer Engine" if te else "local + SDPA core attention",
            "TE fused norms, THD packing" if te else "block-diagonal mask packing",
            ctx.tp_size, ctx.pp_size, arch.vocab_size, padded_vocab_size, dtype,
        )  # fmt: skip
    return model


def _fix_local_norm_dtype(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Give the local spec's norms the model's parameter dtype.

    megatron's ``WrappedTorchNorm`` builds ``torch.nn.RMSNorm`` / ``LayerNorm`` without
    ``params_dtype`` (megatron's own trainer later casts the whole model through
    ``Float16Module``), so in a bf16 model their weights would stay fp32: a mixed-dtype norm that
    cannot use torch's fused kernel, and weights that differ from the HF bf16 model's.
    """
    for module in model.modules():
        if isinstance(module, (torch.nn.RMSNorm, torch.nn.LayerNorm)):
            module.to(dtype)


def attention_inputs(cu_seqlens: torch.Tensor, seq_len: int, device, *, use_te: bool | None = None,
                     causal_without_mask: bool | None = None):
    """Positions and attention structure of one pack of sequences.

    Args:
        cu_seqlens: ``[B+1]`` int boundaries of the packed sequences (``cu_seqlens[0] == 0``);
            tokens from ``cu_seqlens[-1]`` to ``seq_len`` (padding) form one more block.
        seq_len: ``s``, the pack length fed to the model.
        device: where the returned tensors live.
        use_te: as in ``build_gpt_model`` (None = TE on GPU when available); selects the mask
            (local spec) or ``PackedSeqParams`` (TE spec).
        causal_without_mask: local spec, a pack that is one sequence without padding: return no
            mask, so attention runs causal (``is_causal``, a fused flash kernel on CUDA) instead of
            through an ``[s, s]`` mask. None = on a CUDA ``device``.
    Returns:
        ``(position_ids [1, s] int64`` reset to 0 at every sequence start,
        ``attention_mask``: bool ``[1, 1, s, s]``, True = masked, block-diagonal causal (local
        spec), None (TE spec, or one sequence with ``causal_without_mask``), ``packed_seq_params``:
        ``PackedSeqParams(qkv_format="thd")`` (TE spec) or None (local spec)``)``.
    """
    cu = torch.as_tensor(cu_seqlens, dtype=torch.int64).flatten().cpu()
    if cu.numel() < 2 or cu[0].item() != 0:
        raise ValueError(f"attention_inputs: cu_seqlens must start at 0 and have >= 2 entries, got {cu.tolist()}")
    if bool((cu[1:] < cu[:-1]).any()) or cu[-1].item() > seq_len:
        raise ValueError(
            f"attention_inputs: cu_seqlens must be non-decreasing and end at <= seq_len={seq_len}, "
            f"got {cu.tolist()}"
        )
    if cu[-1].item() < seq_len:
        cu = torch.cat([cu, torch.tensor([seq_len])])
    lengths = cu[1:] - cu[:-1]
    seq_id = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)  # [s]
    starts = torch.repeat_interleave(cu[:-1], lengths)
    position_ids = (torch.arange(seq_len) - starts).unsqueeze(0).to(device)
    if resolve_use_te(use_te):
        from megatron.core.packed_seq_params import PackedSeqParams

        cu32 = cu.to(device=device, dtype=torch.int32)
        max_len = int(lengths.max().item())
        params = PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu32, cu_seqlens_kv=cu32, max_seqlen_q=max_len, max_seqlen_kv=max_len
        )
        return position_ids, None, params
    if causal_without_mask is None:
        causal_without_mask = torch.device(device).type == "cuda"
    if causal_without_mask and lengths.numel() == 1:
        return position_ids, None, None
    idx = torch.arange(seq_len)
    allowed = (seq_id[:, None] == seq_id[None, :]) & (idx[None, :] <= idx[:, None])
    return position_ids, (~allowed).view(1, 1, seq_len, seq_len).to(device), None
