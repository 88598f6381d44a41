"""Atomic, resumable training checkpoints with megatron ``dist_checkpointing``.

Layout of a run's checkpoint directory::

    <ckpt_dir>/
      .lock                   # flock of the run that writes here (its host, pid, start time)
      latest                  # text: name of the newest complete checkpoint, e.g. "iter_0000040"
      iter_0000040/           # one megatron dist_checkpointing (torch_dist) directory
        metadata.json, common.pt, .metadata, __*.distcp
        pear_mega.json, hf/   # model metadata (HF config, TP/PP, padded vocab): pear_mega.models
        trainer_state.json    # step, schedule, data position, layout, resolved config (JSON)
        rng/                  # one safetensors file of RNG states per rank

Inside a checkpoint the sharded state dict is ``{"model": ..., "optimizer": ...}``: the model
part is written by ``pear_mega.models.save_checkpoint`` under megatron's own sharded keys and the
optimizer state in model-parameter space (megatron's ``fully_reshardable`` format), so both load
at any TP/PP/DP (resharding is megatron's), and ``tools/convert_hf.py export`` reads the model
part of a training checkpoint as well as of a converted one. The rest is pear-mega's own and
needs no pickle:

- ``trainer_state.json``: step, the LR schedule (megatron's scheduler state), the data position
  (identical on every rank: one global count, so it carries over to any DP size exactly), the
  layout the checkpoint was written at, and the resolved config.
- ``rng/pp{P}_tp{T}_cp{C}_dp{D}.safetensors``: every RNG of that rank as tensors (python, numpy,
  torch, megatron's tracker). Restored where the layout is the one saved; at another layout each
  rank re-derives its RNGs from ``parallel.seed``, the step and its coordinates (deterministic)
  and rank 0 says so.

Resume at another layout: model and optimizer are resharded by megatron, the data position is
exact, the RNG is re-derived. Changed schedule settings (``optim.lr``, ``min_lr``,
``warmup_steps``, ``decay_style``, ``weight_decay``, ``train.steps``) win over the checkpoint's and
are printed old -> new, unless ``checkpoint.keep_schedule`` keeps the stored schedule.

Non-finite parameters are never saved: ``save_checkpoint`` checks them first (every rank, one
all-reduce) and refuses, so "the last good checkpoint" is one whose weights were finite.

Atomicity: every rank writes into ``iter_N.tmp``; after a barrier rank 0 renames it to ``iter_N``
and then replaces ``latest`` (write-to-temp + ``os.replace``, both atomic on POSIX). A crash at any
moment leaves ``latest`` naming the previous complete checkpoint; stale ``.tmp`` directories are
removed on the next save.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pear_mega.optim import TrainingStopped
from pear_mega.platform import use_gpu

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


RNG_DIR = "rng"
# json keys of trainer_state.json
_LAYOUT_KEYS = ("tp", "pp", "cp", "dp")


def layout_of(ctx) -> dict[str, int]:
    """The TP/PP/CP/DP sizes of a run (stored with every checkpoint)."""
    return {"tp": ctx.tp_size, "pp": ctx.pp_size, "cp": ctx.cp_size, "dp": ctx.dp_size}


def _rng_file(ctx) -> str:
    return f"pp{ctx.pp_rank}_tp{ctx.tp_rank}_cp{ctx.cp_rank}_dp{ctx.dp_rank}.safetensors"


def rng_state() -> dict[str, torch.Tensor]:
    """Every RNG a step can touch as flat tensors: python, numpy, torch CPU, megatron's tracker (and CUDA)."""
    from megatron.core import tensor_parallel

    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python.words": torch.tensor([version, *words], dtype=torch.int64),
        "python.gauss": torch.tensor([float("nan") if gauss is None else gauss], dtype=torch.float64),
        "numpy.keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy.rest": torch.tensor([pos, has_gauss], dtype=torch.int64),
        "numpy.cached": torch.tensor([cached], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if kind != "MT19937":
        raise ValueError(f"numpy RNG {kind!r}: only MT19937 states are saved")
    for name, value in tensor_parallel.get_cuda_rng_tracker().get_states().items():
        state[f"tracker.{name}"] = value.cpu()
    if use_gpu():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Restore what ``rng_state`` returned."""
    from megatron.core import tensor_parallel

    words = state["python.words"].tolist()
    gauss = float(state["python.gauss"][0])
    random.setstate((int(words[0]), tuple(int(w) for w in words[1:]), None if math.isnan(gauss) else gauss))
    pos, has_gauss = state["numpy.rest"].tolist()
    np.random.set_state(("MT19937", state["numpy.keys"].numpy().astype(np.uint32), int(pos), int(has_gauss),
                         float(state["numpy.cached"][0])))
    torch.set_rng_state(state["torch"])
    tracker = {k.removeprefix("tracker."): v for k, v in state.items() if k.startswith("tracker.")}
    if tracker:
        tensor_parallel.get_cuda_rng_tracker().set_states(tracker)
    if "cuda" in state and use_gpu():
        torch.cuda.set_rng_state(state["cuda"])


def rederive_rng(ctx, step: int) -> int:
    """Seed every RNG of this rank from ``parallel.seed``, ``step`` and the rank's pipeline stage
    (megatron's tracker adds its tensor-parallel offset), as ``init_parallel`` does at step 0:
    the RNG of a resume at a new layout, deterministic given the layout. Returns the seed."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from pear_mega.parallel import seed_everything

    seed = (ctx.config.seed + 100 * ctx.pp_rank + 1_000_003 * step) % (2**31)
    seed_everything(seed)
    model_parallel_cuda_manual_seed(seed)
    return seed


def _optimizer_state(model_chunks, optimizer, loading: bool) -> dict:
    """The optimizer part of the sharded state dict (``{}`` without an optimizer)."""
    from pear_mega.models import model_sharded_state_dict

    if len(model_chunks) != 1:
        raise NotImplementedError("checkpointing supports one model chunk (no virtual pipeline stages)")
    if optimizer is None:
        return {}
    if loading:
        _init_empty_optimizer_state(optimizer)
    # "fully_reshardable": optimizer state in model-parameter space, so a checkpoint of the
    # distributed optimizer loads at any TP/PP/DP (megatron's older default format relies on
    # ShardedTensor.flattened_range, which dist_checkpointing 0.16 no longer accepts). The
    # memory-efficient variant gathers each DP group's state on its DP rank 0 only (over gloo),
    # instead of giving every DP rank a copy of the whole state: host memory of a save grows on
    # one rank per DP group, not on all. Loading reads either variant.
    metadata = {"distrib_optim_sharding_type": "fully_reshardable",
                "distrib_optim_fully_reshardable_mem_efficient": True}
    model_sd = model_sharded_state_dict(model_chunks[0])
    return {"optimizer": optimizer.sharded_state_dict(model_sd, is_loading=loading, metadata=metadata)}


def _is_distributed(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return optimizer is not None and any(isinstance(opt, DistributedOptimizer)
                                         for opt in getattr(optimizer, "chained_optimizers", [optimizer]))


def _load_optimizer_state(optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)``, working around megatron 0.16.1's distributed optimizer
    on the torch-AdamW path (no TE/apex).

    There torch's Adam keeps a per-parameter ``step`` tensor, which ``DistributedOptimizer.load_state_dict``
    puts back from the param groups, and then ``load_parameter_state_from_fully_reshardable`` copies
    every per-parameter state key from the checkpoint, which has no ``step`` (megatron stores it in
    the param groups): ``KeyError: 'step'``. So the parameter state is loaded with ``step`` set
    aside: param groups first (which set ``step``), then the per-parameter tensors. megatron also
    gives every parameter the *same* ``step`` tensor, which torch's fused Adam then increments once
    per parameter on every step (a wrong bias correction from the first resumed step on): each
    parameter gets its own copy back.
    """
    from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE, DistributedOptimizer

    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    fixable = (not HAVE_APEX_OR_TE and len(chained) == 1 and isinstance(chained[0], DistributedOptimizer)
               and state.get("param_state_sharding_type") == "fully_reshardable")
    if not fixable:
        optimizer.load_state_dict(state)
        return
    opt = chained[0]
    opt.load_state_dict({k: v for k, v in state.items() if k not in ("param_state", "param_state_sharding_type")})
    steps = {p: s.pop("step") for p, s in opt.optimizer.state.items() if "step" in s}
    try:
        opt.load_parameter_state_from_fully_reshardable(state["param_state"])
    finally:
        for p, step in steps.items():
            opt.optimizer.state[p]["step"] = step.clone()


def _init_empty_optimizer_state(optimizer) -> None:
    """Give a distributed optimizer that has not stepped yet its (dummy) Adam state.

    Without TE/apex, megatron's ``DistributedOptimizer.state_dict`` reads the step count from the
    torch optimizer's per-parameter state, which exists only after a first step, so building the
    load state dict of a fresh optimizer fails (``assert len(steps) == 1``). megatron's own
    ``_init_optimizer_states_with_dummy_values`` (a step on zero gradients) fills it; every value
    it writes (main params included) is then overwritten by the load.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer) and len(opt.optimizer.state) == 0:
            opt._init_optimizer_states_with_dummy_values()


def parameters_finite(model_chunks) -> bool:
    """Whether every parameter of every rank is finite (collective over the world: one all-reduce)."""
    bad = torch.zeros(1, dtype=torch.float32)
    device = None
    peaks = []
    for chunk in model_chunks:
        for p in chunk.parameters():
            if p.numel():
                device = p.device
                peaks.append(p.detach().abs().amax().float())
    if peaks:
        bad = (~torch.isfinite(torch.stack(peaks))).any().float().reshape(1)
    if device is not None:
        bad = bad.to(device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return not bool(bad.item())


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

    ``data_state`` is rank 0's (JSON-able; the data position is the same on every rank).
    ``before_publish`` runs after the shards are written and before the rename (tests use it to
    simulate a crash mid-save).

    Raises:
        NonFiniteParametersError: some parameter is NaN/inf; nothing is written.
    """
    from safetensors.torch import save_file

    from pear_mega.models import save_checkpoint as save_model_checkpoint
    from pear_mega.models import unwrap_model

    if not parameters_finite(model_chunks):
        raise NonFiniteParametersError(f"step {step}: the parameters are not finite; refusing to save a checkpoint")
    root = Path(ckpt_dir)
    final = root / checkpoint_name(step)
    tmp = root / (checkpoint_name(step) + ".tmp")
    if ctx.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("iter_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    torch.distributed.barrier()
    extra = _optimizer_state(model_chunks, optimizer, loading=False)
    save_model_checkpoint(model_chunks[0], tmp, unwrap_model(model_chunks[0]).pear_arch, ctx, extra=extra,
                          hf_files_from=hf_files_from)
    if ctx.rank == 0:
        (tmp / RNG_DIR).mkdir(exist_ok=True)
    torch.distributed.barrier()
    save_file(rng_state(), str(tmp / RNG_DIR / _rng_file(ctx)))
    torch.distributed.barrier()
    if before_publish is not None:
        before_publish()
    if ctx.rank == 0:
        state = {"step": step, "layout": layout_of(ctx), "params_finite": True,
                 "distributed_optimizer": _is_distributed(optimizer),
                 "scheduler": scheduler.state_dict() if scheduler is not None else None,
                 "data": data_state, **metadata}
        (tmp / TRAINER_META).write_text(json.dumps(state, indent=2, default=str))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        marker_tmp = root / (LATEST + ".tmp")
        marker_tmp.write_text(final.name)
        os.replace(marker_tmp, root / LATEST)
    torch.distributed.barrier()
    return final


def load_checkpoint(path: str | os.PathLike, model_chunks: list, optimizer, scheduler, ctx, *,
                    keep_schedule: bool = False) -> tuple[int, Any]:
    """Load model, optimizer, schedule and RNG at this run's layout; returns ``(step, data_state)``. Collective.

    At the saved layout every rank gets its own RNG back; at another one the RNGs are re-derived
    (``rederive_rng``) and rank 0 prints a note. The schedule is this run's config unless
    ``keep_schedule`` (settings that differ from the checkpoint's are printed either way).
    """
    from safetensors.torch import load_file

    from pear_mega.models import load_checkpoint as load_model_checkpoint
    from pear_mega.optim import restore_schedule, schedule_group_settings

    path = Path(path)
    meta = read_trainer_state(path)
    for key in ("step", "layout", "scheduler", "data"):
        if key not in meta:
            raise ValueError(f"{path / TRAINER_META}: no {key!r}: not a checkpoint of this pear-mega version")
    if optimizer is not None and meta.get("distributed_optimizer", False) != _is_distributed(optimizer):
        saved_kind = "distributed" if meta.get("distributed_optimizer") else "non-distributed"
        raise ValueError(f"{path}: written with the {saved_kind} optimizer; resume with "
                         f"optim.use_distributed_optimizer={str(bool(meta.get('distributed_optimizer'))).lower()} "
                         "(the two store the optimizer state under different keys)")
    extra = _optimizer_state(model_chunks, optimizer, loading=True)
    loaded = load_model_checkpoint(model_chunks[0], path, extra=extra)
    groups = schedule_group_settings(optimizer) if optimizer is not None else None
    if optimizer is not None:
        _load_optimizer_state(optimizer, loaded["optimizer"])
    step = int(meta["step"])
    if scheduler is not None:
        changes = restore_schedule(scheduler, meta["scheduler"], keep_schedule, groups)
        if changes and ctx.rank == 0:
            verb = "kept from the checkpoint (checkpoint.keep_schedule=true)" if keep_schedule else "from this config"
            print(f"resume: schedule settings that differ from the checkpoint's, {verb}:\n  "
                  + "\n  ".join(changes), flush=True)
    saved, now = meta["layout"], layout_of(ctx)
    rng_file = path / RNG_DIR / _rng_file(ctx)
    if saved == now and rng_file.is_file():
        set_rng_state(load_file(str(rng_file)))
    else:
        seed = rederive_rng(ctx, step)
        if ctx.rank == 0:
            print(f"resume: the checkpoint was written at {_layout_text(saved)}, this run is {_layout_text(now)}: "
                  f"model and optimizer resharded, data position carried over, RNG states re-derived from "
                  f"parallel.seed and the step (rank 0 seed {seed})", flush=True)
    return step, meta["data"]


def _layout_text(layout: dict) -> str:
    return " ".join(f"{k}={layout.get(k)}" for k in _LAYOUT_KEYS)


LOCK_FILE = ".lock"


class CheckpointDirLocked(ValueError):
    """Another live process holds ``checkpoint.dir`` (two jobs must not write one directory)."""


def try_lock_dir(ckpt_dir: str | os.PathLike):
    """Take an exclusive lock on ``ckpt_dir`` for the life of this process; returns the open lock
    file (keep it: closing it releases the lock; the OS releases it when the process dies).

    The lock is ``fcntl.flock`` on ``<ckpt_dir>/.lock``, which holds the holder's host, pid and
    start time, so the error says who has the directory.

    Raises:
        CheckpointDirLocked naming the holder.
    """
    import fcntl
    import socket
    import time

    root = Path(ckpt_dir)
    root.mkdir(parents=True, exist_ok=True)
    f = open(root / LOCK_FILE, "a+")  # noqa: SIM115 (held open for the process's life)
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "an unknown process"
        f.close()
        raise CheckpointDirLocked(f"checkpoint.dir {root} is in use by {holder}: another run (or an orphaned "
                                  "worker of one) writes there; stop it or choose another checkpoint.dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on host {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
    f.flush()
    return f


def lock_checkpoint_dir(ckpt_dir: str, ctx):
    """``try_lock_dir`` on global rank 0, the outcome shared with every rank (collective): every
    rank raises ``CheckpointDirLocked`` when the directory is taken. Returns rank 0's lock file
    (None elsewhere)."""
    held, error = None, None
    if ctx.rank == 0:
        try:
            held = try_lock_dir(ckpt_dir)
        except CheckpointDirLocked as exc:
            error = str(exc)
    box = [error]
    torch.distributed.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise CheckpointDirLocked(box[0])
    return held


class NonFiniteParametersError(TrainingStopped):
    """A checkpoint save was refused because some parameter is NaN or infinite."""


def read_trainer_state(path: str | os.PathLike) -> dict:
    """The human-readable run metadata of a training checkpoint (step, resolved config)."""
    meta = Path(path) / TRAINER_META
    if not meta.is_file():
        raise FileNotFoundError(f"{meta}: not a pear-mega training checkpoint (no {TRAINER_META})")
    return json.loads(meta.read_text())
