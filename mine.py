"""Stage: model + corpus + train queries -> train jsonl with mined hard negatives.

    python mine.py --dataset beir/scifact/train --out runs/mined.jsonl                    # ranks 10-100, 7 negatives
    python mine.py --dataset beir/scifact/train --range 10-50 --num_neg 3 --margin 0.95 --out runs/mined.jsonl
    python mine.py --emb runs/emb_train --margin 0.9 --out runs/mined_m09.jsonl       # reuse encode.py's vectors
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
import random
import shutil
import sys

import numpy as np

import data
import retrieval
from model import default_model, for_inference, setup

parser = data.parser(__doc__, model=None, dataset="beir/scifact/train", split=None, queries=None, batch_size=None,
                     dtype=None, device="auto", seed=0, out=...)
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
parser.add_argument("--emb", default=None, help="encode.py's folder of this corpus and model: its vectors are used "
                                                "instead of encoding the corpus again")


def parse_range(text):
    try:
        start, end = (int(x) for x in text.split("-"))
    except ValueError:
        raise data.InputError(f"--range {text!r}: expected START-END, e.g. 10-100") from None
    if not 0 <= start < end:
        raise data.InputError(f"--range {text!r}: need 0 <= START < END")
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
    device, rank, world = setup(args.device)
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    corpus, queries, qrels = data.load_dataset(args.dataset, args.split)
    if not qrels:
        raise data.InputError(f"{args.dataset}: no qrels, so no positives to mine around")
    qids = data.read_ids(args.queries, qrels) if args.queries else sorted(qrels)
    model_path = args.model or default_model()
    model = for_inference(model_path, device, dtype)
    folder = args.emb or args.out + ".emb"  # without --emb the corpus is encoded here (each rank its shards)
    if not args.emb:
        meta = {"model": model_path, "dataset": args.dataset, "split": args.split, "dtype": dtype, **model.settings}
        retrieval.encode_corpus(model, corpus, folder, meta, 1_000_000, "fp32", args.batch_size, rank, world)
    if rank != 0:  # rank 0 searches and writes
        return []
    docs = retrieval.Shards(folder)
    if args.emb and (docs.meta["model"] != model_path or set(docs.ids) != set(corpus)):
        raise data.InputError(f"--emb {args.emb}: an encoding of {docs.meta['model']} over "
                              f"{docs.meta['dataset']}, not of {model_path} over {args.dataset}")
    q_emb = model.encode([queries[q] for q in qids], "query", args.batch_size)
    q_emb /= np.linalg.norm(q_emb, axis=1, keepdims=True)  # cosine, as the search scores
    row_of = {did: i for i, did in enumerate(docs.ids)}

    def cosine(qi, dids):  # of query qi with these documents, as the search scores them
        vectors = docs.rows([row_of[d] for d in dids])
        return vectors @ q_emb[qi] / np.linalg.norm(vectors, axis=1).clip(1e-12)
    max_pos = max(len(qrels[q]) for q in qids)
    # ask for enough: the window end plus room for positives that will be skipped inside it
    scores, idx = retrieval.search(q_emb, docs, end + max_pos, device)
    sorted_ids = sorted(docs.ids)

    rows, too_few, neg_scores = [], 0, []
    totals = {"positive": 0, "same_text": 0, "margin": 0, "random": 0, "short_window": 0, "no_positive": 0}
    for qi, qid in enumerate(qids):
        rng = random.Random(f"{args.seed}/{qid}")
        pos_ids = sorted(d for d, g in qrels[qid].items() if g > 0)
        if not pos_ids:  # only grade-0 judgements: nothing to train on
            totals["no_positive"] += 1
            continue
        pos = dict(zip(pos_ids, cosine(qi, pos_ids).tolist()))
        # ranks count among non-positives (the search gave end + max_pos candidates; -1 pads a short result)
        ranked = [(docs.ids[j], float(s)) for s, j in zip(scores[qi], idx[qi]) if j >= 0]
        non_pos = [(d, s) for d, s in ranked if d not in pos]
        totals["positive"] += len(ranked) - len(non_pos)
        chosen, counts = select_negatives(non_pos[start:end], queries[qid], pos, corpus, sorted_ids, args, rng,
                                          score=lambda did: float(cosine(qi, [did])[0]))
        for k in counts:
            totals[k] += counts[k]
        too_few += len(chosen) < args.num_neg
        neg_scores += [s for _, s in chosen]
        rows.append({"qid": qid, "query": queries[qid], "pos": [corpus[p] for p in pos_ids], "pos_ids": pos_ids,
                     "pos_scores": [pos[p] for p in pos_ids], "neg": [corpus[d] for d, _ in chosen],
                     "neg_ids": [d for d, _ in chosen], "neg_scores": [s for _, s in chosen]})
    data.write_jsonl(args.out, rows)
    if not args.emb:
        shutil.rmtree(folder)
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
    try:
        main(parser.parse_args())
    except data.InputError as e:
        sys.exit(f"error: {e}")
