"""Stage: model + corpus + train queries -> train jsonl with mined hard negatives.

    python mine.py --dataset beir/scifact/train --out runs/mined.jsonl                    # ranks 10-100, 7 negatives
    python mine.py --dataset beir/scifact/train --range 10-50 --num_neg 3 --margin 0.95 --out runs/mined.jsonl
    torchrun --nproc_per_node 8 mine.py --dataset beir/nfcorpus/train --out runs/nf_mined.jsonl   # encode on 8 GPUs

For each query: retrieve the top documents with --model (exact inner-product search), then sample --num_neg
negatives from the rank window --range (0-based, end exclusive, counted among the documents that are not
positives: 10-100 skips the 10 best, which are the most likely false negatives). Never a positive of the query (by id), never a text equal to the query or to a positive,
no duplicate texts; with --margin m, only documents scoring below m x the query's lowest positive score
(positive-aware filtering, NV-Retriever); with --random_frac, that share of the negatives is drawn from the whole
corpus instead; a query whose window runs short is topped up the same way (counted in the summary).
Deterministic for a --seed. Writes FlagEmbedding's format with ids and scores:
{"qid", "query", "pos", "pos_ids", "pos_scores", "neg", "neg_ids", "neg_scores"}.
"""
import argparse
import gc
import random

import numpy as np

import data
from encode import distributed, encode_texts
from evaluate import search
from model import default_model, for_inference, pick_device

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
# data
parser.add_argument("--model", default=None, help="Hugging Face folder or checkpoint (default: bundled "
                                                  "all-MiniLM-L6-v2)")
parser.add_argument("--dataset", default="beir/scifact/train", help="ir_datasets id, or a BEIR folder with --split")
parser.add_argument("--split", default=None, help="split of a BEIR folder (usually train)")
parser.add_argument("--queries", default=None, help="optional file of query ids (one a line) to mine for, e.g. a "
                                                    "train part that leaves out a dev part")
# mining
parser.add_argument("--range", default="10-100", help="rank window to sample from, START-END (0-based, END "
                                                      "exclusive)")
parser.add_argument("--num_neg", type=int, default=7, help="negatives a query")
parser.add_argument("--margin", type=float, default=0.0, help="keep a negative only if its score < margin x the "
                                                              "query's lowest positive score (0 = off; e.g. 0.95)")
parser.add_argument("--abs_margin", type=float, default=None, help="keep a negative only if its score < the lowest "
                                                                   "positive score - abs_margin")
parser.add_argument("--sampling", default="random", choices=["random", "top"], help="random from the window, or the "
                                                                                    "highest-ranked ones")
parser.add_argument("--random_frac", type=float, default=0.0, help="share of negatives drawn from the whole corpus")
# hardware
parser.add_argument("--batch_size", type=int, default=None, help="texts per forward pass when encoding (default "
                                                                "32 on CPU, 256 on GPU)")
parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast dtype of the encoder")
parser.add_argument("--device", default="auto", help="cuda, cpu or auto")
parser.add_argument("--seed", type=int, default=0, help="seed of the sampling")
# output
parser.add_argument("--out", required=True, help="train jsonl to write")


def parse_range(text):
    try:
        start, end = (int(x) for x in text.split("-"))
    except ValueError:
        raise ValueError(f"--range {text!r}: expected START-END, e.g. 10-100") from None
    if not 0 <= start < end:
        raise ValueError(f"--range {text!r}: need 0 <= START < END")
    return start, end


def select_negatives(window, query, pos, corpus, doc_ids, args, rng, score):
    """One query's negatives. window: [(doc_id, score)] from the rank window, best first, positives removed;
    pos: {doc_id: score} of its positives; doc_ids: all ids (sorted); score(doc_id): the model's score of any
    document.
    Hard negatives come from the window (no text equal to the query, a positive or another negative; below the
    margin); the --random_frac share, and whatever the window could not supply, from the whole corpus.
    Returns (chosen [(doc_id, score)], counts of what each filter removed and how many were random)."""
    floor = min(pos.values())  # the lowest positive score
    # relative margin: below margin x floor (written so that it stays below the floor when the floor is negative)
    limit = min(floor - (1 - args.margin) * abs(floor) if args.margin else float("inf"),
                floor - args.abs_margin if args.abs_margin is not None else float("inf"))
    used = {query} | {corpus[p] for p in pos}
    counts = {"same_text": 0, "margin": 0, "random": 0}
    kept = []
    for did, s in window:
        if corpus[did] in used:
            counts["same_text"] += 1
        elif s >= limit:
            counts["margin"] += 1
        else:
            used.add(corpus[did])
            kept.append((did, s))
    n_hard = args.num_neg - round(args.num_neg * args.random_frac)
    chosen = kept[:n_hard] if args.sampling == "top" else rng.sample(kept, min(n_hard, len(kept)))
    used = {query} | {corpus[p] for p in pos} | {corpus[d] for d, _ in chosen}
    if len(chosen) < args.num_neg:  # top up from the whole corpus, with the window's filters
        for did in rng.sample(doc_ids, min(len(doc_ids), 4 * args.num_neg + len(pos))):
            if len(chosen) == args.num_neg or did in pos or corpus[did] in used:
                continue
            s = score(did)  # one dot product, used for the filter and written out
            if s < limit:
                used.add(corpus[did])
                chosen.append((did, s))
                counts["random"] += 1
    counts["short_window"] = int(len(kept) < n_hard)
    return chosen, counts


