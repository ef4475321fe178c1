"""loss.py: the reference InfoNCE against hand-computed values and F.cross_entropy; the fused
version against the reference (forward and both gradients, float64)."""
import math

import pytest
import torch
import torch.nn.functional as F

from fused_loss import false_negative_pairs, fused_info_nce
from loss import above_positive_mask, accuracy, false_negative_mask, info_nce, margin_mse


def test_hand_computed_two_queries():
    # 2 queries, group 1: q0 matches d0, q1 matches d1 (unit vectors, cosine = dot)
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    d = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    temp = 0.5
    # q0: logits [1/0.5, 0.6/0.5] = [2, 1.2], target 0; q1: [0, 1.6], target 1
    l0 = -math.log(math.exp(2.0) / (math.exp(2.0) + math.exp(1.2)))
    l1 = -math.log(math.exp(1.6) / (math.exp(0.0) + math.exp(1.6)))
    assert info_nce(q, d, temp, 1).item() == pytest.approx((l0 + l1) / 2, abs=1e-6)


def test_equals_cross_entropy_with_hard_negative_layout():
    torch.manual_seed(0)
    B, G, D = 5, 3, 8
    q, d = torch.randn(B, D), torch.randn(B * G, D)
    # target of query i is column i*G
    expected = F.cross_entropy(q @ d.T / 0.05, torch.arange(B) * G)
    assert info_nce(q, d, 0.05, G).item() == pytest.approx(expected.item(), rel=1e-6)
    # the wrong label (i instead of i*G) gives a different loss: the layout matters
    assert (F.cross_entropy(q @ d.T / 0.05, torch.arange(B)).item()
            != pytest.approx(expected.item(), rel=1e-3))


def test_offset_picks_a_slice_of_the_targets():
    torch.manual_seed(0)
    q, d = torch.randn(6, 4), torch.randn(12, 4)
    full = F.cross_entropy(q @ d.T / 0.1, torch.arange(6) * 2, reduction="none")
    assert (info_nce(q[3:], d, 0.1, 2, offset=3).item()
            == pytest.approx(full[3:].mean().item(), rel=1e-6))


def test_duplicate_positive_is_masked():
    # q0's positive text appears again as q1's positive (column 2): it must leave q0's denominator
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    d = torch.tensor([[1.0, 0.0], [0.0, -1.0], [1.0, 0.0], [0.0, 1.0]])  # G = 2: [p0, n0, p1, n1]
    d[2] = torch.tensor([0.8, 0.6])
    d_keys = torch.tensor([7, 8, 7, 9])  # column 2 has the same key as q0's positive
    q_pos_keys = torch.tensor([[7, -1], [7, 9]])  # q1's positives: 7 (column 0 and 2) and 9
    temp = 1.0
    masked = info_nce(q, d, temp, 2, d_keys=d_keys, q_pos_keys=q_pos_keys)
    # q0: columns 0 (target), 1, 3 remain; q1: target column 2 stays, columns 0 is masked (key 7,
    # not target), column 3 (key 9) masked too
    s = q @ d.T
    l0 = -torch.log_softmax(s[0, [0, 1, 3]], 0)[0]
    l1 = -torch.log_softmax(s[1, [1, 2]], 0)[1]
    assert masked.item() == pytest.approx(((l0 + l1) / 2).item(), abs=1e-6)
    expected = [(0, 2), (1, 0), (1, 3)]  # (query, document) pairs left out of the denominators
    mask = false_negative_mask(d_keys, q_pos_keys, torch.tensor([0, 2]))
    assert sorted(map(tuple, mask.nonzero().tolist())) == expected
    rows, cols = false_negative_pairs(d_keys, q_pos_keys, torch.tensor([0, 2]))  # the fused loss's
    assert sorted(zip(rows.tolist(), cols.tolist())) == expected


def test_documents_far_above_the_positive_are_masked():
    # cosines of q0: its positive 0.5, then 0.9 (above by 0.4), 0.55 (by 0.05), 0.1; q1 (target
    # column 2) scores 0.7 there and higher nowhere
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    d = torch.tensor([[0.5, 0.1], [0.9, 0.2], [0.55, 0.7], [0.1, 0.3]])  # G = 2: [p0, n0, p1, n1]
    targets = torch.tensor([0, 2])
    mask = above_positive_mask(q @ d.T, targets, 0.1)
    assert mask.nonzero().tolist() == [[0, 1]]  # 0.9 > 0.5 + 0.1; 0.55 is within the margin
    s = q @ d.T / 0.5
    l0 = -torch.log_softmax(s[0, [0, 2, 3]], 0)[0]
    l1 = -torch.log_softmax(s[1], 0)[2]
    masked = info_nce(q, d, 0.5, 2, margin=0.1)
    assert masked.item() == pytest.approx(((l0 + l1) / 2).item(), abs=1e-6)
    unmasked = info_nce(q, d, 0.5, 2).item()
    assert info_nce(q, d, 0.5, 2, margin=10.0).item() == pytest.approx(unmasked)
    # a margin of 0 leaves out everything above the positive, never the positive itself
    assert not above_positive_mask(q @ d.T, targets, 0.0)[[0, 1], [0, 2]].any()
    assert torch.isfinite(info_nce(q, d, 0.5, 2, margin=0.0))


