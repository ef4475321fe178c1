"""Speed and memory, side by side, one JSON line per comparison (what, ours, baseline, unit, ratio, settings).

    python bench.py --what loss --quick          # fused vs reference InfoNCE: time and extra peak memory
    python bench.py --what memory --quick        # train-step peak memory vs batch size, with and without the cache
    python bench.py --what encode --quick        # encode.py vs SentenceTransformer.encode, whole process
    python bench.py --what train --quick         # training steps vs sentence-transformers CachedMNRL, whole process
    python bench.py --what all

Every measurement runs in a fresh child process (so peak memory is its own: peak RSS on CPU,
torch.cuda.max_memory_allocated on CUDA), ours and the baseline alternate, --reps repetitions, medians reported.
"""
import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "tests"))  # shared helpers: the real-data train file and subset
import data  # noqa: E402
from model import default_model  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--what", default="all", choices=["loss", "memory", "encode", "train", "all"], help="comparison")
parser.add_argument("--quick", action="store_true", help="CPU-sized settings")
parser.add_argument("--reps", type=int, default=3, help="repetitions (medians reported)")
parser.add_argument("--device", default="auto", help="cuda, cpu or auto")
parser.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"], help="autocast dtype")
parser.add_argument("--attention_dropout", type=float, default=None,
                    help="train: attention dropout for both sides (default: the model's 0.1)")
parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one measurement


def rss_gb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def peak_gb(device):
    import torch
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def sync(device):
    """Wait for the GPU's queued work, so that a timer reads the work's time and not its launch."""
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def child(spec):
    """Run one measurement in this (fresh) process; print a JSON result line."""
    import torch
    from model import pick_device
    device = pick_device(spec["device"])
    out = {}
    if spec["kind"] == "loss":
        from loss import fused_info_nce, info_nce
        B, N, D = spec["B"], spec["N"], spec["D"]
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
        q = torch.nn.functional.normalize(torch.randn(B, D, device=device), dim=-1).to(dtype).requires_grad_()
        d = torch.nn.functional.normalize(torch.randn(N, D, device=device), dim=-1).to(dtype).requires_grad_()
        fn = fused_info_nce if spec["impl"] == "fused" else info_nce
        fn(q, d, 0.02, N // B).backward()  # warm-up (and compile)
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 1e9 if device.type == "cuda" else rss_gb()
        times = []
        for _ in range(spec["iters"]):
            q.grad = d.grad = None
            t0 = time.perf_counter()
            fn(q, d, 0.02, N // B).backward()
            sync(device)
            times.append(time.perf_counter() - t0)
        out = {"seconds": statistics.median(times), "extra_peak_gb": peak_gb(device) - base}
    elif spec["kind"] == "train_memory":
        import train
        args = train.parser.parse_args([
            "--model", default_model(), "--train_data", spec["train_data"], "--batch_size", str(spec["batch"]),
            "--chunk_size", str(spec["chunk"]), "--group_size", "2", "--max_steps", "1", "--passage_max_len",
            str(spec["max_len"]), "--query_max_len", "32", "--dtype", spec["dtype"], "--device", spec["device"],
            "--out_dir", spec["out_dir"], "--log_every", "1"])
        t0 = time.perf_counter()
        train.main(args)
        out = {"seconds": time.perf_counter() - t0, "peak_gb": peak_gb(device)}
    elif spec["kind"] == "st_train":  # the baseline: sentence-transformers' CachedMultipleNegativesRankingLoss
        from sentence_transformers import SentenceTransformer
        try:
            from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss
        except ImportError:  # sentence-transformers < 6
            from sentence_transformers.losses import CachedMultipleNegativesRankingLoss
        from model import autocast
        t0 = time.perf_counter()
        examples = data.read_train_jsonl(spec["train_data"])
        ad = spec["attention_dropout"]
        model = SentenceTransformer(spec["model"], device=str(device), config_kwargs=None if ad is None else
                                    {"attention_probs_dropout_prob": ad})
        model.max_seq_length = spec["max_len"]
        model.train()  # dropout on, as its trainer does (and as ours trains)
        if spec["weights"] == "bf16":
            model.to(torch.bfloat16)
        loss_fn = CachedMultipleNegativesRankingLoss(model, scale=1 / spec["temp"], mini_batch_size=spec["chunk"])
        opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
        B, times = spec["batch"], []
        for step in range(spec["steps"]):
            t1 = time.perf_counter()
            rows = examples[step * B:(step + 1) * B]
            cols = [[r["query"] for r in rows], [r["pos"][0] for r in rows], [r["neg"][0] for r in rows]]
            feats = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in model.tokenize(c).items()}
                     for c in cols]
            with autocast(device, spec["dtype"] if spec["weights"] == "fp32" else "fp32"):
                loss = loss_fn(feats, None)
            loss.backward()
            opt.step()
            opt.zero_grad()
            sync(device)
            times.append(time.perf_counter() - t1)
        out = {"seconds": time.perf_counter() - t0, "peak_gb": peak_gb(device),
               "q_per_s": B / statistics.median(times[1:] or times)}  # the first step warms up
    elif spec["kind"] == "st_encode":
        from sentence_transformers import SentenceTransformer
        corpus, queries, _ = data.load_dataset(spec["dataset"], "test")
        model = SentenceTransformer(default_model(), device=str(device))
        model.encode(list(corpus.values()))  # its defaults (batch 32, fp32), as a user calls it
        model.encode(list(queries.values()))
    elif spec["kind"] == "encode_rate":  # docs/s inside one process, after a warm-up: ours or ST, bf16 weights
        docs = [r["pos"][0] for r in data.read_train_jsonl(spec["train_data"])]
        if spec["impl"] == "ours":
            from encode import encode_texts
            from model import for_inference
            model = for_inference(spec["model"], device, "bf16", passage_max_len=spec["max_len"])
            run = lambda texts: encode_texts(model, texts, "doc", spec["batch"], "bf16", device, progress=False)
        else:
            from sentence_transformers import SentenceTransformer
            model = SentenceTransformer(spec["model"], device=str(device)).to(torch.bfloat16)
            model.max_seq_length = spec["max_len"]
            run = lambda texts: model.encode(texts, batch_size=spec["batch"])
        run(docs[:2 * spec["batch"]])  # warm-up
        sync(device)
        t0 = time.perf_counter()
        run(docs)
        sync(device)
        out = {"docs_per_s": len(docs) / (time.perf_counter() - t0), "peak_gb": peak_gb(device)}
    print("RESULT " + json.dumps(out), flush=True)


