"""Stage: train data -> a fine-tuned bi-encoder checkpoint, by InfoNCE with in-batch and hard negatives.

    python train.py --batch_size 1024 --temp 0.02                        # bundled MiniLM on beir/nfcorpus/train
    python train.py --train_data runs/mined.jsonl --group_size 4 --out_dir runs/ft --epochs 2
    python train.py --dataset beir/scifact/train --out_dir runs/ft       # qrels positives, in-batch negatives only
    python train.py --train_data a.jsonl b.jsonl --eval_dataset beir/nfcorpus/dev --eval_every 20  # a batch a file
    python train.py --out_dir runs/ft --resume                           # continue the last checkpoint exactly
    torchrun --nproc_per_node 8 train.py --batch_size 8192 ...           # --batch_size is the global batch

One step: take the next --batch_size queries, each with a group of 1 positive + (group_size - 1) hard negatives,
embed them all, and let every query see every document of the (global) batch as a negative. With --chunk_size
the batch is embedded by gradient caching (Gao et al. 2021): memory grows with the chunk, not the batch, and the
gradient is exactly that of the whole batch at once.

With several --train_data files, each batch comes from one of them. With an evaluation set (--eval_dataset, or by
default the dev split of the --dataset whose qrels it trains on), the model is scored before the first step, every
--eval_every steps and after the last, and the best one so far is kept in out_dir/best/ (with best/eval.json).

Writes out_dir/model/ (Hugging Face + sentence-transformers files), out_dir/train_state.pt (everything needed to
resume exactly) and out_dir/log.jsonl (one line a step and one an evaluation). SIGTERM/SIGINT: finish the step,
save, exit 0.
"""
import functools
import hashlib
import json
import math
import os
import resource
import shutil
import signal
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import retrieval
from loss import accuracy, distill_kl, fused_info_nce, gather, info_nce, margin_mse
from model import DTYPES, BiEncoder, for_inference, setup

parser = data.parser(__doc__, model=None, dataset="beir/nfcorpus/train", split=None, dtype=None, device="auto", seed=0)
# data
parser.add_argument("--train_data", nargs="+", help="FlagEmbedding jsonl files (query, pos, neg, ...), one a batch; "
                    "else --dataset's qrels positives")
parser.add_argument("--mix", default="size", choices=["size", "uniform"], help="files drawn in proportion to their "
                    "size, or each as often as the largest")
parser.add_argument("--group_size", type=data.positive, help="1 positive + G-1 negatives a query (default 2, or 1)")
parser.add_argument("--query_max_len", type=data.positive, help="query tokens (default: the model's)")
parser.add_argument("--passage_max_len", type=data.positive, help="document tokens (default: the model's)")
parser.add_argument("--mask_false_negatives", type=int, default=1, choices=[0, 1], help="0: other positives count")
# model
parser.add_argument("--pooling", choices=["cls", "mean", "last"], help="default: the model's")
parser.add_argument("--query_prefix", help="instruction before each query (default: the model's)")
parser.add_argument("--doc_prefix", help="instruction before each document (default: the model's)")
parser.add_argument("--attention_dropout", type=data.share, help="on attention probabilities (0: fast on CPU)")
# loss
parser.add_argument("--temp", type=data.rate, default=0.02, help="InfoNCE temperature (BGE 0.02; ST's scale 20 = 0.05)")
parser.add_argument("--loss", default="auto", choices=["auto", "reference", "fused"], help="auto: fused on big GPUs")
parser.add_argument("--distill", choices=["kl", "margin_mse"], help="also learn the data's pos/neg_scores (score.py)")
parser.add_argument("--teacher_temp", type=data.rate, help="--distill kl: the teacher's temperature (default: --temp)")
# optimisation
parser.add_argument("--batch_size", type=data.positive, default=128, help="queries a step, over all ranks")
parser.add_argument("--chunk_size", type=data.count, help="texts a forward pass (gradient cache); 0: off")
parser.add_argument("--lr", type=data.rate, default=2e-5, help="peak learning rate (AdamW)")
parser.add_argument("--weight_decay", type=data.nonnegative, default=0.01, help="AdamW weight decay")
parser.add_argument("--warmup", type=data.nonnegative, default=0.1, help="a fraction of steps if < 1, else steps")
parser.add_argument("--max_grad_norm", type=data.nonnegative, default=1.0, help="clip the gradient norm (0: off)")
parser.add_argument("--epochs", type=data.positive, default=1, help="passes over the train data")
parser.add_argument("--max_steps", type=data.count, default=0, help="stop after this many steps (0: all epochs)")
parser.add_argument("--compile", action="store_true", help="torch.compile the encoder")
# evaluation while training
parser.add_argument("--eval_dataset", help="dataset reference to evaluate on (default: --dataset's dev split, if "
                    "training on its qrels; none: off)")
