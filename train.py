"""Stage: train data -> a fine-tuned bi-encoder checkpoint, by InfoNCE with in-batch and hard
negatives.

    python train.py  # the NFCorpus recipe: MiniLM on NFCorpus's train qrels, 8 epochs
    python train.py --batch_size 1024 --temp 0.02  # BGE's batch and temperature, on a GPU
    python train.py --train_data runs/mined.jsonl --group_size 4 --epochs 3 --separate_towers \
        --out_dir runs/ft  # the SciFact recipe (experiments/scifact.sh, with mined negatives)
    python train.py --out_dir runs/ft --resume  # continue the last checkpoint exactly
    torchrun --nproc_per_node 8 train.py --batch_size 8192 ...  # --batch_size is the global batch

One step: take the next --batch_size queries, each with a group of 1 positive + (group_size - 1)
hard negatives, embed them all, and let every query see every document of the (global) batch as a
negative (loss.info_nce); then clip, step AdamW and its schedule. Read main() first: each extra it
calls has a file of its own (grad_cache, checkpoint, validation, run_log, negatives.Remining).

The defaults are the NFCorpus recipe of experiments/nfcorpus.sh (docs/results.md): NFCorpus's train
qrels, in-batch negatives, batch 32, 8 epochs, lr 1e-4 with 10% warmup, temperature 0.05, queries
cut at 64 tokens, no attention dropout. One default differs, --false_negative_margin auto (the
recipe: off): at BGE's batch 1024 and temperature 0.02 MiniLM gets worse on NFCorpus dev without it
(0.3021 -> 0.2540), better with it (-> 0.3177); at batch 32 it changed little (0.3069 against
0.3059 after 40 steps). On a GPU, bf16 and larger gradient-cache chunks change dropout's draws.

Writes out_dir/model/ (Hugging Face + sentence-transformers files), train_state.pt (to resume),
log.jsonl, train.png, best/ (the best on the dev set). SIGTERM or SIGINT: finish the step, save,
exit 128 + the signal's number (as if it had ended the process, so that a script stops there).
"""
import dataclasses
import functools
import math
import os
import time

import torch
from tqdm import tqdm

import checkpoint
import cli
import data
import grad_cache
import run_log
import sampler
from fused_loss import fused_info_nce
from loss import (accuracy, distill_kl, gather, info_nce, margin_mse, own_group_info_nce,
                  prefix)
from model import DTYPES, POOLINGS, for_training
from negatives import Remining
from validation import evaluate, load_eval_set

# the flags every stage shares (cli.SHARED_FLAGS): --model --dataset --split --dtype --device --seed
parser = cli.parser(__doc__, model=cli.default_model(), dataset="beir/nfcorpus/train", split=None,
                    dtype=None, device="auto", seed=0)
# data
parser.add_argument("--train_data", nargs="+",
                    help="FlagEmbedding jsonl files or folders of them (one file a batch; a name "
                         "ending in no_in_batch_neg: own groups only). Default: --dataset's qrels.")
parser.add_argument("--mix", default="size", choices=["size", "uniform"],
                    help="With several train files: batches from each as often as its size says, "
                         "or as often as from the largest.")
parser.add_argument("--group_size", type=cli.positive,
                    help="Documents a query: 1 positive + GROUP_SIZE - 1 of its negatives. "
                         "Default: 4 when the data has negatives (the SciFact recipe), else 1.")
parser.add_argument("--query_max_len", type=cli.positive,
                    help="Cut queries (with their instruction) at this many tokens (batches pad to "
                         "their longest text). Default: 64 beyond the query instruction.")
parser.add_argument("--passage_max_len", type=cli.positive,
                    help="Cut documents at this many tokens. Default: the model's (MiniLM: 256).")
parser.add_argument("--mask_false_negatives", type=int, default=1, choices=[0, 1],
                    help="1: a document that is another positive of a query is left out of its "
                         "negatives; 0: it counts as a negative.")
parser.add_argument("--false_negative_margin", type=cli.margin, default="auto",
                    help="Leave out of a query's negatives every term scoring more than this above "
                         "its positive (cosine): an unlabelled positive. auto: 2 x --temp (those "
                         "that would outweigh it e^2 = 7.4 times); off: keep them all.")
