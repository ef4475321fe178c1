"""Stage: train data -> a fine-tuned bi-encoder checkpoint, by InfoNCE with in-batch and hard
negatives.

    python train.py  # the NFCorpus recipe (see below)
    python train.py --batch_size 1024 --temp 0.02  # BGE's batch and temperature
    python train.py --train_data runs/mined.jsonl --epochs 3 --out_dir runs/ft  # the SciFact recipe
    python train.py --dataset beir/scifact/train --out_dir runs/ft
        # qrels positives, in-batch negatives only
    python train.py --train_data a.jsonl b.jsonl --eval_dataset beir/nfcorpus/dev --eval_every 20
        # a batch a file
    python train.py --train_data runs/mined.jsonl --separate_towers
        # a query tower and a document tower
    python train.py --train_data runs/mined.jsonl --mrl_dims 384 256 128 64  # Matryoshka embeddings
    python train.py --out_dir runs/ft --resume  # continue the last checkpoint exactly
    torchrun --nproc_per_node 8 train.py --batch_size 8192 ...  # --batch_size is the global batch

One step: take the next --batch_size queries, each with a group of 1 positive + (group_size - 1)
hard negatives, embed them all, and let every query see every document of the (global) batch as a
negative. With --chunk_size the batch is embedded by gradient caching (Gao et al. 2021): memory
grows with the chunk, not the batch, and the gradient is exactly that of the whole batch at once.

The defaults are the measured recipes of experiments/ (docs/quality.md): batch 32, 2 epochs, lr 1e-4
with 10% warmup, temperature 0.05, groups of 4 when the data has mined negatives
(experiments/scifact.sh, 3 epochs there) and in-batch negatives only when it has none
(experiments/nfcorpus.sh, on NFCorpus's train qrels, the default data). BGE's own setting is
--batch_size 1024 --temp 0.02 on a GPU. The false-negative margin (auto: 2 x --temp) was chosen
later, on NFCorpus dev for the README's two commands; the recipes ran without it (FNM=off there).

With several --train_data files each batch comes from one of them. With an evaluation set
(--eval_dataset, or by default the dev split of the --dataset whose qrels it trains on) the model is
scored before the first step, every --eval_every steps and after the last, and the best one so far
is kept in out_dir/best/ (with best/eval.json).

Writes out_dir/model/ (Hugging Face + sentence-transformers files), out_dir/train_state.pt
(everything needed to resume exactly), out_dir/log.jsonl (one line a step and one an evaluation) and
out_dir/train.png. SIGTERM or SIGINT: finish the step, save, exit 0.
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

import cli
import data
import lora
import negatives
import retrieval
import sampler
from fused_loss import fused_info_nce
from loss import (accuracy, distill_kl, gather, info_nce, margin_mse, own_group_info_nce,
                  per_query)
from model import DTYPES, POOLINGS, BiEncoder, for_inference

parser = cli.parser(__doc__, model=None, dataset="beir/nfcorpus/train", split=None, dtype=None,
                    device="auto", seed=0)
# data
parser.add_argument("--train_data", nargs="+",
                    help="FlagEmbedding jsonl files (query, pos, neg, ...), or folders of them; "
                         "each batch comes from one file. A path with -no_in_batch_neg in it: its "
                         "queries see only their own group (FlagEmbedding's switch). Default: the "
                         "positives of --dataset's qrels.")
parser.add_argument("--mix", default="size", choices=["size", "uniform"],
                    help="With several --train_data files: batches from each in proportion to its "
                         "size, or from each as often as from the largest.")
parser.add_argument("--group_size", type=cli.positive,
                    help="Documents a query: 1 positive + GROUP_SIZE - 1 of its negatives. "
                         "Default: 4 when the data has negatives (the SciFact recipe), else 1.")
parser.add_argument("--query_max_len", type=cli.positive,
                    help="Cut queries (with their instruction) at this many tokens. Default: the "
                         "model's (256 for all-MiniLM-L6-v2; batches pad to their longest text).")
parser.add_argument("--passage_max_len", type=cli.positive,
                    help="Cut documents at this many tokens. Default: the model's (256 for "
                         "all-MiniLM-L6-v2).")
parser.add_argument("--mask_false_negatives", type=int, default=1, choices=[0, 1],
                    help="1: a document that is another positive of a query is left out of its "
                         "negatives; 0: it counts as a negative.")
parser.add_argument("--false_negative_margin", type=cli.margin, default="auto",
                    help="Also leave out of a query's negatives every document scoring more than "
                         "this above its positive (cosine), taken for an unlabelled positive "
                         "(Qwen3-Embedding leaves out those 0.1 above). auto: 2 x --temp, i.e. "
                         "the documents that would outweigh the positive more than e^2 = 7.4 "
                         "times in the softmax (0.1 at the recipes' temperature, 0.04 at BGE's "
                         "0.02; chosen on NFCorpus dev, docs/quality.md); off: keep them all.")
# model
parser.add_argument("--pooling", choices=POOLINGS,
                    help="Pooling. Default: the model's.")
parser.add_argument("--query_prefix",
                    help="An instruction put before each query. Default: the model's.")
parser.add_argument("--doc_prefix",
                    help="An instruction put before each document. Default: the model's.")
parser.add_argument("--attention_dropout", type=cli.share,
                    help="Dropout on the attention probabilities. Default: the model's; 0 is the "
                         "fast setting on a CPU, where PyTorch's attention with dropout takes a "
                         "slow path.")
parser.add_argument("--separate_towers", action="store_true",
                    help="Train a query encoder and a document encoder, both starting from "
                         "--model, instead of one shared encoder.")
parser.add_argument("--compile", action="store_true", help="torch.compile the encoder.")
parser.add_argument("--lora_rank", type=cli.count,
                    help="Train LoRA adapters of this rank instead of every weight (0: off). "
                         "Default: 0, or FlagEmbedding's 64 for a decoder LLM.")
parser.add_argument("--lora_alpha", type=cli.rate, default=16,
                    help="LoRA's scale: the adapter adds (alpha / rank) * B @ A (FlagEmbedding's "
                         "16).")
parser.add_argument("--lora_dropout", type=cli.share, default=0.1,
                    help="Dropout on the adapters' input (FlagEmbedding's 0.1).")
parser.add_argument("--lora_targets", nargs="+",
                    help="The layers that get adapters. Default: qkv attn_out up down for our "
                         "Bert; q_proj k_proj v_proj o_proj gate_proj up_proj down_proj for a "
                         "decoder.")
parser.add_argument("--grad_checkpoint", action="store_true",
                    help="Recompute each layer's activations in backward instead of keeping them: "
                         "less memory, a larger --chunk_size, about a third more compute.")
# loss
parser.add_argument("--temp", type=cli.rate, default=0.05,
                    help="The InfoNCE temperature (the recipes' 0.05 is sentence-transformers' "
                         "scale 20; BGE uses 0.02).")
parser.add_argument("--loss", default="auto", choices=["auto", "reference", "fused"],
                    help="InfoNCE as loss.info_nce (reference) or tile by tile (fused_loss.py); "
                         "auto: fused where a GPU's logit matrix would exceed 16M entries.")
parser.add_argument("--mrl_dims", nargs="+", type=cli.positive,
                    help="Matryoshka: the loss is the sum of the InfoNCE of each of these prefixes "
                         "of the embedding (e.g. 384 256 128 64), so that each alone retrieves "
                         "well.")
parser.add_argument("--distill", choices=["kl", "margin_mse"],
                    help="Also learn the data's pos_scores and neg_scores (score.py writes them): "
                         "the KL of the two distributions over each group, or MarginMSE.")
parser.add_argument("--teacher_temp", type=cli.rate,
                    help="With --distill kl: the teacher's temperature. Default: --temp.")
# optimisation
parser.add_argument("--batch_size", type=cli.positive, default=32,
                    help="Queries a step, over all processes.")
parser.add_argument("--chunk_size", type=cli.count,
                    help="Texts a forward pass with gradient caching (0: off, the whole batch in "
                         "one graph). Default: 32 on a CPU; on a GPU sized from the model and the "
                         "length.")
parser.add_argument("--lr", type=cli.rate, default=1e-4,
                    help="The peak learning rate of AdamW (chosen on the dev splits: "
                         "docs/quality.md).")
parser.add_argument("--weight_decay", type=cli.nonnegative, default=0.01,
                    help="AdamW's weight decay.")
parser.add_argument("--warmup", type=cli.nonnegative, default=0.1,
                    help="Linear warmup: a fraction of all steps if below 1, else a number of "
                         "steps.")
parser.add_argument("--max_grad_norm", type=cli.nonnegative, default=1.0,
                    help="Clip the gradient norm to this (0: no clipping).")
parser.add_argument("--epochs", type=cli.positive, default=2, help="Passes over the train data.")
parser.add_argument("--max_steps", type=cli.count, default=0,
                    help="Stop after this many steps (0: after all epochs).")
# hard negatives mined again while training
parser.add_argument("--remine_every", type=cli.count, default=0,
                    help="Every N steps, mine each query's hard negatives again with the weights "
                         "of that step (ANCE-style; from --dataset's corpus, as mine.py does); "
                         "they are used from two steps on (the next batch is already made). 0: "
                         "off.")
parser.add_argument("--remine_range", type=cli.int_range, default="10-100",
                    help="With --remine_every: the rank window to sample negatives from.")
parser.add_argument("--remine_num_neg", type=cli.positive, default=7,
                    help="With --remine_every: negatives a query.")
parser.add_argument("--remine_margin", type=cli.share, default=0.95,
                    help="With --remine_every: keep a negative only if its score is below MARGIN x "
                         "the query's lowest positive score (0: off).")
# evaluation while training
parser.add_argument("--eval_dataset",
                    help="A dataset to evaluate on while training. Default: --dataset's dev split "
                         "when training on its qrels and it has one; none: no evaluation.")
parser.add_argument("--eval_split", help="The split of a BEIR folder --eval_dataset.")
parser.add_argument("--eval_queries",
                    help="A file of query ids: evaluate on these only (e.g. a dev part carved from "
                         "train).")
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
                    help="Also write out_dir/examples.jsonl: a line a train query an epoch, with "
                         "its loss and the rank of its positive in the batch (which queries stay "
                         "hard).")
parser.add_argument("--resume", nargs="?", const="last", choices=["last", "auto"],
                    help="Continue --out_dir's checkpoint exactly (auto: only if there is one).")
parser.add_argument("--overwrite", action="store_true",
                    help="Start afresh in an --out_dir that holds an earlier run of train.py: its "
                         "files go before the first step (only those: the folder's other files "
                         "stay).")

# What train.py writes in --out_dir (its record there says so: cli.Claim); the rest is the user's.
OUT_FILES = ("model", "best", "train_state.pt", "log.jsonl", "examples.jsonl", "train.png",
             "remined")

# --resume: the flags that define a run must be those it started with, or it would go on as another
# run; the others may change between the start and a resume, and then take effect from the resumed
# step on.
MUST_MATCH = ("model", "dataset", "split", "train_data", "mix", "group_size", "query_max_len",
              "passage_max_len", "mask_false_negatives", "false_negative_margin", "pooling",
              "query_prefix", "doc_prefix", "attention_dropout", "separate_towers", "lora_rank",
              "lora_alpha", "lora_dropout", "lora_targets", "remine_every", "remine_range",
              "remine_num_neg", "remine_margin", "temp", "mrl_dims", "distill", "teacher_temp",
              "batch_size", "lr", "weight_decay", "warmup", "max_grad_norm", "epochs", "max_steps",
              "seed", "dtype", "eval_dataset", "eval_split", "eval_queries", "eval_metric",
              "data_hash")
MAY_CHANGE = ("device", "compile", "grad_checkpoint", "loss", "chunk_size", "eval_every",
              "save_every", "log_every", "example_log", "overwrite")

def check_flags(args, world):
    """The checks of flags that need no data, each a one-line error before any work; and the
    false-negative margin that --temp decides."""
    if args.batch_size % world:
        raise cli.InputError(f"--batch_size {args.batch_size} must be divisible by the number of "
                             f"processes ({world})")
    if args.mrl_dims and len(set(args.mrl_dims)) < len(args.mrl_dims):
        raise cli.InputError(f"--mrl_dims {' '.join(map(str, args.mrl_dims))}: a dimension twice")
    if args.teacher_temp and args.distill != "kl":
        raise cli.InputError("--teacher_temp applies to --distill kl only")
    if args.false_negative_margin == "auto":
        args.false_negative_margin = 2 * args.temp
    if args.remine_every and args.distill:  # the teacher's scores are of the negatives it scored
        raise cli.InputError("--remine_every replaces the negatives that --distill's scores are "
                             "of; use one or the other")
    if args.overwrite and args.resume:
        raise cli.InputError("--overwrite starts afresh, --resume continues: give one of them")
    if not args.remine_every:
        cli.no_effect(args, parser, ("remine_range", "remine_num_neg", "remine_margin"),
                      "without --remine_every")
        if args.train_data:  # --dataset is then the corpus re-mining reads, and nothing else
            cli.no_effect(args, parser, ("dataset", "split"),
                          "with --train_data (the data to train on) unless --remine_every")
    if args.lora_rank == 0:
        cli.no_effect(args, parser, ("lora_alpha", "lora_dropout", "lora_targets"),
                      "with --lora_rank 0")

# --------------------------------------------------------------------------------------------- data

def load_examples(args):
    """The train examples, every source's after the other, checked against the flags before the
    model loads -> (examples, the sources [(file, number of examples, in-batch negatives)], whether
    every example has ids). Sets args.group_size where it was left to the data."""
    if args.train_data:
        sources = data.train_sources(args.train_data)
        parts = [data.read_train_jsonl(path) for path, _ in sources]
    else:
        sources = [(args.dataset, True)]
        parts = [data.examples_from_qrels(*data.load_dataset(args.dataset, args.split))]
    names = [path for path, _ in sources]
    if len(sources) == 1:
        cli.no_effect(args, parser, ("mix",), "with one train file")
    for source, part in zip(names, parts):
        if not part:
            raise cli.InputError(f"{source}: no training queries with a positive (are its qrels "
                                 f"for this split empty?)")
    examples = [ex for part in parts for ex in part]
    no_negs = [ex for ex in examples if not ex["neg"]]
    if args.group_size is None:
        # one line without negatives must not silently turn every query to in-batch negatives
        if no_negs and len(no_negs) < len(examples):
            ex = no_negs[0]
            raise cli.InputError(f"{' '.join(names)}: {len(no_negs)} of {len(examples)} queries "
                                 f"have no negatives (e.g. {ex.get('qid', ex['query'])!r}); give "
                                 f"--group_size 1 (in-batch negatives only) or mine theirs")
        args.group_size = 1 if no_negs else 4
    if args.group_size > 1 and no_negs:
        raise cli.InputError(f"{' '.join(names)}: {len(no_negs)} queries have no negatives but "
                             f"--group_size is {args.group_size}; mine negatives with mine.py or "
                             f"use --group_size 1")
    # a query must have some document besides its positive to be told from
    if args.group_size == 1 and args.batch_size == 1:
        raise cli.InputError("--batch_size 1 --group_size 1: each query sees only its own "
                             "positive, so the loss is 0 whatever the model; raise either")
    own_group_only = [name for name, in_batch in sources if not in_batch]
    if args.group_size == 1 and own_group_only:
        raise cli.InputError(f"{own_group_only[0]}: its queries see only their own group "
                             f"({data.NO_IN_BATCH_NEG}), so --group_size 1 leaves nothing to tell "
                             f"the positive from; give --group_size 2 or more")
    few = sum(0 < len(ex["neg"]) < args.group_size - 1 for ex in examples)
    if few:
        print(f"{few} queries have fewer than {args.group_size - 1} "
              f"negatives: theirs repeat within a group")
    if args.distill and args.group_size == 1:  # a group of one document: nothing to rank, no margin
        raise cli.InputError(f"--distill {args.distill} learns the teacher's ranking within each "
                             f"query's group; it needs --group_size 2 or more")
    if args.distill and not all("pos_scores" in ex and "neg_scores" in ex for ex in examples):
        raise cli.InputError("--distill needs pos_scores and neg_scores "
                             "in every line (score.py writes them)")
    for source, part in zip(names, parts):
        if len(part) < args.batch_size:
            raise cli.InputError(f"--batch_size {args.batch_size} is larger than the {len(part)} "
                                 f"training queries of {source}")
    # a fingerprint of the data: resuming on a changed file would silently continue another run
    text = json.dumps(examples, sort_keys=True).encode()
    args.data_hash = hashlib.blake2b(text, digest_size=8).hexdigest()
    use_ids = all("pos_ids" in ex and ("neg_ids" in ex or not ex["neg"]) for ex in examples)
    counted = [(name, len(part), in_batch) for (name, in_batch), part in zip(sources, parts)]
    return examples, counted, use_ids

def count_steps(args, sizes):
    """-> (steps an epoch, steps of the run), with sizes the examples of each source; a warmup
    longer than the run is an error."""
    steps_per_epoch = len(sampler.batch_plan(sizes, args.batch_size, args.seed, 0,
                                             args.mix == "uniform"))
    total_steps = min(steps_per_epoch * args.epochs, args.max_steps or math.inf)
    if args.warmup >= 1 and args.warmup > total_steps:
        raise cli.InputError(f"--warmup {args.warmup:g}: the run has only {total_steps} steps; "
                             f"give fewer, or a fraction of them (0.1: a tenth)")
    return steps_per_epoch, total_steps

def remine_corpus(args, examples, use_ids):
    """--remine_every: the corpus to mine from (--dataset's), which must hold every positive, by id.
    """
    if not args.remine_every:
        return None
    if not use_ids:
        raise cli.InputError("--remine_every needs the positives' ids (pos_ids) in every train "
                             "line")
    corpus = data.load_dataset(args.dataset, args.split)[0]
    for ex in examples:
        for doc_id in ex["pos_ids"]:
            if doc_id not in corpus:
                raise cli.InputError(f"--remine_every: positive {doc_id!r} of query "
                                     f"{ex.get('qid', ex['query'])!r} is not in {args.dataset}'s "
                                     f"corpus; give as --dataset the one the train data comes from")
    return corpus

def mined_path(args, step):
    """Where the negatives re-mined after a step go: a subfolder of --out_dir that is train.py's by
    its record, so that no file of the user's is ever taken for one."""
    return os.path.join(args.out_dir, "remined", f"step.{step:07d}.jsonl")

def with_negatives(examples, path):
    """The examples with the negatives of a re-mined file (one line each, in order); a query none
    of whose candidates passed the filters keeps the negatives it came with."""
    mined = [row for _, row in data.read_jsonl(path)]
    return [{**ex, **row} if row["neg"] else ex for ex, row in zip(examples, mined)]

def mined_versions(args, examples, start, rank):
    """{step: examples} for sampler.make_batches: the train data, and the negatives re-mined after
    each step up to start (the saved step) that are on disk. Files of later steps (written after the
    checkpoint a resume starts from) go."""
    versions = {0: examples}
    folder = os.path.join(args.out_dir, "remined")
    if not os.path.isdir(folder):
        return versions
    for name in sorted(os.listdir(folder)):
        step = int(name.split(".")[1])  # a name mined_path wrote: nothing else is in the folder
        if step <= start:
            versions[step] = with_negatives(examples, os.path.join(folder, name))
        elif rank == 0:
            os.remove(os.path.join(folder, name))
    return versions

def remine(model, corpus, versions, step, total_steps, args, device, rank, world):
    """--remine_every: after this step, each query's negatives mined again by the model as it is now
    (in eval mode: no dropout, no random numbers drawn), written to out_dir/remined/ before the
    step's checkpoint, and added to versions. Not after the last step: nothing would use them."""
    if not args.remine_every or step % args.remine_every or step == total_steps:
        return
    # the encoding, sharded, in the run's temporary folder (the next claim removes what a kill left)
    folder = os.path.join(cli.temp_folder(mined_path(args, step)), "remine")
    if rank == 0:
        shutil.rmtree(folder, ignore_errors=True)
    if world > 1:
        dist.barrier()
    model.eval()
    meta = {"model": f"{args.out_dir} at step {step}", "dataset": args.dataset, **model.settings,
            "model_fingerprint": retrieval.model_fingerprint(model)}
    retrieval.encode_corpus(model, corpus, folder, meta, 100_000, "fp32", None, rank, world)
    if rank == 0:
        docs = retrieval.Shards(folder, corpus, args.dataset, model)
        seed = f"{args.seed}/{step}"
        rows, _ = negatives.mine(model, docs, corpus, versions[0], args.remine_range,
                                 args.remine_num_neg, args.remine_margin, seed=seed, device=device)
        keep = ("neg", "neg_ids", "neg_scores")
        cli.write_jsonl(mined_path(args, step), [{k: row[k] for k in keep} for row in rows])
        shutil.rmtree(folder)
    if world > 1:
        dist.barrier()
    model.train()
    versions[step] = with_negatives(versions[0], mined_path(args, step))

# --------------------------------------------------------------------------------------------- loss

def prefix(x, dim, normalize):
    """The first dim dimensions of each embedding, re-normalised when the model normalises
    (Matryoshka)."""
    x = x[:, :dim]
    if normalize:
        x = torch.nn.functional.normalize(x, dim=-1)
    return x

def compute_loss(q, d, batch, args):
    """The loss of this rank's queries q (b, D) and their documents d (b * G, D): the place to try
    another loss. InfoNCE against the documents of every rank (or, for a -no_in_batch_neg source,
    against the query's own group only), over the whole embedding, or with --mrl_dims summed over
    those prefixes of it; plus, with --distill, the teacher's ranking within each query's group.
    Each term is a mean over this rank's queries (loss.py's convention for many processes)."""
    d_all = gather(d)  # (W * b * G, D): every rank's documents are negatives of every query
    keys = ()
    if args.mask_false_negatives:
        keys = (batch["d_keys"].to(q.device), batch["q_pos_keys"].to(q.device))
    contrastive = info_nce
    big = q.is_cuda and len(q) * len(d_all) > 2 ** 24  # this rank's logits: more than 16M entries
    if args.loss == "fused" or (args.loss == "auto" and big):
        contrastive = fused_info_nce
    contrastive = functools.partial(contrastive, margin=args.false_negative_margin)
    loss = 0.0
    for dim in args.mrl_dims or [None]:  # None: the whole embedding
        q_dim = q if dim is None else prefix(q, dim, args.normalize)
        if not batch["in_batch"]:
            d_own = d if dim is None else prefix(d, dim, args.normalize)
            loss = loss + own_group_info_nce(q_dim, d_own, args.temp, args.group_size)
            continue
        d_dim = d_all if dim is None else prefix(d_all, dim, args.normalize)
        loss = loss + contrastive(q_dim, d_dim, args.temp, args.group_size, batch["offset"], *keys)
    if args.distill == "kl":
        teacher_temp = args.teacher_temp or args.temp
        loss = loss + distill_kl(q, d, batch["teacher"].to(q.device), args.temp, teacher_temp,
                                 args.group_size)
    elif args.distill == "margin_mse":
        loss = loss + margin_mse(q, d, batch["teacher"].to(q.device), args.group_size)
    return loss

# ----------------------------------------------------------------------------------------- one step

def rng_state(device):
    """The generators dropout draws from: the CPU's, and the GPU's when training on one."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda

def set_rng_state(state, device):
    torch.set_rng_state(state[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[1], device)

def embed(model, tokens, kind, chunk_size, ctx, device):
    """Pass 1 of gradient caching: embed all texts chunk by chunk without autograd -> (the
    embeddings in batch order, and what pass 2 needs: the chunks, their order, and the RNG state
    each chunk started from)."""
    # (B, L): chunks of similar lengths, each trimmed to its longest text
    mask = tokens["attention_mask"]
    order = torch.argsort(mask.sum(1), descending=True, stable=True)
    chunks = []
    for idx in order.split(chunk_size):
        keep = mask[idx].any(0)  # the columns that are not padding in every text of the chunk
        chunks.append({k: v[idx][:, keep] for k, v in tokens.items()})
    states = []
    parts = []
    with torch.no_grad():
        for chunk in chunk_bar(chunks, f"pass 1, {kind} chunks"):
            states.append(rng_state(device))
            with ctx:
                parts.append(model(chunk, kind))
    emb = torch.empty((len(order), parts[0].shape[1]), dtype=parts[0].dtype, device=device)
    emb[order.to(device)] = torch.cat(parts)
    return emb, (chunks, order, states)

def chunk_bar(chunks, desc):
    """A progress bar over one step's chunks, on rank 0 and only when the step has many of them (a
    batch of 1024 on a CPU takes minutes a step)."""
    quiet = len(chunks) < 16 or (dist.is_initialized() and dist.get_rank() != 0)
    return tqdm(chunks, desc=desc, unit="chunk", leave=False, disable=quiet)

def replay(model, kind, cache, emb, grad, ctx, device):
    """Pass 2: re-embed each chunk with autograd under the RNG state it had in pass 1 (so dropout
    draws the same masks) and backpropagate its slice of the cached embedding gradient. -> the
    largest difference between the pass-1 and pass-2 embeddings (0 when the replay is exact)."""
    chunks, order, states = cache
    err = torch.zeros((), device=device)
    chunk_rows = order.to(device).split(len(chunks[0]["input_ids"]))
    todo = list(zip(chunks, chunk_rows, states))
    for chunk, idx, state in chunk_bar(todo, f"pass 2, {kind} chunks"):
        set_rng_state(state, device)
        with ctx:
            e = model(chunk, kind)
        err = torch.maximum(err, (e.detach().float() - emb.detach()[idx].float()).abs().max())
        e.backward(grad[idx])
    return err

def train_step(model, batch, loss_fn, chunk_size, ctx, scaler, device):
    """Forward and backward of one batch; the parameters' gradients accumulate in .grad.
    -> (loss, q, d, replay_err)."""
    if chunk_size == 0:  # plain autograd through the whole batch: memory grows with the batch
        with ctx:
            q = model(batch["q"], "query")
            d = model(batch["d"], "doc")
        loss = loss_fn(q, d)
        scaler.scale(loss).backward()
        return loss.detach(), q.detach(), d.detach(), 0.0
    # Gradient caching. The loss depends on the parameters θ only through the embeddings e, so
    #   dL/dθ = sum over chunks c of (dL/de_c) · (de_c/dθ).
    # Pass 1 computes every e without a graph; the loss and its backward give dL/de for the whole
    # batch (cheap: B x N dot products); pass 2 recomputes each chunk's graph, one chunk at a time,
    # and backpropagates dL/de_c. Exact as long as pass 2 recomputes the same e: same chunks, same
    # autocast, same dropout masks (RNG replay).
    q1, q_cache = embed(model, batch["q"], "query", chunk_size, ctx, device)
    d1, d_cache = embed(model, batch["d"], "doc", chunk_size, ctx, device)
    after_pass1 = rng_state(device)
    q = q1.requires_grad_()  # leaves: the loss's backward stops here, at dL/de
    d = d1.requires_grad_()
    loss = loss_fn(q, d)
    scaler.scale(loss).backward()
    q_err = replay(model, "query", q_cache, q1, q.grad, ctx, device)
    d_err = replay(model, "doc", d_cache, d1, d.grad, ctx, device)
    set_rng_state(after_pass1, device)  # the next step's dropout goes on from where pass 1 left it
    return loss.detach(), q.detach(), d.detach(), torch.maximum(q_err, d_err).item()

def auto_chunk(model, device):
    """Texts a forward pass when --chunk_size is not given: 32 on a CPU; on a GPU a budget of
    activations, 256 texts for BERT-base at 256 tokens, fewer for a wider, deeper model or longer
    documents."""
    if device.type == "cpu":
        return 32
    c = model.encoder.config
    budget = 256 * 256 * 768 * 12  # texts x tokens x width x layers of BERT-base's 256 texts
    return max(1, budget // (model.settings["passage_max_len"] * c.hidden_size
                             * c.num_hidden_layers))

def all_reduce_grads(params, world):
    """Average the parameters' gradients over ranks, once a step after the last chunk (loss.py's
    convention): every all-reduce started at once (asynchronously, in place: no copy), then waited
    for."""
    grads = [p.grad for p in params if p.grad is not None]
    for work in [dist.all_reduce(g, async_op=True) for g in grads]:
        work.wait()
    for g in grads:
        g.div_(world)

def mean_over_ranks(values, device, world):
    """The mean over ranks of a few numbers (this rank's loss and accuracy), for the log."""
    values = torch.tensor(values, device=device)
    if world > 1:
        dist.all_reduce(values)
    return (values / world).tolist()

def any_rank(flag, device, world):
    """Whether flag is true on any rank (a signal reached one of them): so that all stop after the
    same step."""
    flag = torch.tensor(float(flag), device=device)
    if world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())

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
    schedule = functools.partial(lr_factor, warmup=warmup, total=total_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

# -------------------------------------------------------------------------------------- checkpoints

def save_checkpoint(args, step, model, optimizer, scheduler, scaler, device, rank, world):
    """out_dir/model/ (for inference) and out_dir/train_state.pt (for resume, with every rank's RNG
    state, so that a resumed run draws the dropout masks this one would have), each replaced
    atomically."""
    rngs = [rng_state(device)]
    if world > 1:
        rngs = [None] * world
        dist.all_gather_object(rngs, rng_state(device))
    if rank == 0:
        final = os.path.join(args.out_dir, "model")
        tmp = os.path.join(cli.temp_folder(final), "model")  # the run's temporary folder
        shutil.rmtree(tmp, ignore_errors=True)
        with cli.disk_full_is_an_error(tmp):
            model.save(tmp)
        state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rngs,
                 "args": vars(args)}
        path = os.path.join(args.out_dir, "train_state.pt")
        try:  # both written before either replaces the old: a full disk leaves the old pair whole
            cli.atomic_write(path, lambda f: torch.save(state, f), mode="wb")
        except cli.InputError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        cli.swap_in(tmp, final)
    if world > 1:
        dist.barrier()  # the others wait here, not inside the next step's collectives

