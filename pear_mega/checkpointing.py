"""Atomic, resumable training checkpoints with megatron ``dist_checkpointing``.

Layout of a run's checkpoint directory::

    <ckpt_dir>/
      latest                  # text: name of the newest complete checkpoint, e.g. "iter_0000040"
      iter_0000040/           # one megatron dist_checkpointing (torch_dist) directory
        metadata.json, common.pt, __*.distcp, ...
        pear_mega.json, hf/   # model metadata (HF config, TP/PP, padded vocab): pear_mega.models
        trainer_state.json    # human-readable run metadata: step, resolved config

Inside a checkpoint the sharded state dict is ``{"model": ..., "optimizer": ..., "scheduler":
..., "rng": ShardedObject per rank, "data": ShardedObject per rank, "step": int}``. The model part
is written by ``pear_mega.models.save_checkpoint`` under megatron's own sharded keys, so a checkpoint saved at one TP/PP loads at another (resharding
is megatron's), and ``tools/convert_hf.py export`` reads the model part of a training checkpoint
as well as of a converted one.

Atomicity: every rank writes into ``iter_N.tmp``; after a barrier rank 0 renames it to ``iter_N``
and then replaces ``latest`` (write-to-temp + ``os.replace``, both atomic on POSIX). A crash at any
moment leaves ``latest`` naming the previous complete checkpoint; stale ``.tmp`` directories are
removed on the next save.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

LATEST = "latest"
TRAINER_META = "trainer_state.json"


def checkpoint_name(step: int) -> str:
    return f"iter_{step:07d}"


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``ckpt_dir`` (None when there is none)."""
    marker = Path(ckpt_dir) / LATEST
    if not marker.is_file():
        return None
    name = marker.read_text().strip()
    path = Path(ckpt_dir) / name
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(f"{marker} names {name!r} but {path} is not a complete checkpoint")
    return path


def latest_step(ckpt_dir: str | os.PathLike) -> int:
    """Step of the newest complete checkpoint under ``ckpt_dir`` (-1 when there is none)."""
    path = latest_checkpoint(ckpt_dir)
    return int(path.name.split("_")[1]) if path is not None else -1


def rng_state() -> dict[str, Any]:
    """Every RNG a step can touch: python, numpy, torch CPU, megatron's model-parallel tracker."""
    from megatron.core import tensor_parallel

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _per_rank_object(key: str, data: Any, ctx) -> Any:
    """A ShardedObject with one shard per (pp, tp, dp) rank: RNG and data position differ per rank."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(
        key,
        data,
        global_shape=(ctx.pp_size, ctx.tp_size, ctx.dp_size),
        global_offset=(ctx.pp_rank, ctx.tp_rank, ctx.dp_rank),
        replica_id=0,
    )


def _trainer_state(model_chunks, optimizer, scheduler, ctx, data_state, step, loading: bool) -> dict:
    """The non-model part of the sharded state dict (the model part is ``pear_mega.models``')."""
    from pear_mega.models import model_sharded_state_dict

    if len(model_chunks) != 1:
        raise NotImplementedError("checkpointing supports one model chunk (no virtual pipeline stages)")
    state = {
        "rng": _per_rank_object("rng_state", None if loading else rng_state(), ctx),
        "data": _per_rank_object("data_state", None if loading else data_state, ctx),
    }
    if not loading:
        state["step"] = step
        if scheduler is not None:
            state["scheduler"] = scheduler.state_dict()
    if optimizer is not None:
        model_sd = model_sharded_state_dict(model_chunks[0])
        # "fully_reshardable": optimizer state in model-parameter space, so a checkpoint of the
        # distributed optimizer loads at any TP/PP/DP (megatron's older default format relies on
        # ShardedTensor.flattened_range, which dist_checkpointing 0.16 no longer accepts).
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=loading, metadata={"distrib_optim_sharding_type": "fully_reshardable"})
    return state


def save_checkpoint(
    ckpt_dir: str | os.PathLike,
    step: int,
    model_chunks: list,
    optimizer,
    scheduler,
    ctx,
    data_state: Any,
    metadata: dict,
    hf_files_from: str | os.PathLike | None = None,
    before_publish: Callable[[], None] | None = None,
) -> Path:
    """Save a complete checkpoint atomically; returns its final path. Collective.

    ``before_publish`` runs after the shards are written and before the rename (tests use it to
    simulate a crash mid-save).
    """
    from pear_mega.models import save_checkpoint as save_model_checkpoint
    from pear_mega.models import unwrap_model

    root = Path(ckpt_dir)
    final = root / checkpoint_name(step)
    tmp = root / (checkpoint_name(step) + ".tmp")
    if ctx.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("iter_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    torch.distributed.barrier()
    extra = _trainer_state(model_chunks, optimizer, scheduler, ctx, data_state, step, loading=False)
    save_model_checkpoint(model_chunks[0], tmp, unwrap_model(model_chunks[0]).pear_arch, ctx, extra=extra,
                          hf_files_from=hf_files_from)
    if before_publish is not None:
        before_publish()
    if ctx.rank == 0:
        (tmp / TRAINER_META).write_text(json.dumps({"step": step, **metadata}, indent=2, default=str))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        marker_tmp = root / (LATEST + ".tmp")
        marker_tmp.write_text(final.name)
        os.replace(marker_tmp, root / LATEST)
    torch.distributed.barrier()
    return final


def load_checkpoint(path: str | os.PathLike, model_chunks: list, optimizer, scheduler, ctx) -> tuple[int, Any]:
    """Load model, optimizer, scheduler and this rank's RNG; returns ``(step, data_state)``. Collective."""
    from pear_mega.models import load_checkpoint as load_model_checkpoint

    extra = _trainer_state(model_chunks, optimizer, scheduler, ctx, None, 0, loading=True)
    loaded = load_model_checkpoint(model_chunks[0], path, extra=extra)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(loaded["scheduler"])
    set_rng_state(loaded["rng"])
    return int(loaded["step"]), loaded["data"]


def read_trainer_state(path: str | os.PathLike) -> dict:
    """The human-readable run metadata of a training checkpoint (step, resolved config)."""
    meta = Path(path) / TRAINER_META
    if not meta.is_file():
        raise FileNotFoundError(f"{meta}: not a pear-mega training checkpoint (no {TRAINER_META})")
    return json.loads(meta.read_text())
