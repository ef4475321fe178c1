"""LLM embedders and LoRA on tiny random decoders (Llama, Qwen2) and the tiny BERT: the
end-of-sequence token appended once and pooled, for left and right padding; training with and
without LoRA and gradient checkpointing (exact replay, cached equal to uncached, only adapters
change); the merged checkpoint in transformers, sentence-transformers and peft; resume bit-identical
with LoRA."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_decoder
from model import BiEncoder
from test_resume import final_weights, killed_and_resumed
from test_train import flat, make_train_file, run

pytest.importorskip("peft")

TEXTS = ["a short text", "Vitamin D deficiency and the risk of fractures in older adults", "b"]


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    return make_train_file(tmp_path_factory.mktemp("data") / "train.jsonl", n=24, num_neg=3)


def last_token(hidden, mask):
    """The hidden state at each text's last real token, found without our pooling code."""
    rows = []
    for h, m in zip(hidden, mask):
        rows.append(h[m.nonzero().max()])
    return torch.stack(rows)


@pytest.mark.parametrize("side, eos_appended", [("right", False), ("left", False), ("right", True)])
def test_eos_is_appended_once_and_pooled(tmp_path, side, eos_appended):
    from transformers import AutoModel
    path = make_tiny_decoder(tmp_path / "d", padding_side=side, eos_appended=eos_appended)
    model = BiEncoder(path).eval()
    assert model.decoder and model.settings["pooling"] == "last" and model.settings["append_eos"]
    eos = model.tokenizer.eos_token_id
    for kind in ("query", "doc"):
        batch = model.tokenize(TEXTS, kind)
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            real = ids[mask.bool()].tolist()
            assert real[-1] == eos and real.count(eos) == 1, real
        assert (batch["attention_mask"][:, 0 if side == "left" else -1] == 0).any()  # padded
    # truncation keeps the end-of-sequence token within the max length
    cut = BiEncoder(path, passage_max_len=5).tokenize(["one two three four five six seven"], "doc")
    assert cut["input_ids"].shape[1] == 5 and cut["input_ids"][0, -1] == eos
    # the embedding is the hidden state at that token (plain AutoModel, one text at a time)
    hf = AutoModel.from_pretrained(path).eval()
    batch = model.tokenize(TEXTS, "doc")
    with torch.no_grad():
        ours = model(batch, "doc")
        theirs = []
        for text in TEXTS:
            one = model.tokenize([text], "doc")
            hidden = hf(**one).last_hidden_state
            theirs.append(last_token(hidden, one["attention_mask"])[0])
    assert (ours - F.normalize(torch.stack(theirs), dim=-1)).abs().max() < 1e-5


@pytest.mark.parametrize("decoder, flags", [
    ("tiny_llama", []),
    ("tiny_llama", ["--lora_rank", 4, "--grad_checkpoint"]),
    ("tiny_qwen2", ["--grad_checkpoint"]),
])
def test_decoders_train_with_exact_replay(request, train_file, tmp_path, decoder, flags):
    """Dropout on (attention and, with LoRA, the adapters'): pass 2 replays pass 1 exactly; a
    decoder left to the defaults trains through LoRA (FlagEmbedding's rank 64) unless --lora_rank 0.
    """
    path = request.getfixturevalue(decoder)
    if "--lora_rank" not in flags:
        flags = flags + ["--lora_rank", 0]
    _, log = run(path, train_file, tmp_path / "o", "--chunk_size", 4, *flags)
    assert [row["replay_err"] for row in log] == [0.0, 0.0]
    assert all(np.isfinite(row["loss"]) for row in log)


def test_lora_trains_only_the_adapters_and_defaults_to_64_for_a_decoder(tiny_llama, train_file,
                                                                         tmp_path):
    start = BiEncoder(tiny_llama).state_dict()
    state, _ = run(tiny_llama, train_file, tmp_path / "o", "--chunk_size", 4)
    saved = torch.load(tmp_path / "o" / "train_state.pt", weights_only=False)
    assert saved["args"]["lora_rank"] is None and saved["setup"]["lora_rank"] == 64
    adapters = [k for k in state if ".lora_" in k]
    assert adapters and state[adapters[0]].shape[0] in (64, 32)  # A (64, in) or B (out, 64)
    for key, value in state.items():
        if ".lora_B" in key:  # B starts at zero; trained, it is not
            assert value.abs().max() > 0, key
        elif ".lora_" not in key:  # every other weight as it was
            assert torch.equal(value, start[key.replace(".base_layer.", ".")]), key


