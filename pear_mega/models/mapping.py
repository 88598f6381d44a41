"""The HF <-> megatron-core name and shape mapping, one table per model family.

This table is the single source of truth for moving weights between HF checkpoints and megatron
models: the offline conversion (``tools/convert_hf.py``, ``load_hf_checkpoint``) and the live
weight sync into the rollout engine (``checkpoint.iter_hf_tensors``) both go through it.

Why an own table: megatron-bridge (NVIDIA's converter) needs transformers < 5 and Transformer
Engine, neither of which fits this project's stack (transformers 5.16-5.19 for vllm, no TE on
CPU); mbridge works but is deprecated upstream. Three dense families fit in ~100 lines.

Megatron names are written in the *canonical* layout, the TE spec's (which is also the layout of
megatron's dist checkpoints): the pre-attention and pre-MLP RMSNorms are fused into the following
linear as ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``. The local spec keeps
them as separate modules (``input_layernorm.weight`` / ``pre_mlp_layernorm.weight``);
``local_name``/``canonical_name`` translate.

Tensor kinds and their tensor-parallel (TP) split, for ``tp`` ranks, rank ``r``:

- ``replicated``: RMSNorm weights, q/k norms; every rank holds the full tensor.
- ``vocab``: embedding and output layer ``[V, h]``; rows zero-padded to ``V_pad``
  (``ModelArch.padded_vocab_size``), then rank ``r`` holds rows ``[r*V_pad/tp, (r+1)*V_pad/tp)``.
- ``row``: row-parallel linears (``o_proj``, ``down_proj``) ``[h, in]``; split along ``in``.
- ``qkv``: megatron fuses q, k, v into one column-parallel linear, interleaved per KV group
  ``g = 0..ng-1`` as ``[q heads of g (np/ng of them), k_g, v_g]``, each head ``hd`` rows:
  ``linear_qkv.weight = [ng * (np/ng + 2) * hd, h]``; rank ``r`` holds groups
  ``[r*ng/tp, (r+1)*ng/tp)``, i.e. a contiguous row block. Biases (qwen2) follow the same layout.
- ``gate_up``: ``linear_fc1.weight`` holds, on every rank, ``cat(gate_r, up_r)`` where ``gate_r``,
  ``up_r`` are rank ``r``'s row chunks of ``gate_proj`` and ``up_proj``; at TP=1 that is
  ``cat(gate, up)`` ``[2 * ffn, h]``.

Pipeline parallel: ``pp`` stages hold ``L / pp`` consecutive layers each; stage ``p`` holds global
layers ``[p*L/pp, (p+1)*L/pp)`` under local indices ``0..L/pp-1``. The embedding lives on the first
stage, the final norm and output layer on the last. With tied embeddings and ``pp > 1`` the last
stage keeps its own copy ``output_layer.weight`` (megatron keeps it in sync through the embedding
group), filled from ``model.embed_tokens.weight``; with ``pp == 1`` there is no output weight.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from pear_mega.models.arch import ModelArch

REPLICATED, VOCAB, ROW, QKV, GATE_UP = "replicated", "vocab", "row", "qkv", "gate_up"


@dataclass(frozen=True)
class TensorMap:
    """One megatron tensor and the HF tensor(s) it is made of."""

    megatron: str
    """Canonical megatron name; per-layer entries are relative to ``decoder.layers.{i}.``."""
    hf: tuple[str, ...]
    """HF names; per-layer entries are relative to ``model.layers.{i}.``."""
    kind: str


_LAYER_COMMON = (
    TensorMap("self_attention.linear_qkv.layer_norm_weight", ("input_layernorm.weight",), REPLICATED),
    TensorMap(
        "self_attention.linear_qkv.weight",
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        QKV,
    ),
    TensorMap("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), ROW),
    TensorMap("mlp.linear_fc1.layer_norm_weight", ("post_attention_layernorm.weight",), REPLICATED),
    TensorMap("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), GATE_UP),
    TensorMap("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), ROW),
)
_QKV_BIAS = TensorMap(
    "self_attention.linear_qkv.bias",
    ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    QKV,
)
_QK_NORM = (
    TensorMap("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",), REPLICATED),
    TensorMap("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",), REPLICATED),
)

#: Per-layer tables, one per family.
LAYER_TABLES: dict[str, tuple[TensorMap, ...]] = {
    "llama": _LAYER_COMMON,
    "qwen2": _LAYER_COMMON[:2] + (_QKV_BIAS,) + _LAYER_COMMON[2:],
    "qwen3": _LAYER_COMMON[:2] + _QK_NORM + _LAYER_COMMON[2:],
}
EMBEDDING = TensorMap("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB)
FINAL_NORM = TensorMap("decoder.final_layernorm.weight", ("model.norm.weight",), REPLICATED)
OUTPUT = TensorMap("output_layer.weight", ("lm_head.weight",), VOCAB)
TIED_OUTPUT = TensorMap("output_layer.weight", ("model.embed_tokens.weight",), VOCAB)

# Local-spec module names of the two norms that the TE spec fuses into the next linear.
_LOCAL_RENAMES = (
    ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
    ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"),
)
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def layers_per_stage(arch: ModelArch, pp_size: int) -> int:
    arch.check_pipeline_parallel(pp_size)
    return arch.num_layers // pp_size


def layer_offset(arch: ModelArch, pp_rank: int, pp_size: int) -> int:
    """Global index of stage ``pp_rank``'s first layer."""
    return pp_rank * layers_per_stage(arch, pp_size)


