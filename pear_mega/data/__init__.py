"""Offline data with behavior log-probs (πβ): format, tokenization with alignment checks, packing.

    format.py    the row format (chat or prompt/response + token_ids / logprobs), DataError
    tokenize.py  chat template + stored behavior tokens -> packed-shifted example, alignment checks
    packing.py   first-fit packing into fixed-length packs with cu_seqlens
    loader.py    files -> packs -> PackSource (seeded order, DP sharding, resumable)
    prompts.py   few-shot reasoning-gym prompts and their answer format
    config.py    DataConfig, DataStats

Collection of πβ log-probs with vLLM lives in ``pear_mega.collect`` (``tools/collect_logprobs.py``).
"""

from pear_mega.data.config import DataConfig, DataStats
from pear_mega.data.format import (
    Conversation,
    DataError,
    LossSpan,
    parse_row,
    read_rows,
    write_jsonl,
    write_rows,
)
from pear_mega.data.loader import PackSource, build_packs, load_examples, load_tokenizer
from pear_mega.data.packing import Pack, build_pack, first_fit, pack_examples
from pear_mega.data.tokenize import (
    IGNORE_INDEX,
    TokenizedExample,
    render_conversation,
    tokenize_conversation,
)

__all__ = [
    "IGNORE_INDEX",
    "Conversation",
    "DataConfig",
    "DataError",
    "DataStats",
    "LossSpan",
    "Pack",
    "PackSource",
    "TokenizedExample",
    "build_pack",
    "build_packs",
    "first_fit",
    "load_examples",
    "load_tokenizer",
    "pack_examples",
    "parse_row",
    "read_rows",
    "render_conversation",
    "tokenize_conversation",
    "write_jsonl",
    "write_rows",
]
