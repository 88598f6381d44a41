#!/usr/bin/env bash
# PEAR-SFT on one GPU: SmolLM2-135M-Instruct in bf16 with the TransformerEngine layer spec.
#   bash examples/sft_1gpu.sh [overrides...]
set -euo pipefail
python -m pear_mega.train_sft --recipe smollm2_pear_sft model.dtype=bfloat16 data.seq_length=2048 \
  train.global_batch_packs=8 train.steps=200 "$@"
