"""Stage: train data -> a fine-tuned bi-encoder checkpoint, by InfoNCE with in-batch and hard negatives.

    python train.py --batch_size 1024 --temp 0.02                        # bundled MiniLM on beir/nfcorpus/train
    python train.py --train_data runs/mined.jsonl --group_size 4 --out_dir runs/ft --epochs 2
    python train.py --dataset beir/scifact/train --out_dir runs/ft       # qrels positives, in-batch negatives only
    python train.py --out_dir runs/ft --resume                           # continue the last checkpoint exactly
    torchrun --nproc_per_node 8 train.py --batch_size 8192 ...           # --batch_size is the global batch

One step: take the next --batch_size queries, each with a group of 1 positive + (group_size - 1) hard negatives,
embed them all, and let every query see every document of the (global) batch as a negative. With --chunk_size
the batch is embedded by gradient caching (Gao et al. 2021): memory grows with the chunk, not the batch, and the
gradient is exactly that of the whole batch at once.

Writes out_dir/model/ (Hugging Face + sentence-transformers files), out_dir/train_state.pt (everything needed to
resume exactly) and out_dir/log.jsonl (one line a step). SIGTERM/SIGINT: finish the step, save, exit 0.
"""
import argparse
import gc
import json
import math
import os
import random
import resource
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data
from encode import distributed
from loss import accuracy, distill_kl, fused_info_nce, gather, info_nce, matryoshka
from model import BiEncoder, autocast, default_model, pick_device

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
# data
parser.add_argument("--train_data", default=None, help="FlagEmbedding jsonl (query, pos, neg, ...), e.g. from "
                                                       "mine.py; else the positives of --dataset's qrels")
parser.add_argument("--dataset", default="beir/nfcorpus/train", help="ir_datasets id or BEIR folder (with --split) "
                                                                     "used when --train_data is not given")
parser.add_argument("--split", default=None, help="split of a BEIR folder")
parser.add_argument("--group_size", type=int, default=None, help="1 positive + group_size-1 hard negatives a query "
                                                                 "(default 2 with negatives in the data, else 1)")
parser.add_argument("--query_max_len", type=int, default=None, help="query tokens (default: the model's)")
parser.add_argument("--passage_max_len", type=int, default=None, help="document tokens (default: the model's)")
parser.add_argument("--mask_false_negatives", type=int, default=1, help="1: a query's other positives in the batch "
                                                                        "are not its negatives; 0: off")
# model
parser.add_argument("--model", default=None, help="Hugging Face folder or checkpoint (default: bundled "
                                                  "all-MiniLM-L6-v2)")
parser.add_argument("--pooling", default=None, choices=["cls", "mean", "last"], help="default: the model's")
parser.add_argument("--query_prefix", default=None, help="instruction before each query (default: the model's)")
parser.add_argument("--doc_prefix", default=None, help="instruction before each document (default: the model's)")
parser.add_argument("--attention_dropout", type=float, default=None,
                    help="dropout on attention probabilities (default: the model's, 0.1 for BERT)")
parser.add_argument("--separate_towers", action="store_true", help="queries get their own copy of the encoder")
# optimisation
parser.add_argument("--batch_size", type=int, default=128, help="queries a step, over all ranks; the last partial "
                                                                "batch of an epoch is dropped")
parser.add_argument("--chunk_size", type=int, default=-1, help="gradient cache chunk (texts a forward pass); 0 = off; "
                                                               "-1 = auto (32 on CPU, 256 on GPU)")
parser.add_argument("--temp", type=float, default=0.02, help="InfoNCE temperature τ (BGE 0.02; sentence-transformers "
                                                             "scale 20 = 0.05)")
parser.add_argument("--loss", default="auto", choices=["auto", "reference", "fused"],
                    help="reference: readable info_nce; fused: tiled, O(tile) extra memory; auto: fused on GPU when "
                         "the logit matrix (batch x batch*group) has over 16M entries, else reference")
