#!/usr/bin/env bash
# The GPU figures of issue 7 in one run: card, train-step tok/s and MFU (bf16 compute), compiled
# memory, the AVA-p / BT step ratio, and whether the cuDNN flash-attention path is taken.
# Meant to fit a short GPU loan (aim: under 8 minutes) and to be run twice.
#   bash bench/gpu.sh            # from the repository root, after the README's install
# Written on 2026-12-02 on a machine without a GPU: not yet run on one. Each step is an existing
# script that runs on CPU too (bench/model.py, bench/reward_step.py, bench/attention_path.py), and
# bench/cudnn_attention_check.py checks the cuDNN attention path against XLA's first (GPU only).
set -euo pipefail
export TF_CPP_MIN_LOG_LEVEL=2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import jax; print('jax', jax.__version__, jax.devices())"
# If cuDNN's attention fails its check (or does not compile), the figures below are taken with XLA's.
ATTN=auto
python bench/cudnn_attention_check.py --seq 1024 \
  || { echo "cuDNN attention check FAILED: the runs below use model.attention=xla"; ATTN=xla; }
python bench/attention_path.py --arch gpt2 --seq 1024 --dtype bfloat16 --attention "$ATTN"
python bench/attention_path.py --arch llama --seq 1024 --dtype bfloat16 --attention "$ATTN"
python bench/model.py --models gpt2-small,smollm2-shape --no-torch --dtype bfloat16 --batch 8 --seq 1024 --reps 3 \
  --attention "$ATTN"
python bench/reward_step.py --models gpt2-small --dtype bfloat16 --pairs 8 --seq 512 --reps 3 --attention "$ATTN"
