"""The bi-encoder: a transformer, pooling, L2 normalisation and instruction prefixes; save and load.

    model = BiEncoder("runs/ft/model")            # a checkpoint, or any Hugging Face folder
    batch = model.tokenize(["what is x?"], "query")
    q = model(batch, "query")                      # (B, D), unit length when normalize is on
    e = model.encode(texts, "doc")                 # numpy (N, D): batched, length-sorted, no gradients

BERT-family checkpoints (MiniLM, BGE, E5, GTE) run on `Bert` below, in training and in inference: the whole
forward on one screen, nanoGPT-style. It reads and writes Hugging Face's weight names, so a checkpoint loads
unchanged in transformers and sentence-transformers. Other architectures run on transformers' AutoModel.

Settings that must match between training and inference (pooling, normalize, prefixes, max lengths) travel in
`biencoder.json` inside the saved folder. A plain Hugging Face folder gets them from its sentence-transformers
files when present (all-MiniLM-L6-v2: mean pooling, normalize, 256 tokens), else from DEFAULTS (BGE-style).
"""
import datetime
import json
import os
import re

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import AutoConfig, AutoTokenizer  # the modeling code is imported only for non-BERT models

import data
from data import InputError, background

SETTINGS = "biencoder.json"
DEFAULTS = dict(pooling="cls", normalize=True, query_prefix="", doc_prefix="", query_max_len=512, passage_max_len=512)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

