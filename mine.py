r"""Stage: model + corpus + train queries -> train jsonl with mined hard negatives.

    python mine.py --dataset beir/scifact/train --out runs/mined.jsonl  # ranks 10-100, 7 negatives
    python mine.py --dataset beir/scifact/train --range 10-50 --num_neg 3 --margin 0.95 \
        --out runs/mined.jsonl
    python mine.py --emb runs/emb_train --margin 0.9 --out runs/mined_m09.jsonl
        # reuse encode.py's vectors
    python mine.py --train_data pairs.jsonl --corpus corpus.jsonl --consistency_k 50 \
        --out runs/mined.jsonl
    python mine.py --teacher runs/ft/model --margin 0.95 --out runs/mined_t.jsonl
        # the margin on teacher scores
    python mine.py --index HNSW32 --out runs/mined.jsonl  # faiss, for large corpora
    torchrun --nproc_per_node 8 mine.py --dataset beir/nfcorpus/train --out runs/nf.jsonl
        # encode on 8 GPUs

For each query (of --dataset's qrels, or your own --train_data pairs): the top documents by --model
(exact cosine search, or a faiss --index), then --num_neg negatives sampled from the rank window
--range (0-based, end exclusive, counted among the documents that are not positives: 10-100 skips
the 10 best, the likeliest false negatives). Never a positive of the query (by id), never a text
equal to the query, to a positive or to another negative; with --margin m, only documents scoring
below m x the query's lowest positive score (positive-aware filtering, NV-Retriever), by --teacher's
scores if given. A window that runs short is topped up with random documents that pass the same
filters. Deterministic for a --seed. Writes FlagEmbedding's format with ids and scores (the
teacher's, if any): {"qid", "query", "pos", "pos_ids", "pos_scores", "neg", "neg_ids",
"neg_scores"}.
"""
import random
import shutil

import numpy as np
import torch

import cli
import data
import retrieval
from model import for_inference
from teacher import load_teacher

parser = cli.parser(__doc__, model=None, dataset="beir/scifact/train", split=None, queries=None,
                    batch_size=None, dtype=None, device="auto", seed=0, out=..., index=None,
                    nprobe=None, ef_search=None)
parser.add_argument("--range", default="10-100", type=cli.int_range,
                    help="The rank window to sample negatives from, START-END (0-based, END "
                         "exclusive).")
parser.add_argument("--num_neg", type=cli.positive, default=7, help="Negatives a query.")
parser.add_argument("--margin", type=cli.share, default=0.0,
                    help="Keep a negative only if its score is below MARGIN x the query's lowest "
                         "positive score (0: off; e.g. 0.95).")
parser.add_argument("--sampling", default="random", choices=["random", "top"],
                    help="Sample the negatives at random from the window, or take its "
                         "highest-ranked ones.")
parser.add_argument("--emb",
                    help="encode.py's folder of this corpus and model: its vectors instead of "
                         "encoding again.")
parser.add_argument("--train_data",
                    help="Your own query/positive pairs (train jsonl) instead of --dataset's "
                         "qrels.")
parser.add_argument("--corpus",
                    help="With --train_data: a BEIR corpus.jsonl to mine from (default: the file's "
                         "own texts).")
parser.add_argument("--consistency_k", type=cli.count, default=0,
                    help="Drop a query none of whose positives is in the model's top K (E5's "
                         "consistency filter; 0: off).")
parser.add_argument("--teacher",
                    help="A cross-encoder or bi-encoder folder: the margin compares its scores, "
                         "and its scores are written.")