def measure(spec, timeout=3600):
    """Run child(spec) in a fresh interpreter; return its result dict and the whole process's wall time."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT)
    wall = time.perf_counter() - t0
    lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    if p.returncode or not lines:
        raise RuntimeError(f"bench child failed ({spec}):\n{p.stderr[-3000:]}")
    return {**json.loads(lines[-1][7:]), "wall": wall}


def command(cmd, timeout=3600):
    """Wall time of a whole command (a fresh process: imports, model load, tokenisation all count)."""
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       cwd=ROOT)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0, p.stdout


def emit(**row):
    print(json.dumps(row), flush=True)


def bench_loss(args, cuda):
    B, N, D, dtype = (8192, 65536, 768, "bf16") if cuda else (4096, 32768, 64, "fp32")
    res = {"fused": [], "reference": []}
    for _ in range(args.reps):  # alternate ours and the baseline
        for impl in ("fused", "reference"):
            res[impl].append(measure({"kind": "loss", "impl": impl, "B": B, "N": N, "D": D, "dtype": dtype,
                                      "device": args.device, "iters": 3}))
    med = lambda impl, k: statistics.median(r[k] for r in res[impl])
    settings = {"B": B, "N": N, "D": D, "dtype": dtype, "device": "cuda" if cuda else "cpu", "reps": args.reps}
    emit(what="loss_time", ours=med("fused", "seconds"), baseline=med("reference", "seconds"), unit="s fwd+bwd",
         ratio=med("reference", "seconds") / med("fused", "seconds"), **settings)
    emit(what="loss_extra_peak_memory", ours=med("fused", "extra_peak_gb"), baseline=med("reference", "extra_peak_gb"),
         unit="GB", ratio=med("fused", "extra_peak_gb") / med("reference", "extra_peak_gb"), **settings)


def bench_memory(args, cuda):
    """Peak memory of one train step grows with the chunk, not the batch (real MiniLM, real NFCorpus texts)."""
    import tempfile

    from conftest import NFCORPUS
    from test_train import make_train_file
    tmp = tempfile.mkdtemp()
    sizes = [64, 256, 1024]
    train_data = make_train_file(os.path.join(tmp, "train.jsonl"), n=max(sizes), num_neg=1, folder=NFCORPUS)
    max_len = 64 if args.quick else 256
    rows = {}
    for chunk in (32, 0):
        for batch in sizes:
            if chunk == 0 and batch > 256 and not cuda:
                continue  # without the cache, 1024 x 3 texts of activations at once: too much for this machine
            r = measure({"kind": "train_memory", "batch": batch, "chunk": chunk, "train_data": train_data,
                         "max_len": max_len, "dtype": args.dtype, "device": args.device,
                         "out_dir": os.path.join(tmp, f"out{chunk}_{batch}")})
            rows[(chunk, batch)] = r
            emit(what="train_step_peak_memory", chunk_size=chunk, batch_size=batch, peak_gb=r["peak_gb"],
                 step_seconds=r["seconds"], passage_max_len=max_len, dtype=args.dtype, group_size=2)
    lo, hi = rows[(32, sizes[0])]["peak_gb"], rows[(32, sizes[-1])]["peak_gb"]
    emit(what="cache_memory_growth", ours=hi, baseline=lo, unit="GB", ratio=hi / lo,
         settings=f"peak at batch {sizes[-1]} / batch {sizes[0]}, chunk 32")


def bench_encode(args, cuda):
    """encode.py vs SentenceTransformer.encode on 500 SciFact docs + 60 queries, whole-process wall time
    (GPU without --quick: bench_encode_gpu)."""
    if cuda and not args.quick:
        return bench_encode_gpu(args)
    import tempfile
    tmp = tempfile.mkdtemp()
    from conftest import scifact_subset
    folder = scifact_subset(os.path.join(tmp, "subset"))
    ours_cmd = lambda dtype: [sys.executable, "encode.py", "--dataset", folder, "--split", "test", "--dtype", dtype,
                              "--out", os.path.join(tmp, dtype), "--device", args.device]
    ours, base = {args.dtype: [], "fp32": []}, []  # ours at --dtype and at fp32, ST's precision
    for _ in range(args.reps):
        for dtype in ours:
            ours[dtype].append(command(ours_cmd(dtype))[0])
        base.append(measure({"kind": "st_encode", "dataset": folder, "device": args.device})["wall"])
    corpus, queries, _ = data.load_dataset(folder, "test")
    model_flops = flops(default_model(), token_lengths(list(corpus.values()) + list(queries.values()), 256), False)
    ndcg = {}
    for dtype in ours:
        _, out = command([sys.executable, "evaluate.py", "--emb", os.path.join(tmp, dtype), "--dataset", folder,
                          "--split", "test", "--out", os.path.join(tmp, "eval_" + dtype)])
        with open(os.path.join(tmp, "eval_" + dtype, "metrics.json")) as f:
            ndcg[dtype] = json.load(f)["ndcg@10"]
    base = statistics.median(base)
    for dtype, times in ours.items():
        t = statistics.median(times)
        emit(what="encode", ours=t, baseline=base, unit="s whole process", ratio=base / t, dtype=dtype,
             baseline_dtype="fp32", ours_mfu=mfu(model_flops / t), baseline_mfu=mfu(model_flops / base),
             texts="500 docs + 60 queries", ndcg10_ours=ndcg[dtype], ndcg10_fp32=ndcg["fp32"], reps=args.reps)


def bench_train(args, cuda):
    """CPU (--quick, or no GPU): 3 training steps, whole process, on real SciFact texts. GPU: throughput (queries/s
    after a warm-up step), peak memory and MFU, bert-base-sized and MiniLM, against every ST configuration.
    Ours (gradient cache) vs CachedMultipleNegativesRankingLoss: same model, texts, batch, group, mini-batch."""
    if cuda and not args.quick:
        return bench_train_gpu(args)
    import tempfile

    from test_train import make_train_file
    tmp = tempfile.mkdtemp()
    batch, chunk, steps, max_len = 64, 16, 3, 256
    train_data = make_train_file(os.path.join(tmp, "train.jsonl"), n=batch * steps, num_neg=1)
    ours_cmd = train_cmd(default_model(), train_data, batch, chunk, steps, 32, max_len, args,
                         os.path.join(tmp, "ours"))
    ours, base = [], {"fp32": [], "bf16": []}  # ST: fp32 weights under autocast; bf16 weights (its fastest)
    for _ in range(args.reps):
        ours.append(command(ours_cmd)[0])
        for w in base:
            base[w].append(measure({"kind": "st_train", "model": default_model(), "train_data": train_data,
                                    "batch": batch, "chunk": chunk, "steps": steps, "max_len": max_len, "temp": 0.05,
                                    "dtype": args.dtype, "weights": w, "device": args.device,
                                    "attention_dropout": args.attention_dropout})["wall"])
    rows = data.read_train_jsonl(train_data)
    lengths = token_lengths([r["query"] for r in rows], 32) + token_lengths([r[k][0] for r in rows
                                                                             for k in ("pos", "neg")], max_len)
    model_flops = flops(default_model(), lengths, True)
    ours = statistics.median(ours)
    for w, times in base.items():
        t = statistics.median(times)
        emit(what="train", ours=ours, baseline=t, unit="s whole process", ratio=t / ours,
             ours_mfu=mfu(model_flops / ours), baseline_mfu=mfu(model_flops / t), batch=batch, group=2, chunk=chunk,
             steps=steps, max_len=max_len, dtype=args.dtype, baseline_weights=w, reps=args.reps,
             attention_dropout=args.attention_dropout)


def train_cmd(model, train_data, batch, chunk, steps, q_len, d_len, args, out_dir):
    cmd = [sys.executable, "train.py", "--model", model, "--train_data", train_data, "--batch_size", str(batch),
           "--group_size", "2", "--chunk_size", str(chunk), "--max_steps", str(steps), "--query_max_len", str(q_len),
           "--passage_max_len", str(d_len), "--dtype", args.dtype, "--device", args.device, "--temp", "0.05",
           "--out_dir", out_dir, "--log_every", "1"]
    return cmd + (["--attention_dropout", str(args.attention_dropout)] if args.attention_dropout is not None else [])


# The GPU setting: batch 1024, 1 hard negative, queries of 32 tokens, documents of 256 (synthetic text).
GPU = dict(batch=1024, chunk=128, steps=6, q_len=32, d_len=256, docs=16384, encode_batch=512)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core FLOP/s (SXM), for MFU


@functools.cache
def minilm_tokenizer():
    """MiniLM's tokenizer (bert-base's 30522-word vocabulary), that of every model benched, loaded once."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(default_model())


