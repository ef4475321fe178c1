"""GPU checks (skipped without CUDA), run by experiments/gpu_check.sh: the fused loss in bf16 with
masks and offsets, the gradient cache's exact replay under every precision, compile and loss, cached
equal to uncached, and the attention kernels SDPA picks. Synthetic data only: the GPU machine has no
../shared."""
import json

import pytest
import torch
import torch.nn.functional as F

import cli
import train
from fused_loss import fused_info_nce
from loss import info_nce

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("compile", [False, True])
def test_fused_bf16_close_to_reference(compile):
    torch.manual_seed(0)
    q = F.normalize(torch.randn(1000, 256, device="cuda"), dim=-1).bfloat16().requires_grad_()
    d = F.normalize(torch.randn(8000, 256, device="cuda"), dim=-1).bfloat16().requires_grad_()
    keys = (torch.arange(8000, device="cuda") % 3000,
            torch.randint(0, 3000, (500, 3), device="cuda"))
    ref = info_nce(q[500:], d, 0.02, 4, 500, *keys)
    gq, gd = torch.autograd.grad(ref, (q, d))
    fused = fused_info_nce(q[500:], d, 0.02, 4, 500, *keys, tile=(256, 1024), compile=compile)
    fq, fd = torch.autograd.grad(fused, (q, d))
    assert abs(ref.item() - fused.item()) < 1e-3 * abs(ref.item())
    assert (gq.float() - fq.float()).norm() / gq.float().norm() < 1e-2
    assert (gd.float() - fd.float()).norm() / gd.float().norm() < 1e-2


def train_log(model, tmp_path, *flags):
    words = "cell protein gene virus drug brain heart blood tumor immune".split()
    rows = [{"query": f"{words[i % 10]} {words[i % 7]} {i}",
             "pos": [" ".join(words[(i + j) % 10] for j in range(i % 9 + 3))],
             "neg": [" ".join(words[(i * 3 + j) % 10] for j in range(i % 5 + 2))]}
            for i in range(32)]
    cli.write_jsonl(tmp_path / "t.jsonl", rows)
    train.main(train.parser.parse_args(["--model", model, "--train_data", str(tmp_path / "t.jsonl"),
                                        "--batch_size", "16", "--max_steps", "2",
                                        "--device", "cuda", "--out_dir", str(tmp_path / "o"),
                                        *map(str, flags)]))
    return [json.loads(line) for line in (tmp_path / "o" / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("dtype, compile, loss", [
    ("bf16", False, "reference"),
    ("fp16", False, "fused"),
    ("bf16", True, "fused"),
    ("fp32", False, "fused"),
])
def test_cache_replays_exactly_on_gpu(tiny_model, tmp_path, dtype, compile, loss):
    """Dropout on (0.1, attention too): pass 2 reproduces pass 1 bit for bit on the GPU's RNG."""
    log = train_log(tiny_model, tmp_path, "--chunk_size", 4, "--dtype", dtype, "--loss", loss,
                    *(["--compile"] if compile else []))
    assert [row["replay_err"] for row in log] == [0.0, 0.0]


def test_cached_equals_uncached_on_gpu(tiny_model_nodropout, tmp_path):
    cached = train_log(tiny_model_nodropout, tmp_path / "c", "--chunk_size", 4, "--dtype", "fp32")
    plain = train_log(tiny_model_nodropout, tmp_path / "p", "--chunk_size", 0, "--dtype", "fp32")
    for a, b in zip(cached, plain):
        assert (a["loss"] == pytest.approx(b["loss"], rel=1e-4)
                and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3))


def test_attention_kernels(tiny_model):
    """No padding: no mask, so flash attention runs; padding: a (B, 1, 1, L) mask, which the
    memory-efficient kernel takes (each call would fail if SDPA could not use the one kernel
    allowed)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from model import for_inference
    model = for_inference(tiny_model, torch.device("cuda"), "bf16")
    with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        model(model.tokenize(["same words here", "same words here"], "doc"), "doc")
    with torch.no_grad(), sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        model(model.tokenize(["short", "a much longer text with many more words"], "doc"), "doc")
