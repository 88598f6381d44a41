"""Weights in and out of megatron models: HF safetensors, megatron dist checkpoints, HF export.

On-disk layout of a pear-mega megatron checkpoint directory (written by ``save_checkpoint``; the
SFT/RL trainers write theirs through the same function, adding their own state)::

    <ckpt>/
      pear_mega.json     CheckpointMeta: format version, the HF config.json, tp / pp / dtype /
                         padded vocab the checkpoint was written with
      hf/                config.json + tokenizer files of the source model (for export)
      metadata.json      dist_checkpointing backend marker (torch_dist)
      common.pt          non-sharded objects (the trainer's iteration counter, RNG, data state...)
      .metadata, __*_*.distcp   torch.distributed.checkpoint shards

Inside the sharded state dict the model lives under the key prefix ``model.`` (megatron's own
``sharded_state_dict(prefix="model.")``: ``model.embedding.word_embeddings.weight``,
``model.decoder.layers.self_attention.linear_qkv.weight`` with the layers stacked along a leading
axis, ...). Trainers put optimizer state under ``optimizer.``, the scheduler, RNG and data state
under their own top-level keys; ``load_checkpoint`` and the export tool read only ``model.``, so any
trainer checkpoint exports. dist checkpoints store global tensors, so a checkpoint written at one
TP/PP loads at any other whose padded vocabulary is the same (see
``ModelArch.padded_vocab_size``; the metadata records it and ``tools/convert_hf.py export`` builds
with it). ``pear_mega.models.dist_writer`` writes the same checkpoint one rank at a time without a
model or a process group (the streaming ``tools/convert_hf.py import``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pear_mega.models.arch import ModelArch
from pear_mega.models.mapping import (
    REPLICATED,
    canonical_name,
    hf_tensor_shape,
    iter_megatron_shard,
    local_name,
    megatron_to_hf,
    place_shard,
    stage_tensor_maps,
    sync_tensor_maps,
)
from pear_mega.cpu.threads import torch_threads

if TYPE_CHECKING:
    from pear_mega.models.staging import HostStaging

META_FILE = "pear_mega.json"
HF_SUBDIR = "hf"
MODEL_PREFIX = "model."
FORMAT_VERSION = 1
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def unwrap_model(model):
    """The ``GPTModel`` inside DDP / Float16Module wrappers (or a one-element list of chunks)."""
    if isinstance(model, (list, tuple)):
        if len(model) != 1:
            raise ValueError("virtual pipeline chunks are not supported: pass one model chunk")
        model = model[0]
    while not hasattr(model, "pear_spec_layout") and hasattr(model, "module"):
        model = model.module
    if not hasattr(model, "pear_spec_layout"):
        raise ValueError("expected a model built by pear_mega.models.build_gpt_model")
    return model


# ----------------------------------------------------------------------------- HF safetensors in


class SafetensorsReader:
    """Lazy access to the tensors of an HF directory (single file or sharded with an index).

    Each ``get`` reads one tensor, so host memory stays near the largest tensor rather than the
    checkpoint size. ``mmap=True`` (default) reads through ``safe_open`` (memory-mapped: the pages
    of every tensor read stay mapped, and counted in the process's resident set, until the reader
    is dropped); ``mmap=False`` parses the safetensors headers itself and copies each tensor out
    of the file with ``readinto``, so only the returned tensor is resident (the streaming import).
    """

    def __init__(self, hf_dir: str | os.PathLike, *, mmap: bool = True):
        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            weight_map, files = None, [single.name]
        else:
            raise FileNotFoundError(f"{self.dir}: no model.safetensors or model.safetensors.index.json")
        for file in files:
            if not (self.dir / file).is_file():
                raise FileNotFoundError(f"{self.dir / file}: shard listed in {index.name} is missing")
        self._handles: dict[str, Any] = {}
        self._entries: dict[str, _SafetensorsEntry] = {}
        if mmap:
            from safetensors import safe_open

            for file in files:
                self._handles[file] = safe_open(str(self.dir / file), framework="pt")
            if weight_map is None:
                weight_map = {name: single.name for name in self._handles[single.name].keys()}  # noqa: SIM118 (safe_open is not a dict)
        else:
            for file in files:
                self._entries.update(_read_safetensors_header(self.dir / file))
            if weight_map is None:
                weight_map = {name: single.name for name in self._entries}
        self.weight_map: dict[str, str] = weight_map

    def names(self) -> list[str]:
        return list(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise KeyError(f"{self.dir}: tensor {name!r} is not in the checkpoint")
        if self._handles:
            return self._handles[self.weight_map[name]].get_tensor(name)
        if name not in self._entries:
            raise KeyError(f"{self.dir / self.weight_map[name]}: tensor {name!r} listed in the index is not in the file")
        return self._entries[name].read()


# safetensors dtype names -> torch dtypes (https://github.com/huggingface/safetensors, format spec).
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


@dataclass(frozen=True)
class _SafetensorsEntry:
    """Where one tensor lies in a safetensors file: bytes ``[begin, end)`` of the file."""

    path: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    def read(self) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=self.dtype)
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.begin)
            done = 0
            while done < len(view):
                n = f.readinto(view[done:])
                if not n:
                    raise ValueError(f"{self.path}: tensor {self.name!r}: file ends before its data does")
                done += n
        return out


def _read_safetensors_header(path: Path) -> dict[str, _SafetensorsEntry]:
    """Parse a safetensors header: 8-byte little-endian length ``n``, ``n`` bytes of JSON
    ``{name: {"dtype", "shape", "data_offsets": [begin, end]}}`` with offsets relative to the data
    that follows the header."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise ValueError(f"{path}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            raise ValueError(f"{path}: not a safetensors file (header is not JSON: {exc})") from exc
    base = 8 + n
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r}: unsupported dtype {info.get('dtype')!r}")
        dtype, shape = _SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"])
        begin, end = info["data_offsets"]
        numel = 1
        for dim in shape:
            numel *= dim
        if end - begin != numel * dtype.itemsize or base + end > size:
            raise ValueError(f"{path}: tensor {name!r}: data_offsets {info['data_offsets']} do not fit {info['dtype']}{list(shape)}")
        entries[name] = _SafetensorsEntry(path, name, dtype, shape, base + begin, base + end)
    return entries


