"""glibc heap settings for CPU runs: keep freed memory for reuse, or give it back to the OS.

Both are no-ops where the C library is not glibc (the calls are looked up at run time).
"""

from __future__ import annotations

from collections.abc import Callable


def keep_freed_memory(max_block_bytes: int = 1 << 30) -> bool:
    """glibc: serve blocks up to ``max_block_bytes`` from the heap and never trim the heap, so
    that memory freed by this process is reused rather than returned to the OS and page-faulted
    in again. Process-wide and one-way (glibc cannot go back to its dynamic thresholds): the
    process keeps its peak heap. Returns False where it does not apply (no glibc).

    Why: every refit, vLLM allocates fresh parameters for
    each layer and oneDNN packs each weight into a fresh buffer, freeing the old ones. glibc maps
    blocks above its mmap threshold (dynamic, at most 32 MiB) straight from the OS and unmaps them
    on free, so the four embedding-sized blocks of a refit (embedding and lm_head, loaded and
    packed) are page-faulted from zero on every refit (the refit times with and without it are
    in docs/benchmarks.md, "Weight refit"). vLLM preloads tcmalloc into its own CPU worker
    processes for the same reason; an in-process engine shares the trainer's process, which
    nothing preloads, and whose own allocations this changes too.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, max_block_bytes)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def heap_trimmer() -> Callable[[], object]:
    """A function that gives freed heap memory back to the OS (glibc ``malloc_trim``; a no-op
    elsewhere).

    A checkpoint shard's tensors (a few MB each) and the transient full HF tensors they are cut
    from live on the malloc heap; freed holes stay resident and tensors of other sizes do not fill
    them exactly, so without trimming the resident set grows by a good fraction of a shard;
    trimmed after every tensor it stays close to the live shard (docs/benchmarks.md, "Numbers
    cited by the code").
    """
    import ctypes
    import ctypes.util

    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0)
