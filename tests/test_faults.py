"""Faults and bad input, round 2: a resumed run does what its flags say or refuses; an encoding is
reused only when its model and documents are the same; settings that would make every text alike are
refused; empty inputs, a full disk, a damaged download and a stray RANK are one-line errors; and the
errors name the real cause, before the work."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import cli
import data
import encode
import evaluate
import mine
import score
import train
from conftest import ROOT, make_tiny_bert, make_tiny_decoder, scifact_subset
from test_errors import beir
from test_train import make_train_file


def main_of(script, *flags):
    module = {"train": train, "mine": mine, "encode": encode, "evaluate": evaluate,
              "score": score}[script]
    return module.main(module.parser.parse_args(list(map(str, flags))))


def one_line_error(args, env=None):
    """Run a script -> its last stderr line, which must be the only `error:` and no traceback."""
    p = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       env=env, timeout=600)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and p.stderr.count("error: ") == 1, p.stderr[-2000:]
    return last


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    return make_train_file(tmp_path_factory.mktemp("data") / "train.jsonl", n=16, num_neg=3)


def train_flags(model, train_file, out_dir, *extra):
    return ["--model", model, "--train_data", train_file, "--out_dir", out_dir, "--batch_size", 8,
            "--group_size", 2, "--max_steps", 2, "--device", "cpu", *extra]

# ------------------------------------------------------------------------- a resumed run and its
# flags

def test_the_flags_free_to_change_at_resume_are_flags():
    """Every flag must match at resume but the short list of checkpoint.MAY_CHANGE, whose names are
    all train.py's flags."""
    flags = {a.dest for a in train.parser._actions if a.dest != "help"}
    assert set(checkpoint.MAY_CHANGE) <= flags, set(checkpoint.MAY_CHANGE) - flags
    assert {"lr", "temp", "batch_size", "train_data", "seed"} <= flags - set(checkpoint.MAY_CHANGE)


@pytest.mark.parametrize("changed, says", [
    (["--lr", 1e-3], "it was trained with --lr 0.0001, not 0.001"),
    (["--max_steps", 1], "a resume may extend a run, not shorten it"),
    (["--query_max_len", 16], "it was trained with --query_max_len None, not 16"),
    (["--lora_rank", 4], "it was trained with --lora_rank None, not 4"),
])
def test_a_changed_flag_that_defines_the_run_is_refused(tiny_model, train_file, tmp_path, changed,
                                                        says):
    out = tmp_path / "o"
    main_of("train", *train_flags(tiny_model, train_file, out))
    with pytest.raises(cli.InputError, match=says) as err:
        main_of("train", *train_flags(tiny_model, train_file, out, "--resume", *changed))
    if "--max_steps" not in changed:
        assert "only --device, --compile" in str(err.value)  # and says which may change


def test_a_flag_free_to_change_takes_effect_at_resume(tiny_model, train_file, tmp_path, capsys):
    out = tmp_path / "o"
    flags = train_flags(tiny_model, train_file, out, "--max_steps", 0, "--epochs", 2)
    main_of("train", *flags, "--save_every", 1, "--log_every", 100)
    state = torch.load(out / "train_state.pt", weights_only=False)
    assert state["step"] == 4
    capsys.readouterr()
    # the last checkpoint is the end: a resume has nothing left to do, but accepts the new flags
    main_of("train", *flags, "--save_every", 2, "--log_every", 1, "--chunk_size", 4, "--resume")
    assert "resumed" in capsys.readouterr().out

# ------------------------------------------------------------------------- encodings and their
# inputs

