"""Hard negatives: each query's top documents by a model, the rank window to sample from, and the
filters that keep a negative from being a positive in disguise. mine.py writes them to a file;
train.py --remine_every mines them again inside a run with the weights of the moment.

For each query the top documents of an exact (or faiss) search; its positives (by id) leave the
list; the window is ranks START-END of what remains (0-based: 10-100 skips the 10 best, the
likeliest false negatives); a text equal to the query, a positive or another negative goes; with a
margin m only documents scoring below m x the query's lowest positive score stay (positive-aware
filtering, NV-Retriever), by a teacher's scores if there is one; the negatives are sampled from the
rest (or the top ones taken), and a window that ran short is topped up with random documents that
pass the same filters. Deterministic for a seed.
"""
import os
import random
import shutil

import torch
import torch.distributed as dist

import cli
import data
import retrieval

def select_negatives(window, query, pos, corpus, doc_ids, num_neg, margin, sampling, rng, score):
    """One query's num_neg negatives. window: [(doc_id, score)] of the rank window, best first,
    positives removed; pos: {doc_id: score} of its positives; doc_ids: all ids (sorted); margin,
    sampling: as mine's; score(doc_id): the score of any document. -> (chosen [(doc_id, score)],
    counts of what the filters removed and of the random top-ups)."""
    floor = min(pos.values())  # the lowest positive score
    limit = float("inf")
    if margin:  # written to stay below the floor when the floor is negative too
        limit = floor - (1 - margin) * abs(floor)
    counts = {"same_text": 0, "margin": 0, "random": 0}
    used = {query} | {corpus[p] for p in pos}  # texts a negative must not repeat
    kept = []
    for doc_id, s in window:
        if corpus[doc_id] in used:
            counts["same_text"] += 1
        elif s >= limit:
            counts["margin"] += 1
        else:
            used.add(corpus[doc_id])
            kept.append((doc_id, s))
    if sampling == "top":
        chosen = kept[:num_neg]
    else:
        chosen = rng.sample(kept, min(num_neg, len(kept)))
    used = {query} | {corpus[p] for p in pos} | {corpus[d] for d, _ in chosen}
    # a window that ran short: random documents, passing the same filters, in a seeded order
    for doc_id in rng.sample(doc_ids, min(len(doc_ids), 4 * num_neg + len(pos))):
        if len(chosen) >= num_neg or doc_id in pos or corpus[doc_id] in used:
            continue
        s = score(doc_id)
        if s < limit:
            used.add(corpus[doc_id])
            chosen.append((doc_id, s))
            counts["random"] += 1
    counts["short_window"] = int(len(kept) < num_neg)
    return chosen, counts

def cosines(docs, q, doc_ids, row_of):
    """The cosine of one query vector q (D,) with each of these documents -> (len(doc_ids),)."""
    d = retrieval.unit(torch.from_numpy(docs.rows([row_of[i] for i in doc_ids]))).numpy()
    return d @ q

def mine(model, docs, corpus, examples, window, num_neg, margin=0.0, sampling="random", seed=0,
         consistency_k=0, teacher=None, batch_size=None, **search_options):
    """The num_neg negatives of each example from the rank window (start, end) -> (rows, totals):
    rows are the examples that stay (all but those consistency_k drops) with pos_scores, neg,
    neg_ids and neg_scores; totals count what the filters did. docs: the corpus's encoding by model
    (retrieval.Shards); margin, sampling, seed, consistency_k, teacher: as mine.py's flags;
    search_options: retrieval.search's device, index, nprobe, ef_search."""
    q_emb = model.encode([ex["query"] for ex in examples], "query", batch_size)
    q_emb = retrieval.unit(torch.from_numpy(q_emb)).numpy()  # (Q, D)
    row_of = {doc_id: i for i, doc_id in enumerate(docs.ids)}

    # candidates: enough for the window's end plus the positives that are skipped inside it
    k = max(window[1] + max(len(ex["pos_ids"]) for ex in examples), consistency_k)
    scores, idx = retrieval.search(q_emb, docs.mats, k, **search_options)
    totals = {"positive": 0, "inconsistent": 0, "same_text": 0, "margin": 0, "random": 0,
              "short_window": 0}
    todo = []  # (query row, example, {positive id: score}, its window's [(doc id, score)])
    for qi, ex in enumerate(examples):
        found = [(docs.ids[j], float(s)) for s, j in zip(scores[qi], idx[qi]) if j >= 0]
        top_ids = [doc_id for doc_id, _ in found[:consistency_k]]
        if consistency_k and not any(doc_id in ex["pos_ids"] for doc_id in top_ids):
            totals["inconsistent"] += 1  # the model disagrees with the label: likely a noisy pair
            continue
        pos = dict(zip(ex["pos_ids"], cosines(docs, q_emb[qi], ex["pos_ids"], row_of).tolist()))
        totals["positive"] += sum(doc_id in pos for doc_id, _ in found)
        ranked = [(doc_id, s) for doc_id, s in found if doc_id not in pos]
        todo.append((qi, ex, pos, ranked[window[0]:window[1]]))

    # with a teacher, its scores of the positives and the windows replace the model's
    if teacher:
        pairs = [(ex["query"], doc_id) for _, ex, pos, candidates in todo
                 for doc_id in [*pos, *(d for d, _ in candidates)]]
        taught = teacher([q for q, _ in pairs], [corpus[d] for _, d in pairs], batch_size)
        at = 0  # the teacher's score of the next pair
        for qi, ex, pos, candidates in todo:
            for doc_id in pos:
                pos[doc_id] = taught[at]
                at += 1
            for i, (doc_id, _) in enumerate(candidates):
                candidates[i] = (doc_id, taught[at])
                at += 1

    # the negatives of each query
    sorted_ids = sorted(docs.ids)
    rows = []
    for qi, ex, pos, candidates in todo:
        def score(doc_id):  # a random top-up's score, by whoever scored the window
            if teacher:
                return teacher([ex["query"]], [corpus[doc_id]])[0]
            return float(cosines(docs, q_emb[qi], [doc_id], row_of)[0])
        rng = random.Random(f"{seed}/{ex['qid']}")
        chosen, counts = select_negatives(candidates, ex["query"], pos, corpus, sorted_ids, num_neg,
                                          margin, sampling, rng, score)
        for key, value in counts.items():
            totals[key] += value
        rows.append({**ex, "pos_scores": list(pos.values()), "neg": [corpus[d] for d, _ in chosen],
                     "neg_ids": [d for d, _ in chosen], "neg_scores": [s for _, s in chosen]})
    return rows, totals

