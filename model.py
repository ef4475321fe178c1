"""The bi-encoder: a transformer that turns a text into a vector, with pooling, L2 normalisation and
instruction prefixes; one tower for queries and documents, or one each; save and load.

    model = BiEncoder("runs/ft/model")         # a checkpoint, or any Hugging Face folder
    batch = model.tokenize(["what is x?"], "query")
    q = model(batch, "query")                  # (B, D), unit length when normalize is on
    e = model.encode(texts, "doc")             # numpy (N, D): batched, length-sorted, no gradients

BERT-family checkpoints (MiniLM, BGE, E5, GTE) run on `Bert` below, in training and in inference:
the whole forward on one screen, nanoGPT-style. It reads and writes Hugging Face's weight names, so
a checkpoint loads unchanged in transformers and sentence-transformers. Other architectures run on
transformers' AutoModel.

Settings that must match between training and inference (pooling, normalize, prefixes, max lengths,
separate towers) travel in `biencoder.json` inside the saved folder. A plain Hugging Face folder
gets them from its sentence-transformers files when it has them (all-MiniLM-L6-v2: mean pooling,
normalize, 256 tokens), else from DEFAULTS (BGE's: the CLS token, normalized). Those files are read
whole (its 5.x and 6.x layouts): the Transformer or a Router of two towers, Pooling in any one of
its modes with or without the instruction's tokens, a Dense layer (trained with the rest), Normalize
and the query and document prompts; a module or option we cannot run is refused, never ignored.
"""
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm
# the modeling code is imported only for non-BERT models
from transformers import AutoTokenizer

import data
import formats
import lora
from cli import InputError

# --------------------------------------------------------------------------------------------- BERT

class Bert(nn.Module):
    """BERT's encoder: token + position (+ segment 0) embeddings, then per layer self-attention and
    an MLP, each added to its input and layer-normalised after (post-norm). Dropout as in BERT's
    pretraining: on the embeddings, on the attention probabilities (inside SDPA) and on each block's
    output."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        d = config.hidden_size
        eps = config.layer_norm_eps
        self.word = nn.Embedding(config.vocab_size, d)
        self.position = nn.Embedding(config.max_position_embeddings, d)
        self.token_type = nn.Embedding(config.type_vocab_size, d)
        self.norm = nn.LayerNorm(d, eps=eps)
        self.layers = nn.ModuleList()
        for _ in range(config.num_hidden_layers):
            self.layers.append(nn.ModuleDict(dict(
                qkv=nn.Linear(d, 3 * d),  # queries, keys and values in one matrix
                attn_out=nn.Linear(d, d),
                norm1=nn.LayerNorm(d, eps=eps),
                up=nn.Linear(d, config.intermediate_size),
                down=nn.Linear(config.intermediate_size, d),
                norm2=nn.LayerNorm(d, eps=eps),
            )))
        # checkpoint tensors the encoder does not use (BERT's pooler): saved back unchanged
        self.unused = {}
        self.grad_checkpoint = False  # recompute each layer's activations in backward

    def forward(self, input_ids, attention_mask=None):
        """(B, L) token ids and padding mask (1 = real token; None = no padding) -> hidden states
        (B, L, d)."""
        L = input_ids.shape[1]
        p_hidden = self.config.hidden_dropout_prob if self.training else 0.0
        p_attn = self.config.attention_probs_dropout_prob if self.training else 0.0
        x = self.word(input_ids) + self.position.weight[:L] + self.token_type.weight[0]  # (B, L, d)
        x = F.dropout(self.norm(x), p_hidden, self.training)
        # (B, 1, 1, L), broadcast over heads and query positions: every token attends to the real
        # tokens only
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        for layer in self.layers:
            if self.grad_checkpoint and torch.is_grad_enabled():
                # keep only the layer's input; backward recomputes the rest under the same RNG state
                x = checkpoint(self.block, layer, x, mask, p_attn, p_hidden, use_reentrant=False)
            else:
                x = self.block(layer, x, mask, p_attn, p_hidden)
        return x

    def block(self, layer, x, mask, p_attn, p_hidden):
        """One layer: self-attention, then the MLP, each added to its input and layer-normalised."""
        B, L, _ = x.shape
        heads = self.config.num_attention_heads
        # each (B, heads, L, d/heads)
        q, k, v = layer.qkv(x).view(B, L, 3, heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p_attn)
        a = a.transpose(1, 2).reshape(B, L, -1)  # heads side by side again: (B, L, d)
        x = layer.norm1(x + F.dropout(layer.attn_out(a), p_hidden, self.training))
        x = layer.norm2(x + F.dropout(layer.down(F.gelu(layer.up(x))), p_hidden, self.training))
        return x

    @staticmethod
    def load(path, config):
        """Our Bert with the weights of path/model.safetensors, or None where it cannot run the
        checkpoint."""
        file = os.path.join(path, "model.safetensors")
        runs_it = (config.model_type == "bert" and config.hidden_act == "gelu"
                   and not config.is_decoder
                   and getattr(config, "position_embedding_type", "absolute") == "absolute")
        if not runs_it or not os.path.isfile(file):
            return None
        model = Bert(config)
        try:
            # BertFor*: "bert." prefixes
            hf = {k.removeprefix("bert."): v for k, v in load_file(file).items()}
            ours = {name: torch.cat([hf.pop(n) for n in hf_names(name)])
                    for name in model.state_dict()}
            model.load_state_dict(ours)
        # a truncated file, a missing weight, a shape the config does not give
        except Exception as e:
            raise InputError(f"{file}: not a complete BERT checkpoint of its config.json "
                             f"({e})") from None
        model.unused = hf
        return model

    def save(self, path, state=None):
        """config.json and model.safetensors under transformers' names (q, k and v split apart
        again); state: the weights under our names (default: the model's own)."""
        self.config.architectures = ["BertModel"]
        self.config.save_pretrained(path)
        tensors = dict(self.unused)
        for name, param in (state or self.state_dict()).items():
            theirs = hf_names(name)
            for their_name, part in zip(theirs, param.chunk(len(theirs))):
                # clone: safetensors refuses views of one storage
                tensors[their_name] = part.clone()
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})

