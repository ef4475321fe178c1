"""What the stages read: datasets (ir_datasets ids and BEIR folders), their corpus, queries and
qrels, and train data in FlagEmbedding's jsonl, every line checked.

Datasets come from an ir_datasets id (`beir/scifact/test`) or a BEIR folder plus a split
(`../shared/data/scifact` + `test`); both give the same three mappings:
    corpus  {doc_id: text}      text = (title + " " + text).strip(), the BEIR/MTEB convention
    queries {query_id: text}
    qrels   {query_id: {doc_id: grade}}

Train data is FlagEmbedding's jsonl, one query a line:
    {"query": str, "pos": [str], "neg": [str]}
plus, optionally, "qid", "pos_ids", "neg_ids", "pos_scores", "neg_scores" and "prompt".

A malformed line, an unknown id or a missing file raises cli.InputError naming the file and line (or
id).
"""
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import unicodedata
import zipfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

from cli import InputError, atomic_write

# --------------------------------------------------------------------------------------- text files

def text_problem(text):
    """What is wrong with a text a stage reads (a document, a query, a train line's query, positive
    or negative), or None: it must be a string of valid Unicode (no lone surrogate: half an emoji,
    which JSON's \\ud83d escapes can give) that is not empty once spaces and invisible characters
    (zero-width spaces, byte-order marks, control characters) are taken away."""
    if not isinstance(text, str):
        return f"a string, not {json.dumps(text)[:40]}"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "valid Unicode (it holds a lone surrogate, half of a character)"
    visible = [c for c in text if not invisible(c)]
    if not visible:
        return "a non-empty text (it is empty, or only spaces and invisible characters)"
    return None

# Characters that show nothing and that tokenizers drop or map to [UNK]: Unicode's fillers and blank
# signs (the rest of its default-ignorable code points are categories Cf and Mn)
FILLERS = {"\u115f", "\u1160", "\u3164", "\uffa0", "\u2800"}

def invisible(c):
    """Whether a character shows nothing alone: spaces, control and format characters (zero-width
    spaces, byte-order marks), combining marks (variation selectors), fillers."""
    return c.isspace() or unicodedata.category(c) in ("Cc", "Cf", "Mn", "Me") or c in FILLERS

def check_text(text, where):
    """text, or an InputError naming where it is (file and line, or id) and what is wrong."""
    problem = text_problem(text)
    if problem:
        raise InputError(f"{where}: the text must be {problem}")
    return text

