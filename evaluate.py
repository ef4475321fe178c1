"""Stage: a model (or encode.py's embeddings) + a dataset's qrels -> run file + metrics.

    python evaluate.py --dataset beir/scifact/test --dtype fp32          # all-MiniLM-L6-v2: nDCG@10 = 0.6451
    python evaluate.py --dataset ../shared/data/scifact --split test      # the same number from the BEIR folder
    python evaluate.py --model runs/ft/model --dataset beir/scifact/test --out runs/ft/eval
    python evaluate.py --emb runs/emb --dataset beir/scifact/test         # embeddings from encode.py
    python evaluate.py --compare runs/zeroshot runs/ft/eval               # paired t-test between two --out folders

Exact cosine search (top --k documents a query, ties broken by corpus order; any faiss index_factory string with
--index), metrics from pytrec_eval (graded qrels), the same code MTEB and BEIR use. Writes out/run.trec
(qid Q0 docid rank score tag) and out/metrics.json (every measure, per query too), and prints a table.
"""
import json
import os

import numpy as np

import data
import retrieval
from model import for_inference, setup

parser = data.parser(__doc__, model=None, dataset="beir/scifact/test", split=None, queries=None, batch_size=None,
                     dtype=None, device="auto", out=None)
parser.add_argument("--emb", help="an encode.py output folder, instead of --model")
parser.add_argument("--index", default="Flat", help="faiss index_factory string (inner product); Flat: exact")
parser.add_argument("--k", type=data.positive, default=1000, help="documents retrieved a query")
parser.add_argument("--dim", type=data.positive, help="score the first DIM dimensions only, re-normalised (Matryoshka)")
parser.add_argument("--ignore_identical_ids", action="store_true", help="drop a document whose id is the query's")
parser.add_argument("--compare", nargs="+", help="evaluate.py --out folders: differences to the first, paired t-test")

def compare(folders):
    """Differences of each run to the first, per measure, with a paired t-test over the common queries."""
    from scipy.stats import ttest_rel
    runs = {}
    for folder in folders:
        path = os.path.join(folder, "metrics.json")
        if not os.path.isfile(path):
            raise data.InputError(f"{path}: file not found (is {folder} an evaluate.py --out folder?)")
        with open(path) as f:
            runs[folder] = json.load(f)["per_query"]
    base_name, base = folders[0], runs[folders[0]]
    for name in folders[1:]:
        common = sorted(set(base) & set(runs[name]))
        print(f"{name} vs {base_name} ({len(common)} common queries)")
        for m in ("ndcg@10", "recall@100", "mrr@10", "map"):
            a, b = (np.array([run[q][m] for q in common]) for run in (base, runs[name]))
            p = ttest_rel(b, a).pvalue if np.any(a != b) else 1.0
            print(f"  {m:<11} {a.mean():.4f} -> {b.mean():.4f}  diff {b.mean() - a.mean():+.4f}  paired t-test "
                  f"p = {p:.3g}")

def main(args):
    if args.compare:
        return compare(args.compare)
    if args.out:
        data.output(args.out)
    corpus, queries, qrels = data.load_dataset(args.dataset, args.split)
    if not qrels:
        raise data.InputError(f"{args.dataset}: no qrels to evaluate against")
    if args.queries:
        qrels = {q: qrels[q] for q in data.read_ids(args.queries, qrels)}
    q_ids, device = sorted(qrels), setup(args.device)[0]
    dim = slice(0, args.dim)  # all dimensions when --dim is not given
    if args.emb:  # an encode.py folder: the corpus a shard at a time, the queries the qrels name
        docs, model_name = retrieval.Shards(args.emb), args.emb
        if not docs.covers(corpus):
            raise data.InputError(f"{args.emb}: its corpus ids are not those of {args.dataset}")
        emb_ids, emb = retrieval.load_embeddings(args.emb, "queries")
        row = {qid: i for i, qid in enumerate(emb_ids)}
        missing = [q for q in q_ids if q not in row]
        if missing:
            raise data.InputError(f"{args.emb}: no embedding for {len(missing)} qrels queries, e.g. {missing[0]!r}")
        q_emb, d_ids, shards, width = emb[[row[q] for q in q_ids]], docs.ids, (m[:, dim] for m in docs), emb.shape[1]
    else:
        model_name, d_ids = args.model, list(corpus)
        model = for_inference(args.model, device, args.dtype or ("bf16" if device.type == "cuda" else "fp32"))
        width = model.dim
    if (args.dim or 0) > width:  # before any encoding
        raise data.InputError(f"--dim {args.dim}: the embeddings have {width} dimensions")
    if not args.emb:
        shards = [model.encode([corpus[i] for i in d_ids], "doc", args.batch_size, "encode corpus")[:, dim]]
        q_emb = model.encode([queries[q] for q in q_ids], "query", args.batch_size)
    k = args.k + args.ignore_identical_ids  # one more, so that each query still gets k after dropping its own id
    if args.index == "Flat":
        scores, idx = retrieval.search(q_emb[:, dim], shards, k, device)
    else:
        scores, idx = retrieval.faiss_search(q_emb[:, dim], np.concatenate(list(shards)), k, args.index)
    run = retrieval.to_run(q_ids, d_ids, scores, idx, args.k, args.ignore_identical_ids)
    means, per_query = retrieval.evaluate_run(run, qrels)
    means["queries"] = len(qrels)
    print(f"{args.dataset}{' ' + args.split if args.split else ''} | {model_name} | {len(qrels)} queries, "
          f"{len(corpus)} docs")
    for m in ("ndcg@10", "recall@100", "mrr@10", "map", "ndcg@100", "recall@1000"):
        print(f"  {m:<12} {means[m]:.4f}")
    if args.out:
        data.atomic_write(os.path.join(args.out, "run.trec"), lambda f: f.writelines(
            f"{qid} Q0 {did} {rank} {s:.6f} biencoder\n" for qid, docs in run.items()
            for rank, (did, s) in enumerate(retrieval.ranked(docs), 1)))
        data.write_json(os.path.join(args.out, "metrics.json"), {
            "dataset": args.dataset, "split": args.split, "model": model_name, "index": args.index, "k": args.k,
            "dim": args.dim, **{m: round(v, 6) if isinstance(v, float) else v for m, v in means.items()},
            "per_query": per_query})
    return means

if __name__ == "__main__":
    data.run(main, parser)
