"""Peak memory and speed of encode.py and evaluate.py against the size of the corpus
(docs/results.md).

    python experiments/scale.py 50000 400000 2000000      # synthetic corpora of these sizes
    python experiments/scale.py 2000000 --keep runs/scale  # keep the corpus and its encoding
        # (then experiments/indexes.py compares faiss indexes on them)

Each corpus is a BEIR folder of random words (5-20 a document) with 1,000 queries, each made of
words of its one positive document; the model is a tiny random BERT (2 layers, 32 wide: its own
memory is not what is measured). encode.py runs with --shard_size 50000, then evaluate.py --emb over
its shards; each is a fresh process whose peak RSS and wall time are reported as one JSON line.
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import cli  # noqa: E402
from conftest import make_tiny_bert  # noqa: E402


def corpus(folder, n, queries=1000):
    """A BEIR folder (split test) of n random documents and queries made of their positives' words.
    """
    rng = random.Random(0)
    words = [f"w{i}" for i in range(5000)]
    positives = {rng.randrange(n): f"q{i}" for i in range(queries)}  # document -> its query
    query_texts = {}

    def documents():
        for i in range(n):
            text = rng.choices(words, k=rng.randint(5, 20))
            if i in positives:  # the query: 4 of its positive's words and 2 others
                query_texts[positives[i]] = rng.choices(text, k=4) + rng.choices(words, k=2)
            yield {"_id": f"d{i}", "text": " ".join(text)}
    os.makedirs(os.path.join(folder, "qrels"), exist_ok=True)
    cli.write_jsonl(os.path.join(folder, "corpus.jsonl"), documents())
    rows = [{"_id": qid, "text": " ".join(text)} for qid, text in sorted(query_texts.items())]
    cli.write_jsonl(os.path.join(folder, "queries.jsonl"), rows)
    qrels = "".join(f"{qid}\td{i}\t1\n" for i, qid in sorted(positives.items()))
    cli.atomic_write(os.path.join(folder, "qrels", "test.tsv"), lambda f: f.write(qrels))


# run a command in a fresh process and print its peak RSS in KiB (it is that process's only child)
WRAP = ("import resource, subprocess, sys; "
        "subprocess.run(sys.argv[1:], check=True, capture_output=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def measure(cmd):
    """A command's wall seconds and peak RSS in GB."""
    t0 = time.perf_counter()
    kib = subprocess.run([sys.executable, "-c", WRAP, *cmd], cwd=ROOT, check=True,
                         capture_output=True, text=True)
    return time.perf_counter() - t0, int(kib.stdout.split()[-1]) * 1024 / 1e9


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("sizes", nargs="+", type=int, help="Corpus sizes, in documents.")
    parser.add_argument("--keep", help="Write the corpora and encodings here (default: a temporary "
                                       "folder).")
    args = parser.parse_args()
    tmp = args.keep or tempfile.mkdtemp()
    os.makedirs(tmp, exist_ok=True)
    model = make_tiny_bert(os.path.join(tmp, "tiny"))
    for n in args.sizes:
        folder = os.path.join(tmp, f"c{n}")
        corpus(folder, n)
        flags = ["--model", model, "--dataset", folder, "--split", "test", "--device", "cpu"]
        seconds, rss = measure([sys.executable, "encode.py", *flags, "--shard_size", "50000",
                                "--out", folder + "_emb"])
        print(json.dumps({"docs": n, "encode_seconds": round(seconds, 1),
                          "docs_per_s": round(n / seconds), "encode_peak_gb": round(rss, 3)}),
              flush=True)
        seconds, rss = measure([sys.executable, "evaluate.py", "--emb", folder + "_emb",
                                "--dataset", folder, "--split", "test", "--device", "cpu"])
        print(json.dumps({"docs": n, "evaluate_seconds": round(seconds, 1),
                          "evaluate_peak_gb": round(rss, 3)}), flush=True)
