#!/bin/bash
# Llama-3-8B continued pretraining 8k -> 32k with dense token weighting (lambda = 0.75):
# the reference set-up of "Token Weighting for Long-Range Language Modeling" (NAACL 2025).
#
# Hardware: one node with 8x H100 80GB (SXM, NVLink) or larger (H200); bf16.
# Layout:   TP4 x CP2 (x DP1) with sequence parallelism and the distributed optimizer.
#   Per GPU: 2.0 B parameters -> 4 GB bf16 weights + 8 GB fp32 gradients + 12 GB optimizer
#   state (fp32 master, Adam m and v, sharded over DP x CP = 2); 16k tokens of activations
#   (~22 GB, flash attention, no recompute) and the vocab-parallel logits of the output layer
#   (~5 GB). The self-scorer's extra no-grad forward frees its activations layer by layer.
#   About 55 GB of 80 GB. TP2 x CP4 also fits but holds 36 GB of weights and optimizer state.
#
# Inputs (environment variables): DATA_PREFIX, CKPT_DIR, TOKENIZER_MODEL, SAVE_DIR (a restart
#   resumes from here), TB_DIR, GLOBAL_BATCH_SIZE [16], TRAIN_ITERS [240], GPUS_PER_NODE [8],
#   NNODES [1], NODE_RANK [0], MASTER_ADDR [localhost], MASTER_PORT [6000]; see
#   examples/llama3_8b/common.sh for each one's default. RUN_DIR [/runs/llama3-8b-32k-dense].
#
# Before the first run (once):
#   python tools/preprocess_data.py --input pg19/ --output-prefix "$DATA_ROOT/pg19_llama3" \
#       --tokenizer-type HuggingFaceTokenizer --tokenizer-model /models/Meta-Llama-3-8B --workers 32
#   python tools/convert_checkpoint.py hf-to-megatron --hf-dir /models/Meta-Llama-3-8B \
#       --out "$CKPT_DIR" --rotary-base 15300000 --target-tensor-parallel-size 4 --dtype bfloat16
#
# Usage:
#   bash examples/llama3_8b_32k_dense.sh [extra pretrain_tw.py flags; later flags win]
#   TW_PRINT_ARGS=1 bash examples/llama3_8b_32k_dense.sh
#       prints the command instead of running it: one line, each argument NUL-terminated
#
# Training budget: global batch 16 x 32,768 tokens x 240 steps = 126 M tokens. The paper's
# "about 1 B tokens on 8 GPUs" corresponds to 16 sequences per GPU, i.e. GLOBAL_BATCH_SIZE=128.

set -euo pipefail
RUN_NAME=llama3-8b-32k-dense
SEQ_LENGTH=32768

# Dense weighting: w = 0.75 + 0.25 * N |d| / sum |d|, d = long loss - short loss; the trainee
# itself scores every token in one sliding-window pass (each layer attends to the last 8,192 tokens).
TW_ARGS=(
    --tw-preset dense
    --tw-interpolation 0.75
    --tw-scorer self
    --tw-short-context 8192
    --tw-short-mode sliding
)

source "$(dirname "${BASH_SOURCE[0]}")/llama3_8b/common.sh"
tw_launch "$@"
