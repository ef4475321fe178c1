"""Stage: model + texts -> embeddings on disk.

    python encode.py --dataset beir/scifact/test --out runs/emb                     # bundled all-MiniLM-L6-v2
    python encode.py --model runs/ft/model --dataset ../shared/data/scifact --split test --out runs/emb_ft
    torchrun --nproc_per_node 8 encode.py --dataset beir/nfcorpus/test --out runs/emb   # corpus split over ranks

Writes out/corpus.npy + corpus.ids.txt, out/queries.npy + queries.ids.txt (the queries the split's qrels name),
out/meta.json. Pooling, normalisation, prefixes and max lengths come from the checkpoint, never from flags.
Texts are sorted by length so each batch pads only to its own longest text; the order is restored on output.
"""
import argparse
import gc
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data
from model import autocast, default_model, for_inference, pick_device

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
# what to encode
parser.add_argument("--model", default=None, help="Hugging Face folder or checkpoint out_dir/model "
                                                  "(default: bundled all-MiniLM-L6-v2)")
parser.add_argument("--dataset", default="beir/scifact/test", help="ir_datasets id, or a BEIR folder with --split")
parser.add_argument("--split", default=None, help="split of a BEIR folder (test, dev, train)")
parser.add_argument("--max_len", type=int, default=None, help="override the checkpoint's passage max length")
# how
parser.add_argument("--batch_size", type=int, default=None, help="texts per forward pass (default 32 on CPU, 256 "
                                                                "on GPU)")
parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast dtype of the encoder")
parser.add_argument("--device", default="auto", help="cuda, cpu or auto")
parser.add_argument("--store", default="fp16", choices=["fp16", "fp32"], help="dtype of the saved .npy files")
parser.add_argument("--seed", type=int, default=0, help="unused by encoding (no randomness); kept for symmetry")
# output
parser.add_argument("--out", required=True, help="output folder")


def distributed():
    """(rank, world) under torchrun; (0, 1) otherwise. Initialises the process group once."""
    if "RANK" not in os.environ:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


@torch.no_grad()
def encode_texts(model, texts, kind, batch_size=None, dtype="fp32", device=None, progress=True):
    """Embed a list of texts ("query" or "doc") -> float32 numpy (len(texts), D), in the input order.
    Under torchrun every rank embeds a contiguous share of the length-sorted texts and all get the whole result."""
    device = device or next(model.parameters()).device
    batch_size = batch_size or (256 if device.type == "cuda" else 32)
    model.eval()
    rank, world = distributed()
    tokens = model.tokenize(texts, kind, padding=False)["input_ids"]  # tokenise once, pad per batch
    order = np.argsort([-len(t) for t in tokens], kind="stable")  # longest first: a memory error shows at once
    share = np.array_split(order, world)[rank]
    out = np.zeros((len(texts), model.dim), dtype=np.float32)
    bar = tqdm(total=len(share), desc="encode queries" if kind == "query" else "encode docs", unit=kind,
               disable=not progress or rank != 0, mininterval=2)
    for i in range(0, len(share), batch_size):
        idx = share[i:i + batch_size]
        batch = model.tokenizer.pad({"input_ids": [tokens[j] for j in idx]}, return_tensors="pt").to(device)
        with autocast(device, dtype):
            out[idx] = model(batch, kind).float().cpu().numpy()
        bar.update(len(idx))
    bar.close()
    if world > 1:  # every rank filled its rows; the others are zero: summing merges them (on the device: NCCL)
        merged = torch.from_numpy(out).to(device)
        dist.all_reduce(merged)
        out = merged.cpu().numpy()
    return out


def save_embeddings(out_dir, name, ids, emb, store="fp16"):
    """out_dir/name.npy (N, D) and out_dir/name.ids.txt (N lines), each written atomically."""
    data.atomic_write(os.path.join(out_dir, f"{name}.npy"),
                      lambda f: np.save(f, emb.astype(np.float16 if store == "fp16" else np.float32)), mode="wb")
    data.atomic_write(os.path.join(out_dir, f"{name}.ids.txt"), lambda f: f.writelines(i + "\n" for i in ids))


def load_embeddings(folder, name):
    """(ids, float32 matrix) of an encode.py folder; a count or dimension mismatch is an InputError."""
    npy, txt = os.path.join(folder, f"{name}.npy"), os.path.join(folder, f"{name}.ids.txt")
    for path in (npy, txt):
        if not os.path.isfile(path):
            raise data.InputError(f"{path}: file not found (is {folder} an encode.py output folder?)")
    emb = np.load(npy).astype(np.float32)
    with open(txt) as f:
        ids = [line.rstrip("\n") for line in f]
    if emb.ndim != 2 or emb.shape[0] != len(ids):
        raise data.InputError(f"{npy}: shape {emb.shape} does not match the {len(ids)} ids in {txt}")
    return ids, emb


def main(args):
    device = pick_device(args.device)
    rank, _ = distributed()
    model = for_inference(args.model or default_model(), device, args.dtype, passage_max_len=args.max_len)
    corpus, queries, _ = data.load_dataset(args.dataset, args.split)
    t0 = time.time()
    doc_ids, q_ids = list(corpus), list(queries)
    d = encode_texts(model, [corpus[i] for i in doc_ids], "doc", args.batch_size, args.dtype, device)
    q = encode_texts(model, [queries[i] for i in q_ids], "query", args.batch_size, args.dtype, device)
    seconds = time.time() - t0
    if rank == 0:
        save_embeddings(args.out, "corpus", doc_ids, d, args.store)
        save_embeddings(args.out, "queries", q_ids, q, args.store)
        data.write_json(os.path.join(args.out, "meta.json"), {
            "model": args.model or default_model(), "dataset": args.dataset, "split": args.split,
            **model.settings, "dtype": args.dtype, "store": args.store, "dim": model.dim,
            "count": {"corpus": len(doc_ids), "queries": len(q_ids)}, "seconds": round(seconds, 1)})
        print(f"encoded {len(doc_ids)} docs + {len(q_ids)} queries in {seconds:.1f}s "
              f"({(len(doc_ids) + len(q_ids)) / seconds:.1f} texts/s) -> {args.out}")


if __name__ == "__main__":
    main(parser.parse_args())
    gc.freeze()  # the exit then skips a collection over every object torch and transformers made: 1.2 s
