#!/usr/bin/env bash
# One run of the course (docs/course.md): train on the course's SciFact train queries, then score on its
# test queries. The extra arguments go to train.py and override the base below.
#   bash experiments/course.sh NAME SEED [train.py flags]   # -> runs/course/NAME_sSEED/{model,test}
#   DATASET=nfcorpus bash experiments/course.sh NAME SEED ...  # NFCorpus instead, its whole test corpus
# The base: all-MiniLM-L6-v2, the train qrels (in-batch negatives), batch 32, one epoch of SciFact (25
# steps; of NFCorpus, 25 steps too), documents cut at 128 tokens, temperature 0.05, lr 1e-4; nothing else
# of train.py's defaults changes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
COURSE=${COURSE:-runs/course}
NAME=$1 SEED=$2
shift 2
RUN="$COURSE/${NAME}_s$SEED"
if [ "${DATASET:-scifact}" = nfcorpus ]; then  # no dev scoring while training: the lessons score test
    TRAIN=(--dataset beir/nfcorpus/train --eval_dataset none --max_steps 25)
    TEST=(--dataset beir/nfcorpus/test)
else
    [ -d "$COURSE/scifact" ] || $PYTHON experiments/course_data.py --out "$COURSE/scifact"
    TRAIN=(--dataset "$COURSE/scifact" --split train)
    TEST=(--dataset "$COURSE/scifact" --split test)
fi
[[ " $* " == *" --train_data "* ]] && TRAIN=()  # a mined file instead of the train qrels
$PYTHON train.py "${TRAIN[@]}" --passage_max_len 128 --epochs 1 --seed "$SEED" --log_every 5 --out_dir "$RUN" \
    --overwrite "$@"
$PYTHON evaluate.py --model "$RUN/model" "${TEST[@]}" --out "$RUN/test"
