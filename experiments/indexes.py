"""faiss indexes against exact search on one encoding (docs/results.md): for each index, evaluate.py
--emb --index's wall time and peak RSS (a fresh process each), nDCG@10 and Recall@100, and the share
of exact search's top 10 it finds.

    python encode.py --dataset beir/scifact/test --store fp32 --out runs/sf_emb
    python experiments/indexes.py --emb runs/sf_emb --dataset beir/scifact/test \\
        Flat HNSW32 "HNSW32 ef_search=128" IVF64,Flat "IVF64,Flat nprobe=8" "IVF64,PQ64 nprobe=8"

Each index is a faiss index_factory string, optionally followed by nprobe=N and ef_search=N; "exact"
(the default search, run first) is the reference.
"""
import argparse
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scale import measure  # noqa: E402


def top10(folder):
    """{qid: the set of its 10 best documents} from evaluate.py's run.trec."""
    best = {}
    with open(os.path.join(folder, "run.trec")) as f:
        for line in f:
            qid, _, doc_id, rank, _, _ = line.split()
            if int(rank) <= 10:
                best.setdefault(qid, set()).add(doc_id)
    return best


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--emb", required=True, help="An encode.py output folder.")
    parser.add_argument("--dataset", required=True, help="Its dataset.")
    parser.add_argument("--split", help="The split of a BEIR folder.")
    parser.add_argument("indexes", nargs="+", help="Index specs: FACTORY [nprobe=N] [ef_search=N].")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp()
    base = [sys.executable, "evaluate.py", "--emb", args.emb, "--dataset", args.dataset,
            "--k", "100", "--device", "cpu"]
    if args.split:
        base += ["--split", args.split]
    exact = None
    for n, spec in enumerate(["exact"] + args.indexes):
        factory, *options = spec.split()
        flags = [] if factory == "exact" else ["--index", factory]
        for option in options:
            name, value = option.split("=")
            flags += [f"--{name}", value]
        out = os.path.join(tmp, str(n))
        seconds, rss = measure(base + flags + ["--out", out])
        with open(os.path.join(out, "metrics.json")) as f:
            metrics = json.load(f)
        found = top10(out)
        exact = exact or found
        same = sum(len(found.get(q, set()) & exact[q]) for q in exact)
        overlap = same / sum(len(docs) for docs in exact.values())
        print(json.dumps({"index": spec, "seconds": round(seconds, 1), "peak_gb": round(rss, 3),
                          "ndcg@10": round(metrics["ndcg@10"], 4),
                          "recall@100": round(metrics["recall@100"], 4),
                          "exact_top10_found": round(overlap, 4)}), flush=True)