def select_negatives(window, query, pos, corpus, doc_ids, args, rng, score):
    """One query's negatives. window: [(doc_id, score)] of the rank window, best first, positives
    removed; pos: {doc_id: score} of its positives; doc_ids: all ids (sorted); score(doc_id): the
    score of any document. -> (chosen [(doc_id, score)], counts of what the filters removed and of
    the random top-ups)."""
    floor = min(pos.values())  # the lowest positive score
    limit = float("inf")
    if args.margin:  # written to stay below the floor when the floor is negative too
        limit = floor - (1 - args.margin) * abs(floor)
    counts = {"same_text": 0, "margin": 0, "random": 0}
    used = {query} | {corpus[p] for p in pos}  # texts a negative must not repeat
    kept = []
    for doc_id, s in window:
        if corpus[doc_id] in used:
            counts["same_text"] += 1
        elif s >= limit:
            counts["margin"] += 1
        else:
            used.add(corpus[doc_id])
            kept.append((doc_id, s))
    if args.sampling == "top":
        chosen = kept[:args.num_neg]
    else:
        chosen = rng.sample(kept, min(args.num_neg, len(kept)))
    used = {query} | {corpus[p] for p in pos} | {corpus[d] for d, _ in chosen}
    # a window that ran short: random documents, passing the same filters, in a seeded order
    for doc_id in rng.sample(doc_ids, min(len(doc_ids), 4 * args.num_neg + len(pos))):
        if len(chosen) >= args.num_neg or doc_id in pos or corpus[doc_id] in used:
            continue
        s = score(doc_id)
        if s < limit:
            used.add(corpus[doc_id])
            chosen.append((doc_id, s))
            counts["random"] += 1
    counts["short_window"] = int(len(kept) < args.num_neg)
    return chosen, counts

def own_pairs(args):
    """--train_data's examples and the documents to mine from: --corpus, or every distinct text of
    the file (its id: its position among them) -> (examples, each with a qid (its line number, if it
    has none) and pos_ids, corpus)."""
    examples = data.read_train_jsonl(args.train_data)
    if args.corpus:
        corpus = data.read_corpus(args.corpus)
    else:
        texts = dict.fromkeys(t for ex in examples for t in ex["pos"] + ex["neg"])
        corpus = {str(n): text for n, text in enumerate(texts)}
    # positives found by their text
    by_text = not args.corpus or not all("pos_ids" in ex for ex in examples)
    id_of = {corpus[i]: i for i in corpus} if by_text else {}
    for n, ex in enumerate(examples, 1):
        ex["qid"] = ex.get("qid", str(n))
        if by_text:
            ex["pos_ids"] = [id_of.get(text) for text in ex["pos"]]
        if not all(i in corpus for i in ex["pos_ids"]):
            raise cli.InputError(f"{args.train_data}: query {ex['qid']}: a positive is not in "
                                 f"{args.corpus}")
    return examples, corpus

def cosines(docs, q, doc_ids, row_of):
    """The cosine of one query vector q (D,) with each of these documents -> (len(doc_ids),)."""
    d = retrieval.unit(torch.from_numpy(docs.rows([row_of[i] for i in doc_ids]))).numpy()
    return d @ q

