"""train.py: gradient caching is exact (three ways), dropout is live, the log has what DESIGN.md
promises."""
import json
import os
import random

import pytest
import torch

import cli
import data
import grad_cache
import train
from conftest import SCIFACT
from loss import info_nce
from model import BiEncoder


def make_train_file(path, n=24, num_neg=3, seed=0, folder=SCIFACT):
    """A small real train jsonl: train queries (SciFact unless folder says otherwise), their
    positives, random corpus documents as negatives."""
    corpus, queries, qrels = data.load_dataset(folder, "train")
    rng = random.Random(seed)
    doc_ids = sorted(corpus)
    rows = []
    for qid in sorted(qrels)[:n]:
        pos = sorted(qrels[qid])
        neg = [d for d in rng.sample(doc_ids, num_neg + 2) if d not in pos][:num_neg]
        rows.append({"qid": qid, "query": queries[qid], "pos": [corpus[d] for d in pos],
                     "pos_ids": pos, "neg": [corpus[d] for d in neg], "neg_ids": neg})
    cli.write_jsonl(str(path), rows)
    return str(path)


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    return make_train_file(tmp_path_factory.mktemp("data") / "train.jsonl")


def run(model, train_file, out_dir, *extra):
    args = train.parser.parse_args(["--model", model, "--train_data", train_file,
                                    "--out_dir", str(out_dir), "--batch_size", "8",
                                    "--group_size", "2", "--max_steps", "2", "--lr", "1e-3",
                                    "--warmup", "0", "--dtype", "fp32", "--device", "cpu",
                                    "--temp", "0.05", *map(str, extra)])
    train.main(args)
    state = torch.load(os.path.join(out_dir, "train_state.pt"), weights_only=False)
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    return state["model"], log


def flat(sd):
    return torch.cat([v.flatten().double() for k, v in sorted(sd.items()) if v.is_floating_point()])


def start_weights(model):
    return flat(BiEncoder(model).state_dict())


@pytest.mark.parametrize("flags", [("--false_negative_margin", "off"), (),
                                   ("--loss", "fused")],
                         ids=["plain", "margin", "margin_fused"])  # the default margin: 0.1
def test_cached_equals_uncached_without_dropout(tiny_model_nodropout, train_file, tmp_path, flags):
    a, log_a = run(tiny_model_nodropout, train_file, tmp_path / "a", "--chunk_size", 0, *flags)
    b, log_b = run(tiny_model_nodropout, train_file, tmp_path / "b", "--chunk_size", 4, *flags)
    start = start_weights(tiny_model_nodropout)
    rel = (flat(a) - flat(b)).norm() / (flat(a) - start).norm()
    assert rel <= 1e-2, rel
    for x, y in zip(log_a, log_b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)


def test_false_negative_margin_leaves_documents_out(tiny_model_nodropout, train_file, tmp_path):
    # a random model scores many negatives above the positive: margin 0 leaves them all out, so
    # the first step's loss (before any update) is lower; the weights end elsewhere
    plain, log_plain = run(tiny_model_nodropout, train_file, tmp_path / "a",
                           "--false_negative_margin", "off")
    margin, log_margin = run(tiny_model_nodropout, train_file, tmp_path / "b",
                             "--false_negative_margin", 0)
    assert log_margin[0]["loss"] < log_plain[0]["loss"] - 0.1
    assert not torch.equal(flat(plain), flat(margin))


@pytest.mark.parametrize("flags, margin", [((), 0.1), (("--temp", "0.02"), 0.04),
                                           (("--false_negative_margin", "0.3"), 0.3),
                                           (("--false_negative_margin", "off"), None)])
def test_the_default_margin_is_twice_the_temperature(flags, margin):
    """The margin is derived into the run's Setup; args keeps what was typed."""
    from types import SimpleNamespace as NS
    args = train.parser.parse_args(list(flags))
    typed = dict(vars(args))
    model = NS(lora_rank=0, settings={"normalize": True})
    setup = train.make_setup(args, 1, data.TrainData([], [], True), model)
    assert setup.margin == pytest.approx(margin)
    assert vars(args) == typed  # args is left as typed


