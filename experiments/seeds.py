"""The quality table over seeds: each argument is one row, a glob of evaluate.py --out folders (one
a seed); a row gets the mean and standard deviation over its seeds, and a paired t-test of its
per-query mean over seeds against the first row and against the row above it.
    python experiments/seeds.py runs/scifact/zeroshot/test 'runs/scifact/g4_*_lr1e-4_*_s[012]/test'
"""
import glob, json, os, sys
import numpy as np
from scipy.stats import ttest_rel

MEASURES = ("ndcg@10", "recall@100")

def load(pattern):
    folders = sorted(glob.glob(pattern))
    if not folders:
        sys.exit(f"{pattern}: no folder matches")
    runs = [json.load(open(os.path.join(f, "metrics.json")))["per_query"] for f in folders]
    queries = sorted(set.intersection(*(set(r) for r in runs)))
    # per measure: (seeds, queries)
    scores = {m: np.array([[r[q][m] for q in queries] for r in runs]) for m in MEASURES}
    return folders, scores, queries

def p_value(a, b):
    return ttest_rel(a, b).pvalue if np.any(a != b) else 1.0

rows = [load(p) for p in sys.argv[1:]]
columns = " | ".join(f"{m} mean ± std" for m in MEASURES)
print(f"| row | seeds | {columns} | nDCG@10 p vs first | vs above |")
print("|---|---|" + "---|" * (len(MEASURES) + 2))
for i, (folders, scores, queries) in enumerate(rows):
    cells = []
    for m in MEASURES:
        means = scores[m].mean(axis=1)  # one figure a seed
        std = means.std(ddof=1) if len(means) > 1 else 0.0
        cells.append(f"{means.mean():.4f} ± {std:.4f}")
    ps = []
    for j in (0, i - 1):
        _, other, other_queries = rows[j]
        if i == 0 or other_queries != queries:
            ps.append("" if i == 0 else "queries differ")
            continue
        p = p_value(scores["ndcg@10"].mean(0), other["ndcg@10"].mean(0))
        ps.append(f"{p:.2g}")
    print(f"| `{sys.argv[1 + i]}` | {len(folders)} | " + " | ".join(cells + ps) + " |")