def test_an_encoding_is_reused_only_by_its_model_and_documents(tiny_model, tmp_path):
    folder = scifact_subset(str(tmp_path / "sf"), n_queries=6, n_docs=30)
    flags = ["--dataset", folder, "--split", "test", "--device", "cpu", "--out", tmp_path / "e"]
    main_of("encode", "--model", tiny_model, *flags)
    # the same model under another spelling of its path: reused, not refused
    main_of("encode", "--model", tiny_model + "/", *flags)
    # other weights at the same path
    moved = shutil.copytree(tiny_model, tmp_path / "moved")
    from model import BiEncoder
    other = BiEncoder(str(moved))
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    other.save(str(moved))
    with pytest.raises(cli.InputError, match="encoding made by another model"):
        main_of("encode", "--model", moved, *flags)
    # mine --emb and evaluate --emb compare fingerprints too
    mined = ["--dataset", folder, "--split", "test", "--device", "cpu", "--range", "0-10",
             "--num_neg", 2, "--emb", tmp_path / "e", "--out", tmp_path / "m.jsonl"]
    main_of("mine", "--model", tiny_model + "/", *mined)  # a trailing slash is the same model
    with pytest.raises(cli.InputError, match="made by another model"):
        main_of("mine", "--model", moved, *mined)
    rows = [json.loads(line) for line in open(os.path.join(folder, "corpus.jsonl"))]
    rows[0]["text"] = "a text that was edited since"
    cli.write_jsonl(os.path.join(folder, "corpus.jsonl"), rows)
    with pytest.raises(cli.InputError, match="an encoding of other texts"):
        main_of("evaluate", "--emb", tmp_path / "e", "--dataset", folder, "--split", "test")
    with pytest.raises(cli.InputError, match="an encoding of other documents"):
        main_of("encode", "--model", tiny_model, *flags)

# ------------------------------------------------------------------------- inputs that defeat the
# model

def test_settings_that_leave_no_room_for_the_text(tiny_model, train_file, tmp_path):
    long_prefix = "Represent this rather long instruction for searching relevant passages: " * 3
    cases = [(["--query_prefix", long_prefix],
              "--query_prefix: .* of the 32 tokens --query_max_len allows, which leaves no room"),
             (["--passage_max_len", 2], "--passage_max_len 2: the tokenizer adds 2 special tokens")]
    for extra, says in cases:
        with pytest.raises(cli.InputError, match=says):
            main_of("train", *train_flags(tiny_model, train_file, tmp_path / "o", "--query_max_len",
                                          32, *extra))


def test_a_model_folder_without_tokenizer_or_weights(tiny_model, tmp_path):
    from model import BiEncoder
    no_tokenizer = shutil.copytree(tiny_model, tmp_path / "a")
    for name in os.listdir(no_tokenizer):
        if "token" in name or "vocab" in name:
            os.remove(no_tokenizer / name)
    with pytest.raises(cli.InputError, match="no tokenizer files in it"):
        BiEncoder(str(no_tokenizer))
    no_weights = shutil.copytree(tiny_model, tmp_path / "b")
    os.remove(no_weights / "model.safetensors")
    with pytest.raises(cli.InputError, match="no weights in it"):
        BiEncoder(str(no_weights))


def test_a_decoder_with_cls_pooling_is_refused(tmp_path):
    from model import BiEncoder
    path = make_tiny_decoder(tmp_path / "d")
    with pytest.raises(cli.InputError, match="pooling cls on a decoder gives every text the same"):
        BiEncoder(path, pooling="cls")


def test_a_two_label_classifier_is_not_a_teacher(tmp_path, train_file):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification
    path = str(tmp_path / "nli")
    BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=64,
                                             num_labels=2)).save_pretrained(path)
    AutoTokenizer.from_pretrained(cli.default_model()).save_pretrained(path)
    with pytest.raises(cli.InputError, match="a classifier with 2 labels"):
        main_of("score", "--teacher", path, "--train_data", train_file, "--out", tmp_path / "s")

# ------------------------------------------------------------------------- empty and degenerate
# input

@pytest.mark.parametrize("case, says", [
    (dict(raw={"corpus.jsonl": b""}), "corpus.jsonl: no lines in it"),
    (dict(raw={"queries.jsonl": b"\n"}), "queries.jsonl: no lines in it"),
    (dict(corpus=[{"_id": None, "text": "a"}]), "corpus.jsonl:1: '_id' must be a string or an "
                                                "integer, got null"),
    (dict(queries=[{"_id": True, "text": "a"}]), "queries.jsonl:1: '_id' must be a string or an "
                                                 "integer, got true"),
    (dict(qrels="query-id\tcorpus-id\tscore\n"), "no qrels to evaluate against"),
])
def test_empty_and_degenerate_datasets(tmp_path, case, says):
    folder = beir(tmp_path / "b", **case)
    with pytest.raises(cli.InputError, match=says):
        main_of("evaluate", "--dataset", folder, "--split", "test", "--device", "cpu")