def random_berts(folder):
    """bert-base-sized (768 wide, 12 layers, 110M parameters) and MiniLM-L6-sized (384 wide, 6 layers) encoders
    with random weights (speed does not depend on them) and MiniLM's tokenizer (the 30522-word vocabulary of
    bert-base), as Hugging Face folders."""
    import torch
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    shapes = {"bert-base": {}, "MiniLM-L6": dict(hidden_size=384, num_hidden_layers=6, intermediate_size=1536)}
    for name, shape in shapes.items():
        BertModel(BertConfig(**shape)).save_pretrained(os.path.join(folder, name))
        minilm_tokenizer().save_pretrained(os.path.join(folder, name))
    return {name: os.path.join(folder, name) for name in shapes}


def synthetic_train_file(path, n, q_words, d_words):
    """n rows of random vocabulary words, one token each: queries of q_words, positives and negatives of d_words
    (a pair (lo, hi) draws each length uniformly)."""
    import random
    vocab = sorted(w for w in minilm_tokenizer().vocab if w.isascii() and w.isalpha())
    rng = random.Random(0)
    text = lambda k: " ".join(rng.choices(vocab, k=k if isinstance(k, int) else rng.randint(*k)))
    data.write_jsonl(path, [{"query": text(q_words), "pos": [text(d_words)], "neg": [text(d_words)]}
                            for _ in range(n)])
    return path


