"""Embeddings on disk, search over them, and the metrics: what encode.py, evaluate.py, mine.py and
train.py share.

Embeddings on disk (encode.py): `corpus.00000.npy` (n, D) + `corpus.00000.ids.txt` (n lines), one
pair a shard, `queries.npy` + `queries.ids.txt`, and `meta.json` (the settings, and the shards once
all are written).

Search is exact cosine top-k over the shards, a shard at a time, on the GPU when there is one (the
default), or through a faiss index (`--index HNSW32`, `IVF4096,Flat`, ...) for corpora where exact
search is too slow. The metrics come from pytrec_eval, as MTEB and BEIR compute them.
"""
import hashlib
import json
import os

import numpy as np
import torch
from tqdm import tqdm

import cli
import data
from cli import InputError

# -------------------------------------------------------------------------------------------- files

def save_embeddings(folder, name, ids, emb, store="fp16"):
    """folder/name.npy (N, D) and folder/name.ids.txt (N lines), each written atomically, the ids
    last: a shard is complete once its ids file exists."""
    emb = emb.astype(np.float16 if store == "fp16" else np.float32)
    cli.atomic_write(os.path.join(folder, f"{name}.npy"), lambda f: np.save(f, emb), mode="wb")
    cli.atomic_write(os.path.join(folder, f"{name}.ids.txt"),
                     lambda f: f.writelines(i + "\n" for i in ids))

def load_embeddings(folder, name, mmap=False):
    """(ids, matrix) of one file pair: float32, or as stored and memory-mapped. A missing or foreign
    file, or a count that is not the ids', is an InputError."""
    npy = os.path.join(folder, f"{name}.npy")
    txt = os.path.join(folder, f"{name}.ids.txt")
    try:
        emb = np.load(npy, allow_pickle=False, mmap_mode="r" if mmap else None)
        with open(txt, encoding="utf-8") as f:
            ids = f.read().splitlines()
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"{npy}: cannot read it ({e}); is {folder} an encode.py output "
                         f"folder?") from None
    if emb.ndim != 2 or emb.shape[0] != len(ids) or emb.dtype.kind != "f":
        raise InputError(f"{npy}: shape {emb.shape} ({emb.dtype}) does not match the {len(ids)} "
                         f"ids in {txt}")
    if not mmap:
        emb = emb.astype(np.float32)
    return ids, emb

def encode_corpus(model, corpus, folder, meta, shard_size, store="fp16", batch_size=None, rank=0,
                  world=1):
    """Embed corpus {id: text} into folder/corpus.NNNNN.npy + .ids.txt, shard_size documents a
    shard, rank r of W taking shards r, r+W, ... A shard whose files are there is kept, so a rerun
    of a killed encoding resumes and gives the files of an uninterrupted run. meta (the settings)
    must match the folder's meta.json, if it has one. -> the shards' names."""
    ids = list(corpus)
    names = shard_names(len(ids), shard_size)
    path = os.path.join(folder, "meta.json")
    meta = {**meta, "count": len(ids), "shard_size": shard_size, "store": store,
            "documents": texts_fingerprint(corpus)}
    if os.path.isfile(path):  # a shard is reused only when what made it is what makes this one
        old = data.read_json(path)
        changed = [key for key in meta if key not in PLACES and old.get(key) != meta[key]]
        if changed:
            key = changed[0]
            what = WHAT_CHANGED.get(key, f"with {key} {old.get(key)!r}, not {meta[key]!r}")
            raise InputError(f"{path}: this folder holds an encoding {what}; its vectors are not "
                             f"those of this run: give another folder, or delete this one")
    elif rank == 0:
        orphans = [n for n in files(names) if os.path.isfile(os.path.join(folder, n))]
        if orphans:  # shards whose meta.json is gone: nothing says what made them
            raise InputError(f"{folder}: {orphans[0]} and no meta.json that says what made it; "
                             f"delete the folder's corpus.* files, or give another folder")
        cli.write_json(path, meta)  # before any shard: a rerun can tell whose shards these are
    if rank == 0:  # every rank's shards are the script's, in the folder's record (cli.Claim)
        for name in files(names):
            cli.note_written(os.path.join(folder, name))
    todo = [s for s in range(rank, len(names), world)  # this rank's shards, those not yet written
            if not os.path.isfile(os.path.join(folder, f"{names[s]}.ids.txt"))]
    total = sum(len(ids[s * shard_size:(s + 1) * shard_size]) for s in todo)
    bar = tqdm(total=total, desc="encode corpus", unit="doc", disable=rank != 0, mininterval=2)
    for s in todo:
        part = ids[s * shard_size:(s + 1) * shard_size]
        emb = model.encode([corpus[i] for i in part], "doc", batch_size, bar)
        save_embeddings(folder, names[s], part, emb, store)
    bar.close()
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        cli.write_json(path, {**meta, "shards": names})
    return names

