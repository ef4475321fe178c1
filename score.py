"""Stage: a teacher + train jsonl -> the same lines with the teacher's pos_scores and neg_scores, for
train.py --distill (kl or margin_mse).

    python score.py --teacher runs/ft/model --train_data runs/mined.jsonl --out runs/scored.jsonl   # a bi-encoder
    python score.py --teacher path/to/cross-encoder --train_data runs/mined.jsonl --out runs/scored_ce.jsonl

The teacher: a cross-encoder (any Hugging Face sequence-classification folder with one label: its logit of
(query, text)) or a bi-encoder (a checkpoint of ours, or any folder encode.py takes: the cosine of the query's and
the text's embeddings, with the teacher's own prefixes and pooling). Any scores already in the file are replaced.
"""
import numpy as np

import data
from model import load_teacher, setup

parser = data.parser(__doc__, batch_size=None, dtype=None, device="auto", out=...)
parser.add_argument("--teacher", required=True, help="a cross-encoder or bi-encoder folder")
parser.add_argument("--train_data", required=True, help="train jsonl (query, pos, neg), e.g. mine.py's output")

def main(args):
    device = setup(args.device)[0]
    data.output(args.out, folder=False)
    rows = data.read_train_jsonl(args.train_data)
    score = load_teacher(args.teacher, device, args.dtype or ("bf16" if device.type == "cuda" else "fp32"))
    pairs = [(ex["query"], text) for ex in rows for text in ex["pos"] + ex["neg"]]
    scores = iter(score([q for q, _ in pairs], [t for _, t in pairs], args.batch_size))
    for ex in rows:
        ex["pos_scores"], ex["neg_scores"] = [next(scores) for _ in ex["pos"]], [next(scores) for _ in ex["neg"]]
    data.write_jsonl(args.out, rows)
    ranked_wrong = sum(max(ex["neg_scores"], default=-np.inf) > min(ex["pos_scores"]) for ex in rows)
    print(f"scored {len(pairs)} pairs of {len(rows)} queries -> {args.out}; teacher scores: positives mean "
          f"{np.mean([s for ex in rows for s in ex['pos_scores']]):.3f}, negatives mean "
          f"{np.mean([s for ex in rows for s in ex['neg_scores']] or [np.nan]):.3f}; {ranked_wrong} queries with a "
          f"negative above a positive")
    return rows

if __name__ == "__main__":
    data.run(main, parser)
