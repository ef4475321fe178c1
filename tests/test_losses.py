"""The losses the field moved to: more negative directions in one softmax, hardness weighting,
gradient-cache chunks by a token budget, and pooling without the instruction. loss.info_nce is
checked against the formula written out query by query, value and gradient."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cli
import train
from conftest import make_tiny_bert
from loss import info_nce
from test_train import flat, make_train_file, run, start_weights

DIRECTION_SETS = [("qd",), ("qd", "dq"), ("qd", "qq"), ("qd", "dd"), ("qd", "dq", "qq", "dd")]


def by_hand(q, d, temp, G, d_keys=None, pos_keys=None, margin=None, directions=("qd",),
            hardness=0.0):
    """The loss of the formula in loss.py's docstring, one query and one term at a time."""
    losses = []
    for i in range(len(q)):
        t = i * G
        positive = q[i] @ d[t]
        a = positive / temp

        def other_positive(key):  # another positive of query i, by key
            return d_keys is not None and key in pos_keys[i].tolist()
        terms = []
        for k in range(len(d)):
            if k != t and not other_positive(int(d_keys[k]) if d_keys is not None else None):
                terms.append(q[i] @ d[k])
                if "dd" in directions:
                    terms.append(d[t] @ d[k])
        for j in range(len(q)):
            their_positive = int(d_keys[j * G]) if d_keys is not None else None
            if j != i and not other_positive(their_positive):
                if "dq" in directions:
                    terms.append(q[j] @ d[t])
                if "qq" in directions:
                    terms.append(q[i] @ q[j])
        if margin is not None:
            terms = [x for x in terms if not x > positive + margin]
        z = torch.exp(a) + sum(torch.exp(x / temp + hardness * x.detach()) for x in terms)
        losses.append(torch.log(z) - a)
    return torch.stack(losses).mean()


@pytest.mark.parametrize("directions", DIRECTION_SETS)
@pytest.mark.parametrize("G, hardness, masked", [(1, 0.0, False), (3, 0.0, True), (3, 5.0, False),
                                                 (2, 9.0, True)])
def test_info_nce_is_the_formula(directions, G, hardness, masked):
    """Value and gradient (queries and documents), with and without hard negatives, with the
    false-negative masks by key and by margin."""
    torch.manual_seed(0)
    B = 5
    q = F.normalize(torch.randn(B, 8, dtype=torch.float64), dim=-1).requires_grad_()
    d = F.normalize(torch.randn(B * G, 8, dtype=torch.float64), dim=-1).requires_grad_()
    keys = {}
    if masked:
        d_keys = torch.arange(B * G)
        d_keys[G] = d_keys[0]  # query 1's positive is query 0's too
        pos_keys = torch.tensor([[d_keys[i * G].item(), -1] for i in range(B)])
        pos_keys[2, 1] = d_keys[3 * G]  # query 2 has query 3's positive as a second positive
        keys = dict(d_keys=d_keys, q_pos_keys=pos_keys, margin=0.3)
    ours = info_nce(q, d, 0.05, G, directions=directions, hardness=hardness, **keys)
    grads = torch.autograd.grad(ours, (q, d))
    theirs = by_hand(q, d, 0.05, G, keys.get("d_keys"), keys.get("q_pos_keys"),
                     keys.get("margin"), directions, hardness)
    grads_by_hand = torch.autograd.grad(theirs, (q, d))
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-10)
    for a, b in zip(grads, grads_by_hand):
        assert torch.allclose(a, b, atol=1e-10), (a - b).abs().max()


def test_the_defaults_are_the_loss_of_before_exactly():
    """directions ("qd",) and hardness 0: cross_entropy(q @ d.T / temp, i * G), bit for bit."""
    torch.manual_seed(1)
    q = F.normalize(torch.randn(6, 16), dim=-1)
    d = F.normalize(torch.randn(18, 16), dim=-1)
    plain = F.cross_entropy(q @ d.T / 0.02, torch.arange(6) * 3)
    assert torch.equal(info_nce(q, d, 0.02, 3), plain)


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    return make_train_file(tmp_path_factory.mktemp("data") / "train.jsonl", n=24, num_neg=3)


