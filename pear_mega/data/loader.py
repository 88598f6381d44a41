"""Files → validated, tokenized examples → packs → a deterministic, sharded, resumable pack stream.

Order. Examples are shuffled once with ``seed`` and first-fit packed (``pear_mega.data.packing``).
The packs form one endless *global* stream: epoch ``e`` visits them in a permutation drawn from
``(seed, e)``, and global position ``g`` (counted over all epochs) is pack ``order_{g // N}[g % N]``
of the N packs. Data-parallel rank ``r`` of ``D`` takes positions ``r, r + D, r + 2D, ...``, so a
training step that takes ``m`` packs on each rank consumes exactly the global positions
``[k·m·D, (k+1)·m·D)`` whatever ``D`` is: the data of a step, and therefore the loss and the update,
do not depend on the data-parallel layout (no pack is dropped at an epoch end to keep ranks even).

Resume. ``state_dict()`` is ``{"consumed", ...}`` with ``consumed`` the number of global positions
handed out over all ranks; ``load_state_dict`` makes the next ``next_pack()`` return exactly the
pack that would have come next. It checks that the packs are the same (a fingerprint of their
contents) and allows a different ``dp_size`` when ``consumed`` divides evenly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Iterator

from pear_mega.data.config import DataConfig, DataStats
from pear_mega.data.format import DataError, parse_row, read_rows
from pear_mega.data.packing import Pack, pack_examples
from pear_mega.data.tokenize import TokenizedExample, tokenize_conversation

logger = logging.getLogger(__name__)


def load_tokenizer(path: str):
    """The HF tokenizer at ``path`` (local files only)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def load_examples(cfg: DataConfig, tokenizer=None) -> tuple[list[TokenizedExample], DataStats]:
    """Read, validate and tokenize every row of ``cfg.train_files``, in file order.

    Raises:
        ValueError naming the key when ``cfg`` has no files (or no tokenizer and none is passed);
        DataError on the first bad row, unless ``cfg.skip_bad_rows`` (then counted in the stats).
    """
    cfg.check_source(need_tokenizer=tokenizer is None)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer_path)
    stats = DataStats()
    examples: list[TokenizedExample] = []
    for path in cfg.train_files:
        for index, row in enumerate(read_rows(path, cfg.cache_dir)):
            stats.rows += 1
            try:
                conv = parse_row(row, path, index)
                example = tokenize_conversation(tokenizer, conv, max_length=cfg.seq_length, truncate=cfg.truncate,
                                                token_check=cfg.token_check)
            except DataError as exc:
                if not cfg.skip_bad_rows:
                    raise
                stats.skip(exc.reason, str(exc))
                continue
            if example.num_loss_tokens == 0:
                # Only truncation can get here (parse_row demands a loss span): the cut removed them all.
                stats.skip("truncated_no_loss_tokens", f"{path}: row {index}: no loss token left after truncation")
                continue
            stats.truncated += int(example.truncated)
            stats.tokens += len(example)
            stats.loss_tokens += example.num_loss_tokens
            behavior = (row.get("meta") or {}).get("behavior") if isinstance(row.get("meta"), dict) else None
            if isinstance(behavior, dict):
                key = json.dumps(behavior, sort_keys=True, default=str)
                stats.behaviors[key] = stats.behaviors.get(key, 0) + 1
            examples.append(example)
    stats.examples = len(examples)
    if stats.skipped:
        for reason, count in sorted(stats.skipped.items()):
            logger.warning("skipped %d rows (%s), first: %s", count, reason, stats.first_error[reason])
    return examples, stats


def build_packs(cfg: DataConfig, tokenizer=None) -> tuple[list[Pack], DataStats]:
    """Load, tokenize and pack ``cfg.train_files``; deterministic given ``cfg.seed``."""
    cfg.check_source(need_tokenizer=tokenizer is None)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer_path)
    examples, stats = load_examples(cfg, tokenizer)
    if not examples:
        raise ValueError(f"no usable example in {list(cfg.train_files)} ({stats.summary()})")
    if cfg.shuffle:
        random.Random(cfg.seed).shuffle(examples)
    pad_id = cfg.pad_id
    if pad_id is None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token: set data.pad_id")
    packs = pack_examples(examples, cfg.seq_length, pad_id)
    stats.packs = len(packs)
    stats.pad_tokens = sum(cfg.seq_length - p.num_real_tokens for p in packs)
    return packs, stats