def load_checkpoint(args, model, optimizer, scheduler, scaler, device, rank, world):
    """Restore out_dir/train_state.pt -> the number of steps it was saved after (0 without one and
    --resume auto). The log keeps its lines up to that step: the later ones are redone."""
    path = os.path.join(args.out_dir, "train_state.pt")
    if not os.path.isfile(path):
        if args.resume == "last":
            raise cli.InputError(f"--resume: no checkpoint {path} "
                                 f"(use --resume auto to start fresh)")
        return 0
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise cli.InputError(f"{path}: cannot read it ({type(e).__name__}); "
                             f"use another --out_dir") from None
    for name in MUST_MATCH:
        before = state["args"].get(name)  # .get: older checkpoints lack newer flags
        if before != vars(args)[name]:
            what = ("other data" if name == "data_hash"
                    else f"--{name} {before}, not {vars(args)[name]}")
            raise cli.InputError(f"{path}: it was trained with {what}; use another --out_dir, or "
                                 f"the same flags (only {', '.join('--' + n for n in MAY_CHANGE)} "
                                 f"may change)")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    # else (another number of processes) dropout goes on from this run's seed
    if len(state["rng"]) == world:
        set_rng_state(state["rng"][rank], device)
    # the logs keep their lines up to the saved step: the later ones are redone
    for name in ("log.jsonl", "examples.jsonl"):
        log_path = os.path.join(args.out_dir, name)
        if rank == 0 and os.path.isfile(log_path):
            with open(log_path) as f:  # a kill may have cut the last line short
                rows = [line for line in f
                        if line.endswith("\n") and json.loads(line)["step"] <= state["step"]]
            cli.atomic_write(log_path, lambda f: f.writelines(rows))
    if rank == 0:
        print(f"resumed {path} after step {state['step']}")
    return state["step"]