# Our parameter names -> transformers' BertModel names (a layer's after "encoder.layer.N."); q, k
# and v are one matrix here, three stacked there.
HF_NAMES = {
    "word": "embeddings.word_embeddings",
    "position": "embeddings.position_embeddings",
    "token_type": "embeddings.token_type_embeddings",
    "norm": "embeddings.LayerNorm",
    "qkv": ("attention.self.query", "attention.self.key", "attention.self.value"),
    "attn_out": "attention.output.dense",
    "norm1": "attention.output.LayerNorm",
    "up": "intermediate.dense",
    "down": "output.dense",
    "norm2": "output.LayerNorm",
}

def hf_names(name):
    """"layers.3.qkv.weight" -> ["encoder.layer.3.attention.self.query.weight", ... key, value]."""
    *layer, module, param = name.split(".")
    theirs = HF_NAMES[module]
    if isinstance(theirs, str):
        theirs = (theirs,)
    prefix = f"encoder.layer.{layer[1]}." if layer else ""
    return [f"{prefix}{t}.{param}" for t in theirs]

def load_encoder(path, config, attention_dropout=None):
    """The transformer of a folder: our Bert where it can run it, else transformers' AutoModel with
    PyTorch's fused attention (SDPA). attention_dropout, if given, replaces the config's dropout on
    attention probabilities."""
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json")
    if not any(os.path.isfile(os.path.join(path, name)) for name in weights):
        raise InputError(f"{path}: no weights in it ({weights[0]} or {weights[2]})")
    if attention_dropout is not None:
        names = [n for n in ("attention_probs_dropout_prob", "attention_dropout")
                 if hasattr(config, n)]
        if not names and attention_dropout > 0:  # 0 on a model without it: nothing to turn off
            raise InputError(f"--attention_dropout: the config of {path} has no attention dropout "
                             f"setting")
        for name in names:
            setattr(config, name, attention_dropout)
    model = Bert.load(path, config)
    if model is None:
        # imported here only: a heavy import that a BERT never needs
        from transformers import AutoModel
        # float32, as our Bert: training keeps float32 master weights (for_inference casts)
        model = AutoModel.from_pretrained(path, config=config, attn_implementation="sdpa",
                                          dtype=torch.float32)
    return model

def hf_modules(name):
    """One of our Bert's module names -> the transformers modules it stands for ("layers.3.qkv" ->
    the query, key and value of "encoder.layer.3.attention.self")."""
    return [n.removesuffix(".weight") for n in hf_names(name + ".weight")]