def fingerprint(packs: list[Pack]) -> str:
    """A short hash of the packs' contents, to refuse resuming on different data."""
    h = hashlib.sha256()
    for p in packs:
        for t in (p.tokens, p.labels, p.behavior_logprobs, p.cu_seqlens):
            h.update(t.numpy().tobytes())
        for t in (p.topk_ids, p.topk_logprobs) if p.topk_ids is not None else ():  # distillation data
            h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


class PackSource:
    """An endless, deterministic stream of this data-parallel rank's packs (see module docstring).

    Build it from a ``DataConfig`` or from its fields as keywords::

        source = PackSource(train_files=["train.jsonl"], tokenizer_path=model_dir, seq_length=512,
                            dp_rank=ctx.dp_rank, dp_size=ctx.dp_size)
        batch = source.next_pack()   # {"tokens" [S], "labels" [S], "behavior_logprobs" [S], "cu_seqlens" [B+1], ...}
    """

    def __init__(self, config: DataConfig | None = None, *, dp_rank: int = 0, dp_size: int = 1, tokenizer=None,
                 **fields):
        if config is None:
            config = DataConfig(**fields)
        elif fields:
            raise ValueError(f"PackSource: pass either a DataConfig or its fields, not both ({sorted(fields)})")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"PackSource: need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}")
        self.config = config
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.packs, self.stats = build_packs(config, tokenizer)
        if len(self.packs) < dp_size:
            raise ValueError(f"{len(self.packs)} packs cannot feed {dp_size} data-parallel ranks: "
                             "add data or shorten data.seq_length")
        self.fingerprint = fingerprint(self.packs)
        self.position = 0  # packs this rank has handed out, over all epochs
        self._orders: dict[int, list[int]] = {}
        if dp_rank == 0:
            logger.info("data: %s", self.stats.summary())

    def __len__(self) -> int:
        """Packs per epoch on this rank (rounded down: epochs need not split evenly over ranks)."""
        return len(self.packs) // self.dp_size

    @property
    def epoch(self) -> int:
        """Epoch of the last pack handed out (0 before the first)."""
        if self.position == 0:
            return 0
        return ((self.position - 1) * self.dp_size + self.dp_rank) // len(self.packs)

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.packs)))
            if self.config.shuffle:
                random.Random(f"{self.config.seed}/{epoch}").shuffle(order)
            self._orders = {epoch: order}  # only the current epoch's order is needed
        return self._orders[epoch]

    def next_pack(self) -> dict:
        """This rank's next pack as a dict (``Pack.as_dict``), advancing the stream."""
        g = self.position * self.dp_size + self.dp_rank
        epoch, index = divmod(g, len(self.packs))
        pack = self.packs[self._epoch_order(epoch)[index]]
        self.position += 1
        return pack.as_dict()

    def __iter__(self) -> Iterator[dict]:
        while True:
            yield self.next_pack()

    def state_dict(self) -> dict:
        """Position of the stream (plain ints / strings: JSON-safe)."""
        return {
            "consumed": self.position * self.dp_size,
            "seed": self.config.seed,
            "num_packs": len(self.packs),
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state`` was taken (the next pack is the one that would have come next)."""
        for key in ("seed", "num_packs", "fingerprint"):
            mine = {"seed": self.config.seed, "num_packs": len(self.packs), "fingerprint": self.fingerprint}[key]
            if state.get(key) != mine:
                raise ValueError(f"PackSource.load_state_dict: {key} is {state.get(key)!r} in the checkpoint but "
                                 f"{mine!r} now: the data, tokenizer or packing settings changed")
        consumed = int(state["consumed"])
        if consumed % self.dp_size:
            raise ValueError(f"PackSource.load_state_dict: {consumed} packs consumed do not divide over "
                             f"{self.dp_size} data-parallel ranks")
        self.position = consumed // self.dp_size
