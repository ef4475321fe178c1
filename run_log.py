"""train.py's record of a run: out_dir/log.jsonl (a line a step and one an evaluation), the line a
step on the screen, out_dir/examples.jsonl (--example_log: each query's loss, an epoch at a time)
and out_dir/train.png (the curves)."""
import json
import math
import os
import resource

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import cli
from loss import gather, per_query

def open_logs(args, start, rank):
    """Rank 0's log.jsonl, and with --example_log examples.jsonl: appended to when resuming, else
    started afresh. -> (log, example log), None where there is none."""
    if rank != 0:
        return None, None
    mode = "a" if start else "w"
    path = os.path.join(args.out_dir, "log.jsonl")
    cli.note_written(path)  # train.py's, by the folder's record
    log = open(path, mode)
    example_log = None
    if args.example_log:
        path = os.path.join(args.out_dir, "examples.jsonl")
        cli.note_written(path)
        example_log = open(path, mode)
    return log, example_log

def trainable(model):
    """How many of the model's weights train, e.g. "trainable 1.2M of 22.7M weights"."""
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"trainable {train / 1e6:.1f}M of {total / 1e6:.1f}M weights"

def row(batch, loss, acc, lr, grad_norm, replay_err, seconds, batch_size, device, world):
    """One step's line of log.jsonl."""
    tokens = int(batch["q"]["attention_mask"].sum() + batch["d"]["attention_mask"].sum()) * world
    if device.type == "cuda":
        mem_gb = torch.cuda.max_memory_allocated(device) / 1e9
    else:  # peak resident memory of the process
        mem_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    return {"step": batch["step"] + 1, "epoch": batch["epoch"], "source": batch["source"],
            "loss": loss, "acc": acc, "lr": lr, "grad_norm": grad_norm, "replay_err": replay_err,
            "q_per_s": batch_size / seconds, "tokens_per_s": tokens / seconds,
            "seconds": seconds, "mem_gb": mem_gb}

def write(log, line, bar, log_every, total_steps):
    """Rank 0: the step's line in log.jsonl, and every log_every steps (and at the last) on the
    screen: step | loss | in-batch accuracy | learning rate | queries/s | tokens/s | peak memory."""
    log.write(json.dumps(line) + "\n")
    log.flush()
    bar.update(1)
    step = line["step"]
    if step % log_every == 0 or step == total_steps:
        tqdm.write(f"step {step}/{total_steps} | loss {line['loss']:.4f} | acc {line['acc']:.3f} "
                   f"| lr {line['lr']:.2e} | {line['q_per_s']:.1f} q/s | "
                   f"{line['tokens_per_s']:.0f} tok/s | mem {line['mem_gb']:.2f} GB")

def log_examples(example_log, q, d, batch, examples, args, setup, world):
    """--example_log: each query of the batch, its loss and the rank of its positive among all the
    batch's documents, gathered from every rank and written by rank 0 (a line a query)."""
    if not args.example_log:
        return
    keys = ()
    if args.mask_false_negatives:
        keys = (batch["d_keys"].to(q.device), batch["q_pos_keys"].to(q.device))
    losses, ranks = per_query(q, gather(d), args.temp, setup.group_size, batch["offset"], *keys,
                              margin=setup.margin)
    rows = []
    for e, loss, rank in zip(batch["examples"], losses.tolist(), ranks.tolist()):
        qid = examples[e].get("qid", str(e))
        rows.append({"step": batch["step"] + 1, "epoch": batch["epoch"], "example": e, "qid": qid,
                     "loss": loss, "rank": rank})
    if world > 1:
        every = [None] * world
        dist.all_gather_object(every, rows)
        rows = [r for part in every for r in part]
    if example_log is not None:
        example_log.writelines(json.dumps(r) + "\n" for r in rows)
        example_log.flush()

def check_finite(loss, step):
    """A loss that is not a number stops the run in one line, before the optimizer steps on it."""
    if not math.isfinite(loss):
        raise cli.InputError(f"step {step}: loss is {loss}. Try a lower --lr, --dtype bf16 or "
                             f"fp32 instead of fp16, a larger --temp, or check the data; the "
                             f"last good checkpoint is kept.")

def smooth(values, width):
    """The mean of each value and the width - 1 before it (fewer at the start)."""
    sums = np.cumsum(np.insert(np.asarray(values, dtype=float), 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), width)
    ends = np.arange(1, len(values) + 1)
    return (sums[ends] - sums[ends - counts]) / counts

def plot(out_dir, metric):
    """out_dir/train.png from out_dir/log.jsonl: loss and in-batch accuracy against the step (each
    step faint, their moving mean over a twentieth of the run bold: one batch's values are noisy),
    the learning rate, and the evaluation metric when there is one; the run's folder as title."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    curves = {key: [(r["step"], r[key]) for r in rows if key in r] for key in ("loss", "acc", "lr")}
    evals = [(r["step"], r["eval"][metric]) for r in rows if "eval" in r]
    if evals:
        curves[f"eval {metric}"] = evals
    fig, axes = plt.subplots(1, len(curves), figsize=(4.4 * len(curves), 3.5))
    width = max(1, len(curves["loss"]) // 20)
    for ax, (key, points) in zip(axes, curves.items()):
        steps, values = zip(*points)
        if key in ("loss", "acc"):
            ax.plot(steps, values, alpha=0.3, color="C0")
            ax.plot(steps, smooth(values, width), color="C0", label=f"mean of {width} steps")
            ax.legend()
        else:
            ax.plot(steps, values, marker="o" if key.startswith("eval") else None)
        ax.set(xlabel="step", title="in-batch accuracy" if key == "acc" else key)
        ax.grid(alpha=0.3)
    fig.suptitle(os.path.basename(os.path.abspath(out_dir)))
    fig.tight_layout()
    png = os.path.join(out_dir, "train.png")
    cli.atomic_write(png, lambda f: fig.savefig(f, format="png", dpi=110), mode="wb")
    plt.close(fig)