def read_lines(path, offsets=None):
    """Yield (line number, line) for each non-empty line of a UTF-8 text file (a byte-order mark is
    skipped); offsets, a list, gets each yielded line's byte position in the file."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: file not found")
    with open(path, "rb") as f:
        position = 0
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError(f"{path}:{n}: not UTF-8 text") from None
            if n == 1:
                line = line.removeprefix("\ufeff")
            if line.strip():
                if offsets is not None:
                    offsets.append(position)
                yield n, line
            position += len(raw)

def read_jsonl(path, offsets=None):
    """Yield (line number, dict) for each non-empty line; a malformed line raises InputError naming
    it."""
    for n, line in read_lines(path, offsets):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        yield n, row

def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read it as JSON ({e})") from None

def read_ids(path, known):
    """Sorted query ids from a file (one a line), each of which must be in `known` (e.g. the qrels).
    """
    ids = set()
    for n, line in read_lines(path):
        if line.strip() not in known:
            raise InputError(f"{path}:{n}: query id {line.strip()!r} is not in the dataset's qrels")
        ids.add(line.strip())
    if not ids:
        raise InputError(f"{path}: no query ids in it")
    return sorted(ids)

# ----------------------------------------------------------------------------------------- datasets

def load_dataset(ref, split=None, split_flag="--split"):
    """(corpus, queries, qrels) of a BEIR folder + split, or of an ir_datasets id (whose split is
    part of the id). Only the queries that the qrels name are kept, or all queries when the split
    has no qrels. split_flag: the flag that gives the split, as the calling script spells it."""
    if os.path.isdir(ref):
        if not split:
            raise InputError(f"{ref}: a BEIR folder needs {split_flag} (e.g. test)")
        corpus, queries, qrels = load_beir_folder(ref, split)
    elif os.path.exists(ref):
        raise InputError(f"{ref}: a file, not a BEIR folder nor an ir_datasets id")
    elif split:
        raise InputError(f"{split_flag} {split} only applies to a BEIR folder; put the split in "
                         f"the ir_datasets id (e.g. beir/scifact/{split})")
    else:
        corpus, queries, qrels = load_ir_datasets(ref)
    for qid, docs in qrels.items():
        if qid not in queries:
            raise InputError(f"{ref}: qrels name query id {qid!r}, which is not among its queries")
        for doc_id in docs:
            if doc_id not in corpus:
                raise InputError(f"{ref}: qrels of query {qid!r} name document id {doc_id!r}, "
                                 f"which is not in the corpus")
    if not corpus:
        raise InputError(f"{ref}: no documents in its corpus")
    if not queries:
        raise InputError(f"{ref}: no queries")
    if qrels:
        queries = {qid: text for qid, text in queries.items() if qid in qrels}
    return corpus, queries, qrels

def doc_text(title, text):
    return ((title or "") + " " + (text or "")).strip()

class Corpus(Mapping):
    """{doc_id: text} without holding the texts: the ids, and read(row, id), which reads a
    document's text when it is asked for (from its place in corpus.jsonl, or from ir_datasets'
    docstore). Encoding reads the corpus a shard at a time; mining reads only the negatives it
    writes."""

    def __init__(self, ids, read):
        self.read = read
        # id -> its row; in order, each once
        self.rows = {doc_id: n for n, doc_id in enumerate(ids)}

    def __getitem__(self, doc_id):
        return self.read(self.rows[doc_id], doc_id)

    def __contains__(self, doc_id):
        return doc_id in self.rows

    def __iter__(self):
        return iter(self.rows)

    def __len__(self):
        return len(self.rows)

def read_corpus(path):
    """A BEIR corpus.jsonl (or queries.jsonl) as a Corpus: each id once and without spaces (run
    files are space-separated), each text non-empty; the lines' positions are kept and a text is
    read when asked."""
    ids = {}  # the ids in file order (a dict: fast to look up)
    offsets = []
    for n, row in read_jsonl(path, offsets):
        if not is_id(row.get("_id")):  # null or true would become the id "None" or "True"
            raise InputError(f"{path}:{n}: '_id' must be a string or an integer, got "
                             f"{json.dumps(row.get('_id'))}")
        doc_id = str(row["_id"])
        if doc_id in ids:
            raise InputError(f"{path}:{n}: id {doc_id!r} again")
        if not doc_id or doc_id.split() != [doc_id]:
            raise InputError(f"{path}:{n}: each line needs an '_id' without spaces")
        for key in ("title", "text"):
            if row.get(key) is not None and not isinstance(row[key], str):
                raise InputError(f"{path}:{n}: {key!r} must be a string, not "
                                 f"{json.dumps(row[key])[:40]}")
        check_text(doc_text(row.get("title"), row.get("text")), f"{path}:{n}")
        ids[doc_id] = None
    if not ids:
        raise InputError(f"{path}: no lines in it")
    lines = open(path, "rb")  # kept open: one seek a text read

    def read(row, doc_id):
        lines.seek(offsets[row])
        doc = json.loads(lines.readline())
        return doc_text(doc.get("title"), doc.get("text"))
    return Corpus(ids, read)

def read_qrels(path):
    """BEIR qrels tsv (`query-id corpus-id score`, header optional) or TREC qrels (`qid 0 docid
    grade`)."""
    qrels = {}
    for n, line in read_lines(path):
        cols = line.split()
        if n == 1 and cols[0] == "query-id":
            continue
        well_formed = len(cols) in (3, 4) and cols[-1].isdigit()
        if not well_formed or cols[-2] in qrels.get(cols[0], {}):
            raise InputError(f"{path}:{n}: expected 'query-id corpus-id grade' with a grade >= 0, "
                             f"each pair once; got {line.strip()!r}")
        qrels.setdefault(cols[0], {})[cols[-2]] = int(cols[-1])
    return qrels

def load_beir_folder(folder, split):
    corpus = read_corpus(os.path.join(folder, "corpus.jsonl"))
    queries = read_corpus(os.path.join(folder, "queries.jsonl"))
    qrels = read_qrels(os.path.join(folder, "qrels", f"{split}.tsv"))
    return corpus, queries, qrels

# ir_datasets downloads a BEIR set into $IR_DATASETS_HOME (default ~/.ir_datasets) as
# beir/<name>/source.zip. Where the project's data mirror sits beside the checkout (offline
# machines, CI), its zip is copied there.
MIRROR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "ir_datasets")

def load_ir_datasets(dataset_id):
    home = os.environ.get("IR_DATASETS_HOME") or os.path.expanduser("~/.ir_datasets")
    if os.path.exists(home) and not os.path.isdir(home):
        raise InputError(f"IR_DATASETS_HOME={home} is a file; ir_datasets keeps its files in a "
                         f"folder")
    zip_path = os.path.join(*dataset_id.split("/")[:2], "source.zip")
    mirrored = os.path.join(MIRROR, zip_path)
    if os.path.isfile(mirrored) and not os.path.isfile(os.path.join(home, zip_path)):
        with open(mirrored, "rb") as src:
            atomic_write(os.path.join(home, zip_path), lambda f: shutil.copyfileobj(src, f),
                         mode="wb")
    import ir_datasets
    with quiet():
        try:
            ds = ir_datasets.load(dataset_id)
        except KeyError:
            raise InputError(f"{dataset_id!r} is neither a folder nor a dataset id that "
                             f"ir_datasets knows (e.g. beir/scifact/test)") from None
        try:
            ids = [doc.doc_id for doc in ds.docs_iter()]
            store = ds.docs_store()
            queries = {q.query_id: check_text(q.text.strip(), f"{dataset_id}: query {q.query_id!r}")
                       for q in ds.queries_iter()}
            qrels = {}
            for r in ds.qrels_iter() if ds.has_qrels() else []:
                qrels.setdefault(r.query_id, {})[r.doc_id] = int(r.relevance)
        except (zipfile.BadZipFile, EOFError):  # a download cut short
            raise InputError(f"{os.path.join(home, zip_path)}: a damaged (cut short) download; "
                             f"delete it and run again") from None
        except OSError as e:  # requests' ConnectionError among them
            raise InputError(f"ir_datasets could not get {dataset_id} ({type(e).__name__}): check "
                             f"the network, or put its files in {home}, or give a BEIR folder with "
                             f"--split") from None

    def read(row, doc_id):  # a text is read from ir_datasets' docstore when it is asked for
        with quiet():
            doc = store.get(doc_id)
        text = doc_text(getattr(doc, "title", ""), doc.text)
        return check_text(text, f"{dataset_id}: document {doc_id!r}")
    corpus = Corpus(ids, read)
    if len(corpus) < len(ids):
        print(f"{dataset_id}: {len(ids) - len(corpus)} repeated document ids, each kept once")
    return corpus, queries, qrels

@contextlib.contextmanager
def quiet():
    """ir_datasets logs a line at level INFO for every file it opens, on loggers of its own that
    ignore their parents' level: those lines are left out while it works (warnings still show)."""
    logging.disable(logging.INFO)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)

