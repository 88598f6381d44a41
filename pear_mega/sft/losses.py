"""The per-token losses PEAR-SFT can weight (``loss.kind``), behind one call the trainer makes.

    loss(logits [S, V/tp], pack, ctx) -> LossResult(loss_sum, count, out, per_token, mask, logp_beta, sums)

``loss_sum`` / ``count`` follow megatron's per-token contract (``pear_mega.sft.trainer``): each
microbatch returns the sum of its weighted token losses and its token count (sequence count for
``normalization="sequences"``, whose tokens are scaled by 1 / their sequence's loss tokens; a token
count and a per-microbatch self-normalized sum for ``"weights"``). ``sums`` are the kind's own
step statistics (summed over microbatches and DP ranks by the trainer; ``metrics`` turns them into
TensorBoard scalars).

* ``nll`` — ``PearNLLLoss``: ℓ_t = −log πθ(y_t), ``fused_pear_loss`` (PEAR-SFT).
* ``kd``  — ``PearKDLoss``: ℓ_t = kl_weight·KL_t + nll_weight·(−log πθ(y_t)) against the teacher
  top-K stored with the data (``pear_mega.kd``), ``fused_pear_kd_loss``. Its statistics: the KL and
  its head / tail terms, the teacher's top-K mass P and the student's Q on the same ids, and the
  top-K overlap — the share of the student's k_t most likely tokens among the teacher's k_t ids.

Both write the gradient over the logits' own storage (``inplace_backward``): GPTModel hands the
loss a fresh ``[S, V/tp]`` buffer that nothing reads after it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from pear_mega.pear import IGNORE_INDEX


@dataclass
class LossResult:
    """One microbatch's loss (see the module doc); per-token tensors are ``[S]`` and detached."""

    loss_sum: Tensor
    count: Tensor
    out: object
    """The fused loss's output (``PearLossOutput`` / ``KDLossOutput``): logprobs, log_weights, ..."""
    per_token: Tensor
    """ℓ_t, the unweighted per-token loss (0 off the loss mask)."""
    mask: Tensor
    logp_beta: Tensor
    sums: Tensor
    """float64 ``[len(extra_names)]`` sums of the kind's own statistics."""


def _megatron_sum(loss: Tensor, mask: Tensor, cu_seqlens: Tensor, normalization: str) -> tuple[Tensor, Tensor]:
    """(loss_sum, count) of a fused loss computed with normalizer 1 (None for "weights")."""
    n_tokens = mask.sum()
    if normalization == "tokens":
        return loss, n_tokens
    if normalization == "sequences":
        seq_ids = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1, device=mask.device),
                                          (cu_seqlens[1:] - cu_seqlens[:-1]).long())  # fmt: skip
        per_seq = torch.zeros(len(cu_seqlens) - 1, device=mask.device).index_add_(0, seq_ids, mask.float())
        return loss, (per_seq > 0).sum()
    return loss * n_tokens, n_tokens  # "weights": token-weighted mean of per-microbatch self-normalized losses


class PearNLLLoss:
    """PEAR-SFT: ℓ_t = −log πθ(y_t)."""

    extra_names: tuple[str, ...] = ()
    has_entropy = True
    """Whether ``out`` carries the per-token entropy (``train/entropy``)."""

    def __init__(self, pear, vocab_size: int):
        self.pear, self.vocab_size = pear, vocab_size

    def _inputs(self, pack: dict, device):
        return (pack["labels"].to(device), pack["behavior_logprobs"].to(device), pack["cu_seqlens"].to(device))

    def _tp(self, logits: Tensor, ctx) -> dict:
        return dict(tp_group=ctx.tp_group if ctx.tp_size > 1 else None, vocab_start=ctx.tp_rank * logits.shape[-1],
                    vocab_size=self.vocab_size, inplace_backward=True, check_inputs=False,
                    normalizer=None if self.pear.normalization == "weights" else 1.0)  # fmt: skip

    def __call__(self, logits: Tensor, pack: dict, ctx) -> LossResult:
        from pear_mega.kernels import fused_pear_loss

        labels, logp_beta, cu = self._inputs(pack, logits.device)
        out = fused_pear_loss(logits, labels, logp_beta, cu, self.pear, **self._tp(logits, ctx))
        mask = labels != IGNORE_INDEX
        loss, count = _megatron_sum(out.loss, mask, cu, self.pear.normalization)
        empty = torch.zeros(0, dtype=torch.float64, device=logits.device)
        return LossResult(loss, count, out, -out.logprobs, mask, logp_beta, empty)

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return {}

    def check_data(self, files, cache_dir: str | None = None) -> None:
        """Cheap check of the data files before anything is built (none for the NLL)."""

    def check_packs(self, packs, files) -> None:
        """The fused kernel's input checks (labels in the vocabulary or -100, finite πβ log-probs on
        loss tokens, cu_seqlens), once at load on the host packs: in the loop every microbatch's check
        would be a device→host sync (``_tp`` passes ``check_inputs=False``)."""
        from pear_mega.kernels.pear_loss import _check_values

        for pack in packs:
            with _naming(files):
                _check_values(pack.labels, pack.behavior_logprobs, pack.cu_seqlens, self.vocab_size)


