"""Search and score, shared by encode.py, evaluate.py, mine.py and train.py: the embedding files, exact top-k
search over them (a shard at a time, on the GPU when there is one), and the metrics, from pytrec_eval as MTEB and
BEIR compute them.

Embeddings on disk (encode.py): `corpus.00000.npy` (n, D) + `corpus.00000.ids.txt` (n lines), one pair a shard,
`queries.npy` + `queries.ids.txt`, and `meta.json` (the settings, and the shards once all are written).
"""
import os

import numpy as np
import torch
from tqdm import tqdm

import data

MEASURES = {"ndcg_cut.1,3,5,10,100,1000", "recall.1,3,5,10,20,50,100,200,500,1000", "map", "P.1,10"}

# ------------------------------------------------------------------------------------------------ files

def save_embeddings(folder, name, ids, emb, store="fp16"):
    """folder/name.npy (N, D) and folder/name.ids.txt (N lines), each written atomically, the ids last: a shard is
    complete once its ids file exists."""
    emb = emb.astype(np.float16 if store == "fp16" else np.float32)
    data.atomic_write(os.path.join(folder, f"{name}.npy"), lambda f: np.save(f, emb), mode="wb")
    data.atomic_write(os.path.join(folder, f"{name}.ids.txt"), lambda f: f.writelines(i + "\n" for i in ids))

def load_embeddings(folder, name, mmap=False):
    """(ids, matrix) of one file pair: float32, or as stored and memory-mapped. A missing or foreign file, or a
    count that is not the ids', is an InputError."""
    npy, txt = os.path.join(folder, f"{name}.npy"), os.path.join(folder, f"{name}.ids.txt")
    try:
        emb = np.load(npy, allow_pickle=False, mmap_mode="r" if mmap else None)
        with open(txt, encoding="utf-8") as f:
            ids = f.read().splitlines()
    except (ValueError, OSError, EOFError) as e:
        raise data.InputError(f"{npy}: cannot read it ({e}); is {folder} an encode.py output folder?") from None
    if emb.ndim != 2 or emb.shape[0] != len(ids) or emb.dtype.kind != "f":
        raise data.InputError(f"{npy}: shape {emb.shape} ({emb.dtype}) does not match the {len(ids)} ids in {txt}")
    return ids, emb if mmap else emb.astype(np.float32)

