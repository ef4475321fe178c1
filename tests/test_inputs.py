"""Every text checked once, every reuse fingerprinted, no flag silently ignored, no run that cannot
learn, FlagEmbedding's train data read as FlagEmbedding reads it: each a one-line error before any
work, or a result checked correct."""
import json
import os

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
from conftest import scifact_subset
from model import BiEncoder
from test_errors import beir
from test_faults import one_line_error
from test_train import make_train_file


def main_of(module, *flags):
    return module.main(module.parser.parse_args(list(map(str, flags))))


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    return make_train_file(tmp_path_factory.mktemp("data") / "train.jsonl", n=16, num_neg=3)


@pytest.fixture(scope="module")
def subset(tmp_path_factory):
    return scifact_subset(str(tmp_path_factory.mktemp("sf")), n_queries=6, n_docs=40)

# -------------------------------------------------------------------------------------------- texts


@pytest.mark.parametrize("row, says", [
    ({"_id": "d1", "text": 42}, "'text' must be a string, not 42"),
    ({"_id": "d1", "title": ["a", "b"], "text": "x"}, "'title' must be a string, not [\"a\""),
    ({"_id": "d1", "text": "half an emoji \ud83d"}, "valid Unicode (it holds a lone surrogate"),
    ({"_id": "d1", "text": "\u200b\ufeff \u00a0"}, "only spaces and invisible characters"),
    ({"_id": "d1", "title": "", "text": "\ufe0f\u034f\u3164"}, "only spaces and invisible"),
])
def test_every_corpus_text_is_checked_when_read(tmp_path, row, says):
    folder = tmp_path / "b"
    os.makedirs(folder / "qrels")
    # json.dumps writes a lone surrogate as its \ud83d escape, as scraped files have it
    (folder / "corpus.jsonl").write_text(json.dumps({"_id": "d0", "text": "fine"}) + "\n"
                                         + json.dumps(row) + "\n")
    (folder / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "query"}) + "\n")
    (folder / "qrels" / "test.tsv").write_text("q1\td0\t1\n")
    with pytest.raises(cli.InputError) as err:
        data.load_dataset(str(folder), "test")
    assert "corpus.jsonl:2: " in str(err.value) and says in str(err.value), str(err.value)