def save_encoder(encoder, path, base):
    """A transformer as a Hugging Face folder; with LoRA adapters, its weights with the adapters
    merged in, and the adapter alone in path/adapter (peft's format, for the model in base)."""
    state = None
    if lora.has_adapters(encoder):
        state = lora.merged_state_dict(encoder)
    if isinstance(encoder, Bert):
        encoder.save(path, state)
        if state is not None:
            lora.save_adapter(encoder, os.path.join(path, "adapter"), base, hf_modules)
    else:
        encoder.save_pretrained(path, state_dict=state)
        if state is not None:
            lora.save_adapter(encoder, os.path.join(path, "adapter"), base)

# --------------------------------------------------------------------------------------- bi-encoder

# How a text's hidden states become one vector: the first token's, the mean of the real tokens',
# their maximum, the last real token's, their sum over sqrt(length), and a mean weighted by position
# (the last two are sentence-transformers' modes, read from its folders)
POOLINGS = ("cls", "mean", "last", "max", "mean_sqrt_len_tokens", "weightedmean")

class BiEncoder(nn.Module):
    """A text -> its embedding: tokenize (with the instruction prefix of its kind, "query" or
    "doc"), run the transformer of that kind's tower, pool its hidden states into one vector,
    normalise it."""

    def __init__(self, path, attention_dropout=None, **overrides):
        """The model in folder path (a checkpoint, or any Hugging Face folder); overrides that are
        not None replace its settings (e.g. pooling="mean", separate_towers=True to start two towers
        from it)."""
        super().__init__()
        if not os.path.isdir(path):
            raise InputError(f"--model {path}: not a folder (nothing is downloaded; give a local "
                             f"Hugging Face folder)")
        run_model = os.path.join(path, "model")
        if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(run_model):
            raise InputError(f"--model {path}: a train.py run folder; did you mean {run_model}?")
        # a LoRA adapter (e.g. a checkpoint's model/adapter): its base with the adapter merged in
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            path = formats.with_adapter_merged(path)
        # a checkpoint with two towers holds a Hugging Face folder for each
        towers = formats.tower_folders(path)
        has_towers = towers is not None
        doc_path = towers["doc"] if has_towers else path
        query_path = towers["query"] if has_towers else path
        config = formats.read_config(doc_path)
        self.decoder = formats.is_decoder(config)
        self.settings = formats.read_settings(path, self.decoder)
        for key, value in overrides.items():
            if value is not None:
                self.settings[key] = value
        if self.settings["pooling"] not in POOLINGS:
            raise InputError(f"unknown pooling {self.settings['pooling']!r}; choose "
                             f"{', '.join(POOLINGS)}")
        if has_towers and not self.settings["separate_towers"]:
            raise InputError(f"{path}: a checkpoint with separate towers; it cannot become one "
                             f"shared tower")
        self.sources = {"query": query_path, "doc": doc_path}  # where each tower came from
        tokenizer_files = [os.path.join(doc_path, name) for name in formats.TOKENIZER_FILES]
        if not any(os.path.isfile(file) for file in tokenizer_files):
            # transformers would build a vocabulary of its special tokens alone, without a word
            raise InputError(f"{path}: no tokenizer files in it (tokenizer.json, vocab.txt, ...)")
        # documents, and queries when shared
        self.encoder = load_encoder(doc_path, config, attention_dropout)
        self.query_encoder = None
        if self.settings["separate_towers"]:
            query_config = formats.read_config(query_path)
            self.query_encoder = load_encoder(query_path, query_config, attention_dropout)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(doc_path)
        except (OSError, ValueError) as e:
            raise InputError(f"{path}: cannot load its tokenizer "
                             f"({str(e).splitlines()[0]})") from None
        if self.tokenizer.pad_token is None:  # decoder models (last-token pooling) often have none
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.settings["append_eos"]:
            formats.end_with_eos(self.tokenizer, path)
        self.check_room(path)
        self.prompt_lengths = {}  # instruction -> its tokens (prompt_length)
        # sentence-transformers' Dense after pooling, where the model has one: (B, H) -> (B, D)
        self.dense = None
        self.dense_activation = None
        if self.settings["dense"] is not None:
            self.dense, self.dense_activation = formats.load_dense(path, self.settings["dense"])
            if self.dense.in_features != self.encoder.config.hidden_size:
                raise InputError(f"{path}: its Dense takes {self.dense.in_features} features, "
                                 f"its transformer gives {self.encoder.config.hidden_size}")
        positions = getattr(self.encoder.config, "max_position_embeddings", float("inf"))
        for key in ("query_max_len", "passage_max_len"):
            if self.settings[key] > positions:
                raise InputError(f"--{key} {self.settings[key]}: {path} has {positions} positions")

    def check_room(self, path):
        """Settings that would make texts all alike are errors: a prefix or special tokens that
        leave no room for the text within the max length; CLS pooling on a decoder (every text's
        first token is the same, and causal attention keeps it from seeing the rest)."""
        if self.decoder and self.settings["pooling"] == "cls":
            raise InputError(f"{path}: pooling cls on a decoder gives every text the same vector; "
                             f"use last (a decoder's default) or mean")
        special = len(self.tokenizer("")["input_ids"])  # the tokens every text gets
        for prefix_key, max_key in (("query_prefix", "query_max_len"),
                                    ("doc_prefix", "passage_max_len")):
            taken = len(self.tokenizer(self.settings[prefix_key])["input_ids"])
            max_len = self.settings[max_key]
            if max_len <= special:
                raise InputError(f"--{max_key} {max_len}: the tokenizer adds {special} special "
                                 f"tokens to every text, which leaves no room for the text")
            if taken >= max_len:
                raise InputError(f"--{prefix_key}: {taken} of the {max_len} tokens --{max_key} "
                                 f"allows, which leaves no room for the text")

    @property
    def dim(self):
        """The embeddings' width: the Dense's output where there is one, else the transformer's."""
        if self.dense is not None:
            return self.dense.out_features
        return self.encoder.config.hidden_size

    def towers(self):
        """The transformers to train: one, or the document tower and the query tower."""
        return [e for e in (self.encoder, self.query_encoder) if e is not None]

    def add_lora(self, rank, alpha, dropout, targets=None):
        """LoRA adapters on each tower (lora.py); targets: the layers' names, by default the
        attention and MLP projections of the architecture. Only the adapters train from then on."""
        for encoder in self.towers():
            default = lora.BERT_TARGETS if isinstance(encoder, Bert) else lora.DECODER_TARGETS
            lora.add_adapters(encoder, rank, alpha, dropout, targets or default)

    def grad_checkpoint(self):
        """Recompute each layer's activations in backward instead of keeping them (non-reentrant
        torch.utils.checkpoint, which replays the RNG state: dropout draws the same masks)."""
        for encoder in self.towers():
            if isinstance(encoder, Bert):
                encoder.grad_checkpoint = True
            else:  # transformers' own switch (renamed in its 5.x series; the old name still works)
                enable = getattr(encoder, "activation_checkpointing_enable", None)
                if enable is None:
                    enable = encoder.gradient_checkpointing_enable
                enable({"use_reentrant": False})

    def tower(self, kind):
        """The transformer that embeds texts of this kind ("query" or "doc")."""
        if kind == "query" and self.query_encoder is not None:
            return self.query_encoder
        return self.encoder

    def tokenize(self, texts, kind, padding=True, prompts=None):
        """Prefix and tokenize texts of a kind ("query" or "doc"), truncated to its max length:
        (B, L) tensors padded to the longest, or with padding=False lists of ids (to sort by length
        and pad later). prompts: one instruction a text that replaces the kind's prefix (a train
        line's "prompt", FlagEmbedding's format), None for the prefix. With pool_prompt off the
        batch also holds "pool_mask", shaped as attention_mask: 1 on the tokens that pooling
        reads, the real ones after the text's instruction."""
        if kind == "query":
            prefix, max_len = self.settings["query_prefix"], self.settings["query_max_len"]
        else:
            prefix, max_len = self.settings["doc_prefix"], self.settings["passage_max_len"]
        if prompts is None:
            prompts = [None] * len(texts)
        assert len(prompts) == len(texts), f"{len(prompts)} prompts for {len(texts)} texts"
        prompts = [prefix if p is None else p for p in prompts]
        batch = self.tokenizer([p + t for p, t in zip(prompts, texts)], padding=padding,
                               truncation=True, max_length=max_len,
                               return_tensors="pt" if padding else None,
                               return_token_type_ids=False)
        if self.settings["pool_prompt"]:
            return batch
        skip = [self.prompt_length(p) for p in prompts]
        if padding:
            mask = batch["attention_mask"]  # (B, L)
            first = mask.argmax(1, keepdim=True)  # each text's first real token (left padding)
            after = torch.arange(mask.shape[1]) >= first + torch.tensor(skip).unsqueeze(1)
            batch["pool_mask"] = mask * after  # (B, L)
        else:  # a list a text, as its ids
            batch["pool_mask"] = [[0] * min(n, len(ids)) + [1] * max(len(ids) - n, 0)
                                  for n, ids in zip(skip, batch["input_ids"])]
        return batch

    def prompt_length(self, prompt):
        """The tokens an instruction takes at the start of a text, counted as sentence-transformers
        counts them for include_prompt false: the instruction tokenized alone, less the special
        token it ends with ([SEP], an appended EOS); so [CLS] or BOS counts in it. 0 for none."""
        if not prompt:
            return 0
        if prompt not in self.prompt_lengths:
            ids = self.tokenizer(prompt)["input_ids"]
            ends_special = ids[-1] in self.tokenizer.all_special_ids
            self.prompt_lengths[prompt] = len(ids) - int(ends_special)
        return self.prompt_lengths[prompt]

    def forward(self, batch, kind):
        """batch: the tokenizer's input_ids and attention_mask (B, L) (and pool_mask, with
        pool_prompt off), best still on the CPU -> embeddings (B, D), in float32 when normalised
        (even under bf16)."""
        device = next(self.parameters()).device
        padded = not bool(batch["attention_mask"].all())  # decided on the CPU: no wait for the GPU
        ids = batch["input_ids"].to(device, non_blocking=True)  # (B, L)
        mask = batch["attention_mask"].to(device, non_blocking=True)  # (B, L)
        # (B, L, H)
        hidden = self.tower(kind)(input_ids=ids, attention_mask=mask if padded else None)
        if not torch.is_tensor(hidden):  # transformers' models return an output object
            hidden = hidden.last_hidden_state
        pooling = self.settings["pooling"]
        rows = torch.arange(hidden.shape[0], device=device)
        # the tokens pooled: the real ones, less each text's instruction when pool_prompt is off
        # (as sentence-transformers' Pooling with include_prompt false)
        pool = mask
        if "pool_mask" in batch:
            pool = batch["pool_mask"].to(device, non_blocking=True)  # (B, L)
        m = pool.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
        if pooling == "cls":  # the first token pooled: [CLS], or the first after the instruction
            emb = hidden[rows, pool.argmax(1)]
        elif pooling == "mean":
            emb = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
        elif pooling == "mean_sqrt_len_tokens":  # the sum over the square root of the count
            emb = (hidden * m).sum(1) / m.sum(1).clamp(min=1).sqrt()
        elif pooling == "max":  # each dimension's largest value over the tokens pooled
            emb = hidden.masked_fill(m == 0, float("-inf")).max(1).values
        elif pooling == "weightedmean":
            # a text's tokens weigh 1, 2, 3, ... from its first real token (past left padding); the
            # instruction's are left out, the others keep their weights
            first = mask.argmax(1, keepdim=True)  # (B, 1)
            position = torch.arange(1, mask.shape[1] + 1, device=device) - first  # (B, L)
            w = m * position.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
            emb = (hidden * w).sum(1) / w.sum(1).clamp(min=1)
        else:  # "last": the last real token of each text
            if bool(mask[:, -1].all()):  # left padding (or none): position L - 1 in every row
                last = torch.full_like(mask[:, 0], mask.shape[1] - 1)
            else:  # right padding: just after the real tokens
                last = mask.sum(1) - 1
            emb = hidden[rows, last]
        if self.dense is not None:  # sentence-transformers' Dense: (B, H) -> (B, D)
            emb = self.dense_activation(self.dense(emb))
        if self.settings["normalize"]:
            emb = F.normalize(emb.float(), dim=-1)
        return emb

    @torch.inference_mode()
    def encode(self, texts, kind, batch_size=None, progress=None):
        """Embed texts of a kind ("query" or "doc") -> float32 numpy (len(texts), D) in their order.
        Sorted by length so that each batch pads only to its own longest text (longest first: an
        out-of-memory shows at once); the next batch is padded in a background thread while the
        device works; the vectors stay on the device until the end. progress: a tqdm bar to advance,
        or the description of a bar of its own."""
        device = next(self.parameters()).device
        bar = progress
        if isinstance(progress, str):
            bar = tqdm(total=len(texts), desc=progress, unit=kind, mininterval=2)
        if batch_size is None:
            batch_size = 256 if device.type == "cuda" else 32
        tokenized = self.tokenize(texts, kind, padding=False)
        tokens = tokenized["input_ids"]
        pool_masks = tokenized.get("pool_mask")  # with pool_prompt off: a list a text
        order = np.argsort([-len(t) for t in tokens], kind="stable")
        out = torch.empty(len(texts), self.dim, dtype=torch.float32, device=device)

        # in the background thread; pinned memory lets the copy to a GPU run asynchronously
        def pad(idx):
            batch = self.tokenizer.pad({"input_ids": [tokens[j] for j in idx]}, return_tensors="pt")
            if pool_masks is not None:  # padded as attention_mask: its real tokens, in order
                pool = torch.zeros_like(batch["attention_mask"])
                pool[batch["attention_mask"].bool()] = torch.tensor(
                    [x for j in idx for x in pool_masks[j]])
                batch["pool_mask"] = pool
            if device.type == "cuda":
                batch = {k: v.pin_memory() for k, v in batch.items()}
            return idx, batch
        batches = (pad(order[i:i + batch_size]) for i in range(0, len(order), batch_size))
        for idx, batch in data.background(batches):
            out[torch.from_numpy(idx).to(device)] = self(batch, kind).float()
            if bar is not None:
                bar.update(len(idx))
        if bar is not progress:
            bar.close()
        return out.cpu().numpy()

    def save(self, path):
        """Hugging Face weights and tokenizer, biencoder.json, and the sentence-transformers files
        (formats.write_settings), so that SentenceTransformer(path) gives the same vectors. With
        separate towers each tower is a Hugging Face folder of its own (path/query,
        path/document)."""
        towers = [(self.encoder, "doc", path)]
        if self.query_encoder is not None:
            towers = [(encoder, kind, os.path.join(path, formats.TOWERS[kind]))
                      for encoder, kind in ((self.query_encoder, "query"), (self.encoder, "doc"))]
        for encoder, kind, folder in towers:
            save_encoder(encoder, folder, self.sources[kind])
            formats.save_tokenizer(self.tokenizer, folder, self.settings["append_eos"])
        formats.write_settings(path, self.settings, self.encoder.config.hidden_size, self.dense)


