"""The researcher's loop: evaluation while training (the best model kept, through a resume), several
train files, a teacher's scores (score.py, train.py --distill), mining your own pairs
(mine.py --train_data, --consistency_k)."""
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

import cli
import data
import evaluate
import mine
import sampler
import score
import train
import validation
from conftest import NFCORPUS, ROOT, scifact_subset
from test_resume import wait_for_steps
from test_train import flat, make_train_file


@pytest.fixture(scope="module")
def subset(tmp_path_factory):
    return str(scifact_subset(tmp_path_factory.mktemp("subset"), n_queries=20, n_docs=200))


@pytest.fixture(scope="module")
def two_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("two")
    return (make_train_file(folder / "scifact.jsonl", n=24),
            make_train_file(folder / "nfcorpus.jsonl", n=16, folder=NFCORPUS))


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory):
    """A tiny random cross-encoder: BertForSequenceClassification with one label, the MiniLM
    tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification
    path = str(tmp_path_factory.mktemp("ce"))
    torch.manual_seed(1)
    BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64,
                                             num_labels=1)).save_pretrained(path)
    AutoTokenizer.from_pretrained(cli.default_model()).save_pretrained(path)
    return path


def flags(*extra):
    return list(map(str, ["--batch_size", 8, "--group_size", 2, "--lr", 1e-3, "--dtype", "fp32",
                          "--device", "cpu", *extra]))


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_eval_while_training_keeps_the_best_and_evaluate_reproduces_it(tiny_model, subset,
                                                                       two_files, tmp_path, dtype):
    out = tmp_path / "o"
    train.main(train.parser.parse_args(flags("--model", tiny_model, "--train_data", two_files[0],
                                             "--max_steps", 3, "--eval_dataset", subset,
                                             "--eval_split", "test", "--eval_every", 2,
                                             "--dtype", dtype, "--out_dir", out)))
    evals = {row["step"]: row["eval"] for row in read_log(out) if "eval" in row}
    assert list(evals) == [0, 2, 3]  # before the first step, every 2 steps, after the last
    best = data.read_json(out / "best" / "eval.json")
    assert (best["ndcg@10"] == max(e["ndcg@10"] for e in evals.values())
            == evals[best["step"]]["ndcg@10"])
    means = evaluate.main(evaluate.parser.parse_args(["--model", str(out / "best"),
                                                      "--dataset", str(subset), "--split", "test",
                                                      "--dtype", dtype, "--device", "cpu"]))
    assert means.pop("queries") == 20 and means == evals[best["step"]]  # every measure, exactly
    assert (out / "train.png").stat().st_size > 0


def test_default_evaluation_is_the_dev_split_beside_the_train_split(monkeypatch):
    asked = []
    monkeypatch.setattr(data, "load_dataset",
                        lambda ref, split, flag: asked.append(ref) or ({}, {}, {"q": {"d": 1}}))

    def parse(*a):
        return train.parser.parse_args(list(a))

    assert (validation.load_eval_set(parse("--dataset", "beir/nfcorpus/train"))
            and asked == ["beir/nfcorpus/dev"])
    # SciFact has no dev split
    assert validation.load_eval_set(parse("--dataset", "beir/scifact/train")) is None
    assert validation.load_eval_set(parse("--dataset", "beir/nfcorpus/train",
                                     "--eval_dataset", "none")) is None
    # own data: evaluation only when asked
    assert validation.load_eval_set(parse("--train_data", "x.jsonl")) is None
    # before any training
    with pytest.raises(cli.InputError, match="--eval_metric ndcg@7: not a measure"):
        validation.load_eval_set(parse("--eval_dataset", "beir/scifact/test",
                                       "--eval_metric", "ndcg@7"))


def test_batch_plan_one_source_a_batch():
    plan = sampler.batch_plan([24, 16], 8, 0, 3)
    assert sorted(s for s, _ in plan) == [0, 0, 0, 1, 1]  # in proportion to the sizes
    assert all(all((i < 24) == (s == 0) for i in batch) and len(batch) == 8 for s, batch in plan)
    # each example once an epoch
    assert sorted(i for _, batch in plan for i in batch) == list(range(40))
    assert plan == sampler.batch_plan([24, 16], 8, 0, 3) != sampler.batch_plan([24, 16], 8, 0, 4)
    uniform = sampler.batch_plan([24, 12], 8, 0, 3, uniform=True)
    # the smaller file repeats, reshuffled
    assert sorted(s for s, _ in uniform) == [0, 0, 0, 1, 1, 1]
    assert (sorted(i for s, batch in uniform if s == 1 for i in batch)
            == sorted([*range(24, 36)] * 2))
    one = sampler.batch_plan([20], 8, 0, 3)  # one file: the batches of one shuffle, in order
    assert [i for _, batch in one for i in batch] == [
        i for _, batch in sampler.batch_plan([20], 4, 0, 3) for i in batch][:16]


def test_several_files_and_eval_resume_exactly(tiny_model, subset, two_files, tmp_path):
    """Two files (a batch from one of them, named in the log) and an evaluation every step: killed
    and resumed, the weights, the log and the best model are those of the uninterrupted run."""
    def cmd(out, *extra):
        return [sys.executable, "train.py", "--model", tiny_model, "--train_data", *two_files,
                *flags("--chunk_size", 4, "--epochs", 2, "--save_every", 1,
                       "--eval_dataset", subset, "--eval_split", "test", "--eval_every", 1,
                       "--out_dir", out, *extra)]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd(tmp_path / "full"), cwd=ROOT, check=True, capture_output=True, env=env)
    killed = tmp_path / "killed"
    p = subprocess.Popen(cmd(killed), cwd=ROOT, stderr=subprocess.PIPE, text=True, env=env)
    wait_for_steps(killed, 12, p)  # log lines: an evaluation, then a step and its evaluation each
    p.send_signal(signal.SIGKILL)
    p.wait()
    r = subprocess.run(cmd(killed, "--resume"), cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "resumed" in r.stdout, r.stderr[-3000:]
    full, resumed = read_log(tmp_path / "full"), read_log(killed)

    def drop(log):
        return [{k: v for k, v in row.items()
                 if k not in ("q_per_s", "tokens_per_s", "seconds", "mem_gb")}
                for row in log]

    assert drop(resumed) == drop(full)
    # 2 batches an epoch
    assert [row["source"] for row in full if "source" in row].count(two_files[1]) == 4
    assert (data.read_json(killed / "best" / "eval.json")
            == data.read_json(tmp_path / "full" / "best" / "eval.json"))

    def weights(out):
        return flat(torch.load(out / "train_state.pt", weights_only=False)["model"])

    assert torch.equal(weights(killed), weights(tmp_path / "full"))


def hf_cosine(path, query, text):
    """transformers' own cosine of the tiny model (mean pooling, 32 query / 64 document tokens)."""
    from transformers import AutoModel, AutoTokenizer
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    vecs = []
    for t, n in ((query, 32), (text, 64)):
        batch = tok([t], truncation=True, max_length=n, return_tensors="pt")
        with torch.no_grad():
            vecs.append(model(**batch).last_hidden_state.mean(1)[0])
    return torch.nn.functional.cosine_similarity(*vecs, dim=0).item()