def test_replay_is_exact_with_dropout_and_dropout_is_live(tiny_model, tiny_model_nodropout,
                                                          train_file, tmp_path):
    on, log = run(tiny_model, train_file, tmp_path / "on", "--chunk_size", 4)
    assert all(row["replay_err"] == 0.0 for row in log), [row["replay_err"] for row in log]
    assert {"step", "loss", "lr", "grad_norm", "replay_err"} <= set(log[0]) and log[0]["step"] == 1
    off, _ = run(tiny_model_nodropout, train_file, tmp_path / "off", "--chunk_size", 4)
    start = start_weights(tiny_model)  # same initial weights: dropout has no parameters
    assert torch.equal(start, start_weights(tiny_model_nodropout))
    rel = (flat(on) - flat(off)).norm() / (flat(off) - start).norm()
    assert rel > 0.1, (f"dropout-on and dropout-off runs end too close ({rel:.2e}): "
                       "is the model in train mode?")


def test_replay_is_exact_for_minilm_and_its_checkpoint_loads_in_transformers(train_file,
                                                                             tmp_path):
    """The bundled MiniLM (dropout 0.1): pass 2 reproduces pass 1 bit for bit; the checkpoint
    training writes gives our encode path's vectors in plain transformers.AutoModel with mean
    pooling."""
    from transformers import AutoModel

    from cli import default_model
    _, log = run(default_model(), train_file, tmp_path / "m", "--chunk_size", 4, "--max_steps", 1,
                 "--passage_max_len", 64)
    assert log[0]["replay_err"] == 0.0
    ckpt = str(tmp_path / "m" / "model")
    ours = BiEncoder(ckpt).eval()
    texts = [ex["pos"][0] for ex in data.read_train_jsonl(train_file)[:4]] + ["a short text"]
    batch = ours.tokenize(texts, "doc")
    hf = AutoModel.from_pretrained(ckpt).eval()
    with torch.no_grad():
        hidden = hf(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    theirs = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
    assert (torch.tensor(ours.encode(texts, "doc")) - theirs).abs().max() < 1e-4
    assert not torch.allclose(theirs, torch.tensor(BiEncoder(default_model()).eval()
                                                   .encode(texts, "doc")))


def test_cached_gradient_equals_full_batch_with_pass1_masks(tiny_model):
    """The cached gradient against one autograd graph over the whole batch that uses pass 1's
    dropout masks."""
    torch.manual_seed(0)
    model = BiEncoder(tiny_model)
    model.train()
    corpus, queries, qrels = data.load_dataset(SCIFACT, "train")
    qids = sorted(qrels)[:10]
    q_tok = model.tokenize([queries[q] for q in qids], "query")
    d_tok = model.tokenize([corpus[sorted(qrels[q])[0]] for q in qids], "doc")
    ctx, dev = torch.autocast("cpu", enabled=False), torch.device("cpu")

    def loss_fn(q, d):
        return info_nce(q, d, 0.05, 1)

    scaler = torch.amp.GradScaler("cpu", enabled=False)

    rng = torch.get_rng_state()
    train.train_step(model, {"q": q_tok, "d": d_tok}, loss_fn, ("texts", 3), ctx, scaler, dev)
    # the pooler, e.g., gets no gradient
    used = [p for p in model.parameters() if p.grad is not None]
    cached = [p.grad.clone() for p in used]
    model.zero_grad()

    # full graph: the same chunks, each run under the RNG state pass 1 gave it, kept in one autograd
    # graph
    torch.set_rng_state(rng)
    embs = []
    for tok, kind in ((q_tok, "query"), (d_tok, "doc")):
        _, (chunks, rows, states) = grad_cache.embed(model, tok, kind, ("texts", 3), ctx, dev)
        parts = []
        for chunk, state in zip(chunks, states):
            grad_cache.set_rng_state(state, dev)
            parts.append(model(chunk, kind))
        emb = torch.empty(sum(len(r) for r in rows), parts[0].shape[1])
        emb = emb.index_put((torch.cat(rows),), torch.cat(parts))
        embs.append(emb)
    loss_fn(*embs).backward()
    full = [p.grad for p in used]
    num = sum((a - b).double().norm() ** 2 for a, b in zip(cached, full)) ** 0.5
    den = sum(b.double().norm() ** 2 for b in full) ** 0.5
    print(f"cached vs full-graph gradient: relative difference {num / den:.1e}")
    assert num / den < 1e-6, num / den  # measured 1.4e-7: float32 summation order


def test_chunks_are_length_sorted_and_trimmed():
    import contextlib
    tokens = {"input_ids": torch.tensor([[1, 2, 0, 0], [1, 2, 3, 4], [1, 0, 0, 0]]),
              "attention_mask": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])}
    seen = []

    def stub(chunk, kind):
        seen.append(tuple(chunk["input_ids"].shape))
        return chunk["input_ids"][:, :1].float()

    emb, (chunks, rows, _) = grad_cache.embed(stub, tokens, "doc", ("texts", 2),
                                              contextlib.nullcontext(), torch.device("cpu"))
    assert [r.tolist() for r in rows] == [[1, 0], [2]] and seen == [(2, 4), (1, 1)]
    assert emb.flatten().tolist() == [1, 1, 1]  # back in batch order