def encode_corpus(model, corpus, folder, meta, shard_size, store="fp16", batch_size=None, rank=0, world=1):
    """Embed corpus {id: text} into folder/corpus.NNNNN.npy + .ids.txt, shard_size documents a shard, rank r of
    W taking shards r, r+W, ... A shard whose files are there is kept, so a rerun of a killed encoding resumes and
    gives the files of an uninterrupted run. meta (the settings) must match the folder's meta.json, if any."""
    ids, path = list(corpus), os.path.join(folder, "meta.json")
    meta = {**meta, "count": len(ids), "shard_size": shard_size, "store": store}
    old = data.read_json(os.path.join(folder, "meta.json")) if os.path.isfile(path) else meta
    changed = [k for k in meta if old.get(k) != meta[k]]
    if changed:
        raise data.InputError(f"{path}: this folder holds an encoding with {changed[0]} {old.get(changed[0])!r}, "
                              f"not {meta[changed[0]]!r}; give another folder, or delete it")
    if rank == 0 and not os.path.isfile(path):
        data.write_json(path, meta)  # before any shard: a rerun can tell whose shards these are
    names = [f"corpus.{s:05d}" for s in range((len(ids) + shard_size - 1) // shard_size)]
    todo = [s for s in range(rank, len(names), world) if not os.path.isfile(f"{folder}/{names[s]}.ids.txt")]
    bar = tqdm(total=sum(len(ids[s * shard_size:(s + 1) * shard_size]) for s in todo), desc="encode corpus",
               unit="doc", disable=rank != 0, mininterval=2)
    for s in todo:
        part = ids[s * shard_size:(s + 1) * shard_size]
        save_embeddings(folder, names[s], part, model.encode([corpus[i] for i in part], "doc", batch_size, bar), store)
    bar.close()
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        data.write_json(path, {**meta, "shards": names})
    return names

class Shards:
    """The corpus of an encode.py folder: its ids and its vectors, memory-mapped; read a shard at a time by
    iterating (search), or by row (rows(), e.g. the positives' vectors in mining)."""

    def __init__(self, folder, corpus, source):
        """The encoding in folder, which must be of exactly the documents of corpus (from source, for the error)."""
        self.meta = data.read_json(os.path.join(folder, "meta.json"))
        if "shards" not in self.meta:
            raise data.InputError(f"{folder}: an unfinished encoding; rerun the same encode.py command to finish it")
        parts = [load_embeddings(folder, name, mmap=True) for name in self.meta["shards"]]
        self.ids, self.mats = [i for ids, _ in parts for i in ids], [m for _, m in parts]
        self.first = np.cumsum([0] + [len(m) for m in self.mats])  # the first row of each shard
        if len(self.ids) != len(corpus) or not all(map(corpus.__contains__, self.ids)):  # no set of millions of ids
            raise data.InputError(f"{folder}: an encoding of {self.meta['dataset']}'s documents, not of {source}'s")

    def __iter__(self):
        return (np.array(m, dtype=np.float32) for m in self.mats)  # each a copy in memory, one at a time

    def rows(self, rows):
        shard = np.searchsorted(self.first, rows, side="right") - 1
        return np.stack([self.mats[s][r - self.first[s]] for s, r in zip(shard, rows)]).astype(np.float32)

# ------------------------------------------------------------------------------------------------ search

def _keys(scores, first):
    """(r, n) float32 scores of columns first..first+n -> int64 keys that order by score, then by the lower column:
    top-k over them is exact and deterministic among ties. A float's bits, read as an integer, order like the
    float once negative ones have all but the sign bit flipped; the column fills the low 32 bits (complemented, so
    that a lower column is a larger key)."""
    b = scores.contiguous().view(torch.int32).to(torch.int64)
    b = torch.where(b < 0, b ^ 0x7FFFFFFF, b)
    return (b << 32) | (0xFFFFFFFF - torch.arange(first, first + scores.shape[1], device=scores.device))

def _unkeys(keys):
    """The inverse of _keys: (scores, columns)."""
    b = keys >> 32
    b = torch.where(b < 0, b ^ 0x7FFFFFFF, b)
    return b.to(torch.int32).view(torch.float32), 0xFFFFFFFF - (keys & 0xFFFFFFFF)

def unit(x):
    """Rows scaled to unit length, so that inner product is cosine (as MTEB scores)."""
    return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)

@torch.inference_mode()
def search(q, shards, k, device="cpu", rows=1024, cols=65536):
    """Exact cosine top-k: q (Q, D), shards an iterable of (n_i, D) matrices (one in-memory matrix, or the shards
    of an encoding loaded one at a time) -> scores (Q, k) and rows (Q, k) of their concatenation, as numpy, best
    first, ties broken by the lower row. Memory: one shard, and scores for a (rows, cols) block at a time.
    Scores are dot products in float64 rounded to float32: a float32 matrix product rounds differently for
    different matrix shapes, and ties must not depend on how the corpus was cut into shards."""
    q = unit(torch.as_tensor(q).to(device, torch.float64))
    best, first = torch.empty(len(q), 0, dtype=torch.int64, device=device), 0  # keys of the best so far
    for shard in tqdm(shards, desc="search", unit="shard", mininterval=2, disable=None):
        shard = torch.as_tensor(shard)
        for c in range(0, len(shard), cols):
            d = unit(shard[c:c + cols].to(device, torch.float64))
            new = [_keys((q[r:r + rows] @ d.T).float(), first + c).topk(min(k, len(d))).values
                   for r in range(0, len(q), rows)]
            best = torch.cat([best, torch.cat(new)], 1)
            best = best.topk(min(k, best.shape[1])).values
        first += len(shard)
    scores, idx = _unkeys(best)
    return scores.cpu().numpy(), idx.cpu().numpy()

# ------------------------------------------------------------------------------------------------ metrics

def ranked(docs):
    """[(doc_id, score)] by score, then by id: the one order used for truncation, MRR@10 and run.trec."""
    return sorted(docs.items(), key=lambda x: (-x[1], x[0]))

def to_run(q_ids, d_ids, scores, idx, k, ignore_identical_ids=False):
    """Search results -> run {qid: {doc_id: score}} of the top k each, without -1 padding and, if asked, without a
    document whose id equals the query's."""
    return {qid: dict(ranked({d_ids[j]: float(s) for s, j in zip(scores[qi], idx[qi])
                              if j >= 0 and not (ignore_identical_ids and d_ids[j] == qid)})[:k])
            for qi, qid in enumerate(q_ids)}

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
    return {m: sum(ms.get(m, 0.0) for ms in per_query.values()) / len(qrels) for m in measures}, per_query

def run_and_score(q_ids, q, d_ids, shards, qrels, k=1000, device="cpu", ignore_identical_ids=False):
    """Query vectors q (Q, D) against the corpus's shards (as search takes them) -> (run of the top k, means,
    per_query), as evaluate.py reports them. ignore_identical_ids drops a document whose id is the query's (some
    BEIR sets, e.g. Quora), one more being retrieved so that each query keeps k."""
    scores, idx = search(q, shards, k + ignore_identical_ids, device)
    run = to_run(q_ids, d_ids, scores, idx, k, ignore_identical_ids)
    return run, *evaluate_run(run, qrels)

def evaluate_model(model, corpus, queries, qrels, batch_size=None, k=1000, ignore_identical_ids=False):
    """Encode the corpus and the qrels' queries with model, then run_and_score: evaluate.py --model, and train.py
    while training."""
    d_ids, q_ids = list(corpus), sorted(qrels)
    d = model.encode([corpus[i] for i in d_ids], "doc", batch_size, "encode corpus")
    q = model.encode([queries[i] for i in q_ids], "query", batch_size)
    return run_and_score(q_ids, q, d_ids, [d], qrels, k, next(model.parameters()).device, ignore_identical_ids)
