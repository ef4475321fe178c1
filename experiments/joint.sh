#!/usr/bin/env bash
# SciFact + NFCorpus trained together (several --train_data files: each batch from one of them, in proportion to
# their sizes), in-batch negatives only, then scored on both test sets. Compare with each trained alone:
# experiments/scifact.sh with GROUP=1 MASK=0, and experiments/nfcorpus.sh.
#   OUT=runs/joint SCIFACT=runs/scifact PYTHON=python bash experiments/joint.sh    (after experiments/scifact.sh)
# DTYPE: the precision of mining, training and dev (fp32 by default: bf16 is the fast one only where the
# processor computes in bf16, e.g. a GPU; the rows before 2026-12-02 ran bf16). Test is always fp32.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-runs/joint} SCIFACT=${SCIFACT:-runs/scifact}
EPOCHS=${EPOCHS:-2} LR=${LR:-3e-5} TEMP=${TEMP:-0.05} MIX=${MIX:-size} SEED=${SEED:-0} DTYPE=${DTYPE:-fp32}
RUN="$OUT/e${EPOCHS}_lr${LR}_t${TEMP}_${MIX}_s${SEED}"
mkdir -p "$RUN"

# NFCorpus's train qrels as a train file (one line a query, its relevant documents as positives)
[ -f "$OUT/nfcorpus_train.jsonl" ] || $PYTHON - "$OUT/nfcorpus_train.jsonl" <<'PY'
import sys
import cli
import data
cli.write_jsonl(sys.argv[1], data.examples_from_qrels(*data.load_dataset("beir/nfcorpus/train")))
PY

# SciFact: the 709 train queries of experiments/scifact.sh (its dev queries held out); group 1: negatives unused
$PYTHON train.py --train_data "$SCIFACT/mined_m0.95.jsonl" "$OUT/nfcorpus_train.jsonl" --mix "$MIX" --group_size 1 \
    --batch_size 32 --chunk_size 32 --epochs "$EPOCHS" --lr "$LR" --temp "$TEMP" --attention_dropout 0 \
    --false_negative_margin off --query_max_len 64 --dtype "$DTYPE" --seed "$SEED" --out_dir "$RUN/ft" \
    --log_every 10
$PYTHON evaluate.py --model "$RUN/ft/model" --dataset beir/scifact/test --dtype fp32 --out "$RUN/scifact_test"
$PYTHON evaluate.py --model "$RUN/ft/model" --dataset beir/nfcorpus/test --dtype fp32 --out "$RUN/nfcorpus_test"
