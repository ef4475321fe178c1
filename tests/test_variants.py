"""Two variants of the bi-encoder: separate query and document towers (trained, saved, loaded in
sentence-transformers as one model, resumed exactly) and Matryoshka embeddings (the loss over
prefixes, by hand; evaluate.py --dim)."""
import argparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cli
import data
import encode
import evaluate
import retrieval
import train
from conftest import scifact_subset
from model import BiEncoder
from test_resume import final_weights, killed_and_resumed
from test_train import make_train_file, run


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    return make_train_file(tmp_path_factory.mktemp("data") / "train.jsonl", n=24, num_neg=3)


TEXTS = ["Microstructural development of human newborn cerebral white matter", "a short text",
         "Vitamin D deficiency and the risk of fractures in older adults"]

# ---------------------------------------------------------------------------------- separate towers

def test_separate_towers_train_apart_and_load_in_sentence_transformers(tiny_model, train_file,
                                                                       tmp_path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel
    state, log = run(tiny_model, train_file, tmp_path / "o", "--chunk_size", 4, "--separate_towers")
    assert all(row["replay_err"] == 0.0 for row in log)
    # both towers are in the state a resume restores
    assert any(name.startswith("query_encoder.") for name in state)
    ckpt = tmp_path / "o" / "model"
    assert (ckpt / "query" / "model.safetensors").exists() and (ckpt / "document").is_dir()
    ours = BiEncoder(str(ckpt)).eval()
    assert ours.query_encoder is not None
    q = ours.encode(TEXTS, "query")
    d = ours.encode(TEXTS, "doc")
    assert np.abs(q - d).max() > 1e-3  # one text, two towers, two vectors
    # one model in sentence-transformers: its Router sends each kind of text to its tower
    st = SentenceTransformer(str(ckpt), device="cpu")
    assert np.abs(st.encode_query(TEXTS) - q).max() < 1e-5
    assert np.abs(st.encode_document(TEXTS) - d).max() < 1e-5
    # each tower is a plain Hugging Face folder: transformers' BertModel + mean pooling give its
    # vectors
    for tower, vectors in (("query", q), ("document", d)):
        hf = AutoModel.from_pretrained(str(ckpt / tower)).eval()
        batch = ours.tokenize(TEXTS, "query" if tower == "query" else "doc")
        with torch.no_grad():
            hidden = hf(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).float()
        theirs = F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
        assert (theirs - torch.from_numpy(vectors)).abs().max() < 1e-5, tower
    with pytest.raises(cli.InputError, match="a checkpoint with separate towers"):
        BiEncoder(str(ckpt), separate_towers=False)


def test_separate_towers_in_encode_and_evaluate(tiny_model, train_file, tmp_path):
    """encode.py's documents come from the document tower and its queries from the query tower;
    evaluating its files gives evaluate.py --model's figures."""
    run(tiny_model, train_file, tmp_path / "o", "--separate_towers")
    ckpt = str(tmp_path / "o" / "model")
    folder = scifact_subset(str(tmp_path / "sf"), n_queries=12, n_docs=60)
    flags = ["--dataset", folder, "--split", "test", "--device", "cpu"]
    encode.main(encode.parser.parse_args(["--model", ckpt, *flags, "--store", "fp32",
                                          "--out", str(tmp_path / "emb")]))
    ours = BiEncoder(ckpt).eval()
    ids, emb = retrieval.load_embeddings(str(tmp_path / "emb"), "queries")
    corpus, queries, _ = data.load_dataset(folder, "test")
    assert np.abs(emb - ours.encode([queries[i] for i in ids], "query")).max() < 1e-5
    d_ids, d_emb = retrieval.load_embeddings(str(tmp_path / "emb"), "corpus.00000")
    assert np.abs(d_emb - ours.encode([corpus[i] for i in d_ids], "doc")).max() < 1e-5
    from_emb = evaluate.main(evaluate.parser.parse_args(["--emb", str(tmp_path / "emb"), *flags]))
    from_model = evaluate.main(evaluate.parser.parse_args(["--model", ckpt, *flags]))
    assert from_emb["ndcg@10"] == pytest.approx(from_model["ndcg@10"], abs=1e-6)


def test_separate_towers_resume_exactly_after_sigkill(tiny_model, train_file, tmp_path):
    full, killed = killed_and_resumed(tiny_model, train_file, tmp_path, ["--separate_towers"], 3)
    assert torch.equal(final_weights(full), final_weights(killed))

# ---------------------------------------------------------------------------------- Matryoshka

def test_matryoshka_loss_is_the_sum_of_each_prefix_s_infonce():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(6, 16), dim=-1)
    d = F.normalize(torch.randn(12, 16), dim=-1)
    batch = {"offset": 0, "teacher": None, "in_batch": True}
    args = argparse.Namespace(mask_false_negatives=0, loss="reference", mrl_dims=[16, 8, 4],
                              temp=0.05, distill=None, directions=["qd"], hardness=0.0)
    setup = train.Setup(group_size=2, margin=None, data_hash="", normalize=True)
    targets = torch.arange(6) * 2

    def by_hand(k):  # the first k dimensions, re-normalised, then cross-entropy over the batch
        qk = F.normalize(q[:, :k], dim=-1)
        dk = F.normalize(d[:, :k], dim=-1)
        return F.cross_entropy(qk @ dk.T / 0.05, targets)
    expected = by_hand(16) + by_hand(8) + by_hand(4)
    loss = train.compute_loss(q, d, batch, args, setup)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    raw = F.cross_entropy(q[:, :4] @ d[:, :4].T / 0.05, targets)  # the prefix as it is
    assert by_hand(4).item() != pytest.approx(raw.item(), rel=1e-3)  # re-normalising matters
    args.mrl_dims = None  # off: the whole embedding's InfoNCE alone
    whole = by_hand(16).item()
    assert train.compute_loss(q, d, batch, args, setup).item() == pytest.approx(whole, rel=1e-6)