def setup(name="auto"):
    """This process's device and, under torchrun, its process group -> (device, rank, world).
    "cuda" is this rank's GPU (LOCAL_RANK); the backend follows the device: NCCL for cuda, gloo for cpu."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise InputError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: no GPU is visible to PyTorch; use --device cpu")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if device.index is None else device.index)
        torch.cuda.set_device(device)  # so that RNG states, allocations and NCCL all use this GPU
    if "RANK" not in os.environ:
        return device, 0, 1
    if not dist.is_initialized():  # a generous timeout: rank 0 saving a large checkpoint keeps the others waiting
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=2),
                                device_id=device if device.type == "cuda" else None)
    return device, dist.get_rank(), dist.get_world_size()

def read_settings(path):
    """Bi-encoder settings of a folder: our biencoder.json, else its sentence-transformers files, else DEFAULTS."""
    file = lambda name: os.path.join(path, name)
    if os.path.isfile(file(SETTINGS)):
        return {**DEFAULTS, **data.read_json(file(SETTINGS))}
    s, modules = dict(DEFAULTS), data.read_json(file("modules.json")) if os.path.isfile(file("modules.json")) else []
    s["normalize"] = any(m["type"].endswith("Normalize") for m in modules) if modules else s["normalize"]
    for m in modules:
        if m["type"].endswith("Pooling"):
            pool = data.read_json(os.path.join(path, m["path"], "config.json"))
            s["pooling"] = ("mean" if pool.get("pooling_mode_mean_tokens") else
                            "last" if pool.get("pooling_mode_lasttoken") else "cls")
    if os.path.isfile(file("sentence_bert_config.json")):
        s["query_max_len"] = s["passage_max_len"] = data.read_json(file("sentence_bert_config.json"))["max_seq_length"]
    if os.path.isfile(file("config_sentence_transformers.json")):
        prompts = data.read_json(file("config_sentence_transformers.json")).get("prompts") or {}
        s["query_prefix"], s["doc_prefix"] = prompts.get("query", ""), prompts.get("document", "")
    return s

# ------------------------------------------------------------------------------------------------ BERT

# Our parameter names -> transformers' BertModel names (a layer's after "encoder.layer.N."); q, k and v are one
# matrix here, three stacked there.
HF_NAMES = {"word": "embeddings.word_embeddings", "position": "embeddings.position_embeddings",
            "token_type": "embeddings.token_type_embeddings", "norm": "embeddings.LayerNorm",
            "qkv": ("attention.self.query", "attention.self.key", "attention.self.value"),
            "attn_out": "attention.output.dense", "norm1": "attention.output.LayerNorm",
            "up": "intermediate.dense", "down": "output.dense", "norm2": "output.LayerNorm"}

def hf_names(name):
    """"layers.3.qkv.weight" -> ["encoder.layer.3.attention.self.query.weight", ... key, value]."""
    *layer, module, param = name.split(".")
    theirs = HF_NAMES[module]
    return [f"{'encoder.layer.' + layer[1] + '.' if layer else ''}{t}.{param}"
            for t in ((theirs,) if isinstance(theirs, str) else theirs)]


class Bert(nn.Module):
    """BERT's encoder: token + position (+ segment 0) embeddings, then per layer self-attention and an MLP, each
    added to its input and layer-normalised after (post-norm). Dropout as in BERT's pretraining: on the
    embeddings, on the attention probabilities (inside SDPA) and on each block's output."""

    def __init__(self, config):
        super().__init__()
        d, eps, self.config = config.hidden_size, config.layer_norm_eps, config
        self.word = nn.Embedding(config.vocab_size, d)
        self.position = nn.Embedding(config.max_position_embeddings, d)
        self.token_type = nn.Embedding(config.type_vocab_size, d)
        self.norm = nn.LayerNorm(d, eps=eps)
        self.layers = nn.ModuleList(nn.ModuleDict(dict(
            qkv=nn.Linear(d, 3 * d), attn_out=nn.Linear(d, d), norm1=nn.LayerNorm(d, eps=eps),
            up=nn.Linear(d, config.intermediate_size), down=nn.Linear(config.intermediate_size, d),
            norm2=nn.LayerNorm(d, eps=eps))) for _ in range(config.num_hidden_layers))
        self.unused = {}  # checkpoint tensors the encoder does not use (BERT's pooler): saved back unchanged

    def forward(self, input_ids, attention_mask=None):
        """(B, L) token ids and padding mask (1 = real token; None = no padding) -> hidden states (B, L, d)."""
        (B, L), heads = input_ids.shape, self.config.num_attention_heads
        p_hidden = self.config.hidden_dropout_prob if self.training else 0.0
        p_attn = self.config.attention_probs_dropout_prob if self.training else 0.0
        x = self.word(input_ids) + self.position.weight[:L] + self.token_type.weight[0]  # (B, L, d)
        x = F.dropout(self.norm(x), p_hidden, self.training)
        # (B, 1, 1, L), broadcast over heads and query positions: every token attends to the real tokens only
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        for layer in self.layers:
            q, k, v = layer.qkv(x).view(B, L, 3, heads, -1).permute(2, 0, 3, 1, 4)  # each (B, heads, L, d/heads)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p_attn)
            a = a.transpose(1, 2).reshape(B, L, -1)  # heads side by side again: (B, L, d)
            x = layer.norm1(x + F.dropout(layer.attn_out(a), p_hidden, self.training))
            x = layer.norm2(x + F.dropout(layer.down(F.gelu(layer.up(x))), p_hidden, self.training))
        return x

    @staticmethod
    def load(path, config):
        """Our Bert with the weights of path/model.safetensors, or None where it cannot run the checkpoint."""
        file = os.path.join(path, "model.safetensors")
        if not (config.model_type == "bert" and config.hidden_act == "gelu" and not config.is_decoder
                and getattr(config, "position_embedding_type", "absolute") == "absolute" and os.path.isfile(file)):
            return None
        model = Bert(config)
        try:
            hf = {k.removeprefix("bert."): v for k, v in load_file(file).items()}  # BertFor*: "bert." prefixes
            model.load_state_dict({k: torch.cat([hf.pop(n) for n in hf_names(k)]) for k in model.state_dict()})
        except Exception as e:  # a truncated file, a missing weight, a shape the config does not give
            raise InputError(f"{file}: not a complete BERT checkpoint of its config.json ({e})") from None
        model.unused = hf
        return model

    def save(self, path):
        """config.json and model.safetensors under transformers' names (q, k and v split apart again)."""
        self.config.architectures = ["BertModel"]
        self.config.save_pretrained(path)
        tensors = dict(self.unused)
        for name, param in self.state_dict().items():  # clone: safetensors refuses views of one storage
            tensors.update(zip(hf_names(name), (t.clone() for t in param.chunk(len(hf_names(name))))))
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})

