#!/bin/bash
# Llama-3-8B continued pretraining 8k -> 32k with sparse token weighting (kappa = 0.25): only the
# quarter of each sequence's tokens with the largest |long loss - short loss| is trained on,
# each with weight 1/kappa = 4 (NAACL 2025 paper; it specialises on long-range retrieval).
#
# Hardware and layout: those of examples/llama3_8b_32k_dense.sh (8x H100 80GB, TP4 x CP2, bf16;
#   about 55 GB per GPU): only the weighting differs.
#
# Inputs (environment variables): as examples/llama3_8b_32k_dense.sh (defaults in
#   examples/llama3_8b/common.sh); RUN_DIR [/runs/llama3-8b-32k-sparse].
#
# Before the first run (once):
#   python tools/preprocess_data.py --input pg19/ --output-prefix "$DATA_ROOT/pg19_llama3" \
#       --tokenizer-type HuggingFaceTokenizer --tokenizer-model /models/Meta-Llama-3-8B --workers 32
#   python tools/convert_checkpoint.py hf-to-megatron --hf-dir /models/Meta-Llama-3-8B \
#       --out "$CKPT_DIR" --rotary-base 15300000 --target-tensor-parallel-size 4 --dtype bfloat16
#
# Usage:
#   bash examples/llama3_8b_32k_sparse.sh [extra pretrain_tw.py flags; later flags win]
#   TW_PRINT_ARGS=1 bash examples/llama3_8b_32k_sparse.sh
#       prints the command instead of running it: one line, each argument NUL-terminated
#
# Training budget: global batch 16 x 32,768 tokens x 240 steps = 126 M tokens. The paper's
# "about 1 B tokens on 8 GPUs" corresponds to 16 sequences per GPU, i.e. GLOBAL_BATCH_SIZE=128.

set -euo pipefail
RUN_NAME=llama3-8b-32k-sparse
SEQ_LENGTH=32768

# Sparse weighting: w = 1/kappa on the top floor(kappa N) tokens by |d| (ties broken by a seeded
# hash), 0 elsewhere; the trainee scores every token in one sliding-window pass (W = 8,192).
TW_ARGS=(
    --tw-preset sparse
    --tw-sparsity 0.25
    --tw-scorer self
    --tw-short-context 8192
    --tw-short-mode sliding
)

source "$(dirname "${BASH_SOURCE[0]}")/llama3_8b/common.sh"
tw_launch "$@"