def shard_names(count, shard_size):
    """The names of the shards of count documents, shard_size a shard: corpus.00000, ..."""
    return [f"corpus.{s:05d}" for s in range((count + shard_size - 1) // shard_size)]

def files(names):
    """The files of embedding file pairs (save_embeddings): name.npy and name.ids.txt each."""
    return [name + ext for name in names for ext in (".npy", ".ids.txt")]

# Where an encoding's model and dataset came from: told, not compared (a path can be written two
# ways, the fingerprints say whether the weights and the documents are the same).
PLACES = ("model", "dataset", "split")
WHAT_CHANGED = {"model_fingerprint": "made by another model (other weights or settings)",
                "documents": "of other documents (the corpus changed since)",
                "queries": "of other queries (their texts changed since)"}

def fingerprint_update(h, tensor):
    h.update(str((tensor.dtype, tuple(tensor.shape))).encode())
    h.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())

def model_fingerprint(model):
    """A short hash of what makes a model's vectors: its settings and every weight (name, dtype,
    shape, bytes)."""
    h = hashlib.blake2b(json.dumps(model.settings, sort_keys=True).encode(), digest_size=8)
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        fingerprint_update(h, tensor)
    return h.hexdigest()

def texts_fingerprint(texts):
    """A short hash of {id: text} (a corpus, the queries): the ids and texts, in order (every text
    is read once)."""
    h = hashlib.blake2b(digest_size=8)
    for text_id in tqdm(texts, desc="fingerprint texts", unit="text", mininterval=2, disable=None):
        h.update(f"{text_id}\0{texts[text_id]}\n".encode())
    return h.hexdigest()

class Shards:
    """The corpus of an encode.py folder: its ids, and its vectors as memory-mapped matrices, one a
    shard (`mats`, for search), or by row (`rows`, e.g. the positives' vectors in mining)."""

    def __init__(self, folder, corpus, source, model=None):
        """The encoding in folder, which must be of exactly the documents of corpus (from source,
        named in the error), and, if a model is given, made by that model."""
        self.meta = data.read_json(os.path.join(folder, "meta.json"))
        if "shards" not in self.meta:
            raise InputError(f"{folder}: an unfinished encoding; rerun the same encode.py command "
                             f"to finish it")
        self.ids = []
        self.mats = []
        for name in self.meta["shards"]:
            ids, mat = load_embeddings(folder, name, mmap=True)
            self.ids += ids
            self.mats.append(mat)
        self.first = np.cumsum([0] + [len(m) for m in self.mats])  # the first row of each shard
        dims = {m.shape[1] for m in self.mats}
        if len(dims) > 1:
            raise InputError(f"{folder}: shards of {' and '.join(map(str, sorted(dims)))} "
                             f"dimensions; encode again into a new folder")
        self.dim = dims.pop()
        if self.meta.get("dim", self.dim) != self.dim:
            raise InputError(f"{folder}: shards of {self.dim} dimensions where its meta.json says "
                             f"{self.meta['dim']}; encode again into a new folder")
        # no set of millions of ids
        same = len(self.ids) == len(corpus) and all(i in corpus for i in self.ids)
        if not same:
            raise InputError(f"{folder}: an encoding of {self.meta['dataset']}'s documents, not of "
                             f"{source}'s")
        if self.meta.get("documents") != texts_fingerprint(corpus):
            raise InputError(f"{folder}: an encoding of other texts than {source}'s (the same ids, "
                             f"other documents), or made before encodings had fingerprints; encode "
                             f"again")
        if model is not None and self.meta.get("model_fingerprint") != model_fingerprint(model):
            raise InputError(f"{folder}: an encoding made by another model (other weights or "
                             f"settings) than {model.sources['doc']}; encode with it, or give its "
                             f"--model")

    def rows(self, rows):
        """The vectors of these rows (of all shards one after the other), float32 (len(rows), D)."""
        shard = np.searchsorted(self.first, rows, side="right") - 1
        vectors = [self.mats[s][r - self.first[s]] for s, r in zip(shard, rows)]
        return np.stack(vectors).astype(np.float32)

# ------------------------------------------------------------------------------------------- search

def unit(x):
    """Rows scaled to unit length, so that inner product is cosine (as MTEB scores)."""
    return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)

