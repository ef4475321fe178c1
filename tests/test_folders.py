"""Folders: a script removes, replaces or reads as its own only what it wrote (by the record it
keeps in the folder), a kill -9 at any moment leaves nothing that the next run takes for the user's
or misses, a fresh run never mixes with an earlier one, and a command that stops before any work
leaves no folder or lock file behind."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import cli
import encode
import merge
import mine
import train
from conftest import ROOT, scifact_subset
from test_faults import one_line_error
from test_train import make_train_file

USERS = {"draft.tmp": "a user's draft", "notes.old": "a user's notes", "mined.7.jsonl": "{}\n",
         "mined.0.jsonl": "{}\n"}


def users_files(folder):
    """Put files and folders a user might keep in folder: names like those the scripts once
    tidied or took for theirs (*.tmp, *.old, mined.N.jsonl)."""
    os.makedirs(folder / "cache.tmp", exist_ok=True)
    os.makedirs(folder / "model.old", exist_ok=True)
    (folder / "cache.tmp" / "x").write_text("kept")
    (folder / "model.old" / "config.json").write_text("{}")
    for name, text in USERS.items():
        (folder / name).write_text(text)


def assert_users_files_untouched(folder):
    for name, text in USERS.items():
        assert (folder / name).read_text() == text, name
    assert (folder / "cache.tmp" / "x").read_text() == "kept"
    assert (folder / "model.old" / "config.json").read_text() == "{}"


def main_of(module, *flags):
    return module.main(module.parser.parse_args(list(map(str, flags))))


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    return make_train_file(tmp_path_factory.mktemp("data") / "mined.jsonl", n=16, num_neg=3)


def train_flags(model, train_data, out_dir, *extra):
    return ["--model", model, "--train_data", train_data, "--out_dir", out_dir, "--batch_size", 8,
            "--group_size", 2, "--max_steps", 2, "--device", "cpu", "--warmup", 0, *extra]


def test_a_claim_touches_only_what_its_record_names(tmp_path):
    """The user's *.tmp and *.old stay; what a killed writer left in its recorded temporary folder
    goes, and a folder moved aside by a swap that never finished comes back."""
    users_files(tmp_path)
    held = cli.claim(tmp_path, "train.py", ["model", "log.jsonl"])
    assert json.loads((tmp_path / cli.RECORD).read_text())["files"] == {}  # nothing written yet
    cli.note_written(tmp_path / "model" / "config.json")  # as every writer does first
    cli.note_written(tmp_path / "log.jsonl")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "w").write_text("old weights")
    record = json.loads((tmp_path / cli.RECORD).read_text())
    assert record["files"] == {"model": "train.py", "log.jsonl": "train.py"}
    temp = tmp_path / record["temp"]
    # a kill between swap_in's two renames, and a half-written file, simulated in this process
    os.rename(tmp_path / "model", temp / "model.old")
    (temp / "log.jsonl.x1y2.tmp").write_text("half")
    held.lock.close()  # as a kill would: no release
    held.lock = None
    again = cli.claim(tmp_path, "train.py", ["model", "log.jsonl"])
    assert (tmp_path / "model" / "w").read_text() == "old weights"
    assert not any(temp.iterdir())
    assert_users_files_untouched(tmp_path)
    with pytest.raises(cli.InputError, match="another run is writing there"):
        cli.claim(tmp_path, "train.py")
    again.release()
    assert not (tmp_path / cli.LOCK).exists() and not temp.exists()
    cli.claim(tmp_path, "train.py").release()


def test_a_name_the_user_has_is_refused_with_nothing_changed(tmp_path):
    (tmp_path / "log.jsonl").write_text("the user's log\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(cli.InputError, match="log.jsonl is there, and train.py did not write it"):
        cli.claim(tmp_path, "train.py", ["model", "log.jsonl"]).release()
    for held in list(cli.LIVE):
        held.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "log.jsonl").read_text() == "the user's log\n"


def test_encode_writes_beside_the_users_files(tmp_path, tiny_model):
    """encode.py --out into a folder of the user's: their files stay as they were; a file of theirs
    under one of encode.py's names stops it in one line."""
    folder = scifact_subset(str(tmp_path / "sf"), n_queries=4, n_docs=20)
    out = tmp_path / "out"
    out.mkdir()
    users_files(out)
    flags = ["--model", tiny_model, "--dataset", folder, "--split", "test", "--device", "cpu",
             "--out", out]
    main_of(encode, *flags)
    assert_users_files_untouched(out)
    assert (out / "corpus.00000.npy").is_file() and not (out / cli.LOCK).exists()
    main_of(encode, *flags)  # its own files: reused
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "queries.npy").write_text("not ours")
    with pytest.raises(cli.InputError, match="queries.npy is there, and encode.py did not"):
        main_of(encode, *flags[:-1], theirs)
    assert sorted(p.name for p in theirs.iterdir()) == ["queries.npy"]


