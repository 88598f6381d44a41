"""Configuration of the offline data pipeline and the statistics it reports."""

from __future__ import annotations

from dataclasses import dataclass, field

from pear_mega.data.tokenize import TOKEN_CHECKS

TOKEN_CHECK_DEFAULT = "decode"
"""The one default of ``data.token_check`` (this config and the SFT trainer's ``data``): stored
assistant token ids must decode to the content at its place in the chat template, so the
non-canonical tokenizations a sampler produces ("Ans" + "wer") load; "retokenize" also demands the
tokenizer's canonical tokenization of the rendered text."""


@dataclass(frozen=True)
class DataConfig:
    """Where the data is and how it becomes packs (see ``pear_mega.data`` for the format)."""

    files: tuple[str, ...] = ()
    """Local .jsonl / .json / .parquet files with behavior log-probs."""
    tokenizer_path: str = ""
    """HF tokenizer directory (normally the model's): chat template, special tokens."""
    seq_length: int = 1024
    """Tokens per pack; every pack has exactly this many."""
    seed: int = 1234
    """Seed of the example order before packing and of the per-epoch pack order."""
    shuffle: bool = True
    """Shuffle examples before packing and packs every epoch (False: file order, for debugging)."""
    skip_bad_rows: bool = False
    """Skip bad rows (missing / non-finite / wrong-length log-probs, misalignment, too long),
    counting them by reason, instead of raising on the first one."""
    truncate: bool = False
    """Cut rows longer than seq_length (the loss mask ends there) instead of raising."""
    token_check: str = TOKEN_CHECK_DEFAULT
    """"decode" (``TOKEN_CHECK_DEFAULT``): stored assistant token ids must decode to the content at
    its place in the chat template (accepts the non-canonical tokenizations a sampler produces);
    "retokenize": they must also equal the re-tokenized rendered text."""
    pad_id: int | None = None
    """Token of the pad tail; None = the tokenizer's pad token (else its EOS)."""
    cache_dir: str | None = None
    """HF datasets cache directory (None = its default)."""

    def __post_init__(self):
        if isinstance(self.files, (str, bytes)) or not self.files:
            raise ValueError(f"data.files must be a non-empty list of data files, got {self.files!r}")
        object.__setattr__(self, "files", tuple(str(f) for f in self.files))
        if not self.tokenizer_path:
            raise ValueError("data.tokenizer_path is required (the model's HF tokenizer directory)")
        if self.seq_length < 8:
            raise ValueError(f"data.seq_length must be >= 8, got {self.seq_length}")
        if self.token_check not in TOKEN_CHECKS:
            raise ValueError(f"data.token_check must be one of {TOKEN_CHECKS}, got {self.token_check!r}")
        if self.pad_id is not None and self.pad_id < 0:
            raise ValueError(f"data.pad_id must be >= 0, got {self.pad_id}")


@dataclass
class DataStats:
    """What loading produced; ``skipped`` counts dropped rows by reason (never silent)."""

    rows: int = 0
    examples: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    first_error: dict[str, str] = field(default_factory=dict)
    """The first error message of each skip reason, to show what was wrong."""
    truncated: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    packs: int = 0
    pad_tokens: int = 0
    behaviors: dict[str, int] = field(default_factory=dict)
    """Loaded rows per distinct sampling record (``meta.behavior`` as sorted JSON, written by
    ``pear_mega.collect``): what the stored log-probs are the log-probs of."""

    def skip(self, reason: str, message: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self.first_error.setdefault(reason, message)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        fill = self.tokens / max(1, self.tokens + self.pad_tokens)
        text = (f"{self.rows} rows -> {self.examples} examples ({self.tokens} tokens, {self.loss_tokens} loss "
                f"tokens, {self.truncated} truncated) -> {self.packs} packs ({fill:.1%} filled)")
        if self.skipped:
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items()))
            text += f"; skipped {self.num_skipped} rows ({reasons})"
        return text
