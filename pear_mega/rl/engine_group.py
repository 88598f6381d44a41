"""Rollout engines placed over the trainer's ranks: vLLM tensor parallel inside the trainer job.

Layout. ``W`` trainer ranks, ``R = rollout.engine.tensor_parallel_size``, ``E = rollout.num_engines``
(0 = ``W // R``). Engine ``e`` is one vLLM instance whose ``R`` tensor-parallel workers are the
trainer processes of global ranks ``[e·R, (e+1)·R)``; ranks from ``E·R`` on host none::

    W = 8, R = 4, E = 2:   ranks 0 1 2 3 | 4 5 6 7
                           engine   0    |    1

Each worker is built with vLLM's ``external_launcher`` executor (one worker per process, no
engine-core process). vLLM needs no messages between the workers beyond the model's own
collectives because every worker runs the same scheduler on the same inputs with the same seeds,
so all ``R`` produce identical outputs: every rank of an engine must make the same engine calls
with the same arguments, in the same order. The engine's private torch.distributed world (ranks
``0..R-1``, a TCP store on its first rank's host) is set up through the environment vLLM reads
(``RolloutEngine(..., launch_env=...)``) and kept apart from the trainer's groups.

Generation (``generate``, collective over the engine ranks). The prompt list is cut into ``E``
contiguous chunks; engine ``e`` samples chunk ``e`` with the torch seed ``s + e`` (``s`` = the
seed set by the caller: engines sample independent streams, a rerun samples the same ones); the
first worker of each engine contributes its samples to one ``all_gather_object`` over the engine
ranks, which every engine rank reassembles in prompt order. So ``collect_rollouts`` runs the same
on every engine rank (rewards and dynamic sampling are deterministic) and rank 0's result is what
the trainer broadcasts.

Refit (``broadcast_groups``). Every worker of a vLLM engine loads *full* HF tensors and keeps its
own shard (vLLM's weight loaders narrow them), so the merged tensor of pipeline stage ``s`` is
broadcast from the stage's sender (``pear_mega.models.hf_tensor_senders``) to all engine ranks
over one process group per stage (``iter_hf_tensors(..., broadcast_groups=...)``): full tensors
pass through every engine rank one bucket at a time, never the whole model.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from pear_mega.cpu.threads import torch_threads
from pear_mega.platform import use_gpu

T = TypeVar("T")


@dataclass(frozen=True)
class EnginePlacement:
    """Which trainer ranks form which rollout engine (pure arithmetic, see the module docstring)."""

    world_size: int
    tensor_parallel_size: int = 1
    num_engines: int = 1

    def __post_init__(self) -> None:
        w, r, e = self.world_size, self.tensor_parallel_size, self.num_engines
        if w < 1 or r < 1 or e < 1:
            raise ValueError(f"EnginePlacement: world_size, tensor_parallel_size and num_engines must be >= 1, "
                             f"got {w}, {r}, {e}")
        if e * r > w:
            raise ValueError(f"rollout: {e} engine(s) x tensor_parallel_size {r} = {e * r} ranks, but the trainer has "
                             f"only {w}: lower rollout.num_engines or rollout.engine.tensor_parallel_size")

    @classmethod
    def from_settings(cls, world_size: int, tensor_parallel_size: int, num_engines: int) -> EnginePlacement:
        """``num_engines = 0``: as many engines as fit (``world_size // tensor_parallel_size``)."""
        if tensor_parallel_size >= 1 and num_engines == 0:
            num_engines = world_size // tensor_parallel_size
        return cls(world_size, tensor_parallel_size, num_engines)

    @property
    def num_hosts(self) -> int:
        return self.num_engines * self.tensor_parallel_size

    def engine_of(self, rank: int) -> int | None:
        """Engine index of a global rank, None if it hosts no engine."""
        return rank // self.tensor_parallel_size if 0 <= rank < self.num_hosts else None

    def worker_of(self, rank: int) -> int:
        """Tensor-parallel worker index of a hosting rank inside its engine."""
        return rank % self.tensor_parallel_size

    def chunk(self, num_items: int, engine: int) -> range:
        """The contiguous slice of ``num_items`` prompts that ``engine`` samples."""
        size = math.ceil(num_items / self.num_engines)
        return range(min(engine * size, num_items), min((engine + 1) * size, num_items))


def _host_address() -> str:
    """This host's address as other hosts resolve it (used only when an engine spans hosts)."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return socket.gethostname()


def engine_threads_for(engine_ranks_on_host: int) -> int:
    """CPU threads for an engine rank while the host's other trainer ranks wait for the engine:
    the cores this process may run on, shared by the host's engine ranks, and never fewer than the
    trainer's own threads. (Ranks waiting in a gloo collective sleep, so their cores are free; the
    refit with one and with all the cores on rank 0 is in docs/benchmarks.md, "Engine threads".)"""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(torch.get_num_threads(), cores // max(1, engine_ranks_on_host))


def broadcast_group_ranks(senders: dict[int, int], hosts: Sequence[int]) -> dict[int, tuple[int, ...]]:
    """Ranks of each pipeline stage's refit broadcast group: the stage's sender and every engine
    rank. Stages with the same rank set share one group (when every rank hosts an engine, all
    stages' sets are the whole world: one NCCL communicator instead of one per stage)."""
    return {stage: tuple(sorted({src, *hosts})) for stage, src in sorted(senders.items())}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class EngineGroup:
    """This rank's share of the rollout engines: placement, rendezvous, refit groups, and the
    collective calls (``generate``, ``on_hosts``) that the trainer makes on every rank.

    Construction is collective over all trainer ranks (it creates process groups).

    Args:
        ctx: the trainer's ``ParallelContext``.
        placement: the layout; ``placement.world_size`` must equal the trainer's.
        timeout_s: timeout of the groups created here.
        engine_threads: CPU: torch threads of a hosting rank inside ``on_hosts`` (engine work,
            while the host's other ranks wait); 0 = ``engine_threads_for`` (the host's cores over
            its engine ranks).
    """

    def __init__(self, ctx, placement: EnginePlacement, timeout_s: float = 1800.0, engine_threads: int = 0) -> None:
        from pear_mega.models import hf_tensor_senders

        if placement.world_size != ctx.world_size:
            raise ValueError(f"EngineGroup: placement for {placement.world_size} ranks, trainer has {ctx.world_size}")
        self.ctx = ctx
        self.placement = placement
        self.engine_index = placement.engine_of(ctx.rank)
        self.worker = placement.worker_of(ctx.rank) if self.engine_index is not None else None
        self.engine = None
        timeout = datetime.timedelta(seconds=timeout_s)
        # Rendezvous of each engine's private world, chosen by its first worker: loopback when all
        # of the engine's workers share its host (the usual case: an engine within one node).
        offer = (socket.gethostname(), _host_address(), _free_port()) if self.worker == 0 else (socket.gethostname(),)
        offers: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(offers, offer)
        self.launch_env: dict[str, str] | None = None
        if self.engine_index is not None and placement.tensor_parallel_size > 1:
            r = placement.tensor_parallel_size
            workers = offers[self.engine_index * r:(self.engine_index + 1) * r]
            host, address, port = workers[0]
            addr = "127.0.0.1" if all(w[0] == host for w in workers) else address
            self.launch_env = {
                "RANK": str(self.worker),
                # the device index on GPU (torchrun's LOCAL_RANK); on CPU only a worker id
                "LOCAL_RANK": str(ctx.local_rank if use_gpu() else self.worker),
                "WORLD_SIZE": str(placement.tensor_parallel_size),
                "MASTER_ADDR": addr,
                "MASTER_PORT": str(port),
                # under torchrun, init_process_group would otherwise join the launcher's store at
                # MASTER_ADDR:MASTER_PORT instead of creating the engine's own there
                "TORCHELASTIC_USE_AGENT_STORE": "False",
            }
        self.engine_threads = None
        if self.engine_index is not None and not use_gpu():
            here = offers[ctx.rank][0]
            on_host = sum(1 for r in range(placement.num_hosts) if offers[r][0] == here)
            self.engine_threads = engine_threads or engine_threads_for(on_host)
        hosts = list(range(placement.num_hosts))
        # new_group is collective over the default group: every rank creates every group.
        self.gather_group = dist.new_group(hosts, backend="gloo", timeout=timeout) if placement.num_engines > 1 else None
        by_ranks: dict[tuple[int, ...], Any] = {}
        self.broadcast_groups = {}
        for stage, ranks in broadcast_group_ranks(hf_tensor_senders(ctx), hosts).items():
            if ranks not in by_ranks:  # same order on every rank: new_group is collective
                by_ranks[ranks] = dist.new_group(list(ranks), timeout=timeout)
            self.broadcast_groups[stage] = by_ranks[ranks]

    @property
    def hosts_engine(self) -> bool:
        return self.engine_index is not None

    def start(self, factory: Callable[[dict[str, str] | None], T]) -> T | None:
        """Build this rank's engine worker with ``factory(launch_env)`` (on hosting ranks only)."""
        if self.hosts_engine:
            self.engine = factory(self.launch_env)
        return self.engine

    def on_hosts(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on every hosting rank (the same call on each worker of an engine) and return
        rank 0's result on every rank. A failure on any rank raises on every rank."""
        result, error, message = None, None, None
        if self.hosts_engine:
            try:
                with torch_threads(self.engine_threads):
                    result = fn()
            except Exception as exc:  # noqa: BLE001 (re-raised below, after the other ranks are told)
                error, message = exc, f"{type(exc).__name__}: {exc}"
        messages: list[Any] = [None] * self.ctx.world_size
        dist.all_gather_object(messages, message)
        failed = [(r, m) for r, m in enumerate(messages) if m is not None]
        if failed:
            if error is not None:
                raise error
            rank, msg = failed[0]
            raise RuntimeError(f"rollout engine rank {rank} failed: {msg}")
        box = [result]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # ------------------------------------------------------------------ engine calls (hosting ranks)
    def generate(self, prompts: Sequence[Any], **kwargs) -> list:
        """``RolloutEngine.generate`` over all engines: engine ``e`` samples chunk ``e`` of the
        prompts; every hosting rank returns all samples in prompt order (prompt-major, ``n`` per
        prompt). Collective over the hosting ranks."""
        placement, e = self.placement, self.engine_index
        if e is None:
            raise RuntimeError("EngineGroup.generate called on a rank that hosts no engine")
        if placement.num_engines == 1:
            return self.engine.generate(prompts, **kwargs)
        mine = placement.chunk(len(prompts), e)
        samples = []
        if len(mine):
            with torch.random.fork_rng(devices=[torch.cuda.current_device()] if use_gpu() else []):
                torch.manual_seed(torch.initial_seed() + e)
                samples = self.engine.generate([prompts[i] for i in mine], **kwargs)
            for s in samples:
                s.prompt_index += mine.start
        parts: list[Any] = [None] * placement.num_hosts
        dist.all_gather_object(parts, samples if self.worker == 0 else None, group=self.gather_group)
        return [s for i in range(placement.num_engines) for s in parts[i * placement.tensor_parallel_size]]

    def max_over_engines(self, value: float) -> float:
        """Largest ``value`` over the engines (collective over the hosting ranks)."""
        if self.gather_group is None:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.gather_group)
        return float(t.item())

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
