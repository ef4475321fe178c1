"""Data loading, pooling, pytrec_eval wiring, the mine -> train -> encode -> evaluate pipeline on
real SciFact, sentence-transformers parity, bad input, and the README's commands."""
import json
import os
import re

import numpy as np
import pytest
import torch

import cli
import data
import encode
import evaluate
import mine
import retrieval
import sampler
import train
from conftest import NFCORPUS, ROOT, SCIFACT, make_tiny_bert, scifact_subset
from cli import default_model
from model import Bert, BiEncoder


# --------------------------------------------------------------------------------------------- data

def test_ir_datasets_and_beir_folder_agree():
    a = data.load_dataset("beir/scifact/test")
    b = data.load_dataset(SCIFACT, "test")
    assert a == b
    corpus, queries, qrels = a
    assert ((len(corpus), len(queries), len(qrels), sum(map(len, qrels.values())))
            == (5183, 300, 300, 339))
    assert corpus["4983"].startswith("Microstructural development of human newborn cerebral "
                                     "white matter assessed in vivo by diffusion tensor magnetic "
                                     "resonance imaging. Alterations")


def test_nfcorpus_graded_qrels():
    corpus, queries, qrels = data.load_dataset(NFCORPUS, "test")
    assert len(corpus) == 3633 and len(qrels) == 323
    assert {g for docs in qrels.values() for g in docs.values()} >= {1, 2}


def test_group_sampling_is_a_function_of_seed_epoch_index():
    ex = {"query": "q", "pos": ["a", "b", "c"], "neg": ["x", "y", "z", "w"]}
    assert sampler.sample_group(ex, 4, 0, 1, 5) == sampler.sample_group(ex, 4, 0, 1, 5)
    groups = {str(sampler.sample_group(ex, 4, 0, e, 5)) for e in range(20)}
    assert len(groups) > 5  # different epochs draw different groups
    pos, negs = sampler.sample_group({"query": "q", "pos": ["a"], "neg": ["x"]}, 4, 0, 0, 0)
    assert pos == 0 and negs == [0, 0, 0]  # too few negatives: repeated


def test_train_jsonl_roundtrip(tmp_path):
    rows = [{"query": "q1", "pos": ["p"], "neg": ["n1", "n2"], "qid": "1", "pos_ids": ["a"],
             "neg_ids": ["b", "c"], "neg_scores": [0.5, 0.4], "prompt": "Q: "}]
    cli.write_jsonl(tmp_path / "t.jsonl", rows)
    assert data.read_train_jsonl(str(tmp_path / "t.jsonl")) == rows


# -------------------------------------------------------------------------------------------- model

def test_pooling_variants(tiny_model):
    texts = ["a short one", "a much longer text with many more tokens in it"]
    for pooling in ("cls", "mean", "last"):
        m = BiEncoder(tiny_model, pooling=pooling, normalize=False).eval()
        batch = m.tokenize(texts, "doc")
        with torch.no_grad():
            emb = m(batch, "doc")
            hidden = m.encoder(batch["input_ids"], batch["attention_mask"])
        n = batch["attention_mask"].sum(1)
        for i in range(2):
            expected = {"cls": hidden[i, 0], "mean": hidden[i, :n[i]].mean(0),
                        "last": hidden[i, n[i] - 1]}[pooling]
            assert torch.allclose(emb[i], expected, atol=1e-5), pooling
    # left padding: the last token is at position -1 for every row
    m = BiEncoder(tiny_model, pooling="last", normalize=False).eval()
    m.tokenizer.padding_side = "left"
    batch = m.tokenize(texts, "doc")
    with torch.no_grad():
        emb, hidden = m(batch, "doc"), m.encoder(batch["input_ids"], batch["attention_mask"])
    assert torch.allclose(emb, hidden[:, -1], atol=1e-5)
    with pytest.raises(cli.InputError, match="unknown pooling"):
        BiEncoder(tiny_model, pooling="sum")