parser.add_argument("--eval_split", help="split of a BEIR folder --eval_dataset")
parser.add_argument("--eval_queries", help="file of query ids: evaluate on these only (e.g. a dev part of train)")
parser.add_argument("--eval_every", type=data.count, default=0, help="evaluate every N steps (0: first and last only)")
parser.add_argument("--eval_metric", default="ndcg@10", help="the measure that picks out_dir/best/")
# output
parser.add_argument("--out_dir", default="runs/train", help="model/, train_state.pt and log.jsonl go here")
parser.add_argument("--save_every", type=data.count, default=0, help="checkpoint every N steps (0: only at the end)")
parser.add_argument("--log_every", type=data.positive, default=1, help="print a log line every N steps")
parser.add_argument("--resume", nargs="?", const="last", choices=["last", "auto"], help="continue --out_dir's "
                    "checkpoint (auto: if there is one)")

# ---------------------------------------------------------------------------------------------------- data

def load_examples(args):
    """The train examples, every source's after the other, checked against the flags before the model loads ->
    (examples, each source's count, whether every one has ids). Sets args.group_size where it was left to the data."""
    sources = args.train_data or [args.dataset]
    parts = ([data.read_train_jsonl(path) for path in args.train_data] if args.train_data else
             [data.examples_from_qrels(*data.load_dataset(args.dataset, args.split))])
    examples = [ex for part in parts for ex in part]
    no_negs = sum(not ex["neg"] for ex in examples)
    args.group_size = args.group_size or (1 if no_negs else 2)
    if args.group_size > 1 and no_negs:
        raise data.InputError(f"{' '.join(sources)}: {no_negs} queries have no negatives but --group_size is "
                              f"{args.group_size}; mine negatives with mine.py or use --group_size 1")
    if args.distill and not all("pos_scores" in ex and "neg_scores" in ex for ex in examples):
        raise data.InputError("--distill needs pos_scores and neg_scores in every line (score.py writes them)")
    for source, part in zip(sources, parts):
        if len(part) < args.batch_size:
            raise data.InputError(f"--batch_size {args.batch_size} is larger than the {len(part)} training queries "
                                  f"of {source}")
    # a fingerprint of the data: resuming on a changed file would silently continue another run
    args.data_hash = hashlib.blake2b(json.dumps(examples, sort_keys=True).encode(), digest_size=8).hexdigest()
    return examples, [len(part) for part in parts], all("pos_ids" in ex and ("neg_ids" in ex or not ex["neg"])
                                                         for ex in examples)

