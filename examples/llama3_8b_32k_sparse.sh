#!/bin/bash
# Llama-3-8B continued pretraining 8k -> 32k with sparse token weighting (kappa = 0.25): only the
# quarter of each sequence's tokens with the largest |long loss - short loss| is trained on,
# each with weight 1/kappa = 4 (NAACL 2025 paper; it specialises on long-range retrieval).
#
# Hardware: one node with 8x H100 80GB (SXM, NVLink) or larger (H200); bf16.
# Layout:   TP4 x CP2 (x DP1) with sequence parallelism and the distributed optimizer.
#   Per GPU: 2.0 B parameters -> 4 GB bf16 weights + 8 GB fp32 gradients + 12 GB optimizer
#   state (fp32 master, Adam m and v, sharded over DP x CP = 2); 16k tokens of activations
#   (~22 GB, flash attention, no recompute) and the vocab-parallel logits of the output layer
#   (~5 GB). The self-scorer's extra no-grad forward frees its activations layer by layer.
#   About 55 GB of 80 GB (see examples/llama3_8b_32k_dense.sh: the same model and layout).
#
# Inputs (environment variables; defaults in brackets):
#   DATA_PREFIX      tokenized PG19 (one document per book), no .bin/.idx suffix
#                    [$DATA_ROOT/pg19_llama3_text_document, DATA_ROOT=/data]
#   CKPT_DIR         the HF model converted to a Megatron torch_dist checkpoint [/checkpoints/llama3-8b-megatron]
#   TOKENIZER_MODEL  a Hugging Face tokenizer folder [$CKPT_DIR: the converter copies the tokenizer there]
#   SAVE_DIR         checkpoints of this run; a restart resumes from here [/runs/llama3-8b-32k-sparse/checkpoints]
#   TB_DIR           TensorBoard logs [/runs/llama3-8b-32k-sparse/tensorboard]
#   GPUS_PER_NODE [8]  NNODES [1]  NODE_RANK [0]  MASTER_ADDR [localhost]  MASTER_PORT [6000]
#   GLOBAL_BATCH_SIZE [16]  TRAIN_ITERS [240]
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

REPO_DIR=${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
DATA_ROOT=${DATA_ROOT:-/data}
DATA_PREFIX=${DATA_PREFIX:-$DATA_ROOT/pg19_llama3_text_document}
CKPT_DIR=${CKPT_DIR:-/checkpoints/llama3-8b-megatron}
TOKENIZER_MODEL=${TOKENIZER_MODEL:-$CKPT_DIR}
RUN_DIR=${RUN_DIR:-/runs/llama3-8b-32k-sparse}
SAVE_DIR=${SAVE_DIR:-$RUN_DIR/checkpoints}
TB_DIR=${TB_DIR:-$RUN_DIR/tensorboard}

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-16}
TRAIN_ITERS=${TRAIN_ITERS:-240}

# TP and CP kernels overlap communication with compute only when CUDA keeps one work queue
# (megatron refuses TP/CP > 1 on Hopper without it).
export CUDA_DEVICE_MAX_CONNECTIONS=1

DISTRIBUTED_ARGS=(
    --nproc-per-node "$GPUS_PER_NODE"
    --nnodes "$NNODES"
    --node-rank "$NODE_RANK"
    --master-addr "$MASTER_ADDR"
    --master-port "$MASTER_PORT"
)

# Llama-3-8B; RoPE base 500,000 -> 15,300,000 for 32k (no rope scaling).
MODEL_ARGS=(
    --num-layers 32
    --hidden-size 4096
    --ffn-hidden-size 14336
    --num-attention-heads 32
    --group-query-attention
    --num-query-groups 8
    --kv-channels 128
    --seq-length 32768
    --max-position-embeddings 32768
    --position-embedding-type rope
    --rotary-base 15300000
    --normalization RMSNorm
    --norm-epsilon 1e-5
    --swiglu
    --disable-bias-linear
    --untie-embeddings-and-output-weights
    --attention-softmax-in-fp32
    --make-vocab-size-divisible-by 128
    --attention-dropout 0.0
    --hidden-dropout 0.0
    --transformer-impl transformer_engine
    --bf16
)

TRAINING_ARGS=(
    --micro-batch-size 1
    --global-batch-size "$GLOBAL_BATCH_SIZE"
    --train-iters "$TRAIN_ITERS"
    --lr 2e-5
    --min-lr 2e-5
    --lr-decay-style constant
    --lr-warmup-iters 20
    --adam-beta1 0.9
    --adam-beta2 0.95
    --adam-eps 1e-8
    --weight-decay 0.01
    --clip-grad 1.0
    --seed 1234
)

PARALLEL_ARGS=(
    --tensor-model-parallel-size 4
    --context-parallel-size 2
    --cp-comm-type p2p
    --sequence-parallel
    --use-distributed-optimizer
    --overlap-grad-reduce
    --overlap-param-gather
)

# One book per sequence: non-overlapping BOS + 32,767-token windows, never packed.
DATA_ARGS=(
    --data-path "$DATA_PREFIX"
    --split "99,1,0"
    --tokenizer-type HuggingFaceTokenizer
    --tokenizer-model "$TOKENIZER_MODEL"
    --tw-long-document-sampling
)

# Sparse weighting: w = 1/kappa on the top floor(kappa N) tokens by |d| (ties broken by a seeded
# hash), 0 elsewhere; the trainee scores every token in one sliding-window pass (W = 8,192).
TW_ARGS=(
    --tw-preset sparse
    --tw-sparsity 0.25
    --tw-scorer self
    --tw-short-context 8192
    --tw-short-mode sliding
)

# --pretrained-checkpoint is read only while SAVE_DIR holds no checkpoint (then as a fine-tune:
# iteration 0, fresh optimizer); afterwards the run resumes from SAVE_DIR.
CHECKPOINT_ARGS=(
    --pretrained-checkpoint "$CKPT_DIR"
    --load "$SAVE_DIR"
    --save "$SAVE_DIR"
    --save-interval 60
    --ckpt-format torch_dist
)

LOGGING_ARGS=(
    --log-interval 1
    --log-throughput
    --tensorboard-dir "$TB_DIR"
    --log-timers-to-tensorboard
    --eval-interval 60
    --eval-iters 4
)

LAUNCH=(
    torchrun "${DISTRIBUTED_ARGS[@]}" "$REPO_DIR/pretrain_tw.py"
    "${MODEL_ARGS[@]}"
    "${TRAINING_ARGS[@]}"
    "${PARALLEL_ARGS[@]}"
    "${DATA_ARGS[@]}"
    "${TW_ARGS[@]}"
    "${CHECKPOINT_ARGS[@]}"
    "${LOGGING_ARGS[@]}"
    "$@"
)

if [[ "${TW_PRINT_ARGS:-0}" == 1 ]]; then
    printf '%s\0' "${LAUNCH[@]}"
    printf '\n'
    exit 0
fi
mkdir -p "$SAVE_DIR" "$TB_DIR"
exec "${LAUNCH[@]}"