parser.add_argument("--teacher_temp", type=float, default=None, help="distil the data's pos_scores/neg_scores: add "
                                                                         "KL(teacher || student) over each group, "
                                                                         "teacher softmax at this temperature")
parser.add_argument("--mrl_dims", default=None, help="Matryoshka: comma-separated dims (e.g. 384,256,128,64); the "
                                                     "loss is summed over truncated, re-normalised prefixes")
parser.add_argument("--lr", type=float, default=2e-5, help="peak learning rate (AdamW)")
parser.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay")
parser.add_argument("--warmup", type=float, default=0.1, help="linear warmup: a fraction of all steps if < 1, "
                                                              "else a number of steps; then linear decay to 0")
parser.add_argument("--max_grad_norm", type=float, default=1.0, help="clip the gradient norm (0 = off)")
parser.add_argument("--epochs", type=int, default=1, help="passes over the train data")
parser.add_argument("--max_steps", type=int, default=0, help="stop after this many steps (0 = all epochs)")
# precision, hardware
parser.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="autocast dtype (weights and "
                                                                                    "loss stay fp32; default bf16 on "
                                                                                    "GPU, fp32 on CPU)")
parser.add_argument("--device", default="auto", help="cuda, cpu or auto")
parser.add_argument("--compile", action="store_true", help="torch.compile the encoder")
parser.add_argument("--seed", type=int, default=0, help="data order, groups and dropout (rank r uses seed + r)")
# output
parser.add_argument("--out_dir", default="runs/train", help="checkpoint, train_state.pt and log.jsonl go here")
parser.add_argument("--save_every", type=int, default=0, help="checkpoint every N steps (0 = only at the end)")
parser.add_argument("--log_every", type=int, default=1, help="print a log line every N steps")
parser.add_argument("--resume", nargs="?", const="last", default=None,
                    help="--resume: continue the checkpoint in --out_dir (error if none); --resume auto: only if one "
                         "exists")


# ---------------------------------------------------------------------------------------------------- batches

def make_batch(examples, indices, group_size, seed, epoch, use_ids):
    """Texts and false-negative keys of a batch: queries (B,), docs (B * G,) laid out per query
    [p_0, n_0,1 .. n_0,G-1, p_1, ...], d_keys (B * G,), pos_keys: each query's positive keys (lists), and the
    teacher scores of each group (B lists of G) when the data has pos_scores and neg_scores (else None)."""
    queries, docs, d_keys, pos_keys, teacher = [], [], [], [], []
    for i in indices:
        ex = examples[i]
        p, negs = data.sample_group(ex, group_size, seed, epoch, i)
        queries.append(ex.get("prompt", "") + ex["query"])
        docs += [ex["pos"][p]] + [ex["neg"][j] for j in negs]
        pk, nk = data.doc_keys(ex, "pos", use_ids), data.doc_keys(ex, "neg", use_ids)
        d_keys += [pk[p]] + [nk[j] for j in negs]
        pos_keys.append(pk)
        if "pos_scores" in ex and "neg_scores" in ex:
            teacher.append([ex["pos_scores"][p]] + [ex["neg_scores"][j] for j in negs])
    return queries, docs, d_keys, pos_keys, (teacher if len(teacher) == len(queries) else None)


def key_tensors(d_keys, pos_keys, device):
    """d_keys (N,) and q_pos_keys (B, P) padded with -1, keeping only the positives that occur among the
    documents (the others cannot be false negatives), so P stays small."""
    present = set(d_keys)
    kept = [[k for k in keys if k in present] for keys in pos_keys]
    width = max(1, max(len(k) for k in kept))
    q_pos = torch.tensor([k + [-1] * (width - len(k)) for k in kept], dtype=torch.int64)
    return torch.tensor(d_keys, dtype=torch.int64, device=device), q_pos.to(device)


# ---------------------------------------------------------------------------------------------------- one step

