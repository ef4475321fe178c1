"""Readers and writers of the files passed between stages, and train-group sampling.

Datasets come from an ir_datasets id (`beir/scifact/test`) or a BEIR folder plus a split
(`../shared/data/scifact` + `test`); both give the same dicts:
    corpus  {doc_id: text}      text = (title + " " + text).strip(), the BEIR/MTEB convention
    queries {query_id: text}
    qrels   {query_id: {doc_id: grade}}

Train data is FlagEmbedding's jsonl, one query a line:
    {"query": str, "pos": [str], "neg": [str], "qid"?, "pos_ids"?, "neg_ids"?, "pos_scores"?, "neg_scores"?, "prompt"?}

Bad input raises InputError, a ValueError that names the file and line; scripts print it as one line, no
traceback (see the excepthook at the bottom).
"""
import hashlib
import json
import os
import random
import sys
import tempfile


class InputError(ValueError):
    """Bad user input (file, line, id). Printed as one line by the scripts, no traceback."""


# ---------------------------------------------------------------------------------------------- atomic writes

def atomic_write(path, write_fn, mode="w"):
    """Write a file through a temporary name in the same folder, fsync, then rename: a reader (or a resumed run)
    never sees half a file, even after kill -9. write_fn(f) writes the content."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are meant to be shared
    try:
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2) + "\n"))


def write_jsonl(path, rows):
    atomic_write(path, lambda f: f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path):
    """Yield (line number, dict) for each non-empty line; a malformed line raises InputError naming it."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: file not found")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            yield n, row


# ---------------------------------------------------------------------------------------------- datasets

def load_dataset(ref, split=None):
    """(corpus, queries, qrels) of a BEIR folder + split, or of an ir_datasets id (split is then part of the id).
    Only the queries that the qrels name are kept (all queries when the split has no qrels)."""
    if os.path.isdir(ref):
        corpus, queries, qrels = _load_beir_folder(ref, split)
    else:
        if split:
            raise InputError(f"--split {split} only applies to a BEIR folder; put the split in the ir_datasets id "
                             f"(e.g. beir/scifact/{split})")
        corpus, queries, qrels = _load_ir_datasets(ref)
    for qid, docs in qrels.items():
        if qid not in queries:
            raise InputError(f"{ref}: qrels name query id {qid!r}, which is not among its queries")
        for did in docs:
            if did not in corpus:
                raise InputError(f"{ref}: qrels of query {qid!r} name document id {did!r}, which is not in the corpus")
    if qrels:
        queries = {qid: text for qid, text in queries.items() if qid in qrels}
    return corpus, queries, qrels


def read_ids(path, known):
    """Sorted query ids from a file (one a line), each of which must be in `known` (e.g. the qrels)."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: file not found")
    ids = set()
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip() and line.strip() not in known:
                raise InputError(f"{path}:{n}: query id {line.strip()!r} is not in the dataset's qrels")
            ids.add(line.strip())
    return sorted(ids - {""})


def _doc_text(title, text):
    return ((title or "") + " " + (text or "")).strip()


def _load_beir_folder(folder, split):
    if not split:
        raise InputError(f"{folder}: a BEIR folder needs --split (e.g. test)")
    corpus, queries = {}, {}
    path = os.path.join(folder, "corpus.jsonl")
    for n, row in read_jsonl(path):
        if "_id" not in row:
            raise InputError(f"{path}:{n}: missing '_id'")
        corpus[str(row["_id"])] = _doc_text(row.get("title"), row.get("text"))
        if not corpus[str(row["_id"])]:
            raise InputError(f"{path}:{n}: document {row['_id']!r} has empty title and text")
    path = os.path.join(folder, "queries.jsonl")
    for n, row in read_jsonl(path):
        if "_id" not in row or not str(row.get("text", "")).strip():
            raise InputError(f"{path}:{n}: a query needs '_id' and a non-empty 'text'")
        queries[str(row["_id"])] = row["text"].strip()
    return corpus, queries, read_qrels(os.path.join(folder, "qrels", f"{split}.tsv"))


def read_qrels(path):
    """BEIR qrels tsv (`query-id corpus-id score`, header optional) or TREC qrels (`qid 0 docid grade`)."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: file not found")
    qrels = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            cols = line.split()
            if not cols or (n == 1 and cols[0] == "query-id"):
                continue
            if len(cols) not in (3, 4):
                raise InputError(f"{path}:{n}: expected 'query-id corpus-id score', got {line.strip()!r}")
            qid, did, grade = cols[0], cols[-2], cols[-1]
            try:
                qrels.setdefault(qid, {})[did] = int(grade)
            except ValueError:
                raise InputError(f"{path}:{n}: relevance grade {grade!r} is not an integer") from None
    return qrels