def test_teacher_scores_are_transformers_own(tiny_model, cross_encoder, two_files, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    rows = data.read_train_jsonl(two_files[0])[:3]
    cli.write_jsonl(tmp_path / "in.jsonl", rows)
    tok, ce = (AutoTokenizer.from_pretrained(cross_encoder),
               AutoModelForSequenceClassification.from_pretrained(cross_encoder).eval())
    for teacher, expect in ((cross_encoder,
                             lambda q, t: ce(**tok(q, t, truncation=True, return_tensors="pt"))
                             .logits[0, 0].item()),
                            (tiny_model, lambda q, t: hf_cosine(tiny_model, q, t))):
        out = score.main(score.parser.parse_args(["--teacher", teacher,
                                                  "--train_data", str(tmp_path / "in.jsonl"),
                                                  "--out", str(tmp_path / "out.jsonl"),
                                                  "--device", "cpu"]))
        assert out == data.read_train_jsonl(str(tmp_path / "out.jsonl"))
        for ex in out:
            with torch.no_grad():
                want = [expect(ex["query"], t) for t in ex["pos"] + ex["neg"]]
            assert ex["pos_scores"] + ex["neg_scores"] == pytest.approx(want, abs=1e-5)


def test_mine_own_pairs_with_and_without_a_corpus(tiny_model, cross_encoder, subset, tmp_path,
                                                   capsys):
    corpus, queries, qrels = data.load_dataset(subset, "test")
    pairs = [{"query": queries[q], "pos": [corpus[d]]}
             for q in sorted(qrels) for d in sorted(qrels[q])]
    cli.write_jsonl(tmp_path / "pairs.jsonl", pairs)

    def run(*extra):
        return mine.main(mine.parser.parse_args(list(map(str, [
            "--model", tiny_model, "--train_data", tmp_path / "pairs.jsonl", "--range", "0-30",
            "--num_neg", 3, "--device", "cpu", "--out", tmp_path / "out.jsonl", *extra]))))

    own = run()  # the pool: the file's own texts (only the positives here)
    with_corpus = run("--corpus", os.path.join(subset, "corpus.jsonl"))
    for rows in (own, with_corpus):
        assert len(rows) == len(pairs) and all(len(r["neg"]) == 3 for r in rows)
        assert all(not set(r["neg"]) & set(r["pos"]) for r in rows)
    # positives found in the corpus by text
    assert all(corpus[r["pos_ids"][0]] == r["pos"][0] for r in with_corpus)
    assert "the model's top" not in capsys.readouterr().out  # no consistency filter asked for
    kept = run("--corpus", os.path.join(subset, "corpus.jsonl"), "--consistency_k", 5)
    dropped = int(re.search(r"and (\d+) whose positives are not in the model's top 5",
                            capsys.readouterr().out)[1])
    # a random model disagrees with many labels
    assert dropped > 0 and len(kept) + dropped == len(pairs)
    taught = run("--corpus", os.path.join(subset, "corpus.jsonl"), "--teacher", cross_encoder)
    teacher = mine.load_teacher(cross_encoder, torch.device("cpu"), "fp32")
    # the teacher's scores are written, not the model's
    texts = taught[0]["pos"] + taught[0]["neg"]
    assert taught[0]["pos_scores"] + taught[0]["neg_scores"] == pytest.approx(
        teacher([taught[0]["query"]] * len(texts), texts), abs=1e-6)