def flops(folder, lengths, train):
    """Model FLOPs of one pass over texts of these token lengths: 2 x parameters x tokens for the matmuls plus
    4 x layers x L^2 x width for attention, times 3 for forward + backward (the cache's extra forward not counted)."""
    from transformers import AutoConfig
    c = AutoConfig.from_pretrained(folder)
    params = c.num_hidden_layers * (4 * c.hidden_size ** 2 + 2 * c.hidden_size * c.intermediate_size)
    f = sum(2 * params * L + 4 * c.num_hidden_layers * L * L * c.hidden_size for L in lengths)
    return 3 * f if train else f


def token_lengths(texts, max_len):
    """Tokens per text (with [CLS] and [SEP]) under MiniLM's tokenizer."""
    return [min(len(ids), max_len) for ids in minilm_tokenizer()(texts)["input_ids"]]


@functools.cache
def peak_flops():
    """The bf16 FLOP/s MFU divides by: an H100's or H200's tensor-core peak; on a CPU, measured here as the best of
    five 2048^3 bf16 matmuls (a shared VM's clock and core count make a vendor figure meaningless)."""
    import torch
    peak = next((v for k, v in PEAK_BF16.items() if k in device_name()), None)
    if peak is None and not torch.cuda.is_available():
        a = torch.randn(2048, 2048, dtype=torch.bfloat16)
        times = []
        for _ in range(6):
            t0 = time.perf_counter()
            a @ a
            times.append(time.perf_counter() - t0)
        peak = 2 * 2048 ** 3 / min(times[1:])
    return peak


