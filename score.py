r"""Stage: a teacher + train jsonl -> the same lines with the teacher's pos_scores and neg_scores,
for train.py --distill (kl or margin_mse).

    python score.py --teacher runs/ft/model --train_data runs/mined.jsonl --out runs/scored.jsonl
        # a bi-encoder
    python score.py --teacher path/to/cross-encoder --train_data runs/mined.jsonl \
        --out runs/scored_ce.jsonl

The teacher: a cross-encoder (any Hugging Face sequence-classification folder with one label: its
logit of (query, text)) or a bi-encoder (a checkpoint of ours, or any folder encode.py takes: the
cosine of the query's and the text's embeddings, with the teacher's own prefixes, pooling and
towers). Scores already in the file are replaced.
"""
import numpy as np

import cli
import data
from teacher import load_teacher

parser = cli.parser(__doc__, batch_size=None, dtype=None, device="auto", out=...)
parser.add_argument("--teacher", required=True, help="A cross-encoder or bi-encoder folder.")
parser.add_argument("--train_data", required=True,
                    help="The train jsonl to score (query, pos, neg), e.g. mine.py's output.")

def main(args):
    device = cli.setup_device(args.device)[0]
    cli.not_an_input(args.out, {"--train_data": args.train_data})
    cli.output(args.out, folder=False)
    rows = data.read_train_jsonl(args.train_data)
    score = load_teacher(args.teacher, device, cli.default_dtype(args.dtype, device))
    queries = [ex["query"] for ex in rows for _ in ex["pos"] + ex["neg"]]
    texts = [text for ex in rows for text in ex["pos"] + ex["neg"]]
    scores = score(queries, texts, args.batch_size)
    at = 0  # the first score of the next line
    for ex in rows:
        ex["pos_scores"] = scores[at:at + len(ex["pos"])]
        at += len(ex["pos"])
        ex["neg_scores"] = scores[at:at + len(ex["neg"])]
        at += len(ex["neg"])
    cli.write_jsonl(args.out, rows)
    pos = [s for ex in rows for s in ex["pos_scores"]]
    neg = [s for ex in rows for s in ex["neg_scores"]] or [np.nan]
    wrong = sum(max(ex["neg_scores"], default=-np.inf) > min(ex["pos_scores"]) for ex in rows)
    print(f"scored {len(texts)} pairs of {len(rows)} queries -> {args.out}; teacher scores: "
          f"positives mean {np.mean(pos):.3f}, negatives mean {np.mean(neg):.3f}; {wrong} queries "
          f"with a negative above a positive")
    return rows

if __name__ == "__main__":
    cli.run(main, parser)