def stage_of_layer(arch: ModelArch, layer: int, pp_size: int) -> int:
    return layer // layers_per_stage(arch, pp_size)


def stage_tensor_maps(arch: ModelArch, pp_rank: int, pp_size: int) -> list[TensorMap]:
    """The tensors stage ``pp_rank`` holds, with global layer indices filled in (canonical names)."""
    out: list[TensorMap] = []
    if pp_rank == 0:
        out.append(EMBEDDING)
    n = layers_per_stage(arch, pp_size)
    for layer in range(pp_rank * n, (pp_rank + 1) * n):
        for entry in LAYER_TABLES[arch.family]:
            out.append(
                TensorMap(
                    f"decoder.layers.{layer}.{entry.megatron}",
                    tuple(f"model.layers.{layer}.{h}" for h in entry.hf),
                    entry.kind,
                )
            )
    if pp_rank == pp_size - 1:
        out.append(FINAL_NORM)
        if not arch.tie_word_embeddings:
            out.append(OUTPUT)
        elif pp_size > 1:
            out.append(TIED_OUTPUT)
    return out


def sync_tensor_maps(arch: ModelArch, pp_rank: int, pp_size: int) -> list[TensorMap]:
    """The tensors of stage ``pp_rank`` a weight sync sends: ``stage_tensor_maps`` without the
    last stage's copy of a tied embedding (the embedding itself is sent, also as ``lm_head``)."""
    return [e for e in stage_tensor_maps(arch, pp_rank, pp_size) if e is not TIED_OUTPUT]


def all_tensor_maps(arch: ModelArch) -> list[TensorMap]:
    """Every tensor of the model at PP=1 (canonical names, global layers)."""
    return stage_tensor_maps(arch, 0, 1)


def hf_tensor_names(arch: ModelArch, include_tied_lm_head: bool = True) -> list[str]:
    """HF tensor names in table order; ``lm_head.weight`` is listed for tied models too by default."""
    names = [h for entry in all_tensor_maps(arch) for h in entry.hf]
    if arch.tie_word_embeddings and include_tied_lm_head:
        names.append("lm_head.weight")
    return names


