"""Folders saved by sentence-transformers itself (the installed 6.x, and its 5.x layout) give its
vectors through our BiEncoder, queries and documents with their prompts; what we cannot run is a
one-line error; what we save from such a start loads back in both; merge refuses other
tokenizers."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

import cli
import merge
from conftest import make_tiny_bert, make_tiny_decoder
from model import BiEncoder, for_inference

PROMPTS = {"query": "query: ", "document": "passage: "}
QUERIES = ["what is x?", "how many tokens does a much longer question about retrieval take"]
DOCS = ["a short one", "x is a letter, and this document says a good deal more about it than the "
        "other one does", "Mixed CASE text: 3.14"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """The tiny BERT as a plain Hugging Face folder (no biencoder.json), for
    sentence-transformers' Transformer module."""
    folder = make_tiny_bert(tmp_path_factory.mktemp("st") / "bert", dropout=0.0)
    os.remove(os.path.join(folder, "biencoder.json"))
    return folder


def st_folder(bert, folder, mode="mean", include_prompt=True, dense=None, normalize=True,
              prompts=PROMPTS):
    """A SentenceTransformer built from modules and saved by sentence-transformers: Transformer,
    Pooling(mode, include_prompt), the Dense module dense if given, Normalize."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules
    layers = [modules.Transformer(bert), modules.Pooling(32, pooling_mode=mode,
                                                         include_prompt=include_prompt)]
    if dense is not None:
        layers.append(dense)
    if normalize:
        layers.append(modules.Normalize())
    SentenceTransformer(modules=layers, prompts=prompts, device="cpu").save(str(folder))
    return str(folder)


def assert_same_vectors(folder, st_folder=None):
    """Our query and document vectors of folder are sentence-transformers' encode_query and
    encode_document of st_folder (default: the same folder), to 1e-4."""
    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer(st_folder or folder, device="cpu")
    ours = for_inference(folder, torch.device("cpu"), "fp32")
    for kind, theirs in (("query", st.encode_query(QUERIES)), ("doc", st.encode_document(DOCS))):
        mine = ours.encode(QUERIES if kind == "query" else DOCS, kind)
        assert mine.shape == theirs.shape, kind
        assert np.abs(mine - theirs).max() < 1e-4, (kind, np.abs(mine - theirs).max())
    return ours


def edit_json(file, change):
    """Rewrite a JSON file through change(obj) -> obj."""
    with open(file) as f:
        obj = json.load(f)
    with open(file, "w") as f:
        json.dump(change(obj), f)


@pytest.mark.parametrize("include_prompt", [True, False])
@pytest.mark.parametrize("mode", ["cls", "mean", "max", "lasttoken", "mean_sqrt_len_tokens",
                                  "weightedmean"])
def test_each_pooling_mode_gives_sentence_transformers_vectors(bert, tmp_path, mode,
                                                               include_prompt):
    """Every Pooling mode, with the prompt pooled or left out (include_prompt false masks [CLS]
    and the prompt's tokens); unnormalised, so that the vectors' lengths are compared too."""
    folder = st_folder(bert, tmp_path / "st", mode, include_prompt, normalize=False)
    ours = assert_same_vectors(folder)
    assert ours.settings["pool_prompt"] == include_prompt
    assert ours.settings["normalize"] is False


@pytest.mark.parametrize("mode", ["mean", "weightedmean", "lasttoken"])
def test_a_left_padded_decoder_leaves_out_its_instruction_as_sentence_transformers(tmp_path, mode):
    """A decoder whose tokenizer pads on the left (Qwen2's): the instruction starts after the
    padding, and weightedmean's weights count from the first real token, in the padded batch of
    training as in encode's."""
    decoder = make_tiny_decoder(tmp_path / "qwen2", kind="qwen2", padding_side="left",
                                dropout=0.0)
    folder = st_folder(decoder, tmp_path / "st", mode, include_prompt=False)
    ours = assert_same_vectors(folder)
    assert ours.tokenizer.padding_side == "left"
    batch = ours.tokenize(QUERIES, "query")
    with torch.no_grad():
        padded = ours(batch, "query").numpy()
    assert np.abs(padded - ours.encode(QUERIES, "query")).max() < 1e-5


@pytest.mark.parametrize("bias, activation, weights", [
    (True, "Tanh", "model.safetensors"),
    (False, "Identity", "pytorch_model.bin"),
])
def test_a_dense_module_runs_after_pooling(bert, tmp_path, bias, activation, weights):
    """Dense (with or without bias, its activation, weights in either file) then Normalize: 16
    dimensions, as sentence-transformers gives."""
    from sentence_transformers.sentence_transformer import modules
    torch.manual_seed(0)
    dense = modules.Dense(32, 16, bias=bias, activation_function=getattr(torch.nn, activation)())
    folder = st_folder(bert, tmp_path / "st", dense=dense)
    if weights == "pytorch_model.bin":  # as older sentence-transformers saved it
        from safetensors.torch import load_file
        state = load_file(os.path.join(folder, "2_Dense", "model.safetensors"))
        torch.save(state, os.path.join(folder, "2_Dense", "pytorch_model.bin"))
        os.remove(os.path.join(folder, "2_Dense", "model.safetensors"))
    ours = assert_same_vectors(folder)
    assert ours.dim == 16 and (ours.dense.bias is not None) == bias


def test_the_5x_layout_and_its_max_seq_length(bert, tmp_path):
    """The 5.x files (module types under sentence_transformers.models, one boolean a pooling mode,
    max_seq_length in sentence_bert_config.json) read as 6.x reads them; a short max_seq_length
    truncates the long document alike."""
    folder = st_folder(bert, tmp_path / "st", "weightedmean", include_prompt=False)
    edit_json(os.path.join(folder, "modules.json"), lambda modules: [
        {**m, "type": "sentence_transformers.models." + m["type"].rsplit(".", 1)[-1]}
        for m in modules])
    with open(os.path.join(folder, "1_Pooling", "config.json"), "w") as f:
        json.dump({"word_embedding_dimension": 32, "pooling_mode_cls_token": False,
                   "pooling_mode_mean_tokens": False, "pooling_mode_weightedmean_tokens": True,
                   "include_prompt": False}, f)
    with open(os.path.join(folder, "sentence_bert_config.json"), "w") as f:
        json.dump({"max_seq_length": 9, "do_lower_case": False}, f)
    ours = assert_same_vectors(folder)
    assert (ours.settings["pooling"], ours.settings["passage_max_len"]) == ("weightedmean", 9)


def test_without_max_seq_length_the_limit_is_the_tokenizers_within_the_positions(bert, tmp_path):
    """6.x writes no max_seq_length: the tokenizer's model_max_length, capped at the model's 128
    positions, as its Transformer does; a document of 300 words is cut there by both."""
    folder = st_folder(bert, tmp_path / "st")
    edit_json(os.path.join(folder, "tokenizer_config.json"),
              lambda config: {**config, "model_max_length": 100000})
    long = " ".join(["word"] * 300)
    ours = for_inference(folder, torch.device("cpu"), "fp32")
    assert ours.settings["passage_max_len"] == 128
    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer(folder, device="cpu")
    assert np.abs(ours.encode([long], "doc") - st.encode_document([long])).max() < 1e-4


def test_a_router_of_one_transformer_a_kind_gives_its_vectors(bert, tmp_path):
    """Two towers as sentence-transformers saves them (its own folder names in
    router_config.json)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules
    other = make_tiny_bert(tmp_path / "other", dropout=0.0)  # the same weights: moved below
    with torch.no_grad():
        query_tower = modules.Transformer(other)
        for param in query_tower.parameters():
            param.add_(0.01 * torch.randn_like(param))
    router = modules.Router.for_query_document([query_tower], [modules.Transformer(bert)])
    layers = [router, modules.Pooling(32, pooling_mode="cls"), modules.Normalize()]
    SentenceTransformer(modules=layers, prompts=PROMPTS, device="cpu").save(str(tmp_path / "st"))
    ours = assert_same_vectors(str(tmp_path / "st"))
    assert ours.settings["separate_towers"] and ours.query_encoder is not None


@pytest.mark.parametrize("case, says", [
    ("two modes", r"pooling mode cls\+mean"),
    ("layer norm", "LayerNorm"),
    ("custom", "my_package.MyPooling"),
    ("task", "transformer_task 'text-generation'"),
    ("similarity", "similarity_fn_name 'manhattan'"),
    ("router", "routes"),
    ("no pooling config", "a Pooling module without its config.json"),
])
def test_what_we_cannot_run_is_a_one_line_error(bert, tmp_path, case, says):
    """A module, mode or option that would change the vectors and that we cannot run is refused,
    naming it and the folder, rather than ignored."""
    from sentence_transformers.sentence_transformer import modules
    folder = str(tmp_path / "st")
    if case == "two modes":
        st_folder(bert, folder, ("cls", "mean"))
    elif case == "layer norm":
        st_folder(bert, folder, dense=modules.LayerNorm(32))
    else:
        st_folder(bert, folder)
    if case == "custom":
        edit_json(os.path.join(folder, "modules.json"), lambda modules: [
            {**m, "type": "my_package.MyPooling"} if m["path"] == "1_Pooling" else m
            for m in modules])
    elif case == "task":
        edit_json(os.path.join(folder, "sentence_bert_config.json"),
                  lambda config: {**config, "transformer_task": "text-generation"})
    elif case == "similarity":
        edit_json(os.path.join(folder, "config_sentence_transformers.json"),
                  lambda config: {**config, "similarity_fn_name": "manhattan"})
    elif case == "no pooling config":
        os.remove(os.path.join(folder, "1_Pooling", "config.json"))
    elif case == "router":
        shutil.rmtree(folder)
        BiEncoder(bert, separate_towers=True, query_max_len=64, passage_max_len=64).save(folder)
        edit_json(os.path.join(folder, "router_config.json"), lambda config: {
            **config, "structure": {**config["structure"], "image": ["document"]}})
        os.remove(os.path.join(folder, "biencoder.json"))
    with pytest.raises(cli.InputError, match=says) as error:
        BiEncoder(folder)
    assert folder in str(error.value) and "\n" not in str(error.value)


def test_a_start_with_dense_and_include_prompt_false_round_trips(bert, tmp_path):
    """Trained from a sentence-transformers start with a Dense and include_prompt false (weights
    moved, as training would): our checkpoint records both, reloads with the same vectors, and
    SentenceTransformer(saved) gives them too."""
    from sentence_transformers.sentence_transformer import modules
    torch.manual_seed(0)
    dense = modules.Dense(32, 16, activation_function=torch.nn.GELU())
    start = st_folder(bert, tmp_path / "st", "cls", include_prompt=False, dense=dense)
    model = BiEncoder(start)
    assert any(name.startswith("dense.") for name, _ in model.named_parameters())
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))
    model.save(str(tmp_path / "ft"))
    with open(tmp_path / "ft" / "biencoder.json") as f:
        settings = json.load(f)
    assert settings["pool_prompt"] is False and settings["dense"]["path"] == "2_Dense"
    model.eval()
    before = model.encode(QUERIES, "query")
    ours = assert_same_vectors(str(tmp_path / "ft"))
    assert np.abs(ours.encode(QUERIES, "query") - before).max() < 1e-5


def test_pool_prompt_override_is_saved_for_sentence_transformers(tiny_model, tmp_path):
    """BiEncoder(path, pool_prompt=False) on our own checkpoint: written to the Pooling config as
    include_prompt, so that sentence-transformers leaves the prefix out of pooling as we do."""
    BiEncoder(tiny_model, pool_prompt=False, query_prefix="query: ",
              doc_prefix="passage: ").save(str(tmp_path / "m"))
    with open(tmp_path / "m" / "1_Pooling" / "config.json") as f:
        assert json.load(f)["include_prompt"] is False
    assert_same_vectors(str(tmp_path / "m"))


def test_per_text_prompts_replace_the_prefix_and_are_left_out_of_pooling(bert, tmp_path):
    """tokenize(prompts=...): a text's own instruction replaces the query prefix; with pool_prompt
    off its tokens are left out, as sentence-transformers' encode(prompt=...) does. The padded
    batch (training) and encode's lists give the same vectors; with pool_prompt on the batch holds
    input_ids and attention_mask only."""
    from sentence_transformers import SentenceTransformer
    folder = st_folder(bert, tmp_path / "st", "mean", include_prompt=False)
    st = SentenceTransformer(folder, device="cpu")
    model = BiEncoder(folder).eval()
    prompts = ["Instruct: find the definition\nQuery: ", None]
    batch = model.tokenize(QUERIES, "query", prompts=prompts)
    assert batch["pool_mask"].shape == batch["attention_mask"].shape
    with torch.no_grad():
        ours = model(batch, "query").numpy()
    theirs = [st.encode([QUERIES[0]], prompt=prompts[0])[0], st.encode_query([QUERIES[1]])[0]]
    assert np.abs(ours - np.stack(theirs)).max() < 1e-4
    assert np.abs(model.encode(QUERIES[1:], "query") - ours[1:]).max() < 1e-5
    plain = BiEncoder(folder, pool_prompt=True)
    assert set(plain.tokenize(QUERIES, "query", prompts=prompts)) == {"input_ids",
                                                                      "attention_mask"}


@pytest.mark.parametrize("change, says", [
    ("swap", "vocabulary"),
    ("case", "ids of a probe text"),
])
def test_merge_refuses_models_with_other_tokenizers(tiny_model, tmp_path, change, says):
    """The same architecture with a tokenizer that gives words other ids (two tokens' ids
    swapped; or no lowercasing): averaging would mix the embedding rows of different tokens."""
    other = str(tmp_path / "other")
    shutil.copytree(tiny_model, other)

    def swap(tokenizer):
        vocab = tokenizer["model"]["vocab"]
        vocab["the"], vocab["of"] = vocab["of"], vocab["the"]
        return tokenizer
    if change == "swap":
        edit_json(os.path.join(other, "tokenizer.json"), swap)
    else:  # transformers builds BERT's normaliser from tokenizer_config.json
        edit_json(os.path.join(other, "tokenizer_config.json"),
                  lambda config: {**config, "do_lower_case": False})
    args = merge.parser.parse_args(["--models", tiny_model, other, "--out", str(tmp_path / "m")])
    with pytest.raises(cli.InputError, match=says) as error:
        merge.main(args)
    assert tiny_model in str(error.value) and other in str(error.value)
    assert not os.path.exists(tmp_path / "m")


def test_train_py_starts_from_a_sentence_transformers_folder(bert, tmp_path):
    """train.py --model on a sentence-transformers folder with max pooling, a Dense and
    include_prompt false: the Dense trains with the rest, and the checkpoint gives
    sentence-transformers' vectors."""
    import train
    from sentence_transformers.sentence_transformer import modules
    from test_train import make_train_file
    torch.manual_seed(0)
    dense = modules.Dense(32, 16, activation_function=torch.nn.Tanh())
    start = st_folder(bert, tmp_path / "st", "max", include_prompt=False, dense=dense)
    data_file = make_train_file(tmp_path / "train.jsonl", n=16, num_neg=1)
    train.main(train.parser.parse_args([
        "--model", start, "--train_data", data_file, "--batch_size", "8", "--group_size", "2",
        "--max_steps", "2", "--lr", "1e-2", "--device", "cpu", "--out_dir", str(tmp_path / "o")]))
    before = BiEncoder(start).state_dict()
    after = BiEncoder(str(tmp_path / "o" / "model")).state_dict()
    assert not torch.equal(before["dense.weight"], after["dense.weight"])
    ours = assert_same_vectors(str(tmp_path / "o" / "model"))
    assert ours.dim == 16