@pytest.mark.parametrize("flags", [(), ("--directions", "qd", "dq", "qq", "dd", "--hardness", 5)])
def test_chunks_by_tokens_equal_no_cache_and_replay_exactly(tiny_model, tiny_model_nodropout,
                                                            train_file, tmp_path, flags):
    """--chunk_tokens: without dropout the whole batch's gradient (no cache); with dropout, pass 2
    replays pass 1 exactly. So with every direction and hardness."""
    a, log_a = run(tiny_model_nodropout, train_file, tmp_path / "a", "--chunk_size", 0, *flags)
    b, log_b = run(tiny_model_nodropout, train_file, tmp_path / "b", "--chunk_tokens", 200,
                   *flags)
    rel = (flat(a) - flat(b)).norm() / (flat(a) - start_weights(tiny_model_nodropout)).norm()
    assert rel <= 1e-2, rel
    for x, y in zip(log_a, log_b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
    _, log = run(tiny_model, train_file, tmp_path / "c", "--chunk_tokens", 200, *flags)
    assert [row["replay_err"] for row in log] == [0.0, 0.0]


def test_the_chunking_experiment_measures_every_setting(tiny_model, train_file, tmp_path):
    """experiments/chunking.py (docs/results.md's chunking table): a row a setting, its runs
    replayed exactly."""
    script = os.path.join(os.path.dirname(__file__), "..", "experiments", "chunking.py")
    out = subprocess.run([sys.executable, script, "--train_data", train_file,
                          "--out", tmp_path / "runs", "--steps", "2", "--reps", "2", "--settings",
                          f"--chunk_size 4 --batch_size 8 --model {tiny_model}",
                          f"--chunk_tokens 200 --batch_size 8 --model {tiny_model}"],
                         capture_output=True, text=True, check=True).stdout
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| `--chunk")]
    assert [row[0].split()[1:3] for row in rows] == [["`--chunk_size", "4"],
                                                     ["`--chunk_tokens", "200"]]
    assert all(float(row[1]) > 0 and row[4] == "0 |" for row in rows)


def test_more_directions_and_hardness_change_the_training(tiny_model_nodropout, train_file,
                                                          tmp_path):
    plain, log = run(tiny_model_nodropout, train_file, tmp_path / "a")
    more, log_more = run(tiny_model_nodropout, train_file, tmp_path / "b", "--directions", "qd",
                         "qq", "--hardness", 5)
    assert log_more[0]["loss"] > log[0]["loss"]  # more terms in every partition function
    assert not torch.equal(flat(plain), flat(more))


@pytest.mark.parametrize("flags, says", [
    (["--directions", "dq"], "--directions: qd .* is always in"),
    (["--directions", "qd", "dd", "--loss", "fused"], "--loss fused computes --directions qd"),
    (["--chunk_tokens", "100", "--chunk_size", "4"], "give one"),
])
def test_what_cannot_be_is_refused(flags, says):
    with pytest.raises(cli.InputError, match=says):
        train.check_flags(train.parser.parse_args(flags), 1)


def test_pool_prompt_0_gives_sentence_transformers_vectors(train_file, tmp_path):
    """train.py --pool_prompt 0 with a query instruction: the checkpoint's Pooling config says
    include_prompt false, and sentence-transformers gives our vectors, queries and documents."""
    from sentence_transformers import SentenceTransformer

    from model import for_inference
    model = make_tiny_bert(tmp_path / "tiny", dropout=0.0)
    run(model, train_file, tmp_path / "o", "--pool_prompt", 0, "--query_prefix",
        "Represent this question for retrieval: ")
    folder = str(tmp_path / "o" / "model")
    with open(tmp_path / "o" / "model" / "1_Pooling" / "config.json") as f:
        assert json.load(f)["include_prompt"] is False
    st = SentenceTransformer(folder, device="cpu")
    ours = for_inference(folder, torch.device("cpu"), "fp32")
    queries = ["what do proteins fold into?", "a question"]
    docs = ["Proteins fold into shapes.", "Another document, somewhat longer than the first."]
    assert np.abs(ours.encode(queries, "query") - st.encode_query(queries)).max() < 1e-4
    assert np.abs(ours.encode(docs, "doc") - st.encode_document(docs)).max() < 1e-4
    with_prompt = for_inference(folder, torch.device("cpu"), "fp32", pool_prompt=True)
    assert np.abs(with_prompt.encode(queries, "query") - ours.encode(queries, "query")).max() > 1e-3