def hf_tensor_shape(arch: ModelArch, hf_name: str) -> tuple[int, ...]:
    """The shape an HF tensor must have according to ``arch``."""
    h, hd, ffn = arch.hidden_size, arch.head_dim, arch.intermediate_size
    q, kv = arch.num_attention_heads * hd, arch.num_kv_heads * hd
    if hf_name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (arch.vocab_size, h)
    if hf_name == "model.norm.weight":
        return (h,)
    leaf = hf_name.split(".", 3)[-1] if hf_name.startswith("model.layers.") else hf_name
    shapes = {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.weight": (h, q),
        "self_attn.q_norm.weight": (hd,),
        "self_attn.k_norm.weight": (hd,),
        "mlp.gate_proj.weight": (ffn, h),
        "mlp.up_proj.weight": (ffn, h),
        "mlp.down_proj.weight": (h, ffn),
    }
    if leaf not in shapes:
        raise KeyError(f"{hf_name!r} is not a tensor of a {arch.family} model")
    return shapes[leaf]


def local_name(canonical: str, arch: ModelArch, pp_rank: int, pp_size: int, spec_layout: str) -> str:
    """Canonical global megatron name -> this stage's parameter name in a model of ``spec_layout``."""
    match = _LAYER_RE.match(canonical)
    if not match:
        return canonical
    layer, rest = int(match.group(1)), match.group(2)
    offset = layer_offset(arch, pp_rank, pp_size)
    if not offset <= layer < offset + layers_per_stage(arch, pp_size):
        raise ValueError(f"{canonical} is not on pipeline stage {pp_rank} of {pp_size}")
    if spec_layout == "local":
        for te_name, local in _LOCAL_RENAMES:
            if rest == te_name:
                rest = local
    elif spec_layout != "te":
        raise ValueError(f"spec_layout must be 'te' or 'local', got {spec_layout!r}")
    return f"decoder.layers.{layer - offset}.{rest}"


def canonical_name(local: str, arch: ModelArch, pp_rank: int, pp_size: int) -> str:
    """Inverse of ``local_name``: a stage's parameter name -> canonical global name."""
    match = _LAYER_RE.match(local)
    if not match:
        return local
    rest = match.group(2)
    for te_name, local_leaf in _LOCAL_RENAMES:
        if rest == local_leaf:
            rest = te_name
    return f"decoder.layers.{int(match.group(1)) + layer_offset(arch, pp_rank, pp_size)}.{rest}"


# ----------------------------------------------------------------------------- HF -> megatron


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: ModelArch) -> torch.Tensor:
    """``[np*hd, ...], [ng*hd, ...], [ng*hd, ...]`` -> ``[ng*(np/ng+2)*hd, ...]`` (per-group interleave)."""
    ng, hd, hpg = arch.num_kv_heads, arch.head_dim, arch.heads_per_group
    tail = q.shape[1:]
    fused = torch.cat(
        [q.reshape(ng, hpg * hd, *tail), k.reshape(ng, hd, *tail), v.reshape(ng, hd, *tail)], dim=1
    )
    return fused.reshape(ng * (hpg + 2) * hd, *tail)


def _split_qkv(fused: torch.Tensor, arch: ModelArch, num_groups: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's fused rows ``[groups × (q_per_group + 2) × head_dim, ...]`` (each group: its
    query heads, then its key head, then its value head) -> q, k, v rows in HF order.
    ``num_groups``: groups in ``fused`` (default all; a TP shard holds ``num_kv_heads / tp``)."""
    ng = arch.num_kv_heads if num_groups is None else num_groups
    hd, hpg = arch.head_dim, arch.heads_per_group
    tail = fused.shape[1:]
    grouped = fused.reshape(ng, (hpg + 2) * hd, *tail)
    q, k, v = torch.split(grouped, [hpg * hd, hd, hd], dim=1)
    return q.reshape(ng * hpg * hd, *tail), k.reshape(ng * hd, *tail), v.reshape(ng * hd, *tail)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])], dim=0)


def shard_tensor(entry: TensorMap, hf: list[torch.Tensor], arch: ModelArch, tp_rank: int, tp_size: int,
                 padded_vocab_size: int) -> torch.Tensor:  # fmt: skip
    """Build rank ``tp_rank``'s shard of ``entry`` from its (full) HF tensors."""
    if entry.kind == REPLICATED:
        return hf[0]
    if entry.kind == VOCAB:
        return _pad_rows(hf[0], padded_vocab_size).chunk(tp_size, dim=0)[tp_rank]
    if entry.kind == ROW:
        return hf[0].chunk(tp_size, dim=1)[tp_rank]
    if entry.kind == QKV:
        return _fuse_qkv(*hf, arch).chunk(tp_size, dim=0)[tp_rank]
    if entry.kind == GATE_UP:
        gate, up = hf
        return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]], dim=0)
    raise ValueError(f"unknown tensor kind {entry.kind!r}")