def load_encoder(path, attention_dropout=None):
    """The transformer of a folder: our Bert where it can run it, else transformers' AutoModel with PyTorch's fused
    attention (SDPA). attention_dropout, if given, replaces the config's dropout on attention probabilities."""
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read config.json ({str(e).splitlines()[0]})") from None
    names = [n for n in ("attention_probs_dropout_prob", "attention_dropout") if hasattr(config, n)]
    if attention_dropout is not None and not names:
        raise InputError(f"--attention_dropout: the config of {path} has no attention dropout setting")
    for name in names if attention_dropout is not None else []:
        setattr(config, name, attention_dropout)
    model = Bert.load(path, config)
    if model is None:
        from transformers import AutoModel  # imported here only: a heavy import that a BERT never needs
        model = AutoModel.from_pretrained(path, config=config, attn_implementation="sdpa")
    return model

# ------------------------------------------------------------------------------------------------ bi-encoder

class BiEncoder(nn.Module):
    def __init__(self, path, attention_dropout=None, **overrides):
        super().__init__()
        if not os.path.isdir(path):
            raise InputError(f"--model {path}: not a folder (nothing is downloaded; give a local Hugging Face folder)")
        self.settings = {**read_settings(path), **{k: v for k, v in overrides.items() if v is not None}}
        if self.settings["pooling"] not in ("cls", "mean", "last"):
            raise InputError(f"unknown pooling {self.settings['pooling']!r}; choose cls, mean or last")
        self.encoder = load_encoder(path, attention_dropout)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise InputError(f"{path}: cannot load its tokenizer ({str(e).splitlines()[0]})") from None
        if self.tokenizer.pad_token is None:  # decoder models (last-token pooling) often have none
            self.tokenizer.pad_token = self.tokenizer.eos_token
        positions = getattr(self.encoder.config, "max_position_embeddings", float("inf"))
        for key in ("query_max_len", "passage_max_len"):
            if self.settings[key] > positions:
                raise InputError(f"--{key} {self.settings[key]}: {path} has {positions} positions")

    @property
    def dim(self):
        return self.encoder.config.hidden_size

    def tokenize(self, texts, kind, padding=True):
        """Prefix and tokenize texts ("query" or "doc"), truncated to their max length: (B, L) tensors padded to
        the longest, or with padding=False lists of ids (to sort by length and pad later with tokenizer.pad)."""
        prefix, max_len = (self.settings[k] for k in (("query_prefix", "query_max_len") if kind == "query" else
                                                      ("doc_prefix", "passage_max_len")))
        return self.tokenizer([prefix + t for t in texts], padding=padding, truncation=True, max_length=max_len,
                              return_tensors="pt" if padding else None, return_token_type_ids=False)

    def forward(self, batch, kind):
        """batch: the tokenizer's input_ids and attention_mask (B, L), best still on the CPU -> embeddings (B, D)."""
        device = next(self.parameters()).device
        padded = not bool(batch["attention_mask"].all())  # decided on the CPU: no wait for the GPU
        ids, mask = (batch[k].to(device, non_blocking=True) for k in ("input_ids", "attention_mask"))  # (B, L)
        hidden = self.encoder(input_ids=ids, attention_mask=mask if padded else None)  # (B, L, H)
        hidden = hidden if torch.is_tensor(hidden) else hidden.last_hidden_state
        if self.settings["pooling"] == "cls":
            emb = hidden[:, 0]
        elif self.settings["pooling"] == "mean":
            m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
            emb = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
        else:  # "last": the last real token; with left padding that is always position -1
            last = torch.full_like(mask[:, 0], mask.shape[1] - 1) if bool(mask[:, -1].all()) else mask.sum(1) - 1
            emb = hidden[torch.arange(hidden.shape[0], device=device), last]
        return F.normalize(emb.float(), dim=-1) if self.settings["normalize"] else emb  # in float32, even in bf16

    @torch.inference_mode()
    def encode(self, texts, kind, batch_size=None, progress=None):
        """Embed texts ("query" or "doc") -> float32 numpy (len(texts), D) in their order. Sorted by length so each
        batch pads only to its own longest text (longest first: an out-of-memory shows at once); the next batch is
        padded in a background thread while the device works; the vectors stay on the device until the end.
        progress: a tqdm bar to advance, or the description of a bar of its own."""
        device = next(self.parameters()).device
        bar = tqdm(total=len(texts), desc=progress, unit=kind, mininterval=2) if isinstance(progress, str) else progress
        batch_size = batch_size or (256 if device.type == "cuda" else 32)
        tokens = self.tokenize(texts, kind, padding=False)["input_ids"]
        order = np.argsort([-len(t) for t in tokens], kind="stable")
        out = torch.empty(len(texts), self.dim, dtype=torch.float32, device=device)

        def pad(idx):  # runs in the background thread; pinned memory lets the copy to a GPU run asynchronously
            batch = self.tokenizer.pad({"input_ids": [tokens[j] for j in idx]}, return_tensors="pt")
            return idx, {k: v.pin_memory() if device.type == "cuda" else v for k, v in batch.items()}
        for idx, batch in background(pad(order[i:i + batch_size]) for i in range(0, len(order), batch_size)):
            out[torch.from_numpy(idx).to(device)] = self(batch, kind).float()
            if bar is not None:
                bar.update(len(idx))
        if bar is not progress:
            bar.close()
        return out.cpu().numpy()

    def save(self, path):
        """Hugging Face weights + tokenizer, biencoder.json, and the sentence-transformers files, so that
        SentenceTransformer(path) gives the same document vectors (queries: prompt_name="query")."""
        self.encoder.save(path) if isinstance(self.encoder, Bert) else self.encoder.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        s = self.settings
        modules = [("Transformer", ""), ("Pooling", "1_Pooling")] + [("Normalize", "2_Normalize")] * s["normalize"]
        pooling = {f"pooling_mode_{m}": s["pooling"] == p for m, p in (("cls_token", "cls"), ("mean_tokens", "mean"),
                                                                       ("lasttoken", "last"))}
        for name, obj in {SETTINGS: s, "sentence_bert_config.json": {"max_seq_length": s["passage_max_len"]},
                          "modules.json": [{"idx": i, "name": str(i), "path": p, "type": f"sentence_transformers."
                                            f"models.{t}"} for i, (t, p) in enumerate(modules)],
                          "1_Pooling/config.json": {"word_embedding_dimension": self.dim, **pooling},
                          "config_sentence_transformers.json": {"prompts": {"query": s["query_prefix"], "document":
                                                                s["doc_prefix"]}, "similarity_fn_name": "cosine"}
                          }.items():
            os.makedirs(os.path.dirname(os.path.join(path, name)), exist_ok=True)
            with open(os.path.join(path, name), "w") as f:
                json.dump(obj, f, indent=2)

