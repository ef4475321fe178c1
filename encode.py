"""Stage: model + texts -> embeddings on disk.

    python encode.py --dataset beir/scifact/test --out runs/emb                     # bundled all-MiniLM-L6-v2
    python encode.py --model runs/ft/model --dataset ../shared/data/scifact --split test --out runs/emb_ft
    torchrun --nproc_per_node 8 encode.py --dataset beir/nfcorpus/test --out runs/emb   # shards spread over ranks

Writes out/corpus.NNNNN.npy + .ids.txt (--shard_size documents a shard), out/queries.npy + queries.ids.txt (the
queries the split's qrels name; all of them when it has none) and out/meta.json. Each shard is written
atomically: a killed run, rerun with the same command, continues after the last complete shard. Pooling,
normalisation, prefixes and max lengths come from the checkpoint, never from flags. Texts are sorted by length
within a shard, so each batch pads only to its own longest text; the order is restored on output.
"""
import time

import torch

import data
import retrieval
from model import for_inference, setup

parser = data.parser(__doc__, model=None, dataset="beir/scifact/test", split=None, batch_size=None, dtype=None,
                     device="auto", out=...)
parser.add_argument("--max_len", type=data.positive, help="override the checkpoint's passage max length")
parser.add_argument("--store", default="fp16", choices=["fp16", "fp32"], help="dtype of the saved .npy files")
parser.add_argument("--shard_size", type=data.positive, default=100_000, help="documents a shard")

def main(args):
    device, rank, world = setup(args.device)
    lock = data.claim(args.out) if rank == 0 else None  # noqa: F841 (one writer; a killed run's temporary files go)
    if world > 1:
        torch.distributed.barrier()  # the others write only once rank 0 has cleaned
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    corpus, queries, _ = data.load_dataset(args.dataset, args.split)
    model = for_inference(args.model, device, dtype, passage_max_len=args.max_len)
    t0 = time.time()
    meta = {"model": args.model, "dataset": args.dataset, "split": args.split, "dtype": dtype,
            "dim": model.dim, **model.settings}
    retrieval.encode_corpus(model, corpus, args.out, meta, args.shard_size, args.store, args.batch_size, rank, world)
    if rank == 0:
        q_ids = list(queries)
        retrieval.save_embeddings(args.out, "queries", q_ids, model.encode([queries[i] for i in q_ids], "query",
                                                                           args.batch_size), args.store)
        seconds = time.time() - t0
        print(f"encoded {len(corpus)} docs + {len(q_ids)} queries in {seconds:.1f}s "
              f"({(len(corpus) + len(q_ids)) / seconds:.1f} texts/s) -> {args.out}")

if __name__ == "__main__":
    data.run(main, parser)
