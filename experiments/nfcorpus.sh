#!/usr/bin/env bash
# NFCorpus from the bundled all-MiniLM-L6-v2: zero-shot test, fine-tune on the train qrels (in-batch negatives;
# 2590 queries = 80 steps an epoch at batch 32; STEPS caps it), dev (its own dev split), test again.
#   OUT=runs/nfcorpus PYTHON=python bash experiments/nfcorpus.sh
# Settings are the SciFact recipe's (experiments/scifact.sh), but for EPOCHS (8 over 4 over 2 over 1, on NFCorpus
# dev: mean of seeds 0, 1, 2 0.3406 against 0.3337 against 0.3248), in-batch negatives only (mined ones tied on
# dev, docs/quality.md) and one tower (two not measured on NFCorpus); LR 1e-4 over 3e-5 on NFCorpus dev too
# (0.3232 against 0.3157). SEED=1 ...: another seed. FNM: train.py's --false_negative_margin, off as when the
# recipe was measured (train.py's default, auto, is 2 x TEMP).
# SOUP="0 1 2": the model soup (merge.py) of this recipe's finished runs for those seeds, scored as a run.
# DTYPE: the precision of mining, training and dev (fp32 by default: bf16 is the fast one only where the
# processor computes in bf16, e.g. a GPU; the rows before 2026-12-02 ran bf16). Test is always fp32.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-runs/nfcorpus}
EPOCHS=${EPOCHS:-8} STEPS=${STEPS:-0} MASK=${MASK:-1} LR=${LR:-1e-4} TEMP=${TEMP:-0.05} ADROP=${ADROP:-0}
SEED=${SEED:-0} DTYPE=${DTYPE:-fp32} FNM=${FNM:-off} SOUP=${SOUP:-}
RECIPE="$OUT/e${EPOCHS}_steps${STEPS}_mask${MASK}_lr${LR}_t${TEMP}_ad${ADROP}"
[ "$FNM" = off ] || RECIPE="${RECIPE}_fnm$FNM"
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
    $PYTHON train.py --dataset beir/nfcorpus/train --batch_size 32 --chunk_size 32 --epochs "$EPOCHS" \
        --max_steps "$STEPS" --lr "$LR" --temp "$TEMP" --mask_false_negatives "$MASK" --false_negative_margin "$FNM" \
        --attention_dropout "$ADROP" --seed "$SEED" --query_max_len 64 --dtype "$DTYPE" --out_dir "$RUN/ft" \
        --log_every 10 --eval_dataset none  # dev is scored below, once
fi

# 3. dev (for choosing settings), then test
$PYTHON evaluate.py --model "$RUN/ft/model" --dataset beir/nfcorpus/dev --dtype "$DTYPE" --out "$RUN/dev"
$PYTHON evaluate.py --model "$RUN/ft/model" --dataset beir/nfcorpus/test --dtype fp32 --out "$RUN/test"
