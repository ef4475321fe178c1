r"""Stage: model + corpus + train queries -> train jsonl with mined hard negatives.

    python mine.py --dataset beir/scifact/train --out runs/mined.jsonl  # ranks 10-100, 7 negatives
    python mine.py --dataset beir/scifact/train --range 10-50 --num_neg 3 --margin 0.95 \
        --out runs/mined.jsonl
    python mine.py --emb runs/emb_train --margin 0.9 --out runs/mined_m09.jsonl
        # reuse encode.py's vectors
    python mine.py --train_data pairs.jsonl --corpus corpus.jsonl --consistency_k 50 \
        --out runs/mined.jsonl
    python mine.py --teacher runs/ft/model --margin 0.95 --out runs/mined_t.jsonl
        # the margin on teacher scores
    python mine.py --index HNSW32 --out runs/mined.jsonl  # faiss, for large corpora
    torchrun --nproc_per_node 8 mine.py --dataset beir/nfcorpus/train --out runs/nf.jsonl
        # encode on 8 GPUs

For each query (of --dataset's qrels, or your own --train_data pairs): the top documents by --model
(exact cosine search, or a faiss --index), then --num_neg negatives sampled from the rank window
--range (0-based, end exclusive, counted among the documents that are not positives: 10-100 skips
the 10 best, the likeliest false negatives). Never a positive of the query (by id), never a text
equal to the query, to a positive or to another negative; with --margin m, only documents scoring
below m x the query's lowest positive score (positive-aware filtering, NV-Retriever), by --teacher's
scores if given. A window that runs short is topped up with random documents that pass the same
filters. Deterministic for a --seed. Writes FlagEmbedding's format with ids and scores (the
teacher's, if any): {"qid", "query", "pos", "pos_ids", "pos_scores", "neg", "neg_ids",
"neg_scores"}.
"""
import os
import shutil

import numpy as np
import torch

import cli
import data
import negatives
import retrieval
from model import for_inference
from teacher import load_teacher

parser = cli.parser(__doc__, model=None, dataset="beir/scifact/train", split=None, queries=None,
                    batch_size=None, dtype=None, device="auto", seed=0, out=..., index=None,
                    nprobe=None, ef_search=None)
parser.add_argument("--range", default="10-100", type=cli.int_range,
                    help="The rank window to sample negatives from, START-END (0-based, END "
                         "exclusive).")
parser.add_argument("--num_neg", type=cli.positive, default=7, help="Negatives a query.")
parser.add_argument("--margin", type=cli.share, default=0.0,
                    help="Keep a negative only if its score is below MARGIN x the query's lowest "
                         "positive score (0: off; e.g. 0.95).")
parser.add_argument("--sampling", default="random", choices=["random", "top"],
                    help="Sample the negatives at random from the window, or take its "
                         "highest-ranked ones.")
parser.add_argument("--emb",
                    help="encode.py's folder of this corpus and model: its vectors instead of "
                         "encoding again.")
parser.add_argument("--train_data",
                    help="Your own query/positive pairs (train jsonl) instead of --dataset's "
                         "qrels.")
parser.add_argument("--corpus",
                    help="With --train_data: a BEIR corpus.jsonl to mine from (default: the file's "
                         "own texts).")
parser.add_argument("--consistency_k", type=cli.count, default=0,
                    help="Drop a query none of whose positives is in the model's top K (E5's "
                         "consistency filter; 0: off).")
parser.add_argument("--teacher",
                    help="A cross-encoder or bi-encoder folder: the margin compares its scores, "
                         "and its scores are written.")

def own_pairs(args):
    """--train_data's examples and the documents to mine from: --corpus, or every distinct text of
    the file (its id: its position among them) -> (examples, each with a qid (its line number, if it
    has none) and pos_ids, corpus)."""
    examples = data.read_train_jsonl(args.train_data)
    if args.corpus:
        corpus = data.read_corpus(args.corpus)
    else:
        texts = dict.fromkeys(t for ex in examples for t in ex["pos"] + ex["neg"])
        corpus = {str(n): text for n, text in enumerate(texts)}
    # positives found by their text
    by_text = not args.corpus or not all("pos_ids" in ex for ex in examples)
    id_of = {corpus[i]: i for i in corpus} if by_text else {}
    for n, ex in enumerate(examples, 1):
        ex["qid"] = ex.get("qid", str(n))
        if by_text:
            ex["pos_ids"] = [id_of.get(text) for text in ex["pos"]]
        if not all(i in corpus for i in ex["pos_ids"]):
            raise cli.InputError(f"{args.train_data}: query {ex['qid']}: a positive is not in "
                                 f"{args.corpus}")
    return examples, corpus