# --------------------------------------------------------------------------------------- train data

def is_text(x):
    return text_problem(x) is None

def is_string(x):
    """A string of valid Unicode, which may be empty (a line's "prompt" "" is no instruction)."""
    return isinstance(x, str) and (not x.strip() or text_problem(x) is None)

def is_id(x):
    return isinstance(x, (str, int)) and not isinstance(x, bool) and str(x).strip() != ""

def is_score(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

# Each key of a train line: the check of its value (or of each item of a list), whether it is a
# list, and what the error says it must be.
TRAIN_FIELDS = {
    "query": (is_text, False, "a non-empty string of valid Unicode"),
    "prompt": (is_string, False, "a string"),
    "qid": (is_id, False, "an id (a string or an integer)"),
    "pos": (is_text, True, "a list of non-empty strings of valid Unicode"),
    "neg": (is_text, True, "a list of non-empty strings of valid Unicode"),
    "pos_ids": (is_id, True, "a list of ids"),
    "neg_ids": (is_id, True, "a list of ids"),
    "pos_scores": (is_score, True, "a list of finite numbers"),
    "neg_scores": (is_score, True, "a list of finite numbers"),
}

def valid(value, check, is_list):
    if is_list:
        return isinstance(value, list) and all(check(item) for item in value)
    return check(value)

def read_train_jsonl(path):
    """FlagEmbedding-format train examples, every field checked now (not when its line is sampled
    hours later). Keys this code does not read are counted and named, so that a typo ("negs") does
    not silently turn into training without negatives."""
    examples = []
    unknown = {}  # key -> the lines that have it
    for n, row in read_jsonl(path):
        row.setdefault("neg", [])
        for key, value in row.items():
            if key not in TRAIN_FIELDS:
                unknown[key] = unknown.get(key, 0) + 1
                continue
            check, is_list, what = TRAIN_FIELDS[key]
            if not valid(value, check, is_list):
                raise InputError(f"{path}:{n}: {key!r} must be {what}")
        if "query" not in row or not row.get("pos"):
            raise InputError(f"{path}:{n}: a line needs a 'query' and at least one 'pos'")
        for kind in ("pos", "neg"):
            for key in (f"{kind}_ids", f"{kind}_scores"):
                if key in row and len(row[key]) != len(row[kind]):
                    raise InputError(f"{path}:{n}: {key!r} must be as long as {kind!r} "
                                     f"({len(row[kind])})")
            if f"{kind}_ids" in row:
                # 123 and "123": the same id
                row[f"{kind}_ids"] = [str(i) for i in row[f"{kind}_ids"]]
        if "qid" in row:
            row["qid"] = str(row["qid"])
        examples.append(row)
    if not examples:
        raise InputError(f"{path}: no examples")
    if unknown:
        counts = ", ".join(f"{key!r} in {c} lines" for key, c in unknown.items())
        print(f"{path}: keys not read (ignored): {counts}")
    return examples

# FlagEmbedding's switch: a file whose name (before its extension) or a folder whose name ends with
# this trains each query against its own group only, without in-batch negatives (classification,
# clustering data).
NO_IN_BATCH_NEG = "no_in_batch_neg"

def train_sources(paths):
    """--train_data as FlagEmbedding reads it -> [(file, in_batch_negatives)]: each path a jsonl
    file, or a folder whose .jsonl and .json files (in name order) are each a source of their own;
    in_batch_negatives is False for a file or folder whose name ends with NO_IN_BATCH_NEG (a file's
    before its extension), as in FlagEmbedding. The same file twice, under any spelling, is an
    error."""
    sources = []
    for path in paths:
        if os.path.isdir(path):
            names = sorted(n for n in os.listdir(path) if n.endswith((".jsonl", ".json"))
                           and os.path.isfile(os.path.join(path, n)))
            if not names:
                raise InputError(f"--train_data {path}: a folder without .jsonl or .json files")
            in_batch = not os.path.basename(os.path.abspath(path)).endswith(NO_IN_BATCH_NEG)
            sources += [(os.path.join(path, n), in_batch) for n in names]
        elif os.path.isfile(path):
            stem = os.path.splitext(os.path.basename(path))[0]
            sources.append((path, not stem.endswith(NO_IN_BATCH_NEG)))
        else:
            raise InputError(f"--train_data {path}: file not found")
    seen = {}
    for file, _ in sources:
        same = (os.stat(file).st_dev, os.stat(file).st_ino)  # one file, under any name or link
        if same in seen:
            raise InputError(f"--train_data names {file} twice (also as {seen[same]}); give each "
                             f"file once")
        seen[same] = file
    return sources

@dataclasses.dataclass
class TrainData:
    """train.py's examples and where they came from."""
    examples: list  # every source's examples, one source after the other
    sources: list  # [(file, number of examples, in-batch negatives)], one a file
    use_ids: bool  # every example has ids: the false-negative mask compares ids, else texts

    def negatives(self, batch_size, group_size):
        """Negatives a query sees: the batch's other documents, or its group's with no in-batch."""
        if any(in_batch for _, _, in_batch in self.sources):
            return batch_size * group_size - 1
        return group_size - 1

def load_train(paths, dataset, split, group_size, batch_size, distill):
    """train.py's data: the files of --train_data (paths), or the positives of --dataset's qrels,
    checked against the flags (check_groups) -> (TrainData, the group size)."""
    if paths:
        sources = train_sources(paths)
        parts = [read_train_jsonl(path) for path, _ in sources]
    else:
        sources = [(dataset, True)]
        parts = [examples_from_qrels(*load_dataset(dataset, split))]
    group_size = check_groups(sources, parts, group_size, batch_size, distill)
    examples = [ex for part in parts for ex in part]
    use_ids = all("pos_ids" in ex and ("neg_ids" in ex or not ex["neg"]) for ex in examples)
    counted = [(name, len(part), in_batch) for (name, in_batch), part in zip(sources, parts)]
    return TrainData(examples, counted, use_ids), group_size

def check_groups(sources, parts, group_size, batch_size, distill):
    """train.py's data against its flags, before the model loads -> the group size (documents a
    query): group_size, or when None 4 if every example has negatives, 1 if none has (one line
    without negatives must not silently turn every query to in-batch negatives: with some it is an
    error). Every source must fill a batch, and the loss must have something to learn from.
    sources: [(file, in-batch negatives)]; parts: each source's examples."""
    names = " ".join(name for name, _ in sources)
    examples = [ex for part in parts for ex in part]
    no_negs = [ex for ex in examples if not ex["neg"]]
    if group_size is None:
        if no_negs and len(no_negs) < len(examples):
            ex = no_negs[0]
            raise InputError(f"{names}: {len(no_negs)} of {len(examples)} queries have no "
                             f"negatives (e.g. {ex.get('qid', ex['query'])!r}); give --group_size "
                             f"1 (in-batch negatives only) or mine theirs")
        group_size = 1 if no_negs else 4
    if group_size > 1 and no_negs:
        raise InputError(f"{names}: {len(no_negs)} queries have no negatives but --group_size is "
                         f"{group_size}; mine negatives with mine.py or use --group_size 1")
    for (name, _), part in zip(sources, parts):
        if not part:
            raise InputError(f"{name}: no training queries with a positive (are its qrels for "
                             f"this split empty?)")
        if len(part) < batch_size:
            raise InputError(f"--batch_size {batch_size} is larger than the {len(part)} training "
                             f"queries of {name}")
    # a query must have some document besides its positive to be told from
    if group_size == 1 and batch_size == 1:
        raise InputError("--batch_size 1 --group_size 1: each query sees only its own positive, so "
                         "the loss is 0 whatever the model; raise either")
    own_group_only = [name for name, in_batch in sources if not in_batch]
    if group_size == 1 and own_group_only:
        raise InputError(f"{own_group_only[0]}: its queries see only their own group "
                         f"({NO_IN_BATCH_NEG}), so --group_size 1 leaves nothing to tell the "
                         f"positive from; give --group_size 2 or more")
    if distill and group_size == 1:
        raise InputError(f"--distill {distill} learns the teacher's ranking within each query's "
                         f"group; it needs --group_size 2 or more")
    if distill and not all("pos_scores" in ex and "neg_scores" in ex for ex in examples):
        raise InputError("--distill needs pos_scores and neg_scores in every line (score.py "
                         "writes them)")
    few = sum(0 < len(ex["neg"]) < group_size - 1 for ex in examples)
    if few:
        print(f"{few} queries have fewer than {group_size - 1} negatives: theirs repeat within a "
              f"group")
    return group_size

def fingerprint(examples):
    """A short hash of train examples: resuming on a changed file would silently continue another
    run."""
    return hashlib.blake2b(json.dumps(examples, sort_keys=True).encode(), digest_size=8).hexdigest()

def examples_from_qrels(corpus, queries, qrels):
    """Train examples from a dataset's qrels: every document with grade > 0 is a positive; no
    negatives (training then uses in-batch negatives only)."""
    examples = []
    for qid in sorted(qrels):
        pos = [doc_id for doc_id, grade in sorted(qrels[qid].items()) if grade > 0]
        if pos:
            examples.append({"qid": qid, "query": queries[qid], "pos": [corpus[d] for d in pos],
                             "pos_ids": pos, "neg": [], "neg_ids": []})
    return examples

def background(items):
    """Iterate over items, the next one made in a background thread while the caller works on this
    one: the tokenizer releases Python's lock, so tokenising and padding overlap the device's
    work."""
    done = object()  # marks the end
    it = iter(items)
    with ThreadPoolExecutor(1) as pool:
        ahead = pool.submit(next, it, done)
        while (item := ahead.result()) is not done:
            ahead = pool.submit(next, it, done)
            yield item
