#!/usr/bin/env bash
# NFCorpus from the bundled all-MiniLM-L6-v2: zero-shot test, fine-tune on the train qrels, dev (its own dev
# split), test again.
#   OUT=runs/nfcorpus PYTHON=python bash experiments/nfcorpus.sh
# The recipe is train.py's defaults (8 epochs of NFCorpus's 2590 train queries at batch 32, in-batch negatives,
# one tower, lr 1e-4, temperature 0.05; chosen on NFCorpus dev: docs/log.md) but for the false-negative margin,
# off as when the recipe was measured (train.py's default, auto, is for large batches: its docstring). A lever
# goes in EXTRA, named by TAG: EXTRA="--epochs 4" TAG=e4, EXTRA="--false_negative_margin auto" TAG=fnm (the last
# flag given wins). SEED=1 ...: another seed. QUERY_PREFIX="..." TAG=...: an instruction before each query (saved
# with the model; an instruction with spaces cannot go through EXTRA).
# SOUP="0 1 2": the model soup (merge.py) of this recipe's finished runs for those seeds, scored as a run.
# DTYPE: the precision of training and dev (fp32 by default: bf16 is the fast one only where the processor
# computes in bf16, e.g. a GPU). Test is always fp32.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-runs/nfcorpus}
SEED=${SEED:-0} DTYPE=${DTYPE:-fp32} EXTRA=${EXTRA:-} TAG=${TAG:-} SOUP=${SOUP:-} QUERY_PREFIX=${QUERY_PREFIX:-}
if [ -n "$QUERY_PREFIX" ] && [ -z "$TAG" ]; then  # the folder's name must tell the runs apart
    echo "error: QUERY_PREFIX needs a TAG, the run folder's name for it" >&2
    exit 1
fi
RECIPE="$OUT/recipe${TAG:+_$TAG}"
RUN="${RECIPE}_s${SEED}"
[ -z "$SOUP" ] || RUN="${RECIPE}_soup${SOUP// /}"
mkdir -p "$RUN"

# 1. zero-shot (reused when already there)
[ -f "$OUT/zeroshot/metrics.json" ] || $PYTHON evaluate.py --dataset beir/nfcorpus/test --dtype fp32 --out "$OUT/zeroshot"

# 2. fine-tune: one example a train query, a positive drawn from its qrels each epoch; a query's other positives in
#    the batch are masked, not negatives (NFCorpus queries share many relevant documents); or, with SOUP, average
#    the weights of this recipe's finished runs for those seeds instead
if [ -n "$SOUP" ]; then
    MODELS=()
    for s in $SOUP; do MODELS+=("${RECIPE}_s${s}/ft/model"); done
    $PYTHON merge.py --models "${MODELS[@]}" --out "$RUN/ft/model"
else
    $PYTHON train.py --false_negative_margin off --seed "$SEED" --dtype "$DTYPE" --out_dir "$RUN/ft" \
        ${QUERY_PREFIX:+--query_prefix "$QUERY_PREFIX"} --log_every 10 --eval_dataset none $EXTRA  # dev: below, once
fi

# 3. dev (for choosing settings), then test
$PYTHON evaluate.py --model "$RUN/ft/model" --dataset beir/nfcorpus/dev --dtype "$DTYPE" --out "$RUN/dev"
$PYTHON evaluate.py --model "$RUN/ft/model" --dataset beir/nfcorpus/test --dtype fp32 --out "$RUN/test"