# model
parser.add_argument("--pooling", choices=POOLINGS, help="Pooling. Default: the model's.")
parser.add_argument("--query_prefix", help="An instruction before each query (the model's).")
parser.add_argument("--doc_prefix", help="An instruction before each document (the model's).")
parser.add_argument("--attention_dropout", type=cli.share, default=0.0,
                    help="Dropout on the attention probabilities in place of the model's: the "
                         "recipes' 0 is fast on a CPU (attention with dropout takes a slow path).")
parser.add_argument("--pool_prompt", type=int, choices=[0, 1],
                    help="0: pooling leaves out the instruction's tokens (sentence-transformers' "
                         "include_prompt false). Default: the model's.")
parser.add_argument("--separate_towers", action="store_true",
                    help="Train a query encoder and a document encoder, both starting from "
                         "--model, instead of one shared encoder.")
parser.add_argument("--compile", action="store_true", help="torch.compile the encoder.")
parser.add_argument("--lora_rank", type=cli.count,
                    help="Train LoRA adapters of this rank instead of every weight (0: off). "
                         "Default: 0, or FlagEmbedding's 64 for a decoder LLM.")
parser.add_argument("--lora_alpha", type=cli.rate, default=16,
                    help="LoRA's scale: the adapter adds (alpha / rank) * B @ A.")
parser.add_argument("--lora_dropout", type=cli.share, default=0.1,
                    help="Dropout on the adapters' input.")
parser.add_argument("--lora_targets", nargs="+",
                    help="The layers that get adapters. Default: the attention and MLP "
                         "projections (lora.BERT_TARGETS, lora.DECODER_TARGETS).")
parser.add_argument("--grad_checkpoint", action="store_true",
                    help="Recompute each layer's activations in backward instead of keeping them: "
                         "less memory, a larger --chunk_size, about a third more compute.")
# loss
parser.add_argument("--temp", type=cli.rate, default=0.05,
                    help="The InfoNCE temperature (the recipes' 0.05 is sentence-transformers' "
                         "scale 20; BGE uses 0.02).")
parser.add_argument("--directions", nargs="+", default=["qd"], choices=["qd", "dq", "qq", "dd"],
                    help="The terms of a query's softmax (loss.info_nce): qd, the documents "
                         "(always); dq, its positive against the other queries; qq, the queries; "
                         "dd, its positive against the other documents.")
parser.add_argument("--hardness", type=cli.nonnegative, default=0.0,
                    help="Weight each negative by exp(HARDNESS x its cosine): the harder, the "
                         "heavier (EmbeddingGemma: 5; 0: off).")
parser.add_argument("--loss", default="auto", choices=["auto", "reference", "fused"],
                    help="InfoNCE as loss.info_nce (reference) or tile by tile (fused_loss.py); "
                         "auto: fused where a GPU's logit matrix would exceed 16M entries.")
parser.add_argument("--mrl_dims", nargs="+", type=cli.positive,
                    help="Matryoshka: the loss sums the InfoNCE of each of these prefixes of the "
                         "embedding (e.g. 384 256 128 64): each alone retrieves well.")
parser.add_argument("--distill", choices=["kl", "margin_mse"],
                    help="Also learn the data's pos_scores and neg_scores (score.py writes them): "
                         "the KL of the two distributions over each group, or MarginMSE.")
parser.add_argument("--teacher_temp", type=cli.rate,
                    help="With --distill kl: the teacher's temperature. Default: --temp.")
# optimisation
parser.add_argument("--batch_size", type=cli.positive, default=32,
                    help="Queries a step, over all processes.")
parser.add_argument("--chunk_size", type=cli.count,
                    help="Texts a forward pass with gradient caching (grad_cache.py; 0: off): the "
                         "same gradient at a chunk's memory. Default: 32 on a CPU, sized on a GPU.")
parser.add_argument("--chunk_tokens", type=cli.positive,
                    help="Cut the gradient cache's chunks by a budget of tokens instead: a chunk's "
                         "longest text x its count at most this (long texts in small chunks).")
parser.add_argument("--lr", type=cli.rate, default=1e-4,
                    help="The peak learning rate of AdamW (chosen on the dev splits).")
parser.add_argument("--weight_decay", type=cli.nonnegative, default=0.01,
                    help="AdamW's weight decay.")
