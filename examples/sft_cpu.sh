#!/usr/bin/env bash
# PEAR-SFT on a CPU machine (2+ cores): the tiny debug model, then TP=2 over gloo.
# Needs outputs/models/tiny-llama and outputs/data/behavior.jsonl (`make quickstart` writes both).
#   bash examples/sft_cpu.sh
set -euo pipefail
PY="${PY:-.venv/bin/python}"
TORCHRUN="${TORCHRUN:-.venv/bin/torchrun}"
OMP_NUM_THREADS=2 "$PY" -m pear_mega.train_sft --recipe debug_sft "$@"
OMP_NUM_THREADS=1 "$TORCHRUN" --standalone --nproc-per-node 2 -m pear_mega.train_sft --recipe debug_sft \
  parallel.tensor_parallel=2 checkpoint.dir=outputs/ckpt/debug_sft_tp2 logging.tensorboard_dir=outputs/tb/debug_sft_tp2 "$@"