def load_hf_checkpoint(model, hf_dir: str | os.PathLike, arch: ModelArch, ctx, *, progress: bool = False) -> None:
    """Copy this rank's shard of an HF safetensors checkpoint into ``model`` (one tensor at a time).

    ``progress=True`` shows a tqdm bar over the stage's tensors.

    Raises:
        FileNotFoundError: missing safetensors file or shard.
        KeyError: a tensor the architecture needs is absent.
        ValueError: shape mismatch (e.g. a vocabulary that disagrees with config.json), or the
            model has parameters the mapping does not fill.
    """
    gpt = unwrap_model(model)
    reader = SafetensorsReader(hf_dir)
    get = finite_tensors(reader.get, hf_dir)
    if arch.tie_word_embeddings is False and "lm_head.weight" not in reader.weight_map:
        raise KeyError(f"{hf_dir}: untied model without lm_head.weight")
    params = dict(gpt.named_parameters())
    filled: set[str] = set()
    shards = iter_megatron_shard(
        get, arch, ctx.tp_rank, ctx.tp_size, ctx.pp_rank, ctx.pp_size, gpt.pear_spec_layout,
        padded_vocab_size=gpt.pear_padded_vocab_size,
    )  # fmt: skip
    if progress:
        from tqdm import tqdm

        shards = tqdm(shards, total=len(stage_tensor_maps(arch, ctx.pp_rank, ctx.pp_size)), desc="import", unit="tensor")
    with torch.no_grad():
        for name, shard in shards:
            if name not in params:
                raise ValueError(f"mapping produced {name!r}, which the megatron model does not have")
            param = params[name]
            if tuple(param.shape) != tuple(shard.shape):
                raise ValueError(f"{name}: model shard shape {tuple(param.shape)} != converted {tuple(shard.shape)}")
            param.copy_(shard.to(device=param.device, dtype=param.dtype))
            filled.add(name)
    missing = sorted(set(params) - filled)
    if missing:
        raise ValueError(f"HF checkpoint {hf_dir} left megatron parameters unset: {missing}")


