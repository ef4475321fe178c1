"""Speed and memory against sentence-transformers (ST) on whatever device is present, a JSON line a measure (ratio
> 1: ours better). GPU: bert-base shape, random weights, synthetic texts of 32/256 tokens, batch 1024. --quick
(CPU-sized): the real MiniLM on real SciFact texts, batch 64.

    python bench.py --what loss       # fused vs reference InfoNCE: seconds (forward + backward), extra peak memory
    python bench.py --what train      # train.py (cache on and off) vs ST's CachedMultipleNegativesRankingLoss
    python bench.py --what encode     # BiEncoder.encode vs SentenceTransformer.encode: docs/s, whole process

Each measurement runs in a fresh process, the sides taking turns, --reps times, medians reported. The same
precision on both sides: ST's weights in bf16 when ours are (encoding), its model under the same autocast in both
passes of its cache (training: its second pass runs inside backward(), so the autocast covers that too).
Tokenising is outside the step timers on both sides."""
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

import data
from model import DTYPES, Bert, for_inference, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
parser = data.parser(__doc__, device="auto", dtype="bf16")
parser.add_argument("--what", default="all", choices=["loss", "train", "encode", "all"], help="comparison")
parser.add_argument("--quick", action="store_true", help="CPU-sized settings")
parser.add_argument("--reps", type=data.positive, default=3, help="repetitions (medians reported)")
parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # internal: one measurement

