r"""The course's lesson on many processes (docs/course.md): the same steps of train.py in one
process and in two (torchrun, gloo on the CPU), compared step by step.

    python experiments/course_dist.py --seed 0  # -> runs/course/dist_s0/{one,two}
    python experiments/course_dist.py --seed 0 --out runs/course/mine_s0  # after editing train.py

Both runs start from all-MiniLM-L6-v2 with its dropout set to 0 (a copy in RUN/model_p0):
with dropout on, each process would draw its own masks and the two runs differ by that noise alone.
Two processes each embed half of the batch; every process gathers the other's documents, so each
query still sees the whole batch's 31 negatives, and the all-reduced gradient is the one process's.
Prints each step's loss and gradient norm from both logs, and how far the final weights are apart
(relative to how far training moved them).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
import cli  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--steps", type=int, default=3, help="Steps of each run.")
parser.add_argument("--course", default=os.environ.get("COURSE", "runs/course"),
                    help="The course's folder (experiments/course_data.py's parent), from the "
                         "current folder.")
parser.add_argument("--model", default=cli.default_model(), help="The model to start from.")
parser.add_argument("--out", help="Where the two runs go. Default: COURSE/dist_sSEED.")

def without_dropout(model, out):
    """A copy of the Hugging Face folder model with every dropout probability 0."""
    def write(folder):
        shutil.copytree(model, folder, dirs_exist_ok=True)
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
        config["hidden_dropout_prob"] = config["attention_probs_dropout_prob"] = 0.0
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
    cli.write_folder(out, "course_dist.py", write)

def train(processes, model, dataset, out, args):
    flags = ["train.py", "--model", model, "--dataset", dataset,
             "--split", "train", "--passage_max_len", "128", "--max_steps", str(args.steps),
             "--seed", str(args.seed), "--log_every", "1", "--out_dir", out, "--overwrite"]
    if processes == 1:
        cmd = [sys.executable, *flags]
    else:
        cmd = ["torchrun", "--standalone", "--nproc_per_node", str(processes), *flags]
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    with open(os.path.join(out, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    weights = torch.load(os.path.join(out, "train_state.pt"), weights_only=False)["model"]
    return log, weights

def flat(state):
    """All floating-point weights of a state dict, in one float64 vector."""
    tensors = [v for _, v in sorted(state.items()) if v.is_floating_point()]
    return torch.cat([v.flatten().double() for v in tensors])

def main(args):
    from model import BiEncoder
    course = os.path.abspath(args.course)  # absolute: the runs' working folder is the repository
    run = os.path.abspath(args.out or os.path.join(course, f"dist_s{args.seed}"))
    dataset = os.path.join(course, "scifact")
    if not os.path.isdir(dataset):  # the course's SciFact, built as course.sh builds it
        subprocess.run([sys.executable, "experiments/course_data.py", "--out", dataset], cwd=ROOT,
                       check=True)
    model = os.path.join(run, "model_p0")
    without_dropout(args.model, model)
    log_one, one = train(1, model, dataset, os.path.join(run, "one"), args)
    log_two, two = train(2, model, dataset, os.path.join(run, "two"), args)
    print("step | loss, 1 process | loss, 2 processes | grad norm, 1 | grad norm, 2")
    for a, b in zip(log_one, log_two):
        print(f"{a['step']:4} | {a['loss']:.6f} | {b['loss']:.6f} | {a['grad_norm']:.5f} | "
              f"{b['grad_norm']:.5f}")
    start = flat(BiEncoder(model).state_dict())
    moved = (flat(one) - start).norm()
    apart = (flat(one) - flat(two)).norm()
    print(f"weights after {args.steps} steps: 2 processes are {apart / moved:.2e} of the way that "
          f"training moved them away from 1 process's")

if __name__ == "__main__":
    main(parser.parse_args())
