"""Full HF tensors staged in host shared memory: the CPU weight sync without a gather.

Why. On CPU the weight sync needs the full HF tensors on the rollout engine's rank while the
trainer holds them in tensor/pipeline-parallel shards. Gathering the shards to one rank over gloo
sends every byte through loopback TCP (two kernel copies) and then merges the shards into fresh
tensors (a third copy, page-faulted in): at TP=3 on a small CPU host that alone costs more than
vLLM's own reload. When every rank involved shares one host, each rank can
instead write its own shards straight to their final place in the full tensors, in memory that
every rank maps: one copy per byte, made by the rank that owns it, in parallel, into pages that
stay mapped from one sync to the next; the engine ranks read the tensors in place. The refit
times before and after are in docs/benchmarks.md ("Host staging").

Layout. One file in ``directory`` (tmpfs, ``/dev/shm``) holds every HF tensor of the model, full
size, in the model's dtype, 64-byte aligned, in the order ``iter_hf_tensors`` yields them (stage
by stage, table order); every participant maps it shared (``torch.from_file(shared=True)``). The
file is unlinked as soon as every participant has mapped it, so nothing outlives the job. Size:
the model once (SmolLM2-135M fp32: 514 MiB; a tied ``lm_head`` is the embedding's view).

Protocol of one sync (``iter_hf_tensors(..., staging=...)``, every participant in the same order):

    barrier   the readers are done with the previous sync's contents
    write     each writer (the data-parallel replica 0 ranks: every TP and PP rank) copies its
              shards into place (``mapping.place_shard``)
    barrier   every shard is in place
    read      each reader (the engine ranks) yields views of the tensors

A barrier completes on no rank before every participant has entered it, so no writer overwrites
a tensor a reader still reads: readers start the next sync (its first barrier) only after their
consumer returned. The views are valid until the next sync; consumers copy them (vLLM's loaders
do).

Used on CPU only: on GPU the gather runs over NCCL and the engine loads from device memory.
"""

from __future__ import annotations

import math
import os
import secrets
import socket
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from pear_mega.models.arch import ModelArch
from pear_mega.models.mapping import hf_tensor_shape, sync_tensor_maps
from pear_mega.platform import use_gpu

_ALIGN = 64
EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"


