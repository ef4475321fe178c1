"""Speed and memory against sentence-transformers (ST) on whatever device is present, a JSON line a
measure (ratio > 1: ours better). GPU: bert-base shape, random weights, synthetic texts of 32/256
tokens, batch 1024. --quick (CPU-sized): the real MiniLM on real SciFact texts, batch 64.

    python bench.py --what loss
        # fused vs reference InfoNCE: seconds (forward + backward), extra peak memory
    python bench.py --what train
        # train.py (cache on and off) vs ST's CachedMultipleNegativesRankingLoss
    python bench.py --what encode
        # BiEncoder.encode vs SentenceTransformer.encode: docs/s, whole process

Each measurement runs in a fresh process, the sides taking turns, --reps times, medians reported.
The same precision on both sides: ST's weights in bf16 when ours are (encoding), its model under the
same autocast in both passes of its cache (training: its second pass runs inside backward(), so the
autocast covers that too). Tokenising is outside the step timers on both sides.
"""
import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import cli
import data
from model import DTYPES, Bert, for_inference

ROOT = os.path.dirname(os.path.abspath(__file__))
parser = cli.parser(__doc__, device="auto", dtype="bf16")
parser.add_argument("--what", default="all", choices=["loss", "train", "encode", "llm", "all"],
                    help="What to compare.")
parser.add_argument("--quick", action="store_true",
                    help="CPU-sized settings: the real MiniLM on SciFact texts.")
parser.add_argument("--reps", type=cli.positive, default=3,
                    help="Repetitions of each side (medians reported).")
# internal: one measurement
parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)

# ---------------------------------------------------------------------------------- one measurement

def peak_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9

def loss_call(s, device):
    from fused_loss import fused_info_nce
    from loss import info_nce
    B, N, D = s["shape"]
    fn = fused_info_nce if s["kind"] == "fused" else info_nce
    q = torch.randn(B, D, device=device).to(DTYPES[s["dtype"]]).requires_grad_()
    d = torch.randn(N, D, device=device).to(DTYPES[s["dtype"]]).requires_grad_()

    def call():
        fn(q, d, 0.02, N // B).backward()
    return call

def ours_encode_call(s, device):
    model = for_inference(s["model"], device, "bf16", passage_max_len=s["max_len"])

    def call():
        for kind in ("doc", "query"):
            model.encode(s[kind], kind, s["encode_batch"])
    return call

def st_encode_call(s, device):
    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer(s["model"], device=str(device)).to(torch.bfloat16)
    model.max_seq_length = s["max_len"]

    def call():
        for kind in ("doc", "query"):
            model.encode(s[kind], batch_size=s["encode_batch"])
    return call

def st_train_call(s, device):
    """ST's cached loss, over the rows and steps train.py takes."""
    from sentence_transformers import SentenceTransformer, losses
    model = SentenceTransformer(s["model"], device=str(device)).train()  # dropout on, as in ours
    model.max_seq_length = s["max_len"]
    loss_fn = losses.CachedMultipleNegativesRankingLoss(model, scale=1 / 0.05,
                                                        mini_batch_size=s["chunk"])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
    rows = data.read_train_jsonl(s["data"])
    B = s["batch"]
    batches = []
    for i in range(0, B * s["steps"], B):  # tokenised before the timer, as ours
        columns = zip(*[(r["query"], r["pos"][0], r["neg"][0]) for r in rows[i:i + B]])
        features = []
        for column in columns:
            tokens = model.tokenize(list(column))
            features.append({k: v.to(device) if torch.is_tensor(v) else v
                             for k, v in tokens.items()})
        batches.append(features)

    def call():
        with torch.autocast(device.type, dtype=DTYPES[s["dtype"]], enabled=s["dtype"] != "fp32"):
            # its second pass runs in backward: autocast covers it
            loss_fn(batches.pop(0), None).backward()
        opt.step()
        opt.zero_grad()
    return call

CALLS = {
    "fused": loss_call,
    "reference": loss_call,
    "ours_encode": ours_encode_call,
    "st_encode": st_encode_call,
    "st_train": st_train_call,
}

def child(s):
    """One measurement in this fresh process: s["steps"] calls (the first warms up), then a RESULT
    line."""
    device = cli.setup_device(s["device"])[0]
    call = CALLS[s["kind"]](s, device)
    base = peak_gb(device)
    times = [time.perf_counter()]
    for _ in range(s["steps"]):
        call()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())
    calls = [b - a for a, b in zip(times, times[1:])]
    # the first call warms up (where there are more)
    seconds = statistics.median(calls[1:] or calls)
    result = {"seconds": seconds, "per_s": s.get("n", 1) / seconds, "peak_gb": peak_gb(device),
              "extra_gb": peak_gb(device) - base}
    print("RESULT " + json.dumps(result))

