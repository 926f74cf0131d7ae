#!/usr/bin/env bash
# A small-scale study of token weighting for context extension, on CPU (2 cores, under an hour):
#   1. pretrain a tiny Llama-style model at a short context (SHORT=256 tokens) on the built-in
#      corpus (data/demo, built by tools/build_demo_data.py when missing);
#   2. extend it to 4x that context (LONG=1024, RoPE base 10000 -> 40000) four times, on the same
#      tokens with the same seed, with uniform, dense (lambda 0.75), sparse (kappa 0.25) and LongCE
#      (gamma 5) weights; the short-context losses come from the model itself with a sliding
#      window of SHORT tokens (--tw-scorer self --tw-short-context 256 --tw-short-mode sliding);
#      context parallelism over NPROC processes;
#   3. evaluate the base model and the four extended ones on the held-out novel (perplexity by
#      position, vs context length, short-context perplexity, LongPPL with key tokens from the
#      model itself at W=SHORT) and on RULER-style tasks, then one comparison table and plots.
# Results: $OUT/summary.md (table), $OUT/compare/*.png, $OUT/eval/<run>/results.{json,md}, plots,
# $OUT/weights/dense.{html,png} (held-out tokens coloured by their dense weight, extended model).
# docs/study.md reports a run of this script.
#
# Environment overrides: OUT (runs/small_scale_study), DATA (data/demo), NPROC (2),
#   PRETRAIN_ITERS (300), EXTEND_ITERS (60), MASTER_PORT (29541), SKIP_EVAL_TASKS (0).
# Steps whose outputs exist are skipped (delete $OUT/<step> to redo one).
# TW_PRINT_ARGS=1 prints the five pretrain_tw.py launches (NUL-separated fields, one per line)
# instead of running anything.
set -euo pipefail
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_DIR"

OUT=${OUT:-runs/small_scale_study}
DATA=${DATA:-data/demo}
NPROC=${NPROC:-2}
PRETRAIN_ITERS=${PRETRAIN_ITERS:-300}
EXTEND_ITERS=${EXTEND_ITERS:-60}
PORT=${MASTER_PORT:-29541}
PY="$REPO_DIR/.venv/bin/python"
SHORT=256
LONG=1024
TOKENIZER="$DATA/tokenizer/tokenizer.model"
WARMUP=$(( PRETRAIN_ITERS >= 40 ? 10 : PRETRAIN_ITERS / 4 ))       # short test runs scale it down
EXTEND_WARMUP=$(( EXTEND_ITERS >= 20 ? 5 : EXTEND_ITERS / 4 ))
RUNS=(uniform dense sparse longce)

MODEL_ARGS=(
    --num-layers 4 --hidden-size 128 --ffn-hidden-size 352
    --num-attention-heads 4 --group-query-attention --num-query-groups 2
    --position-embedding-type rope
    --normalization RMSNorm --swiglu --disable-bias-linear
    --untie-embeddings-and-output-weights
    --attention-dropout 0 --hidden-dropout 0
)
DATA_ARGS=(
    --data-path "$DATA/train_text_document" --split 100,0,0 --tw-long-document-sampling
    --data-cache-path "$OUT/data_cache"
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER"
)
COMMON_ARGS=(
    --seed 1234 --weight-decay 0.01 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
    --log-interval 5 --eval-iters 0 --eval-interval 100000 --ckpt-format torch_dist
)
# Phase 1: 300 x 32 sequences x 256 tokens = 2.5 M tokens, data parallel over NPROC processes.
PRETRAIN_ARGS=(
    --seq-length $SHORT --max-position-embeddings $SHORT --rotary-base 10000
    --micro-batch-size 8 --global-batch-size 32 --train-iters "$PRETRAIN_ITERS"
    --lr 2e-3 --min-lr 2e-4 --lr-decay-style cosine --lr-warmup-iters "$WARMUP"
    --save "$OUT/base" --save-interval "$PRETRAIN_ITERS"
)
# Phase 2: 60 x 8 sequences x 1024 tokens = 0.49 M tokens per run; constant LR after warm-up (the
# paper's schedule); the RoPE base grows with the context, as in the paper's recipe.
extend_args() {  # $1 = run name
    local tw
    case "$1" in
        uniform) tw=(--tw-preset uniform) ;;
        dense)   tw=(--tw-preset dense --tw-interpolation 0.75) ;;
        sparse)  tw=(--tw-preset sparse --tw-sparsity 0.25) ;;
        longce)  tw=(--tw-preset longce --tw-truncation 5) ;;
    esac
    if [[ "$1" != uniform ]]; then
        tw+=(--tw-scorer self --tw-short-context $SHORT --tw-short-mode sliding)
    fi
    EXTEND=(
        --seq-length $LONG --max-position-embeddings $LONG --rotary-base 40000
        --context-parallel-size "$NPROC"
        --micro-batch-size 4 --global-batch-size 8 --train-iters "$EXTEND_ITERS"
        --lr 1e-3 --min-lr 1e-3 --lr-decay-style constant --lr-warmup-iters "$EXTEND_WARMUP"
        --pretrained-checkpoint "$OUT/base"
        --save "$OUT/$1" --save-interval "$EXTEND_ITERS"
        "${tw[@]}"
    )
}
launch() {  # $1 = master port, rest = pretrain_tw.py arguments
    local port=$1
    shift
    LAUNCH=("$PY" -m torch.distributed.run --nproc-per-node "$NPROC" --master-addr 127.0.0.1
            --master-port "$port" "$REPO_DIR/pretrain_tw.py"
            "${MODEL_ARGS[@]}" "${DATA_ARGS[@]}" "${COMMON_ARGS[@]}" "$@")
}

