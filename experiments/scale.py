"""Peak memory and speed of encode.py and evaluate.py against the size of the corpus (docs/speed.md, scale).

    python experiments/scale.py 50000 400000 2000000      # synthetic corpora of these sizes, tiny random BERT

Each corpus is a BEIR folder of random words (5-20 a document), 1,000 queries with one positive each. encode.py
runs with --shard_size 50000, then evaluate.py --emb over its shards; each is a fresh process whose peak RSS
(/proc's VmHWM, through `resource`) and wall time are reported as one JSON line.
"""
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
import data  # noqa: E402
from conftest import make_tiny_bert  # noqa: E402


def corpus(folder, n):
    rng, words = random.Random(0), [f"w{i}" for i in range(5000)]
    os.makedirs(os.path.join(folder, "qrels"), exist_ok=True)
    data.write_jsonl(os.path.join(folder, "corpus.jsonl"), ({"_id": f"d{i}", "text": " ".join(
        rng.choices(words, k=rng.randint(5, 20)))} for i in range(n)))
    data.write_jsonl(os.path.join(folder, "queries.jsonl"), [{"_id": f"q{i}", "text": " ".join(
        rng.choices(words, k=6))} for i in range(1000)])
    data.atomic_write(os.path.join(folder, "qrels", "test.tsv"), lambda f: f.writelines(
        f"q{i}\td{rng.randrange(n)}\t1\n" for i in range(1000)))


WRAP = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def measure(cmd):
    """A command's wall seconds and peak RSS in GB, measured by a fresh wrapper process that has no other child."""
    t0 = time.perf_counter()
    kib = subprocess.run([sys.executable, "-c", WRAP, *cmd], cwd=ROOT, check=True, capture_output=True, text=True)
    return time.perf_counter() - t0, int(kib.stdout.split()[-1]) * 1024 / 1e9


if __name__ == "__main__":
    tmp = tempfile.mkdtemp()
    model = make_tiny_bert(os.path.join(tmp, "tiny"))
    for n in map(int, sys.argv[1:]):
        folder = os.path.join(tmp, f"c{n}")
        corpus(folder, n)
        flags = ["--model", model, "--dataset", folder, "--split", "test", "--device", "cpu"]
        seconds, rss = measure([sys.executable, "encode.py", *flags, "--shard_size", "50000", "--out", folder + "_emb"])
        print(json.dumps({"docs": n, "encode_seconds": round(seconds, 1), "docs_per_s": round(n / seconds),
                          "encode_peak_gb": round(rss, 3)}), flush=True)
        seconds, rss = measure([sys.executable, "evaluate.py", "--emb", folder + "_emb", "--dataset", folder, "--split",
                                "test", "--device", "cpu"])
        print(json.dumps({"docs": n, "evaluate_seconds": round(seconds, 1), "evaluate_peak_gb": round(rss, 3)}),
              flush=True)
