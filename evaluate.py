"""Stage: a model (or encode.py's embeddings) + a dataset's qrels -> run file + metrics.

    python evaluate.py --dataset beir/scifact/test --dtype fp32          # all-MiniLM-L6-v2: nDCG@10 = 0.6451
    python evaluate.py --dataset ../shared/data/scifact --split test      # the same number from the BEIR folder
    python evaluate.py --model runs/ft/model --dataset beir/scifact/test --out runs/ft/eval
    python evaluate.py --emb runs/emb --dataset beir/scifact/test         # embeddings from encode.py

Exact inner-product search (faiss "Flat"; any index_factory string with --index), top --k documents a query,
ties broken by document id; metrics from pytrec_eval (graded qrels), the same code MTEB and BEIR use. Writes
out/run.trec (qid Q0 docid rank score tag) and out/metrics.json, and prints a table.
"""
import argparse
import gc
import json
import os

import numpy as np

import data

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
# what to evaluate
parser.add_argument("--model", default=None, help="Hugging Face folder or checkpoint out_dir/model "
                                                  "(default: bundled all-MiniLM-L6-v2)")
parser.add_argument("--emb", default=None, help="an encode.py output folder, instead of --model")
parser.add_argument("--dataset", default="beir/scifact/test", help="ir_datasets id, or a BEIR folder with --split")
parser.add_argument("--split", default=None, help="split of a BEIR folder (test, dev, train)")
parser.add_argument("--queries", default=None, help="file of query ids (one a line): evaluate only these, e.g. a dev "
                                                    "part carved from train")
# search
parser.add_argument("--index", default="Flat", help="faiss index_factory string (inner product); Flat = exact")
parser.add_argument("--k", type=int, default=1000, help="documents retrieved a query")
parser.add_argument("--dim", type=int, default=None, help="score the first DIM dimensions only, re-normalised "
                                                          "(Matryoshka)")
parser.add_argument("--ignore_identical_ids", action="store_true", help="drop a document whose id equals the "
                                                                        "query id (some BEIR sets, e.g. Quora)")
# encoding (with --model)
parser.add_argument("--batch_size", type=int, default=None, help="texts per forward pass when encoding (default "
                                                                "32 on CPU, 256 on GPU)")
parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast dtype of the encoder")
parser.add_argument("--device", default="auto", help="cuda, cpu or auto")
parser.add_argument("--seed", type=int, default=0, help="unused (evaluation is deterministic); kept for symmetry")
# output
parser.add_argument("--out", default=None, help="output folder for run.trec and metrics.json (default: print only)")
parser.add_argument("--tag", default="biencoder", help="the run's name in run.trec")
parser.add_argument("--compare", nargs="+", default=None, help="evaluate.py output folders: per-measure differences "
                                                               "to the first, paired t-test over queries, and their "
                                                               "recall@k curves on one plot (in --out); no encoding")

MEASURES = {"ndcg_cut.1,3,5,10,100,1000", "recall.1,3,5,10,20,50,100,200,500,1000", "map", "P.1,10"}


def search(q_emb, d_emb, k, index="Flat"):
    """Top-k documents for each query by cosine similarity -> (scores (Q, k), indices (Q, k)), ties broken by
    document index. Embeddings are L2-normalised first, so inner product is cosine (as MTEB scores)."""
    import faiss
    d_emb = np.ascontiguousarray(unit(d_emb), dtype=np.float32)
    q_emb = unit(q_emb)
    k = min(k, d_emb.shape[0])
    idx = faiss.index_factory(d_emb.shape[1], index, faiss.METRIC_INNER_PRODUCT)
    if not idx.is_trained:
        idx.train(d_emb)
    idx.add(d_emb)
    scores, ids = idx.search(np.ascontiguousarray(q_emb, dtype=np.float32), k)
    order = np.lexsort((ids, -scores), axis=1)  # by score, then by index: deterministic among ties
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def unit(emb):
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def truncate(emb, dim):
    """Matryoshka: keep the first dim dimensions and re-normalise."""
    return unit(emb[:, :dim])


def ranked(docs):
    """[(doc_id, score)] by score, then by id: the one order used for truncation, MRR@10, recall@k and run.trec."""
    return sorted(docs.items(), key=lambda x: (-x[1], x[0]))


def evaluate_run(run, qrels):
    """run {qid: {docid: score}}, qrels {qid: {docid: grade}} -> ({measure: mean}, {qid: {measure: value}}).
    Means are over the queries of the qrels (a query with no retrieved document scores 0)."""
    import pytrec_eval
    per_query = pytrec_eval.RelevanceEvaluator(qrels, MEASURES).evaluate(run)
    # MRR@10: reciprocal rank of the first relevant document within the top 10 (0 if none)
    top10 = {qid: dict(ranked(docs)[:10]) for qid, docs in run.items()}
    for qid, m in pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10).items():
        per_query[qid]["mrr_10"] = m["recip_rank"]
    names = {"ndcg_cut_": "ndcg@", "recall_": "recall@", "P_": "p@", "mrr_10": "mrr@10"}
    rename = lambda m: next((m.replace(a, b) for a, b in names.items() if m.startswith(a)), m)
    per_query = {qid: {rename(m): v for m, v in ms.items()} for qid, ms in per_query.items()}
    measures = sorted({m for ms in per_query.values() for m in ms})
    n = len(qrels)
    means = {m: sum(ms.get(m, 0.0) for ms in per_query.values()) / n for m in measures}
    return means, per_query


def recall_curve(run, qrels, k):
    """Mean recall@k for k = 1..k over the qrels' queries (relevant: grade > 0, as pytrec_eval's recall)."""
    curve = np.zeros(k)
    for qid, docs in qrels.items():
        relevant = {d for d, g in docs.items() if g > 0}
        top = [d for d, _ in ranked(run.get(qid, {}))[:k]]
        hits = np.cumsum([d in relevant for d in top] + [0] * (k - len(top)))
        curve += hits / max(1, len(relevant))
    return curve / len(qrels)


