"""Hostile input: every user mistake is one line `error: ...` before work starts, naming the flag or
the file and line; a result is never silently wrong; and what worked before (CRLF, Unicode, BOM,
long lines) still works."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import cli
import data
import encode
import evaluate
import merge
import mine
import retrieval
import score
import train
from conftest import ROOT

SCRIPTS = {"train": train, "mine": mine, "encode": encode, "evaluate": evaluate}


# -------------------------------------------------------------------------------------------- flags

@pytest.mark.parametrize("script, flags, says", [
    ("encode", ["--batch_size", "-8", "--out", "x"], "--batch_size: '-8': must be >= 1"),
    ("train", ["--epochs", "0"], "--epochs: '0': must be >= 1"),
    ("train", ["--temp", "0"], "--temp: '0': must be > 0"),
    ("train", ["--lr", "nan"], "--lr: 'nan': must be > 0"),
    ("train", ["--chunk_size", "-1"], "--chunk_size: '-1': must be >= 0"),
    ("train", ["--attention_dropout", "1.5"], "--attention_dropout: '1.5': must be >= 0 and < 1"),
    ("train", ["--false_negative_margin", "-0.1"], "--false_negative_margin: '-0.1': must be >= 0"),
    ("train", ["--distill", "mse"], "--distill: invalid choice"),
    ("train", ["--log_every", "0"], "--log_every"),
    ("train", ["--resume", "yes"], "--resume: invalid choice"),
    ("train", ["--dtype", "fp8"], "--dtype: invalid choice"),
    ("mine", ["--range", "100-10", "--out", "x"], "--range: '100-10': expected START-END"),
    ("mine", ["--num_neg", "0", "--out", "x"], "--num_neg"),
    ("mine", ["--margin", "2", "--out", "x"], "--margin"),
    ("evaluate", ["--k", "0"], "--k"),
    ("encode", ["--shard_size", "0", "--out", "x"], "--shard_size"),
    ("encode", [], "the following arguments are required: --out"),
])
def test_bad_flags_stop_at_parse_time(script, flags, says):
    with pytest.raises(SystemExit) as stop:
        SCRIPTS[script].parser.parse_args(flags)
    assert (str(stop.value.code).startswith("error: ")
            and says in str(stop.value.code)), stop.value.code


# -------------------------------------------------------------------------------------------- files

def beir(folder, corpus=None, queries=None, qrels="q1\td1\t1\n", raw=None):
    """A BEIR folder (split "test") from rows; raw: {file name: bytes} written as they are."""
    os.makedirs(folder / "qrels", exist_ok=True)
    corpus = corpus or [{"_id": "d1", "text": "doc one"}, {"_id": "d2", "text": "doc two"}]
    for name, rows in (("corpus.jsonl", corpus),
                       ("queries.jsonl", queries or [{"_id": "q1", "text": "query"}])):
        (folder / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                   encoding="utf-8")
    (folder / "qrels" / "test.tsv").write_text(qrels, encoding="utf-8")
    for name, content in (raw or {}).items():
        (folder / name).write_bytes(content)
    return str(folder)


@pytest.mark.parametrize("case, says", [
    (dict(corpus=[{"_id": "d1", "text": "a"}, {"_id": "d1", "text": "b"}]),
     "corpus.jsonl:2: id 'd1' again"),
    (dict(queries=[{"_id": "q1", "text": "a"}, {"_id": "q1", "text": "b"}]),
     "queries.jsonl:2: id 'q1' again"),
    (dict(corpus=[{"_id": "d 1", "text": "a"}]),
     "corpus.jsonl:1: each line needs an '_id' without spaces"),
    (dict(corpus=[{"_id": "d1", "text": ""}]), "corpus.jsonl:1"),
    (dict(qrels="q1\td1\t1\nq1\td1\t2\n"),
     "test.tsv:2: expected 'query-id corpus-id grade' with a grade >= 0"),
    (dict(qrels="q1\td1\t-1\n"), "test.tsv:1"),
    (dict(qrels="q1\td9\t1\n"), "name document id 'd9', which is not in the corpus"),
    (dict(raw={"corpus.jsonl": b'{"_id": "d1", "text": "caf\xe9"}\n'}),
     "corpus.jsonl:1: not UTF-8 text"),
    (dict(raw={"queries.jsonl": b'{"_id": "q1", "text": "ok"}\n[1, 2]\n'}),
     "queries.jsonl:2: expected a JSON object"),
])
def test_bad_dataset_files_name_file_and_line(tmp_path, case, says):
    with pytest.raises(cli.InputError, match=None) as err:
        data.load_dataset(beir(tmp_path / "b", **case), "test")
    assert says in str(err.value), str(err.value)


@pytest.mark.parametrize("row, says", [
    ({"query": "q", "pos": ["p"], "pos_scores": ["high"]},
     "'pos_scores' must be a list of finite numbers"),
    ({"query": "q", "pos": ["p"], "neg": ["n"], "neg_scores": [float("nan")]},
     "'neg_scores' must be a list"),
    ({"query": "q", "pos": ["p"], "prompt": 3}, "'prompt' must be a string"),
    ({"query": "q", "pos": ["p"], "pos_ids": ["a", "b"]}, "'pos_ids' must be as long as 'pos' (1)"),
    ({"query": "q", "pos": ["p"], "neg_ids": [None]}, "'neg_ids' must be a list of ids"),
    ({"query": "", "pos": ["p"]}, "'query' must be a non-empty string"),
    ({"query": "q", "pos": "p"}, "'pos' must be a list of non-empty strings"),
])
def test_bad_train_lines_name_file_and_line(tmp_path, row, says):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"query": "fine", "pos": ["p"]}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(cli.InputError) as err:
        data.read_train_jsonl(str(path))
    assert f"t.jsonl:2: {says}" in str(err.value), str(err.value)


@pytest.mark.parametrize("script, flags, says", [
    ("train", ["--train_data", "{tmp}/nope.jsonl"], "nope.jsonl: file not found"),
    ("evaluate", ["--dataset", "{beir}", "--split", "dev"], "dev.tsv: file not found"),
    ("evaluate", ["--dataset", "{beir}"], "a BEIR folder needs --split"),
    ("evaluate", ["--dataset", "beir/nope/test"],
     "'beir/nope/test' is neither a folder nor a dataset id"),
    ("evaluate", ["--dataset", "{beir}", "--split", "test", "--queries", "{tmp}/ids.txt"],
     "ids.txt:2: query id 'q404'"),
    ("encode", ["--model", "{tmp}/no_model", "--out", "{tmp}/e"], "no_model: not a folder"),
    ("train", ["--resume", "--out_dir", "{tmp}/o"], "--resume: no checkpoint"),
])
def test_missing_and_unknown_things(tmp_path, script, flags, says):
    folder = beir(tmp_path / "b")
    (tmp_path / "ids.txt").write_text("q1\nq404\n")
    args = SCRIPTS[script].parser.parse_args([f.format(tmp=tmp_path, beir=folder) for f in flags])
    with pytest.raises(cli.InputError) as err:
        SCRIPTS[script].main(args)
    assert says in str(err.value), str(err.value)


def test_unknown_keys_are_counted_and_no_negatives_is_refused_for_groups(tmp_path, tiny_model,
                                                                         capsys):
    """A typo ("negs") is named with its count; --group_size 2 on lines without negatives stops
    before training."""
    path = tmp_path / "t.jsonl"
    cli.write_jsonl(path, [{"query": f"q{i}", "pos": [f"p{i}"], "negs": ["n"]} for i in range(8)])
    assert len(data.read_train_jsonl(str(path))) == 8
    assert "'negs' in 8 lines" in capsys.readouterr().out
    args = train.parser.parse_args(["--model", tiny_model, "--train_data", str(path),
                                    "--group_size", "2", "--batch_size", "4",
                                    "--out_dir", str(tmp_path / "o")])
    with pytest.raises(cli.InputError, match="8 queries have no negatives but --group_size is 2"):
        train.main(args)


# --------------------------------------------------------------------------------------------- runs

def test_limits_of_the_model_and_the_embeddings(tmp_path, tiny_model):
    beir(tmp_path / "b")
    two = [{"_id": "q1", "text": "query"}, {"_id": "q2", "text": "another query"}]
    beir(tmp_path / "b2", queries=two, qrels="q1\td1\t1\nq2\td2\t1\n")

    def run(script, *flags):
        return SCRIPTS[script].main(SCRIPTS[script].parser.parse_args(list(map(str, flags))))

    with pytest.raises(cli.InputError, match="--passage_max_len 4096: .* has 128 positions"):
        run("train", "--model", tiny_model, "--dataset", tmp_path / "b2", "--split", "test",
            "--batch_size", 2, "--passage_max_len", 4096, "--out_dir", tmp_path / "o")
    with pytest.raises(cli.InputError, match="--max_len 4096: .* has 128 positions"):
        run("encode", "--model", tiny_model, "--dataset", tmp_path / "b", "--split", "test",
            "--max_len", 4096, "--out", tmp_path / "e")
    run("encode", "--model", tiny_model, "--dataset", tmp_path / "b", "--split", "test",
        "--out", tmp_path / "e")
    with pytest.raises(cli.InputError, match="--device cuda: no GPU"):
        run("encode", "--device", "cuda", "--dataset", tmp_path / "b", "--split", "test",
            "--out", tmp_path / "f")
    with pytest.raises(cli.InputError, match="--device 'tpu'"):
        run("encode", "--device", "tpu", "--dataset", tmp_path / "b", "--split", "test",
            "--out", tmp_path / "f")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(cli.InputError, match="cannot write .*a_file"):
        run("encode", "--model", tiny_model, "--dataset", tmp_path / "b", "--split", "test",
            "--out", tmp_path / "a_file")
    # the same documents from another folder: the same vectors, so the encoding is reused; other
    # documents under the same ids are refused
    beir(tmp_path / "c")
    run("encode", "--model", tiny_model, "--dataset", tmp_path / "c", "--split", "test",
        "--out", tmp_path / "e")
    with pytest.raises(cli.InputError, match="this folder holds an encoding of other documents"):
        edited = [{"_id": "d1", "text": "doc one"}, {"_id": "d2", "text": "new"}]
        beir(tmp_path / "d", corpus=edited)
        run("encode", "--model", tiny_model, "--dataset", tmp_path / "d", "--split", "test",
            "--out", tmp_path / "e")


def test_a_failed_download_is_one_line(monkeypatch):
    """No network: ir_datasets' download raises requests' ConnectionError (an OSError) while
    iterating."""
    import ir_datasets

    class Offline:
        def docs_iter(self):
            raise OSError("Max retries exceeded")
    monkeypatch.setattr(ir_datasets, "load", lambda dataset_id: Offline())
    with pytest.raises(cli.InputError,
                       match="ir_datasets could not get beir/fiqa/test .* check the network"):
        data.load_dataset("beir/fiqa/test")


def test_damaged_files(tmp_path, tiny_model):
    import shutil
    from model import BiEncoder
    for name, damage in (("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:1000])),
                         ("config.json", lambda p: p.write_text("{not json"))):
        broken = shutil.copytree(tiny_model, tmp_path / name)
        damage(broken / name)
        with pytest.raises(cli.InputError, match=name):
            BiEncoder(str(broken))
    emb = tmp_path / "emb"
    retrieval.save_embeddings(str(emb), "corpus.00000", ["a", "b"], np.zeros((2, 4)))
    (emb / "corpus.00000.npy").write_bytes(b"not an array")
    cli.write_json(str(emb / "meta.json"), {"shards": ["corpus.00000"]})
    with pytest.raises(cli.InputError, match="corpus.00000.npy: cannot read it"):
        retrieval.Shards(str(emb), {"a": "x", "b": "y"}, "a corpus")


def test_resume_refuses_changed_data_and_a_truncated_state(tmp_path, tiny_model):
    rows = [{"query": f"query {i}", "pos": [f"positive {i}"]} for i in range(8)]
    cli.write_jsonl(tmp_path / "t.jsonl", rows)
    flags = ["--model", tiny_model, "--train_data", str(tmp_path / "t.jsonl"), "--batch_size", "4",
             "--out_dir", str(tmp_path / "o"), "--device", "cpu"]
    train.main(train.parser.parse_args(flags))
    state = tmp_path / "o" / "train_state.pt"
    saved = torch.load(state, weights_only=False)
    del saved["args"]["mix"]  # a checkpoint from before --mix existed
    torch.save(saved, state)
    with pytest.raises(cli.InputError, match="it was trained with --mix None, not size"):
        train.main(train.parser.parse_args(flags + ["--resume"]))
    torch.save({**saved, "args": {**saved["args"], "mix": "size"}}, state)
    cli.write_jsonl(tmp_path / "t.jsonl", rows[::-1])  # the same name, other contents
    with pytest.raises(cli.InputError, match="it was trained with other data"):
        train.main(train.parser.parse_args(flags + ["--resume"]))
    state.write_bytes(state.read_bytes()[:500])
    with pytest.raises(cli.InputError, match="train_state.pt: cannot read it"):
        train.main(train.parser.parse_args(flags + ["--resume"]))


# --------------------------------------------------------------------------------------- what works

def test_crlf_bom_unicode_and_long_lines_still_work(tmp_path, tiny_model):
    """CRLF line ends and a byte-order mark are read; CJK, right-to-left and emoji texts and ids
    pass through; a 5 MB document is truncated like any other; a --k larger than the corpus and a
    chunk larger than the batch run."""
    corpus = [{"_id": "文書1", "text": "猫が好きです"},
              {"_id": "doc-שלום", "text": "שלום עולם " * 3},
              {"_id": "🙂", "text": "emoji 🙂 text"},
              {"_id": "long", "text": "word " * 1_000_000}]
    folder = tmp_path / "b"
    beir(folder, corpus=corpus, queries=[{"_id": "問1", "text": "猫"}],
         qrels="問1\t文書1\t1\r\n問1\t🙂\t1\r\n")
    (folder / "corpus.jsonl").write_bytes(
        b"\xef\xbb\xbf" + (folder / "corpus.jsonl").read_bytes().replace(b"\n", b"\r\n"))
    loaded, queries, qrels = data.load_dataset(str(folder), "test")
    assert set(loaded) == {r["_id"] for r in corpus} and qrels == {"問1": {"文書1": 1, "🙂": 1}}

    def run(script, *flags):
        return SCRIPTS[script].main(SCRIPTS[script].parser.parse_args(list(map(str, flags))))

    run("encode", "--model", tiny_model, "--dataset", folder, "--split", "test",
        "--out", tmp_path / "e")
    means = run("evaluate", "--emb", tmp_path / "e", "--dataset", folder, "--split", "test",
                "--k", 10000)
    assert means["queries"] == 1 and 0 < means["recall@1000"] <= 1
    rows = [{"query": "質問 🙂", "pos": ["答え"], "neg": ["ちがう"], "pos_ids": ["文書1"],
             "neg_ids": ["🙂"]}] * 4
    (tmp_path / "t.jsonl").write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r, ensure_ascii=False)
                                                              + "\r\n" for r in rows).encode())
    run("train", "--model", tiny_model, "--train_data", tmp_path / "t.jsonl", "--batch_size", 4,
        "--chunk_size", 64, "--out_dir", tmp_path / "o", "--device", "cpu")
    assert (tmp_path / "o" / "model" / "model.safetensors").exists()


def test_help_shows_defaults_and_no_placeholder():
    """--help gives each flag's default, and a required flag none (not argparse's `Ellipsis`)."""
    for script in (*SCRIPTS.values(), score, merge):
        text = script.parser.format_help()
        assert "Ellipsis" not in text and "(default: " in text, script.__name__


def test_errors_are_one_line_with_exit_status_one(tmp_path):
    """The scripts themselves: exit status 1 and one `error:` line, no traceback."""
    for cmd in (["encode.py", "--batch_size", "-8", "--out", str(tmp_path / "e")],
                ["train.py", "--train_data", str(tmp_path / "missing.jsonl"),
                 "--out_dir", str(tmp_path / "o")]):
        p = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
        assert (p.stderr.strip().splitlines()[-1].startswith("error: ")
                and p.stderr.count("error: ") == 1), p.stderr