def test_train_next_to_its_data_and_the_users_mined_files(tmp_path, tiny_model, train_file):
    """README's names, --train_data runs/mined.jsonl --out_dir runs: the run trains, and files
    named like re-mined ones are neither read, zipped onto the data, nor removed."""
    runs = tmp_path / "runs"
    runs.mkdir()
    data_file = runs / "mined.jsonl"
    data_file.write_text(open(train_file).read())
    users_files(runs)
    main_of(train, *train_flags(tiny_model, data_file, runs))
    assert (runs / "model").is_dir()
    assert_users_files_untouched(runs)
    assert data_file.read_text() == open(train_file).read()


def test_a_fresh_run_never_mixes_with_an_earlier_one(tmp_path, tiny_model, train_file):
    out = tmp_path / "o"
    main_of(train, *train_flags(tiny_model, train_file, out))
    (out / "mine.txt").write_text("the user's")
    before = (out / "log.jsonl").read_text()
    with pytest.raises(cli.InputError, match="holds a run of train.py .*--overwrite"):
        main_of(train, *train_flags(tiny_model, train_file, out, "--max_steps", 1))
    assert (out / "log.jsonl").read_text() == before  # refused: nothing changed
    main_of(train, *train_flags(tiny_model, train_file, out, "--max_steps", 1, "--overwrite"))
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [1]
    assert (out / "mine.txt").read_text() == "the user's"


def test_an_error_before_any_work_leaves_no_folder_and_no_lock(tmp_path, tiny_model, train_file):
    out = tmp_path / "a" / "b"
    says = one_line_error(["train.py", *train_flags(tiny_model, train_file, out, "--batch_size",
                                                    64)])
    assert "--batch_size 64 is larger than" in says
    assert not (tmp_path / "a").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "x").write_text("kept")
    one_line_error(["encode.py", "--model", tiny_model, "--dataset", "beir/scifact/test",
                    "--max_len", 100000, "--device", "cpu", "--out", existing])
    assert sorted(p.name for p in existing.iterdir()) == ["x"]


def test_train_killed_then_resumed_leaves_only_its_names(tmp_path, tiny_model, train_file):
    """kill -9 in the middle of a run that saves every step: the rerun with --resume finds and
    removes what the kill left, and the folder then holds the run's names, the record and the
    user's file, nothing else."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "draft.tmp").write_text("a user's")
    flags = train_flags(tiny_model, train_file, out, "--max_steps", 0, "--epochs", 30,
                        "--save_every", 1)
    p = subprocess.Popen([sys.executable, "train.py", *map(str, flags)], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    # after its second checkpoint: the third step's line is in the log
    while not (out / "log.jsonl").exists() or len((out / "log.jsonl").read_text().splitlines()) < 3:
        assert p.poll() is None and time.time() < deadline, "the run ended before its third step"
        time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    subprocess.run([sys.executable, "train.py", *map(str, flags), "--resume"], cwd=ROOT, check=True,
                   capture_output=True, timeout=600)
    names = sorted(p.name for p in out.iterdir())
    expected = {"model", "train_state.pt", "log.jsonl", "train.png", "draft.tmp", cli.RECORD}
    assert set(names) == expected, names
    assert (out / "draft.tmp").read_text() == "a user's"


def test_merge_and_mine_leave_other_folders_alone(tmp_path, tiny_model, train_file):
    """merge.py --out into a folder it did not write, or beside a PATH.tmp it did not write, is
    refused; mine.py never replaces its own input, and its encoding folder goes with nothing
    else."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("kept")
    with pytest.raises(cli.InputError, match="theirs is there, and merge.py did not write it"):
        main_of(merge, "--models", tiny_model, tiny_model, "--out", theirs)
    (tmp_path / "soup.tmp").mkdir()
    (tmp_path / "soup.tmp" / "x").write_text("kept")
    with pytest.raises(cli.InputError, match="soup.tmp is there, and merge.py did not"):
        main_of(merge, "--models", tiny_model, tiny_model, "--out", tmp_path / "soup")
    assert (theirs / "notes.txt").read_text() == "kept"
    with pytest.raises(cli.InputError, match="--out .* is --train_data"):
        main_of(mine, "--model", tiny_model, "--train_data", train_file, "--out", train_file)
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "out.jsonl.emb").mkdir()  # the name mine.py once used for its own encoding
    (folder / "out.jsonl.emb" / "x").write_text("kept")
    main_of(mine, "--model", tiny_model, "--train_data", train_file, "--range", "0-10",
            "--num_neg", 2, "--device", "cpu", "--out", folder / "out.jsonl")
    assert sorted(p.name for p in folder.iterdir()) == ["out.jsonl", "out.jsonl.emb"]
    assert (folder / "out.jsonl.emb" / "x").read_text() == "kept"