def plot_log(log_path, png, metric):
    """Training curves from log.jsonl: loss, in-batch accuracy and learning rate against the step,
    and the evaluation metric when there is one."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(log_path) as f:
        rows = [json.loads(line) for line in f]
    curves = {key: [(r["step"], r[key]) for r in rows if key in r] for key in ("loss", "acc", "lr")}
    evals = [(r["step"], r["eval"][metric]) for r in rows if "eval" in r]
    if evals:
        curves[f"eval {metric}"] = evals
    fig, axes = plt.subplots(1, len(curves), figsize=(4.4 * len(curves), 3.5))
    for ax, (key, points) in zip(axes, curves.items()):
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if key.startswith("eval") else None)
        ax.set(xlabel="step", title="in-batch accuracy" if key == "acc" else key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    cli.atomic_write(png, lambda f: fig.savefig(f, format="png", dpi=110), mode="wb")
    plt.close(fig)

# --------------------------------------------------------------------------------------- evaluation

def load_eval_set(args):
    """(corpus, queries, qrels) to evaluate on while training, or None: --eval_dataset, else the dev
    split beside the --dataset whose qrels are the train data (an ir_datasets id such as
    beir/nfcorpus/train), if it has one."""
    ref = args.eval_dataset
    if ref is None and not args.train_data and not os.path.isdir(args.dataset):
        import ir_datasets
        dev = args.dataset.rsplit("/", 1)[0] + "/dev"
        if dev in ir_datasets.registry and dev != args.dataset:
            ref = dev
    if ref in (None, "none"):
        given = [flag for flag, value in (("--eval_queries", args.eval_queries),
                                          ("--eval_every", args.eval_every),
                                          ("--eval_split", args.eval_split)) if value]
        if given:
            raise cli.InputError(f"{given[0]} without an evaluation set: give --eval_dataset too")
        return None
    measures = retrieval.evaluate_run({"q": {"d": 1.0}}, {"q": {"d": 1}})[0]  # every measure's name
    if args.eval_metric not in measures:
        raise cli.InputError(f"--eval_metric {args.eval_metric}: not a measure; "
                             f"e.g. ndcg@10, recall@100, map")
    corpus, queries, qrels = data.load_dataset(ref, args.eval_split, "--eval_split")
    if args.eval_queries:
        qrels = {qid: qrels[qid] for qid in data.read_ids(args.eval_queries, qrels)}
    if not qrels:
        raise cli.InputError(f"--eval_dataset {ref}: no qrels to evaluate against")
    return corpus, queries, qrels

def evaluate(model, eval_set, step, args, dtype, log, rank, world):
    """Rank 0 saves the model to the run's temporary folder and scores it exactly as evaluate.py
    --model would
    (loaded from those files, weights in dtype; exact search, pytrec_eval), logs it, and keeps it as
    out_dir/best/ (with best/eval.json: its step and value; the best so far survives a resume) if it
    beats the best so far. The model being trained is not touched, nor its RNG; the other ranks
    wait."""
    if rank == 0:
        best = os.path.join(args.out_dir, "best")
        tmp = os.path.join(cli.temp_folder(best), "best")
        shutil.rmtree(tmp, ignore_errors=True)
        with cli.disk_full_is_an_error(tmp):
            model.save(tmp)
        candidate = for_inference(tmp, next(model.parameters()).device, dtype)
        means = retrieval.evaluate_model(candidate, *eval_set)[1]
        log.write(json.dumps({"step": step, "eval": means}) + "\n")
        log.flush()
        value = means[args.eval_metric]
        before = -math.inf
        if os.path.isfile(os.path.join(best, "eval.json")):
            before = data.read_json(os.path.join(best, "eval.json"))[args.eval_metric]
        if value > before:
            cli.write_json(os.path.join(tmp, "eval.json"), {"step": step, args.eval_metric: value})
            cli.swap_in(tmp, best)
        shutil.rmtree(tmp, ignore_errors=True)
        tqdm.write(f"eval step {step} | {args.eval_metric} {value:.4f} | "
                   f"best {max(value, before):.4f}")
    if world > 1:
        dist.barrier()

# --------------------------------------------------------------------------------------------- main

def load_model(args, device, dtype, world):
    """The bi-encoder to train: --model with the flags' settings, on the device, in train mode
    (dropout on, as in pretraining), its weights equal on every rank."""
    model = BiEncoder(args.model, attention_dropout=args.attention_dropout, pooling=args.pooling,
                      query_prefix=args.query_prefix, doc_prefix=args.doc_prefix,
                      query_max_len=args.query_max_len, passage_max_len=args.passage_max_len,
                      separate_towers=args.separate_towers or None).to(device).train()
    if max(args.mrl_dims or [0]) > model.dim:
        raise cli.InputError(f"--mrl_dims {max(args.mrl_dims)}: the model's embeddings have "
                             f"{model.dim} dimensions")
    if args.lora_rank is None:  # FlagEmbedding trains a decoder LLM through LoRA by default
        args.lora_rank = 64 if model.decoder else 0
        if not args.lora_rank:
            cli.no_effect(args, parser, ("lora_alpha", "lora_dropout", "lora_targets"),
                          "without --lora_rank (a BERT trains every weight by default)")
    if args.lora_rank:
        model.add_lora(args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets)
        if dtype == "bf16":  # the frozen weights in bf16, the adapters (and AdamW's state) float32
            for tower in model.towers():
                lora.frozen_to(tower, torch.bfloat16)
    if args.grad_checkpoint:
        model.grad_checkpoint()
    # the Matryoshka prefixes are re-normalised like the whole embedding
    args.normalize = model.settings["normalize"]
    if world > 1:  # a weight initialised at load (a new head) must start equal on every rank
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, 0)
    # compiled dropout must draw eager's random numbers, or pass 2 would not replay pass 1
    if args.compile:
        torch._inductor.config.fallback_random = True
        for tower in model.towers():
            tower.compile(dynamic=True)  # in place: the state dict keeps its names
    return model

def trainable(model):
    """How many of the model's weights train, e.g. "trainable 1.2M of 22.7M weights"."""
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"trainable {train / 1e6:.1f}M of {total / 1e6:.1f}M weights"