def batches(model, examples, sizes, use_ids, args, steps, rank, world):
    """The batch of each step as a dict, made from (seed, epoch, step) alone (data.batch_plan), so that a resumed
    run sees the same batches; made one step ahead in a background thread. This rank's queries (b,) and documents
    (b*G,) tokenised, laid out per query [p_0, n_0,1 .. n_0,G-1, p_1, ...]; the keys of the global batch's
    documents (B*G,) and of this rank's queries' positives (b, P), for the false-negative mask; teacher scores
    (b, G); the source (file) it came from."""
    plan = functools.lru_cache(1)(lambda epoch: data.batch_plan(sizes, args.batch_size, args.seed, epoch,
                                                                args.mix == "uniform"))
    b, sources, steps_per_epoch = args.batch_size // world, args.train_data or [args.dataset], len(plan(0))

    def make(step):
        epoch, i = divmod(step, steps_per_epoch)
        (source, batch), (queries, docs, d_keys, pos_keys, teacher) = plan(epoch)[i], ([], [], [], [], [])
        for n, e in enumerate(batch):
            ex = examples[e]
            p, negs = data.sample_group(ex, args.group_size, args.seed, epoch, e)
            pk, nk = data.doc_keys(ex, "pos", use_ids), data.doc_keys(ex, "neg", use_ids)
            d_keys += [pk[p]] + [nk[j] for j in negs]
            if n // b == rank:  # this rank's share of the global batch
                queries.append(ex.get("prompt", "") + ex["query"])
                docs += [ex["pos"][p]] + [ex["neg"][j] for j in negs]
                pos_keys.append(pk)
                if args.distill:
                    teacher.append([ex["pos_scores"][p]] + [ex["neg_scores"][j] for j in negs])
        width = max(map(len, pos_keys))
        return {"step": step, "epoch": epoch, "source": sources[source], "offset": rank * b,
                "q": model.tokenize(queries, "query"), "d": model.tokenize(docs, "doc"), "d_keys": torch.tensor(d_keys),
                "q_pos_keys": torch.tensor([k + [-1] * (width - len(k)) for k in pos_keys]),  # -1 pads
                "teacher": torch.tensor(teacher) if args.distill else None}
    return data.background(make(step) for step in steps)

# ---------------------------------------------------------------------------------------------------- loss

def compute_loss(q, d, batch, args):
    """The loss of this rank's queries q (b, D) and their documents d (b*G, D): the place to try another loss.
    InfoNCE against the documents of all ranks (loss.py's convention: scaled so that the sum over ranks is the
    mean over the global batch), plus distillation within each group."""
    device, world = q.device, dist.get_world_size() if dist.is_initialized() else 1
    keys = (batch["d_keys"].to(device), batch["q_pos_keys"].to(device)) if args.mask_false_negatives else ()
    big = q.shape[0] * world * d.shape[0] * world > 2 ** 24 and q.is_cuda  # the (B, N) logits over 16M entries
    info_nce_fn = fused_info_nce if args.loss == "fused" or (args.loss == "auto" and big) else info_nce
    loss = info_nce_fn(q, gather(d), args.temp, args.group_size, batch["offset"], *keys)  # d gathered: (W*b*G, D)
    teacher = batch["teacher"].to(device) if args.distill else None  # within each query's group: nothing gathered
    if args.distill == "kl":
        loss = loss + distill_kl(q, d, teacher, args.temp, args.teacher_temp or args.temp, args.group_size)
    elif args.distill == "margin_mse":
        loss = loss + margin_mse(q, d, teacher, args.group_size)
    return loss / world

# ---------------------------------------------------------------------------------------------------- one step

