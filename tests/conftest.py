"""Shared fixtures: a tiny random BERT (with the real MiniLM tokenizer), the real data in ../shared,
and an offline ir_datasets home."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
SCIFACT = os.path.join(SHARED, "data", "scifact")
NFCORPUS = os.path.join(SHARED, "data", "nfcorpus")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def scifact_subset(folder, n_queries=60, n_docs=500, seed=0, split="test"):
    """A BEIR folder (split test) with n_queries real SciFact queries of `split`, their positives
    and random other documents."""
    import random

    import cli
    import data
    corpus, queries, qrels = data.load_dataset(SCIFACT, split)
    qids = sorted(qrels)[:n_queries]
    docs = sorted({d for q in qids for d in qrels[q]})
    docs += random.Random(seed).sample(sorted(set(corpus) - set(docs)),
                                       max(0, n_docs - len(docs)))
    os.makedirs(os.path.join(folder, "qrels"), exist_ok=True)
    cli.write_jsonl(os.path.join(folder, "corpus.jsonl"),
                    [{"_id": d, "title": "", "text": corpus[d]} for d in docs])
    cli.write_jsonl(os.path.join(folder, "queries.jsonl"),
                    [{"_id": q, "text": queries[q]} for q in qids])
    cli.atomic_write(os.path.join(folder, "qrels", "test.tsv"), lambda f: f.writelines(
        f"{q}\t{d}\t{g}\n" for q in qids for d, g in qrels[q].items()))
    return folder


@pytest.fixture(scope="session", autouse=True)
def ir_datasets_home(tmp_path_factory):
    """ir_datasets' files in a fresh folder: data.py copies the zips of the data mirror (../shared)
    there."""
    os.environ.setdefault("IR_DATASETS_HOME", str(tmp_path_factory.mktemp("ir_datasets")))
    return os.environ["IR_DATASETS_HOME"]


def make_tiny_bert(path, dropout=0.1, pooling="mean"):
    """A 2-layer, 32-dim random BERT with the MiniLM tokenizer, saved as a Hugging Face folder."""
    import json

    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from cli import default_model
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(default_model()).save_pretrained(path)
    with open(os.path.join(path, "biencoder.json"), "w") as f:
        json.dump({"pooling": pooling, "normalize": True, "query_max_len": 32,
                   "passage_max_len": 64}, f)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_model_nodropout(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert_nodrop"), dropout=0.0)


def make_tiny_decoder(path, kind="llama", padding_side="right", dropout=0.1, eos_appended=False):
    """A 2-layer, 32-wide random decoder (Llama or Qwen2) with the MiniLM vocabulary as its
    tokenizer: [CLS] plays BOS and [SEP] EOS; the tokenizer adds BOS only, unless eos_appended."""
    import torch
    from tokenizers import processors
    from transformers import (AutoTokenizer, LlamaConfig, LlamaModel, PreTrainedTokenizerFast,
                              Qwen2Config, Qwen2Model)

    from cli import default_model
    base = AutoTokenizer.from_pretrained(default_model())
    backend = base.backend_tokenizer
    if not eos_appended:
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A", pair="[CLS] $A $B", special_tokens=[("[CLS]", base.cls_token_id)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="[CLS]",
                                        eos_token="[SEP]", pad_token="[PAD]",
                                        padding_side=padding_side)
    config_class, model_class = (LlamaConfig, LlamaModel)
    if kind == "qwen2":
        config_class, model_class = (Qwen2Config, Qwen2Model)
    config = config_class(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                          max_position_embeddings=512, attention_dropout=dropout)
    torch.manual_seed(0)
    model_class(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return make_tiny_decoder(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    return make_tiny_decoder(tmp_path_factory.mktemp("tiny_qwen2"), kind="qwen2",
                             padding_side="left")