if [[ "${TW_PRINT_ARGS:-0}" == 1 ]]; then
    launch "$PORT" "${PRETRAIN_ARGS[@]}"
    printf '%s\0' "${LAUNCH[@]}"
    printf '\n'
    for run in "${RUNS[@]}"; do
        extend_args "$run"
        launch "$PORT" "${EXTEND[@]}"
        printf '%s\0' "${LAUNCH[@]}"
        printf '\n'
    done
    exit 0
fi

export OMP_NUM_THREADS=1
mkdir -p "$OUT"
START=$(date +%s)
stamp() { echo "[$(( $(date +%s) - START )) s] $*"; }

train() {  # $1 = run folder, rest = pretrain_tw.py arguments
    local dir=$1
    shift
    if [[ -f "$OUT/$dir/latest_checkpointed_iteration.txt" ]]; then
        stamp "$dir: checkpoint exists, skipped"
        return
    fi
    launch "$PORT" "$@"
    PORT=$((PORT + 1))
    "${LAUNCH[@]}" > "$OUT/$dir.train.log" 2>&1 || {
        tail -40 "$OUT/$dir.train.log"
        echo "training $dir failed; full log: $OUT/$dir.train.log" >&2
        exit 1
    }
    grep -E "iteration +[0-9]+/" "$OUT/$dir.train.log" | tail -1 | cut -c1-220
}

EVAL_ARGS=(
    --tokenizer "$TOKENIZER" --add-bos --heldout "$DATA/heldout_text_document"
    --ppl-length $LONG --ppl-sequences 16 --ppl-context-lengths 128,256,512,1024
    --short-ppl-length $SHORT --longppl-window $SHORT --longppl-sequences 4
    --mark-context $SHORT --seed 42
)
if [[ "${SKIP_EVAL_TASKS:-0}" != 1 ]]; then
    EVAL_ARGS+=(--tasks niah_single_1,niah_multikey_2,vt,fwe --lengths $LONG --samples 10
                --max-new-tokens 24 --needle-task niah_single_1 --needle-lengths 256,512,1024
                --needle-depths 0,25,50,75,100 --needle-samples 3)
fi
evaluate() {  # $1 = run folder
    if [[ -f "$OUT/eval/$1/results.json" ]]; then
        stamp "eval $1: results exist, skipped"
        return
    fi
    "$PY" tools/evaluate.py --model "$OUT/$1" --model-type megatron --name "$1" \
        --out "$OUT/eval/$1" "${EVAL_ARGS[@]}" > "$OUT/eval.$1.log" 2>&1 || {
        tail -20 "$OUT/eval.$1.log"
        echo "evaluation of $1 failed; full log: $OUT/eval.$1.log" >&2
        exit 1
    }
}

stamp "== 1/4 demo data -> $DATA"
if [[ ! -f "$DATA/summary.json" ]]; then
    "$PY" tools/build_demo_data.py --out "$DATA"
fi

stamp "== 2/4 pretraining at $SHORT tokens ($PRETRAIN_ITERS iterations, $NPROC processes)"
train base "${PRETRAIN_ARGS[@]}"

stamp "== 3/4 context extension to $LONG tokens ($EXTEND_ITERS iterations each, CP $NPROC)"
for run in "${RUNS[@]}"; do
    stamp "   $run"
    extend_args "$run"
    train "$run" "${EXTEND[@]}"
done

stamp "== 4/4 evaluation (held-out novel, RULER-style tasks)"
for run in base "${RUNS[@]}"; do
    stamp "   $run"
    evaluate "$run"
done
if [[ ! -f "$OUT/weights/dense.html" ]]; then  # what the dense preset does to held-out text
    "$PY" tools/visualize_weights.py --model "$OUT/dense" --model-type megatron \
        --tokenizer "$TOKENIZER" --add-bos --text-file "$DATA/heldout.jsonl" --text-offset 20000 \
        --max-tokens $LONG --short-context $SHORT --preset dense --png-tokens 200 \
        --out "$OUT/weights/dense" > "$OUT/weights.log" 2>&1 || {
        tail -20 "$OUT/weights.log"
        exit 1
    }
fi
CMP_RUNS=()
LOGS=()
for run in base "${RUNS[@]}"; do
    CMP_RUNS+=("$run=$OUT/eval/$run/results.json")
    LOGS+=("$run=$OUT/$run.train.log")
done
"$PY" tools/evaluate.py compare --runs "${CMP_RUNS[@]}" --train-logs "${LOGS[@]}" \
    --mark-context $SHORT --out "$OUT/compare" > "$OUT/summary.md"
stamp "done in $(( $(date +%s) - START )) s: $OUT/summary.md, $OUT/compare/, $OUT/eval/<run>/"
cat "$OUT/summary.md"