@pytest.mark.parametrize("flags", [["--grad_checkpoint"], ["--lora_rank", 4, "--lora_dropout", 0]])
def test_cached_equals_uncached_without_dropout(tmp_path, train_file, flags):
    path = make_tiny_decoder(tmp_path / "d", dropout=0.0)
    a, log_a = run(path, train_file, tmp_path / "a", "--chunk_size", 0, "--lora_rank", 0, *flags)
    b, log_b = run(path, train_file, tmp_path / "b", "--chunk_size", 4, "--lora_rank", 0, *flags)
    for x, y in zip(log_a, log_b):  # step 2's loss is that of step 1's update
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
    if "--lora_rank" not in flags:  # the weights too
        start = flat(BiEncoder(path).state_dict())
        rel = (flat(a) - flat(b)).norm() / (flat(a) - start).norm()
        assert rel <= 1e-2, rel


def test_grad_checkpoint_gives_the_same_training_for_our_bert(tiny_model, train_file, tmp_path):
    """Checkpointing recomputes each layer under the RNG state it had: the same weights, dropout on.
    """
    a, log_a = run(tiny_model, train_file, tmp_path / "a", "--chunk_size", 4)
    b, log_b = run(tiny_model, train_file, tmp_path / "b", "--chunk_size", 4, "--grad_checkpoint")
    assert [row["replay_err"] for row in log_b] == [0.0, 0.0]
    assert [row["loss"] for row in log_a] == [row["loss"] for row in log_b]
    assert (flat(a) - flat(b)).abs().max() < 1e-6


def test_lora_checkpoint_in_transformers_sentence_transformers_and_peft(tiny_llama, tiny_model,
                                                                        train_file, tmp_path):
    from peft import PeftModel
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel
    for base, pooling in ((tiny_llama, "last"), (tiny_model, "mean")):
        out = tmp_path / os.path.basename(base)
        run(base, train_file, out, "--lora_rank", 4, "--lr", 1e-2)
        ckpt = out / "model"
        ours = BiEncoder(str(ckpt)).eval()
        assert not any(".lora_" in k for k in ours.state_dict())  # merged: a plain model
        q = ours.encode(TEXTS, "query")
        d = ours.encode(TEXTS, "doc")
        assert np.abs(d - BiEncoder(base).eval().encode(TEXTS, "doc")).max() > 1e-3  # it trained
        st = SentenceTransformer(str(ckpt), device="cpu")
        assert np.abs(st.encode(TEXTS) - d).max() < 1e-4
        assert np.abs(st.encode(TEXTS, prompt_name="query") - q).max() < 1e-4
        # plain transformers, then peft's adapter on the untrained base: the same vectors
        adapted = PeftModel.from_pretrained(AutoModel.from_pretrained(base), str(ckpt / "adapter"))
        for hf in (AutoModel.from_pretrained(str(ckpt)), adapted):
            batch = ours.tokenize(TEXTS, "doc")
            with torch.no_grad():
                hidden = hf.eval()(**batch).last_hidden_state
            if pooling == "last":
                theirs = last_token(hidden, batch["attention_mask"])
            else:
                m = batch["attention_mask"].unsqueeze(-1).float()
                theirs = (hidden * m).sum(1) / m.sum(1)
            assert (F.normalize(theirs, dim=-1) - torch.from_numpy(d)).abs().max() < 1e-4


def test_lora_resumes_bit_identically_after_sigkill(tiny_model, train_file, tmp_path):
    full, killed = killed_and_resumed(tiny_model, train_file, tmp_path, ["--lora_rank", 4], 3)
    assert torch.equal(final_weights(full), final_weights(killed))


def test_every_stage_takes_the_adapter_as_the_model(tiny_llama, tiny_model, train_file, tmp_path):
    """--model out_dir/model/adapter: its base with the adapter merged in, the checkpoint's
    settings."""
    for base in (tiny_llama, tiny_model):
        out = tmp_path / os.path.basename(base)
        run(base, train_file, out, "--lora_rank", 4, "--lr", 1e-2)
        merged = BiEncoder(str(out / "model")).eval()
        adapter = BiEncoder(str(out / "model" / "adapter")).eval()
        assert adapter.settings == merged.settings
        for kind in ("query", "doc"):
            diff = adapter.encode(TEXTS, kind) - merged.encode(TEXTS, kind)
            assert np.abs(diff).max() < 1e-5, kind