def iter_megatron_shard(
    get_hf_tensor: Callable[[str], torch.Tensor],
    arch: ModelArch,
    tp_rank: int,
    tp_size: int,
    pp_rank: int,
    pp_size: int,
    spec_layout: str,
    *,
    padded_vocab_size: int | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(local megatron name, shard)`` one tensor at a time (see ``hf_to_megatron_shard``)."""
    arch.check_tensor_parallel(tp_size)
    if padded_vocab_size is None:
        padded_vocab_size = arch.padded_vocab_size(tp_size)
    if padded_vocab_size % tp_size or padded_vocab_size < arch.vocab_size:
        raise ValueError(f"padded_vocab_size={padded_vocab_size} does not fit vocab {arch.vocab_size} at tp={tp_size}")
    for entry in stage_tensor_maps(arch, pp_rank, pp_size):
        tensors = []
        for name in entry.hf:
            tensor = get_hf_tensor(name)
            expected = hf_tensor_shape(arch, name)
            if tuple(tensor.shape) != expected:
                what = "vocabulary size" if entry.kind == VOCAB else "shape"
                raise ValueError(
                    f"HF tensor {name} has shape {tuple(tensor.shape)} but config.json implies {expected} "
                    f"(mismatched {what})"
                )
            tensors.append(tensor)
        shard = shard_tensor(entry, tensors, arch, tp_rank, tp_size, padded_vocab_size)
        yield local_name(entry.megatron, arch, pp_rank, pp_size, spec_layout), shard.contiguous()


def hf_to_megatron_shard(
    get_hf_tensor: Callable[[str], torch.Tensor],
    arch: ModelArch,
    tp_rank: int,
    tp_size: int,
    pp_rank: int,
    pp_size: int,
    spec_layout: str,
    *,
    padded_vocab_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """This rank's megatron parameters from HF tensors.

    Args:
        get_hf_tensor: returns the full HF tensor of a name; called once per needed tensor, so a
            lazy reader (safetensors ``safe_open``) keeps host memory near one shard.
        arch: the architecture.
        tp_rank, tp_size, pp_rank, pp_size: this rank's place.
        spec_layout: "te" or "local" (``model.pear_spec_layout``).
        padded_vocab_size: default ``arch.padded_vocab_size(tp_size)``.
    Returns:
        ``{local megatron parameter name: tensor}`` exactly covering the stage's parameters.
    """
    shards = iter_megatron_shard(
        get_hf_tensor, arch, tp_rank, tp_size, pp_rank, pp_size, spec_layout, padded_vocab_size=padded_vocab_size
    )
    return dict(shards)


# ----------------------------------------------------------------------------- megatron -> HF


@functools.lru_cache(maxsize=16)
def _entries_by_name(arch: ModelArch) -> dict[str, TensorMap]:
    return {entry.megatron: entry for entry in all_tensor_maps(arch)}


def entry_for(canonical: str, arch: ModelArch) -> TensorMap:
    """The table entry (with layer indices filled) of a canonical global megatron name."""
    entry = _entries_by_name(arch).get(canonical)
    if entry is not None:
        return entry
    if canonical == OUTPUT.megatron:
        return TIED_OUTPUT if arch.tie_word_embeddings else OUTPUT
    raise KeyError(f"{canonical!r} is not a parameter of a {arch.family} model")


def _cat(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    """``torch.cat`` without the copy of a single tensor (TP=1)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


def megatron_to_hf(canonical: str, tp_shards: list[torch.Tensor], arch: ModelArch) -> list[tuple[str, torch.Tensor]]:
    """Full HF tensors from the TP shards of one megatron parameter.

    Args:
        canonical: canonical global megatron name (``canonical_name`` of a stage's parameter).
        tp_shards: the parameter on TP ranks ``0..tp-1`` in rank order (one tensor at TP=1).
        arch: the architecture.
    Returns:
        ``[(hf_name, tensor)]`` in table order, contiguous; vocab padding removed. At TP=1 every
        tensor but q/k/v (regrouped rows) is a view of the shard, not a copy: the live weight
        sync reads them before the parameters change again.
    """
    entry = entry_for(canonical, arch)
    if entry.kind == REPLICATED:
        tensors = [tp_shards[0]]
    elif entry.kind == VOCAB:
        tensors = [_cat(tp_shards, dim=0)[: arch.vocab_size]]
    elif entry.kind == ROW:
        tensors = [_cat(tp_shards, dim=1)]
    elif entry.kind == QKV:
        tensors = list(_split_qkv(_cat(tp_shards, dim=0), arch))
    elif entry.kind == GATE_UP:
        halves = [shard.chunk(2, dim=0) for shard in tp_shards]
        tensors = [_cat([g for g, _ in halves], dim=0), _cat([u for _, u in halves], dim=0)]
    else:
        raise ValueError(f"unknown tensor kind {entry.kind!r}")
    return [(name, t.contiguous()) for name, t in zip(entry.hf, tensors)]


def place_shard(canonical: str, shard: torch.Tensor, tp_rank: int, tp_size: int, arch: ModelArch
                ) -> list[tuple[str, tuple[slice, ...], torch.Tensor]]:
    """Where one TP rank's shard of a megatron parameter lies in the full HF tensors: the inverse
    of ``megatron_to_hf`` for a single shard, so that each rank can write its own part of a full
    tensor (``pear_mega.models.staging``) instead of sending it to a rank that merges.

    Returns ``[(hf_name, index, source)]``: ``full[hf_name][index] = source`` for each, over all
    ranks, rebuilds exactly what ``megatron_to_hf`` returns. ``source`` is a view of ``shard``.
    Per kind, with ``r = tp_rank``, ``n`` = the shard's rows and ``k`` its columns:

        replicated  rank 0 writes the whole tensor (the others: nothing)
        vocab       rows [r·n, (r+1)·n) ∩ [0, vocab_size)   (the padding rows are dropped)
        row         columns [r·k, (r+1)·k)
        qkv         the shard's kv groups [r·g, (r+1)·g), g = num_kv_heads / tp, split into their
                    q rows [r·g·q_per_group·d, ...) and k / v rows [r·g·d, (r+1)·g·d)
        gate_up     gate and up halves, rows [r·n/2, (r+1)·n/2) of each
    """
    entry = entry_for(canonical, arch)
    r = tp_rank
    if entry.kind == REPLICATED:
        return [(entry.hf[0], (), shard)] if r == 0 else []
    if entry.kind == VOCAB:
        n = shard.shape[0]
        lo, hi = r * n, min((r + 1) * n, arch.vocab_size)
        return [(entry.hf[0], (slice(lo, hi),), shard[: hi - lo])] if hi > lo else []
    if entry.kind == ROW:
        k = shard.shape[1]
        return [(entry.hf[0], (slice(None), slice(r * k, (r + 1) * k)), shard)]
    if entry.kind == QKV:
        if arch.num_kv_heads % tp_size:
            raise ValueError(f"place_shard: {arch.num_kv_heads} kv heads do not split over tp={tp_size}")
        groups = arch.num_kv_heads // tp_size
        parts = _split_qkv(shard, arch, groups)
        return [(name, (slice(r * p.shape[0], (r + 1) * p.shape[0]),), p) for name, p in zip(entry.hf, parts)]
    if entry.kind == GATE_UP:
        halves = shard.chunk(2, dim=0)
        return [(name, (slice(r * h.shape[0], (r + 1) * h.shape[0]),), h) for name, h in zip(entry.hf, halves)]
    raise ValueError(f"unknown tensor kind {entry.kind!r}")