def search(q, shards, k, device="cpu", index=None, nprobe=None, ef_search=None):
    """Cosine top-k of queries q (Q, D) over shards, a list of (n_i, D) matrices (one in memory, or
    an encoding's memory-mapped shards) -> scores (Q, k) and rows (Q, k) of their concatenation, as
    numpy, best first (-1: no document). Exact on the device, or through the faiss index_factory
    string index."""
    if index is None:
        return exact_search(q, shards, k, device)
    return faiss_search(q, shards, k, index, nprobe, ef_search)

def score_keys(scores, first):
    """(r, n) float32 scores of columns first..first+n -> int64 keys that order by score, then by
    the lower column: top-k over them is exact and deterministic among ties. A float's bits, read as
    an integer, order like the float once negative ones have all but the sign bit flipped; the
    column fills the low 32 bits (complemented, so that a lower column is a larger key)."""
    bits = scores.contiguous().view(torch.int32).to(torch.int64)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    columns = torch.arange(first, first + scores.shape[1], device=scores.device)
    return (bits << 32) | (0xFFFFFFFF - columns)

def keys_to_scores(keys):
    """The inverse of score_keys: (scores, columns)."""
    bits = keys >> 32
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return bits.to(torch.int32).view(torch.float32), 0xFFFFFFFF - (keys & 0xFFFFFFFF)

@torch.inference_mode()
def exact_search(q, shards, k, device="cpu", rows=1024, cols=65536):
    """Exact cosine top-k, ties broken by the lower row. Memory: one shard, and the scores of a
    (rows, cols) block at a time. Scores are dot products in float64 rounded to float32: a float32
    matrix product rounds differently for different matrix shapes, and ties must not depend on how
    the corpus was cut into shards."""
    q = unit(torch.as_tensor(q).to(device, torch.float64))
    best = torch.empty(len(q), 0, dtype=torch.int64, device=device)  # the keys of the best so far
    first = 0  # the row of the current shard's first document
    for shard in tqdm(shards, desc="search", unit="shard", mininterval=2, disable=None):
        # a copy of a memory-mapped shard
        shard = torch.from_numpy(np.array(shard, dtype=np.float32))
        for c in range(0, len(shard), cols):
            d = unit(shard[c:c + cols].to(device, torch.float64))
            top = min(k, len(d))
            new = [score_keys((q[r:r + rows] @ d.T).float(), first + c).topk(top).values
                   for r in range(0, len(q), rows)]
            best = torch.cat([best, torch.cat(new)], 1)
            best = best.topk(min(k, best.shape[1])).values
        first += len(shard)
    scores, idx = keys_to_scores(best)
    return scores.cpu().numpy(), idx.cpu().numpy()

