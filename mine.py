"""Stage: model + corpus + train queries -> train jsonl with mined hard negatives.

    python mine.py --dataset beir/scifact/train --out runs/mined.jsonl                    # ranks 10-100, 7 negatives
    python mine.py --dataset beir/scifact/train --range 10-50 --num_neg 3 --margin 0.95 --out runs/mined.jsonl
    python mine.py --emb runs/emb_train --margin 0.9 --out runs/mined_m09.jsonl       # reuse encode.py's vectors
    python mine.py --train_data pairs.jsonl --corpus corpus.jsonl --consistency_k 50 --out runs/mined.jsonl
    python mine.py --teacher runs/ft/model --margin 0.95 --out runs/mined_t.jsonl     # the margin on teacher scores
    torchrun --nproc_per_node 8 mine.py --dataset beir/nfcorpus/train --out runs/nf_mined.jsonl   # encode on 8 GPUs

For each query (of --dataset's qrels, or your own --train_data pairs): the top documents by --model (exact cosine
search), then --num_neg negatives sampled from the rank window --range (0-based, end exclusive, counted among the
documents that are not positives: 10-100 skips the 10 best, the likeliest false negatives). Never a positive of
the query (by id), never a text equal to the query, to a positive or to another negative; with --margin m, only
documents scoring below m x the query's lowest positive score (positive-aware filtering, NV-Retriever), by
--teacher's scores if given. Deterministic for a --seed. Writes FlagEmbedding's format with ids and scores (the
teacher's, if any): {"qid", "query", "pos", "pos_ids", "pos_scores", "neg", "neg_ids", "neg_scores"}.
"""
import random
import shutil

import numpy as np
import torch

import data
import retrieval
from model import for_inference, load_teacher, setup

parser = data.parser(__doc__, model=None, dataset="beir/scifact/train", split=None, queries=None, batch_size=None,
                     dtype=None, device="auto", seed=0, out=...)
parser.add_argument("--range", default="10-100", type=data.int_range, help="rank window to "
                    "sample from, START-END (0-based, END exclusive)")
parser.add_argument("--num_neg", type=data.positive, default=7, help="negatives a query")
parser.add_argument("--margin", type=data.share, default=0.0, help="keep a negative only if its score < margin x the "
                    "query's lowest positive score (0: off; e.g. 0.95)")
parser.add_argument("--sampling", default="random", choices=["random", "top"], help="random from the window, or the "
                    "highest-ranked ones")
parser.add_argument("--emb", help="encode.py's folder of this corpus and model: its vectors instead of encoding again")
parser.add_argument("--train_data", help="your own query/positive pairs (train jsonl) instead of --dataset's qrels")
parser.add_argument("--corpus", help="with --train_data: a BEIR corpus.jsonl to mine (default: the file's own texts)")
parser.add_argument("--consistency_k", type=data.count, default=0, help="drop a query none of whose positives is "
                    "in the model's top K (E5's consistency filter; 0: off)")
parser.add_argument("--teacher", help="a cross-encoder or bi-encoder folder: the margin compares its scores")

def select_negatives(window, query, pos, corpus, doc_ids, args, rng, score):
    """One query's negatives. window: [(doc_id, score)] of the rank window, best first, positives removed; pos:
    {doc_id: score} of its positives; doc_ids: all ids (sorted); score(doc_id): the score of any document.
    -> (chosen [(doc_id, score)], counts of what the filters removed and of the random top-ups)."""
    floor = min(pos.values())  # the lowest positive score; the margin is written to stay below it if negative
    limit = floor - (1 - args.margin) * abs(floor) if args.margin else float("inf")
    used, kept, counts = {query} | {corpus[p] for p in pos}, [], {"same_text": 0, "margin": 0, "random": 0}
    for did, s in window:
        if corpus[did] in used or s >= limit:
            counts["same_text" if corpus[did] in used else "margin"] += 1
        else:
            used.add(corpus[did])
            kept.append((did, s))
    chosen = kept[:args.num_neg] if args.sampling == "top" else rng.sample(kept, min(args.num_neg, len(kept)))
    used = {query} | {corpus[p] for p in pos} | {corpus[d] for d, _ in chosen}
    for did in rng.sample(doc_ids, min(len(doc_ids), 4 * args.num_neg + len(pos))):  # top-ups, if the window ran short
        if len(chosen) < args.num_neg and did not in pos and corpus[did] not in used and (s := score(did)) < limit:
            used.add(corpus[did])
            chosen.append((did, s))
            counts["random"] += 1
    counts["short_window"] = int(len(kept) < args.num_neg)
    return chosen, counts

def own_pairs(args):
    """--train_data's examples and the documents to mine from: --corpus, or every distinct text of the file (its id:
    its position among them) -> (examples, each with a qid (its number, if the line has none) and pos_ids, corpus)."""
    examples = data.read_train_jsonl(args.train_data)
    corpus = data.read_corpus(args.corpus) if args.corpus else {
        str(n): t for n, t in enumerate(dict.fromkeys(t for ex in examples for t in ex["pos"] + ex["neg"]))}
    by_text = not args.corpus or not all("pos_ids" in ex for ex in examples)  # positives found by their text
    id_of = {corpus[i]: i for i in corpus} if by_text else {}
    for n, ex in enumerate(examples, 1):
        ex["qid"] = ex.get("qid", str(n))
        ex["pos_ids"] = [id_of.get(t) for t in ex["pos"]] if by_text else ex["pos_ids"]
        if not all(i in corpus for i in ex["pos_ids"]):
            raise data.InputError(f"{args.train_data}: query {ex['qid']}: a positive is not in {args.corpus}")
    return examples, corpus