def log_row(batch, loss, acc, lr, grad_norm, replay_err, seconds, args, device, world):
    """One step's line of log.jsonl."""
    tokens = int(batch["q"]["attention_mask"].sum() + batch["d"]["attention_mask"].sum()) * world
    if device.type == "cuda":
        mem_gb = torch.cuda.max_memory_allocated(device) / 1e9
    else:  # peak resident memory of the process
        mem_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    return {"step": batch["step"] + 1, "epoch": batch["epoch"], "source": batch["source"],
            "loss": loss, "acc": acc, "lr": lr, "grad_norm": grad_norm, "replay_err": replay_err,
            "q_per_s": args.batch_size / seconds, "tokens_per_s": tokens / seconds,
            "seconds": seconds, "mem_gb": mem_gb}

def check_fresh(out, args):
    """Before any work: a fresh run (no --resume) into an --out_dir that holds a run of train.py
    with a checkpoint is refused, unless --overwrite."""
    earlier = out.present()
    if "train_state.pt" in earlier and not args.resume and not args.overwrite:
        raise cli.InputError(f"{args.out_dir} holds a run of train.py ({', '.join(earlier)}); "
                             f"continue it with --resume, replace it with --overwrite, or give "
                             f"another --out_dir")

def start_afresh(out, args):
    """A fresh run: an earlier run's files in --out_dir (train.py's, by the folder's record; with
    --overwrite, or left by a run killed before its first checkpoint, or --resume auto finding none)
    go before the first write, so that the folder never holds parts of two runs."""
    earlier = out.present()
    if earlier:
        out.clear()
        print(f"removed the earlier run's {', '.join(earlier)} from {args.out_dir}")