def _load_ir_datasets(dataset_id):
    import ir_datasets
    try:
        ds = ir_datasets.load(dataset_id)
    except KeyError:
        raise InputError(f"{dataset_id!r} is neither a folder nor a dataset id that ir_datasets knows "
                         f"(e.g. beir/scifact/test)") from None
    corpus = {d.doc_id: _doc_text(getattr(d, "title", ""), d.text) for d in ds.docs_iter()}
    queries = {q.query_id: q.text.strip() for q in ds.queries_iter()}
    qrels = {}
    if ds.has_qrels():
        for r in ds.qrels_iter():
            qrels.setdefault(r.query_id, {})[r.doc_id] = int(r.relevance)
    return corpus, queries, qrels


# ---------------------------------------------------------------------------------------------- train data

def read_train_jsonl(path):
    """FlagEmbedding-format train examples, validated. Returns a list of dicts."""
    examples = []
    for n, row in read_jsonl(path):
        for key in ("query", "pos"):
            if key not in row:
                raise InputError(f"{path}:{n}: missing {key!r}")
        row.setdefault("neg", [])
        if not isinstance(row["query"], str) or not row["query"].strip():
            raise InputError(f"{path}:{n}: 'query' must be a non-empty string")
        for key in ("pos", "neg"):
            texts = row[key]
            if not isinstance(texts, list) or not all(isinstance(t, str) and t.strip() for t in texts):
                raise InputError(f"{path}:{n}: {key!r} must be a list of non-empty strings")
            for extra in (f"{key}_ids", f"{key}_scores"):
                if extra in row and (not isinstance(row[extra], list) or len(row[extra]) != len(texts)):
                    raise InputError(f"{path}:{n}: {extra!r} must be a list as long as {key!r} ({len(texts)})")
            if f"{key}_ids" in row:
                row[f"{key}_ids"] = [str(i) for i in row[f"{key}_ids"]]  # 123 and "123" are the same id
        if not row["pos"]:
            raise InputError(f"{path}:{n}: 'pos' is empty")
        examples.append(row)
    if not examples:
        raise InputError(f"{path}: no examples")
    return examples


def examples_from_qrels(corpus, queries, qrels):
    """Train examples from a dataset's qrels: every document with grade > 0 is a positive; no negatives
    (training then uses in-batch negatives only)."""
    examples = []
    for qid in sorted(qrels):
        pos = [did for did, grade in sorted(qrels[qid].items()) if grade > 0]
        if pos:
            examples.append({"qid": qid, "query": queries[qid], "pos": [corpus[d] for d in pos], "pos_ids": pos,
                             "neg": [], "neg_ids": []})
    return examples


def text_key(s):
    """A stable 63-bit integer key for an id or a text (Python's hash() changes between processes)."""
    return int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def doc_keys(ex, kind, use_ids):
    """Keys of an example's positives or negatives: hashes of the ids when the data has them, else of the texts."""
    return [text_key(s) for s in (ex.get(f"{kind}_ids", []) if use_ids else ex[kind])]


def sample_group(ex, group_size, seed, epoch, index):
    """One positive and group_size - 1 negatives for example `index` in `epoch`, drawn from (seed, epoch, index)
    alone, so a run is reproducible and a resumed run draws the same groups. Returns indices into ex["pos"]
    and ex["neg"]; negatives repeat when there are too few."""
    rng = random.Random(f"{seed}/{epoch}/{index}")
    pos = rng.randrange(len(ex["pos"]))
    k = group_size - 1
    negs = ex["neg"]
    if k == 0:
        return pos, []
    if not negs:
        raise InputError(f"query {ex.get('qid', ex['query'][:40])!r} has no negatives but --group_size is "
                         f"{group_size}; mine negatives with mine.py or use --group_size 1")
    if len(negs) >= k:
        return pos, rng.sample(range(len(negs)), k)
    return pos, [rng.randrange(len(negs)) for _ in range(k)]


def epoch_order(n, seed, epoch):
    """The order of the n examples in an epoch: a permutation from (seed, epoch)."""
    order = list(range(n))
    random.Random(f"{seed}/order/{epoch}").shuffle(order)
    return order


# ---------------------------------------------------------------------------------------------- errors

def _excepthook(kind, value, tb):
    """Bad user input (ValueError, InputError among them, per DESIGN.md) is the user's to fix, not a bug of ours:
    one line, no traceback, exit status 1."""
    if issubclass(kind, ValueError):
        print(f"error: {value}", file=sys.stderr)
    else:
        sys.__excepthook__(kind, value, tb)


sys.excepthook = _excepthook
