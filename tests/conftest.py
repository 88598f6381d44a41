"""Suite-wide setup.

Triton kernels run on CPU only under the interpreter, which must be switched on before any
``@triton.jit`` function is defined, i.e. before pear_mega.kernels is imported: hence here, at
conftest import. On a CUDA machine the compiled kernels are tested instead (unset
``TRITON_INTERPRET`` there, or leave it unset: it is only defaulted when no GPU is present).
"""

import os

import pytest

_HAS_GPU = os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")
if not _HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Transformers and datasets must never reach for the hub in tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# The longest serial chains of the suite (tiny studies: up to ~20 stage processes one after
# another) start first, one per pytest-xdist worker (``make test``), so that the workers finish
# together instead of one of them starting a chain last.
LONGEST_FIRST = ("tests/study/test_study_e2e.py", "tests/study/test_study_e2e_kd.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in LONGEST_FIRST)  # stable: order kept otherwise
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