parser.add_argument("--warmup", type=cli.nonnegative, default=0.1,
                    help="Linear warmup: a fraction of all steps if below 1, else steps.")
parser.add_argument("--max_grad_norm", type=cli.nonnegative, default=1.0,
                    help="Clip the gradient norm to this (0: no clipping).")
parser.add_argument("--epochs", type=cli.positive, default=8, help="Passes over the train data.")
parser.add_argument("--max_steps", type=cli.count, default=0,
                    help="Stop after this many steps (0: after all epochs).")
# hard negatives mined again while training
parser.add_argument("--remine_every", type=cli.count, default=0,
                    help="Every N steps (0: never), mine each query's negatives again with the "
                         "weights of that step from --dataset's corpus (ANCE), used two steps on.")
parser.add_argument("--remine_range", type=cli.int_range, default="10-100",
                    help="With --remine_every: the rank window to sample negatives from.")
parser.add_argument("--remine_num_neg", type=cli.positive, default=7,
                    help="With --remine_every: negatives a query.")
parser.add_argument("--remine_margin", type=cli.share, default=0.95,
                    help="With --remine_every: mine.py's --margin.")
# evaluation while training
parser.add_argument("--eval_dataset",
                    help="A dataset to evaluate on while training. Default: --dataset's dev split "
                         "when training on its qrels and it has one; none: no evaluation.")
parser.add_argument("--eval_split", help="The split of a BEIR folder --eval_dataset.")
parser.add_argument("--eval_queries",
                    help="A file of query ids: evaluate on these only (a dev part of train).")
parser.add_argument("--eval_every", type=cli.count, default=0,
                    help="Evaluate every N steps (0: before the first and after the last only).")
parser.add_argument("--eval_metric", default="ndcg@10",
                    help="The measure that picks out_dir/best/.")
# output
parser.add_argument("--out_dir", default="runs/train",
                    help="Where model/, train_state.pt and log.jsonl go.")
parser.add_argument("--save_every", type=cli.count, default=0,
                    help="Write a checkpoint every N steps (0: only at the end).")
parser.add_argument("--log_every", type=cli.positive, default=1,
                    help="Print a log line every N steps.")
parser.add_argument("--example_log", action="store_true",
                    help="Also write out_dir/examples.jsonl: each train query's loss and its "
                         "positive's rank in the batch, every epoch (which queries stay hard).")
parser.add_argument("--resume", nargs="?", const="last", choices=["last", "auto"],
                    help="Continue --out_dir's checkpoint exactly (auto: only if there is one).")
parser.add_argument("--overwrite", action="store_true",
                    help="Start afresh in an --out_dir holding a run of train.py: that run's files "
                         "(only those) go before the first step.")

def out_files(args, eval_set):
    """What this run writes in --out_dir (its record there says so: cli.Claim); the rest is the
    user's, a name it does not write included."""
    names = ["model", "train_state.pt", "log.jsonl", "train.png"]
    optional = {"best": eval_set, "examples.jsonl": args.example_log, "remined": args.remine_every}
    return names + [name for name, written in optional.items() if written]

@dataclasses.dataclass
class Setup:
    """What this run derives from its flags and data (args keeps what the user typed); saved in
    train_state.pt, and a resume must derive the same."""
    group_size: int  # documents a query: --group_size, or 4 when the data has negatives, else 1
    margin: float | None  # --false_negative_margin (auto: 2 x --temp), None: off
    data_hash: str  # a fingerprint of the train data
    lora_rank: int = 0  # --lora_rank, or FlagEmbedding's 64 for a decoder
    normalize: bool = True  # the model's: Matryoshka prefixes are re-normalised as the whole is