def main(args):
    start, end = parse_range(args.range)
    device = pick_device(args.device)
    corpus, queries, qrels = data.load_dataset(args.dataset, args.split)
    if not qrels:
        raise data.InputError(f"{args.dataset}: no qrels, so no positives to mine around")
    qids = sorted(qrels)
    if args.queries:
        qids = data.read_ids(args.queries, qrels)
    model = for_inference(args.model or default_model(), device, args.dtype)
    doc_ids = list(corpus)
    d_emb = encode_texts(model, [corpus[i] for i in doc_ids], "doc", args.batch_size, args.dtype, device)
    q_emb = encode_texts(model, [queries[q] for q in qids], "query", args.batch_size, args.dtype, device)
    if distributed()[0] != 0:  # under torchrun every rank encoded a share; rank 0 searches and writes
        return []
    row_of = {did: i for i, did in enumerate(doc_ids)}
    sorted_ids = sorted(doc_ids)
    max_pos = max(len(qrels[q]) for q in qids)
    # ask for enough: the window end plus room for positives that will be skipped inside it
    scores, idx = search(q_emb, d_emb, end + max_pos)

    rows, too_few, neg_scores = [], 0, []
    totals = {"positive": 0, "same_text": 0, "margin": 0, "random": 0, "short_window": 0, "no_positive": 0}
    for qi, qid in enumerate(qids):
        rng = random.Random(f"{args.seed}/{qid}")
        pos_ids = sorted(d for d, g in qrels[qid].items() if g > 0)
        if not pos_ids:  # only grade-0 judgements: nothing to train on
            totals["no_positive"] += 1
            continue
        pos = {p: float(q_emb[qi] @ d_emb[row_of[p]]) for p in pos_ids}
        # ranks count among non-positives (faiss gave end + max_pos candidates; -1 pads a short result)
        ranked = [(doc_ids[j], float(s)) for s, j in zip(scores[qi], idx[qi]) if j >= 0]
        non_pos = [(d, s) for d, s in ranked if d not in pos]
        totals["positive"] += len(ranked) - len(non_pos)
        chosen, counts = select_negatives(non_pos[start:end], queries[qid], pos, corpus, sorted_ids, args, rng,
                                          score=lambda did: float(q_emb[qi] @ d_emb[row_of[did]]))
        for k in counts:
            totals[k] += counts[k]
        too_few += len(chosen) < args.num_neg
        neg_scores += [s for _, s in chosen]
        rows.append({"qid": qid, "query": queries[qid], "pos": [corpus[p] for p in pos_ids], "pos_ids": pos_ids,
                     "pos_scores": [pos[p] for p in pos_ids], "neg": [corpus[d] for d, _ in chosen],
                     "neg_ids": [d for d, _ in chosen], "neg_scores": [s for _, s in chosen]})
    data.write_jsonl(args.out, rows)
    pos_all = [s for r in rows for s in r["pos_scores"]]
    print(f"mined {len(rows)} queries -> {args.out} ({totals['no_positive']} skipped: no positive in the qrels)")
    print(f"  negatives a query: mean {np.mean([len(r['neg']) for r in rows]):.2f}, wanted {args.num_neg}; "
          f"{too_few} queries got fewer; {totals['random']} random negatives, {totals['short_window']} queries "
          f"topped up with random documents because their window ran short")
    print(f"  removed from windows: {totals['positive']} positives, {totals['same_text']} duplicate/identical "
          f"texts, {totals['margin']} above the margin")
    if neg_scores:
        print(f"  scores: positives mean {np.mean(pos_all):.3f}; negatives mean {np.mean(neg_scores):.3f}, "
              f"min {np.min(neg_scores):.3f}, max {np.max(neg_scores):.3f}")
    return rows


if __name__ == "__main__":
    main(parser.parse_args())
    gc.freeze()  # the exit then skips a collection over every object torch and transformers made: 1.2 s