def test_train_texts_pass_the_same_check(tmp_path):
    path = tmp_path / "t.jsonl"
    for bad in ({"query": "q \ud83d", "pos": ["p"]}, {"query": "q", "pos": ["\u200b"]}):
        path.write_text(json.dumps({"query": "fine", "pos": ["p"]}) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(cli.InputError, match="t.jsonl:2: "):
            data.read_train_jsonl(str(path))

# ----------------------------------------------------------------------------------- reuse, indexes


def test_an_encoding_of_other_queries_or_dimensions_is_refused(tmp_path, tiny_model, subset):
    flags = ["--dataset", subset, "--split", "test", "--device", "cpu"]
    main_of(encode, "--model", tiny_model, *flags, "--out", tmp_path / "e")
    main_of(evaluate, "--emb", tmp_path / "e", *flags)  # as it is: scored
    rows = [json.loads(line) for line in open(os.path.join(subset, "queries.jsonl"))]
    edited = tmp_path / "edited"
    os.makedirs(edited / "qrels")
    for name in ("corpus.jsonl", "qrels/test.tsv"):
        (edited / name).write_bytes(open(os.path.join(subset, name), "rb").read())
    edits = [{**r, "text": r["text"] + " (edited)"} for r in rows]
    cli.write_jsonl(edited / "queries.jsonl", edits)
    with pytest.raises(cli.InputError, match="an encoding of other queries"):
        main_of(evaluate, "--emb", tmp_path / "e", "--dataset", edited, "--split", "test")
    ids, q = retrieval.load_embeddings(str(tmp_path / "e"), "queries")
    retrieval.save_embeddings(str(tmp_path / "e"), "queries", ids, q[:, :16])
    with pytest.raises(cli.InputError, match="query vectors of 16 dimensions, documents of 32"):
        main_of(evaluate, "--emb", tmp_path / "e", *flags)


@pytest.mark.parametrize("flags, says", [
    (["--index", "IVF4096,Flat"], "4096 clusters for 40 documents"),
    (["--index", "Bogus12"], "faiss refused it (could not parse index string Bogus12)"),
    (["--index", "PQ8"], "256 centroids a PQ part for 40 documents"),
    (["--index", "HNSW32,PQ8"], "faiss refused it (Number of training points (40)"),
    (["--index", "IDMap,Flat"], "faiss refused it (add does not make sense"),
    (["--index", "HNSW32", "--nprobe", "4"], "--nprobe 4: the index 'HNSW32' has no such setting"),
    (["--nprobe", "4"], "--nprobe has no effect without --index"),
    (["--ef_search", "4"], "--ef_search has no effect without --index"),
])
def test_an_index_faiss_would_refuse_is_refused_before_encoding(tmp_path, tiny_model, subset,
                                                                 monkeypatch, flags, says):
    def no_encoding(*args, **kwargs):
        raise AssertionError("encoded before the index was checked")
    monkeypatch.setattr(BiEncoder, "encode", no_encoding)
    common = ["--model", tiny_model, "--dataset", subset, "--split", "test", "--device", "cpu"]
    with pytest.raises(cli.InputError, match=says.replace("(", r"\(").replace(")", r"\)")):
        main_of(evaluate, *common, *flags)
    with pytest.raises(cli.InputError, match=says.replace("(", r"\(").replace(")", r"\)")):
        main_of(mine, *common, "--range", "0-5", *flags, "--out", tmp_path / "m.jsonl")

# -------------------------------------------------------------------------------- flags and methods


@pytest.mark.parametrize("script, flags, says", [
    ("train", ["--train_data", "{train}", "--remine_num_neg", "3"],
     "--remine_num_neg has no effect without --remine_every"),
    ("train", ["--train_data", "{train}", "--dataset", "beir/scifact/train"],
     "--dataset has no effect with --train_data"),
    ("train", ["--train_data", "{train}", "--lora_rank", "0", "--lora_targets", "qkv"],
     "--lora_targets has no effect without a --lora_rank"),
    ("train", ["--train_data", "{train}", "--mix", "uniform"], "--mix has no effect with one"),
    ("train", ["--train_data", "{train}", "--warmup", "500"], "--warmup 500: the run has only"),
    ("train", ["--train_data", "{train}", "--overwrite", "--resume"], "give one of them"),
    ("mine", ["--corpus", "{subset}/corpus.jsonl", "--out", "{tmp}/m.jsonl"],
     "--corpus has no effect without --train_data"),
    ("mine", ["--train_data", "{train}", "--queries", "{tmp}/ids", "--out", "{tmp}/m.jsonl"],
     "--queries has no effect with --train_data"),
    ("evaluate", ["--emb", "{tmp}", "--dtype", "bf16"], "--dtype has no effect with --emb"),
    ("evaluate", ["--compare", "{tmp}/a", "{tmp}/b", "--out", "{tmp}/c"],
     "--out has no effect with --compare"),
    ("train", ["--train_data", "{train}", "--eval_metric", "map"],
     "--eval_metric without an evaluation set"),
])
def test_a_flag_without_effect_is_an_error(tmp_path, tiny_model, train_file, subset, script,
                                           flags, says):
    module = {"train": train, "mine": mine, "evaluate": evaluate}[script]
    flags = [f.format(train=train_file, subset=subset, tmp=tmp_path) for f in flags]
    extra = ["--model", tiny_model, "--device", "cpu"]
    if script == "train":
        extra += ["--out_dir", tmp_path / "o", "--batch_size", 8]
    elif script == "evaluate":  # --emb and --compare take none of these
        extra = []
    with pytest.raises(cli.InputError, match=says):
        main_of(module, *flags, *extra)


def test_the_lora_rank_a_bert_gets_by_default_is_none(tmp_path, tiny_model, train_file):
    with pytest.raises(cli.InputError, match="--lora_alpha has no effect without a --lora_rank"):
        main_of(train, "--model", tiny_model, "--train_data", train_file, "--lora_alpha", 32,
                "--batch_size", 8, "--device", "cpu", "--out_dir", tmp_path / "o")


def test_a_lora_target_that_cannot_be_saved_is_refused_before_training(tmp_path, tiny_model,
                                                                         train_file):
    says = one_line_error(["train.py", "--model", tiny_model, "--train_data", train_file,
                           "--lora_rank", 4, "--lora_targets", "word", "--batch_size", 8,
                           "--device", "cpu", "--out_dir", tmp_path / "o"])
    assert "word is not a linear layer (Embedding)" in says
    assert not (tmp_path / "o").exists()


def test_runs_that_cannot_learn_are_refused(tmp_path, tiny_model, train_file):
    mixed = tmp_path / "mixed.jsonl"
    rows = [json.loads(line) for line in open(train_file)]
    rows[5]["neg"] = []
    rows[5].pop("neg_ids")
    cli.write_jsonl(mixed, rows)
    common = ["--model", tiny_model, "--device", "cpu", "--out_dir", tmp_path / "o"]
    with pytest.raises(cli.InputError, match=r"1 of 16 queries have no negatives .*--group_size 1"):
        main_of(train, *common, "--train_data", mixed, "--batch_size", 8)
    with pytest.raises(cli.InputError, match="--batch_size 1 --group_size 1: each query sees"):
        main_of(train, *common, "--train_data", train_file, "--batch_size", 1, "--group_size", 1)
    again = tmp_path / "again" / ".." / os.path.basename(train_file)
    os.makedirs(tmp_path / "again")
    cli.write_jsonl(tmp_path / os.path.basename(train_file), rows)
    with pytest.raises(cli.InputError, match="names .* twice"):
        main_of(train, *common, "--train_data", tmp_path / os.path.basename(train_file), again,
                "--batch_size", 8, "--group_size", 1)
    assert not (tmp_path / "o").exists()


def test_errors_name_the_flags_of_the_script_that_stops(tmp_path, tiny_model, train_file):
    beir(tmp_path / "b")
    with pytest.raises(cli.InputError, match="a BEIR folder needs --eval_split"):
        main_of(train, "--model", tiny_model, "--train_data", train_file, "--batch_size", 8,
                "--eval_dataset", tmp_path / "b", "--device", "cpu", "--out_dir", tmp_path / "o")

# -------------------------------------------------------------------------- FlagEmbedding's data


def test_flagembedding_train_data_means_what_it_means_there(tmp_path, tiny_model, train_file):
    """A folder of files (each a source of its own), "-no_in_batch_neg" (each query against its own
    group only), and a line's "prompt" (instead of the query instruction, not before it)."""
    rows = [json.loads(line) for line in open(train_file)]
    folder = tmp_path / "classification-no_in_batch_neg"
    folder.mkdir()
    cli.write_jsonl(folder / "a.jsonl", rows[:8])
    cli.write_jsonl(folder / "b.json", [{**r, "prompt": "Classify: "} for r in rows[8:]])
    sources = data.train_sources([str(folder), train_file])
    assert [(os.path.basename(f), in_batch) for f, in_batch in sources] == [
        ("a.jsonl", False), ("b.json", False), ("train.jsonl", True)]
    model = BiEncoder(tiny_model, query_prefix="Represent: ")
    args = train.parser.parse_args(["--model", tiny_model, "--train_data", str(folder), train_file,
                                    "--batch_size", "8", "--group_size", "2"])
    train_data, group_size = train.load_data(args)
    setup = train.Setup(group_size, None, "")

    def examples_at(step):
        return train_data.examples
    batches = list(sampler.make_batches(model, train_data, examples_at, args, setup, range(4), 0,
                                        1))
    by_source = {os.path.basename(b["source"]): b for b in batches}
    assert not by_source["a.jsonl"]["in_batch"] and by_source["train.jsonl"]["in_batch"]
    text = model.tokenizer.decode(by_source["b.json"]["q"]["input_ids"][0],
                                  skip_special_tokens=True)
    assert text.startswith("classify :") and "represent" not in text, text
    text = model.tokenizer.decode(by_source["train.jsonl"]["q"]["input_ids"][0],
                                  skip_special_tokens=True)
    assert text.startswith("represent :"), text
    # the loss of a -no_in_batch_neg batch: each query's own group alone
    q = torch.nn.functional.normalize(torch.randn(8, 32), dim=-1)
    d = torch.nn.functional.normalize(torch.randn(16, 32), dim=-1)
    batch = {**by_source["a.jsonl"], "offset": 0}
    got = train.compute_loss(q, d, batch, args, setup)
    scores = torch.stack([d[2 * i:2 * i + 2] @ q[i] for i in range(8)]) / args.temp
    want = torch.nn.functional.cross_entropy(scores, torch.zeros(8, dtype=torch.long))
    assert torch.allclose(got, want, atol=1e-6)
    main_of(train, "--model", tiny_model, "--train_data", folder, train_file, "--batch_size", 8,
            "--group_size", 2, "--max_steps", 4, "--device", "cpu", "--out_dir", tmp_path / "o")
    log = [json.loads(line) for line in open(tmp_path / "o" / "log.jsonl")]
    assert {os.path.basename(r["source"]) for r in log} == {"a.jsonl", "b.json", "train.jsonl"}
    assert all(np.isfinite(r["loss"]) for r in log)


def test_flagembedding_s_no_in_batch_neg_is_a_suffix(tmp_path, tiny_model, train_file):
    """As FlagEmbedding reads it: a file whose name ends with no_in_batch_neg before its extension,
    or a folder whose name ends with it; the switch then leaves the false-negative flags without
    effect."""
    for name in ("nli_no_in_batch_neg.jsonl", "x-no_in_batch_neg-v2.jsonl", "plain.jsonl"):
        (tmp_path / name).write_text(open(train_file).read())
    sources = data.train_sources([str(tmp_path / n) for n in ("nli_no_in_batch_neg.jsonl",
                                                              "x-no_in_batch_neg-v2.jsonl")])
    assert [in_batch for _, in_batch in sources] == [False, True]
    with pytest.raises(cli.InputError, match="--false_negative_margin has no effect when every"):
        main_of(train, "--model", tiny_model, "--group_size", 2, "--batch_size", 8,
                "--train_data", tmp_path / "nli_no_in_batch_neg.jsonl",
                "--false_negative_margin", "0.3", "--out_dir", tmp_path / "o")
    os.link(tmp_path / "plain.jsonl", tmp_path / "hardlink.jsonl")
    with pytest.raises(cli.InputError, match="names .* twice"):
        data.train_sources([str(tmp_path / "plain.jsonl"), str(tmp_path / "hardlink.jsonl")])


def test_a_sentence_transformers_save_over_our_checkpoint_is_refused(tmp_path, tiny_model):
    """Our checkpoint saved again by sentence-transformers with another prompt: its files and our
    biencoder.json disagree, and neither is taken over the other in silence."""
    from sentence_transformers import SentenceTransformer
    BiEncoder(tiny_model).save(str(tmp_path / "ours"))
    st = SentenceTransformer(str(tmp_path / "ours"), device="cpu")
    st.prompts["query"] = "query: "
    st.save(str(tmp_path / "ours"))
    with pytest.raises(cli.InputError, match="biencoder.json says query_prefix ''"):
        BiEncoder(str(tmp_path / "ours"))


def test_a_dataset_that_is_a_file_and_a_resume_by_another_spelling(tmp_path, tiny_model,
                                                                   train_file):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(cli.InputError, match="a_file: a file, not a BEIR folder"):
        data.load_dataset(str(tmp_path / "a_file"), "test")
    flags = ["--train_data", train_file, "--batch_size", 8, "--group_size", 2, "--max_steps", 2,
             "--device", "cpu", "--out_dir", tmp_path / "o"]
    main_of(train, "--model", tiny_model, *flags)
    main_of(train, "--model", tiny_model + "/", *flags, "--resume")  # the same model folder
