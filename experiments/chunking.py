"""Step time and peak memory of the gradient cache's chunkings on the SciFact recipe (two towers,
batch 32, group 4): a few steps of train.py for each setting (its flags override the recipe's, but
for the two towers), the settings taking turns --reps times, each run a fresh process; a row gets
the median step time (the first step left out: it warms up) and the largest peak memory. Run it on
an idle machine, after experiments/scifact.sh has mined the negatives.
    python experiments/chunking.py --train_data runs/scifact/mined_m0.95.jsonl \\
        --out runs/chunking --settings "--chunk_size 32" "--chunk_tokens 8192" "--chunk_size 0"
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = ["--group_size", "4", "--batch_size", "32", "--separate_towers", "--false_negative_margin",
          "off", "--dtype", "fp32", "--log_every", "1"]
parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--train_data", required=True,
                    help="The recipe's mined negatives (mine.py's file).")
parser.add_argument("--out", required=True, help="A new folder for the runs.")
parser.add_argument("--settings", nargs="+", required=True,
                    help="train.py flags of each setting, each quoted.")
parser.add_argument("--steps", type=int, default=6, help="Steps of each run (at least 2).")
parser.add_argument("--reps", type=int, default=3, help="Runs of each setting.")
args = parser.parse_args()
if args.steps < 2:
    sys.exit("--steps: at least 2 (the first step is left out of the times)")
os.makedirs(args.out)  # a new folder: nothing already there is overwritten

runs = [[] for _ in args.settings]  # per setting, per run: its logged steps after the first
for rep in range(args.reps):
    for i, setting in enumerate(args.settings):
        out_dir = os.path.join(args.out, f"setting{i}_rep{rep}")
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--train_data", args.train_data,
               "--max_steps", str(args.steps), "--out_dir", out_dir, *RECIPE, *shlex.split(setting)]
        with open(out_dir + ".log", "w") as log:  # train.py's output, should a run fail
            subprocess.run(cmd, check=True, stdout=log, stderr=log)
        with open(os.path.join(out_dir, "log.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        rows = [r for r in rows if "seconds" in r]  # the training steps (not dev scores)
        runs[i].append(rows[1:])
        seconds = statistics.median(r["seconds"] for r in rows[1:])
        memory = max(r["mem_gb"] for r in rows)
        print(f"rep {rep} | {setting} | {seconds:.2f} s a step | {memory:.2f} GB", flush=True)

print("| setting | s a step (median) | tokens/s | peak memory GB | replay_err |")
print("|---|---|---|---|---|")
for setting, reps in zip(args.settings, runs):
    rows = [r for rep in reps for r in rep]
    seconds = statistics.median(r["seconds"] for r in rows)
    tokens = statistics.median(r["tokens_per_s"] for r in rows)
    memory = max(r["mem_gb"] for r in rows)  # the peak so far: the last step's is the run's
    err = max(r["replay_err"] for r in rows)
    print(f"| `{setting}` | {seconds:.2f} | {tokens:.0f} | {memory:.2f} | {err:g} |")
