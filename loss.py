"""InfoNCE, the contrastive loss of bi-encoders (DPR, E5, BGE), written to be read; distillation
from a teacher's scores; and the gather that shares documents between processes. (fused_loss.py
computes the same InfoNCE tile by tile, for batches whose logit matrix would not fit in memory;
tests check the two are equal.)

For query i with embedding q_i and the documents d_1..d_N of the batch (its own positive among
them):

    loss_i = -log( exp(s(q_i, d_target(i)) / τ) / sum_j exp(s(q_i, d_j) / τ) )

where s is the dot product (the cosine, when the embeddings have unit length), i.e. cross-entropy
over "which of the N documents is my positive?". Every other document is a negative: the other
queries' positives and hard negatives ("in-batch negatives") and query i's own mined hard negatives.

Layout: documents come per query, [p_0, n_0,1 .. n_0,G-1, p_1, n_1,1 ..], G = group_size, so the
target of query i is column i*G. (Several libraries shipped the wrong label here: with hard
negatives it is not i.)

The temperature τ: cosines live in [-1, 1], so without scaling the softmax is nearly uniform and the
gradient tiny. Dividing by τ = 0.02 stretches them to [-50, 50]: the loss then focuses on the few
negatives that score close to the positive (the hard ones). Too small a τ overfits to noise and
false negatives; BGE uses 0.02, sentence-transformers 0.05 (its "scale 20").

False negatives: a document that is also a positive of query i (a duplicate, or a positive it shares
with another query of the batch) is not a negative of i. With d_keys (N,), integer keys of the
documents (e.g. hashes of their ids), and q_pos_keys (B, P), the keys of each query's positives
padded with -1, such documents leave query i's denominator; its own target stays.

Unlabelled positives: where a query has many relevant documents and only some are labelled
(NFCorpus: 43 a query on average), many in-batch negatives are relevant too. With margin m, a
document scoring more than m above query i's positive, s(q_i, d_j) > s(q_i, d_target(i)) + m, is
taken for one and left out of i's denominator as well (Qwen3-Embedding's mask, m = 0.1). The mask
is made from the scores but is not differentiated: it only chooses which terms the sum has.

More directions in one softmax (GTE's "improved contrastive loss", Qwen3-Embedding): besides query i
against the documents ("qd"), its partition function Z_i may hold its positive against the other
queries ("dq"), the query against the other queries ("qq") and its positive against the other
documents ("dd"); with a_i = s(q_i, d_t) / τ and t = i*G,

    Z_i = exp(a_i) + sum_{k != t} exp(s(q_i, d_k) / τ)        qd, always
                   + sum_{j != i} exp(s(q_j, d_t) / τ)        dq
                   + sum_{j != i} exp(s(q_i, q_j) / τ)        qq
                   + sum_{k != t} exp(s(d_t, d_k) / τ)        dd
    loss_i = log Z_i - a_i

(sentence-transformers' directions count the positive a second time in "dq" and leave out a
query's own negatives in "dd"; here each term appears once.) The false negatives leave every
direction: by key, a document that is another positive of query i, or a query whose positive is
one; by margin, any term more than m above the positive. With hardness α (EmbeddingGemma, Lan et
al. 2025) each negative term x becomes exp(x / τ + α · stopgrad(x)): the harder, the heavier.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

def targets_of(q, group_size, offset=0):
    """The column of each query's positive: (offset + i) * group_size for query i -> (B,)."""
    return (offset + torch.arange(q.shape[0], device=q.device)) * group_size

def false_negative_mask(d_keys, q_pos_keys, targets):
    """(B, N) bool, True where document j is a positive of query i (its key is among q_pos_keys[i])
    but not i's target. One positive of every query at a time, so memory is that of the logits,
    whatever P is."""
    mask = torch.zeros(len(q_pos_keys), len(d_keys), dtype=torch.bool, device=d_keys.device)
    # (B,): the p-th positive key of each query; -1 (padding) matches no document
    for keys in q_pos_keys.T:
        mask |= keys[:, None] == d_keys[None, :]
    mask[torch.arange(len(targets)), targets] = False  # a query's own target is never masked
    return mask

def above_positive_mask(scores, targets, margin):
    """(B, N) bool, True where document j scores more than margin above query i's positive
    (scores: the (B, N) cosines or dot products, before the temperature); never i's target."""
    rows = torch.arange(len(targets), device=scores.device)
    mask = scores > scores[rows, targets][:, None] + margin
    mask[rows, targets] = False
    return mask