def hf_embed(hf, batch):
    """transformers' BertModel with mean pooling and normalisation: the reference our BiEncoder must
    match."""
    hidden = hf(input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"]).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_our_bert_gives_transformers_vectors_and_gradients(mode):
    """The real MiniLM on a padded batch: our Bert's vectors and gradients equal transformers'
    BertModel's, in eval mode and in train mode (dropout 0 on both, so that both are
    deterministic)."""
    from transformers import BertModel
    texts = [data.load_dataset(SCIFACT, "test")[0][d] for d in ("4983", "5836")] + ["short text"]
    dropout = 0.0 if mode == "train" else None
    ours = BiEncoder(default_model(), attention_dropout=dropout)
    assert isinstance(ours.encoder, Bert)
    hf = (BertModel.from_pretrained(default_model(), attn_implementation="eager",
                                    attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
          if mode == "train" else BertModel.from_pretrained(default_model()))
    if mode == "train":
        ours.encoder.config.hidden_dropout_prob = 0.0
    ours.train(mode == "train"), hf.train(mode == "train")
    batch = ours.tokenize(texts, "doc")  # padded: the short text is masked in attention and pooling
    a, b = ours(batch, "doc"), hf_embed(hf, batch)
    assert (a - b).abs().max() < 1e-5
    a.sum().backward(), b.sum().backward()
    ours_layer, hf_layer = ours.encoder.layers[0], hf.encoder.layer[0]
    assert torch.allclose(ours_layer.up.weight.grad, hf_layer.intermediate.dense.weight.grad,
                          atol=1e-5)
    assert torch.allclose(ours_layer.qkv.weight.grad[384:768],
                          hf_layer.attention.self.key.weight.grad, atol=1e-5)
    assert torch.allclose(ours.encoder.word.weight.grad, hf.embeddings.word_embeddings.weight.grad,
                          atol=1e-5)


def test_dropout_is_live_and_replays_under_the_same_rng():
    # MiniLM's dropout: 0.1 on hidden states and attention
    ours = BiEncoder(default_model()).train()
    batch = ours.tokenize(["a query about cells", "another, longer query about proteins and cells"],
                          "query")
    torch.manual_seed(1)
    a = ours(batch, "query")
    b = ours(batch, "query")
    torch.manual_seed(1)
    assert torch.equal(a, ours(batch, "query")) and (a - b).abs().max() > 1e-3
    assert torch.equal(ours.eval()(batch, "query"), ours(batch, "query"))


def test_other_architectures_fall_back_to_transformers(tmp_path):
    """A checkpoint our Bert cannot run (here: another activation) is transformers' AutoModel,
    unpatched."""
    other = make_tiny_bert(tmp_path / "gelu_new")
    with open(os.path.join(other, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(other, "config.json"), "w") as f:
        json.dump({**config, "hidden_act": "gelu_new"}, f)
    m = BiEncoder(other)
    assert not isinstance(m.encoder, Bert) and m.encoder.config._attn_implementation == "sdpa"
    assert m(m.tokenize(["some text", "more"], "doc"), "doc").shape == (2, 32)


def test_minilm_settings_come_from_its_sentence_transformers_files():
    s = BiEncoder(default_model()).settings
    assert (s["pooling"], s["normalize"], s["passage_max_len"]) == ("mean", True, 256)


# --------------------------------------------------------------------------------------- evaluation

def test_pytrec_eval_wiring_hand_computed_ndcg():
    qrels = {"q1": {"d1": 1, "d2": 2}, "q2": {"d9": 1}}
    run = {"q1": {"d3": 3.0, "d1": 2.0, "d2": 1.0}, "q2": {"d9": 1.0}}
    means, per_query = retrieval.evaluate_run(run, qrels)
    # trec_eval nDCG, linear gains: DCG = 1/log2(3) + 2/log2(4); ideal = 2/log2(2) + 1/log2(3)
    dcg, ideal = 1 / np.log2(3) + 2 / np.log2(4), 2 + 1 / np.log2(3)
    assert per_query["q1"]["ndcg@10"] == pytest.approx(dcg / ideal, abs=1e-6)
    assert per_query["q1"]["mrr@10"] == pytest.approx(0.5)
    assert means["ndcg@10"] == pytest.approx((dcg / ideal + 1) / 2, abs=1e-6)


def test_search_ties_are_deterministic_and_shards_equal_one_matrix():
    d = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 0.0]], dtype=np.float32)
    scores, idx = retrieval.search(np.array([[1.0, 0.0], [-0.6, 0.8]], dtype=np.float32), [d], 3)
    assert (idx.tolist() == [[0, 1, 4], [2, 3, 0]]
            and np.allclose(scores, [[1, 1, 1], [0.8, 0.6, -0.6]]))
    rng = np.random.default_rng(0)
    d = rng.integers(-2, 3, (300, 8)).astype(np.float32)  # small integers: many exact ties
    q = rng.integers(-2, 3, (20, 8)).astype(np.float32)
    whole = retrieval.search(q, [d], 50)
    sharded = retrieval.exact_search(q, [d[:7], d[7:100], d[100:]], 50, rows=6)
    assert all(np.array_equal(a, b) for a, b in zip(whole, sharded))
    cos = (retrieval.unit(torch.tensor(q).double())
           @ retrieval.unit(torch.tensor(d).double()).T).float()
    # brute force: cosine in float64 rounded to float32, as search scores; ties by the lower index
    expected = [sorted(range(300), key=lambda j: (-cos[i, j].item(), j))[:50] for i in range(20)]
    assert whole[1].tolist() == expected


# ----------------------------------------------------------------------------------------- pipeline