def child(s):
    """One measurement in this fresh process: s["steps"] calls (the first warms up), then a RESULT line."""
    device = setup(s["device"])[0]
    peak = lambda: (torch.cuda.max_memory_allocated() if device.type == "cuda" else
                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 1e9
    if s["kind"] in ("fused", "reference"):
        from loss import fused_info_nce, info_nce
        (B, N, D), fn = s["shape"], fused_info_nce if s["kind"] == "fused" else info_nce
        q, d = (torch.randn(n, D, device=device).to(DTYPES[s["dtype"]]).requires_grad_() for n in (B, N))
        run = lambda: fn(q, d, 0.02, N // B).backward()
    elif s["kind"] == "ours_encode":
        model = for_inference(s["model"], device, "bf16", passage_max_len=s["max_len"])
        run = lambda: [model.encode(s[kind], kind, s["encode_batch"]) for kind in ("doc", "query")]
    elif s["kind"] == "st_encode":
        from sentence_transformers import SentenceTransformer
        model = SentenceTransformer(s["model"], device=str(device)).to(torch.bfloat16)
        model.max_seq_length = s["max_len"]
        run = lambda: [model.encode(s[kind], batch_size=s["encode_batch"]) for kind in ("doc", "query")]
    else:  # "st_train": ST's cached loss, over the rows and steps train.py takes
        from sentence_transformers import SentenceTransformer, losses
        model = SentenceTransformer(s["model"], device=str(device)).train()  # dropout on, as in ours
        model.max_seq_length = s["max_len"]
        loss_fn = losses.CachedMultipleNegativesRankingLoss(model, scale=1 / 0.05, mini_batch_size=s["chunk"])
        opt, rows, B = torch.optim.AdamW(model.parameters(), lr=2e-5), data.read_train_jsonl(s["data"]), s["batch"]
        batches = [[{k: v.to(device) if torch.is_tensor(v) else v for k, v in model.tokenize(list(col)).items()}
                    for col in zip(*[(r["query"], r["pos"][0], r["neg"][0]) for r in rows[i:i + B]])]
                   for i in range(0, B * s["steps"], B)]
        def run():
            with torch.autocast(device.type, dtype=DTYPES[s["dtype"]], enabled=s["dtype"] != "fp32"):
                loss_fn(batches.pop(0), None).backward()  # its second pass runs in backward: autocast covers it
            opt.step(), opt.zero_grad()
    base, times = peak(), [time.perf_counter()]
    for _ in range(s["steps"]):
        run()
        torch.cuda.synchronize() if device.type == "cuda" else None
        times.append(time.perf_counter())
    calls = [b - a for a, b in zip(times, times[1:])]
    seconds = statistics.median(calls[1:] or calls)  # the first call warms up (where there are more)
    print("RESULT " + json.dumps({"seconds": seconds, "per_s": s.get("n", 1) / seconds, "peak_gb": peak(),
                                  "extra_gb": peak() - base}))

def compare(what, sides, reps, keys, **settings):
    """sides: name -> (repetition -> (command, train.py's log or None, stdin)), the baseline last; print medians."""
    res = {name: [] for name in sides}
    for r, name in ((r, name) for r in range(reps) for name in sides):
        cmd, log, spec = sides[name](r)
        t0 = time.perf_counter()
        p = subprocess.run(cmd, input=json.dumps(spec), capture_output=True, text=True, cwd=ROOT)
        if p.returncode:
            raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{p.stderr[-3000:]}")
        out = {"wall": time.perf_counter() - t0}  # the whole process: imports, loading, tokenising and all
        out.update(*(json.loads(line[7:]) for line in p.stdout.splitlines() if line.startswith("RESULT ")))
        if log:  # train.py: its own log, the steps after the first (which warms up)
            steps = [json.loads(line) for line in open(log)][1:]
            out.update(per_s=statistics.median(x["q_per_s"] for x in steps), peak_gb=steps[-1]["mem_gb"])
        res[name].append(out)
    *ours, base = res
    for name, key in ((name, key) for name in ours for key in keys):
        o, b = (statistics.median(x[key] for x in res[n]) for n in (name, base))
        print(json.dumps({"what": f"{what}: {name} vs {base}", "measure": key, "ours": o, "baseline": b,
                          "ratio": o / b if key == "per_s" else b / o, **settings}), flush=True)
    return res

def workload(args, cuda, tmp):
    """(model folder, train rows, docs, queries, sizes): the GPU setting, or the CPU one (--quick)."""
    if cuda and not args.quick:
        from transformers import AutoTokenizer, BertConfig
        folder, tok = os.path.join(tmp, "bert-base"), AutoTokenizer.from_pretrained(data.default_model())
        Bert(BertConfig()).save(folder), tok.save_pretrained(folder)  # 768 wide, 12 layers, 110M parameters
        vocab, rng = [w for w in tok.vocab if w.isalpha() and w.isascii()], random.Random(0)
        text = lambda n: " ".join(rng.choices(vocab, k=n))
        rows = [{"query": text(30), "pos": [text(300)], "neg": [text(300)]} for _ in range(6 * 1024)]
        docs, queries = [text(rng.randint(100, 254)) for _ in range(16384)], [text(30) for _ in range(2048)]
        return folder, rows, docs, queries, dict(batch=1024, chunk=256, steps=6, max_len=256, encode_batch=512)
    corpus, queries, qrels = data.load_dataset("beir/scifact/train")
    ids, rng = sorted(corpus), random.Random(0)
    rows = [{"query": queries[q], "pos": [corpus[min(qrels[q])]], "neg": [corpus[rng.choice(ids)]]}
            for q in sorted(qrels)[:3 * 64]]
    return data.default_model(), rows, [corpus[i] for i in ids[:500]], [r["query"] for r in rows[:60]], \
        dict(batch=64, chunk=16, steps=3, max_len=256, encode_batch=32)

def main(args):
    if args.child:  # the measurement's spec comes on stdin (texts too long for a command line)
        return child(json.load(sys.stdin))
    cuda, tmp = torch.cuda.is_available() and args.device != "cpu", tempfile.mkdtemp()
    spawn = lambda **s: ([sys.executable, __file__, "--child"], None, {"device": args.device, **s})
    if args.what in ("loss", "all"):
        shape, dtype = ([8192, 65536, 768], "bf16") if cuda else ([4096, 32768, 64], "fp32")
        loss = lambda kind: lambda r: spawn(kind=kind, shape=shape, dtype=dtype, steps=4)
        compare("loss", {"fused": loss("fused"), "reference": loss("reference")}, args.reps, ["seconds", "extra_gb"],
                shape=shape, dtype=dtype)
    folder, rows, docs, queries, s = workload(args, cuda, tmp) if args.what != "loss" else (None,) * 5
    if args.what in ("encode", "all"):
        encode = lambda kind: lambda r: spawn(kind=kind, model=folder, doc=docs, query=queries,
                                              n=len(docs) + len(queries), **{**s, "steps": 2 if cuda else 1})
        compare("encode", {"ours": encode("ours_encode"), "st": encode("st_encode")}, args.reps, ["per_s", "wall"],
                docs=len(docs), queries=len(queries), weights="bf16", batch=s["encode_batch"])
    if args.what in ("train", "all"):
        data.write_jsonl(train_file := os.path.join(tmp, "train.jsonl"), rows)
        flags = ["--model", folder, "--train_data", train_file, "--batch_size", s["batch"], "--max_steps", s["steps"],
                 "--group_size", 2, "--query_max_len", s["max_len"], "--passage_max_len", s["max_len"], "--temp",
                 0.05, "--dtype", args.dtype, "--device", args.device]
        ours = lambda chunk: lambda r: ([sys.executable, "train.py", *map(str, flags), "--chunk_size", str(chunk),
                                         "--out_dir", f"{tmp}/{chunk}_{r}"], f"{tmp}/{chunk}_{r}/log.jsonl", None)
        st = lambda r: spawn(kind="st_train", model=folder, data=train_file, dtype=args.dtype, n=s["batch"], **s)
        res = compare("train", {"ours": ours(s["chunk"]), "ours_no_cache": ours(0), "st": st}, args.reps,
                      ["per_s", "peak_gb", "wall"], group=2, dtype=args.dtype, **s)
        if cuda:  # BERT has 12 x layers x width^2 non-embedding weights; a query of 32 tokens, two documents
            c = json.load(open(os.path.join(folder, "config.json")))
            flops = 6 * 12 * c["num_hidden_layers"] * c["hidden_size"] ** 2 * (32 + 2 * s["max_len"])
            print(json.dumps({"what": "train: MFU", **{k: statistics.median(x["per_s"] for x in v) * flops / 989e12
                                                       for k, v in res.items()}}))

if __name__ == "__main__":
    main(parser.parse_args())