def test_a_name_never_written_stays_the_users(tmp_path, tiny_model, train_file):
    """A name enters the record when the script first writes it: examples.jsonl a user puts into a
    run's folder (the run never wrote one) is neither removed by --overwrite nor taken for a log."""
    out = tmp_path / "o"
    main_of(train, *train_flags(tiny_model, train_file, out))
    (out / "examples.jsonl").write_text("the user's notes\n")
    main_of(train, *train_flags(tiny_model, train_file, out, "--overwrite"))
    assert (out / "examples.jsonl").read_text() == "the user's notes\n"
    with pytest.raises(cli.InputError, match="examples.jsonl is there, and train.py did not"):
        main_of(train, *train_flags(tiny_model, train_file, out, "--overwrite", "--example_log"))


def test_a_model_inside_the_run_it_replaces_is_refused(tmp_path, tiny_model, train_file):
    out = tmp_path / "o"
    main_of(train, *train_flags(tiny_model, train_file, out))
    with pytest.raises(cli.InputError, match="inside --out_dir's model, which this run replaces"):
        main_of(train, *train_flags(str(out / "model"), train_file, out, "--overwrite"))


def test_other_programs_files_in_a_claimed_folder(tmp_path, tiny_model):
    """A user's own .lock stays; a foreign .written_by.json is refused with nothing left behind."""
    folder = scifact_subset(str(tmp_path / "sf"), n_queries=4, n_docs=20)
    flags = ["--model", tiny_model, "--dataset", folder, "--split", "test", "--device", "cpu"]
    out = tmp_path / "e"
    out.mkdir()
    (out / ".lock").write_text("a user's lock file")
    main_of(encode, *flags, "--out", out)
    assert (out / ".lock").read_text() == "a user's lock file"
    foreign = tmp_path / "f"
    foreign.mkdir()
    (foreign / cli.RECORD).write_text('{"a": 1}')
    says = one_line_error(["encode.py", *flags, "--out", foreign])
    assert "not a record this project wrote" in says
    assert sorted(p.name for p in foreign.iterdir()) == [cli.RECORD]


def test_shards_without_their_meta_are_not_reused(tmp_path, tiny_model):
    folder = scifact_subset(str(tmp_path / "sf"), n_queries=4, n_docs=20)
    flags = ["--model", tiny_model, "--dataset", folder, "--split", "test", "--device", "cpu",
             "--out", tmp_path / "e"]
    main_of(encode, *flags)
    os.remove(tmp_path / "e" / "meta.json")
    with pytest.raises(cli.InputError, match="no meta.json that says what made it"):
        main_of(encode, *flags)


def test_merge_refuses_a_folder_with_more_than_it_wrote_and_follows_a_link(tmp_path, tiny_model):
    main_of(merge, "--models", tiny_model, tiny_model, "--out", tmp_path / "soup")
    main_of(merge, "--models", tiny_model, tiny_model, "--out", tmp_path / "soup")  # its own: again
    (tmp_path / "soup" / "NOTES.md").write_text("kept")
    with pytest.raises(cli.InputError, match="holds NOTES.md, which merge.py did not write"):
        main_of(merge, "--models", tiny_model, tiny_model, "--out", tmp_path / "soup")
    os.remove(tmp_path / "soup" / "NOTES.md")
    os.symlink(tmp_path / "soup", tmp_path / "link")
    main_of(merge, "--models", tiny_model, tiny_model, "--out", tmp_path / "link")
    assert os.path.islink(tmp_path / "link") and (tmp_path / "link" / "model.safetensors").exists()
    assert not os.path.exists(tmp_path / "link.old") and not os.path.exists(tmp_path / "soup.old")


def test_mine_never_replaces_a_file_of_its_dataset(tmp_path, tiny_model):
    folder = scifact_subset(str(tmp_path / "sf"), n_queries=4, n_docs=20)
    corpus = open(os.path.join(folder, "corpus.jsonl")).read()
    with pytest.raises(cli.InputError, match="is --dataset's corpus.jsonl"):
        main_of(mine, "--model", tiny_model, "--dataset", folder, "--split", "test",
                "--out", os.path.join(folder, "corpus.jsonl"))
    assert open(os.path.join(folder, "corpus.jsonl")).read() == corpus
