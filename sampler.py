"""The batches train.py trains on: which examples make each step's batch, which positive and
negatives each query gets, and the keys that mask false negatives. Every choice is a function of
(seed, epoch, step) alone, so that a resumed run sees exactly the batches an uninterrupted run would
have, whatever the number of processes.
"""
import functools
import hashlib
import random

import torch

from data import background

def doc_keys(ex, kind, use_ids):
    """Keys of an example's positives or negatives (kind "pos" or "neg"): stable 63-bit hashes of
    the ids when the data has them, else of the texts (Python's own hash() changes between
    processes).
    """
    names = ex.get(f"{kind}_ids", []) if use_ids else ex[kind]
    keys = []
    for name in names:
        digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
        keys.append(int.from_bytes(digest, "little") >> 1)  # >> 1: non-negative in an int64 tensor
    return keys

def sample_group(ex, group_size, seed, epoch, index):
    """One positive and group_size - 1 negatives for example `index` in `epoch`, drawn from (seed,
    epoch, index) alone -> (an index into ex["pos"], a list of indices into ex["neg"])."""
    rng = random.Random(f"{seed}/{epoch}/{index}")
    pos = rng.randrange(len(ex["pos"]))
    wanted = group_size - 1
    available = len(ex["neg"])
    if available >= wanted:
        negs = rng.sample(range(available), wanted)
    else:  # too few negatives: drawn with repeats
        negs = [rng.randrange(available) for _ in range(wanted)]
    return pos, negs

def batch_plan(sizes, batch_size, seed, epoch, uniform=False):
    """The batches of an epoch, each from one source -> [(source, [example indices])]. sizes: the
    number of examples of each source, numbered one source after the other. Each source's examples
    are shuffled and cut into full batches (the rest waits for another epoch's shuffle); with
    several sources the batches are shuffled together, so each source comes in proportion to its
    size, or with uniform as often as the largest (a smaller one repeats its examples, reshuffled).
    """
    rng = random.Random(f"{seed}/order/{epoch}")
    plan = []
    first = 0  # the number of the source's first example
    for source, n in enumerate(sizes):
        take = (max(sizes) if uniform else n) // batch_size * batch_size
        order = []
        # a permutation of the source's examples (and more of them, with uniform)
        while len(order) < take:
            perm = list(range(first, first + n))
            rng.shuffle(perm)
            order += perm
        for i in range(0, take, batch_size):
            plan.append((source, order[i:i + batch_size]))
        first += n
    if len(sizes) > 1:
        rng.shuffle(plan)
    return plan

def make_batches(model, train_data, examples_at, args, setup, steps, rank, world):
    """The batch of each of steps, as a dict, made one step ahead in a background thread:
        q, d        this rank's queries (b,) and their documents (b * G,) tokenised, laid out
                    per query [p_0, n_0,1 .. n_0,G-1, p_1, ...]; a query with a "prompt" of its
                    own gets it instead of the model's query instruction (FlagEmbedding's rule)
        d_keys      the keys of the global batch's documents (B * G,), for the false-negative mask
        q_pos_keys  the keys of each of this rank's queries' positives (b, P), padded with -1
        teacher     the data's teacher scores of each group (b, G), with --distill
    and where it stands: step, epoch, source (the file it came from), in_batch (False: its queries
    see only their own group), offset (this rank's first query) and examples (the numbers of this
    rank's examples). train_data: train.TrainData (the examples, their sources, whether they have
    ids); examples_at(step): the examples to make step's batch from (train_data's, or with their
    negatives mined again: negatives.Remining); args: train.py's flags; setup: its train.Setup."""
    b = args.batch_size // world
    sizes = [size for _, size, _ in train_data.sources]

    @functools.lru_cache(1)
    def plan(epoch):
        return batch_plan(sizes, args.batch_size, args.seed, epoch, args.mix == "uniform")

    def make(step):
        examples = examples_at(step)
        epoch, i = divmod(step, len(plan(0)))
        source, batch = plan(epoch)[i]
        queries, prompts, docs, d_keys, pos_keys, teacher, mine = [], [], [], [], [], [], []
        for n, e in enumerate(batch):
            ex = examples[e]
            p, negs = sample_group(ex, setup.group_size, args.seed, epoch, e)
            pk = doc_keys(ex, "pos", train_data.use_ids)
            nk = doc_keys(ex, "neg", train_data.use_ids)
            d_keys += [pk[p]] + [nk[j] for j in negs]
            if n // b != rank:  # another rank's share of the global batch
                continue
            mine.append(e)
            queries.append(ex["query"])
            prompts.append(ex.get("prompt"))  # None: the model's own instruction
            docs += [ex["pos"][p]] + [ex["neg"][j] for j in negs]
            pos_keys.append(pk)
            if args.distill:
                teacher.append([ex["pos_scores"][p]] + [ex["neg_scores"][j] for j in negs])
        width = max(len(k) for k in pos_keys)
        name, _, in_batch = train_data.sources[source]
        return {"step": step, "epoch": epoch, "source": name, "in_batch": in_batch,
                "offset": rank * b, "examples": mine,
                "q": model.tokenize(queries, "query", prompts=prompts),
                "d": model.tokenize(docs, "doc"),
                "d_keys": torch.tensor(d_keys),
                "q_pos_keys": torch.tensor([k + [-1] * (width - len(k)) for k in pos_keys]),
                "teacher": torch.tensor(teacher) if args.distill else None}
    return background(make(step) for step in steps)