# -------------------------------------------------------------------------------------- comparisons

def measure(cmd, log, spec):
    """Run one side's process -> its figures: the child's RESULT line, or train.py's own log."""
    t0 = time.perf_counter()
    p = subprocess.run(cmd, input=json.dumps(spec), capture_output=True, text=True, cwd=ROOT)
    if p.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{p.stderr[-3000:]}")
    # the whole process: imports, loading, tokenising and all
    out = {"wall": time.perf_counter() - t0}
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            out.update(json.loads(line[len("RESULT "):]))
    if log:  # train.py: its own log, the steps after the first (which warms up)
        with open(log) as f:
            steps = [json.loads(line) for line in f][1:]
        out["per_s"] = statistics.median(x["q_per_s"] for x in steps)
        out["peak_gb"] = steps[-1]["mem_gb"]
    return out

def compare(what, sides, reps, keys, **settings):
    """sides: name -> (repetition -> (command, train.py's log or None, stdin)), the baseline last.
    The sides take turns, reps times; one JSON line of medians a measure and side. -> every run's
    figures."""
    res = {name: [] for name in sides}
    for r in range(reps):
        for name, side in sides.items():
            res[name].append(measure(*side(r)))
    *ours, base = res
    for name in ours:
        for key in keys:
            o = statistics.median(x[key] for x in res[name])
            b = statistics.median(x[key] for x in res[base])
            ratio = o / b if key == "per_s" else b / o  # > 1: ours better
            print(json.dumps({"what": f"{what}: {name} vs {base}", "measure": key, "ours": o,
                              "baseline": b, "ratio": ratio, **settings}), flush=True)
    return res

def workload(args, cuda, tmp):
    """(model folder, train rows, docs, queries, sizes): the GPU setting, or the CPU one (--quick).
    """
    if cuda and not args.quick:
        from transformers import AutoTokenizer, BertConfig
        folder = os.path.join(tmp, "bert-base")
        tok = AutoTokenizer.from_pretrained(cli.default_model())
        Bert(BertConfig()).save(folder)  # 768 wide, 12 layers, 110M parameters, random
        tok.save_pretrained(folder)
        vocab = [w for w in tok.vocab if w.isalpha() and w.isascii()]
        rng = random.Random(0)

        def text(n):
            return " ".join(rng.choices(vocab, k=n))
        rows = [{"query": text(30), "pos": [text(300)], "neg": [text(300)]}
                for _ in range(6 * 1024)]
        docs = [text(rng.randint(100, 254)) for _ in range(16384)]
        queries = [text(30) for _ in range(2048)]
        sizes = dict(batch=1024, chunk=256, steps=6, max_len=256, encode_batch=512)
        return folder, rows, docs, queries, sizes
    corpus, queries, qrels = data.load_dataset("beir/scifact/train")
    ids = sorted(corpus)
    rng = random.Random(0)
    rows = [{"query": queries[q], "pos": [corpus[min(qrels[q])]], "neg": [corpus[rng.choice(ids)]]}
            for q in sorted(qrels)[:3 * 64]]
    docs = [corpus[i] for i in ids[:500]]
    queries = [r["query"] for r in rows[:60]]
    sizes = dict(batch=64, chunk=16, steps=3, max_len=256, encode_batch=32)
    return cli.default_model(), rows, docs, queries, sizes

