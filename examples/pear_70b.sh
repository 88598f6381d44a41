#!/usr/bin/env bash
# PEAR-SFT of a 70B Llama/Qwen-class model on H100 nodes.
#
# Hardware assumed: NNODES (default 4) nodes x 8 H100 80GB, NVLink inside a node, InfiniBand
# between nodes; transformer-engine and vllm installed (`pip install -e '.[gpu]'`).
# Layout: TP=8 inside a node (tensor-parallel traffic stays on NVLink), PP=4 across nodes,
# DP = world / 32 (1 on 4 nodes, 2 on 8). bf16 params, fp32 grads and Adam state, full
# activation recompute, 8192-token packs, 64 packs per step.
# Expected memory, from `python -m pear_mega.plan --recipe llama3_70b_pear_sft --gpus 32`:
# ~53 GiB per GPU on the first pipeline stage (weights 4.2, grads 8.5, Adam 25.4, activations
# 10.8, loss 0.2, overhead 4). Run the planner again after changing the layout.
#
# Launch on every node (NODE_RANK differs):
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 bash examples/pear_70b.sh
#   NNODES=4 NODE_RANK=1 MASTER_ADDR=node0 bash examples/pear_70b.sh   # ... and so on
# Extra arguments are recipe overrides, e.g. `train.steps=500 data.train_files=[\"/data/x.jsonl\"]`.
set -euo pipefail

NNODES="${NNODES:-4}"
NODE_RANK="${NODE_RANK:-0}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
MASTER_ADDR="${MASTER_ADDR:-localhost}"
MASTER_PORT="${MASTER_PORT:-29500}"
RECIPE="${RECIPE:-llama3_70b_pear_sft}"

export CUDA_DEVICE_MAX_CONNECTIONS=1   # megatron TP comm/compute overlap ordering
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1  # a dead rank fails the job instead of hanging it

python -m pear_mega.plan --recipe "$RECIPE" --gpus $((NNODES * GPUS_PER_NODE))

exec torchrun \
  --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  -m pear_mega.train_sft --recipe "$RECIPE" "$@"
