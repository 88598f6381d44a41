"""A megatron dist checkpoint written one rank at a time, in one process, without a process group.

``save_checkpoint_streaming`` writes the model-only ``torch_dist`` checkpoint that
``checkpoint.save_checkpoint`` writes from the ``tp * pp`` ranks of a megatron GPTModel, with no
model and no process group: ``rank_sharded_tensors`` reproduces, for one rank, the entries of
``GPTModel.sharded_state_dict(prefix="model.")`` that dist_checkpointing stores from it, and
``torch.distributed.checkpoint``'s planner and file writer are driven as megatron's torch_dist
strategy drives them, with its collectives (gather of the local plans, of the write results)
replaced by loops over the ranks. Host memory: one rank's tensors at a time. The streaming
``tools/convert_hf.py import`` feeds it HF tensors through the mapping table
(``pear_mega.models.convert``).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import os
import re
from pathlib import Path
from typing import Any

import torch

from pear_mega.cpu.memory import heap_trimmer
from pear_mega.models.arch import ModelArch
from pear_mega.models.checkpoint import MODEL_PREFIX, CheckpointMeta, _write_pear_files
from pear_mega.models.mapping import GATE_UP, REPLICATED, ROW, VOCAB, stage_tensor_maps

#: Linear modules whose (empty) ``_extra_state`` megatron saves as one ShardedObject per layer.
EXTRA_STATE_MODULES = (
    "self_attention.linear_qkv",
    "self_attention.linear_proj",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
)
_LAYER_NAME = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def rank_sharded_tensors(named_shards, arch: ModelArch, tp_rank: int, tp_size: int, pp_rank: int,
                         pp_size: int) -> list:  # fmt: skip
    """What rank ``(tp_rank, pp_rank)`` of a ``tp_size x pp_size`` GPTModel writes to a dist checkpoint.

    The result equals the entries of ``model.sharded_state_dict(prefix="model.")`` after megatron's
    ``apply_factories`` whose ``replica_id`` is main (all zeros), i.e. what ``dist_checkpointing.save``
    stores from that rank, built without a model or a process group:

    - Layers are stacked: ``decoder.layers.{g}.{rest}`` (global layer ``g`` of ``L``) is the slice
      ``g`` of ``model.decoder.layers.{rest}`` (a leading axis of size ``L``, ``prepend_axis_num=1``).
    - TP: ``vocab`` and ``qkv`` tensors are split along their rows, ``row`` tensors along their
      columns; ``linear_fc1`` (``[2*ffn/tp, h]`` = ``cat(gate_r, up_r)`` locally) goes through
      megatron's swiglu factory: the global ``[2*ffn, h]`` is ``[gate; up]``, rank ``r``'s gate
      rows are fragment ``r`` and its up rows fragment ``tp + r`` of ``2*tp``.
    - Replicated tensors (norms) and the per-layer ``_extra_state`` objects (``None``: the local
      spec's linears have no extra state) are written by TP rank 0 only (replica ``(0, tp_rank, 0)``).
    - Embedding and output layer carry ``allow_shape_mismatch`` (vocabulary padding). A tied output
      layer on the last stage of ``pp > 1`` is a replica of the embedding: not written.

    Args:
        named_shards: ``(canonical megatron name, this rank's tensor)`` for the stage's tensors
            (``mapping.stage_tensor_maps``), shapes as ``hf_to_megatron_shard`` makes them; the
            tied output layer's copy (last stage, ``pp > 1``) may be left out.
    Returns:
        megatron ``ShardedTensor`` / ``ShardedObject`` list.
    Raises:
        ValueError: a name that is not on the stage, or a stage tensor missing.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedObject, is_main_replica

    expected = {entry.megatron: entry for entry in stage_tensor_maps(arch, pp_rank, pp_size)}
    # The tied output copy may be left out: it is not written.
    required = set(expected) - ({"output_layer.weight"} if arch.tie_word_embeddings else set())
    seen: set[str] = set()
    out: list = []
    num_layers = arch.num_layers
    for name, tensor in named_shards:
        if name not in expected:
            raise ValueError(f"{name!r} is not a tensor of pipeline stage {pp_rank} of {pp_size}")
        if name in seen:
            raise ValueError(f"{name!r} given twice for rank tp={tp_rank} pp={pp_rank}")
        seen.add(name)
        kind = expected[name].kind
        if arch.tie_word_embeddings and name == "output_layer.weight":
            continue  # megatron: replica (1, 0, dp) of the embedding, never saved
        match = _LAYER_NAME.match(name)
        if match:
            layer, rest = int(match.group(1)), match.group(2)
            key, prepend = f"{MODEL_PREFIX}decoder.layers.{rest}", ((0, layer, num_layers),)
        else:
            key, prepend = MODEL_PREFIX + name, ()
        p = len(prepend)
        shard = functools.partial(_sharded_tensor, key, prepend, kind == VOCAB)
        if kind == REPLICATED:
            shards = [shard(tensor, replica=(0, tp_rank, 0))]
        elif kind == GATE_UP:
            gate, up = torch.chunk(tensor, 2, dim=0)
            shards = [shard(gate, (p, tp_rank, 2 * tp_size)), shard(up, (p, tp_size + tp_rank, 2 * tp_size))]
        else:
            shards = [shard(tensor, (p + (1 if kind == ROW else 0), tp_rank, tp_size))]
        out.extend(sh for sh in shards if is_main_replica(sh.replica_id))
        module = rest.removesuffix(".weight") if match else None
        if module in EXTRA_STATE_MODULES and tp_rank == 0:
            extra_key = f"{MODEL_PREFIX}decoder.layers.{module}._extra_state"
            out.append(ShardedObject(extra_key, None, (num_layers,), (layer,), replica_id=(0, 0, 0)))
    missing = sorted(required - seen)
    if missing:
        raise ValueError(f"rank tp={tp_rank} pp={pp_rank}: stage tensors not given: {missing}")
    return out


def _sharded_tensor(key: str, prepend: tuple, allow_shape_mismatch: bool, data: torch.Tensor, *tp_offsets,
                    replica=(0, 0, 0)):  # fmt: skip
    """``ShardedTensor.from_rank_offsets`` with the stacked-layer offsets ``prepend`` first."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    return ShardedTensor.from_rank_offsets(key, data, *prepend, *tp_offsets, replica_id=replica,
                                           prepend_axis_num=len(prepend), allow_shape_mismatch=allow_shape_mismatch)  # fmt: skip


def _dcp_state_dict(sharded: list) -> dict[str, Any]:
    """megatron sharded objects -> torch.distributed.checkpoint values, as megatron's torch_dist
    strategy converts them (``mcore_to_pyt_state_dict``): one value per key; a tensor's chunk is
    its global offset and its local shape with the stacked-layer axes as leading 1s."""
    import io

    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.strategies.checkpointable import (
        CheckpointableShardedTensor,
        LocalShardsContainer,
    )

    by_key: dict[str, list] = {}
    for sh in sharded:
        by_key.setdefault(sh.unique_key if isinstance(sh, ShardedObject) else sh.key, []).append(sh)
    state: dict[str, Any] = {}
    for key, items in by_key.items():
        if isinstance(items[0], ShardedObject):
            buf = io.BytesIO()
            torch.save([obj.data for obj in items], buf)
            state[key] = buf
            continue
        wrapped = []
        for sh in items:
            lead = (1,) * sh.prepend_axis_num
            flat = dataclasses.replace(sh, data=sh.data.reshape(lead + tuple(sh.local_shape)),
                                       local_shape=lead + tuple(sh.local_shape), prepend_axis_num=0)  # fmt: skip
            wrapped.append(CheckpointableShardedTensor.from_sh_ten(flat))
        state[key] = wrapped[0] if len(wrapped) == 1 else LocalShardsContainer(wrapped)
    return state


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with storage of its own: a TP shard is often a view of the full tensor, which
    would otherwise stay alive (and be written whole) as long as the shard does."""
    tensor = tensor.detach()
    if not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != tensor.nbytes:
        tensor = tensor.contiguous().clone()
    return tensor


def save_checkpoint_streaming(
    rank_shards,
    ckpt_dir: str | os.PathLike,
    arch: ModelArch,
    *,
    tensor_parallel: int,
    pipeline_parallel: int,
    padded_vocab_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    hf_files_from: str | os.PathLike | None = None,
    progress: bool = False,
) -> Path:
    """Write a model-only dist checkpoint of a ``tensor_parallel x pipeline_parallel`` GPTModel one
    rank at a time in this process: no model, no process group; host memory ~ one rank's shard.

    The result is the checkpoint ``save_checkpoint`` writes from ``tp * pp`` ranks (the same
    sharded entries per rank, see ``rank_sharded_tensors``; files ``__<rank>_<i>.distcp``,
    ``.metadata``, ``common.pt``, ``metadata.json``, ``hf/``, and ``pear_mega.json`` last, which
    marks the checkpoint complete), so ``load_checkpoint`` reads it at any TP/PP. It drives
    ``torch.distributed.checkpoint`` as megatron's torch_dist strategy does with its decentralized
    plan, with the collectives replaced by loops: for each rank ``r = pp_rank * tp + tp_rank``,
    ``MCoreSavePlanner`` makes the local plan and ``FileSystemWriter`` (``use_collectives=False``:
    files prefixed ``__r_``) writes it; then the global plan of all local plans (which also checks
    that the chunks tile every tensor) gives ``.metadata``.

    Args:
        rank_shards: ``rank_shards(tp_rank, pp_rank)`` -> iterable of ``(canonical megatron name,
            tensor)`` of that rank (e.g. ``mapping.iter_megatron_shard`` with canonical names);
            consumed lazily, one rank at a time.
        padded_vocab_size: default ``arch.padded_vocab_size(tensor_parallel)``.
        dtype: the checkpoint's parameter dtype (tensors are cast).
        hf_files_from: copy tokenizer files from this HF directory into ``<ckpt>/hf/``.
        progress: a tqdm bar over the tensors of all ranks.
    Raises:
        FileExistsError: ``ckpt_dir`` exists and is not empty.
        ValueError: bad layout, or shards that do not tile the global tensors.
    """
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME
    from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner
    from torch.distributed.checkpoint import FileSystemWriter

    tp, pp = tensor_parallel, pipeline_parallel
    arch.check_tensor_parallel(tp)
    arch.check_pipeline_parallel(pp)
    if padded_vocab_size is None:
        padded_vocab_size = arch.padded_vocab_size(tp)
    if padded_vocab_size < arch.vocab_size or padded_vocab_size % tp:
        raise ValueError(f"padded_vocab_size={padded_vocab_size} must be >= {arch.vocab_size} and divisible by tp={tp}")
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.exists() and any(ckpt_dir.iterdir()):
        raise FileExistsError(f"{ckpt_dir}: output directory is not empty")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    # The non-sharded part of a model-only state dict is empty (what dist_checkpointing.save writes).
    torch.save({}, ckpt_dir / COMMON_STATE_FNAME)
    trim = heap_trimmer()
    ranks = [(pp_rank, tp_rank) for pp_rank in range(pp) for tp_rank in range(tp)]
    bar = None
    if progress:
        from tqdm import tqdm

        total = tp * sum(len(stage_tensor_maps(arch, stage, pp)) for stage in range(pp))
        bar = tqdm(total=total, desc=f"import ({tp * pp} ranks)", unit="tensor")

    def rank_tensors(tp_rank: int, pp_rank: int):
        for name, tensor in rank_shards(tp_rank, pp_rank):
            tensor = _compact(tensor.to(dtype))
            trim()  # the holes left by the previous tensors' full HF tensors (freed by now)
            if bar is not None:
                bar.update()
            yield name, tensor

    local_plans, results = [], []
    for pp_rank, tp_rank in ranks:
        rank = pp_rank * tp + tp_rank
        sharded = rank_sharded_tensors(rank_tensors(tp_rank, pp_rank), arch, tp_rank, tp, pp_rank, pp)
        for sh in sharded:
            if not isinstance(getattr(sh, "data", None), torch.Tensor):
                continue
            vocab_dim = sh.prepend_axis_num
            if sh.allow_shape_mismatch and sh.global_shape[vocab_dim] != padded_vocab_size:
                raise ValueError(f"{sh.key}: {sh.global_shape[vocab_dim]} vocabulary rows, expected {padded_vocab_size}")
        state = _dcp_state_dict(sharded)
        writer = FileSystemWriter(ckpt_dir)
        writer.set_up_storage_writer(rank == 0, rank=rank, use_collectives=False)
        planner = MCoreSavePlanner(flatten_state_dict=False)
        planner.set_up_planner(state, storage_meta=None, is_coordinator=rank == 0)
        plan = planner.create_local_plan()
        local_plans.append(plan)
        plan = planner.finish_plan(writer.prepare_local_plan(plan))  # storage prefix __<rank>_
        results.append(writer.write_data(plan, planner).wait())
        del sharded, state, planner, plan  # this rank's tensors: free before the next
        gc.collect()
        trim()
    if bar is not None:
        bar.close()
    planner = MCoreSavePlanner(flatten_state_dict=False)
    planner.set_up_planner({}, storage_meta=None, is_coordinator=True)
    _, metadata = planner.create_global_plan(local_plans)
    metadata.all_local_plans = local_plans  # as megatron's decentralized save records them
    writer = FileSystemWriter(ckpt_dir)
    writer.set_up_storage_writer(True)
    writer.finish(metadata, results)
    save_config(CheckpointingConfig("torch_dist", 1), str(ckpt_dir))
    meta = CheckpointMeta(
        hf_config=arch.hf_config,
        tensor_parallel=tp,
        pipeline_parallel=pp,
        padded_vocab_size=padded_vocab_size,
        dtype=str(dtype).removeprefix("torch."),
    )
    _write_pear_files(ckpt_dir, meta, hf_files_from)
    return ckpt_dir
