"""loss.info_nce computed tile by tile, so that the (B, N) logit matrix is never held: for the
batches of thousands that gradient caching and many GPUs make possible (8192 queries x 65536
documents are 2 GB of float32 logits, and as much again for their softmax and its gradient). Same
arguments, same result; the tests check it against the reference, forward and backward.

The way flash-attention computes a softmax:
  forward:  for each (rows, cols) tile of the logit matrix, the logsumexp over the tile's columns,
            combined across tiles (logaddexp is associative), so each row ends with
            lse_i = log sum_j exp(s_ij / τ); loss_i = lse_i - s_i,target / τ. Only lse (B,) is saved
            for backward, never the logits.
  backward: d loss_i / d s_ij = (softmax_ij - [j == target]) / τ, with
            softmax_ij = exp(s_ij / τ - lse_i) recomputed per tile; dq += P @ d_tile and
            dd_tile += P.T @ q_rows (two matmuls a tile); the one-hot target term is subtracted
            once, outside the loop.
With a margin (loss.above_positive_mask), each tile also leaves out the documents scoring more
than the margin above the row's positive, compared with the positive's score computed once.
Peak extra memory: one tile. The matmuls run in the inputs' precision with a float32 result where
PyTorch offers it (half precision on CUDA: tensor cores), else on float32 copies; the elementwise
work of a tile (scale, mask, exp, logsumexp) is one compiled function, so it reads the tile once.
"""
import functools

import torch

from loss import targets_of

def false_negative_pairs(d_keys, q_pos_keys, targets):
    """loss.false_negative_mask's True entries as (rows, cols), found without comparing all B x N
    pairs: the document keys are sorted once and each positive key's run of equal keys is found by
    binary search. The masks of the tiles are made from these."""
    order = torch.argsort(d_keys)
    keys = d_keys[order]  # (N,), sorted
    wanted = q_pos_keys.flatten()  # (B * P,)
    # where the run of document keys equal to each wanted key starts
    start = torch.searchsorted(keys, wanted)
    count = torch.searchsorted(keys, wanted, right=True) - start  # and its length
    count = torch.where(wanted < 0, 0, count)  # -1 pads: it matches nothing
    # one entry per (positive key, document with that key): each wanted key repeated count times
    device = d_keys.device
    which = torch.arange(len(wanted), device=device).repeat_interleave(count)
    run_starts = (torch.cumsum(count, 0) - count).repeat_interleave(count)
    place_in_run = torch.arange(len(which), device=device) - run_starts
    rows = which // q_pos_keys.shape[1]
    cols = order[start[which] + place_in_run]
    keep = cols != targets[rows]  # a query's own target is never masked
    return rows[keep], cols[keep]

def above_positive_tile(scores, bound, targets, cols):
    """loss.above_positive_mask within one tile: (r, c) True where a raw score exceeds its row's
    bound (the positive's score + margin), never at the row's own target."""
    mask = scores > bound[:, None]
    local = targets - cols.start  # each row's target column within this tile, where it falls here
    inside = (local >= 0) & (local < scores.shape[1])
    mask[inside.nonzero().squeeze(1), local[inside]] = False
    return mask

def matmul(a, b):
    """a @ b in at least float32."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(a, b.to(a.dtype), out_dtype=torch.float32)  # PyTorch >= 2.8
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return a.to(dtype) @ b.to(dtype)

def tile_lse(s, inv_temp, mask):
    """(r, c) raw scores -> (r,) the logsumexp of the tile's logits, false negatives left out."""
    s = s * inv_temp
    if mask is not None:
        s = s.masked_fill(mask, float("-inf"))
    return torch.logsumexp(s, dim=1)

def tile_softmax(s, inv_temp, mask, lse, g):
    """(r, c) raw scores -> g_i * softmax_ij / τ, the gradient of sum_i g_i * lse_i with respect to
    s_ij."""
    p = torch.exp(s * inv_temp - lse[:, None]) * (g[:, None] * inv_temp)
    if mask is not None:
        p = p.masked_fill(mask, 0.0)
    return p

@functools.cache
def kernels(compile):
    """The per-tile elementwise functions, compiled by torch.compile (dynamic shapes: the tiles at
    the edges and batches of other sizes reuse one compilation), or eager."""
    if not compile:
        return tile_lse, tile_softmax
    return torch.compile(tile_lse, dynamic=True), torch.compile(tile_softmax, dynamic=True)