def test_degenerate_evaluation_and_training_inputs(tiny_model, train_file, tmp_path):
    folder = beir(tmp_path / "b")
    (tmp_path / "empty.ids").write_text("\n")
    with pytest.raises(cli.InputError, match="empty.ids: no query ids in it"):
        main_of("evaluate", "--dataset", folder, "--split", "test",
                "--queries", tmp_path / "empty.ids")
    header_only = beir(tmp_path / "h", qrels="query-id\tcorpus-id\tscore\n")
    with pytest.raises(cli.InputError, match="no training queries with a positive"):
        main_of("train", "--model", tiny_model, "--dataset", header_only, "--split", "test",
                "--out_dir", tmp_path / "o", "--eval_dataset", "none")
    for eval_flag in (["--eval_every", 5], ["--eval_queries", tmp_path / "empty.ids"]):
        with pytest.raises(cli.InputError, match=f"{eval_flag[0]} without an evaluation set"):
            main_of("train", *train_flags(tiny_model, train_file, tmp_path / "o", *eval_flag))


def test_compare_needs_two_runs_of_common_queries(tmp_path):
    for name, qid in (("a", "q1"), ("b", "q2")):
        cli.write_json(str(tmp_path / name / "metrics.json"),
                       {"per_query": {qid: {"ndcg@10": 1, "recall@100": 1, "mrr@10": 1, "map": 1}}})
    with pytest.raises(cli.InputError, match="--compare: give two or more"):
        main_of("evaluate", "--compare", tmp_path / "a")
    with pytest.raises(cli.InputError, match="have no query in common"):
        main_of("evaluate", "--compare", tmp_path / "a", tmp_path / "b")

# ------------------------------------------------------------------------- faults outside the
# program

@pytest.fixture
def small_disk(tmp_path):
    """A 64 MB tmpfs, where the machine lets a test mount one."""
    folder = tmp_path / "disk"
    folder.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64M", "tmpfs", str(folder)],
                       capture_output=True)
    if p.returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield folder
    subprocess.run(["umount", str(folder)], capture_output=True)


def test_a_full_disk_while_writing_a_checkpoint_loses_nothing(tiny_model, train_file, small_disk):
    """A run stopped by SIGTERM after a checkpoint, resumed on a disk with no room for the next one:
    one line, and the checkpoint it resumed from whole."""
    out = small_disk / "o"
    flags = ["train.py", *train_flags(tiny_model, train_file, out, "--max_steps", 0, "--epochs", 50,
                                      "--save_every", 1)]
    p = subprocess.Popen([sys.executable, *map(str, flags)], cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    while not (out / "train_state.pt").exists():
        assert p.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)  # it saves after the step it is in, then exits
    assert p.wait(timeout=300) == 128 + signal.SIGTERM
    before = (out / "train_state.pt").read_bytes()
    weights = (out / "model" / "model.safetensors").read_bytes()
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * (free - (6 << 20)))  # 6 MB left: not a checkpoint
    last = one_line_error([*flags, "--resume"])  # its next checkpoint fails
    assert "the disk is full; nothing was lost" in last, last
    assert (out / "train_state.pt").read_bytes() == before  # the old checkpoint, whole
    assert (out / "model" / "model.safetensors").read_bytes() == weights
    (small_disk / "filler").unlink()
    subprocess.run([sys.executable, *map(str, flags), "--resume"], cwd=ROOT, check=True,
                   capture_output=True)


def test_a_full_disk_while_writing_a_shard(tiny_model, tmp_path, small_disk):
    folder = scifact_subset(str(tmp_path / "sf"), n_queries=6, n_docs=400)
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * (free - (20 << 10)))  # 20 KB left
    last = one_line_error(["encode.py", "--model", tiny_model, "--dataset", folder,
                           "--split", "test", "--device", "cpu", "--out", small_disk / "e"])
    assert "the disk is full; nothing was lost" in last, last


def test_a_damaged_download_a_stray_rank_and_a_home_that_is_a_file(tmp_path):
    home = tmp_path / "home"
    (home / "beir" / "scifact").mkdir(parents=True)
    mirror = os.path.join(data.MIRROR, "beir", "scifact", "source.zip")
    with open(mirror, "rb") as f:
        (home / "beir" / "scifact" / "source.zip").write_bytes(f.read(100_000))  # cut short
    flags = ["evaluate.py", "--dataset", "beir/scifact/test", "--device", "cpu"]
    last = one_line_error(flags, {**os.environ, "IR_DATASETS_HOME": str(home)})
    assert "source.zip: a damaged (cut short) download; delete it" in last, last
    (tmp_path / "a_file").write_text("")
    last = one_line_error(flags, {**os.environ, "IR_DATASETS_HOME": str(tmp_path / "a_file")})
    assert "is a file; ir_datasets keeps its files in a folder" in last, last
    last = one_line_error(flags, {**os.environ, "RANK": "0"})
    assert "RANK is set but not WORLD_SIZE" in last and "torchrun" in last, last

