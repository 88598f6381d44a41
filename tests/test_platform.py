"""``pear_mega.platform.use_gpu()`` is the one place that asks whether CUDA is there: every other
CUDA decision in the library, its tools and benchmarks goes through it (so a dry run that hides
the GPU, or a test that pins the answer, changes every path at once)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cuda_is_asked_only_in_platform():
    asks = []
    for folder in ("pear_mega", "kernels", "tools", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == ROOT / "pear_mega" / "platform.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"cuda\.is_available\(", line):
                    asks.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not asks, "use pear_mega.platform.use_gpu() instead:\n" + "\n".join(asks)
