"""Gradient caching (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup"): the gradient of a whole batch's InfoNCE at the memory of one chunk of texts, so
that --batch_size 1024 runs on one GPU (and on a CPU, slowly). train.train_step calls it with
--chunk_size; tests/test_train.py checks it equals the plain step.

The loss depends on the parameters θ only through the embeddings e, so
    dL/dθ = sum over chunks c of (dL/de_c) · (de_c/dθ).
Pass 1 computes every e without a graph; the loss and its backward give dL/de for the whole batch
(cheap: B x N dot products); pass 2 recomputes each chunk's graph, one chunk at a time, and
backpropagates dL/de_c. Exact as long as pass 2 recomputes the same e: same chunks, same autocast,
same dropout masks. Dropout draws from the RNG, so each chunk's RNG state is recorded in pass 1 and
restored in pass 2 (`replay_err`, the largest difference of the two passes' embeddings, is then 0).
"""
import torch
import torch.distributed as dist
from tqdm import tqdm

def step(model, batch, loss_fn, chunking, ctx, scaler, device):
    """Forward and backward of one batch by gradient caching, its texts cut into chunks as chunking
    says (see chunks); the parameters' gradients accumulate in .grad -> (loss, q, d, replay_err)."""
    q1, q_cache = embed(model, batch["q"], "query", chunking, ctx, device)
    d1, d_cache = embed(model, batch["d"], "doc", chunking, ctx, device)
    after_pass1 = rng_state(device)
    q = q1.requires_grad_()  # leaves: the loss's backward stops here, at dL/de
    d = d1.requires_grad_()
    loss = loss_fn(q, d)
    scaler.scale(loss).backward()
    q_err = replay(model, "query", q_cache, q1, q.grad, ctx, device)
    d_err = replay(model, "doc", d_cache, d1, d.grad, ctx, device)
    set_rng_state(after_pass1, device)  # the next step's dropout goes on from where pass 1 left it
    return loss.detach(), q.detach(), d.detach(), torch.maximum(q_err, d_err).item()

def chunks(lengths, chunking):
    """The texts of each chunk, longest first -> a list of index tensors. chunking: ("texts", n), n
    texts a chunk; or ("tokens", n), as many texts as keep a chunk's padded size (its longest text
    x its count) within n tokens (sentence-transformers' mini_batch_num_tokens): short texts go in
    large chunks, long ones in small, and each chunk costs about the same memory."""
    order = torch.argsort(lengths, descending=True, stable=True)
    kind, n = chunking
    if kind == "texts":
        return list(order.split(n))
    groups = []
    start = 0
    while start < len(order):
        longest = int(lengths[order[start]])  # sorted: the chunk's first text is its longest
        count = max(1, n // longest)  # a text longer than the budget goes alone
        groups.append(order[start:start + count])
        start += count
    return groups

def rng_state(device):
    """The generators dropout draws from: the CPU's, and the GPU's when training on one."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda

def set_rng_state(state, device):
    torch.set_rng_state(state[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[1], device)

def embed(model, tokens, kind, chunking, ctx, device):
    """Pass 1 of gradient caching: embed all texts chunk by chunk without autograd -> (the
    embeddings in batch order, and what pass 2 needs: the chunks, their rows in the batch, and the
    RNG state each chunk started from)."""
    mask = tokens["attention_mask"]  # (B, L)
    rows = chunks(mask.sum(1), chunking)
    parts = []
    for idx in rows:
        keep = mask[idx].any(0)  # the columns that are not padding in every text of the chunk
        parts.append({k: v[idx][:, keep] for k, v in tokens.items()})
    states = []
    embs = []
    with torch.no_grad():
        for part in chunk_bar(parts, f"pass 1, {kind} chunks"):
            states.append(rng_state(device))
            with ctx:
                embs.append(model(part, kind))
    emb = torch.empty((len(mask), embs[0].shape[1]), dtype=embs[0].dtype, device=device)
    emb[torch.cat(rows).to(device)] = torch.cat(embs)
    return emb, (parts, rows, states)

def chunk_bar(chunks, desc):
    """A progress bar over one step's chunks, on rank 0 and only when the step has many of them (a
    batch of 1024 on a CPU takes minutes a step)."""
    quiet = len(chunks) < 16 or (dist.is_initialized() and dist.get_rank() != 0)
    return tqdm(chunks, desc=desc, unit="chunk", leave=False, disable=quiet)

def replay(model, kind, cache, emb, grad, ctx, device):
    """Pass 2: re-embed each chunk with autograd under the RNG state it had in pass 1 (so dropout
    draws the same masks) and backpropagate its slice of the cached embedding gradient. -> the
    largest difference between the pass-1 and pass-2 embeddings (0 when the replay is exact)."""
    parts, rows, states = cache
    err = torch.zeros((), device=device)
    todo = list(zip(parts, rows, states))
    for part, idx, state in chunk_bar(todo, f"pass 2, {kind} chunks"):
        idx = idx.to(device)
        set_rng_state(state, device)
        with ctx:
            e = model(part, kind)
        err = torch.maximum(err, (e.detach().float() - emb.detach()[idx].float()).abs().max())
        e.backward(grad[idx])
    return err

def chunking(chunk_size, chunk_tokens, model, device):
    """How a batch is cut into chunks (see chunks): --chunk_tokens' budget of tokens, else
    --chunk_size texts, or when neither is given 32 texts on a CPU (the recipes': the same gradient
    at a third of the memory) and on a GPU a budget of activations, 256 texts for BERT-base at 256
    tokens, fewer for a wider, deeper model or longer documents. None: no cache (--chunk_size 0)."""
    if chunk_tokens:
        return ("tokens", chunk_tokens)
    if chunk_size is None and device.type == "cpu":
        chunk_size = 32
    elif chunk_size is None:
        c = model.encoder.config
        budget = 256 * 256 * 768 * 12  # texts x tokens x width x layers of BERT-base's 256 texts
        chunk_size = max(1, budget // (model.settings["passage_max_len"] * c.hidden_size
                                       * c.num_hidden_layers))
    if not chunk_size:
        return None
    return ("texts", chunk_size)
