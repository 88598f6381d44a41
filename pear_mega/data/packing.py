"""Packing tokenized examples into fixed-length packs.

A pack holds whole examples back to back, in the packed-shifted layout of
``docs/architecture.md``:

    tokens            [S]    int64    S = seq_length, always (fixed shapes for megatron)
    labels            [S]    int64    -100 off loss tokens and at every sequence's last position
    behavior_logprobs [S]    float32  log πβ(labels[t] | tokens[..t]), 0 where labels == -100
    cu_seqlens        [B+1]  int32    sequence boundaries, cu_seqlens[0] = 0, cu_seqlens[-1] = S
    topk_ids          [S, K] int64    teacher top-K of each label, -1 = empty slot   (distillation
    topk_logprobs     [S, K] float32  their log-probs, 0 in empty slots              data only)

K is the most teacher entries at any position of the pack's examples; examples without a stored
top-K (and the pad tail) hold only empty slots.

Because every example is already shifted within itself (its last label is -100), concatenation
never creates a label that crosses from one sequence into the next. If the examples leave room,
the tail is one pad-only sequence (``pad_id`` tokens, labels all -100) so the pack is exactly S
tokens; it is a sequence of its own in ``cu_seqlens``, so no real token attends to it.

Packing is first-fit: each example (in the given order) goes into the first pack with room for
it, else opens a new pack. Packs whose free space is smaller than the shortest example are closed
early, which keeps the search short.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pear_mega.data.tokenize import IGNORE_INDEX, TokenizedExample


@dataclass
class Pack:
    """One training pack (shapes in the module docstring)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    behavior_logprobs: torch.Tensor
    cu_seqlens: torch.Tensor
    num_real_tokens: int
    """Tokens of real examples (S minus the pad tail)."""
    sources: tuple[str, ...] = ()
    """``file:row`` of each real sequence, in order."""
    topk_ids: torch.Tensor | None = None
    """``[S, K]`` teacher top-K (module docstring); None when no example stores one."""
    topk_logprobs: torch.Tensor | None = None

    @property
    def num_loss_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def as_dict(self) -> dict:
        """The dict the trainer's forward step reads (``tokens``, ``labels``, ...)."""
        return {
            "tokens": self.tokens,
            "labels": self.labels,
            "behavior_logprobs": self.behavior_logprobs,
            "cu_seqlens": self.cu_seqlens,
            "num_real_tokens": self.num_real_tokens,
            "num_loss_tokens": self.num_loss_tokens,
            **({"topk_ids": self.topk_ids, "topk_logprobs": self.topk_logprobs} if self.topk_ids is not None else {}),
        }


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Assign items (by index, in order) to bins of ``capacity`` with first-fit.

    Returns:
        bins, each a list of item indices in insertion order; bins are ordered by creation.
    """
    if not lengths:
        return []
    if max(lengths) > capacity:
        raise ValueError(f"an example of {max(lengths)} tokens does not fit in a pack of {capacity}")
    shortest = min(lengths)
    bins: list[list[int]] = []
    free: list[int] = []
    open_bins: list[int] = []  # indices of bins that can still take the shortest example
    for i, n in enumerate(lengths):
        for slot, b in enumerate(open_bins):
            if free[b] >= n:
                break
        else:
            b, slot = len(bins), len(open_bins)
            bins.append([])
            free.append(capacity)
            open_bins.append(b)
        bins[b].append(i)
        free[b] -= n
        if free[b] < shortest:
            del open_bins[slot]
    return bins


def build_pack(examples: list[TokenizedExample], seq_length: int, pad_id: int) -> Pack:
    """Concatenate ``examples`` and pad to ``seq_length`` with a pad-only sequence."""
    used = sum(len(e) for e in examples)
    if used > seq_length:
        raise ValueError(f"examples of {used} tokens do not fit in a pack of {seq_length}")
    lengths = [len(e) for e in examples]
    tokens = [e.tokens for e in examples]
    labels = [e.labels for e in examples]
    blp = [e.behavior_logprobs for e in examples]
    pad = seq_length - used
    if pad:
        tokens.append(torch.full((pad,), pad_id, dtype=torch.long))
        labels.append(torch.full((pad,), IGNORE_INDEX, dtype=torch.long))
        blp.append(torch.zeros(pad, dtype=torch.float32))
        lengths.append(pad)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
    pack = Pack(torch.cat(tokens), torch.cat(labels), torch.cat(blp), cu, used, tuple(e.source for e in examples))
    if any(e.topk_ids is not None for e in examples):
        k = max(e.topk_ids.shape[1] for e in examples if e.topk_ids is not None)
        pack.topk_ids = torch.full((seq_length, k), -1, dtype=torch.long)
        pack.topk_logprobs = torch.zeros((seq_length, k), dtype=torch.float32)
        start = 0
        for e in examples:
            if e.topk_ids is not None:
                pack.topk_ids[start:start + len(e), : e.topk_ids.shape[1]] = e.topk_ids
                pack.topk_logprobs[start:start + len(e), : e.topk_ids.shape[1]] = e.topk_logprobs
            start += len(e)
    return pack


def pack_examples(examples: list[TokenizedExample], seq_length: int, pad_id: int) -> list[Pack]:
    """First-fit pack ``examples`` (in the given order) into packs of exactly ``seq_length`` tokens."""
    bins = first_fit([len(e) for e in examples], seq_length)
    return [build_pack([examples[i] for i in b], seq_length, pad_id) for b in bins]