def host_id() -> str:
    """This machine's identity: hostname and boot id (two containers may share a hostname)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            boot = fh.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def staged_names(arch: ModelArch, pp_size: int) -> list[str]:
    """The HF tensors of a sync in the order ``iter_hf_tensors`` yields them, without the tied
    ``lm_head`` (it is the embedding)."""
    return [name for stage in range(pp_size) for entry in sync_tensor_maps(arch, stage, pp_size) for name in entry.hf]


def staging_layout(arch: ModelArch, dtype: torch.dtype, pp_size: int
                   ) -> tuple[list[str], dict[str, tuple[int, tuple[int, ...]]], int]:
    """``(names, {name: (byte offset, shape)}, total bytes)`` of the staged tensors."""
    names = staged_names(arch, pp_size)
    slots, offset = {}, 0
    for name in names:
        shape = hf_tensor_shape(arch, name)
        slots[name] = (offset, shape)
        offset += -(-math.prod(shape) * dtype.itemsize // _ALIGN) * _ALIGN
    return names, slots, offset


def _free_bytes(directory: str) -> int:
    try:
        st = os.statvfs(directory)
    except OSError:
        return -1
    return st.f_bavail * st.f_frsize if os.access(directory, os.W_OK) else -1


class HostStaging:
    """The full HF tensors of one model in shared memory, written by the trainer ranks that own
    the shards and read by the engine ranks (module docstring). Build with ``create``.

    Attributes:
        ranks: the participants (global ranks, sorted): writers and readers.
        readers: the ranks that read (the engine ranks).
        names: the staged tensors in sync order.
        nbytes: size of the mapping.
    """

    def __init__(self, arch: ModelArch, dtype: torch.dtype, pp_size: int, ranks: Sequence[int],
                 readers: Sequence[int], group: Any, path: str, rank: int) -> None:
        import torch.distributed as dist

        self.arch = arch
        self.dtype = dtype
        self.ranks = sorted(ranks)
        self.readers = sorted(readers)
        self.group = group
        self.names, self._slots, self.nbytes = staging_layout(arch, dtype, pp_size)
        self._buffer: torch.Tensor | None = None
        self._views: dict[str, torch.Tensor] = {}
        if rank not in self.ranks:
            return  # a rank that neither writes nor reads: iter_hf_tensors skips it
        create = rank == self.ranks[0]
        try:
            if create:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    os.ftruncate(fd, self.nbytes)
                finally:
                    os.close(fd)
            dist.barrier(group=group)  # the file exists
            self._buffer = torch.from_file(path, shared=True, size=self.nbytes, dtype=torch.uint8)
            dist.barrier(group=group)  # every participant has mapped it
        finally:
            if create and os.path.exists(path):
                os.unlink(path)  # the mappings stay valid; no file outlives the job
        self._views = {name: self._view(name) for name in self.names}

    def _view(self, name: str) -> torch.Tensor:
        offset, shape = self._slots[name]
        nbytes = math.prod(shape) * self.dtype.itemsize
        return self._buffer[offset:offset + nbytes].view(self.dtype).view(shape)

    @staticmethod
    def participants(ctx, readers: Sequence[int]) -> list[int]:
        """The writers (the ranks with data- and context-parallel rank 0: together they hold every
        shard once) and the readers, sorted. Collective over all ranks."""
        import torch.distributed as dist

        writes: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(writes, ctx.dp_rank == 0 and ctx.cp_rank == 0)
        return sorted({r for r, w in enumerate(writes) if w} | set(readers))

    @staticmethod
    def unavailable(arch: ModelArch, dtype: torch.dtype, ctx, readers: Sequence[int],
                    directory: str = "/dev/shm") -> str | None:
        """Why a staging area cannot serve the weight sync to the engine ranks ``readers`` (on GPU;
        participants on more than one host; ``directory`` missing, read-only or too small), or
        None when it can. Collective over all ranks; every rank returns the same."""
        import torch.distributed as dist

        ranks = HostStaging.participants(ctx, readers)
        mine = (host_id(), _free_bytes(directory))
        everyone: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(everyone, mine)
        need = staging_layout(arch, dtype, ctx.pp_size)[2]
        free = min(everyone[r][1] for r in ranks)
        if use_gpu():
            return "the weight sync runs on GPU"
        if len({everyone[r][0] for r in ranks}) != 1:
            return "the writing and reading ranks span hosts"
        if free < 0:
            return f"{directory} is missing or not writable"
        if free < need:
            return f"{directory} has {free / 2**20:.0f} MiB free, the model needs {need / 2**20:.0f} MiB"
        return None

    @classmethod
    def create(cls, arch: ModelArch, dtype: torch.dtype, ctx, readers: Sequence[int], *,
               directory: str = "/dev/shm", timeout_s: float = 1800.0) -> HostStaging:
        """A staging area for the weight sync of ``ctx``'s model (parameters of ``dtype``) to the
        engine ranks ``readers``; check ``unavailable`` first. Collective over all ranks; a rank
        that neither writes nor reads gets an object without a mapping. ``timeout_s``: of the
        participants' group (when they are not the whole world)."""
        import datetime

        import torch.distributed as dist

        ranks = cls.participants(ctx, readers)
        token: list[Any] = [secrets.token_hex(8)]
        dist.broadcast_object_list(token, src=0)
        # new_group is collective over the default group: every rank makes the same call.
        group = None if len(ranks) == ctx.world_size else dist.new_group(
            ranks, backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        path = os.path.join(directory, f"pear_mega-refit-{token[0]}")
        return cls(arch, dtype, ctx.pp_size, ranks, readers, group, path, ctx.rank)

    def tensor(self, name: str) -> torch.Tensor:
        """The full tensor ``name`` (a view of the shared mapping)."""
        if self._buffer is None:
            raise RuntimeError("HostStaging is closed")
        return self._views[name]

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self.group)

    def read(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every staged tensor in sync order; for tied models ``lm_head.weight`` (the embedding)
        right after the embedding."""
        for name in self.names:
            yield name, self._views[name]
            if self.arch.tie_word_embeddings and name == EMBED:
                yield LM_HEAD, self._views[name]

    def close(self) -> None:
        """Drop this rank's mapping (the memory returns to the system once every rank has)."""
        self._buffer = None
        self._views = {}

