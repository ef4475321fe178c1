r"""The course's dataset (docs/course.md): SciFact with a corpus small enough that a 2-core CPU
scores a model in under a minute, the same for every student.

    python experiments/course_data.py  # -> runs/course/scifact (a BEIR folder: --split train/test)

Its corpus holds every document that a train or test query names as relevant (667 of SciFact's
5,183), and random others (fixed by seed 0) up to --docs. The queries and qrels are SciFact's own:
809 train queries, 300 test queries. Scores on it are higher than on the whole corpus (fewer
documents to confuse), so compare them with each other, not with published figures.
"""
import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import cli  # noqa: E402
import data  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
COURSE = os.environ.get("COURSE", "runs/course")  # the course's folder, as experiments/course.sh
parser.add_argument("--out", default=os.path.join(COURSE, "scifact"),
                    help="The BEIR folder to write. Default: COURSE/scifact (COURSE: runs/course).")
parser.add_argument("--docs", type=int, default=2000, help="Documents in the corpus.")

def main(args):
    corpus, train_queries, train = data.load_dataset("beir/scifact/train")
    test_queries, test = data.load_dataset("beir/scifact/test")[1:]
    relevant = {doc for qrels in (train, test) for docs in qrels.values() for doc in docs}
    others = sorted(set(corpus) - relevant)
    kept = relevant | set(random.Random(0).sample(others, max(0, args.docs - len(relevant))))

    def write(folder):
        with open(os.path.join(folder, "corpus.jsonl"), "w") as f:
            for doc in (doc for doc in corpus if doc in kept):  # in SciFact's order
                f.write(json.dumps({"_id": doc, "title": "", "text": corpus[doc]}) + "\n")
        with open(os.path.join(folder, "queries.jsonl"), "w") as f:
            for qid, text in {**train_queries, **test_queries}.items():
                f.write(json.dumps({"_id": qid, "text": text}) + "\n")
        os.mkdir(os.path.join(folder, "qrels"))
        for split, qrels in (("train", train), ("test", test)):
            with open(os.path.join(folder, "qrels", f"{split}.tsv"), "w") as f:
                f.write("query-id\tcorpus-id\tscore\n")
                for qid, docs in qrels.items():
                    f.writelines(f"{qid}\t{doc}\t{rel}\n" for doc, rel in docs.items())

    cli.write_folder(args.out, "course_data.py", write)
    print(f"{len(kept)} documents ({len(relevant)} relevant to a query), {len(train)} train and "
          f"{len(test)} test queries -> {args.out}")

if __name__ == "__main__":
    main(parser.parse_args())