def test_mine_train_encode_evaluate_on_scifact_subset(tiny_model, tmp_path):
    """The four stages end to end on real SciFact (24 train queries, 200 documents), with a tiny
    model."""
    folder = scifact_subset(str(tmp_path / "sf"), n_queries=24, n_docs=200, split="train")
    mined = tmp_path / "mined.jsonl"
    rows = mine.main(mine.parser.parse_args(["--model", tiny_model, "--dataset", folder,
                                             "--split", "test", "--range", "2-30", "--num_neg", "3",
                                             "--out", str(mined)]))
    assert len(rows) == 24 and all(len(r["neg"]) == 3 for r in rows)
    for r in rows:
        assert not set(r["neg_ids"]) & set(r["pos_ids"]) and r["query"] not in r["neg"]
    train.main(train.parser.parse_args(["--model", tiny_model, "--train_data", str(mined),
                                        "--group_size", "4", "--batch_size", "8", "--epochs", "2",
                                        "--device", "cpu", "--out_dir", str(tmp_path / "ft")]))
    ckpt = str(tmp_path / "ft" / "model")
    encode.main(encode.parser.parse_args(["--model", ckpt, "--dataset", folder, "--split", "test",
                                          "--out", str(tmp_path / "emb")]))
    meta = json.loads((tmp_path / "emb" / "meta.json").read_text())
    assert meta["count"] == 200 and meta["shards"] == ["corpus.00000"] and meta["pooling"] == "mean"
    from_emb = evaluate.main(evaluate.parser.parse_args(["--emb", str(tmp_path / "emb"),
                                                         "--dataset", folder, "--split", "test",
                                                         "--out", str(tmp_path / "ev")]))
    from_model = evaluate.main(evaluate.parser.parse_args(["--model", ckpt, "--dataset", folder,
                                                           "--split", "test"]))
    assert from_emb["queries"] == 24 and 0 < from_emb["ndcg@10"] <= 1
    # float16 storage vs float32
    assert from_emb["ndcg@10"] == pytest.approx(from_model["ndcg@10"], abs=0.02)
    # mining again from encode.py's vectors of the same corpus and model (fp32 stored) writes the
    # same file
    encode.main(encode.parser.parse_args(["--model", tiny_model, "--dataset", folder,
                                          "--split", "test", "--store", "fp32",
                                          "--out", str(tmp_path / "emb0")]))
    again = mine.main(mine.parser.parse_args(["--model", tiny_model, "--dataset", folder,
                                              "--split", "test", "--range", "2-30",
                                              "--num_neg", "3", "--emb", str(tmp_path / "emb0"),
                                              "--out", str(tmp_path / "mined2.jsonl")]))
    assert again == rows
    run = (tmp_path / "ev" / "run.trec").read_text().splitlines()
    assert len(run) == 24 * 200 and run[0].split()[1:4:2] == ["Q0", "1"]


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_checkpoint_loads_in_sentence_transformers(tmp_path, pooling):
    """Our saved model in sentence-transformers gives encode.py's vectors (the real MiniLM)."""
    from sentence_transformers import SentenceTransformer
    ours = BiEncoder(default_model(), pooling=pooling, query_prefix="query: ")
    ours.save(str(tmp_path / "m"))
    texts = [data.load_dataset(SCIFACT, "test")[0][d]
             for d in ("4983", "5836", "7912")] + ["short text"]
    ours.eval()
    a = ours.encode(texts, "doc")
    st = SentenceTransformer(str(tmp_path / "m"), device="cpu")
    b = st.encode(texts, convert_to_numpy=True)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 0.999, cos
    qa = ours.encode(["is x true?"], "query")
    qb = st.encode(["is x true?"], prompt_name="query")
    assert float(qa[0] @ qb[0] / np.linalg.norm(qb[0])) >= 0.999


# ------------------------------------------------------------------------------------------- README

def test_readme_commands_use_real_flags():
    readme = open(os.path.join(ROOT, "README.md")).read()
    import bench
    import merge
    import score
    scripts = {"train.py": train.parser, "mine.py": mine.parser, "encode.py": encode.parser,
               "evaluate.py": evaluate.parser, "bench.py": bench.parser, "score.py": score.parser,
               "merge.py": merge.parser}
    checked = 0
    for line in re.findall(r"(?:python|torchrun[^\n]*?) (\w+\.py)([^\n]*)", readme):
        script, rest = line
        assert script in scripts, f"README runs {script}, which does not exist"
        known = {o for a in scripts[script]._actions for o in a.option_strings}
        for flag in re.findall(r"(?<!\S)(--[a-z_]+)", rest):
            assert flag in known, f"README: {script} has no flag {flag}"
            checked += 1
    assert checked > 20


def test_compare_two_runs_paired_test(tmp_path, capsys):
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.8, 50)
    noise = rng.normal(0, 0.02, 50)
    for name, values in (("a", base), ("b", base + 0.1 + noise - noise.mean())):
        per_query = {str(i): {"ndcg@10": v, "recall@100": v, "mrr@10": v, "map": v}
                     for i, v in enumerate(values)}
        cli.write_json(str(tmp_path / name / "metrics.json"), {"per_query": per_query})
    evaluate.main(evaluate.parser.parse_args(["--compare", str(tmp_path / "a"),
                                              str(tmp_path / "b")]))
    line = next(l for l in capsys.readouterr().out.splitlines() if l.strip().startswith("ndcg@10"))
    assert "diff +0.1000" in line and float(re.search(r"p = (\S+)", line).group(1)) < 1e-6, line