def finite_tensors(get, hf_dir):
    """``get`` (name -> tensor) that raises ValueError naming the tensor when it holds NaN/inf:
    non-finite weights are refused on import rather than trained on."""

    def checked(name: str) -> torch.Tensor:
        tensor = get(name)
        if tensor.is_floating_point():
            # in chunks: isfinite builds |x| and two masks, three temporaries the size of the input
            # (the streaming import's peak is one shard + one HF tensor, the embedding the largest)
            bad = sum(int((~torch.isfinite(chunk)).sum()) for chunk in tensor.reshape(-1).split(1 << 22))
            if bad:
                raise ValueError(f"{hf_dir}: tensor {name!r} has {bad} non-finite values (NaN/inf) of {tensor.numel()}")
        return tensor

    return checked


# ----------------------------------------------------------------------------- megatron dist ckpt


@dataclass
class CheckpointMeta:
    """Contents of ``pear_mega.json``."""

    hf_config: dict[str, Any]
    tensor_parallel: int
    pipeline_parallel: int
    padded_vocab_size: int
    dtype: str
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def arch(self) -> ModelArch:
        return ModelArch.from_hf(self.hf_config)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def read_checkpoint_meta(ckpt_dir: str | os.PathLike) -> CheckpointMeta:
    """Read ``pear_mega.json``; FileNotFoundError names the directory when it is not a checkpoint."""
    path = Path(ckpt_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{ckpt_dir}: not a pear-mega megatron checkpoint (no {META_FILE})")
    data = json.loads(path.read_text())
    if data.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {data.get('format_version')} != {FORMAT_VERSION}")
    return CheckpointMeta(**data)


def model_sharded_state_dict(model):
    """megatron sharded state dict of the model under the ``model.`` key prefix."""
    return unwrap_model(model).sharded_state_dict(prefix=MODEL_PREFIX)


def copy_hf_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy tokenizer / generation files that exist in ``src`` to ``dst``; returns the names."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def save_checkpoint(
    model,
    ckpt_dir: str | os.PathLike,
    arch: ModelArch,
    ctx,
    *,
    extra: dict[str, Any] | None = None,
    hf_files_from: str | os.PathLike | None = None,
) -> None:
    """Save ``model`` (and optional trainer state) as a dist_checkpointing ``torch_dist`` checkpoint.

    Collective: every rank calls it.

    Args:
        extra: more top-level entries of the sharded state dict (``optimizer``, ``rng_state``,
            ``iteration`` ...); the key ``model`` is reserved.
        hf_files_from: an HF directory whose tokenizer files are copied into ``<ckpt>/hf/``.
    """
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    gpt = unwrap_model(model)
    if extra and "model" in extra:
        raise ValueError("save_checkpoint: extra must not contain the key 'model'")
    ckpt_dir = Path(ckpt_dir)
    if ctx.rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    state = {"model": model_sharded_state_dict(gpt), **(extra or {})}
    dist_checkpointing.save(state, str(ckpt_dir))
    # Our files go in after the shards (dist_checkpointing warns about non-empty directories) and
    # pear_mega.json last: its presence marks a complete checkpoint.
    if ctx.rank == 0:
        param = next(gpt.parameters())
        meta = CheckpointMeta(
            hf_config=arch.hf_config,
            tensor_parallel=ctx.tp_size,
            pipeline_parallel=ctx.pp_size,
            padded_vocab_size=gpt.pear_padded_vocab_size,
            dtype=str(param.dtype).removeprefix("torch."),
        )
        _write_pear_files(ckpt_dir, meta, hf_files_from)
    dist.barrier()


def _write_pear_files(ckpt_dir: Path, meta: CheckpointMeta, hf_files_from) -> None:
    """``hf/`` (config + tokenizer files), then ``pear_mega.json`` (atomically, last)."""
    hf_sub = ckpt_dir / HF_SUBDIR
    hf_sub.mkdir(exist_ok=True)
    (hf_sub / "config.json").write_text(json.dumps(meta.hf_config, indent=2))
    if hf_files_from is not None:
        copy_hf_files(hf_files_from, hf_sub)
    tmp = ckpt_dir / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(asdict(meta), indent=2))
    os.replace(tmp, ckpt_dir / META_FILE)


