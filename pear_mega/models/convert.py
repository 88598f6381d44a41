"""HF <-> megatron checkpoint conversion and verification (the logic behind tools/convert_hf.py).

``export_hf`` and ``verify`` run in the current process group: launched plainly it is a world of
one (TP=1, PP=1); under ``torchrun --nproc-per-node N`` they split the world as asked. See the
tool's ``--help`` for the commands and ``pear_mega.models.checkpoint`` for the directory layout.

Memory of ``import_hf`` (HF safetensors -> megatron ``torch_dist`` checkpoint at ``tp x pp``):

- One process (default): streamed, one rank at a time, without building a megatron model or a
  process group. For each ``(pp_rank, tp_rank)`` the mapping table
  (``mapping.iter_megatron_shard``) computes that rank's tensors from HF tensors read one at a
  time (``SafetensorsReader(mmap=False)``: plain reads, so nothing of the file stays resident),
  ``dist_writer.save_checkpoint_streaming`` writes them as that rank's dist-checkpoint files and
  frees them; the ``.metadata`` of all ranks is written last. Peak host memory ~ the largest
  rank's shard + one HF tensor, i.e. about ``model / (tp * pp)`` (Llama-3-70B in bf16 at TP=8:
  ~17.5 GB, plus the 2 GB embedding while it is cut). The checkpoint is the one ``tp * pp``
  ranks would save (measured for SmolLM2-135M in docs/benchmarks.md: a fraction of the
  whole-model path's resident memory).
- ``streaming=False`` (the tool's ``--whole-model``): the model is built whole in this process
  (peak ~ the whole model + one tensor) and saved with ``save_checkpoint``.
- Under torchrun with ``tp * pp`` ranks each rank builds and holds only its shard.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DEFAULT_PROBES = (
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Question: what is 12 + 30?\nAnswer:",
    "Once upon a time, in a small village by the sea, there lived",
)


def _dtype(name: str) -> torch.dtype:
    try:
        dtype = getattr(torch, name)
    except AttributeError:
        dtype = None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} (use float32, bfloat16 or float16)")  # noqa: TRY004
    return dtype


def _init(tp: int, pp: int):
    """Initialise the world; returns ``(ctx, keep_process_group)`` for ``destroy_parallel``.

    A plain process (or a torchrun world of one) builds the whole model; larger worlds split
    ``tp x pp``. A process group that already exists is reused and left alive afterwards.
    """
    import torch.distributed as dist

    from pear_mega.parallel import ParallelConfig, init_parallel

    existed = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if existed else int(os.environ.get("WORLD_SIZE", "1"))
    cfg = ParallelConfig() if world == 1 else ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp)
    return init_parallel(cfg), existed


def _progress(iterable, total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="tensor", disable=not enabled)


def _distributed_world() -> bool:
    """True under torchrun (or an existing process group) with more than one rank."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def import_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, tp: int = 1, pp: int = 1,
              dtype: str = "float32", progress: bool = True, streaming: bool = True) -> Path:  # fmt: skip
    """HF safetensors directory -> megatron ``torch_dist`` checkpoint laid out for ``tp x pp``.

    Args:
        tp, pp: the layout the checkpoint is written at (it loads at any TP/PP with the same
            padded vocabulary, ``ModelArch.padded_vocab_size(tp)``).
        dtype: parameter dtype of the checkpoint ("float32", "bfloat16", "float16").
        streaming: in a single process, write the ``tp * pp`` ranks one after another without
            building a model (peak memory ~ one rank's shard, see the module docstring); False
            builds the whole model here. Under torchrun (world > 1) the world is split
            ``tp x pp`` (x data parallel) and each rank saves its own shard; ``streaming`` is
            not used.
    Raises:
        FileExistsError: ``out_dir`` is not empty.
        ValueError, KeyError, FileNotFoundError: bad layout for the model, or a bad HF directory.
    """
    from pear_mega.models.arch import ModelArch

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    torch_dtype = _dtype(dtype)
    arch = ModelArch.from_hf(hf_dir)  # fails fast on unknown architectures, before any process group
    arch.check_tensor_parallel(tp)
    arch.check_pipeline_parallel(pp)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir}: output directory is not empty")
    existed = out_dir.exists()
    try:
        if streaming and not _distributed_world():
            return _import_streaming(hf_dir, out_dir, arch, tp, pp, torch_dtype, progress)
        return _import_in_memory(hf_dir, out_dir, arch, tp, pp, torch_dtype, progress)
    except BaseException:
        # A failed import leaves no partial checkpoint behind (a retry would find the directory
        # not empty): the directory is put back as it was, empty or absent.
        if out_dir.exists() and int(os.environ.get("RANK", "0")) == 0:
            import shutil

            if existed:
                for child in out_dir.iterdir():
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
            else:
                shutil.rmtree(out_dir, ignore_errors=True)
        raise