def main(args):
    device, rank, world = cli.setup_device(args.device)
    cli.output(args.out, folder=False)
    dtype = cli.default_dtype(args.dtype, device)

    # what to mine: a dataset's qrels, or your own pairs
    if args.train_data:
        examples, corpus = own_pairs(args)
        source = args.corpus or args.train_data
        asked = len(examples)
    else:
        corpus, queries, qrels = data.load_dataset(args.dataset, args.split)
        if args.queries:
            qrels = {qid: qrels[qid] for qid in data.read_ids(args.queries, qrels)}
        examples = data.examples_from_qrels(corpus, queries, qrels)
        source = args.dataset
        asked = len(qrels)
    if not examples:
        raise cli.InputError(f"{args.dataset}: no positives in its qrels to mine around")
    # before the long work
    teacher = load_teacher(args.teacher, device, dtype) if args.teacher else None

    # the corpus's vectors: encode.py's (--emb), or encoded here, each rank its shards
    model = for_inference(args.model, device, dtype)
    folder = args.emb or args.out + ".emb"
    if not args.emb:
        meta = {"model": args.model, "dataset": source, "split": args.split, "dtype": dtype,
                **model.settings, "model_fingerprint": retrieval.model_fingerprint(model)}
        retrieval.encode_corpus(model, corpus, folder, meta, 100_000, "fp32", args.batch_size,
                                rank, world)
    if rank != 0:  # rank 0 searches and writes
        return []
    docs = retrieval.Shards(folder, corpus, source, model)  # the same documents, the same model
    q_emb = model.encode([ex["query"] for ex in examples], "query", args.batch_size)
    q_emb = retrieval.unit(torch.from_numpy(q_emb)).numpy()  # (Q, D)
    row_of = {doc_id: i for i, doc_id in enumerate(docs.ids)}

    # candidates: enough for the window's end plus the positives that are skipped inside it
    k = max(args.range[1] + max(len(ex["pos_ids"]) for ex in examples), args.consistency_k)
    scores, idx = retrieval.search(q_emb, docs.mats, k, device, args.index, args.nprobe,
                                   args.ef_search)
    totals = {"positive": 0, "inconsistent": 0, "same_text": 0, "margin": 0, "random": 0,
              "short_window": 0}
    todo = []  # (query row, example, {positive id: score}, window [(doc id, score)])
    for qi, ex in enumerate(examples):
        found = [(docs.ids[j], float(s)) for s, j in zip(scores[qi], idx[qi]) if j >= 0]
        top_ids = [doc_id for doc_id, _ in found[:args.consistency_k]]
        if args.consistency_k and not any(doc_id in ex["pos_ids"] for doc_id in top_ids):
            totals["inconsistent"] += 1  # the model disagrees with the label: likely a noisy pair
            continue
        pos = dict(zip(ex["pos_ids"], cosines(docs, q_emb[qi], ex["pos_ids"], row_of).tolist()))
        totals["positive"] += sum(doc_id in pos for doc_id, _ in found)
        window = [(doc_id, s) for doc_id, s in found
                  if doc_id not in pos][args.range[0]:args.range[1]]
        todo.append((qi, ex, pos, window))

    # with a teacher, its scores of the positives and the windows replace the model's
    if teacher:
        pairs = [(ex["query"], doc_id) for _, ex, pos, window in todo
                 for doc_id in [*pos, *(d for d, _ in window)]]
        taught = teacher([q for q, _ in pairs], [corpus[d] for _, d in pairs], args.batch_size)
        at = 0  # the teacher's score of the next pair
        for qi, ex, pos, window in todo:
            for doc_id in pos:
                pos[doc_id] = taught[at]
                at += 1
            for i, (doc_id, _) in enumerate(window):
                window[i] = (doc_id, taught[at])
                at += 1

    # the negatives of each query
    sorted_ids = sorted(docs.ids)
    rows = []
    for qi, ex, pos, window in todo:
        def score(doc_id):  # a random top-up's score, by whoever scored the window
            if teacher:
                return teacher([ex["query"]], [corpus[doc_id]])[0]
            return float(cosines(docs, q_emb[qi], [doc_id], row_of)[0])
        rng = random.Random(f"{args.seed}/{ex['qid']}")
        chosen, counts = select_negatives(window, ex["query"], pos, corpus, sorted_ids, args, rng,
                                          score)
        for key, value in counts.items():
            totals[key] += value
        rows.append({**ex, "pos_scores": list(pos.values()), "neg": [corpus[d] for d, _ in chosen],
                     "neg_ids": [d for d, _ in chosen], "neg_scores": [s for _, s in chosen]})
    cli.write_jsonl(args.out, rows)
    if not args.emb:
        shutil.rmtree(folder)
    summarize(rows, totals, asked, len(examples), args)
    return rows

def summarize(rows, totals, asked, mined, args):
    negs = [s for r in rows for s in r["neg_scores"]]
    pos_mean = np.mean([s for r in rows for s in r["pos_scores"]] or [np.nan])
    print(f"mined {len(rows)} queries -> {args.out}; skipped {max(0, asked - mined)} without a "
          f"positive and {totals['inconsistent']} whose positives are not in the model's top "
          f"{args.consistency_k}; negatives a query: {len(negs) / max(1, len(rows)):.2f} (wanted "
          f"{args.num_neg}), {totals['short_window']} windows ran short and got "
          f"{totals['random']} random ones; removed from windows: {totals['positive']} positives, "
          f"{totals['same_text']} repeated texts, {totals['margin']} above the margin; scores: "
          f"positives mean {pos_mean:.3f}, negatives mean {np.mean(negs or [np.nan]):.3f} (min "
          f"{min(negs, default=np.nan):.3f}, max {max(negs, default=np.nan):.3f})")

if __name__ == "__main__":
    cli.run(main, parser)
