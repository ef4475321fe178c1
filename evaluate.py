"""Stage: a model (or encode.py's embeddings) + a dataset's qrels -> run file + metrics.

    # all-MiniLM-L6-v2: nDCG@10 = 0.6451
    python evaluate.py --dataset beir/scifact/test --dtype fp32
    # the same number from the BEIR folder
    python evaluate.py --dataset ../shared/data/scifact --split test
    python evaluate.py --model runs/ft/model --dataset beir/scifact/test --out runs/ft/eval
    # embeddings from encode.py
    python evaluate.py --emb runs/emb --dataset beir/scifact/test
    # approximate search through faiss
    python evaluate.py --emb runs/emb --index HNSW32 --ef_search 128
    # the first 64 dimensions (Matryoshka)
    python evaluate.py --model runs/mrl/model --dim 64
    # paired t-test between two --out folders
    python evaluate.py --compare runs/zeroshot runs/ft/eval

Exact cosine search by default (top --k documents a query, ties broken by corpus order), or a faiss
index; the metrics from pytrec_eval (graded qrels), the same code MTEB and BEIR use. Writes
out/run.trec (qid Q0 docid rank score tag) and out/metrics.json (every measure, per query too), and
prints a table.
"""
import os

import numpy as np

import cli
import data
import retrieval
from model import for_inference

parser = cli.parser(__doc__, model=None, dataset="beir/scifact/test", split=None, queries=None,
                    batch_size=None, dtype=None, device="auto", out=None, index=None,
                    nprobe=None, ef_search=None)
parser.add_argument("--emb",
                    help="An encode.py output folder to score, instead of encoding with --model.")
parser.add_argument("--k", type=cli.positive, default=1000, help="Documents retrieved a query.")
parser.add_argument("--dim", type=cli.positive,
                    help="Score the first DIM dimensions of each embedding only, re-normalised "
                         "(for a model trained with --mrl_dims).")
parser.add_argument("--ignore_identical_ids", action="store_true",
                    help="Drop a retrieved document whose id is the query's (as BEIR does for "
                         "Quora).")
parser.add_argument("--compare", nargs="+",
                    help="evaluate.py --out folders: each one's difference to the first, with a "
                         "paired t-test.")

OUT_FILES = ("run.trec", "metrics.json")  # what evaluate.py writes in --out

def compare(folders):
    """Differences of each run to the first, per measure, with a paired t-test over the common
    queries."""
    from scipy.stats import ttest_rel
    if len(folders) < 2:
        raise cli.InputError("--compare: give two or more evaluate.py --out folders")
    runs = {}
    for folder in folders:
        path = os.path.join(folder, "metrics.json")
        if not os.path.isfile(path):
            raise cli.InputError(f"{path}: file not found (is {folder} an evaluate.py --out "
                                 f"folder?)")
        runs[folder] = data.read_json(path)["per_query"]
    base_name = folders[0]
    base = runs[base_name]
    for name in folders[1:]:
        common = sorted(set(base) & set(runs[name]))
        if not common:
            raise cli.InputError(f"--compare: {name} and {base_name} have no query in common (runs "
                                 f"of other datasets or splits?)")
        print(f"{name} vs {base_name} ({len(common)} common queries)")
        for m in ("ndcg@10", "recall@100", "mrr@10", "map"):
            a = np.array([base[q][m] for q in common])
            b = np.array([runs[name][q][m] for q in common])
            p = ttest_rel(b, a).pvalue if np.any(a != b) else 1.0  # identical runs: nothing to test
            print(f"  {m:<11} {a.mean():.4f} -> {b.mean():.4f}  diff {b.mean() - a.mean():+.4f}  "
                  f"paired t-test p = {p:.3g}")