def info_nce(q, d, temp, group_size, offset=0, d_keys=None, q_pos_keys=None, margin=None,
             directions=("qd",), hardness=0.0):
    """InfoNCE of queries q (B, D) against documents d (N, D) laid out per query -> the mean loss
    over the B queries (a scalar). offset is non-zero when the B queries are one rank's slice of a
    gathered batch; margin: leave out the terms scoring more than this above the positive.
    directions and hardness: the field's extensions of the partition function (below); the default
    is the loss above, exactly."""
    # the logits in float32 (float64 stays float64)
    with torch.autocast(q.device.type, enabled=False):
        dtype = torch.promote_types(q.dtype, torch.float32)
        q = q.to(dtype)
        d = d.to(dtype)
        rows = torch.arange(len(q), device=q.device)
        targets = targets_of(q, group_size, offset)  # (B,)
        # each direction is a block of columns of one softmax; "qd" holds the positive
        raw = {"qd": q @ d.T}  # (B, N): query i against every document
        leave_out = {"qd": torch.zeros_like(raw["qd"], dtype=torch.bool)}
        if d_keys is not None:  # the query's other positives are not its negatives
            leave_out["qd"] = false_negative_mask(d_keys, q_pos_keys, targets)
        pos = d[targets]  # (B, D): each query's positive
        if {"dq", "qq"} & set(directions):
            q_all = gather(q)  # (W * B, D): the queries of every rank
            me = torch.nn.functional.one_hot(offset + rows, len(q_all)).bool()  # query i itself
            # a query whose positive is one of i's positives is not i's negative either
            if d_keys is not None:
                q_targets = torch.arange(len(q_all), device=q.device) * group_size
                me = me | (d_keys[q_targets][None, :, None] == q_pos_keys[:, None, :]).any(2)
        if "dq" in directions:  # the positive against the other queries
            raw["dq"] = pos @ q_all.T  # (B, W * B)
            leave_out["dq"] = me
        if "qq" in directions:  # the query against the other queries
            raw["qq"] = q @ q_all.T  # (B, W * B)
            leave_out["qq"] = me
        if "dd" in directions:  # the positive against the other documents
            raw["dd"] = pos @ d.T  # (B, N)
            leave_out["dd"] = leave_out["qd"].clone()
            leave_out["dd"][rows, targets] = True  # the positive itself
        scores = torch.cat([raw[k] for k in raw], 1)  # (B, N + ...), the positive at targets
        mask = torch.cat([leave_out[k] for k in raw], 1)
        if margin is not None:  # terms above the positive + margin: unlabelled positives
            mask = mask | above_positive_mask(scores.detach(), targets, margin)
        logits = scores / temp
        if hardness:  # each negative weighted by exp(hardness * its score): the harder, the heavier
            negative = torch.ones_like(mask)
            negative[rows, targets] = False
            logits = logits + hardness * scores.detach() * negative
        return F.cross_entropy(logits.masked_fill(mask, float("-inf")), targets)

def own_group_info_nce(q, d, temp, group_size):
    """InfoNCE of each query against its own group [p_i, n_i,1 .. n_i,G-1] only, without in-batch
    negatives: FlagEmbedding's "-no_in_batch_neg" data (classification, clustering), where another
    query's positive is often this query's too -> the mean loss over the B queries. Nothing is
    gathered: each rank's queries need only their own documents."""
    with torch.autocast(q.device.type, enabled=False):
        scores = group_scores(q, d, group_size) / temp  # (B, G): the positive in column 0
        return F.cross_entropy(scores, torch.zeros(len(q), dtype=torch.long, device=q.device))

@torch.no_grad()
def accuracy(q, d, group_size, offset=0, rows=1024):
    """In-batch accuracy: the share of queries whose best-scoring document is their positive
    (computed rows queries at a time, so it never holds the whole logit matrix either)."""
    targets = targets_of(q, group_size, offset)
    best = torch.cat([(q[i:i + rows].float() @ d.float().T).argmax(1)
                      for i in range(0, len(q), rows)])
    return (best == targets).float().mean().item()

@torch.no_grad()
def per_query(q, d, temp, group_size, offset=0, d_keys=None, q_pos_keys=None, margin=None,
              rows=1024):
    """Each query's own InfoNCE loss and the rank of its positive among the batch's documents (1:
    the best; false negatives left out, as in the loss), rows queries at a time -> (losses (B,),
    ranks (B,)), for train.py --example_log."""
    losses = []
    ranks = []
    targets = targets_of(q, group_size, offset)
    for i in range(0, len(q), rows):
        raw = q[i:i + rows].float() @ d.float().T  # (r, N)
        scores = raw / temp
        target = targets[i:i + rows]
        if d_keys is not None:
            mask = false_negative_mask(d_keys, q_pos_keys[i:i + rows], target)
            scores = scores.masked_fill(mask, float("-inf"))
        if margin is not None:
            scores = scores.masked_fill(above_positive_mask(raw, target, margin), float("-inf"))
        losses.append(F.cross_entropy(scores, target, reduction="none"))
        own = scores[torch.arange(len(target)), target]
        ranks.append((scores > own[:, None]).sum(1) + 1)
    return torch.cat(losses), torch.cat(ranks)