def plot_recall(curves, png):
    """recall@k for k = 1..1000 (log x axis), one line a run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ax.plot(np.arange(1, len(curve) + 1), curve, label=name)
    ax.set(xscale="log", xlabel="k", ylabel="recall@k", ylim=(0, 1))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    data.atomic_write(png, lambda f: fig.savefig(f, format="png", dpi=110), mode="wb")
    plt.close(fig)


def compare(folders, out):
    """Differences of each run to the first, per measure, with a paired t-test over the common queries."""
    from scipy.stats import ttest_rel
    runs = {}
    for folder in folders:
        path = os.path.join(folder, "metrics.json")
        if not os.path.isfile(path):
            raise data.InputError(f"{path}: file not found (is {folder} an evaluate.py --out folder?)")
        with open(path) as f:
            runs[folder] = json.load(f)
    base_name, base = folders[0], runs[folders[0]]
    for name in folders[1:]:
        other = runs[name]
        common = sorted(set(base["per_query"]) & set(other["per_query"]))
        print(f"{name} vs {base_name} ({len(common)} common queries)")
        for m in ("ndcg@10", "recall@100", "mrr@10", "map"):
            a = np.array([base["per_query"][q][m] for q in common])
            b = np.array([other["per_query"][q][m] for q in common])
            p = ttest_rel(b, a).pvalue if np.any(a != b) else 1.0
            print(f"  {m:<11} {a.mean():.4f} -> {b.mean():.4f}  diff {b.mean() - a.mean():+.4f}  paired t-test p = {p:.3g}")
    if out:
        plot_recall({name: r["recall_curve"] for name, r in runs.items()}, os.path.join(out, "recall_at_k.png"))


def build_run(q_ids, d_ids, scores, idx, ignore_identical_ids=False):
    run = {}
    for qi, qid in enumerate(q_ids):
        run[qid] = {d_ids[j]: float(s) for s, j in zip(scores[qi], idx[qi]) if j >= 0
                    and not (ignore_identical_ids and d_ids[j] == qid)}
    return run


def write_trec(path, run, tag):
    def write(f):
        for qid, docs in run.items():
            for rank, (did, s) in enumerate(ranked(docs), 1):
                f.write(f"{qid} Q0 {did} {rank} {s:.6f} {tag}\n")
    data.atomic_write(path, write)


def main(args):
    if args.compare:
        return compare(args.compare, args.out)
    corpus, queries, qrels = data.load_dataset(args.dataset, args.split)
    if not qrels:
        raise data.InputError(f"{args.dataset}: no qrels to evaluate against")
    if args.queries:
        qrels = {q: qrels[q] for q in data.read_ids(args.queries, qrels)}
        queries = {q: queries[q] for q in qrels}
    if args.emb:
        from encode import load_embeddings
        d_ids, d_emb = load_embeddings(args.emb, "corpus")
        q_ids, q_emb = load_embeddings(args.emb, "queries")
        if set(d_ids) != set(corpus):
            raise data.InputError(f"{args.emb}: its corpus ids are not those of {args.dataset}")
        model_name = args.emb
    else:
        from encode import encode_texts
        from model import default_model, for_inference, pick_device
        model_name = args.model or default_model()
        device = pick_device(args.device)
        model = for_inference(model_name, device, args.dtype)
        d_ids, q_ids = list(corpus), list(queries)
        d_emb = encode_texts(model, [corpus[i] for i in d_ids], "doc", args.batch_size, args.dtype, device)
        q_emb = encode_texts(model, [queries[i] for i in q_ids], "query", args.batch_size, args.dtype, device)
    missing = set(qrels) - set(q_ids)
    if missing:
        raise data.InputError(f"no embedding for {len(missing)} qrels queries, e.g. {sorted(missing)[0]!r}")
    if args.dim:
        d_emb, q_emb = truncate(d_emb, args.dim), truncate(q_emb, args.dim)
    # ask for one more when identical ids are dropped, so each query still gets k documents
    scores, idx = search(q_emb, d_emb, args.k + args.ignore_identical_ids, args.index)
    run = build_run(q_ids, d_ids, scores, idx, args.ignore_identical_ids)
    run = {qid: dict(ranked(docs)[:args.k]) for qid, docs in run.items()}
    run = {qid: docs for qid, docs in run.items() if qid in qrels}
    means, per_query = evaluate_run(run, qrels)
    means["queries"] = len(qrels)
    print(f"{args.dataset}{' ' + args.split if args.split else ''} | {model_name} | {len(qrels)} queries, "
          f"{len(corpus)} docs")
    for m in ("ndcg@10", "recall@100", "mrr@10", "map", "ndcg@100", "recall@1000"):
        print(f"  {m:<12} {means[m]:.4f}")
    curve = recall_curve(run, qrels, args.k)
    if args.out:
        write_trec(os.path.join(args.out, "run.trec"), run, args.tag)
        data.write_json(os.path.join(args.out, "metrics.json"), {
            "dataset": args.dataset, "split": args.split, "model": model_name, "index": args.index, "k": args.k,
            "dim": args.dim, **{m: round(v, 6) if isinstance(v, float) else v for m, v in means.items()},
            "recall_curve": curve.round(6).tolist(), "per_query": per_query})
        plot_recall({model_name: curve}, os.path.join(args.out, "recall_at_k.png"))
    return means


if __name__ == "__main__":
    main(parser.parse_args())
    gc.freeze()  # the exit then skips a collection over every object torch and transformers made: 1.2 s