def test_matryoshka_trains_and_evaluate_dim_scores_the_prefix(tiny_model, train_file, tmp_path):
    _, log = run(tiny_model, train_file, tmp_path / "o", "--chunk_size", 4, "--mrl_dims", 32, 16, 8)
    assert all(row["replay_err"] == 0.0 for row in log)
    ckpt = str(tmp_path / "o" / "model")
    folder = scifact_subset(str(tmp_path / "sf"), n_queries=12, n_docs=60)
    flags = ["--model", ckpt, "--dataset", folder, "--split", "test", "--device", "cpu"]
    means = evaluate.main(evaluate.parser.parse_args(flags + ["--dim", "8"]))
    # by hand: the first 8 dimensions of every vector, re-normalised, ranked by cosine
    corpus, queries, qrels = data.load_dataset(folder, "test")
    model = BiEncoder(ckpt).eval()
    d_ids = list(corpus)
    q_ids = sorted(qrels)
    d = model.encode([corpus[i] for i in d_ids], "doc")[:, :8]
    q = model.encode([queries[i] for i in q_ids], "query")[:, :8]
    d = F.normalize(torch.from_numpy(d), dim=-1)
    q = F.normalize(torch.from_numpy(q), dim=-1)
    cos = (q @ d.T).numpy()
    run_by_hand = {}
    for i, qid in enumerate(q_ids):
        run_by_hand[qid] = {d_ids[j]: float(cos[i, j]) for j in range(len(d_ids))}
    expected = retrieval.evaluate_run(run_by_hand, qrels)[0]
    assert means["ndcg@10"] == pytest.approx(expected["ndcg@10"], abs=1e-5)
    whole = evaluate.main(evaluate.parser.parse_args(flags))
    assert means["ndcg@10"] != pytest.approx(whole["ndcg@10"], abs=1e-6)  # not the whole's
    with pytest.raises(cli.InputError, match="--dim 64: the model's embeddings have 32 dimensions"):
        evaluate.main(evaluate.parser.parse_args(flags + ["--dim", "64"]))


@pytest.mark.parametrize("flags, says", [
    (["--mrl_dims", "64", "16"], "--mrl_dims 64: the model's embeddings have 32 dimensions"),
    (["--mrl_dims", "16", "16"], "--mrl_dims 16 16: a dimension twice"),
])
def test_matryoshka_flags_are_checked(tiny_model, train_file, tmp_path, flags, says):
    with pytest.raises(cli.InputError, match=says):
        run(tiny_model, train_file, tmp_path / "o", *flags)
