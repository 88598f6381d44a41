"""``pear_mega.cpu.threads`` and ``pear_mega.cpu.memory``: torch's thread count survives what vLLM's
CPU worker does to it, and the glibc heap settings apply (in a fresh interpreter: they are
process-wide and one-way)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pear_mega.cpu.threads import keep_torch_threads, torch_threads

REPO = Path(__file__).resolve().parents[2]


def _vllm_worker_start():
    """What vLLM's CPU worker does to the process when an engine starts."""
    torch.set_num_threads(1)
    torch.set_num_threads = lambda n: None


def test_keep_torch_threads_undoes_the_engine_start():
    before, set_num_threads = torch.get_num_threads(), torch.set_num_threads
    try:
        torch.set_num_threads(2)
        with keep_torch_threads():
            _vllm_worker_start()
        assert torch.set_num_threads is set_num_threads and torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), keep_torch_threads(3):
            _vllm_worker_start()
            raise RuntimeError("engine start failed")
        assert torch.set_num_threads is set_num_threads and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(before)


def test_torch_threads_scopes_the_count():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch_threads(2):
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 1
        with pytest.raises(RuntimeError), torch_threads(2):
            raise RuntimeError("failed")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


SCRIPT = textwrap.dedent(
    """
    import ctypes
    import sys
    from pear_mega.cpu.memory import heap_trimmer, keep_freed_memory

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.mallinfo2.restype = MallInfo2

    def mapped_from_the_os(nbytes):  # 1: a block of nbytes is mapped from the OS, 0: from the heap
        mapped = libc.mallinfo2().hblks
        block = libc.malloc(nbytes)
        try:
            return libc.mallinfo2().hblks - mapped
        finally:
            libc.free(ctypes.c_void_p(block))

    heap_trimmer()()
    if sys.argv[1] == "keep":
        assert keep_freed_memory(128 << 20) is True
    # twice: glibc's dynamic threshold would follow a freed block only up to 32 MiB
    print(mapped_from_the_os(64 << 20), mapped_from_the_os(64 << 20))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc")
def test_keep_freed_memory_serves_large_blocks_from_the_heap():
    """A 64 MiB block is mapped from the OS (and unmapped on free) by default, also the second
    time, and comes from the heap once ``keep_freed_memory`` raised the threshold above it."""
    counts = {}
    for mode in ("default", "keep"):
        proc = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=60,
                              cwd=str(REPO), check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        counts[mode] = tuple(int(v) for v in proc.stdout.split())
    assert counts == {"default": (1, 1), "keep": (0, 0)}, counts