def main(args):
    if args.child:  # the measurement's spec comes on stdin (texts too long for a command line)
        return child(json.load(sys.stdin))
    cuda = torch.cuda.is_available() and args.device != "cpu"
    tmp = tempfile.mkdtemp()

    def spawn(**spec):
        return [sys.executable, __file__, "--child"], None, {"device": args.device, **spec}
    if args.what in ("loss", "all"):
        shape = [8192, 65536, 768] if cuda else [4096, 32768, 64]
        dtype = "bf16" if cuda else "fp32"
        sides = {kind: child_side(spawn, kind=kind, shape=shape, dtype=dtype, steps=4)
                 for kind in ("fused", "reference")}
        compare("loss", sides, args.reps, ["seconds", "extra_gb"], shape=shape, dtype=dtype)
    if args.what in ("llm", "all"):
        llm(args, cuda, tmp)
    if args.what in ("loss", "llm"):
        return
    folder, rows, docs, queries, s = workload(args, cuda, tmp)
    if args.what in ("encode", "all"):
        spec = dict(model=folder, doc=docs, query=queries, n=len(docs) + len(queries), **s)
        spec["steps"] = 2 if cuda else 1
        sides = {name: child_side(spawn, kind=kind, **spec)
                 for name, kind in (("ours", "ours_encode"), ("st", "st_encode"))}
        compare("encode", sides, args.reps, ["per_s", "wall"], docs=len(docs), queries=len(queries),
                weights="bf16", batch=s["encode_batch"])
    if args.what in ("train", "all"):
        train_file = os.path.join(tmp, "train.jsonl")
        cli.write_jsonl(train_file, rows)
        flags = ["--model", folder, "--train_data", train_file, "--batch_size", s["batch"],
                 "--max_steps", s["steps"], "--group_size", 2, "--query_max_len", s["max_len"],
                 "--passage_max_len", s["max_len"], "--temp", 0.05, "--dtype", args.dtype,
                 "--false_negative_margin", "off",  # ST's loss has no margin
                 "--device", args.device]

        def ours(chunk):
            def side(r):
                out_dir = f"{tmp}/{chunk}_{r}"
                cmd = [sys.executable, "train.py", *map(str, flags), "--chunk_size", str(chunk),
                       "--out_dir", out_dir]
                return cmd, f"{out_dir}/log.jsonl", None
            return side
        st = child_side(spawn, kind="st_train", model=folder, data=train_file, dtype=args.dtype,
                            n=s["batch"], **s)
        res = compare("train", {"ours": ours(s["chunk"]), "ours_no_cache": ours(0), "st": st},
                      args.reps, ["per_s", "peak_gb", "wall"], group=2, dtype=args.dtype, **s)
        if cuda:
            print_mfu(res, folder, s)

def decoder(folder, cuda):
    """A decoder LLM with random weights: Qwen2-0.5B's shape on a GPU (24 layers, 896 wide, 0.5B
    weights), 2 layers on a CPU; MiniLM's vocabulary as its tokenizer ([SEP] its end-of-sequence).
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2Model
    base = AutoTokenizer.from_pretrained(cli.default_model())
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, eos_token="[SEP]",
                                        pad_token="[PAD]")
    layers = 24 if cuda else 2
    config = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         max_position_embeddings=32768, tie_word_embeddings=True)
    Qwen2Model(config).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, [w for w in tokenizer.get_vocab() if w.isalpha() and w.isascii()]

def llm(args, cuda, tmp):
    """train.py on a decoder: LoRA rank 16 on the frozen bf16 base, gradient checkpointing, batch
    512 (64 on a CPU) with 1 hard negative, queries of 64 and documents of 256 tokens: queries/s and
    peak memory (ours only: sentence-transformers has no such cached LoRA route to compare with
    here)."""
    folder, words = decoder(os.path.join(tmp, "qwen2"), cuda)
    rng = random.Random(0)

    def text(n):
        return " ".join(rng.choices(words, k=n))
    batch = 512 if cuda else 16
    steps = 4 if cuda else 2
    rows = [{"query": text(60), "pos": [text(300)], "neg": [text(300)]}
            for _ in range(batch * steps)]
    train_file = os.path.join(tmp, "llm.jsonl")
    cli.write_jsonl(train_file, rows)
    flags = ["--model", folder, "--train_data", train_file, "--batch_size", batch,
             "--max_steps", steps, "--group_size", 2, "--query_max_len", 64,
             "--passage_max_len", 256, "--query_prefix", "query: ", "--lora_rank", 16,
             "--grad_checkpoint",
             "--dtype", args.dtype, "--device", args.device]
    for r in range(args.reps):
        out_dir = f"{tmp}/llm_{r}"
        cmd = [sys.executable, "train.py", *map(str, flags), "--out_dir", out_dir]
        out = measure(cmd, f"{out_dir}/log.jsonl", None)
        print(json.dumps({"what": "llm: train, Qwen2-0.5B shape, LoRA 16, gradient checkpointing",
                          "layers": 24 if cuda else 2, "batch": batch, "q_per_s": out["per_s"],
                          "peak_gb": out["peak_gb"], "wall": out["wall"]}), flush=True)

def child_side(spawn, **spec):
    """A side that runs one child measurement with this spec, whatever the repetition."""
    def side(r):
        return spawn(**spec)
    return side

def print_mfu(res, folder, s):
    """Model FLOPs utilisation of each training side on an H100/H200 (989 dense bf16 TFLOP/s): BERT
    has 12 x layers x width^2 non-embedding weights, 6 FLOPs a weight a token; a query of 32 tokens,
    two documents."""
    c = data.read_json(os.path.join(folder, "config.json"))
    flops = 6 * 12 * c["num_hidden_layers"] * c["hidden_size"] ** 2 * (32 + 2 * s["max_len"])
    mfu = {name: statistics.median(x["per_s"] for x in runs) * flops / 989e12
           for name, runs in res.items()}
    print(json.dumps({"what": "train: MFU", **mfu}))

if __name__ == "__main__":
    main(parser.parse_args())
