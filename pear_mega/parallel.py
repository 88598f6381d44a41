"""Process groups: torch.distributed + megatron ``parallel_state`` + reproducible seeds.

Launch with torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``)
or as a plain process, which becomes a world of one. The world is laid out by megatron's default
order ``tp-cp-ep-dp-pp``: ``world_size = tp * cp * dp * pp``, so ``dp`` is whatever is left over.

    cfg = ParallelConfig(tensor_parallel=2, pipeline_parallel=2)
    ctx = init_parallel(cfg)        # torchrun --nproc-per-node 4 ...
    ...
    destroy_parallel()

On CPU the backend is gloo and ``pear_mega.cpu.compat.apply_cpu_patches()`` is applied; on GPU it
is nccl with ``torch.cuda.set_device(LOCAL_RANK)``.

Seeds: python, numpy and torch get ``seed + 100 * pp_rank`` (megatron's convention: pipeline
stages draw different dropout masks), and megatron's ``model_parallel_cuda_manual_seed`` adds its
own tensor-parallel offsets on top. Data-parallel replicas share the seed, so a model initialised
in-process is identical across them.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import socket
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

# Whether init_parallel created the default process group (and so must destroy it).
_OWNS_PROCESS_GROUP = False


@dataclass
class ParallelConfig:
    """How the world is split. ``world_size`` must be a multiple of ``tp * pp * cp``."""

    tensor_parallel: int = 1
    """Tensor-parallel size: attention heads, MLP columns and the vocabulary are split this way."""
    pipeline_parallel: int = 1
    """Pipeline-parallel size: transformer layers are split evenly across this many stages."""
    context_parallel: int = 1
    """Context-parallel size (sequence split inside attention); needs a GPU and Transformer Engine."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (activations split along the sequence in TP regions); GPU only."""
    seed: int = 1234
    """Base seed for python, numpy, torch and megatron's RNG tracker."""
    timeout_s: float = 1800.0
    """Collective timeout: a crashed rank makes the others fail after this long instead of hanging."""

    def __post_init__(self) -> None:
        for name in ("tensor_parallel", "pipeline_parallel", "context_parallel"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ParallelConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"ParallelConfig.seed must be a non-negative int, got {self.seed!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"ParallelConfig.timeout_s must be > 0, got {self.timeout_s!r}")
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise ValueError("ParallelConfig.sequence_parallel needs tensor_parallel > 1")

    @property
    def model_parallel_size(self) -> int:
        """Ranks that hold one copy of the model: ``tp * pp * cp``."""
        return self.tensor_parallel * self.pipeline_parallel * self.context_parallel

    def check_world(self, world_size: int, gpu: bool) -> None:
        """Raise ValueError when this config cannot run on ``world_size`` ranks of this platform."""
        if self.sequence_parallel and not gpu:
            raise ValueError(
                "ParallelConfig.sequence_parallel needs a GPU (its fused kernels come from Transformer "
                "Engine); set sequence_parallel=False on CPU"
            )
        if self.context_parallel > 1 and not gpu:
            raise ValueError(
                f"ParallelConfig.context_parallel={self.context_parallel} needs a GPU and Transformer "
                "Engine attention; use context_parallel=1 on CPU"
            )
        if world_size % self.model_parallel_size:
            raise ValueError(
                f"world size {world_size} is not divisible by tensor_parallel * pipeline_parallel * "
                f"context_parallel = {self.tensor_parallel} * {self.pipeline_parallel} * "
                f"{self.context_parallel} = {self.model_parallel_size}"
            )


@dataclass
class ParallelContext:
    """This rank's place in the world (returned by ``init_parallel``)."""

    config: ParallelConfig
    rank: int
    world_size: int
    local_rank: int
    tp_rank: int
    tp_size: int
    tp_group: Any
    pp_rank: int
    pp_size: int
    pp_group: Any
    dp_rank: int
    dp_size: int
    dp_group: Any
    cp_rank: int
    cp_size: int
    cp_group: Any
    device: Any  # torch.device
    is_first_stage: bool
    is_last_stage: bool

    @property
    def backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and, when present, CUDA) with ``seed``."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def init_parallel(cfg: ParallelConfig) -> ParallelContext:
    """Initialise torch.distributed, megatron's parallel state and every RNG.

    An already initialised default process group (e.g. from an earlier ``init_parallel`` with a
    different split, after ``destroy_parallel(keep_process_group=True)``) is reused.

    Returns:
        The ``ParallelContext`` of this rank.
    Raises:
        ValueError: the config does not fit the world size or the platform.
    """
    global _OWNS_PROCESS_GROUP
    import torch
    import torch.distributed as dist

    from pear_mega.platform import use_gpu

    gpu = use_gpu()
    if not gpu:
        from pear_mega.cpu.compat import apply_cpu_patches

        apply_cpu_patches()
    backend = "nccl" if gpu else "gloo"
    timeout = datetime.timedelta(seconds=cfg.timeout_s)

    if dist.is_initialized():
        world_size = dist.get_world_size()
        rank = dist.get_rank()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    else:
        if _launched_by_torchrun():
            world_size = int(os.environ["WORLD_SIZE"])
            rank = int(os.environ["RANK"])
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            init_method = "env://"
        else:
            world_size, rank, local_rank = 1, 0, 0
            init_method = f"tcp://127.0.0.1:{_free_port()}"
        cfg.check_world(world_size, gpu)
        if gpu:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(
            backend=backend, init_method=init_method, world_size=world_size, rank=rank, timeout=timeout
        )
        _OWNS_PROCESS_GROUP = True
    cfg.check_world(world_size, gpu)
    if gpu:
        torch.cuda.set_device(local_rank)

    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tensor_parallel,
        pipeline_model_parallel_size=cfg.pipeline_parallel,
        context_parallel_size=cfg.context_parallel,
        distributed_timeout_minutes=max(1, round(cfg.timeout_s / 60)),
    )
    pp_rank = ps.get_pipeline_model_parallel_rank()
    seed_everything(cfg.seed + 100 * pp_rank)
    model_parallel_cuda_manual_seed(cfg.seed + 100 * pp_rank)

    ctx = ParallelContext(
        config=cfg,
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_rank=pp_rank,
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        dp_group=ps.get_data_parallel_group(),
        cp_rank=ps.get_context_parallel_rank(),
        cp_size=ps.get_context_parallel_world_size(),
        cp_group=ps.get_context_parallel_group(),
        device=torch.device("cuda", local_rank) if gpu else torch.device("cpu"),
        is_first_stage=ps.is_pipeline_first_stage(),
        is_last_stage=ps.is_pipeline_last_stage(),
    )
    logger.info(
        "rank %d/%d: tp %d/%d pp %d/%d dp %d/%d cp %d/%d on %s (%s)",
        rank, world_size, ctx.tp_rank, ctx.tp_size, ctx.pp_rank, ctx.pp_size,
        ctx.dp_rank, ctx.dp_size, ctx.cp_rank, ctx.cp_size, ctx.device, backend,
    )  # fmt: skip
    return ctx


def destroy_parallel(keep_process_group: bool = False) -> None:
    """Tear down megatron's parallel state and (unless kept) the default process group.

    Args:
        keep_process_group: keep torch.distributed alive so a following ``init_parallel`` can
            re-split the same world (e.g. TP=2 then PP=2 in one process).
    """
    global _OWNS_PROCESS_GROUP
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if not keep_process_group and dist.is_initialized() and _OWNS_PROCESS_GROUP:
        dist.destroy_process_group()
        _OWNS_PROCESS_GROUP = False