def rng_state(device):
    """The generators dropout draws from: the CPU's, and the GPU's when training on one."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None

def set_rng_state(state, device):
    torch.set_rng_state(state[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[1], device)

def embed(model, tokens, kind, chunk_size, ctx, device):
    """Pass 1 of gradient caching: embed all texts chunk by chunk without autograd -> (embeddings in batch order,
    and what pass 2 needs: the chunks, their order, and the RNG state each chunk started from)."""
    mask = tokens["attention_mask"]  # (B, L): chunks of similar lengths, each trimmed to its own longest text
    order = torch.argsort(mask.sum(1), descending=True, stable=True)
    chunks = [{k: v[idx][:, mask[idx].any(0)] for k, v in tokens.items()} for idx in order.split(chunk_size)]
    states, parts = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(rng_state(device))
            with ctx:
                parts.append(model(chunk, kind))
    emb = torch.empty((len(order), parts[0].shape[1]), dtype=parts[0].dtype, device=device)
    emb[order.to(device)] = torch.cat(parts)
    return emb, (chunks, order, states)

def replay(model, kind, cache, emb, grad, ctx, device):
    """Pass 2: re-embed each chunk with autograd under the RNG state it had in pass 1 (so dropout draws the same
    masks) and backpropagate its slice of the cached embedding gradient. Returns the largest difference between
    the pass-1 and pass-2 embeddings (0 when the replay is exact)."""
    chunks, order, states = cache
    err = torch.zeros((), device=device)
    for chunk, idx, state in zip(chunks, order.to(device).split(len(chunks[0]["input_ids"])), states):
        set_rng_state(state, device)
        with ctx:
            e = model(chunk, kind)
        err = torch.maximum(err, (e.detach().float() - emb.detach()[idx].float()).abs().max())
        e.backward(grad[idx])
    return err

def train_step(model, batch, loss_fn, chunk_size, ctx, scaler, device):
    """Forward and backward of one batch; parameter gradients accumulate in .grad. -> (loss, q, d, replay_err)."""
    if chunk_size == 0:  # plain autograd through the whole batch: memory grows with the batch
        with ctx:
            q, d = model(batch["q"], "query"), model(batch["d"], "doc")
        loss = loss_fn(q, d)
        scaler.scale(loss).backward()
        return loss.detach(), q.detach(), d.detach(), 0.0
    # Gradient caching. The loss depends on the parameters θ only through the embeddings e, so
    #   dL/dθ = sum over chunks c of (dL/de_c) · (de_c/dθ).
    # Pass 1 computes every e without a graph; the loss and its backward give dL/de for the whole batch (cheap:
    # B x N dot products); pass 2 recomputes each chunk's graph, one chunk at a time, and backpropagates dL/de_c.
    # Exact as long as pass 2 recomputes the same e: same chunks, same autocast, same dropout masks (RNG replay).
    q1, q_cache = embed(model, batch["q"], "query", chunk_size, ctx, device)
    d1, d_cache = embed(model, batch["d"], "doc", chunk_size, ctx, device)
    after_pass1 = rng_state(device)
    q, d = q1.requires_grad_(), d1.requires_grad_()  # leaves: backward stops here
    loss = loss_fn(q, d)
    scaler.scale(loss).backward()
    err = torch.maximum(replay(model, "query", q_cache, q1, q.grad, ctx, device),
                        replay(model, "doc", d_cache, d1, d.grad, ctx, device))
    set_rng_state(after_pass1, device)  # the next step's dropout continues from where pass 1 left it
    return loss.detach(), q.detach(), d.detach(), err.item()

def auto_chunk(model, device):
    """Texts a forward pass when --chunk_size is not given: 32 on a CPU; on a GPU a budget of activations, 256
    texts for BERT-base at 256 tokens, fewer for a wider, deeper model or longer documents."""
    c = model.encoder.config
    return 32 if device.type == "cpu" else max(1, 256 * 256 * 768 * 12 // (
        model.settings["passage_max_len"] * c.hidden_size * c.num_hidden_layers))

def all_reduce_grads(params):
    """Sum parameter gradients over ranks, once a step after the last chunk: every all-reduce started at once
    (asynchronously, on each gradient in place: no copy), then waited for."""
    for work in [dist.all_reduce(p.grad, async_op=True) for p in params if p.grad is not None]:
        work.wait()

# ---------------------------------------------------------------------------------------------------- checkpoints

def make_optimizer(model, args, total_steps, device):
    """AdamW (no weight decay on biases and LayerNorms, as the HF Trainer), linear warmup then linear decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2]}, {"params": [p for p in params if p.ndim < 2],
                                                              "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay, fused=device.type == "cuda")
    warmup = int(args.warmup * total_steps) if args.warmup < 1 else int(args.warmup)
    schedule = lambda s: (s + 1) / warmup if s < warmup else max(0.0, (total_steps - s) / max(1, total_steps - warmup))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

def swap_in(tmp, final):
    """Replace the folder final by the folder tmp (written beside it); a kill between the two renames leaves
    final.old, which data.claim puts back."""
    old = final + ".old"
    if os.path.isdir(final):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)