def tiles(q, d, tile, pairs, targets, bound):
    """(row slice, column slice, (r, c) raw scores, (r, c) mask of the documents left out or None)
    for each tile of the (B, N) score matrix q @ d.T."""
    B, N = q.shape[0], d.shape[0]
    for r in range(0, B, tile[0]):
        for c in range(0, N, tile[1]):
            rows = slice(r, min(r + tile[0], B))
            cols = slice(c, min(c + tile[1], N))
            scores = matmul(q[rows], d[cols].T)
            mask = None
            if pairs is not None:  # the false-negative entries that fall inside this tile
                pair_rows, pair_cols = pairs
                inside = ((pair_rows >= r) & (pair_rows < rows.stop)
                          & (pair_cols >= c) & (pair_cols < cols.stop))
                mask = torch.zeros(scores.shape, dtype=torch.bool, device=q.device)
                mask[pair_rows[inside] - r, pair_cols[inside] - c] = True
            if bound is not None:  # and those far above the row's positive
                above = above_positive_tile(scores, bound[rows], targets[rows], cols)
                mask = above if mask is None else mask | above
            yield rows, cols, scores, mask

class FusedInfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, d, temp, group_size, offset, d_keys, q_pos_keys, margin, tile, compile):
        B = q.shape[0]
        targets = targets_of(q, group_size, offset)  # (B,)
        pairs = None
        if d_keys is not None:
            # once a step, outside the kernels
            pairs = false_negative_pairs(d_keys, q_pos_keys, targets)
        lse_fn, _ = kernels(compile)
        dtype = torch.promote_types(q.dtype, torch.float32)
        target_score = (q.to(dtype) * d[targets].to(dtype)).sum(-1)  # (B,) raw
        bound = None if margin is None else target_score + margin
        lse = torch.full((B,), float("-inf"), dtype=dtype, device=q.device)
        for rows, cols, scores, mask in tiles(q, d, tile, pairs, targets, bound):
            lse[rows] = torch.logaddexp(lse[rows], lse_fn(scores, 1.0 / temp, mask))
        target_logit = target_score / temp
        ctx.save_for_backward(q, d, lse, targets, bound, *(pairs or ()))
        ctx.temp = temp
        ctx.tile = tile
        ctx.compile = compile
        return (lse - target_logit).mean()

    @staticmethod
    def backward(ctx, grad_out):
        q, d, lse, targets, bound, *pairs = ctx.saved_tensors
        B = q.shape[0]
        _, softmax_fn = kernels(ctx.compile)
        g = (grad_out / B).to(lse.dtype).expand(B)  # d mean / d loss_i
        dq = torch.zeros(q.shape, dtype=lse.dtype, device=q.device)
        dd = torch.zeros(d.shape, dtype=lse.dtype, device=d.device)
        for rows, cols, scores, mask in tiles(q, d, ctx.tile, pairs or None, targets, bound):
            p = softmax_fn(scores, 1.0 / ctx.temp, mask, lse[rows], g[rows]).to(q.dtype)
            dq[rows] += matmul(p, d[cols])  # (r, D)
            dd[cols] += matmul(p.T, q[rows])  # (c, D)
        # the one-hot target term: d(-s_i,target / τ)
        dq -= (g / ctx.temp)[:, None] * d[targets].to(dq.dtype)
        dd.index_add_(0, targets, -(g / ctx.temp)[:, None] * q.to(dd.dtype))
        return dq.to(q.dtype), dd.to(d.dtype), None, None, None, None, None, None, None, None

def fused_info_nce(q, d, temp, group_size, offset=0, d_keys=None, q_pos_keys=None, margin=None,
                   directions=("qd",), hardness=0.0, tile=None, compile=None):
    """Same arguments and result as loss.info_nce, in O(tile) extra memory instead of O(B * N), for
    its default directions and hardness (train.py --loss auto takes the reference otherwise).
    tile: (rows, cols) of a logit tile; compile: torch.compile the tile functions (default: on
    CUDA)."""
    if tuple(directions) != ("qd",) or hardness:
        raise ValueError("fused_info_nce computes directions ('qd',) without hardness only")
    if tile is None:
        tile = (4096, 16384) if q.is_cuda else (512, 4096)
    if compile is None:
        compile = q.is_cuda
    with torch.autocast(q.device.type, enabled=False):
        return FusedInfoNCE.apply(q, d, temp, group_size, offset, d_keys, q_pos_keys, margin, tile,
                                  compile)
