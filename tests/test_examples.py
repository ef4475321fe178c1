"""train.py --example_log: a line a train query an epoch, whose losses average to the step's logged
loss, and which a run killed and resumed writes exactly as an uninterrupted run."""
import json

import pytest

from test_resume import killed_and_resumed
from test_train import make_train_file, run


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    return make_train_file(tmp_path_factory.mktemp("data") / "train.jsonl", n=24, num_neg=3)


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_each_query_once_an_epoch_and_the_mean_is_the_step_loss(tiny_model, train_file, tmp_path):
    _, log = run(tiny_model, train_file, tmp_path / "o", "--max_steps", 0, "--epochs", 2,
                 "--chunk_size", 4, "--example_log")
    rows = read(tmp_path / "o" / "examples.jsonl")
    assert len(rows) == 2 * 24  # 3 steps of 8 an epoch
    for epoch in (0, 1):
        assert sorted(r["example"] for r in rows if r["epoch"] == epoch) == list(range(24))
    for step in log:
        mine = [r for r in rows if r["step"] == step["step"]]
        assert len(mine) == 8 and all(1 <= r["rank"] <= 16 for r in mine)  # 16 documents a batch
        assert sum(r["loss"] for r in mine) / 8 == pytest.approx(step["loss"], rel=1e-5)
    assert all(r["qid"] for r in rows)


def test_example_log_resumes_exactly(tiny_model, train_file, tmp_path):
    full, killed = killed_and_resumed(tiny_model, train_file, tmp_path, ["--example_log"], 4)
    assert read(killed / "examples.jsonl") == read(full / "examples.jsonl")