# --------------------------------------------------------------------------------------- Matryoshka
#
# Matryoshka representation learning (Kusupati et al. 2022; train.py --mrl_dims): the loss is the
# sum of the InfoNCE of several prefixes of the embedding, so that the first 64 of 384 dimensions
# alone retrieve well too (a smaller index, evaluate.py --dim 64).

def prefix(x, dim, normalize):
    """The first dim dimensions of each embedding (all with dim None), re-normalised when the model
    normalises its embeddings (a prefix of a unit vector is shorter than one)."""
    if dim is None:
        return x
    x = x[:, :dim]
    if normalize:
        x = F.normalize(x, dim=-1)
    return x

# ------------------------------------------------------------------------------------- distillation
#
# With a teacher's scores of each query's own group (score.py writes them as pos_scores and
# neg_scores), the student can also learn the teacher's ranking within the group. Nothing is
# gathered: each query sees only its own G documents here.

def group_scores(q, d, group_size):
    """Each query's scores against its own group: q (B, D), d (B * G, D) laid out per query
    -> (B, G), in at least float32."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    return torch.einsum("bd,bgd->bg", q.to(dtype), d.to(dtype).view(q.shape[0], group_size, -1))

def distill_kl(q, d, teacher_scores, temp, teacher_temp, group_size):
    """KL(teacher || student) over each query's group (FlagEmbedding's distillation): the teacher's
    scores (B, G) and the student's, each a softmax at its temperature -> the mean KL over the B
    queries."""
    with torch.autocast(q.device.type, enabled=False):
        student = group_scores(q, d, group_size) / temp  # (B, G)
        teacher = torch.softmax(teacher_scores.to(student.dtype) / teacher_temp, dim=-1)
        return F.kl_div(torch.log_softmax(student, dim=-1), teacher, reduction="batchmean")

def margin_mse(q, d, teacher_scores, group_size):
    """MarginMSE (Hofstätter et al. 2020): the student's margins s(q, p) - s(q, n_j) regressed onto
    the teacher's, so the teacher's scores must be on the student's scale (a bi-encoder teacher's
    cosines are) -> the mean squared error over the B x (G - 1) margins."""
    with torch.autocast(q.device.type, enabled=False):
        student = group_scores(q, d, group_size)  # (B, G)
        teacher = teacher_scores.to(student.dtype)
        return F.mse_loss(student[:, :1] - student[:, 1:], teacher[:, :1] - teacher[:, 1:])

# ------------------------------------------------------------------------------------- many devices
#
# With W processes (torchrun), each rank embeds its own b = B/W queries and their documents. The
# documents are all-gathered, so that every query sees all N documents as negatives, and each rank
# computes the loss of ITS queries against ALL documents: L_r, the mean over its b queries. The loss
# of the whole batch is their mean, L = (1/W) sum_r L_r, so one convention holds everywhere: what is
# summed over ranks is divided by W.
#   - The gather's backward gives rank s the gradient of sum_r L_r with respect to its own documents
#     (it sums every rank's gradient for them: a reduce-scatter).
#   - Rank s backpropagates that, and its own queries' gradient of L_s, into its parameters:
#     together these are the gradient of sum_r L_r reached through rank s's embeddings.
#   - Summing those over ranks and dividing by W (train.py's all_reduce_grads, as DDP averages)
#     gives dL/dθ.
#   - The logged loss and accuracy are likewise the mean of the ranks' values.
# The result equals one process with the whole batch; tests/test_dist.py checks it.

def gather(x):
    """All-gather along dim 0, differentiably: (n, D) on each of W ranks -> (W * n, D), rank r's
    rows at [r*n, (r+1)*n). The identity in a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return Gather.apply(x)

class Gather(torch.autograd.Function):
    """The gather and its backward, the reduce-scatter above: every rank holds a gradient for all
    W * n gathered rows; rank r's rows get the sum of those over the ranks. (All-reduce, then
    rank r's slice: the same sum, in a collective every backend has.)"""

    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce sums in place
        dist.all_reduce(grad)
        n = len(grad) // dist.get_world_size()
        rank = dist.get_rank()
        return grad[rank * n:(rank + 1) * n]