# ---------------------------------------------------------------------------------------- inference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

def for_inference(path, device, dtype, **overrides):
    """A BiEncoder to embed with: weights in dtype (no float32 master copy is needed without an
    optimizer, and casting once beats autocast re-casting every forward), on the device, in eval
    mode."""
    return BiEncoder(path, **overrides).to(device, DTYPES[dtype]).eval()

def for_training(path, device, world=1, lora_rank=None, lora_alpha=16, lora_dropout=0.1,
                 lora_targets=None, frozen_dtype=None, grad_checkpoint=False, compile=False,
                 attention_dropout=None, **overrides):
    """A BiEncoder to train: float32 weights (autocast computes in lower precision) on the device,
    in train mode (dropout on, as in pretraining), its weights equal on every one of world ranks.
    lora_rank: LoRA adapters of that rank instead of training every weight (None: FlagEmbedding's
    64 for a decoder LLM, none for a BERT; model.lora_rank says which), with the frozen weights in
    frozen_dtype (bf16 halves a large model's memory; the adapters and AdamW's state stay float32);
    grad_checkpoint: recompute each layer's activations in backward; compile: torch.compile each
    tower. overrides: as BiEncoder's."""
    model = BiEncoder(path, attention_dropout, **overrides).to(device).train()
    model.lora_rank = lora_rank
    if lora_rank is None:
        model.lora_rank = 64 if model.decoder else 0
    if model.lora_rank:
        model.add_lora(model.lora_rank, lora_alpha, lora_dropout, lora_targets)
        if frozen_dtype is not None:
            for tower in model.towers():
                lora.frozen_to(tower, frozen_dtype)
    if grad_checkpoint:
        model.grad_checkpoint()
    if world > 1:  # a weight initialised at load (a new head) must start equal on every rank
        for tensor in model.state_dict().values():
            torch.distributed.broadcast(tensor, 0)
    # compiled dropout must draw eager's random numbers, or gradient caching's pass 2 would not
    # replay pass 1
    if compile:
        torch._inductor.config.fallback_random = True
        for tower in model.towers():
            tower.compile(dynamic=True)  # in place: the state dict keeps its names
    return model
