"""train.py --remine_every: each query's hard negatives mined again inside the run with the weights
of that step, used from two steps on, and a run killed after a re-mining and resumed equals the
uninterrupted run."""
import pytest
import torch

import cli
import data
import mine
from conftest import scifact_subset
from test_resume import final_weights, killed_and_resumed
from test_train import run


@pytest.fixture(scope="module")
def mined(tiny_model, tmp_path_factory):
    """Real SciFact texts (24 train queries, 200 documents) and their negatives mined by the tiny
    model: (the BEIR folder, the train file)."""
    folder = tmp_path_factory.mktemp("sf")
    subset = scifact_subset(str(folder / "subset"), n_queries=24, n_docs=200, split="train")
    out = str(folder / "mined.jsonl")
    mine.main(mine.parser.parse_args(["--model", tiny_model, "--dataset", subset, "--split", "test",
                                      "--range", "2-30", "--num_neg", "3", "--device", "cpu",
                                      "--out", out]))
    return subset, out


def flags(subset):
    return ["--dataset", subset, "--split", "test", "--remine_every", 2, "--remine_range", "0-20",
            "--remine_num_neg", 3, "--remine_margin", 0]


def test_negatives_are_mined_again_and_change_the_training(tiny_model, mined, tmp_path):
    subset, train_file = mined
    state, _ = run(tiny_model, train_file, tmp_path / "re", "--max_steps", 0, "--epochs", 2,
                   *flags(subset))
    again = data.read_jsonl(str(tmp_path / "re" / "remined" / "step.0000002.jsonl"))
    again = [row for _, row in again]
    before = data.read_train_jsonl(train_file)
    assert len(again) == len(before) and all(len(row["neg_ids"]) == 3 for row in again)
    assert [r["neg_ids"] for r in again] != [ex["neg_ids"] for ex in before]
    for row, ex in zip(again, before):  # never a positive
        assert not set(row["neg_ids"]) & set(ex["pos_ids"])
    plain, _ = run(tiny_model, train_file, tmp_path / "plain", "--max_steps", 0, "--epochs", 2)
    assert not torch.equal(final_weights(tmp_path / "re"), final_weights(tmp_path / "plain"))


def test_killed_after_a_re_mining_and_resumed_equals_uninterrupted(tiny_model, mined, tmp_path):
    subset, train_file = mined
    full, killed = killed_and_resumed(tiny_model, train_file, tmp_path, flags(subset), 3)
    assert torch.equal(final_weights(full), final_weights(killed))
    names = sorted(p.name for p in (killed / "remined").iterdir())
    assert names == ["step.0000002.jsonl", "step.0000004.jsonl"]


def test_remine_needs_ids_in_the_corpus(tiny_model, mined, tmp_path):
    subset, train_file = mined
    with pytest.raises(cli.InputError, match="is not in .*'s corpus"):
        run(tiny_model, train_file, tmp_path / "o", "--remine_every", 2)  # NFCorpus's corpus