# ------------------------------------------------------------------------- the real cause, before
# the work

@pytest.mark.parametrize("extra, says", [
    (["--distill", "margin_mse", "--group_size", 1], "--distill margin_mse learns the teacher's "
                                                     "ranking within each query's group; it needs "
                                                     "--group_size 2"),
    (["--distill", "kl", "--group_size", 1], "--distill kl learns"),
    (["--teacher_temp", 0.1], "--teacher_temp applies to --distill kl only"),
    (["--remine_every", 2, "--distill", "kl"], "--remine_every replaces the negatives"),
])
def test_flag_combinations_that_cannot_work(tiny_model, train_file, tmp_path, extra, says):
    with pytest.raises(cli.InputError, match=says):
        main_of("train", *train_flags(tiny_model, train_file, tmp_path / "o", *extra))


def test_one_file_twice_and_too_few_negatives(tiny_model, train_file, tmp_path, capsys):
    with pytest.raises(cli.InputError, match="--train_data names .* twice"):
        main_of("train", "--model", tiny_model, "--train_data", train_file, train_file,
                "--out_dir", tmp_path / "o")
    main_of("train", *train_flags(tiny_model, train_file, tmp_path / "o", "--group_size", 6,
                                  "--max_steps", 1))
    assert "16 queries have fewer than 5 negatives: theirs repeat" in capsys.readouterr().out


def test_mine_checks_its_teacher_before_encoding(tiny_model, tmp_path):
    folder = scifact_subset(str(tmp_path / "sf"), n_queries=6, n_docs=30)
    with pytest.raises(cli.InputError, match="--teacher .*nowhere: not a folder"):
        main_of("mine", "--model", tiny_model, "--dataset", folder, "--split", "test",
                "--teacher", tmp_path / "nowhere", "--out", tmp_path / "m.jsonl")
    assert not (tmp_path / "m.jsonl.emb").exists()  # nothing was encoded


def test_a_bert_without_tokenizer_in_a_script_is_one_line(tmp_path):
    path = make_tiny_bert(tmp_path / "m")
    for name in os.listdir(path):
        if "token" in name or "vocab" in name:
            os.remove(os.path.join(path, name))
    last = one_line_error(["encode.py", "--model", path, "--dataset", beir(tmp_path / "b"),
                           "--split", "test", "--out", tmp_path / "e"])
    assert "no tokenizer files in it" in last


def test_a_finished_run_extended_with_more_epochs(tiny_model, train_file, tmp_path):
    """--resume with a larger --epochs continues a finished run: its new steps see the batches an
    uninterrupted longer run sees at those steps, and their learning rate follows the longer
    run's schedule from the resumed step on. A shorter run is refused."""
    def flags(out, epochs):
        return train_flags(tiny_model, train_file, out, "--max_steps", 0, "--epochs", epochs,
                           "--example_log", "--warmup", 0)
    main_of("train", *flags(tmp_path / "ext", 2))
    main_of("train", *flags(tmp_path / "ext", 3), "--resume")
    main_of("train", *flags(tmp_path / "long", 3))

    def by_step(out, name):
        with open(out / name) as f:
            rows = [json.loads(line) for line in f]
        return {s: [r for r in rows if r["step"] == s] for s in range(1, 7)}
    ext = by_step(tmp_path / "ext", "examples.jsonl")
    long = by_step(tmp_path / "long", "examples.jsonl")
    assert all([r["qid"] for r in ext[s]] == [r["qid"] for r in long[s]] for s in (5, 6))
    log = by_step(tmp_path / "ext", "log.jsonl")
    assert [log[s][0]["lr"] for s in (5, 6)] == pytest.approx([1e-4 * 2 / 6, 1e-4 * 1 / 6])
    with pytest.raises(cli.InputError, match="a resume may extend a run, not shorten it"):
        main_of("train", *flags(tmp_path / "ext", 1), "--resume")