def open_logs(args, start, rank):
    """Rank 0's log.jsonl, and with --example_log examples.jsonl: appended to when resuming, else
    started afresh. -> (log, example log), None where there is none."""
    if rank != 0:
        return None, None
    mode = "a" if start else "w"
    log = open(os.path.join(args.out_dir, "log.jsonl"), mode)
    example_log = None
    if args.example_log:
        example_log = open(os.path.join(args.out_dir, "examples.jsonl"), mode)
    return log, example_log

def log_examples(example_log, q, d, batch, examples, args, world):
    """--example_log: each query of the batch, its loss and the rank of its positive among all the
    batch's documents, gathered from every rank and written by rank 0 (a line a query)."""
    if not args.example_log:
        return
    keys = ()
    if args.mask_false_negatives:
        keys = (batch["d_keys"].to(q.device), batch["q_pos_keys"].to(q.device))
    losses, ranks = per_query(q, gather(d), args.temp, args.group_size, batch["offset"], *keys,
                              margin=args.false_negative_margin)
    rows = []
    for e, loss, rank in zip(batch["examples"], losses.tolist(), ranks.tolist()):
        qid = examples[e].get("qid", str(e))
        rows.append({"step": batch["step"] + 1, "epoch": batch["epoch"], "example": e, "qid": qid,
                     "loss": loss, "rank": rank})
    if world > 1:
        every = [None] * world
        dist.all_gather_object(every, rows)
        rows = [row for part in every for row in part]
    if example_log is not None:
        example_log.writelines(json.dumps(row) + "\n" for row in rows)
        example_log.flush()

