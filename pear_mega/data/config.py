"""Configuration of the offline data pipeline and the statistics it reports."""

from __future__ import annotations

from dataclasses import dataclass, field

from pear_mega.data.tokenize import TOKEN_CHECKS

TOKEN_CHECK_DEFAULT = "decode"
"""The one default of ``data.token_check``: stored assistant token ids must decode to the content
at its place in the chat template, so the non-canonical tokenizations a sampler produces ("Ans" +
"wer") load; "retokenize" also demands the tokenizer's canonical tokenization of the rendered text."""


@dataclass(frozen=True)
class DataConfig:
    """Where the data is and how it becomes packs (see ``pear_mega.data`` for the format).

    The one data config: the loader takes it as is and a trainer nests it as its ``data`` section
    (``SFTConfig.data``, overridden as ``data.KEY=value``). Construction checks the values given;
    that there is something to load (files, a tokenizer) is checked when loading
    (``check_source``), because a trainer's recipe fills the files in later and its tokenizer is
    the model's unless ``tokenizer_path`` names another.
    """

    train_files: tuple[str, ...] = ()
    """Local .jsonl / .json / .parquet files in the ``pear_mega.data`` format (messages or
    prompt/response + the behavior policy's token ids and log-probs)."""
    tokenizer_path: str = ""
    """HF tokenizer directory (chat template, special tokens); "" in a trainer = the model's
    (``model.hf_path``)."""
    seq_length: int = 1024
    """Tokens per pack; every pack (one microbatch) has exactly this many."""
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
    """How stored behavior tokens are checked against the text. "decode" (``TOKEN_CHECK_DEFAULT``):
    they must decode exactly to the assistant content at its place in the chat template (accepts the
    non-canonical tokenizations a sampler produces, e.g. "Ans" + "wer"). "retokenize": they must also
    equal the tokenizer's canonical tokenization. The trained tokens are the stored ones either way."""
    pad_id: int | None = None
    """Token of the pad tail; None = the tokenizer's pad token (else its EOS)."""
    cache_dir: str | None = None
    """HF datasets cache directory (None = its default)."""

    def __post_init__(self):
        if isinstance(self.train_files, (str, bytes)):
            raise ValueError(f"data.train_files must be a list of data files, got {self.train_files!r}")
        object.__setattr__(self, "train_files", tuple(str(f) for f in self.train_files))
        if self.seq_length < 8:
            raise ValueError(f"data.seq_length must be >= 8, got {self.seq_length}")
        if self.token_check not in TOKEN_CHECKS:
            raise ValueError(f"data.token_check must be one of {TOKEN_CHECKS}, got {self.token_check!r}")
        if self.pad_id is not None and self.pad_id < 0:
            raise ValueError(f"data.pad_id must be >= 0, got {self.pad_id}")

    def check_source(self, need_tokenizer: bool = True) -> None:
        """Raise ValueError naming the key when there is nothing to load: no ``train_files``, or no
        ``tokenizer_path`` when the tokenizer is to be loaded from it."""
        if not self.train_files:
            raise ValueError("data.train_files is required (jsonl/parquet files with behavior log-probs)")
        if need_tokenizer and not self.tokenizer_path:
            raise ValueError("data.tokenizer_path is required (the model's HF tokenizer directory)")


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