class PearKDLoss(PearNLLLoss):
    """Distillation: ℓ_t = kl_weight·KL_t + nll_weight·(−log πθ(y_t)) to the stored teacher top-K."""

    extra_names = ("kd_kl", "kd_tail", "kd_teacher_mass", "kd_student_mass", "kd_overlap", "kd_teacher_ids")
    has_entropy = False

    def __init__(self, pear, kd, vocab_size: int):
        super().__init__(pear, vocab_size)
        self.kd = kd

    def __call__(self, logits: Tensor, pack: dict, ctx) -> LossResult:
        from pear_mega.kernels import fused_pear_kd_loss

        if "topk_ids" not in pack:
            raise ValueError("loss.kind=kd: this pack holds no teacher top-K (collect it with "
                             "tools/collect_logprobs.py --top-k K)")  # fmt: skip
        labels, logp_beta, cu = self._inputs(pack, logits.device)
        topk_ids, topk_lps = pack["topk_ids"].to(logits.device), pack["topk_logprobs"].to(logits.device)
        overlap = self._overlap(logits, topk_ids, ctx)  # before backward overwrites the logits
        out = fused_pear_kd_loss(logits, labels, logp_beta, topk_ids, topk_lps, cu, self.pear, self.kd,
                                 **self._tp(logits, ctx))  # fmt: skip
        mask = labels != IGNORE_INDEX
        loss, count = _megatron_sum(out.loss, mask, cu, self.pear.normalization)
        per_token = self.kd.kl_weight * out.kd - self.kd.nll_weight * out.logprobs
        k_t = torch.where(mask, (topk_ids >= 0).sum(1), 0).double()
        sums = torch.stack([out.kd.double().sum(), out.kd_tail.double().sum(), out.teacher_mass.double().sum(),
                            out.student_mass.double().sum(), torch.where(mask, overlap, 0).double().sum(),
                            k_t.sum()])  # fmt: skip
        return LossResult(loss, count, out, per_token, mask, logp_beta, sums)

    def _overlap(self, logits: Tensor, topk_ids: Tensor, ctx) -> Tensor:
        """``[S]`` count of the student's k_t most likely tokens (whole vocabulary, over the TP shards)
        that are among the row's k_t teacher ids."""
        from pear_mega.kernels.pear_loss import all_gather_rows

        k = topk_ids.shape[1]
        with torch.no_grad():
            v_local = logits.shape[-1]
            start = ctx.tp_rank * v_local
            x = logits.detach()
            n_valid = max(0, min(v_local, self.vocab_size - start))
            if n_valid < v_local:  # vocab padding never counts as a student's top token
                x = x.clone()
                x[:, n_valid:] = float("-inf")
            vals, ids = torch.topk(x.float(), min(k, v_local), dim=1)
            ids = ids + start
            if ctx.tp_size > 1:  # every shard's top-k, then the top-k of those; ids as float32 (exact < 2^24)
                kk = vals.shape[1]
                both = all_gather_rows(torch.cat([vals, ids.float()], 1), ctx.tp_group)  # [world, S, 2kk]
                vals = torch.cat(list(both[..., :kk]), 1)
                ids = torch.cat(list(both[..., kk:]), 1).long()
                ids = ids.gather(1, torch.topk(vals, min(k, vals.shape[1]), dim=1).indices)
            k_t = (topk_ids >= 0).sum(1, keepdim=True)
            ranked = torch.arange(ids.shape[1], device=ids.device)[None, :] < k_t  # the student's first k_t
            hit = (ids[:, :, None] == topk_ids[:, None, :]).any(-1) & ranked
            return hit.sum(1)

    def check_data(self, files, cache_dir: str | None = None) -> None:
        """The first row of every existing file must carry the teacher top-K on each trained span
        (a missing file is the loader's error); the loaded packs are checked row by row later."""
        from pathlib import Path

        from pear_mega.data.format import parse_row, read_rows

        for path in files:
            if not Path(path).exists():
                continue
            for index, row in enumerate(read_rows(path, cache_dir)):
                for span in parse_row(row, path, index).spans:
                    if span.topk_ids is None:
                        raise ValueError(_NO_TOPK + f": {path}: row {index}: field "
                                         f"{span.ids_field.replace('token_ids', 'topk_ids')} is missing")
                break

    def check_packs(self, packs, files) -> None:
        from pear_mega.kernels.kd_loss import _check_topk_values

        if any(p.topk_ids is None for p in packs):
            raise ValueError(_NO_TOPK + f": some rows of {list(files)} have no topk_ids / response_topk_ids")
        super().check_packs(packs, files)
        for pack in packs:
            with _naming(files):
                _check_topk_values(pack.labels, pack.topk_ids, pack.topk_logprobs, self.vocab_size)

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["tokens"], 1.0)
        return {
            "kd/kl": sums["kd_kl"] / n,
            "kd/kl_head": (sums["kd_kl"] - sums["kd_tail"]) / n,
            "kd/kl_tail": sums["kd_tail"] / n,
            "kd/teacher_mass": sums["kd_teacher_mass"] / n,
            "kd/student_mass": sums["kd_student_mass"] / n,
            "kd/topk_overlap": sums["kd_overlap"] / max(sums["kd_teacher_ids"], 1.0),
        }


@contextmanager
def _naming(files):
    """Prefix a kernel input check's error with the data files (rows were checked by name at load;
    this is the net under the packing)."""
    try:
        yield
    except ValueError as e:
        raise ValueError(f"data ({', '.join(map(str, files))}): {e}") from None


_NO_TOPK = ("loss.kind=kd needs a teacher top-K with every row of data.train_files (collect it with "
            "tools/collect_logprobs.py --top-k K)")


def build_loss(cfg, vocab_size: int) -> PearNLLLoss:
    """The loss object of ``cfg.loss.kind`` for an ``SFTConfig``."""
    if cfg.loss.kind == "kd":
        return PearKDLoss(cfg.pear, cfg.loss.kd, vocab_size)
    return PearNLLLoss(cfg.pear, vocab_size)