def save_checkpoint(args, step, model, optimizer, scheduler, scaler, device, rank, world):
    """out_dir/model/ (for inference) and out_dir/train_state.pt (for resume: with every rank's RNG state, so that
    a resumed run draws the dropout masks this one would have), each replaced atomically."""
    rngs = [rng_state(device)]
    if world > 1:
        rngs = [None] * world
        dist.all_gather_object(rngs, rng_state(device))
    if rank == 0:
        final = os.path.join(args.out_dir, "model")
        shutil.rmtree(final + ".tmp", ignore_errors=True)
        model.save(final + ".tmp")
        swap_in(final + ".tmp", final)
        state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rngs,
                 "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "args": vars(args)}
        data.atomic_write(os.path.join(args.out_dir, "train_state.pt"), lambda f: torch.save(state, f), mode="wb")
    if world > 1:
        dist.barrier()  # the others wait here, not inside the next step's collectives

def load_checkpoint(args, model, optimizer, scheduler, scaler, device, rank, world):
    """Restore out_dir/train_state.pt -> the number of steps it was saved after (0 without one and --resume
    auto). The log keeps the lines up to that step: later ones are redone."""
    path, log_path = (os.path.join(args.out_dir, n) for n in ("train_state.pt", "log.jsonl"))
    if not os.path.isfile(path):
        if args.resume == "last":
            raise data.InputError(f"--resume: no checkpoint {path} (use --resume auto to start fresh)")
        return 0
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise data.InputError(f"{path}: cannot read it ({type(e).__name__}); use another --out_dir") from None
    for name in ("model", "batch_size", "seed", "group_size", "train_data", "mix", "dataset",
                 "epochs", "data_hash", "eval_dataset", "eval_split", "eval_queries", "eval_metric"):
        if state["args"].get(name) != vars(args)[name]:  # another model, or a data position meaning another thing
            what = ("other data" if name == "data_hash" else
                    f"--{name} {state['args'].get(name)}, not {vars(args)[name]}")  # .get: older checkpoints lack some
            raise data.InputError(f"{path}: it was trained with {what}; use another --out_dir, or the same flags")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    if len(state["rng"]) == world:  # else (another number of processes) dropout goes on from this run's seed
        set_rng_state(state["rng"][rank], device)
    if rank == 0 and os.path.isfile(log_path):  # a kill may have cut the last line short
        with open(log_path) as f:
            rows = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= state["step"]]
        data.atomic_write(log_path, lambda f: f.writelines(rows))
        print(f"resumed {path} after step {state['step']}")
    return state["step"]