def _import_streaming(hf_dir: Path, out_dir: Path, arch, tp: int, pp: int, dtype: torch.dtype, progress: bool) -> Path:
    """One rank at a time: mapping table -> rank's tensors -> that rank's dist-checkpoint files."""
    from itertools import islice

    from pear_mega.models.build import SPEC_TE
    from pear_mega.models.checkpoint import SafetensorsReader
    from pear_mega.models.dist_writer import save_checkpoint_streaming
    from pear_mega.models.mapping import (
        canonical_name,
        iter_megatron_shard,
        stage_tensor_maps,
    )

    from pear_mega.models.checkpoint import finite_tensors

    reader = SafetensorsReader(hf_dir, mmap=False)
    if arch.tie_word_embeddings is False and "lm_head.weight" not in reader.weight_map:
        raise KeyError(f"{hf_dir}: untied model without lm_head.weight")
    padded = arch.padded_vocab_size(tp)
    get = finite_tensors(reader.get, hf_dir)

    def rank_shards(tp_rank: int, pp_rank: int):
        maps = stage_tensor_maps(arch, pp_rank, pp)
        # The tied output layer of the last stage (pp > 1) is the last entry and is not written:
        # stop before it rather than read the embedding once more.
        if arch.tie_word_embeddings and maps[-1].megatron == "output_layer.weight":
            maps = maps[:-1]
        shards = iter_megatron_shard(get, arch, tp_rank, tp, pp_rank, pp, SPEC_TE, padded_vocab_size=padded)
        for entry, (local, shard) in zip(maps, islice(shards, len(maps))):
            if canonical_name(local, arch, pp_rank, pp) != entry.megatron:
                raise RuntimeError(f"mapping order changed: {local} where {entry.megatron} was expected")
            yield entry.megatron, shard

    logger.info("importing %s (%s) into %s at tp=%d pp=%d, streaming one rank at a time (%d ranks)",
                hf_dir, arch.family, out_dir, tp, pp, tp * pp)  # fmt: skip
    return save_checkpoint_streaming(
        rank_shards, out_dir, arch, tensor_parallel=tp, pipeline_parallel=pp, padded_vocab_size=padded,
        dtype=dtype, hf_files_from=hf_dir, progress=progress,
    )  # fmt: skip


def _import_in_memory(hf_dir: Path, out_dir: Path, arch, tp: int, pp: int, dtype: torch.dtype, progress: bool) -> Path:
    """Build the model in this process group (whole in a world of one) and save it."""
    from pear_mega.models.build import build_gpt_model
    from pear_mega.models.checkpoint import load_hf_checkpoint, save_checkpoint
    from pear_mega.models.mapping import all_tensor_maps
    from pear_mega.parallel import destroy_parallel

    ctx, keep = _init(tp, pp)
    try:
        model = build_gpt_model(arch, ctx, dtype=dtype, padded_vocab_size=arch.padded_vocab_size(tp))
        n = len(all_tensor_maps(arch))
        logger.info("importing %s (%s, %d tensors) into %s", hf_dir, arch.family, n, out_dir)
        load_hf_checkpoint(model, hf_dir, arch, ctx, progress=progress and ctx.rank == 0)
        save_checkpoint(model, out_dir, arch, ctx, hf_files_from=hf_dir)
    finally:
        destroy_parallel(keep_process_group=keep)
    return out_dir


def export_hf(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, *, tp: int = 1, pp: int = 1,
              dtype: str | None = None, tokenizer_dir: str | os.PathLike | None = None,
              progress: bool = True) -> Path:  # fmt: skip
    """megatron checkpoint (written at any TP/PP, trainer checkpoints included) -> HF directory.

    The output holds ``model.safetensors`` (or shards + index), ``config.json`` and the tokenizer
    files stored in ``<ckpt>/hf`` (or copied from ``tokenizer_dir``).
    """
    from pear_mega.models.build import build_gpt_model
    from pear_mega.models.checkpoint import (
        HF_SUBDIR,
        iter_hf_tensors,
        load_checkpoint,
        read_checkpoint_meta,
        save_hf_checkpoint,
    )
    from pear_mega.models.mapping import hf_tensor_names
    from pear_mega.parallel import destroy_parallel

    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    meta = read_checkpoint_meta(ckpt_dir)
    arch = meta.arch
    ctx, keep = _init(tp, pp)
    try:
        model = build_gpt_model(arch, ctx, dtype=meta.torch_dtype, padded_vocab_size=meta.padded_vocab_size)
        load_checkpoint(model, ckpt_dir, arch, ctx)
        tensors = iter_hf_tensors(model, arch, ctx, dst=0)
        if ctx.rank == 0:
            files_from = tokenizer_dir if tokenizer_dir is not None else ckpt_dir / HF_SUBDIR
            total = len(hf_tensor_names(arch))
            save_hf_checkpoint(
                _progress(tensors, total, "export", progress),
                out_dir,
                arch,
                dtype=_dtype(dtype) if dtype else None,
                hf_files_from=files_from if Path(files_from).is_dir() else None,
            )
        else:
            for _ in tensors:  # drive the collectives
                pass
    finally:
        destroy_parallel(keep_process_group=keep)
    return out_dir


