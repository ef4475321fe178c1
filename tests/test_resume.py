"""Runs that survive: exact resume after SIGKILL, SIGTERM saves and exits 143 (128 + SIGTERM), a
killed writer leaves the old file."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import cli
from conftest import ROOT
from test_train import flat, make_train_file


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    return make_train_file(tmp_path_factory.mktemp("d") / "train.jsonl", n=48, num_neg=3)


def cmd(model, train_file, out_dir, *extra):
    return [sys.executable, "train.py", "--model", model, "--train_data", train_file,
            "--out_dir", str(out_dir), "--batch_size", "8", "--group_size", "2",
            "--chunk_size", "4", "--epochs", "2", "--lr", "1e-3", "--dtype", "fp32",
            "--device", "cpu", "--save_every", "1", *map(str, extra)]


def wait_for_steps(out_dir, n, proc, timeout=240):
    """Wait until log.jsonl has n steps and their checkpoint exists."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, proc.stderr.read()
        log = out_dir / "log.jsonl"
        if (log.exists() and len(log.read_text().splitlines()) >= n
                and (out_dir / "train_state.pt").exists()):
            return
        time.sleep(0.05)
    raise TimeoutError


def killed_and_resumed(model, train_file, tmp_path, extra, kill_after):
    """The run of cmd(...) with extra flags twice: uninterrupted in tmp_path/full, and killed with
    SIGKILL after kill_after steps then resumed in tmp_path/killed -> (full, killed) folders."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = tmp_path / "full"
    killed = tmp_path / "killed"
    subprocess.run(cmd(model, train_file, full, *extra), cwd=ROOT, check=True, capture_output=True,
                   env=env)
    p = subprocess.Popen(cmd(model, train_file, killed, *extra), cwd=ROOT, stderr=subprocess.PIPE,
                         text=True, env=env)
    wait_for_steps(killed, kill_after, p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    steps = len((full / "log.jsonl").read_text().splitlines())
    assert len((killed / "log.jsonl").read_text().splitlines()) < steps, "finished before the kill"
    r = subprocess.run(cmd(model, train_file, killed, *extra, "--resume"), cwd=ROOT,
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return full, killed


def final_weights(out_dir):
    return flat(torch.load(out_dir / "train_state.pt", weights_only=False)["model"])


def test_sigkill_then_resume_equals_uninterrupted(tiny_model, train_file, tmp_path):
    """Dropout on, gradient caching on, a checkpoint every step; 12 steps over 2 epochs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd(tiny_model, train_file, tmp_path / "full"), cwd=ROOT, check=True,
                   capture_output=True, env=env)
    killed = tmp_path / "killed"
    p = subprocess.Popen(cmd(tiny_model, train_file, killed), cwd=ROOT, stderr=subprocess.PIPE,
                         text=True, env=env)
    wait_for_steps(killed, 7, p)  # past the epoch boundary (6 steps an epoch)
    p.send_signal(signal.SIGKILL)
    p.wait()
    done = len((killed / "log.jsonl").read_text().splitlines())
    assert done < 12, "the run finished before it could be killed"
    r = subprocess.run(cmd(tiny_model, train_file, killed, "--resume"), cwd=ROOT,
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed" in r.stdout
    a, b = final_weights(tmp_path / "full"), final_weights(killed)
    rel = (a - b).norm() / a.norm()
    assert rel <= 1e-6, rel
    log = [json.loads(line) for line in (killed / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == list(range(1, 13))  # no step twice, none missing


def test_sigterm_saves_and_exits_as_killed(tiny_model, train_file, tmp_path):
    p = subprocess.Popen(cmd(tiny_model, train_file, tmp_path, "--epochs", 50), cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(tmp_path, 2, p)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err[-2000:]  # a script running on stops here
    assert "stopped by a signal" in out
    state = torch.load(tmp_path / "train_state.pt", weights_only=False)
    log = (tmp_path / "log.jsonl").read_text().splitlines()
    assert state["step"] == json.loads(log[-1])["step"] < 50 * 6
    assert (tmp_path / "model" / "model.safetensors").exists()


def test_resume_without_checkpoint(tiny_model, train_file, tmp_path):
    r = subprocess.run(cmd(tiny_model, train_file, tmp_path / "x", "--resume"), cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "no checkpoint" in r.stderr and "Traceback" not in r.stderr


def test_killed_writer_leaves_previous_file_intact(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text('{"ndcg@10": 0.6451}\n')
    writer = ("import sys, time; sys.path.insert(0, sys.argv[2]); import cli\n"
              "def slow(f):\n"
              "    f.write('{\"ndcg@10\": 0.1')\n    f.flush()\n"
              "    print('writing', flush=True)\n    time.sleep(60)\n"
              "cli.atomic_write(sys.argv[1], slow)\n")
    p = subprocess.Popen([sys.executable, "-c", writer, str(target), ROOT], stdout=subprocess.PIPE,
                         text=True)
    # the new content is half written, in a temporary file
    assert p.stdout.readline().strip() == "writing"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert target.read_text() == '{"ndcg@10": 0.6451}\n'


def test_resume_from_another_models_checkpoint(tiny_model, tiny_model_nodropout, train_file,
                                               tmp_path):
    subprocess.run(cmd(tiny_model, train_file, tmp_path, "--max_steps", 1), cwd=ROOT, check=True,
                   capture_output=True)
    r = subprocess.run(cmd(tiny_model_nodropout, train_file, tmp_path, "--resume"), cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "train_state.pt: it was trained with --model" in r.stderr
    assert "Traceback" not in r.stderr


def test_non_finite_loss_stops_with_the_step(tiny_model, train_file, tmp_path):
    r = subprocess.run(cmd(tiny_model, train_file, tmp_path, "--temp", "1e-45"), cwd=ROOT,
                       capture_output=True, text=True)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert last.startswith("error: step 1: loss is") and "lower --lr" in last, last


def test_sigkill_during_a_sharded_encode_then_rerun_gives_the_same_files(tiny_model, tmp_path):
    """encode.py killed after a few of its shards, then the same command: the files of an
    uninterrupted run."""
    folder = tmp_path / "b"
    (folder / "qrels").mkdir(parents=True)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    cli.write_jsonl(folder / "corpus.jsonl",
                    [{"_id": f"d{i}", "text": " ".join(words[(i * 7 + j) % 10]
                                                       for j in range(5 + i % 40))}
                     for i in range(3000)])
    cli.write_jsonl(folder / "queries.jsonl", [{"_id": "q1", "text": "alpha beta"}])
    (folder / "qrels" / "test.tsv").write_text("q1\td1\t1\n")

    def cmd(out):
        return [sys.executable, "encode.py", "--model", tiny_model, "--dataset", str(folder),
                "--split", "test", "--shard_size", "100", "--batch_size", "8", "--device", "cpu",
                "--out", str(out)]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd(tmp_path / "full"), cwd=ROOT, check=True, capture_output=True, env=env)
    p = subprocess.Popen(cmd(tmp_path / "killed"), cwd=ROOT, stderr=subprocess.PIPE, text=True,
                         env=env)
    t0 = time.time()
    while len(list((tmp_path / "killed").glob("corpus.*.ids.txt"))) < 3 and time.time() - t0 < 240:
        assert p.poll() is None, p.stderr.read()
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    done = len(list((tmp_path / "killed").glob("corpus.*.ids.txt")))
    assert 3 <= done < 30, done
    subprocess.run(cmd(tmp_path / "killed"), cwd=ROOT, check=True, capture_output=True, env=env)
    # the killed run's temporary files are gone, and so is the lock of each
    names = sorted(f.name for f in (tmp_path / "full").iterdir())
    assert names == sorted(f.name for f in (tmp_path / "killed").iterdir())
    assert cli.RECORD in names and cli.LOCK not in names
    for name in names:
        assert ((tmp_path / "full" / name).read_bytes()
                == (tmp_path / "killed" / name).read_bytes()), name