def length_chunks(tokens, chunk_size):
    """Split a tokenized batch into chunks of similar length, each trimmed to its own longest text.
    Returns (chunks, order): chunk k holds rows order[k*C:(k+1)*C] of the batch."""
    mask = tokens["attention_mask"]
    order = torch.argsort(mask.sum(1), descending=True, stable=True)
    chunks = []
    for idx in order.split(chunk_size):
        keep = mask[idx].any(0)  # columns with a real token in this chunk (left or right padding alike)
        chunks.append({k: v[idx][:, keep] for k, v in tokens.items()})
    return chunks, order


def rng_state(device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def set_rng_state(state, device):
    torch.set_rng_state(state[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[1], device)


def embed_step(model, tokens, kind, chunk_size, ctx, device):
    """Pass 1 of gradient caching: embed all texts chunk by chunk without autograd -> (embeddings in batch order,
    the chunks, their order, and the RNG state each chunk started from)."""
    chunks, order = length_chunks(tokens, chunk_size)
    states, parts = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(rng_state(device))
            with ctx:
                parts.append(model({k: v.to(device, non_blocking=True) for k, v in chunk.items()}, kind))
    emb = torch.empty((len(order), parts[0].shape[1]), dtype=parts[0].dtype, device=device)
    emb[order.to(device)] = torch.cat(parts)
    return emb, (chunks, order, states)


def replay_step(model, kind, cache, emb, grad, ctx, device):
    """Pass 2: re-embed each chunk with autograd under the RNG state it had in pass 1 (so dropout draws the same
    masks) and backpropagate its slice of the cached embedding gradient. Returns the largest difference between
    the pass-1 and pass-2 embeddings (0 when the replay is exact)."""
    chunks, order, states = cache
    err = torch.zeros((), device=device)
    for chunk, idx, state in zip(chunks, order.to(device).split(len(chunks[0]["input_ids"])), states):
        set_rng_state(state, device)
        with ctx:
            e = model({k: v.to(device, non_blocking=True) for k, v in chunk.items()}, kind)
        err = torch.maximum(err, (e.detach().float() - emb.detach()[idx].float()).abs().max())
        e.backward(grad[idx])
    return err


def train_step(model, q_tok, d_tok, loss_fn, chunk_size, ctx, scaler, device):
    """Forward and backward of one batch; parameter gradients accumulate in .grad.
    Returns (loss, q, d, replay_err)."""
    if chunk_size == 0:  # plain autograd through the whole batch: memory grows with the batch
        with ctx:
            q = model({k: v.to(device) for k, v in q_tok.items()}, "query")
            d = model({k: v.to(device) for k, v in d_tok.items()}, "doc")
        loss = loss_fn(q, d)
        scaler.scale(loss).backward()
        return loss.detach(), q.detach(), d.detach(), 0.0
    # Gradient caching. The loss depends on the parameters θ only through the embeddings e, so
    #   dL/dθ = sum over chunks c of (dL/de_c) · (de_c/dθ).
    # Pass 1 computes every e without a graph; the loss and its backward give dL/de for the whole batch (cheap:
    # B x N dot products); pass 2 recomputes each chunk's graph, one chunk at a time, and backpropagates dL/de_c.
    # Exact as long as pass 2 recomputes the same e: same chunks, same autocast, same dropout masks (RNG replay).
    q1, q_cache = embed_step(model, q_tok, "query", chunk_size, ctx, device)
    d1, d_cache = embed_step(model, d_tok, "doc", chunk_size, ctx, device)
    rng_after_pass1 = rng_state(device)
    q, d = q1.requires_grad_(), d1.requires_grad_()  # leaves: backward stops here
    loss = loss_fn(q, d)
    scaler.scale(loss).backward()
    err = torch.maximum(replay_step(model, "query", q_cache, q1, q.grad, ctx, device),
                        replay_step(model, "doc", d_cache, d1, d.grad, ctx, device))
    set_rng_state(rng_after_pass1, device)  # the next step's dropout continues from where pass 1 left it
    return loss.detach(), q.detach(), d.detach(), err.item()


def all_reduce_grads(params):
    """Sum parameter gradients over ranks: one all-reduce of one flat buffer a step, after the last chunk."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    for g, f in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(f.view_as(g))


# ---------------------------------------------------------------------------------------------------- checkpoints

def save_checkpoint(out_dir, model, state):
    """out_dir/model/ (for inference) and out_dir/train_state.pt (for resume), each replaced atomically:
    the folder is written beside and swapped in, the state file written to a temporary name and renamed."""
    tmp, final, old = (os.path.join(out_dir, n) for n in ("model.tmp", "model", "model.old"))
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(tmp)
    if os.path.isdir(final):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    data.atomic_write(os.path.join(out_dir, "train_state.pt"), lambda f: torch.save(state, f), mode="wb")


def rng_states():
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": cuda}


def restore_rng(s):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def plot_log(log_path, png):
    """Training curves from log.jsonl: loss, in-batch accuracy and learning rate against the step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(log_path) as f:
        rows = [json.loads(line) for line in f]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for ax, key in zip(axes, ("loss", "acc", "lr")):
        ax.plot([r["step"] for r in rows], [r[key] for r in rows])
        ax.set(xlabel="step", title={"acc": "in-batch accuracy"}.get(key, key))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    data.atomic_write(png, lambda f: fig.savefig(f, format="png", dpi=110), mode="wb")
    plt.close(fig)


def memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # peak RSS (Linux reports KiB)


# ---------------------------------------------------------------------------------------------------- main

def main(args):
    if args.resume not in (None, "last", "auto"):
        raise ValueError(f"--resume takes no value or 'auto', not {args.resume!r}")
    rank, world = distributed()
    device = pick_device(args.device)
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    chunk_size = args.chunk_size if args.chunk_size >= 0 else (256 if device.type == "cuda" else 32)
    say = print if rank == 0 else (lambda *a, **k: None)
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)  # dropout differs between ranks, as it would across one big batch

    # data
    if args.train_data:
        examples = data.read_train_jsonl(args.train_data)
    else:
        examples = data.examples_from_qrels(*data.load_dataset(args.dataset, args.split))
    has_negs = all(ex["neg"] for ex in examples)
    group_size = args.group_size or (2 if has_negs else 1)
    use_ids = all("pos_ids" in ex and ("neg_ids" in ex or not ex["neg"]) for ex in examples)
    if args.batch_size % world:
        raise ValueError(f"--batch_size {args.batch_size} must be divisible by the number of processes ({world})")
    steps_per_epoch = len(examples) // args.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"--batch_size {args.batch_size} is larger than the {len(examples)} training queries")
    total_steps = steps_per_epoch * args.epochs
    total_steps = min(total_steps, args.max_steps) if args.max_steps else total_steps
    warmup = int(args.warmup * total_steps) if args.warmup < 1 else int(args.warmup)
    local_b = args.batch_size // world

    # model and optimiser
    model = BiEncoder(args.model or default_model(), separate=args.separate_towers,
                      attention_dropout=args.attention_dropout, pooling=args.pooling,
                      query_prefix=args.query_prefix, doc_prefix=args.doc_prefix, query_max_len=args.query_max_len,
                      passage_max_len=args.passage_max_len).to(device)
    model.train()  # dropout on, as in the model's pretraining
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]  # no weight decay on biases and LayerNorm (as the HF Trainer)
    optimizer = torch.optim.AdamW([{"params": decay}, {"params": [p for p in params if p.ndim < 2],
                                                      "weight_decay": 0.0}],
                                  lr=args.lr, weight_decay=args.weight_decay, fused=device.type == "cuda")
    schedule = lambda s: (s + 1) / warmup if s < warmup else max(0.0, (total_steps - s) / max(1, total_steps - warmup))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "fp16")  # fp16 gradients underflow without it
    ctx = autocast(device, dtype)
    if args.compile:  # compiled dropout must draw eager's random numbers, or pass 2 would not replay pass 1
        torch._inductor.config.fallback_random = True
    encoder_fwd = torch.compile(model) if args.compile else model
    big = args.batch_size * args.batch_size * group_size > 2 ** 24 and device.type == "cuda"
    loss_impl = fused_info_nce if args.loss == "fused" or (args.loss == "auto" and big) else info_nce

    # resume
    state_path, log_path = (os.path.join(args.out_dir, n) for n in ("train_state.pt", "log.jsonl"))
    start = 0
    if args.resume:
        if os.path.isfile(state_path):
            state = torch.load(state_path, map_location="cpu", weights_only=False)
            if state["args"]["model"] != args.model or set(state["model"]) != set(model.state_dict()):
                raise data.InputError(f"{state_path}: this checkpoint was trained from --model "
                                      f"{state['args']['model'] or 'default'} (separate towers: "
                                      f"{state['args']['separate_towers']}), not {args.model or 'default'} "
                                      f"(separate towers: {args.separate_towers})")
            for name in ("batch_size", "seed", "group_size", "train_data", "dataset", "epochs"):
                if state["args"][name] != vars(args)[name]:  # the data position would mean another thing
                    raise data.InputError(f"{state_path}: it was trained with --{name} {state['args'][name]}, "
                                          f"not {vars(args)[name]}")
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            if len(state["rng"]) == world:
                restore_rng(state["rng"][rank])
            else:
                say(f"the checkpoint has RNG states of {len(state['rng'])} processes, not {world}: dropout is reseeded")
            start = state["step"]
            if rank == 0:  # keep the log up to the checkpoint (later steps are redone; a kill may cut a line)
                rows = []
                if os.path.isfile(log_path):
                    with open(log_path) as f:
                        rows = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= start]
                data.atomic_write(log_path, lambda f: f.writelines(rows))
            say(f"resumed {state_path} at step {start}")
        elif args.resume == "last":
            raise data.InputError(f"--resume: no checkpoint {state_path} (use --resume auto to start fresh)")

    say(f"{len(examples)} queries | group {group_size} | batch {args.batch_size} over {world} process(es) | "
        f"{args.batch_size * group_size - 1} negatives a query | chunk {chunk_size or 'off'} | {dtype} on {device} | "
        f"{total_steps} steps ({steps_per_epoch} a epoch), warmup {warmup} | {loss_impl.__name__}")
    os.makedirs(args.out_dir, exist_ok=True)
    stop = {"signal": None}
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, f: stop.update(signal=s))

    mrl_dims = [int(k) for k in args.mrl_dims.split(",")] if args.mrl_dims else None

    def loss_fn(q, d, keys, teacher):
        """q (b, D) this rank's queries, d (b*G, D) their documents -> loss of this rank's queries against the
        documents of all ranks (see loss.py), scaled so that the sum over ranks is the mean over the global batch."""
        infonce = lambda q, d: loss_impl(q, gather(d), args.temp, group_size, rank * local_b, *keys)
        loss = matryoshka(infonce, q, d, mrl_dims) if mrl_dims else infonce(q, d)
        if args.teacher_temp:  # distillation within each query's own group (local: no gather needed)
            loss = loss + distill_kl(q, d, teacher, args.temp, args.teacher_temp, group_size)
        return loss / world

    orders = {}  # epoch -> its example order (only the prefetch thread touches it)

    def prepare(step):
        """This rank's batch of a step, tokenised once, on the CPU. It runs in a background thread one step ahead
        (the tokenizer releases the GIL), so tokenising the next batch overlaps the device's work on this one."""
        epoch, b = divmod(step, steps_per_epoch)
        if epoch not in orders:
            orders.clear()
            orders[epoch] = data.epoch_order(len(examples), args.seed, epoch)
        batch_idx = orders[epoch][b * args.batch_size:(b + 1) * args.batch_size]
        queries, docs, d_keys, pos_keys, teacher = make_batch(examples, batch_idx, group_size, args.seed, epoch,
                                                              use_ids)
        local = slice(rank * local_b, (rank + 1) * local_b)
        return (epoch, model.tokenize(queries[local], "query"),
                model.tokenize(docs[local.start * group_size:local.stop * group_size], "doc"), d_keys,
                pos_keys[local], teacher and teacher[local])

    bar = tqdm(total=total_steps, initial=start, disable=rank != 0, desc="train", unit="step")
    log = open(log_path, "a" if start else "w") if rank == 0 else None  # a fresh run starts a fresh log
    step = start
    prefetch = ThreadPoolExecutor(1)
    next_batch = prefetch.submit(prepare, step)
    while step < total_steps:
        t0 = time.time()
        epoch, q_tok, d_tok, d_keys, pos_keys, teacher = next_batch.result()
        if step + 1 < total_steps:
            next_batch = prefetch.submit(prepare, step + 1)
        keys = key_tensors(d_keys, pos_keys, device) if args.mask_false_negatives else (None, None)

        if args.teacher_temp:
            if teacher is None:
                raise data.InputError(f"--teacher_temp needs pos_scores and neg_scores in every line of "
                                      f"{args.train_data} (mine.py writes them)")
            teacher = torch.tensor(teacher, device=device)  # (b, G)
        step_loss = lambda q, d: loss_fn(q, d, keys, teacher)
        loss, q, d, replay_err = train_step(encoder_fwd, q_tok, d_tok, step_loss, chunk_size, ctx, scaler, device)
        if world > 1:
            all_reduce_grads(params)
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm or float("inf")).item()
        # loss, accuracy and "a signal arrived" summed over ranks (so that all ranks stop after the same step)
        metrics = torch.tensor([loss.item(), accuracy(q, gather(d), group_size, rank * local_b) / world,
                                float(stop["signal"] is not None)], device=device)
        if world > 1:
            dist.all_reduce(metrics)
        loss_v, acc, stopping = metrics.tolist()
        if not math.isfinite(loss_v):
            bar.close()
            raise SystemExit(f"error: step {step + 1}: loss is {loss_v}. Try a lower --lr, --dtype bf16 or fp32 "
                             f"instead of fp16, a larger --temp, or check the data; the last good checkpoint is kept.")
        lr = scheduler.get_last_lr()[0]  # the learning rate this step used
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        seconds = time.time() - t0
        tokens = int(q_tok["attention_mask"].sum() + d_tok["attention_mask"].sum()) * world
        row = {"step": step, "epoch": epoch, "loss": loss_v, "acc": acc, "lr": lr,
               "grad_norm": grad_norm, "replay_err": replay_err, "q_per_s": args.batch_size / seconds,
               "tokens_per_s": tokens / seconds, "mem_gb": memory_gb(device), "seconds": seconds}
        if rank == 0:
            log.write(json.dumps(row) + "\n")
            log.flush()
            bar.update(1)
            if step % args.log_every == 0 or step == total_steps:
                tqdm.write(f"step {step}/{total_steps} | loss {loss_v:.4f} | acc {acc:.3f} | lr {row['lr']:.2e} | "
                           f"{row['q_per_s']:.1f} q/s | {row['tokens_per_s']:.0f} tok/s | mem {row['mem_gb']:.2f} GB")
        if (args.save_every and step % args.save_every == 0) or step == total_steps or stopping:
            rngs = [rng_states()]
            if world > 1:
                rngs = [None] * world
                dist.all_gather_object(rngs, rng_states())
            if rank == 0:
                save_checkpoint(args.out_dir, model, {
                    "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rngs,
                    "args": vars(args)})
        if stopping:
            say(f"\nstopped by a signal after step {step}; checkpoint in {args.out_dir} (continue with --resume)")
            break
    prefetch.shutdown(cancel_futures=True)
    bar.close()
    if rank == 0:
        log.close()
        plot_log(log_path, os.path.join(args.out_dir, "train.png"))
        say(f"saved {os.path.join(args.out_dir, 'model')} and train.png")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(parser.parse_args())
    gc.freeze()  # the exit then skips a collection over every object torch and transformers made: 1.2 s