def for_inference(path, device, dtype, **overrides):
    """A BiEncoder to embed with: weights in dtype (no float32 master copy is needed without an optimizer, and
    casting once beats autocast re-casting every forward), on the device, in eval mode."""
    return BiEncoder(path, **overrides).to(device, DTYPES[dtype]).eval()

def load_teacher(path, device, dtype):
    """A teacher's score(queries, texts, batch_size) -> one float a (query, text) pair: a cross-encoder (a
    sequence-classification folder with one label) gives its logit of the pair, a bi-encoder the cosine of the
    two embeddings (each distinct text embedded once)."""
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise InputError(f"--teacher {path}: cannot read config.json ({str(e).splitlines()[0]})") from None
    if config.num_labels == 1 and any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
        from transformers import AutoModelForSequenceClassification
        model = AutoModelForSequenceClassification.from_pretrained(path).to(device, DTYPES[dtype]).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)

        @torch.inference_mode()
        def cross_encoder(queries, texts, batch_size=None):
            out, batch_size = [], batch_size or 32
            for i in tqdm(range(0, len(texts), batch_size), desc="teacher", unit="batch", mininterval=2,
                          disable=len(texts) <= batch_size):  # no bar for a single batch (mine.py's top-ups)
                batch = tokenizer(queries[i:i + batch_size], texts[i:i + batch_size], padding=True, truncation=True,
                                  return_tensors="pt").to(device)
                out += model(**batch).logits[:, 0].float().tolist()
            return out
        return cross_encoder
    model = for_inference(path, device, dtype)

    def bi_encoder(queries, texts, batch_size=None):
        rows = [{t: n for n, t in enumerate(dict.fromkeys(x))} for x in (queries, texts)]  # text -> its row
        q, d = (F.normalize(torch.from_numpy(model.encode(list(r), kind, batch_size)), dim=-1)
                for r, kind in zip(rows, ("query", "doc")))
        return (q[[rows[0][t] for t in queries]] * d[[rows[1][t] for t in texts]]).sum(1).tolist()
    return bi_encoder
