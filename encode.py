r"""Stage: model + texts -> embeddings on disk.

    python encode.py --dataset beir/scifact/test --out runs/emb  # bundled all-MiniLM-L6-v2
    python encode.py --model runs/ft/model --dataset ../shared/data/scifact --split test \
        --out runs/emb_ft
    torchrun --nproc_per_node 8 encode.py --dataset beir/nfcorpus/test --out runs/emb
        # shards over ranks

Writes out/corpus.NNNNN.npy + .ids.txt (--shard_size documents a shard), out/queries.npy +
queries.ids.txt (the queries the split's qrels name; all of them when it has none) and
out/meta.json. Each shard is written atomically: a killed run, rerun with the same command,
continues after the last complete shard. Pooling, normalisation, prefixes and max lengths come from
the checkpoint, never from flags; with separate towers the documents go through the document tower
and the queries through the query tower. Texts are sorted by length within a shard, so each batch
pads only to its own longest text; the order is restored on output.
"""
import time


import cli
import data
import retrieval
from model import for_inference

parser = cli.parser(__doc__, model=None, dataset="beir/scifact/test", split=None, batch_size=None,
                    dtype=None, device="auto", out=...)
parser.add_argument("--max_len", type=cli.positive,
                    help="Cut documents at this many tokens instead of the checkpoint's passage "
                         "max length.")
parser.add_argument("--store", default="fp16", choices=["fp16", "fp32"],
                    help="The dtype of the saved .npy files (fp16 halves the disk and loses "
                         "nothing that ranking notices).")
parser.add_argument("--shard_size", type=cli.positive, default=100_000,
                    help="Documents a shard: a killed run resumes after its last complete shard.")

def main(args):
    device, rank, world = cli.setup_device(args.device)
    dtype = cli.default_dtype(args.dtype, device)
    corpus, queries, _ = data.load_dataset(args.dataset, args.split)
    # held until main returns: encode.py's files in --out, and nothing else there; a rerun resumes
    # after the last complete shard, which is encode.py's own by the folder's record
    shards = retrieval.shard_names(len(corpus), args.shard_size)
    names = ["meta.json", *retrieval.files(["queries", *shards])]
    out = cli.claim(args.out, "encode.py", names, rank, world)  # noqa: F841
    try:
        model = for_inference(args.model, device, dtype, passage_max_len=args.max_len)
    except cli.InputError as e:  # the model calls the setting by train.py's flag
        raise cli.InputError(str(e).replace("--passage_max_len", "--max_len")) from None
    t0 = time.time()
    meta = {"model": args.model, "dataset": args.dataset, "split": args.split, "dtype": dtype,
            "dim": model.dim, **model.settings,
            "model_fingerprint": retrieval.model_fingerprint(model),
            "queries": retrieval.texts_fingerprint(queries)}
    retrieval.encode_corpus(model, corpus, args.out, meta, args.shard_size, args.store,
                            args.batch_size, rank, world)
    if rank != 0:
        return
    q_ids = list(queries)
    q = model.encode([queries[i] for i in q_ids], "query", args.batch_size)
    retrieval.save_embeddings(args.out, "queries", q_ids, q, args.store)
    seconds = time.time() - t0
    texts = len(corpus) + len(q_ids)
    print(f"encoded {len(corpus)} docs + {len(q_ids)} queries in {seconds:.1f}s "
          f"({texts / seconds:.1f} texts/s) -> {args.out}")

if __name__ == "__main__":
    cli.run(main, parser)
