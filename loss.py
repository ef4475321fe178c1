"""InfoNCE, the contrastive loss of bi-encoders (DPR, E5, BGE): a readable reference, a fused version that never
holds the full logit matrix, and the cross-device gather.

For query i with embedding q_i and the documents d_1..d_N of the batch (its own positive among them):

    loss_i = -log( exp(s(q_i, d_target(i)) / τ) / sum_j exp(s(q_i, d_j) / τ) )       s = dot product (cosine
                                                                                        when embeddings are unit)
i.e. cross-entropy over "which of the N documents is my positive?". Every other document is a negative: the
other queries' positives and hard negatives ("in-batch negatives") and query i's own mined hard negatives.

Layout: documents come per query, [p_0, n_0,1 .. n_0,G-1, p_1, n_1,1 ..], G = group_size, so the target of
query i is column i*G. (Several libraries shipped the wrong label here: with hard negatives it is not i.)

The temperature τ: cosines live in [-1, 1], so without scaling the softmax is nearly uniform and the gradient
tiny. Dividing by τ = 0.02 stretches them to [-50, 50]: the loss then focuses on the few negatives that score
close to the positive (the hard ones). Too small a τ overfits to noise and false negatives; BGE uses 0.02,
sentence-transformers 0.05 (its "scale 20").

False negatives: a document that is also a positive of query i (a duplicate, or a shared positive of another
query in the batch) is not a negative of i. With d_keys (N,) (integer keys of the documents, e.g. hashes of
their ids) and q_pos_keys (B, P) (keys of each query's positives, padded with -1), such documents leave query
i's denominator; its own target stays.
"""
import functools

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F

def false_negatives(d_keys, q_pos_keys, targets):
    """(rows, cols) of the entries where document j is a positive of query i but not its target. Keys are
    non-negative (-1 pads q_pos_keys). The document keys are sorted once and each positive key is looked up in
    them (binary search), so this never compares all B x N pairs."""
    order = torch.argsort(d_keys)
    keys = d_keys[order]
    first = torch.searchsorted(keys, q_pos_keys)  # (B, P): where each positive key's run of equal keys starts
    count = torch.searchsorted(keys, q_pos_keys, right=True) - first
    count = torch.where(q_pos_keys < 0, 0, count).flatten()  # padding matches nothing
    rows = torch.arange(q_pos_keys.numel(), device=d_keys.device).repeat_interleave(count) // q_pos_keys.shape[1]
    run_start = (torch.cumsum(count, 0) - count).repeat_interleave(count)  # each match's offset within its run
    cols = order[first.flatten().repeat_interleave(count) + torch.arange(len(rows), device=d_keys.device) - run_start]
    keep = cols != targets[rows]
    return rows[keep], cols[keep]

def info_nce(q, d, temp, group_size, offset=0, d_keys=None, q_pos_keys=None):
    """The reference: q (B, D), d (N, D) laid out per query -> mean loss over the B queries (a scalar).
    The target of query i is (offset + i) * group_size; offset is non-zero when the B queries are one rank's slice
    of a gathered batch."""
    with torch.autocast(q.device.type, enabled=False):  # logits in float32 (float64 stays float64)
        dtype = torch.promote_types(q.dtype, torch.float32)
        scores = q.to(dtype) @ d.to(dtype).T / temp  # (B, N)
        targets = (offset + torch.arange(q.shape[0], device=q.device)) * group_size  # (B,)
        if d_keys is not None:
            scores = scores.index_put(false_negatives(d_keys, q_pos_keys, targets), scores.new_tensor(float("-inf")))
        return F.cross_entropy(scores, targets)