def check_flags(args, world):
    """The checks of flags that need no data, each a one-line error before any work."""
    if args.batch_size % world:
        raise cli.InputError(f"--batch_size {args.batch_size} must be divisible by the number of "
                             f"processes ({world})")
    if args.mrl_dims and len(set(args.mrl_dims)) < len(args.mrl_dims):
        raise cli.InputError(f"--mrl_dims {' '.join(map(str, args.mrl_dims))}: a dimension twice")
    if args.teacher_temp and args.distill != "kl":
        raise cli.InputError("--teacher_temp applies to --distill kl only")
    if args.remine_every and args.distill:  # the teacher's scores are of the negatives it scored
        raise cli.InputError("--remine_every replaces the negatives that --distill's scores are "
                             "of; use one or the other")
    if "qd" not in args.directions:
        raise cli.InputError("--directions: qd (query against the documents) is always in")
    if args.loss == "fused" and (args.directions != ["qd"] or args.hardness):
        raise cli.InputError("--loss fused computes --directions qd without --hardness only")
    if args.chunk_tokens and args.chunk_size is not None:
        raise cli.InputError("--chunk_tokens and --chunk_size both cut the batch: give one")
    if args.overwrite and args.resume:
        raise cli.InputError("--overwrite starts afresh, --resume continues: give one of them")
    if not args.remine_every:
        cli.no_effect(args, parser, ("remine_range", "remine_num_neg", "remine_margin"),
                      "without --remine_every")
        if args.train_data:  # --dataset is then the corpus re-mining reads, and nothing else
            cli.no_effect(args, parser, ("dataset", "split"),
                          "with --train_data (the data to train on) unless --remine_every")

# --------------------------------------------------------------------------------------------- data

def load_data(args):
    """The train examples, checked against the flags before the model loads -> (data.TrainData, the
    group size: --group_size, or chosen from the data)."""
    train_data, group_size = data.load_train(args.train_data, args.dataset, args.split,
                                             args.group_size, args.batch_size, args.distill)
    if len(train_data.sources) == 1:
        cli.no_effect(args, parser, ("mix",), "with one train file")
    if not any(in_batch for _, _, in_batch in train_data.sources):  # own groups: nothing masked
        cli.no_effect(args, parser, ("mask_false_negatives", "false_negative_margin", "directions",
                                     "hardness"),
                      f"when every file is {data.NO_IN_BATCH_NEG} (a query sees its group alone)")
    return train_data, group_size

# --------------------------------------------------------------------------------------------- loss

def compute_loss(q, d, batch, args, setup):
    """The loss of this rank's queries q (b, D) and their documents d (b * G, D): the place to try
    another loss. InfoNCE against every rank's documents (a -no_in_batch_neg source: the query's own
    group only), over the whole embedding or summed over its --mrl_dims prefixes; plus, with
    --distill, the teacher's ranking in each group. Each term is a mean over this rank's queries."""
    G = setup.group_size
    d_all = gather(d)  # (W * b * G, D): every rank's documents are negatives of every query
    keys = ()
    if args.mask_false_negatives:
        keys = (batch["d_keys"].to(q.device), batch["q_pos_keys"].to(q.device))
    contrastive = functools.partial(info_nce, directions=args.directions, hardness=args.hardness)
    big = q.is_cuda and len(q) * len(d_all) > 2 ** 24  # this rank's logits: more than 16M entries
    plain = args.directions == ["qd"] and not args.hardness  # what the fused loss computes
    if args.loss == "fused" or (args.loss == "auto" and big and plain):
        contrastive = fused_info_nce
    loss = 0.0
    for dim in args.mrl_dims or [None]:  # None: the whole embedding
        q_dim = prefix(q, dim, setup.normalize)
        if batch["in_batch"]:
            d_dim = prefix(d_all, dim, setup.normalize)
            loss = loss + contrastive(q_dim, d_dim, args.temp, G, batch["offset"], *keys,
                                      margin=setup.margin)
        else:
            loss = loss + own_group_info_nce(q_dim, prefix(d, dim, setup.normalize), args.temp, G)
    if args.distill == "kl":
        teacher_temp = args.teacher_temp or args.temp
        loss = loss + distill_kl(q, d, batch["teacher"].to(q.device), args.temp, teacher_temp, G)
    elif args.distill == "margin_mse":
        loss = loss + margin_mse(q, d, batch["teacher"].to(q.device), G)
    return loss

# ----------------------------------------------------------------------------------------- one step