@dataclass
class VerifyReport:
    """Megatron vs HF logits on the probe prompts (real vocabulary only)."""

    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    num_tokens: int

    def __str__(self) -> str:
        return (
            f"max |logit diff| {self.max_abs_diff:.3e}  mean |logit diff| {self.mean_abs_diff:.3e}  "
            f"top-1 agreement {100 * self.top1_agreement:.2f}% over {self.num_tokens} tokens"
        )


def probe_token_ids(hf_dir: str | os.PathLike, prompts, vocab_size: int) -> list[list[int]]:
    """Token ids of the probe prompts (HF tokenizer when the directory has one, else seeded random ids)."""
    reason = "no tokenizer files"
    if any((Path(hf_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(hf_dir))
            ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
            if all(ids) and max(max(s) for s in ids) < vocab_size:
                return ids
            reason = "the tokenizer gives empty or out-of-vocabulary ids"
        except (OSError, ValueError) as exc:
            reason = f"tokenizer failed to load: {exc}"
    logger.warning("%s: %s; probing with seeded random token ids", hf_dir, reason)
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab_size, (8 + 3 * i,), generator=gen).tolist() for i in range(len(prompts))]


def verify(hf_dir: str | os.PathLike, ckpt_dir: str | os.PathLike, *, prompts=DEFAULT_PROBES,
           tp: int = 1, pp: int = 1) -> VerifyReport | None:  # fmt: skip
    """Run the probe prompts through the HF model (one prompt at a time) and the megatron
    checkpoint (all prompts packed into one sequence) and compare the logits.

    Returns:
        The report on global rank 0 (None elsewhere).
    """
    from pear_mega.models.build import attention_inputs, build_gpt_model
    from pear_mega.models.checkpoint import load_checkpoint, read_checkpoint_meta
    from pear_mega.models.forward import forward_logits
    from pear_mega.parallel import destroy_parallel

    meta = read_checkpoint_meta(ckpt_dir)
    arch = meta.arch
    seqs = [s for s in probe_token_ids(hf_dir, prompts, arch.vocab_size) if s]
    if not seqs:
        raise ValueError("verify: every probe prompt tokenized to nothing")
    ctx, keep = _init(tp, pp)
    try:
        model = build_gpt_model(arch, ctx, dtype=torch.float32, padded_vocab_size=meta.padded_vocab_size)
        load_checkpoint(model, ckpt_dir, arch, ctx)
        model.eval()
        ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long).unsqueeze(0).to(ctx.device)
        lengths = torch.tensor([0] + [len(s) for s in seqs])
        cu = torch.cumsum(lengths, 0)
        position_ids, mask, packed = attention_inputs(cu, ids.shape[1], ctx.device)
        with torch.no_grad():
            logits = forward_logits(model, ctx, ids, position_ids, mask, packed)
        report = None
        if ctx.is_last_stage:
            if ctx.tp_size > 1:
                parts = [torch.empty_like(logits) for _ in range(ctx.tp_size)]
                torch.distributed.all_gather(parts, logits.contiguous(), group=ctx.tp_group)
                logits = torch.cat(parts, dim=-1)
            if ctx.tp_rank == 0 and ctx.dp_rank == 0:
                report = _compare_with_hf(hf_dir, seqs, logits[0, :, : arch.vocab_size].float().cpu())
        # Hand the report to rank 0 (the last stage may live elsewhere).
        reports = [None] * ctx.world_size
        torch.distributed.all_gather_object(reports, report)
        report = next((r for r in reports if r is not None), None)
    finally:
        destroy_parallel(keep_process_group=keep)
    return report if ctx.rank == 0 else None


def _compare_with_hf(hf_dir, seqs: list[list[int]], logits: torch.Tensor) -> VerifyReport:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    refs = []
    with torch.no_grad():
        for s in seqs:
            refs.append(hf(torch.tensor([s])).logits[0].float())
    ref = torch.cat(refs, dim=0)
    diff = (logits - ref).abs()
    agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return VerifyReport(diff.max().item(), diff.mean().item(), agree, ref.shape[0])
