"""train.py's checkpoints: out_dir/model/ (for inference) and out_dir/train_state.pt (everything an
exact resume needs), written so that a kill at any moment loses at most the steps since the last
save; a resume that checks it continues the same run; a fresh run that never mixes with an earlier
one; and SIGTERM or Ctrl-C, which finish the step and save.

A resumed run is the run it continues: every flag must be the one it started with, but those of
MAY_CHANGE, and what train.py derived from the flags and the data (its Setup: the group size, the
data's fingerprint, ...) must come out the same. --epochs and --max_steps may grow, which extends a
finished run: its batches are those a longer run would have seen (they depend on the seed and the
epoch alone), and its learning rate follows the schedule of the new length from the resumed step on.
"""
import dataclasses
import json
import os
import shutil
import signal
import sys

import torch
import torch.distributed as dist

import cli
from grad_cache import rng_state, set_rng_state

# The flags that may change between a run's start and its resume, taking effect from the resumed
# step on: where and how fast it runs, what it logs and when it saves, and its length.
MAY_CHANGE = ("device", "compile", "grad_checkpoint", "loss", "chunk_size", "eval_every",
              "save_every", "log_every", "example_log", "out_dir", "resume", "overwrite", "epochs",
              "max_steps")

def save(args, setup, step, parts, device, rank, world):
    """out_dir/model/ and out_dir/train_state.pt after this step, each replaced atomically, with
    every rank's RNG state (so that a resumed run draws the dropout masks this one would have).
    parts: {"model", "optimizer", "scheduler", "scaler"}, each saved by its state_dict."""
    rngs = [rng_state(device)]
    if world > 1:
        rngs = [None] * world
        dist.all_gather_object(rngs, rng_state(device))
    if rank == 0:
        final = os.path.join(args.out_dir, "model")
        tmp = os.path.join(cli.temp_folder(final), "model")  # the run's temporary folder
        shutil.rmtree(tmp, ignore_errors=True)
        with cli.disk_full_is_an_error(tmp):
            parts["model"].save(tmp)
        state = {name: part.state_dict() for name, part in parts.items()}
        state.update(step=step, rng=rngs, args=vars(args), setup=dataclasses.asdict(setup))
        path = os.path.join(args.out_dir, "train_state.pt")
        try:  # both written before either replaces the old: a full disk leaves the old pair whole
            cli.atomic_write(path, lambda f: torch.save(state, f), mode="wb")
        except cli.InputError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        cli.swap_in(tmp, final)
    if world > 1:
        dist.barrier()  # the others wait here, not inside the next step's collectives

def load(args, setup, total_steps, parts, device, rank, world):
    """Restore out_dir/train_state.pt into parts -> the number of steps it was saved after (0
    without one and --resume auto). The logs keep their lines up to that step: the later ones are
    redone."""
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
    check_same_run(path, state, args, setup)
    if total_steps < state["step"]:
        raise cli.InputError(f"{path}: saved after step {state['step']}, and --epochs "
                             f"{args.epochs} --max_steps {args.max_steps} end at step "
                             f"{total_steps}; a resume may extend a run, not shorten it")
    for name, part in parts.items():
        part.load_state_dict(state[name])
    # the learning rate of the resumed step as the schedule of this run's length gives it (the same
    # unless the run is extended)
    scheduler = parts["scheduler"]
    for group, base, factor in zip(parts["optimizer"].param_groups, scheduler.base_lrs,
                                   scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
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

def check_same_run(path, state, args, setup):
    """A resume continues the run of train_state.pt, or stops in one line: the same flags but those
    of MAY_CHANGE, and the same Setup derived from them and the data."""
    for name, value in vars(args).items():
        before = state["args"].get(name)  # .get: older checkpoints lack newer flags
        if name in ("model", "train_data", "dataset", "eval_dataset", "eval_queries"):
            same_place = [os.path.realpath(p) for p in as_list(before)] == [
                os.path.realpath(p) for p in as_list(value)]
            if same_place:  # a path written another way (a trailing slash, relative): the same
                continue
        if name not in MAY_CHANGE and before != value:
            raise cli.InputError(f"{path}: it was trained with --{name} {before}, not {value}; "
                                 f"use another --out_dir, or the same flags (only "
                                 f"{', '.join('--' + n for n in MAY_CHANGE)} may change)")
    for name, value in dataclasses.asdict(setup).items():
        before = state.get("setup", {}).get(name)
        if before != value:
            what = "other data" if name == "data_hash" else f"{name} {before}, not {value}"
            raise cli.InputError(f"{path}: it was trained with {what}; use another --out_dir, or "
                                 f"the same data and flags")

def as_list(paths):
    """A flag's path or paths as a list (none: [])."""
    if paths is None:
        return []
    return [paths] if isinstance(paths, str) else list(paths)

def check_fresh(out, args):
    """Before any work: a fresh run (no --resume) into an --out_dir that holds a run of train.py
    with a checkpoint is refused, unless --overwrite; so is a --model inside one of the names the
    run writes there, which it would replace while reading it. out: the folder's cli.Claim."""
    model = os.path.realpath(args.model)
    for name in out.names:
        inside = os.path.realpath(os.path.join(args.out_dir, name))
        if model == inside or model.startswith(inside + os.sep):
            raise cli.InputError(f"--model {args.model} is inside --out_dir's {name}, which this "
                                 f"run replaces; copy it elsewhere and give that as --model")
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

def watch_signals():
    """SIGTERM or SIGINT (Ctrl-C) no longer stop the process at once: the dict returned notes the
    signal, and the loop saves a checkpoint and exits after the step it is in."""
    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop

def exit_stopped(stop, step, out_dir, rank):
    """After the checkpoint of a run that a signal stopped: exit as that signal would have ended the
    process (status 128 + its number; a rank that did not get it says SIGTERM's). The run is not
    finished, so a script that goes on to evaluate its model (set -e, &&) stops here instead."""
    if rank == 0:
        print(f"\nstopped by a signal after step {step}; checkpoint in {out_dir} "
              f"(continue with --resume)")
    sys.exit(128 + (stop["signal"] or signal.SIGTERM))