def plot_log(log_path, png, metric):
    """Training curves from log.jsonl: loss, in-batch accuracy and learning rate against the step, and the
    evaluation metric when there is one."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(log_path) as f:
        rows = [json.loads(line) for line in f]
    curves = {key: [(r["step"], r[key]) for r in rows if key in r] for key in ("loss", "acc", "lr")}
    evals = [(r["step"], r["eval"][metric]) for r in rows if "eval" in r]
    curves.update({f"eval {metric}": evals} if evals else {})
    fig, axes = plt.subplots(1, len(curves), figsize=(4.4 * len(curves), 3.5))
    for ax, (key, points) in zip(axes, curves.items()):
        ax.plot(*zip(*points), marker="o" if key.startswith("eval") else None)
        ax.set(xlabel="step", title={"acc": "in-batch accuracy"}.get(key, key))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    data.atomic_write(png, lambda f: fig.savefig(f, format="png", dpi=110), mode="wb")
    plt.close(fig)

# ---------------------------------------------------------------------------------------------------- evaluation

def load_eval_set(args):
    """(corpus, queries, qrels) to evaluate on while training, or None: --eval_dataset, else the dev split beside
    the --dataset whose qrels are the train data (an ir_datasets id such as beir/nfcorpus/train), if it has one."""
    ref = args.eval_dataset
    if ref is None and not args.train_data and not os.path.isdir(args.dataset):
        import ir_datasets
        dev = args.dataset.rsplit("/", 1)[0] + "/dev"
        ref = dev if dev in ir_datasets.registry and dev != args.dataset else None
    if ref in (None, "none"):
        return None
    if args.eval_metric not in retrieval.evaluate_run({"q": {"d": 1.0}}, {"q": {"d": 1}})[0]:  # the measures' names
        raise data.InputError(f"--eval_metric {args.eval_metric}: not a measure; e.g. ndcg@10, recall@100, map")
    corpus, queries, qrels = data.load_dataset(ref, args.eval_split)
    qrels = {q: qrels[q] for q in data.read_ids(args.eval_queries, qrels)} if args.eval_queries else qrels
    if not qrels:
        raise data.InputError(f"--eval_dataset {ref}: no qrels to evaluate against")
    return corpus, queries, qrels

def evaluate(model, eval_set, step, args, dtype, log, rank, world):
    """Rank 0 saves the model to out_dir/best.tmp and scores it exactly as evaluate.py --model would (loaded from
    those files, weights in dtype; exact search, pytrec_eval), logs it, and keeps it as out_dir/best/ (with
    best/eval.json: its step and value; the best so far survives a resume) if it beats the best so far. The
    model being trained is not touched (nor its RNG); the other ranks wait."""
    if rank == 0:
        best, tmp = os.path.join(args.out_dir, "best"), os.path.join(args.out_dir, "best.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save(tmp)
        means = retrieval.evaluate_model(for_inference(tmp, next(model.parameters()).device, dtype), *eval_set)[1]
        log.write(json.dumps({"step": step, "eval": means}) + "\n")
        log.flush()
        value, before = means[args.eval_metric], -math.inf
        if os.path.isfile(os.path.join(best, "eval.json")):
            before = data.read_json(os.path.join(best, "eval.json"))[args.eval_metric]
        if value > before:
            data.write_json(os.path.join(tmp, "eval.json"), {"step": step, args.eval_metric: value})
            swap_in(tmp, best)
        shutil.rmtree(tmp, ignore_errors=True)
        tqdm.write(f"eval step {step} | {args.eval_metric} {value:.4f} | best {max(value, before):.4f}")
    if world > 1:
        dist.barrier()

# ---------------------------------------------------------------------------------------------------- main

def main(args):
    device, rank, world = setup(args.device)
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    say = print if rank == 0 else (lambda *a, **k: None)
    if args.batch_size % world:
        raise data.InputError(f"--batch_size {args.batch_size} must be divisible by the number of processes ({world})")
    lock = data.claim(args.out_dir) if rank == 0 else None  # noqa: F841 (held until the process ends)
    examples, sizes, use_ids = load_examples(args)
    eval_set = load_eval_set(args)
    steps_per_epoch = len(data.batch_plan(sizes, args.batch_size, args.seed, 0, args.mix == "uniform"))
    total_steps = min(steps_per_epoch * args.epochs, args.max_steps or math.inf)

    # model and optimiser
    torch.manual_seed(args.seed + rank)  # dropout differs between ranks, as it would across one big batch
    model = BiEncoder(args.model, attention_dropout=args.attention_dropout, pooling=args.pooling,
                      query_prefix=args.query_prefix, doc_prefix=args.doc_prefix, query_max_len=args.query_max_len,
                      passage_max_len=args.passage_max_len).to(device).train()  # dropout on, as in pretraining
    if world > 1:  # a weight initialised at load (a new head) must start equal on every rank
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, 0)
    chunk_size = args.chunk_size if args.chunk_size is not None else auto_chunk(model, device)
    optimizer, scheduler = make_optimizer(model, args, total_steps, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "fp16")  # fp16 gradients underflow without it
    ctx = torch.autocast(device.type, dtype=DTYPES[dtype], enabled=dtype != "fp32")  # weights stay float32
    if args.compile:  # compiled dropout must draw eager's random numbers, or pass 2 would not replay pass 1
        torch._inductor.config.fallback_random = True
        model.encoder.compile(dynamic=True)  # in place: the state dict keeps its names
    start = load_checkpoint(args, model, optimizer, scheduler, scaler, device, rank, world) if args.resume else 0
    if rank == 0 and not start:  # a fresh run: an earlier run's best model is not this one's
        shutil.rmtree(os.path.join(args.out_dir, "best"), ignore_errors=True)

    say(f"{len(examples)} queries | group {args.group_size} | batch {args.batch_size} over {world} process(es) | "
        f"{args.batch_size * args.group_size - 1} negatives a query | chunk {chunk_size or 'off'} | {dtype} on "
        f"{device} | steps {start + 1}..{total_steps} ({steps_per_epoch} an epoch)")
    stop = {"signal": None}
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, f: stop.update(signal=s))
    log_path = os.path.join(args.out_dir, "log.jsonl")
    log = open(log_path, "a" if start else "w") if rank == 0 else None  # a fresh run starts a fresh log
    if eval_set and not start:
        evaluate(model, eval_set, 0, args, dtype, log, rank, world)
    bar = tqdm(total=total_steps, initial=start, disable=rank != 0, desc="train", unit="step")
    for batch in batches(model, examples, sizes, use_ids, args, range(start, total_steps), rank, world):
        t0 = time.time()
        loss_fn = lambda q, d: compute_loss(q, d, batch, args)
        try:
            loss, q, d, replay_err = train_step(model, batch, loss_fn, chunk_size, ctx, scaler, device)
        except torch.OutOfMemoryError:
            raise data.InputError(f"out of memory at step {batch['step'] + 1}: lower --chunk_size (now {chunk_size}; "
                                  f"memory grows with it, not with --batch_size) or --passage_max_len") from None
        if world > 1:
            all_reduce_grads(model.parameters())
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm or float("inf")).item()
        # loss, accuracy and "a signal arrived" summed over ranks (so that all ranks stop after the same step)
        metrics = torch.tensor([loss.item(), accuracy(q, gather(d), args.group_size, batch["offset"]) / world,
                                float(stop["signal"] is not None)], device=device)
        if world > 1:
            dist.all_reduce(metrics)
        loss_v, acc, stopping = metrics.tolist()
        step = batch["step"] + 1
        if not math.isfinite(loss_v):
            raise data.InputError(f"step {step}: loss is {loss_v}. Try a lower --lr, --dtype bf16 or fp32 instead "
                                  f"of fp16, a larger --temp, or check the data; the last good checkpoint is kept.")
        lr = scheduler.get_last_lr()[0]  # the learning rate this step used
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        seconds = time.time() - t0
        tokens = int(batch["q"]["attention_mask"].sum() + batch["d"]["attention_mask"].sum()) * world
        row = {"step": step, "epoch": batch["epoch"], "source": batch["source"], "loss": loss_v, "acc": acc, "lr": lr,
               "grad_norm": grad_norm, "replay_err": replay_err, "q_per_s": args.batch_size / seconds,
               "tokens_per_s": tokens / seconds, "seconds": seconds, "mem_gb": torch.cuda.max_memory_allocated(device)
               / 1e9 if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}
        if rank == 0:
            log.write(json.dumps(row) + "\n")
            log.flush()
            bar.update(1)
            if step % args.log_every == 0 or step == total_steps:
                tqdm.write(f"step {step}/{total_steps} | loss {loss_v:.4f} | acc {acc:.3f} | lr {lr:.2e} | "
                           f"{row['q_per_s']:.1f} q/s | {row['tokens_per_s']:.0f} tok/s | mem {row['mem_gb']:.2f} GB")
        if eval_set and (step == total_steps or (args.eval_every and step % args.eval_every == 0)):
            evaluate(model, eval_set, step, args, dtype, log, rank, world)
        if (args.save_every and step % args.save_every == 0) or step == total_steps or stopping:
            save_checkpoint(args, step, model, optimizer, scheduler, scaler, device, rank, world)
        if stopping:
            say(f"\nstopped by a signal after step {step}; checkpoint in {args.out_dir} (continue with --resume)")
            break
    bar.close()
    if rank == 0:
        log.close()
        plot_log(log_path, os.path.join(args.out_dir, "train.png"), args.eval_metric)
        say(f"saved {os.path.join(args.out_dir, 'model')} and train.png")
    if world > 1:
        dist.destroy_process_group()

if __name__ == "__main__":
    data.run(main, parser)
