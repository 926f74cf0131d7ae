# Shared by the Llama-3-8B launch scripts in examples/ (sourced, not run): the model, the paper's
# training recipe, the TP4 x CP2 layout, the data, checkpoint and logging flags, and the launch.
#
# The sourcing script sets, before `source`:
#   RUN_NAME      the run's folder under /runs (default of RUN_DIR)
#   SEQ_LENGTH    tokens per sequence
#   TW_ARGS       (array) the token-weighting flags
# and may set:
#   GLOBAL_BATCH_SIZE_DEFAULT [16]   ROTARY_BASE_DEFAULT [15300000]
#   EXTRA_PARALLEL_ARGS    (array) e.g. activation recomputation
#   EXTRA_CHECKPOINT_ARGS  (array) e.g. --exit-duration-in-mins
#   DISTRIBUTED_ARGS       (array) torchrun's flags [one node: GPUS_PER_NODE, NNODES, NODE_RANK,
#                          MASTER_ADDR, MASTER_PORT]
#   LAUNCHER               (array) what runs torchrun, e.g. srun and its flags [nothing]
# then calls `tw_launch "$@"`: with TW_PRINT_ARGS=1 it prints the command (one line, each argument
# NUL-terminated) and runs nothing; otherwise it creates the output folders and execs it.
#
# Environment (defaults in brackets):
#   DATA_PREFIX      tokenized PG19 (one document per book), no .bin/.idx suffix
#                    [$DATA_ROOT/pg19_llama3_text_document, DATA_ROOT=/data]
#   CKPT_DIR         the HF model converted to a Megatron torch_dist checkpoint [/checkpoints/llama3-8b-megatron]
#   TOKENIZER_MODEL  a Hugging Face tokenizer folder [$CKPT_DIR: the converter copies the tokenizer there]
#   RUN_DIR [/runs/$RUN_NAME]   SAVE_DIR [$RUN_DIR/checkpoints]   TB_DIR [$RUN_DIR/tensorboard]
#   GLOBAL_BATCH_SIZE  TRAIN_ITERS [240]  ROTARY_BASE

: "${RUN_NAME:?set by the sourcing script}" "${SEQ_LENGTH:?set by the sourcing script}"
REPO_DIR=${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
DATA_ROOT=${DATA_ROOT:-/data}
DATA_PREFIX=${DATA_PREFIX:-$DATA_ROOT/pg19_llama3_text_document}
CKPT_DIR=${CKPT_DIR:-/checkpoints/llama3-8b-megatron}
TOKENIZER_MODEL=${TOKENIZER_MODEL:-$CKPT_DIR}
RUN_DIR=${RUN_DIR:-/runs/$RUN_NAME}
SAVE_DIR=${SAVE_DIR:-$RUN_DIR/checkpoints}
TB_DIR=${TB_DIR:-$RUN_DIR/tensorboard}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-${GLOBAL_BATCH_SIZE_DEFAULT:-16}}
TRAIN_ITERS=${TRAIN_ITERS:-240}
ROTARY_BASE=${ROTARY_BASE:-${ROTARY_BASE_DEFAULT:-15300000}}

# TP and CP kernels overlap communication with compute only when CUDA keeps one work queue
# (megatron refuses TP/CP > 1 on Hopper without it). Exported: srun passes it to every node.
export CUDA_DEVICE_MAX_CONNECTIONS=1

if [[ -z "${DISTRIBUTED_ARGS+set}" ]]; then
    DISTRIBUTED_ARGS=(
        --nproc-per-node "${GPUS_PER_NODE:-8}"
        --nnodes "${NNODES:-1}"
        --node-rank "${NODE_RANK:-0}"
        --master-addr "${MASTER_ADDR:-localhost}"
        --master-port "${MASTER_PORT:-6000}"
    )
fi

# Llama-3-8B; RoPE base 500,000 -> ROTARY_BASE (no rope scaling).
MODEL_ARGS=(
    --num-layers 32
    --hidden-size 4096
    --ffn-hidden-size 14336
    --num-attention-heads 32
    --group-query-attention
    --num-query-groups 8
    --kv-channels 128
    --seq-length "$SEQ_LENGTH"
    --max-position-embeddings "$SEQ_LENGTH"
    --position-embedding-type rope
    --rotary-base "$ROTARY_BASE"
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

# The paper's recipe: AdamW 2e-5, constant after 20 warm-up steps, 240 steps.
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
    ${EXTRA_PARALLEL_ARGS[@]+"${EXTRA_PARALLEL_ARGS[@]}"}
)

# One book per sequence: non-overlapping BOS + (SEQ_LENGTH - 1)-token windows, never packed.
DATA_ARGS=(
    --data-path "$DATA_PREFIX"
    --split "99,1,0"
    --tokenizer-type HuggingFaceTokenizer
    --tokenizer-model "$TOKENIZER_MODEL"
    --tw-long-document-sampling
)

# --pretrained-checkpoint is read only while SAVE_DIR holds no checkpoint (then as a fine-tune:
# iteration 0, fresh optimizer); afterwards the run resumes from SAVE_DIR.
CHECKPOINT_ARGS=(
    --pretrained-checkpoint "$CKPT_DIR"
    --load "$SAVE_DIR"
    --save "$SAVE_DIR"
    --save-interval 60
    --ckpt-format torch_dist
    ${EXTRA_CHECKPOINT_ARGS[@]+"${EXTRA_CHECKPOINT_ARGS[@]}"}
)

LOGGING_ARGS=(
    --log-interval 1
    --log-throughput
    --tensorboard-dir "$TB_DIR"
    --log-timers-to-tensorboard
    --eval-interval 60
    --eval-iters 4
)

tw_launch() {
    local launch=(
        ${LAUNCHER[@]+"${LAUNCHER[@]}"}
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
        printf '%s\0' "${launch[@]}"
        printf '\n'
        exit 0
    fi
    mkdir -p "$SAVE_DIR" "$TB_DIR"
    exec "${launch[@]}"
}