TRAIN_SAMPLE = 300_000  # vectors an IVF or PQ index learns from (faiss wants 39 to 256 a centroid)
TRIAL_SIZE = 20_000  # make_index tries an index out on this many vectors at most

def make_index(factory, dim, count, nprobe=None, ef_search=None):
    """An empty faiss index from an index_factory string, for count vectors of dim dimensions, with
    its search settings -> the index; what faiss would refuse only after the corpus is encoded (a
    string it cannot parse, more IVF clusters or PQ centroids than vectors to learn them from, a
    setting the index has not) is a one-line error now. The scripts call it before encoding; with
    no --index, --nprobe and --ef_search have no effect."""
    if factory is None:
        for flag, value in (("--nprobe", nprobe), ("--ef_search", ef_search)):
            if value is not None:
                raise InputError(f"{flag} has no effect without --index")
        return None
    import faiss  # imported here only (the GPU image has none)

    def refused(e):  # faiss's message ends with what went wrong, after where in its C++ it did
        reason = str(e).strip().splitlines()[-1].split(": ")[-1]
        return InputError(f"--index {factory!r}: faiss refused it ({reason})")
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise refused(e) from None
    learned = min(count, TRAIN_SAMPLE)  # the vectors an index that must learn learns from
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and ivf.nlist > learned:
        raise InputError(f"--index {factory!r}: {ivf.nlist} clusters for {count} documents; give "
                         f"at most IVF{max(1, learned // 39)} (faiss wants 39 or more a cluster)")
    pq = getattr(faiss.downcast_index(ivf if ivf is not None else index), "pq", None)
    if pq is not None and pq.ksub > learned:
        raise InputError(f"--index {factory!r}: {pq.ksub} centroids a PQ part for {count} "
                         f"documents; give fewer bits (e.g. PQ{pq.M}x4) or no PQ")
    # what faiss refuses for reasons of its own (an index it cannot fill, a part deep inside that
    # wants more training vectors): a trial on as many random unit vectors as it will learn from,
    # where that is cheap
    if learned <= TRIAL_SIZE:
        trial = faiss.clone_index(index)
        x = np.random.default_rng(0).standard_normal((learned, dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        try:
            if not trial.is_trained:
                trial.train(x)
            trial.add(x)
            trial.search(x[:1], 1)
        except RuntimeError as e:
            raise refused(e) from None
    space = faiss.ParameterSpace()
    for name, value, flag in (("nprobe", nprobe, "--nprobe"),
                              ("efSearch", ef_search, "--ef_search")):
        if value is None:
            continue
        try:
            space.set_index_parameter(index, name, value)
        except RuntimeError:
            raise InputError(f"{flag} {value}: the index {factory!r} has no such setting") from None
    return index

def faiss_search(q, shards, k, factory, nprobe=None, ef_search=None, seed=0):
    """Top-k by inner product of unit vectors through faiss: an index made from an index_factory
    string ("Flat": exact; "HNSW32": a graph; "IVF4096,Flat": 4096 clusters, --nprobe of them
    searched a query; "IVF4096,PQ64": compressed codes), trained where it must be on a seeded sample
    of the corpus, then filled a shard at a time."""
    def as_unit(m):
        return unit(torch.from_numpy(np.array(m, dtype=np.float32))).numpy()
    total = sum(len(m) for m in shards)
    index = make_index(factory, q.shape[1], total, nprobe, ef_search)
    if not index.is_trained:  # clusters (IVF) or codebooks (PQ) to learn from the corpus
        rng = np.random.default_rng(seed)
        sample = []
        for m in shards:  # each shard in proportion to its size
            size = round(len(m) * min(1.0, TRAIN_SAMPLE / total))
            sample.append(as_unit(m[np.sort(rng.choice(len(m), size, replace=False))]))
        index.train(np.concatenate(sample))
    for m in tqdm(shards, desc="index", unit="shard", mininterval=2, disable=None):
        index.add(as_unit(m))
    scores, idx = index.search(as_unit(q), k)
    return scores, idx

# ------------------------------------------------------------------------------------------ metrics

MEASURES = {"ndcg_cut.1,3,5,10,100,1000", "recall.1,3,5,10,20,50,100,200,500,1000", "map", "P.1,10"}
NAMES = {"ndcg_cut_": "ndcg@", "recall_": "recall@", "P_": "p@"}  # pytrec_eval's names -> ours

def ranked(docs):
    """[(doc_id, score)] by score, then by id: the one order used for truncation, MRR@10 and
    run.trec."""
    return sorted(docs.items(), key=lambda x: (-x[1], x[0]))

def to_run(q_ids, d_ids, scores, idx, k, ignore_identical_ids=False):
    """Search results -> run {qid: {doc_id: score}} of the top k each, without -1 padding and, if
    asked, without a document whose id equals the query's."""
    run = {}
    for qi, qid in enumerate(q_ids):
        found = {}
        for s, j in zip(scores[qi], idx[qi]):
            if j >= 0 and not (ignore_identical_ids and d_ids[j] == qid):
                found[d_ids[j]] = float(s)
        run[qid] = dict(ranked(found)[:k])
    return run

def rename(measure):
    for theirs, ours in NAMES.items():
        if measure.startswith(theirs):
            return measure.replace(theirs, ours)
    return measure

def evaluate_run(run, qrels):
    """run {qid: {docid: score}}, qrels {qid: {docid: grade}} -> ({measure: mean}, {qid: {measure:
    value}}). Means are over the queries of the qrels (a query with no retrieved document scores 0).
    """
    import pytrec_eval
    per_query = pytrec_eval.RelevanceEvaluator(qrels, MEASURES).evaluate(run)
    # MRR@10: the reciprocal rank of the first relevant document within the top 10 (0 if none)
    top10 = {qid: dict(ranked(docs)[:10]) for qid, docs in run.items()}
    for qid, m in pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10).items():
        per_query[qid]["mrr@10"] = m["recip_rank"]
    per_query = {qid: {rename(m): v for m, v in ms.items()} for qid, ms in per_query.items()}
    measures = sorted({m for ms in per_query.values() for m in ms})
    means = {m: sum(ms.get(m, 0.0) for ms in per_query.values()) / len(qrels) for m in measures}
    return means, per_query

def run_and_score(q_ids, q, d_ids, shards, qrels, k=1000, ignore_identical_ids=False,
                  **search_options):
    """Query vectors q (Q, D) against the corpus's shards -> (run of the top k, means, per query),
    as evaluate.py reports them. ignore_identical_ids drops a document whose id is the query's (some
    BEIR sets, e.g. Quora), one more being retrieved so that each query keeps k. search_options:
    search's device, index, nprobe, ef_search."""
    scores, idx = search(q, shards, k + ignore_identical_ids, **search_options)
    run = to_run(q_ids, d_ids, scores, idx, k, ignore_identical_ids)
    means, per_query = evaluate_run(run, qrels)
    return run, means, per_query

def evaluate_model(model, corpus, queries, qrels, batch_size=None, k=1000,
                   ignore_identical_ids=False, dim=None, **search_options):
    """Encode the corpus and the qrels' queries with model, keep the first dim dimensions (all when
    None), then run_and_score: evaluate.py --model, and train.py while training."""
    d_ids = list(corpus)
    q_ids = sorted(qrels)
    d = model.encode([corpus[i] for i in d_ids], "doc", batch_size, "encode corpus")[:, :dim]
    q = model.encode([queries[i] for i in q_ids], "query", batch_size)[:, :dim]
    search_options.setdefault("device", next(model.parameters()).device)
    return run_and_score(q_ids, q, d_ids, [d], qrels, k, ignore_identical_ids, **search_options)