# ---------------------------------------------------------------------- mined again while training

def corpus_for_remining(dataset, split, examples, use_ids):
    """train.py --remine_every: the corpus to mine from (--dataset's), which must hold every
    positive of the train data, by id."""
    if not use_ids:
        raise cli.InputError("--remine_every needs the positives' ids (pos_ids) in every train "
                             "line")
    corpus = data.load_dataset(dataset, split)[0]
    for ex in examples:
        for doc_id in ex["pos_ids"]:
            if doc_id not in corpus:
                raise cli.InputError(f"--remine_every: positive {doc_id!r} of query "
                                     f"{ex.get('qid', ex['query'])!r} is not in {dataset}'s "
                                     f"corpus; give as --dataset the one the train data comes from")
    return corpus

class Remining:
    """train.py --remine_every: each query's negatives mined again every `every` steps by the model
    as it is then (ANCE-style), as mine() mines them. Those mined after step j go to
    out_dir/remined/step.J.jsonl (a folder that is train.py's by the record of out_dir) before that
    step's checkpoint, and the batch of step i + 1 (made one step ahead, while step i runs) uses the
    newest with j < i: the only ones that can be there when it is made, so that a resumed run sees
    the batches of an uninterrupted one."""

    def __init__(self, train_data, dataset, split, out_dir, every, window, num_neg, margin, seed):
        """train_data: data.TrainData; dataset, split: the corpus to mine from (every 0: none, the
        train data's negatives throughout)."""
        self.versions = {0: train_data.examples}  # {j: the examples, negatives mined after step j}
        self.corpus = None
        if every:
            self.corpus = corpus_for_remining(dataset, split, train_data.examples,
                                              train_data.use_ids)
        self.folder = os.path.join(out_dir, "remined")
        self.every = every
        self.window = window
        self.num_neg = num_neg
        self.margin = margin
        self.seed = seed

    def path(self, step):
        return os.path.join(self.folder, f"step.{step:07d}.jsonl")

    def with_negatives(self, path):
        """The train examples with the negatives of a re-mined file (one line each, in order); a
        query none of whose candidates passed the filters keeps the negatives it came with."""
        mined = [row for _, row in data.read_jsonl(path)]
        return [{**ex, **row} if row["neg"] else ex for ex, row in zip(self.versions[0], mined)]

    def resume(self, start, rank):
        """The negatives re-mined after each step up to start (the saved step); files of later
        steps (written after the checkpoint a resume starts from) go."""
        if not os.path.isdir(self.folder):
            return
        for name in sorted(os.listdir(self.folder)):
            step = int(name.split(".")[1])  # a name path() wrote: nothing else is in the folder
            if step <= start:
                self.versions[step] = self.with_negatives(os.path.join(self.folder, name))
            elif rank == 0:
                os.remove(os.path.join(self.folder, name))

    def examples_at(self, step):
        """The examples the batch of step (0-based) is made from."""
        return self.versions[max(j for j in self.versions if j < step or j == 0)]

    def after_step(self, model, step, total_steps, device, rank, world):
        """Mine again after this step if it is one of every (in eval mode: no dropout, no random
        numbers drawn); not after the last step: nothing would use them."""
        if not self.every or step % self.every or step == total_steps:
            return
        # the encoding, sharded, in the run's temporary folder (the next claim removes a kill's)
        folder = os.path.join(cli.temp_folder(self.path(step)), "remine")
        if rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
        if world > 1:
            dist.barrier()
        model.eval()
        meta = {"model": f"the model at step {step}", "dataset": "the corpus to re-mine",
                **model.settings,
                "model_fingerprint": retrieval.model_fingerprint(model)}
        retrieval.encode_corpus(model, self.corpus, folder, meta, 100_000, "fp32", None, rank,
                                world)
        if rank == 0:
            docs = retrieval.Shards(folder, self.corpus, "the train data's corpus", model)
            rows, _ = mine(model, docs, self.corpus, self.versions[0], self.window, self.num_neg,
                           self.margin, seed=f"{self.seed}/{step}", device=device)
            keep = ("neg", "neg_ids", "neg_scores")
            cli.write_jsonl(self.path(step), [{k: row[k] for k in keep} for row in rows])
            shutil.rmtree(folder)
        if world > 1:
            dist.barrier()
        model.train()
        self.versions[step] = self.with_negatives(self.path(step))