def load_checkpoint(
    model,
    ckpt_dir: str | os.PathLike,
    arch: ModelArch | None = None,
    ctx=None,
    *,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Load the ``model.`` part of a checkpoint (at any TP/PP) into ``model``; collective.

    Args:
        arch: when given, must describe the same model as the checkpoint.
        ctx: unused (kept for the symmetric signature with ``save_checkpoint``).
        extra: more sharded state to load (e.g. ``{"optimizer": opt.sharded_state_dict(...)}``).
    Returns:
        The loaded state dict (``model`` plus ``extra`` plus the common objects).
    Raises:
        ValueError: architecture or padded vocabulary differ from the checkpoint's.
    """
    from megatron.core import dist_checkpointing

    gpt = unwrap_model(model)
    meta = read_checkpoint_meta(ckpt_dir)
    ckpt_arch = meta.arch
    if arch is not None and arch != ckpt_arch:
        raise ValueError(f"{ckpt_dir}: checkpoint architecture {ckpt_arch} differs from the model's {arch}")
    if meta.padded_vocab_size != gpt.pear_padded_vocab_size:
        raise ValueError(
            f"{ckpt_dir}: checkpoint vocabulary is padded to {meta.padded_vocab_size} rows, the model to "
            f"{gpt.pear_padded_vocab_size}; build the model with padded_vocab_size={meta.padded_vocab_size}"
        )
    model_sd = {k: v for k, v in model_sharded_state_dict(gpt).items() if not k.endswith(EXTRA_STATE)}
    state = {"model": model_sd, **(extra or {})}
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException

    check_safe_to_load(ckpt_dir, state)
    try:
        loaded = dist_checkpointing.load(state, str(ckpt_dir))
    except (OSError, RuntimeError, EOFError, KeyError, ValueError, CheckpointingException, CheckpointException) as exc:
        # truncated / missing shard files, keys the checkpoint lacks: name the checkpoint
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ValueError(f"{ckpt_dir}: cannot load the checkpoint (truncated, incomplete or not written for "
                         f"this model?): {type(exc).__name__}: {first[:500]}") from exc
    # The sharded state dict is keyed by prefixed names; the module's own state dict is not.
    loaded["model"] = {k.removeprefix(MODEL_PREFIX): v for k, v in loaded["model"].items()}
    result = gpt.load_state_dict(loaded["model"], strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(EXTRA_STATE)]
    if missing or result.unexpected_keys:
        raise ValueError(f"{ckpt_dir}: the checkpoint does not fit the model: missing {missing}, "
                         f"unexpected {result.unexpected_keys}")
    return loaded


# ----------------------------------------------------------------------------- what loading may run

#: Suffix of the per-module extra state (megatron's local linears: None; TransformerEngine's:
#: FP8 scaling metadata). It is a pickled object in the checkpoint and never read: no run here
#: trains in FP8, and skipping it lets a local-spec checkpoint load into a TE model (whose
#: modules ask for extra-state objects the local spec never wrote) and vice versa.
EXTRA_STATE = "_extra_state"

# The globals a torch.distributed.checkpoint ``.metadata`` pickle refers to (torch 2.13): data
# classes of the checkpoint planner and torch's dtype/size/layout reconstructors. Anything else
# in it (a function, a class with side effects) makes the checkpoint unsafe.
_METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                     "torch.distributed.checkpoint.filesystem")
_METADATA_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                     ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath")}  # the checkpoint id


class UnsafeCheckpointError(ValueError):
    """Loading the checkpoint would unpickle something other than tensors and plain data."""


def _safe_metadata_class(module: str, name: str) -> bool:
    if (module, name) in _METADATA_GLOBALS:
        return True
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return True
    if module in _METADATA_MODULES:
        obj = getattr(__import__(module, fromlist=[name]), name, None)
        # data classes, enums and the memory-format table only: no functions
        return isinstance(obj, (type, dict))
    return False


def check_safe_to_load(ckpt_dir: str | os.PathLike, sharded_state: dict | None = None) -> None:
    """Refuse a checkpoint whose loading would execute code, before anything of it is unpickled.

    What a load reads, and how it is made safe:

    - ``.metadata`` (torch.distributed.checkpoint's index, a pickle): unpickled here first with
      only the checkpoint planner's data classes and torch dtypes allowed (``_METADATA_GLOBALS``);
      a pickle that names anything else is refused.
    - ``common.pt``: read with ``torch.load(weights_only=True)`` (tensors and plain containers).
    - the requested keys of ``sharded_state`` (tensors of the model, the optimizer) must be tensor
      entries: a key stored as pickled bytes (a ``ShardedObject``) is refused. pear-mega asks for
      none (extra state is skipped; RNG and data state live in safetensors / JSON next to it).

    Raises:
        UnsafeCheckpointError (a ValueError) naming the file and what it refers to.
        FileNotFoundError: no ``.metadata``.
    """
    import pickle

    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    ckpt_dir = Path(ckpt_dir)
    index = ckpt_dir / ".metadata"
    if not index.is_file():
        raise FileNotFoundError(f"{ckpt_dir}: not a complete torch_dist checkpoint (no .metadata)")

    class Restricted(pickle.Unpickler):
        def find_class(self, module, name):
            if _safe_metadata_class(module, name):
                return super().find_class(module, name)
            raise UnsafeCheckpointError(f"{index}: the pickle refers to {module}.{name}, which a checkpoint "
                                        "index never needs: refusing to load it (it could run code)")

    try:
        with open(index, "rb") as f:
            metadata = Restricted(f).load()
    except UnsafeCheckpointError:
        raise
    except Exception as exc:  # truncated or garbled: say which file
        raise ValueError(f"{index}: unreadable checkpoint index ({type(exc).__name__}: {exc})") from exc
    common = ckpt_dir / "common.pt"
    if common.is_file():
        try:
            torch.load(common, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UnsafeCheckpointError(f"{common}: holds objects other than tensors and plain data; refusing to "
                                        f"load it ({str(exc).splitlines()[0]})") from None
    if sharded_state is None:
        return
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    stored = metadata.state_dict_metadata
    for sh in nested_values(sharded_state):
        if isinstance(sh, ShardedObject):
            raise UnsafeCheckpointError(f"{ckpt_dir}: {sh.key} is requested as a pickled object")
        key = getattr(sh, "key", None)
        if key is not None and isinstance(stored.get(key), BytesStorageMetadata):
            raise UnsafeCheckpointError(f"{ckpt_dir}: {key} is stored as pickled bytes, not as a tensor")


# ----------------------------------------------------------------------------- megatron -> HF


def hf_tensor_senders(ctx) -> dict[int, int]:
    """Global rank that sends each pipeline stage's merged HF tensors: the stage's rank with
    tp = dp = cp = 0. Collective (all ranks)."""
    import torch.distributed as dist

    coords: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(coords, (ctx.tp_rank, ctx.pp_rank, ctx.dp_rank, ctx.cp_rank))
    return {c[1]: r for r, c in enumerate(coords) if c[0] == 0 and c[2] == 0 and c[3] == 0}


def iter_hf_tensors(
    model, arch: ModelArch, ctx, dst: int = 0, *, broadcast_groups: dict[int, Any] | None = None,
    staging: HostStaging | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield full HF-named tensors of a TP/PP-sharded model on global rank ``dst``, or on every
    member of ``broadcast_groups``.

    Every rank must exhaust the iterator (it drives the collectives): TP shards are gathered
    to TP rank 0 over the TP group of the stage that owns a tensor (asynchronously, one tensor
    ahead, so the next gather overlaps the merge and the consumer's work on the current one), and the stage's sender (its tp = dp = cp =
    0 rank, ``hf_tensor_senders``) merges them into HF tensors and either sends them to ``dst``
    point to point or, with ``broadcast_groups[stage]`` (a process group containing that sender,
    same order of calls on every member), broadcasts them to the group. Only data-parallel
    replica 0 gathers; any rank may receive. Tied models yield ``lm_head.weight`` too (the rollout
    engine needs it). Tensors are on ``ctx.device`` in the model's dtype and may share storage
    with the parameters.

    Args:
        dst: a global rank with tp_rank == dp_rank == cp_rank == 0 (default 0); ignored with
            ``broadcast_groups``.
        broadcast_groups: pipeline stage -> process group of the sender and the receivers (the
            ranks of a tensor-parallel rollout engine, say); None: point to point to ``dst``.
        staging: CPU, one host: no gather at all. Every rank with dp = cp = 0 writes its shards
            into place in ``staging``'s shared full tensors and its readers yield views of them,
            valid until the next call (``pear_mega.models.staging``); ``dst`` and
            ``broadcast_groups`` are ignored. Every rank of ``staging.ranks`` must exhaust the
            iterator; the other ranks may skip the call.
    """
    import torch.distributed as dist

    gpt = unwrap_model(model)
    params = {name: p for name, p in gpt.named_parameters()}
    if staging is not None:
        yield from _iter_staged(gpt, params, arch, ctx, staging)
        return
    senders = hf_tensor_senders(ctx)
    if broadcast_groups is None:
        if dst not in senders.values():  # the ranks with tp = dp = cp = 0
            raise ValueError(f"iter_hf_tensors: dst={dst} must be a rank with tp, dp and cp rank 0")
        members = {stage: {senders[stage], dst} for stage in senders}  # the sender only sends
    else:
        if set(broadcast_groups) != set(senders):
            raise ValueError(f"iter_hf_tensors: broadcast_groups needs one group per stage {sorted(senders)}, "
                             f"got {sorted(broadcast_groups)}")
        members = {stage: set(dist.get_process_group_ranks(g)) for stage, g in broadcast_groups.items()}
        for stage, ranks in members.items():
            if senders[stage] not in ranks:
                raise ValueError(f"iter_hf_tensors: the group of stage {stage} lacks its sender, rank {senders[stage]}")
    gathers = ctx.dp_rank == 0 and ctx.cp_rank == 0
    if not gathers and not any(ctx.rank in m for m in members.values()):
        return
    dtype = next(iter(params.values())).dtype

    def start_gather(entry, stage: int):
        """This rank's shard of ``entry`` and, on TP rank 0, buffers for all of them; the gather is
        asynchronous so that the next tensor travels while the current one is merged and consumed."""
        local = params[local_name(entry.megatron, arch, stage, ctx.pp_size, gpt.pear_spec_layout)].detach()
        if entry.kind == REPLICATED or ctx.tp_size == 1:
            return [local], None
        # a gather, not an all-gather: only TP rank 0 merges the shards (the others would
        # receive tp - 1 shards of every tensor for nothing)
        local = local.contiguous()
        shards = [torch.empty_like(local) for _ in range(ctx.tp_size)] if ctx.tp_rank == 0 else None
        return shards, dist.gather(local, shards, group=ctx.tp_group, group_dst=0, async_op=True)

    for stage in range(ctx.pp_size):
        receives = ctx.rank in members[stage]
        owns = gathers and ctx.pp_rank == stage
        entries = sync_tensor_maps(arch, stage, ctx.pp_size)
        pending = start_gather(entries[0], stage) if owns and entries else None
        for i, entry in enumerate(entries):
            results = None
            if owns:
                shards, work = pending
                if work is not None:
                    work.wait()
                # one gather in flight ahead, on every TP rank in the same order
                pending = start_gather(entries[i + 1], stage) if i + 1 < len(entries) else None
                if ctx.tp_rank == 0:
                    results = megatron_to_hf(entry.megatron, shards, arch)
            src = senders[stage]
            if ctx.rank == src:
                for _, tensor in results:
                    if broadcast_groups is None:
                        if dst != src:
                            dist.send(tensor.contiguous(), dst=dst)
                    elif len(members[stage]) > 1:
                        dist.broadcast(tensor.contiguous(), src=src, group=broadcast_groups[stage])
            elif receives:
                results = [(name, torch.empty(hf_tensor_shape(arch, name), dtype=dtype, device=ctx.device))
                           for name in entry.hf]
                for _, buf in results:
                    if broadcast_groups is None:
                        dist.recv(buf, src=src)
                    else:
                        dist.broadcast(buf, src=src, group=broadcast_groups[stage])
            if not receives or (broadcast_groups is None and ctx.rank != dst):
                continue
            for name, tensor in results:
                yield name, tensor
                if arch.tie_word_embeddings and name == "model.embed_tokens.weight":
                    yield "lm_head.weight", tensor


def _iter_staged(gpt, params: dict[str, torch.Tensor], arch: ModelArch, ctx, staging: HostStaging
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """``iter_hf_tensors`` through host shared memory (its ``staging`` argument)."""
    if ctx.rank not in staging.ranks:
        return
    staging.barrier()  # the readers are done with the previous contents
    if ctx.dp_rank == 0 and ctx.cp_rank == 0:
        # One thread: the ranks of the host write at the same time, and a second copy thread
        # on a rank only competes with them (docs/benchmarks.md, "Host staging").
        with torch_threads(1), torch.no_grad():
            for entry in sync_tensor_maps(arch, ctx.pp_rank, ctx.pp_size):
                local = params[local_name(entry.megatron, arch, ctx.pp_rank, ctx.pp_size, gpt.pear_spec_layout)]
                for name, index, source in place_shard(entry.megatron, local.detach(), ctx.tp_rank, ctx.tp_size, arch):
                    staging.tensor(name)[index].copy_(source)
    staging.barrier()  # every shard is in place
    if ctx.rank in staging.readers:
        yield from staging.read()


def model_param_names(model, arch: ModelArch, ctx) -> list[str]:
    """Canonical global names of this rank's parameters (diagnostics, tests)."""
    gpt = unwrap_model(model)
    return [canonical_name(n, arch, ctx.pp_rank, ctx.pp_size) for n, _ in gpt.named_parameters()]


def save_hf_checkpoint(
    tensors: Iterable[tuple[str, torch.Tensor]],
    out_dir: str | os.PathLike,
    arch: ModelArch,
    *,
    dtype: torch.dtype | None = None,
    hf_files_from: str | os.PathLike | None = None,
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Write HF tensors as safetensors (sharded above ``max_shard_bytes``) + config.json + tokenizer.

    ``lm_head.weight`` is dropped for tied models, as ``save_pretrained`` does.

    Args:
        tensors: ``(hf_name, tensor)`` pairs, e.g. from ``iter_hf_tensors`` on dst.
        dtype: cast to this dtype (default: keep); also written as the config's ``dtype``.
        hf_files_from: copy tokenizer / generation config files from this directory.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt"}
    # Shards are written as soon as they fill up (host memory stays near one shard) under
    # temporary names, and renamed once their count is known.
    written: list[tuple[Path, list[str]]] = []
    current: dict[str, torch.Tensor] = {}
    size = total = 0
    seen_dtype = None

    def flush():
        nonlocal current, size
        if current:
            tmp = out / f".shard-{len(written):05d}.safetensors.tmp"
            save_file(current, str(tmp), metadata=metadata)
            written.append((tmp, list(current)))
        current, size = {}, 0

    for name, tensor in tensors:
        if arch.tie_word_embeddings and name == "lm_head.weight":
            continue
        # A copy: the tensor may be a view of a parameter that training keeps updating.
        tensor = tensor.detach().to("cpu", dtype=dtype or tensor.dtype).contiguous().clone()
        seen_dtype = tensor.dtype
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
        current[name] = tensor
        size += nbytes
        total += nbytes
    flush()
    # Weight files of an earlier export into the same directory that this one does not replace
    # (an index next to a single file, shards of another count) would be read with the new ones.
    for stale in [*out.glob("model-*-of-*.safetensors"), out / "model.safetensors.index.json",
                  out / "model.safetensors"]:
        if stale.is_file():
            stale.unlink()
    if len(written) == 1:
        os.replace(written[0][0], out / "model.safetensors")
    else:
        weight_map = {}
        for i, (tmp, names) in enumerate(written, 1):
            file = f"model-{i:05d}-of-{len(written):05d}.safetensors"
            os.replace(tmp, out / file)
            weight_map.update({name: file for name in names})
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    config = dict(arch.hf_config)
    config["architectures"] = [arch.architecture]
    if seen_dtype is not None:
        config["dtype"] = str(seen_dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if hf_files_from is not None:
        copy_hf_files(hf_files_from, out)
    return out