def mfu(flops_per_s):
    peak = peak_flops()
    return None if peak is None else round(flops_per_s / peak, 4)


def bench_train_gpu(args):
    import tempfile
    tmp = tempfile.mkdtemp()
    g = GPU
    train_data = synthetic_train_file(os.path.join(tmp, "train.jsonl"), g["batch"] * g["steps"], g["q_len"] - 2,
                                      g["d_len"] + 50)
    models = random_berts(tmp)
    per_query = [g["q_len"], g["d_len"], g["d_len"]]  # token lengths of one example: query, positive, negative
    configs = [("fp32", g["chunk"]), ("bf16", g["chunk"]), ("bf16", 512)]  # ST: autocast; bf16 weights at 2 sizes
    for name, folder in models.items():
        flops_q = flops(folder, per_query, train=True)
        ours, base = [], {c: [] for c in configs}
        for rep in range(args.reps):
            out_dir = os.path.join(tmp, f"ours_{rep}")
            command(train_cmd(folder, train_data, g["batch"], g["chunk"], g["steps"], g["q_len"], g["d_len"], args,
                              out_dir))
            with open(os.path.join(out_dir, "log.jsonl")) as f:
                log = [json.loads(line) for line in f][1:]  # the first step warms up
            ours.append({"q_per_s": statistics.median(r["q_per_s"] for r in log),
                         "peak_gb": max(r["mem_gb"] for r in log)})
            for w, chunk in configs:
                base[(w, chunk)].append(measure({
                    "kind": "st_train", "model": folder, "train_data": train_data, "batch": g["batch"],
                    "chunk": chunk, "steps": g["steps"], "max_len": g["d_len"], "temp": 0.05, "dtype": args.dtype,
                    "weights": w, "device": args.device, "attention_dropout": args.attention_dropout}))
        med = lambda rows, k: statistics.median(r[k] for r in rows)
        q_ours = med(ours, "q_per_s")
        for (w, chunk), rows in base.items():
            q_base = med(rows, "q_per_s")
            emit(what="train_gpu", model=name, ours=q_ours, baseline=q_base, unit="queries/s", ratio=q_ours / q_base,
                 ours_peak_gb=med(ours, "peak_gb"), baseline_peak_gb=med(rows, "peak_gb"),
                 ours_mfu=mfu(q_ours * flops_q), baseline_mfu=mfu(q_base * flops_q), batch=g["batch"], group=2,
                 ours_chunk=g["chunk"], baseline_mini_batch=chunk, baseline_weights=w, dtype=args.dtype,
                 reps=args.reps, device=device_name())


def device_name():
    import torch
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def bench_encode_gpu(args):
    """docs/s inside the process (after a warm-up), bf16 weights on both sides, batch 512, synthetic documents of
    100-256 tokens (~180 on average)."""
    import tempfile
    tmp = tempfile.mkdtemp()
    g = GPU
    docs_file = synthetic_train_file(os.path.join(tmp, "docs.jsonl"), g["docs"], 2, (98, 254))
    with open(docs_file) as f:
        lengths = token_lengths([json.loads(line)["pos"][0] for line in f], g["d_len"])
    for name, folder in random_berts(tmp).items():
        flops_doc = flops(folder, lengths, train=False) / len(lengths)
        res = {"ours": [], "st": []}
        for _ in range(args.reps):
            for impl in res:
                res[impl].append(measure({"kind": "encode_rate", "impl": impl, "model": folder, "device": args.device,
                                          "train_data": docs_file, "batch": g["encode_batch"],
                                          "max_len": g["d_len"]})["docs_per_s"])
        ours, base = statistics.median(res["ours"]), statistics.median(res["st"])
        emit(what="encode_gpu", model=name, ours=ours, baseline=base, unit="docs/s", ratio=ours / base,
             ours_mfu=mfu(ours * flops_doc), baseline_mfu=mfu(base * flops_doc), docs=len(lengths),
             mean_tokens=sum(lengths) / len(lengths), batch=g["encode_batch"], weights="bf16", reps=args.reps,
             device=device_name())


def main(args):
    if args.child:
        return child(json.loads(args.child))
    import torch
    cuda = torch.cuda.is_available() and args.device != "cpu"
    for what in (["loss", "memory", "encode", "train"] if args.what == "all" else [args.what]):
        {"loss": bench_loss, "memory": bench_memory, "encode": bench_encode, "train": bench_train}[what](args, cuda)


if __name__ == "__main__":
    main(parser.parse_args())
