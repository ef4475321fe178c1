"""Stage: a model (or encode.py's embeddings) + a dataset's qrels -> run file + metrics.

    python evaluate.py --dataset beir/scifact/test --dtype fp32          # all-MiniLM-L6-v2: nDCG@10 = 0.6451
    python evaluate.py --dataset ../shared/data/scifact --split test      # the same number from the BEIR folder
    python evaluate.py --model runs/ft/model --dataset beir/scifact/test --out runs/ft/eval
    python evaluate.py --emb runs/emb --dataset beir/scifact/test         # embeddings from encode.py
    python evaluate.py --compare runs/zeroshot runs/ft/eval               # paired t-test between two --out folders

Exact cosine search (top --k documents a query, ties broken by corpus order), metrics from pytrec_eval (graded
qrels), the same code MTEB and BEIR use. Writes out/run.trec
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
parser.add_argument("--k", type=data.positive, default=1000, help="documents retrieved a query")
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
    device = setup(args.device)[0]
    if args.emb:  # an encode.py folder: the corpus a shard at a time, the queries the qrels name
        docs, model_name, q_ids = retrieval.Shards(args.emb, corpus, args.dataset), args.emb, sorted(qrels)
        emb_ids, emb = retrieval.load_embeddings(args.emb, "queries")
        row = {qid: i for i, qid in enumerate(emb_ids)}
        missing = [q for q in q_ids if q not in row]
        if missing:
            raise data.InputError(f"{args.emb}: no embedding for {len(missing)} qrels queries, e.g. {missing[0]!r}")
        run, means, per_query = retrieval.run_and_score(q_ids, emb[[row[q] for q in q_ids]], docs.ids, docs, qrels,
                                                        args.k, device, args.ignore_identical_ids)
    else:
        model_name = args.model
        model = for_inference(args.model, device, args.dtype or ("bf16" if device.type == "cuda" else "fp32"))
        run, means, per_query = retrieval.evaluate_model(model, corpus, queries, qrels, args.batch_size, args.k,
                                                         args.ignore_identical_ids)
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
            "dataset": args.dataset, "split": args.split, "model": model_name, "k": args.k,
            **{m: round(v, 6) if isinstance(v, float) else v for m, v in means.items()}, "per_query": per_query})
    return means

if __name__ == "__main__":
    data.run(main, parser)
