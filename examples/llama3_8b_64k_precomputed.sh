#!/bin/bash
# Llama-3-8B continued pretraining 8k -> 64k with dense token weighting (lambda = 0.75), the
# short-context losses precomputed once by a frozen Llama-3.2-1B (same tokenizer): scoring
# costs nothing during training ("a much smaller scorer loses little", NAACL 2025 paper).
#
# Hardware: one node with 8x H100 80GB (SXM, NVLink) or larger (H200); bf16.
# Layout:   TP4 x CP2 (x DP1), sequence parallelism, distributed optimizer, and full
#   recomputation of half of the layers. Per GPU: 24 GB of weights, fp32 gradients and
#   sharded optimizer state (as at 32k); 32k tokens of activations would take ~43 GB without
#   recomputation, ~22 GB with 16 of 32 layers recomputed; vocab-parallel logits ~10 GB.
#   About 60 GB of 80 GB. Recomputing 16 layers costs ~1/6 more compute; out of memory ->
#   --recompute-num-layers 32 (every layer, ~1/3 more than none).
#
# Inputs (environment variables): as examples/llama3_8b_32k_dense.sh (defaults in
#   examples/llama3_8b/common.sh), GLOBAL_BATCH_SIZE [8], RUN_DIR [/runs/llama3-8b-64k-precomputed],
#   and SHORT_LOSS_PREFIX: the frozen scorer's per-token losses, written by tools/score_data.py
#   next to the tokens [${DATA_PREFIX}_short_loss].
#
# Before the first run (once):
#   python tools/preprocess_data.py --input pg19/ --output-prefix "$DATA_ROOT/pg19_llama3" \
#       --tokenizer-type HuggingFaceTokenizer --tokenizer-model /models/Meta-Llama-3-8B --workers 32
#   python tools/convert_checkpoint.py hf-to-megatron --hf-dir /models/Meta-Llama-3-8B \
#       --out "$CKPT_DIR" --rotary-base 15300000 --target-tensor-parallel-size 4 --dtype bfloat16
#   # score every token once with the frozen 1B model (one sliding-window pass, W = 8,192):
#   torchrun --nproc-per-node 8 tools/score_data.py <this script's pretrain_tw.py flags, e.g.
#       from TW_PRINT_ARGS=1> --tw-scorer-load /models/Llama-3.2-1B \
#       --tw-short-context 8192 --tw-short-mode sliding --tw-short-loss-path "${DATA_PREFIX}_short_loss"
#
# Usage:
#   bash examples/llama3_8b_64k_precomputed.sh [extra pretrain_tw.py flags; later flags win]
#   TW_PRINT_ARGS=1 bash examples/llama3_8b_64k_precomputed.sh
#       prints the command instead of running it: one line, each argument NUL-terminated
#
# Training budget: global batch 8 x 65,536 tokens x 240 steps = 126 M tokens, the tokens per
# step of the 32k reference run (16 x 32,768). RoPE base: 15.3 M, as at 32k; override with
# ROTARY_BASE (and convert the checkpoint with the same --rotary-base).

set -euo pipefail
RUN_NAME=llama3-8b-64k-precomputed
SEQ_LENGTH=65536
GLOBAL_BATCH_SIZE_DEFAULT=8
EXTRA_PARALLEL_ARGS=(
    --recompute-granularity full
    --recompute-method block
    --recompute-num-layers 16
)
source "$(dirname "${BASH_SOURCE[0]}")/llama3_8b/common.sh"
SHORT_LOSS_PREFIX=${SHORT_LOSS_PREFIX:-${DATA_PREFIX}_short_loss}

# Dense weighting: w = 0.75 + 0.25 * N |d| / sum |d|, d = long loss - short loss, the short
# loss read from the sidecar dataset (aligned token by token with DATA_PREFIX).
TW_ARGS=(
    --tw-preset dense
    --tw-interpolation 0.75
    --tw-scorer precomputed
    --tw-short-loss-path "$SHORT_LOSS_PREFIX"
)
tw_launch "$@"
