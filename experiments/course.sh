#!/usr/bin/env bash
# One run of the course (docs/course.md): train on the course's SciFact train queries, then score on its
# test queries. The extra arguments go to train.py and override the base below.
#   bash experiments/course.sh NAME SEED [train.py flags]   # -> runs/course/NAME_sSEED/{model,test}
# The base: all-MiniLM-L6-v2, the train qrels (in-batch negatives), batch 32, one epoch (26 steps),
# documents cut at 128 tokens, temperature 0.05, lr 1e-4; nothing else of train.py's defaults changes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
COURSE=${COURSE:-runs/course}
NAME=$1 SEED=$2
shift 2
[ -d "$COURSE/scifact" ] || $PYTHON experiments/course_data.py --out "$COURSE/scifact"
RUN="$COURSE/${NAME}_s$SEED"
DATA=(--dataset "$COURSE/scifact" --split train)
[[ " $* " == *" --train_data "* ]] && DATA=()  # a mined file instead of the train qrels
$PYTHON train.py "${DATA[@]}" --passage_max_len 128 --epochs 1 --seed "$SEED" --log_every 5 --out_dir "$RUN" \
    --overwrite "$@"
$PYTHON evaluate.py --model "$RUN/model" --dataset "$COURSE/scifact" --split test --out "$RUN/test"