def write_log(log, row, bar, log_every, total_steps):
    """Rank 0: the step's line in log.jsonl, and every log_every steps (and at the last) on the
    screen: step | loss | in-batch accuracy | learning rate | queries/s | tokens/s | peak memory."""
    log.write(json.dumps(row) + "\n")
    log.flush()
    bar.update(1)
    step = row["step"]
    if step % log_every == 0 or step == total_steps:
        tqdm.write(f"step {step}/{total_steps} | loss {row['loss']:.4f} | acc {row['acc']:.3f} | "
                   f"lr {row['lr']:.2e} | {row['q_per_s']:.1f} q/s | "
                   f"{row['tokens_per_s']:.0f} tok/s | mem {row['mem_gb']:.2f} GB")

def check_finite(loss, step):
    if not math.isfinite(loss):
        raise cli.InputError(f"step {step}: loss is {loss}. Try a lower --lr, --dtype bf16 or "
                             f"fp32 instead of fp16, a larger --temp, or check the data; the "
                             f"last good checkpoint is kept.")

def watch_signals():
    """SIGTERM or SIGINT (Ctrl-C) no longer stop the process at once: the dict returned notes the
    signal, and the loop saves a checkpoint and exits after the step it is in."""
    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop

def main(args):
    device, rank, world = cli.setup_device(args.device)
    check_flags(args, world)
    dtype = cli.default_dtype(args.dtype, device)
    examples, sources, use_ids = load_examples(args)
    sizes = [size for _, size, _ in sources]
    corpus = remine_corpus(args, examples, use_ids)  # None without --remine_every
    eval_set = load_eval_set(args)
    steps_per_epoch, total_steps = count_steps(args, sizes)
    # held until main returns: train.py's files in --out_dir (OUT_FILES), and nothing else there
    out = cli.claim(args.out_dir, "train.py", OUT_FILES, rank, world)
    if rank == 0:
        check_fresh(out, args)

    # the model, its optimiser and precision
    # dropout differs between ranks, as it would across one big batch
    torch.manual_seed(args.seed + rank)
    model = load_model(args, device, dtype, world)
    chunk_size = args.chunk_size if args.chunk_size is not None else auto_chunk(model, device)
    optimizer, scheduler = make_optimizer(model, args, total_steps, device)
    # fp16 gradients underflow without a scaler
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "fp16")
    # the arithmetic in dtype (autocast), the weights and the optimiser's state stay float32
    ctx = torch.autocast(device.type, dtype=DTYPES[dtype], enabled=dtype != "fp32")
    start = (load_checkpoint(args, model, optimizer, scheduler, scaler, device, rank, world)
             if args.resume else 0)
    if rank == 0 and not start:
        start_afresh(out, args)

    if rank == 0:
        print(f"{len(examples)} queries | group {args.group_size} | batch {args.batch_size} over "
              f"{world} process(es) | {args.batch_size * args.group_size - 1} negatives a query | "
              f"{trainable(model)} | chunk {chunk_size or 'off'} | {dtype} on {device} | steps "
              f"{start + 1}..{total_steps} ({steps_per_epoch} an epoch)")
    stop = watch_signals()
    log, example_log = open_logs(args, start, rank)
    versions = mined_versions(args, examples, start, rank)
    if eval_set and not start:
        evaluate(model, eval_set, 0, args, dtype, log, rank, world)
    bar = tqdm(total=total_steps, initial=start, disable=rank != 0, desc="train", unit="step")
    steps = range(start, total_steps)
    for batch in sampler.make_batches(model, versions, sources, use_ids, args, steps, rank, world):
        t0 = time.time()
        step = batch["step"] + 1

        # forward and backward: the gradient of this rank's loss accumulates in .grad
        loss_fn = functools.partial(compute_loss, batch=batch, args=args)
        try:
            loss, q, d, replay_err = train_step(model, batch, loss_fn, chunk_size, ctx, scaler,
                                                device)
        except torch.OutOfMemoryError:
            raise cli.InputError(f"out of memory at step {step}: lower --chunk_size "
                                 f"(now {chunk_size}; memory grows with it, not "
                                 f"with --batch_size) or --passage_max_len") from None

        # gradients over ranks: averaged, once a step
        if world > 1:
            all_reduce_grads(model.parameters(), world)
        acc = accuracy(q, gather(d), args.group_size, batch["offset"])
        loss, acc = mean_over_ranks([loss.item(), acc], device, world)
        check_finite(loss, step)
        log_examples(example_log, q, d, batch, examples, args, world)

        # clip and step
        scaler.unscale_(optimizer)
        max_norm = args.max_grad_norm or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
        lr = scheduler.get_last_lr()[0]  # the learning rate this step uses
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        # log
        row = log_row(batch, loss, acc, lr, grad_norm, replay_err, time.time() - t0, args, device,
                      world)
        if rank == 0:
            write_log(log, row, bar, args.log_every, total_steps)

        # evaluate, and save
        if eval_set and (step == total_steps or (args.eval_every and step % args.eval_every == 0)):
            evaluate(model, eval_set, step, args, dtype, log, rank, world)
        remine(model, corpus, versions, step, total_steps, args, device, rank, world)
        stopping = any_rank(stop["signal"] is not None, device, world)
        if step == total_steps or stopping or (args.save_every and step % args.save_every == 0):
            save_checkpoint(args, step, model, optimizer, scheduler, scaler, device, rank, world)
        if stopping:
            if rank == 0:
                print(f"\nstopped by a signal after step {step}; checkpoint in {args.out_dir} "
                      f"(continue with --resume)")
            break
    bar.close()
    if rank == 0:
        log.close()
        plot_log(os.path.join(args.out_dir, "log.jsonl"), os.path.join(args.out_dir, "train.png"),
                 args.eval_metric)
        print(f"saved {os.path.join(args.out_dir, 'model')} and train.png")
    if world > 1:
        dist.destroy_process_group()

if __name__ == "__main__":
    cli.run(main, parser)