def check_flags(args):
    """Flags without effect among the others given, and an --out that is one of the inputs: one
    line each, before any work."""
    if args.train_data:  # the pairs replace --dataset's qrels and, with --corpus, its corpus
        cli.no_effect(args, parser, ("dataset", "split", "queries"), "with --train_data")
    else:
        cli.no_effect(args, parser, ("corpus",), "without --train_data (the negatives come from "
                      "--dataset's corpus)")
    inputs = {"--train_data": args.train_data, "--corpus": args.corpus, "--queries": args.queries}
    if os.path.isdir(args.dataset):  # a BEIR folder: its files are inputs too
        for name in ("corpus.jsonl", "queries.jsonl", f"qrels/{args.split}.tsv"):
            inputs[f"--dataset's {name}"] = os.path.join(args.dataset, name)
    cli.not_an_input(args.out, inputs)
    cli.output(args.out, folder=False)

def encoding_folder(args, rank, world):
    """The folder beside --out for the corpus's vectors, removed once the negatives are written:
    .OUT.encoding, marked as mine.py's by a record inside (a killed run's is removed by the next
    run; one that is not mine.py's stops it in one line)."""
    folder = os.path.join(os.path.dirname(os.path.abspath(args.out)),
                          f".{os.path.basename(args.out)}.encoding")
    if rank == 0:
        if os.path.exists(folder) and not cli.whole(folder, "mine.py"):
            raise cli.InputError(f"{folder} is there, and mine.py did not write it; move it away, "
                                 f"or give another --out")
        shutil.rmtree(folder, ignore_errors=True)
        cli.mark_whole(folder, "mine.py")
    if world > 1:
        torch.distributed.barrier()
    return folder

def main(args):
    device, rank, world = cli.setup_device(args.device)
    check_flags(args)
    dtype = cli.default_dtype(args.dtype, device)

    # what to mine: a dataset's qrels, or your own pairs
    if args.train_data:
        examples, corpus = own_pairs(args)
        source = args.corpus or args.train_data
        asked = len(examples)
    else:
        corpus, queries, qrels = data.load_dataset(args.dataset, args.split)
        if args.queries:
            qrels = {qid: qrels[qid] for qid in data.read_ids(args.queries, qrels)}
        examples = data.examples_from_qrels(corpus, queries, qrels)
        source = args.dataset
        asked = len(qrels)
    if not examples:
        raise cli.InputError(f"{args.dataset}: no positives in its qrels to mine around")
    # before the long work
    teacher = load_teacher(args.teacher, device, dtype) if args.teacher else None
    model = for_inference(args.model, device, dtype)
    retrieval.make_index(args.index, model.dim, len(corpus), args.nprobe, args.ef_search)

    # the corpus's vectors: encode.py's (--emb), or encoded here, each rank its shards
    folder = args.emb or encoding_folder(args, rank, world)
    try:
        if not args.emb:
            meta = {"model": args.model, "dataset": source, "split": args.split, "dtype": dtype,
                    **model.settings, "model_fingerprint": retrieval.model_fingerprint(model)}
            retrieval.encode_corpus(model, corpus, folder, meta, 100_000, "fp32",
                                    args.batch_size, rank, world)
        if rank != 0:  # rank 0 searches and writes
            return []
        docs = retrieval.Shards(folder, corpus, source, model)  # the same documents and model
        search_options = {"device": device, "index": args.index, "nprobe": args.nprobe,
                          "ef_search": args.ef_search}
        rows, totals = negatives.mine(model, docs, corpus, examples, args.range, args.num_neg,
                                      args.margin, args.sampling, args.seed, args.consistency_k,
                                      teacher, args.batch_size, **search_options)
        cli.write_jsonl(args.out, rows)
    finally:
        if not args.emb and rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
    summarize(rows, totals, asked, len(examples), args)
    return rows

def summarize(rows, totals, asked, mined, args):
    negs = [s for r in rows for s in r["neg_scores"]]
    pos_mean = np.mean([s for r in rows for s in r["pos_scores"]] or [np.nan])
    skipped = f"skipped {max(0, asked - mined)} without a positive"
    if args.consistency_k:
        skipped += (f" and {totals['inconsistent']} whose positives are not in the model's top "
                    f"{args.consistency_k}")
    print(f"mined {len(rows)} queries -> {args.out}; {skipped}; negatives a query: "
          f"{len(negs) / max(1, len(rows)):.2f} (wanted "
          f"{args.num_neg}), {totals['short_window']} windows ran short and got "
          f"{totals['random']} random ones; removed from windows: {totals['positive']} positives, "
          f"{totals['same_text']} repeated texts, {totals['margin']} above the margin; scores: "
          f"positives mean {pos_mean:.3f}, negatives mean {np.mean(negs or [np.nan]):.3f} (min "
          f"{min(negs, default=np.nan):.3f}, max {max(negs, default=np.nan):.3f})")

if __name__ == "__main__":
    cli.run(main, parser)