def group_scores(q, d, group_size):
    """Each query's scores against its own group: q (B, D), d (B * G, D) laid out per query -> (B, G), in at
    least float32."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    return torch.einsum("bd,bgd->bg", q.to(dtype), d.to(dtype).view(q.shape[0], group_size, -1))

def distill_kl(q, d, teacher_scores, temp, teacher_temp, group_size):
    """Distillation (FlagEmbedding's pos_scores/neg_scores): KL(teacher || student) over each query's own group.
    q (B, D), d (B * G, D) laid out per query, teacher_scores (B, G) -> mean KL over the B queries."""
    with torch.autocast(q.device.type, enabled=False):
        student = group_scores(q, d, group_size) / temp  # (B, G)
        teacher = torch.softmax(teacher_scores.to(student.dtype) / teacher_temp, dim=-1)
        return F.kl_div(torch.log_softmax(student, dim=-1), teacher, reduction="batchmean")

def margin_mse(q, d, teacher_scores, group_size):
    """MarginMSE (Hofstätter et al. 2020): the student's margins s(q, p) - s(q, n_j) regressed onto the teacher's,
    so the teacher's scores must be on the student's scale (a bi-encoder teacher's cosines are) -> the mean squared
    error over the B x (G - 1) margins."""
    with torch.autocast(q.device.type, enabled=False):
        s = group_scores(q, d, group_size)  # (B, G)
        t = teacher_scores.to(s.dtype)
        return F.mse_loss(s[:, :1] - s[:, 1:], t[:, :1] - t[:, 1:])

@torch.no_grad()
def accuracy(q, d, group_size, offset=0, rows=1024):
    """In-batch accuracy: the fraction of queries whose best-scoring document is their positive (B rows at a
    time, so it never holds the full matrix either)."""
    targets = (offset + torch.arange(q.shape[0], device=q.device)) * group_size
    best = torch.cat([(q[i:i + rows].float() @ d.float().T).argmax(1) for i in range(0, q.shape[0], rows)])
    return (best == targets).float().mean().item()

# ------------------------------------------------------------------------------------------------ fused loss
#
# fused_info_nce computes exactly info_nce, tile by tile, the way flash-attention computes a softmax:
#   forward:  for each (rows, cols) tile of the logit matrix, logsumexp over the tile's columns, combined across
#             tiles (logaddexp is associative), so each row ends with lse_i = log sum_j exp(s_ij / τ).
#             loss_i = lse_i - s_i,target / τ; only lse (B,) is saved for backward, never the (B, N) logits.
#   backward: d loss_i / d s_ij = (softmax_ij - [j == target]) / τ, with softmax_ij = exp(s_ij / τ - lse_i)
#             recomputed per tile; dq += P @ d_tile, dd_tile += P.T @ q_rows (two matmuls a tile); the one-hot
#             target term is subtracted once, outside the loop.
# Peak extra memory: one tile, instead of the (B, N) logits, their softmax and their gradient.
# The matmuls run in the inputs' precision with a float32 result where PyTorch offers it (half precision on CUDA:
# tensor cores), else on float32 copies; the elementwise work of a tile (scale, mask, exp, logsumexp) is one
# compiled function, so it reads the tile once.

def _mm(a, b):
    """a @ b in at least float32."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(a, b.to(a.dtype), out_dtype=torch.float32)  # PyTorch >= 2.8
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return a.to(dtype) @ b.to(dtype)

def _tile_lse(s, inv_temp, mask):
    """(r, c) raw scores -> (r,) logsumexp of the masked logits."""
    s = s * inv_temp
    return torch.logsumexp(s if mask is None else s.masked_fill(mask, float("-inf")), dim=1)

def _tile_softmax(s, inv_temp, mask, lse, g):
    """(r, c) raw scores -> g_i * softmax_ij / τ, the gradient of sum_i g_i * lse_i with respect to s_ij."""
    p = torch.exp(s * inv_temp - lse[:, None]) * (g[:, None] * inv_temp)
    return p if mask is None else p.masked_fill(mask, 0.0)

@functools.cache
def _kernels(compile):
    """The per-tile elementwise functions, compiled by torch.compile (dynamic shapes: tiles at the edges and
    batches of other sizes reuse one compilation) or eager."""
    if not compile:
        return _tile_lse, _tile_softmax
    return torch.compile(_tile_lse, dynamic=True), torch.compile(_tile_softmax, dynamic=True)

def _tiles(B, N, tile, pairs, device):
    """(row slice, column slice, (r, c) false-negative mask or None) for each tile of the (B, N) logits."""
    for r in range(0, B, tile[0]):
        for c in range(0, N, tile[1]):
            rows, cols = slice(r, min(r + tile[0], B)), slice(c, min(c + tile[1], N))
            mask = None
            if pairs is not None:  # the false-negative entries that fall inside this tile
                inside = (pairs[0] >= r) & (pairs[0] < rows.stop) & (pairs[1] >= c) & (pairs[1] < cols.stop)
                mask = torch.zeros(rows.stop - r, cols.stop - c, dtype=torch.bool, device=device)
                mask[pairs[0][inside] - r, pairs[1][inside] - c] = True
            yield rows, cols, mask


class _FusedInfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, d, temp, group_size, offset, d_keys, q_pos_keys, tile, compile):
        B, N = q.shape[0], d.shape[0]
        targets = (offset + torch.arange(B, device=q.device)) * group_size  # (B,)
        pairs = None if d_keys is None else false_negatives(d_keys, q_pos_keys, targets)  # once a step
        tile_lse, _ = _kernels(compile)
        dtype = torch.promote_types(q.dtype, torch.float32)
        lse = torch.full((B,), float("-inf"), dtype=dtype, device=q.device)
        for rows, cols, mask in _tiles(B, N, tile, pairs, q.device):
            lse[rows] = torch.logaddexp(lse[rows], tile_lse(_mm(q[rows], d[cols].T), 1.0 / temp, mask))
        target_logit = (q.to(dtype) * d[targets].to(dtype)).sum(-1) / temp  # (B,)
        ctx.save_for_backward(q, d, lse, targets, *(pairs or ()))
        ctx.temp, ctx.tile, ctx.compile = temp, tile, compile
        return (lse - target_logit).mean()

    @staticmethod
    def backward(ctx, grad_out):
        q, d, lse, targets, *pairs = ctx.saved_tensors
        B, N = q.shape[0], d.shape[0]
        _, tile_softmax = _kernels(ctx.compile)
        g = (grad_out / B).to(lse.dtype).expand(B)  # d mean / d loss_i
        dq = torch.zeros(q.shape, dtype=lse.dtype, device=q.device)
        dd = torch.zeros(d.shape, dtype=lse.dtype, device=d.device)
        for rows, cols, mask in _tiles(B, N, ctx.tile, pairs or None, q.device):
            p = tile_softmax(_mm(q[rows], d[cols].T), 1.0 / ctx.temp, mask, lse[rows], g[rows]).to(q.dtype)
            dq[rows] += _mm(p, d[cols])  # (r, D)
            dd[cols] += _mm(p.T, q[rows])  # (c, D)
        # the one-hot target term: d(-s_i,target / τ)
        dq -= (g / ctx.temp)[:, None] * d[targets].to(dq.dtype)
        dd.index_add_(0, targets, -(g / ctx.temp)[:, None] * q.to(dd.dtype))
        return dq.to(q.dtype), dd.to(d.dtype), None, None, None, None, None, None, None

def fused_info_nce(q, d, temp, group_size, offset=0, d_keys=None, q_pos_keys=None, tile=None, compile=None):
    """Same arguments and result as info_nce, in O(tile) extra memory instead of O(B * N).
    tile: (rows, cols) of the logit tile; compile: torch.compile the tile functions (default: on CUDA)."""
    tile = tile or ((4096, 16384) if q.is_cuda else (512, 4096))
    compile = q.is_cuda if compile is None else compile
    with torch.autocast(q.device.type, enabled=False):
        return _FusedInfoNCE.apply(q, d, temp, group_size, offset, d_keys, q_pos_keys, tile, compile)

# ------------------------------------------------------------------------------------------------ many devices
#
# Convention for W processes (torchrun): each rank embeds its own B/W queries and their documents; documents are
# all-gathered so every query sees all N documents as negatives; each rank computes the loss of ITS queries
# against ALL documents, scaled by 1/W, so that the sum over ranks is the mean over all B queries (the loss of
# one process with the whole batch). The gather's backward sums every rank's gradient for a rank's documents
# (a reduce-scatter), and train.py sums (not averages) parameter gradients over ranks. The result equals one
# process with the whole batch; tests/test_dist.py checks it.

def gather(x):
    """All-gather along dim 0, differentiably: (n, D) on each of W ranks -> (W * n, D), rank r's rows at
    [r*n, (r+1)*n). The identity in a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return torch.cat(dist_nn.all_gather(x))
