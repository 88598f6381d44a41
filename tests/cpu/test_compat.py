"""The CPU compatibility patches, checked in a fresh interpreter (they are process-global)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import torch
    from pear_mega.cpu.compat import apply_cpu_patches, patches_applied

    assert not torch.cuda.is_available()
    assert not patches_applied()
    assert apply_cpu_patches() is True
    assert apply_cpu_patches() is True  # idempotent

    # 1, 2
    assert torch.cuda.current_device() == "cpu"
    assert torch.cuda.synchronize() is None
    # 4: CUDA placements land on the CPU, other arguments pass through
    assert torch.empty(3, device="cuda").device.type == "cpu"
    assert torch.zeros(2, device=torch.device("cuda", 0)).device.type == "cpu"
    assert torch.ones(2).cuda().device.type == "cpu"
    moved = torch.ones(2).to("cuda", torch.float64)
    assert moved.device.type == "cpu" and moved.dtype == torch.float64
    assert torch.ones(2).to(device="cuda:0", dtype=torch.float16).dtype == torch.float16
    # 5: type strings
    assert torch.ones(2).type() == "torch.cuda.FloatTensor"
    assert torch.ones(2, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.ones(2).type(torch.float64).dtype == torch.float64

    # 3: megatron's RNG tracker runs on the CPU generator: reproducible forks that leave the
    # default stream where it was.
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    def draws():
        torch.manual_seed(0)
        model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0)
        torch.manual_seed(0)
        before = torch.rand(1)
        with get_cuda_rng_tracker().fork():
            forked = torch.rand(3)
        after = torch.rand(1)
        return before, forked, after

    b1, f1, a1 = draws()
    b2, f2, a2 = draws()
    assert torch.equal(f1, f2) and torch.equal(b1, b2) and torch.equal(a1, a2)
    torch.manual_seed(0)
    plain = torch.rand(2)
    assert torch.equal(plain[0:1], b1) and torch.equal(plain[1:2], a1), "fork moved the default stream"
    assert not torch.equal(f1[:1], plain[1:2])
    print("OK")
    """
)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_cpu_patches_in_a_fresh_process():
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=100, cwd=str(REPO), check=False
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-3000:]