def train_step(model, batch, loss_fn, chunking, ctx, scaler, device):
    """Forward and backward of one batch: the parameters' gradients accumulate in .grad
    -> (loss, q, d, replay_err). Plain autograd through the whole batch, whose memory grows with it;
    with chunking, gradient caching (grad_cache.py) computes the same gradient at the memory of one
    chunk of texts."""
    try:
        if chunking:
            return grad_cache.step(model, batch, loss_fn, chunking, ctx, scaler, device)
        with ctx:
            q = model(batch["q"], "query")  # (b, D)
            d = model(batch["d"], "doc")  # (b * G, D)
        loss = loss_fn(q, d)
        scaler.scale(loss).backward()
        return loss.detach(), q.detach(), d.detach(), 0.0
    except torch.OutOfMemoryError:
        raise cli.InputError(f"out of memory at step {batch['step'] + 1}: lower --chunk_size or "
                             f"--chunk_tokens (now {chunking}; memory grows with a chunk, not with "
                             f"--batch_size) or --passage_max_len") from None

# ---------------------------------------------------------------------------------------- optimiser

def lr_factor(step, warmup, total):
    """The learning rate of a step, as a share of --lr: 1) linear warmup from 0 over the warmup
    steps, 2) then linear decay to 0 at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))

def make_optimizer(model, args, total_steps, device):
    """AdamW (no weight decay on biases and LayerNorms, as the Hugging Face Trainer) and its
    schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2]},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay,
                                  fused=device.type == "cuda")
    warmup = int(args.warmup * total_steps) if args.warmup < 1 else int(args.warmup)
    if warmup > total_steps:
        raise cli.InputError(f"--warmup {args.warmup:g}: the run has only {total_steps} steps; "
                             f"give fewer, or a fraction of them (0.1: a tenth)")
    schedule = functools.partial(lr_factor, warmup=warmup, total=total_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

# --------------------------------------------------------------------------------------------- main

def load_model(args, device, dtype, world):
    """The bi-encoder to train: --model with the flags' settings (model.for_training)."""
    frozen_dtype = torch.bfloat16 if dtype == "bf16" else None  # LoRA's frozen weights
    model = for_training(args.model, device, world, args.lora_rank, args.lora_alpha,
                         args.lora_dropout, args.lora_targets, frozen_dtype, args.grad_checkpoint,
                         args.compile, args.attention_dropout, pooling=args.pooling,
                         query_prefix=args.query_prefix, doc_prefix=args.doc_prefix,
                         query_max_len=args.query_max_len, passage_max_len=args.passage_max_len,
                         separate_towers=args.separate_towers or None, pool_prompt=args.pool_prompt)
    if args.query_max_len is None:  # the recipes' 64 tokens for the text, after its instruction
        instruction = model.prompt_length(model.settings["query_prefix"])
        model.settings["query_max_len"] = min(64 + instruction, model.settings["query_max_len"])
    if not model.lora_rank:  # --lora_rank 0, or left to a BERT's default
        cli.no_effect(args, parser, ("lora_alpha", "lora_dropout", "lora_targets"),
                      "without a --lora_rank (0, or a BERT's default)")
    if max(args.mrl_dims or [0]) > model.dim:
        raise cli.InputError(f"--mrl_dims {max(args.mrl_dims)}: the model's embeddings have "
                             f"{model.dim} dimensions")
    return model

def make_setup(args, group_size, train_data, model):
    """The run's Setup: what it derives from the flags, the data and the model."""
    margin = args.false_negative_margin
    if margin == "auto":  # documents that would outweigh the positive e^2 times in the softmax
        margin = 2 * args.temp
    return Setup(group_size, margin, data.fingerprint(train_data.examples), model.lora_rank,
                 model.settings["normalize"])

def main(args):
    device, rank, world = cli.setup_device(args.device)
    check_flags(args, world)
    dtype = cli.default_dtype(args.dtype, device)

    # the data: train examples (checked now, not hours later), the dev set, the number of steps
    train_data, group_size = load_data(args)
    eval_set = load_eval_set(args)
    sizes = [n for _, n, _ in train_data.sources]
    steps_per_epoch = len(sampler.batch_plan(sizes, args.batch_size, args.seed, 0,
                                             args.mix == "uniform"))
    total_steps = min(steps_per_epoch * args.epochs, args.max_steps or math.inf)
    # --remine_every: the negatives mined again while training, from --dataset's corpus
    remining = Remining(train_data, args.dataset, args.split, args.out_dir, args.remine_every,
                        args.remine_range, args.remine_num_neg, args.remine_margin, args.seed)
    # --out_dir: train.py's files there, held until main returns; nothing else touched
    out = cli.claim(args.out_dir, "train.py", out_files(args, eval_set), rank, world)
    if rank == 0:
        checkpoint.check_fresh(out, args)

    # the model, its optimiser and precision; dropout differs between ranks, as across one batch
    torch.manual_seed(args.seed + rank)
    model = load_model(args, device, dtype, world)
    setup = make_setup(args, group_size, train_data, model)
    chunking = grad_cache.chunking(args.chunk_size, args.chunk_tokens, model, device)
    optimizer, scheduler = make_optimizer(model, args, total_steps, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "fp16")  # fp16 needs loss scaling
    # the arithmetic in dtype (autocast); the weights and the optimiser's state stay float32
    ctx = torch.autocast(device.type, dtype=DTYPES[dtype], enabled=dtype != "fp32")
    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    start = 0
    if args.resume:
        start = checkpoint.load(args, setup, total_steps, parts, device, rank, world)
    if rank == 0 and not start:
        checkpoint.start_afresh(out, args)
    remining.resume(start, rank)
    if rank == 0:
        print(f"{len(train_data.examples)} queries | group {group_size} | batch {args.batch_size} "
              f"over {world} process(es) | {train_data.negatives(args.batch_size, group_size)} "
              f"negatives a query | {run_log.trainable(model)} | chunks {chunking} | {dtype} on "
              f"{device} | steps {start + 1}..{total_steps} ({steps_per_epoch} an epoch)")
    stop = checkpoint.watch_signals()
    log, example_log = run_log.open_logs(args, start, rank)
    if eval_set and not start:
        evaluate(model, eval_set, 0, args, dtype, log, rank, world)
    bar = tqdm(total=total_steps, initial=start, disable=rank != 0, desc="train", unit="step")
    batches = sampler.make_batches(model, train_data, remining.examples_at, args, setup,
                                   range(start, total_steps), rank, world)
    stopping = False  # by a signal: saved, but not finished
    for batch in batches:
        t0 = time.time()
        step = batch["step"] + 1

        # forward and backward: the gradient of this rank's loss accumulates in .grad
        loss_fn = functools.partial(compute_loss, batch=batch, args=args, setup=setup)
        loss, q, d, replay_err = train_step(model, batch, loss_fn, chunking, ctx, scaler, device)

        # gradients over ranks: averaged, once a step
        if world > 1:
            cli.all_reduce_grads(model.parameters(), world)
        acc = accuracy(q, gather(d), group_size, batch["offset"])
        loss, acc = cli.mean_over_ranks([loss.item(), acc], device, world)
        run_log.check_finite(loss, step)

        # clip and step
        scaler.unscale_(optimizer)
        max_norm = args.max_grad_norm or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
        lr = optimizer.param_groups[0]["lr"]  # the learning rate this step uses
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        # log
        seconds = time.time() - t0
        line = run_log.row(batch, loss, acc, lr, grad_norm, replay_err, seconds, args.batch_size,
                           device, world)
        if rank == 0:
            run_log.write(log, line, bar, args.log_every, total_steps)
        run_log.log_examples(example_log, q, d, batch, train_data.examples, args, setup, world)

        # evaluate, mine again, save
        if eval_set and (step == total_steps or (args.eval_every and step % args.eval_every == 0)):
            evaluate(model, eval_set, step, args, dtype, log, rank, world)
        remining.after_step(model, step, total_steps, device, rank, world)
        stopping = cli.any_rank(stop["signal"] is not None, device, world)
        if step == total_steps or stopping or (args.save_every and step % args.save_every == 0):
            checkpoint.save(args, setup, step, parts, device, rank, world)
        if stopping:
            break
    bar.close()
    if rank == 0:
        log.close()
        run_log.plot(args.out_dir, args.eval_metric)
        print(f"saved {os.path.join(args.out_dir, 'model')} and train.png")
    if world > 1:
        torch.distributed.destroy_process_group()
    if stopping:  # saved, but not finished: `train.py && evaluate.py` must not score this model
        checkpoint.exit_stopped(stop, step, args.out_dir, rank)

if __name__ == "__main__":
    cli.run(main, parser)