def test_chunks_by_a_token_budget():
    """--chunk_tokens: a chunk's longest text x its count within the budget, longest first; a
    text longer than the budget alone."""
    lengths = torch.tensor([3, 10, 2, 2, 5, 1, 12])
    rows = grad_cache.chunks(lengths, ("tokens", 10))
    assert [r.tolist() for r in rows] == [[6], [1], [4, 0], [2, 3, 5]]
    assert all(len(r) * int(lengths[r].max()) <= 10 or len(r) == 1 for r in rows)


def test_attention_dropout_flag(tiny_model, train_file, tmp_path):
    """--attention_dropout replaces the dropout on attention probabilities only, and the saved
    config says so."""
    def config(m):
        return m.encoder.config.attention_probs_dropout_prob, m.encoder.config.hidden_dropout_prob

    assert config(BiEncoder(tiny_model)) == (0.1, 0.1)
    assert config(BiEncoder(tiny_model, attention_dropout=0.0)) == (0.0, 0.1)
    run(tiny_model, train_file, tmp_path / "ad0", "--chunk_size", 4, "--attention_dropout", 0)
    with open(tmp_path / "ad0" / "model" / "config.json") as f:
        config = json.load(f)
    assert config["attention_probs_dropout_prob"] == 0.0 and config["hidden_dropout_prob"] == 0.1


def test_compiled_replay_is_exact_with_dropout(tiny_model, train_file, tmp_path):
    """--compile on CPU with dropout: pass 2 still reproduces pass 1 bit for bit (inductor replays
    eager's draws)."""
    _, log = run(tiny_model, train_file, tmp_path / "c", "--chunk_size", 4, "--compile")
    assert [row["replay_err"] for row in log] == [0.0, 0.0]


def test_distillation_trains_and_needs_scores(tiny_model, train_file, tmp_path):
    """--distill kl and margin_mse run end to end on scored data (score.py's pos_scores/neg_scores)
    and ask for them otherwise."""
    rows = data.read_train_jsonl(train_file)
    for i, row in enumerate(rows):
        row["pos_scores"] = [0.9] * len(row["pos"])
        row["neg_scores"] = [0.5 - 0.1 * (i % 3)] * len(row["neg"])
    scored = str(tmp_path / "scored.jsonl")
    cli.write_jsonl(scored, rows)
    for how in ("kl", "margin_mse"):
        _, log = run(tiny_model, scored, tmp_path / how, "--chunk_size", 4, "--distill", how)
        assert len(log) == 2 and all(row["replay_err"] == 0.0 for row in log)
    with pytest.raises(cli.InputError, match="pos_scores and neg_scores"):
        run(tiny_model, train_file, tmp_path / "nokd", "--distill", "kl")


def test_auto_chunk_follows_the_model_and_the_length():
    """On a GPU the automatic chunk is an activation budget: BERT-base at 256 tokens 256 texts,
    BERT-large at 512 (the size that ran out of memory at 256) 48, MiniLM-L6 at 256 1024; on a CPU
    32."""
    from types import SimpleNamespace as NS

    def model(width, layers, length):
        return NS(encoder=NS(config=NS(hidden_size=width, num_hidden_layers=layers)),
                  settings={"passage_max_len": length})

    gpu = torch.device("cuda")
    assert [grad_cache.chunking(None, None, model(*m), gpu)
            for m in ((768, 12, 256), (1024, 24, 512), (384, 6, 256))] == [
        ("texts", 256), ("texts", 48), ("texts", 1024)]
    cpu = torch.device("cpu")
    assert grad_cache.chunking(None, None, model(768, 12, 256), cpu) == ("texts", 32)
    assert grad_cache.chunking(0, None, model(768, 12, 256), gpu) is None  # --chunk_size 0: off
    assert grad_cache.chunking(None, 4096, model(768, 12, 256), gpu) == ("tokens", 4096)
