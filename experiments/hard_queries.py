"""Which train queries stay hard across epochs (train.py --example_log), and a train file without
the hardest share, to see on dev whether they are label noise (dropping them helps) or the queries
that teach (dropping them hurts).

    python train.py --train_data runs/mined.jsonl --epochs 3 --example_log --out_dir runs/ft
    python experiments/hard_queries.py runs/ft/examples.jsonl runs/mined.jsonl --drop 0.05 \\
        --out runs/mined_easier.jsonl

A query is hard in an epoch when its positive is not the best of its batch (rank > 1); the share
dropped is of the queries with the highest mean loss over the epochs.
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import cli  # noqa: E402
import data  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("examples", help="A run's examples.jsonl.")
    parser.add_argument("train_data", help="The train jsonl that run trained on.")
    parser.add_argument("--drop", type=float, default=0.05, help="The hardest share to drop.")
    parser.add_argument("--out", help="Write the train file without them here.")
    args = parser.parse_args()
    losses = {}  # example -> its loss in each epoch
    hard = {}  # example -> the epochs it was hard in
    epochs = set()
    with open(args.examples) as f:
        for line in f:
            row = json.loads(line)
            epochs.add(row["epoch"])
            losses.setdefault(row["example"], []).append(row["loss"])
            hard.setdefault(row["example"], 0)
            hard[row["example"]] += row["rank"] > 1
    examples = data.read_train_jsonl(args.train_data)
    always = [e for e, n in hard.items() if n == len(epochs)]
    print(f"{len(losses)} queries over {len(epochs)} epochs; hard in every epoch: {len(always)}")
    by_loss = sorted(losses, key=lambda e: -sum(losses[e]) / len(losses[e]))
    dropped = set(by_loss[:round(args.drop * len(examples))])
    for e in by_loss[:10]:
        mean = sum(losses[e]) / len(losses[e])
        print(f"  loss {mean:.3f}  hard {hard[e]}/{len(epochs)}  {examples[e]['query'][:80]}")
    if args.out:
        kept = [ex for e, ex in enumerate(examples) if e not in dropped]
        cli.write_jsonl(args.out, kept)
        print(f"dropped {len(dropped)} of {len(examples)} -> {args.out}")
