"""torchrun: 2 gloo processes give the gradient of one process with the whole batch; encode.py under
torchrun writes what one process writes; gradients are all-reduced once a step, not once a chunk."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from test_train import flat, make_train_file, run, start_weights

pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")


def torchrun(script, *args):
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", script, *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-4000:]
    return p


@pytest.fixture(scope="module")
def train16(tmp_path_factory):
    return make_train_file(tmp_path_factory.mktemp("d") / "train.jsonl", n=40, num_neg=3)


@pytest.mark.parametrize("chunk, extra", [
    (4, ()), (0, ()), (4, ("--directions", "qd", "dq", "qq", "dd", "--hardness", "5"))])
def test_two_processes_equal_one(tiny_model_nodropout, train16, tmp_path, chunk, extra):
    """Every rank's documents (and, for dq and qq, queries) are gathered: two processes give the
    step of one."""
    common = ["--model", tiny_model_nodropout, "--train_data", train16, "--batch_size", 16,
              "--group_size", 2, "--max_steps", 2, "--lr", "1e-3", "--warmup", 0, "--dtype", "fp32",
              "--device", "cpu", "--temp", "0.05", "--chunk_size", chunk, *extra]
    torchrun("train.py", *common, "--out_dir", tmp_path / "two")
    two = torch.load(tmp_path / "two" / "train_state.pt", weights_only=False)
    one, log_one = run(tiny_model_nodropout, train16, tmp_path / "one", "--batch_size", 16,
                       "--chunk_size", chunk, *extra)
    with open(tmp_path / "two" / "log.jsonl") as f:
        log_two = [json.loads(line) for line in f]
    start = start_weights(tiny_model_nodropout)
    rel = (flat(one) - flat(two["model"])).norm() / (flat(one) - start).norm()
    assert rel <= 1e-2, rel
    assert len(log_one) == len(log_two) == 2
    for a, b in zip(log_one, log_two):
        assert abs(a["grad_norm"] - b["grad_norm"]) / a["grad_norm"] <= 1e-3, (
            a["grad_norm"], b["grad_norm"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert len(two["rng"]) == 2  # every rank's RNG state is saved


def test_encode_two_processes_equal_one(tiny_model, tmp_path):
    """Each rank encodes its own shards (strided); together they are the files of one process."""
    from conftest import scifact_subset
    folder = scifact_subset(str(tmp_path / "subset"), n_queries=12, n_docs=60)
    args = ["--model", tiny_model, "--dataset", folder, "--split", "test", "--device", "cpu",
            "--batch_size", 8, "--store", "fp32", "--shard_size", 16]
    torchrun("encode.py", *args, "--out", tmp_path / "two")
    subprocess.run([sys.executable, "encode.py", *map(str, args), "--out", str(tmp_path / "one")],
                   cwd=ROOT, check=True, capture_output=True)
    meta = json.loads((tmp_path / "two" / "meta.json").read_text())
    assert meta["shards"] == [f"corpus.{i:05d}" for i in range(4)]
    for name in meta["shards"] + ["queries"]:
        assert ((tmp_path / "one" / f"{name}.ids.txt").read_text()
                == (tmp_path / "two" / f"{name}.ids.txt").read_text())
        a, b = np.load(tmp_path / "one" / f"{name}.npy"), np.load(tmp_path / "two" / f"{name}.npy")
        assert a.shape == b.shape and np.abs(a - b).max() < 1e-5


def _count_worker(rank, model, train_file, out_dir, chunk, port):
    """One of 2 gloo processes: train 2 steps, counting all-reduce calls."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch.distributed as dist

    import train
    calls = []
    real = dist.all_reduce
    dist.all_reduce = lambda t, *a, **k: (calls.append(t.numel()), real(t, *a, **k))[1]
    train.main(train.parser.parse_args([
        "--model", model, "--train_data", train_file, "--batch_size", "16", "--group_size", "2",
        "--max_steps", "2", "--chunk_size", str(chunk), "--dtype", "fp32", "--device", "cpu",
        "--out_dir", out_dir]))
    with open(os.path.join(out_dir, f"calls{rank}.json"), "w") as f:
        json.dump(calls, f)


@pytest.mark.parametrize("chunk", [2, 8])
def test_one_gradient_all_reduce_a_step(tiny_model_nodropout, train16, tmp_path, chunk):
    """Each parameter's gradient is all-reduced once a step (in place, no copy), whatever the number
    of chunks; so is the gradient of the gathered documents (the gather's backward)."""
    import torch.multiprocessing as mp
    port = 29500 + chunk + os.getpid() % 1000
    mp.spawn(_count_worker, args=(tiny_model_nodropout, train16, str(tmp_path), chunk, port),
             nprocs=2)
    model = __import__("model").BiEncoder(tiny_model_nodropout)
    sizes = sorted(p.numel() for p in model.parameters())
    gathered = 16 * 2 * model.encoder.config.hidden_size  # the batch's documents x the width
    with open(tmp_path / "calls0.json") as f:
        calls = json.load(f)
    # a step: each parameter's gradient, the gathered documents' gradient, the logged means (loss
    # and accuracy) and the stop flag; 8 chunks a step at chunk 2, 2 at chunk 8
    step = sorted(sizes + [gathered, 2, 1])
    assert (len(calls) == 2 * len(step)
            and sorted(calls[:len(step)]) == step == sorted(calls[len(step):])), calls


def test_backend_and_gpu_follow_the_device(monkeypatch):
    """Under torchrun the process group's backend follows --device (gloo for cpu even where CUDA
    exists, NCCL for cuda, on this rank's GPU), and an explicit cuda:N is the GPU set (and so the
    one whose RNG a checkpoint keeps)."""
    import cli
    calls = []
    monkeypatch.setenv("RANK", "0"), monkeypatch.setenv("LOCAL_RANK", "1")
    torchrun = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    for name, value in torchrun.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device",
                        lambda device: calls.append(("set_device", str(device))))
    monkeypatch.setattr(cli.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(cli.dist, "init_process_group",
                        lambda backend, **kw: calls.append((backend, kw["device_id"])))
    monkeypatch.setattr(cli.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(cli.dist, "get_world_size", lambda: 2)
    assert cli.setup_device("cpu") == (torch.device("cpu"), 0, 2) and calls == [("gloo", None)]
    calls.clear()
    assert cli.setup_device("cuda")[0] == torch.device("cuda", 1)
    assert calls == [("set_device", "cuda:1"), ("nccl", torch.device("cuda", 1))]
    calls.clear()
    assert (cli.setup_device("cuda:0")[0] == torch.device("cuda", 0)
            and calls[0] == ("set_device", "cuda:0"))
