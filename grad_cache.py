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

def step(model, batch, loss_fn, chunk_size, ctx, scaler, device):
    """Forward and backward of one batch by gradient caching, chunk_size texts a forward pass; the
    parameters' gradients accumulate in .grad -> (loss, q, d, replay_err)."""
    q1, q_cache = embed(model, batch["q"], "query", chunk_size, ctx, device)
    d1, d_cache = embed(model, batch["d"], "doc", chunk_size, ctx, device)
    after_pass1 = rng_state(device)
    q = q1.requires_grad_()  # leaves: the loss's backward stops here, at dL/de
    d = d1.requires_grad_()
    loss = loss_fn(q, d)
    scaler.scale(loss).backward()
    q_err = replay(model, "query", q_cache, q1, q.grad, ctx, device)
    d_err = replay(model, "doc", d_cache, d1, d.grad, ctx, device)
    set_rng_state(after_pass1, device)  # the next step's dropout goes on from where pass 1 left it
    return loss.detach(), q.detach(), d.detach(), torch.maximum(q_err, d_err).item()

def rng_state(device):
    """The generators dropout draws from: the CPU's, and the GPU's when training on one."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda

def set_rng_state(state, device):
    torch.set_rng_state(state[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[1], device)

def embed(model, tokens, kind, chunk_size, ctx, device):
    """Pass 1 of gradient caching: embed all texts chunk by chunk without autograd -> (the
    embeddings in batch order, and what pass 2 needs: the chunks, their order, and the RNG state
    each chunk started from)."""
    # (B, L): chunks of similar lengths, each trimmed to its longest text
    mask = tokens["attention_mask"]
    order = torch.argsort(mask.sum(1), descending=True, stable=True)
    chunks = []
    for idx in order.split(chunk_size):
        keep = mask[idx].any(0)  # the columns that are not padding in every text of the chunk
        chunks.append({k: v[idx][:, keep] for k, v in tokens.items()})
    states = []
    parts = []
    with torch.no_grad():
        for chunk in chunk_bar(chunks, f"pass 1, {kind} chunks"):
            states.append(rng_state(device))
            with ctx:
                parts.append(model(chunk, kind))
    emb = torch.empty((len(order), parts[0].shape[1]), dtype=parts[0].dtype, device=device)
    emb[order.to(device)] = torch.cat(parts)
    return emb, (chunks, order, states)

def chunk_bar(chunks, desc):
    """A progress bar over one step's chunks, on rank 0 and only when the step has many of them (a
    batch of 1024 on a CPU takes minutes a step)."""
    quiet = len(chunks) < 16 or (dist.is_initialized() and dist.get_rank() != 0)
    return tqdm(chunks, desc=desc, unit="chunk", leave=False, disable=quiet)

def replay(model, kind, cache, emb, grad, ctx, device):
    """Pass 2: re-embed each chunk with autograd under the RNG state it had in pass 1 (so dropout
    draws the same masks) and backpropagate its slice of the cached embedding gradient. -> the
    largest difference between the pass-1 and pass-2 embeddings (0 when the replay is exact)."""
    chunks, order, states = cache
    err = torch.zeros((), device=device)
    chunk_rows = order.to(device).split(len(chunks[0]["input_ids"]))
    todo = list(zip(chunks, chunk_rows, states))
    for chunk, idx, state in chunk_bar(todo, f"pass 2, {kind} chunks"):
        set_rng_state(state, device)
        with ctx:
            e = model(chunk, kind)
        err = torch.maximum(err, (e.detach().float() - emb.detach()[idx].float()).abs().max())
        e.backward(grad[idx])
    return err

def chunk_size(given, model, device):
    """Texts a forward pass: --chunk_size (0: no cache) or when it is not given 32 on a CPU (the
    recipes': the same gradient at a third of the memory), on a GPU a budget of activations, 256
    texts for BERT-base at 256 tokens, fewer for a wider, deeper model or longer documents."""
    if given is not None:
        return given
    if device.type == "cpu":
        return 32
    c = model.encoder.config
    budget = 256 * 256 * 768 * 12  # texts x tokens x width x layers of BERT-base's 256 texts
    return max(1, budget // (model.settings["passage_max_len"] * c.hidden_size
                             * c.num_hidden_layers))