def test_loss_in_float32_under_bf16_autocast():
    torch.manual_seed(0)
    q, d = torch.randn(4, 16).bfloat16(), torch.randn(8, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = info_nce(q, d, 0.02, 2)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(F.cross_entropy(q.float() @ d.float().T / 0.02,
                                                        torch.arange(4) * 2).item(), rel=1e-5)


def test_accuracy():
    q = torch.eye(3)
    d = torch.eye(3)[[0, 2, 1]]  # query 1's best is column 2, query 2's best is column 1
    assert accuracy(q, d, 1) == pytest.approx(1 / 3)


def _case(B, G, D, masked, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1)
    d = F.normalize(torch.randn(B * G, D, generator=g, dtype=torch.float64), dim=-1)
    keys = (None, None)
    if masked:  # a few shared positives: query i also owns the positive of query i+1
        d_keys = torch.arange(B * G)
        q_pos_keys = torch.stack([torch.arange(B) * G, ((torch.arange(B) + 1) % B) * G], 1)
        keys = (d_keys, q_pos_keys)
    return q, d, keys


def _check_fused(B, G, D, masked, tile, compile=False, margin=None):
    q, d, keys = _case(B, G, D, masked)
    q1, d1 = q.clone().requires_grad_(), d.clone().requires_grad_()
    q2, d2 = q.clone().requires_grad_(), d.clone().requires_grad_()
    ref = info_nce(q1, d1, 0.05, G, 0, *keys, margin=margin)
    fused = fused_info_nce(q2, d2, 0.05, G, 0, *keys, margin=margin, tile=tile, compile=compile)
    ref.backward()
    (fused * 1.0).backward()
    assert abs(ref.item() - fused.item()) <= 1e-8
    assert (q1.grad - q2.grad).abs().max().item() <= 1e-8
    assert (d1.grad - d2.grad).abs().max().item() <= 1e-8


@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("margin", [None, 0.0, 0.3])
def test_fused_equals_reference(G, masked, margin):
    # 37 and 37*G do not divide the tiles; random unit vectors put about half of the documents
    # above a query's positive (margin 0) and a sixth more than 0.3 above
    _check_fused(B=37, G=G, D=16, masked=masked, tile=(8, 20), margin=margin)


def test_fused_with_offset_equals_reference():
    q, d, _ = _case(10, 2, 8, False)
    q1, q2 = q[4:].clone().requires_grad_(), q[4:].clone().requires_grad_()
    ref = info_nce(q1, d, 0.1, 2, offset=4)
    fused = fused_info_nce(q2, d, 0.1, 2, offset=4, tile=(3, 7))
    ref.backward(), fused.backward()
    assert abs(ref.item() - fused.item()) <= 1e-8 and (q1.grad - q2.grad).abs().max() <= 1e-8


def test_fused_compiled_equals_reference():
    """The torch.compile path (slow to compile on CPU: one shape family, ~1 minute)."""
    pytest.importorskip("torch._inductor")
    _check_fused(B=37, G=4, D=16, masked=True, tile=(8, 20), compile=True)


def test_distillation_kl_hand_computed():
    from loss import distill_kl
    q = torch.tensor([[1.0, 0.0]])
    d = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # group of 2: student scores [1, 0] / temp
    teacher = torch.tensor([[0.9, 0.5]])
    temp, t_temp = 0.5, 0.2
    p = torch.softmax(torch.tensor([0.9, 0.5]) / t_temp, 0)  # teacher distribution
    s = torch.softmax(torch.tensor([1.0, 0.0]) / temp, 0)  # student distribution
    expected = (p * (p.log() - s.log())).sum()
    assert (distill_kl(q, d, teacher, temp, t_temp, 2).item()
            == pytest.approx(expected.item(), abs=1e-6))


def test_margin_mse_hand_computed():
    """MarginMSE: (s(q, p) - s(q, n)) of the student against the teacher's, squared, averaged over
    all margins."""
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # per query: [positive, negative]
    d = torch.tensor([[0.8, 0.6], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    teacher = torch.tensor([[0.9, 0.1], [0.7, 0.6]])
    student_margins = torch.tensor([0.8 - 0.0, 0.0 - 0.8])
    expected = ((student_margins - torch.tensor([0.8, 0.1])) ** 2).mean()
    assert margin_mse(q, d, teacher, 2).item() == pytest.approx(expected.item(), abs=1e-6)



def test_fused_compiles_once_for_every_shape_and_positive_count():
    """Batches of other sizes, group sizes and numbers of positives a query reuse one compilation of
    each tile function (the false-negative mask is computed once a step, outside them)."""
    pytest.importorskip("torch._inductor")
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    for B, G, P in [(37, 4, 2), (20, 2, 3), (45, 3, 1), (16, 1, 5)]:
        q, d, _ = _case(B, G, 16, False)
        q_pos = torch.randint(0, B * G, (B, P))
        fused_info_nce(q.requires_grad_(), d.requires_grad_(), 0.05, G, 0, torch.arange(B * G),
                       q_pos, tile=(8, 20), compile=True).backward()
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