def score_encoding(args, corpus, queries, qrels, search_options):
    """evaluate.py --emb: the encoding's corpus a shard at a time, its vectors of the qrels'
    queries; both must be of the dataset's texts (fingerprints), and of one dimension."""
    docs = retrieval.Shards(args.emb, corpus, args.dataset)
    if docs.meta.get("queries") != retrieval.texts_fingerprint(queries):
        raise cli.InputError(f"{args.emb}: an encoding of other queries than {args.dataset}'s "
                             f"(other texts, or another split), or made before query encodings "
                             f"had fingerprints; encode again")
    retrieval.make_index(args.index, args.dim or docs.dim, len(docs.ids), args.nprobe,
                         args.ef_search)
    q_ids = sorted(qrels)
    if not os.path.isfile(os.path.join(args.emb, "queries.ids.txt")):
        raise cli.InputError(f"{args.emb}: an unfinished encoding (no query vectors yet); rerun "
                             f"the same encode.py command to finish it")
    emb_ids, emb = retrieval.load_embeddings(args.emb, "queries")
    if emb.shape[1] != docs.dim:
        raise cli.InputError(f"{args.emb}: query vectors of {emb.shape[1]} dimensions, documents "
                             f"of {docs.dim}; encode both with one model")
    row = {qid: i for i, qid in enumerate(emb_ids)}
    missing = [qid for qid in q_ids if qid not in row]
    if missing:
        raise cli.InputError(f"{args.emb}: no embedding for {len(missing)} qrels queries, "
                             f"e.g. {missing[0]!r}")
    if (args.dim or 0) > emb.shape[1]:
        raise cli.InputError(f"--dim {args.dim}: the embeddings have {emb.shape[1]} dimensions")
    q = emb[[row[qid] for qid in q_ids], :args.dim]
    shards = [m[:, :args.dim] for m in docs.mats]
    return retrieval.run_and_score(q_ids, q, docs.ids, shards, qrels, args.k,
                                   args.ignore_identical_ids, **search_options)

def write_outputs(args, run, means, per_query, model_name):
    def write_run(f):
        for qid, docs in run.items():
            for rank, (doc_id, score) in enumerate(retrieval.ranked(docs), 1):
                f.write(f"{qid} Q0 {doc_id} {rank} {score:.6f} biencoder\n")
    cli.atomic_write(os.path.join(args.out, "run.trec"), write_run)
    rounded = {m: round(v, 6) if isinstance(v, float) else v for m, v in means.items()}
    cli.write_json(os.path.join(args.out, "metrics.json"), {
        "dataset": args.dataset, "split": args.split, "model": model_name, "k": args.k,
        "index": args.index, "dim": args.dim, **rounded, "per_query": per_query})
    print(f"wrote {os.path.join(args.out, 'run.trec')} and metrics.json")

def main(args):
    if args.compare:  # the folders hold all it reads
        others = [a.dest for a in parser._actions if a.dest not in ("help", "compare")]
        cli.no_effect(args, parser, others, "with --compare")
        return compare(args.compare)
    if args.emb:  # the encoding's own model, dtype and batches made its vectors
        cli.no_effect(args, parser, ("model", "dtype", "batch_size"), "with --emb")
    # held until main returns: evaluate.py's files in --out, and nothing else there
    out = cli.claim(args.out, "evaluate.py", OUT_FILES) if args.out else None  # noqa: F841
    corpus, queries, qrels = data.load_dataset(args.dataset, args.split)
    if not qrels:
        raise cli.InputError(f"{args.dataset}: no qrels to evaluate against")
    if args.queries:
        qrels = {qid: qrels[qid] for qid in data.read_ids(args.queries, qrels)}
    device = cli.setup_device(args.device)[0]
    search_options = {"device": device, "index": args.index, "nprobe": args.nprobe,
                      "ef_search": args.ef_search}
    if args.emb:
        model_name = args.emb
        run, means, per_query = score_encoding(args, corpus, queries, qrels, search_options)
    else:
        model_name = args.model
        model = for_inference(args.model, device, cli.default_dtype(args.dtype, device))
        if (args.dim or 0) > model.dim:  # before any encoding
            raise cli.InputError(f"--dim {args.dim}: the model's embeddings have {model.dim} "
                                 f"dimensions")
        retrieval.make_index(args.index, args.dim or model.dim, len(corpus), args.nprobe,
                             args.ef_search)
        run, means, per_query = retrieval.evaluate_model(model, corpus, queries, qrels,
                                                         args.batch_size, args.k,
                                                         args.ignore_identical_ids, args.dim,
                                                         **search_options)
    means["queries"] = len(qrels)
    split = f" {args.split}" if args.split else ""
    print(f"{args.dataset}{split} | {model_name} | {len(qrels)} queries, {len(corpus)} docs")
    for m in ("ndcg@10", "recall@100", "mrr@10", "map", "ndcg@100", "recall@1000"):
        print(f"  {m:<12} {means[m]:.4f}")
    if args.out:
        write_outputs(args, run, means, per_query, model_name)
    return means

if __name__ == "__main__":
    cli.run(main, parser)