def main(args):
    device, rank, world = setup(args.device)
    data.output(args.out, folder=False)
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    if args.train_data:
        (examples, corpus), source, asked = own_pairs(args), args.corpus or args.train_data, 0
    else:
        corpus, queries, qrels = data.load_dataset(args.dataset, args.split)
        qrels = {q: qrels[q] for q in data.read_ids(args.queries, qrels)} if args.queries else qrels
        examples, source, asked = data.examples_from_qrels(corpus, queries, qrels), args.dataset, len(qrels)
    if not examples:
        raise data.InputError(f"{args.dataset}: no positives in its qrels to mine around")
    model = for_inference(args.model, device, dtype)
    folder = args.emb or args.out + ".emb"  # without --emb the corpus is encoded here (each rank its shards)
    if not args.emb:
        meta = {"model": args.model, "dataset": source, "split": args.split, "dtype": dtype, **model.settings}
        retrieval.encode_corpus(model, corpus, folder, meta, 100_000, "fp32", args.batch_size, rank, world)
    if rank != 0:  # rank 0 searches and writes
        return []
    docs = retrieval.Shards(folder, corpus, source)
    if docs.meta["model"] != args.model:
        raise data.InputError(f"--emb {args.emb}: an encoding by {docs.meta['model']}, not by {args.model}")
    q_emb = model.encode([ex["query"] for ex in examples], "query", args.batch_size)
    q_emb = retrieval.unit(torch.tensor(q_emb)).numpy()
    row_of, sorted_ids = {did: i for i, did in enumerate(docs.ids)}, sorted(docs.ids)
    cosine = lambda qi, dids: retrieval.unit(torch.tensor(docs.rows([row_of[d] for d in dids]))).numpy() @ q_emb[qi]
    # enough candidates: the window's end, plus room for the positives that are skipped inside it
    k = max(args.range[1] + max(len(ex["pos_ids"]) for ex in examples), args.consistency_k)
    scores, idx = retrieval.search(q_emb, docs, k, device)
    todo, totals = [], {"positive": 0, "same_text": 0, "margin": 0, "random": 0, "short_window": 0, "inconsistent": 0}
    for qi, ex in enumerate(examples):
        ranked = [(docs.ids[j], float(s)) for s, j in zip(scores[qi], idx[qi]) if j >= 0]
        if args.consistency_k and not any(d in ex["pos_ids"] for d, _ in ranked[:args.consistency_k]):
            totals["inconsistent"] += 1  # the model disagrees with the label: likely a noisy pair
            continue
        pos = dict(zip(ex["pos_ids"], cosine(qi, ex["pos_ids"]).tolist()))
        totals["positive"] += sum(d in pos for d, _ in ranked)
        todo.append((qi, ex, pos, [(d, s) for d, s in ranked if d not in pos][args.range[0]:args.range[1]]))
    teacher = load_teacher(args.teacher, device, dtype) if args.teacher else None
    if teacher:  # the teacher scores the positives and the windows; its scores replace the model's
        pairs = [(ex["query"], d) for _, ex, pos, window in todo for d in [*pos, *(d for d, _ in window)]]
        score = iter(teacher([q for q, _ in pairs], [corpus[d] for _, d in pairs], args.batch_size))
        todo = [(qi, ex, {d: next(score) for d in pos}, [(d, next(score)) for d, _ in window])
                for qi, ex, pos, window in todo]
    rows = []
    for qi, ex, pos, window in todo:
        score = (lambda d: teacher([ex["query"]], [corpus[d]])[0]) if teacher else lambda d: float(cosine(qi, [d])[0])
        chosen, counts = select_negatives(window, ex["query"], pos, corpus, sorted_ids, args,
                                          random.Random(f"{args.seed}/{ex['qid']}"), score)
        totals.update({k: totals[k] + v for k, v in counts.items()})
        rows.append({**ex, "pos_scores": list(pos.values()), "neg": [corpus[d] for d, _ in chosen],
                     "neg_ids": [d for d, _ in chosen], "neg_scores": [s for _, s in chosen]})
    data.write_jsonl(args.out, rows)
    if not args.emb:
        shutil.rmtree(folder)
    negs = [s for r in rows for s in r["neg_scores"]]
    print(f"mined {len(rows)} queries -> {args.out}; skipped {max(0, asked - len(examples))} without a positive and "
          f"{totals['inconsistent']} whose positives are not in the model's top {args.consistency_k}; negatives a "
          f"query: {len(negs) / max(1, len(rows)):.2f} (wanted {args.num_neg}), {totals['short_window']} windows ran "
          f"short and got {totals['random']} random ones; removed from windows: "
          f"{totals['positive']} positives, {totals['same_text']} repeated texts, {totals['margin']} above the margin; "
          f"scores: positives mean {np.mean([s for r in rows for s in r['pos_scores']] or [np.nan]):.3f}, "
          f"negatives mean {np.mean(negs or [np.nan]):.3f} (min {min(negs, default=np.nan):.3f}, max "
          f"{max(negs, default=np.nan):.3f})")
    return rows

if __name__ == "__main__":
    data.run(main, parser)
