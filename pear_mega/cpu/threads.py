"""torch's CPU thread count: scoped for a block, and kept through a vLLM engine's start."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch threads (None: unchanged), then restore the count."""
    import torch

    before = torch.get_num_threads()
    if threads is None or threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def keep_torch_threads(threads: int | None = None) -> Iterator[None]:
    """Start a vLLM engine in the block without losing this process's torch threads.

    vLLM's CPU worker lowers torch to 1 thread and replaces ``torch.set_num_threads`` with a no-op
    for the whole process; an in-process engine shares the process with the trainer (and tests
    with each other), so on exit, errors included, the function is put back and the count set to
    ``threads`` (None: the count when the block was entered).
    """
    import torch

    before, set_num_threads = torch.get_num_threads(), torch.set_num_threads
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads or before)
