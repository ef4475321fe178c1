"""GPU checks (skipped without CUDA): the fused loss under bf16 on the GPU, and cached training on the GPU."""
import pytest
import torch
import torch.nn.functional as F

from loss import fused_info_nce, info_nce

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("compile", [False, True])
def test_fused_bf16_close_to_reference(compile):
    torch.manual_seed(0)
    q = F.normalize(torch.randn(1000, 256, device="cuda"), dim=-1).bfloat16().requires_grad_()
    d = F.normalize(torch.randn(4000, 256, device="cuda"), dim=-1).bfloat16().requires_grad_()
    ref = info_nce(q, d, 0.02, 4)
    gq, gd = torch.autograd.grad(ref, (q, d))
    fused = fused_info_nce(q, d, 0.02, 4, tile=(256, 1024), compile=compile)
    fq, fd = torch.autograd.grad(fused, (q, d))
    assert abs(ref.item() - fused.item()) < 1e-3 * abs(ref.item())
    assert (gq.float() - fq.float()).norm() / gq.float().norm() < 1e-2
    assert (gd.float() - fd.float()).norm() / gd.float().norm() < 1e-2


def test_cached_training_on_gpu(tiny_model_nodropout, tmp_path):
    from test_train import make_train_file
    import train
    data = make_train_file(tmp_path / "t.jsonl", n=16)
    train.main(train.parser.parse_args(["--model", tiny_model_nodropout, "--train_data", data, "--batch_size", "8",
                                        "--chunk_size", "4", "--max_steps", "2", "--device", "cuda",
                                        "--out_dir", str(tmp_path / "o")]))
    assert (tmp_path / "o" / "model" / "model.safetensors").exists()
