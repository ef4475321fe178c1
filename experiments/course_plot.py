r"""The training loss of course runs, step by step, one line a run (docs/course.md).

    python experiments/course_plot.py runs/course/mined_s0 runs/course/label_s0 --out loss.png

Each argument is a train.py --out_dir; its log.jsonl has one line a step. The legend names each run
by its folder.
"""
import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")  # files only, no window
import matplotlib.pyplot as plt  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("runs", nargs="+", help="train.py output folders.")
parser.add_argument("--out", required=True, help="The PNG to write.")

def main(args):
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for run in args.runs:
        with open(os.path.join(run, "log.jsonl")) as f:
            log = [json.loads(line) for line in f]
        steps = [row["step"] for row in log]
        losses = [row["loss"] for row in log]
        ax.plot(steps, losses, label=os.path.basename(os.path.normpath(run)))
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (InfoNCE)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")

if __name__ == "__main__":
    main(parser.parse_args())
