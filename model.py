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
import atexit
import json
import os
import shutil
import tempfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm
# the modeling code is imported only for non-BERT models
from transformers import AutoConfig, AutoTokenizer

import data
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

def read_config(path):
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read config.json ({str(e).splitlines()[0]})") from None

# Decoder LLMs that embed with their last token (bge-en-icl, e5-mistral, gte-Qwen); any *ForCausalLM
# too.
DECODERS = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma",
            "gemma2", "gemma3_text", "phi3", "olmo2"}

def is_decoder(config):
    causal = any(a.endswith("ForCausalLM") for a in config.architectures or [])
    return config.model_type in DECODERS or causal

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
        if not names:
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

def with_adapter_merged(path):
    """A peft adapter folder -> a temporary Hugging Face folder: its base model with the adapter
    merged in, the base's tokenizer, and the bi-encoder settings of the checkpoint the adapter sits
    in (or of the base), so that every stage takes an adapter as --model."""
    from peft import PeftModel
    from transformers import AutoModel
    base = data.read_json(os.path.join(path, "adapter_config.json"))["base_model_name_or_path"]
    if not os.path.isdir(base or ""):
        raise InputError(f"{path}: its base model {base!r} is not a folder here")
    folder = tempfile.mkdtemp(prefix="adapter_merged_")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(base), path).merge_and_unload()
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    parent = os.path.dirname(os.path.abspath(path))
    source = parent if os.path.isfile(os.path.join(parent, SETTINGS)) else base
    settings = read_settings(source, is_decoder(read_config(base)))
    if settings["dense"] is not None:  # no part of the adapter: the checkpoint's (or base's) own
        dense = settings["dense"]["path"]
        shutil.copytree(os.path.join(source, dense), os.path.join(folder, dense))
    write(folder, SETTINGS, settings)
    return folder

# ----------------------------------------------------------------------------------------- settings

SETTINGS = "biencoder.json"
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")
DEFAULTS = {
    "pooling": "cls",
    "normalize": True,
    "query_prefix": "",
    "doc_prefix": "",
    "query_max_len": 512,
    "passage_max_len": 512,
    "separate_towers": False,
    "append_eos": False,
    "pool_prompt": True,  # False: pooling leaves out each text's instruction tokens
    "dense": None,  # sentence-transformers' Dense module after pooling, where the model has one
}
# A decoder left to the defaults gets FlagEmbedding's decoder_only settings: its last token (an
# end-of-sequence token appended to every text, as tevatron's append_eos_token), normalised, and an
# instruction before each query (bge-en-icl's; e5-mistral's is "Instruct: {task}\nQuery: ").
DECODER_DEFAULTS = {
    **DEFAULTS,
    "pooling": "last",
    "append_eos": True,
    "query_prefix": ("<instruct>Given a query, retrieve passages that are relevant to the query.\n"
                     "<query>"),
}
# With separate towers a checkpoint holds two Hugging Face folders, one a tower;
# sentence-transformers routes queries and documents to them (its Router module).
TOWERS = {"query": "query", "doc": "document"}
POOLINGS = ("cls", "mean", "last", "max", "mean_sqrt_len_tokens", "weightedmean")
# sentence-transformers' Pooling modes -> ours, and the one boolean a mode of its 5.x config files
# (6.x reads them too, and writes "pooling_mode": a name, or a list of names to concatenate)
ST_POOLING = {
    "cls": "cls",
    "mean": "mean",
    "max": "max",
    "lasttoken": "last",
    "mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "weightedmean": "weightedmean",
}
ST_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
# The sentence-transformers modules we run, in this order (a Router stands for the Transformer:
# one tower a kind); Dense and Normalize are optional.
ST_MODULES = ("Transformer", "Pooling", "Dense", "Normalize")
# A Transformer's options (sentence_bert_config.json, 5.x and 6.x) that leave its vectors as our
# Bert or AutoModel gives them; any other option is refused rather than ignored.
ST_TRANSFORMER_DEFAULTS = {
    "transformer_task": "feature-extraction",
    "modality_config": {"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
    "module_output_name": "token_embeddings",
    "query_expansion": None,
    "processing_kwargs": {},
    "tokenizer_args": {},
    "processor_kwargs": {},
}
# options that only say how to load the weights (dtype, attention kernel) or how to batch
ST_TRANSFORMER_LOADING = {
    "model_args",
    "model_kwargs",
    "config_args",
    "config_kwargs",
    "unpad_inputs",
    "cache_dir",
    "backend",
}
# before sentence_bert_config.json, sentence-transformers named the file after the architecture
ST_TRANSFORMER_FILES = (
    "sentence_bert_config.json",
    "sentence_roberta_config.json",
    "sentence_distilbert_config.json",
    "sentence_camembert_config.json",
    "sentence_albert_config.json",
    "sentence_xlm-roberta_config.json",
    "sentence_xlnet_config.json",
)
ST_DENSE_DEFAULTS = {"bias": True, "activation_function": "torch.nn.modules.activation.Tanh"}

def read_settings(path, decoder=False):
    """Bi-encoder settings of a folder: our biencoder.json, else its sentence-transformers files
    (modules.json and the modules' configs), else DEFAULTS (DECODER_DEFAULTS for a decoder)."""
    defaults = DECODER_DEFAULTS if decoder else DEFAULTS
    if os.path.isfile(os.path.join(path, SETTINGS)):
        return {**defaults, **data.read_json(os.path.join(path, SETTINGS))}
    if os.path.isfile(os.path.join(path, "modules.json")):
        return read_st_settings(path, defaults)
    return dict(defaults)

def st_class(module_type):
    """A modules.json type -> the class name of a sentence-transformers module ("Pooling" for
    "sentence_transformers.models.Pooling" (5.x) or for
    "sentence_transformers.sentence_transformer.modules.pooling.Pooling" (6.x)), or the type whole
    for a module of another package."""
    if module_type.startswith("sentence_transformers."):
        return module_type.rsplit(".", 1)[-1]
    return module_type

def read_st_settings(path, defaults):
    """Settings from a sentence-transformers folder of its 5.x or 6.x layout, so that our forward
    gives its vectors: the Transformer (or a Router with one Transformer for "query" and one for
    "document"), Pooling, an optional Dense and Normalize, and the prompts of encode_query and
    encode_document. A module, mode or option we cannot run is an InputError naming it."""
    settings = dict(defaults)
    settings["append_eos"] = False  # its tokenizer as saved: sentence-transformers adds nothing
    settings["normalize"] = False
    modules = data.read_json(os.path.join(path, "modules.json"))
    at = 0  # modules must come in ST_MODULES' order, each at most once
    for m in modules:
        name = st_class(m.get("type", "of no type"))
        kind = "Transformer" if name == "Router" else name
        if kind not in ST_MODULES[at:] or (at == 0 and kind != "Transformer"):
            raise InputError(f"{path}: its sentence-transformers module {name} "
                             f"({m.get('path') or 'the folder itself'}) cannot run here: we run "
                             f"Transformer, Pooling, Dense and Normalize, in that order")
        at = ST_MODULES.index(kind) + 1
        folder = os.path.join(path, m.get("path", ""))
        if name == "Router":
            towers = tower_folders(path)
            settings["separate_towers"] = True
            settings["query_max_len"] = st_max_len(towers["query"], "query")
            settings["passage_max_len"] = st_max_len(towers["doc"], "doc")
        elif name == "Transformer":
            if m.get("path"):
                raise InputError(f"{path}: its Transformer module is in {m['path']}/; we read the "
                                 f"transformer from the folder itself")
            settings["query_max_len"] = st_max_len(folder, "query")
            settings["passage_max_len"] = st_max_len(folder, "doc")
        elif name == "Pooling":
            settings["pooling"] = st_pooling(folder)
            settings["pool_prompt"] = bool(read_st_config(folder).get("include_prompt", True))
        elif name == "Dense":
            settings["dense"] = st_dense(folder, m["path"])
        else:
            normalized = read_st_config(folder).get("module_input_name", "sentence_embedding")
            if normalized != "sentence_embedding":
                raise InputError(f"{folder}: Normalize of {normalized!r}; we normalise the "
                                 f"sentence embedding only")
            settings["normalize"] = True
    if at < 2:
        raise InputError(f"{path}: no Pooling module after its Transformer in modules.json; we "
                         f"embed a text as one pooled vector")
    file = os.path.join(path, "config_sentence_transformers.json")
    config = data.read_json(file) if os.path.isfile(file) else {}
    if config.get("model_type", "SentenceTransformer") != "SentenceTransformer":
        raise InputError(f"{file}: a {config['model_type']}, not a SentenceTransformer "
                         f"(one dense vector a text)")
    # encode_query and encode_document (5.x and 6.x alike) prepend the "query" and "document"
    # prompts, or nothing: never default_prompt_name's (that is plain encode's) nor "passage"
    prompts = config.get("prompts") or {}
    settings["query_prefix"] = prompts.get("query") or ""
    settings["doc_prefix"] = prompts.get("document") or ""
    # Our search ranks by cosine. A dot product or a euclidean distance ranks unit vectors as the
    # cosine does, but not vectors of other lengths; manhattan distance never: such a model would
    # be searched otherwise than it was trained for, so it is refused.
    similarity = config.get("similarity_fn_name") or "cosine"
    as_cosine = similarity == "cosine" or (settings["normalize"] and similarity in ("dot",
                                                                                  "euclidean"))
    if not as_cosine:
        raise InputError(f"{file}: similarity_fn_name {similarity!r} with normalize "
                         f"{settings['normalize']} ranks documents otherwise than our cosine "
                         f"search")
    return settings

def read_st_config(folder, names=("config.json",)):
    """A sentence-transformers module's config: the first of the files names that is in folder,
    or {} (a module saved without one takes its defaults)."""
    for name in names:
        if os.path.isfile(os.path.join(folder, name)):
            return data.read_json(os.path.join(folder, name))
    return {}

def st_max_len(folder, kind):
    """The max length in tokens sentence-transformers gives texts of a kind ("query" or "doc") in
    the Transformer module saved in folder: 6.x's query_length or document_length, else its
    max_seq_length, else (6.x no longer writes it) the tokenizer's model_max_length capped at the
    model's max_position_embeddings, as its Transformer does. Options it would honour and we
    cannot are refused."""
    config = read_st_config(folder, ST_TRANSFORMER_FILES)
    for key, value in config.items():
        if key in ST_TRANSFORMER_LOADING or key in ("max_seq_length", "query_length",
                                                    "document_length", "do_lower_case"):
            continue
        if key not in ST_TRANSFORMER_DEFAULTS or value not in (ST_TRANSFORMER_DEFAULTS[key], None):
            raise InputError(f"{folder}: its sentence-transformers Transformer has {key} "
                             f"{value!r}, which we cannot honour")
    if config.get("do_lower_case"):
        # sentence-transformers lowercases in the tokenizer; fine where it lowercases already
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if tokenizer("Hello World")["input_ids"] != tokenizer("hello world")["input_ids"]:
            raise InputError(f"{folder}: do_lower_case true with a tokenizer that keeps case; "
                             f"we do not lowercase texts")
    per_kind = config.get("query_length" if kind == "query" else "document_length")
    if per_kind or config.get("max_seq_length"):
        return per_kind or config["max_seq_length"]
    limits = [read_st_config(folder, ("tokenizer_config.json",)).get("model_max_length"),
              read_st_config(folder).get("max_position_embeddings")]
    limits = [n for n in limits if isinstance(n, int) and n > 0]  # xlnet's -1: no limit
    return min(limits, default=DEFAULTS["passage_max_len"])

def st_pooling(folder):
    """Our pooling for a sentence-transformers Pooling config: one mode (6.x: "pooling_mode";
    5.x: one boolean a mode, mean where none is set); several modes at once are refused."""
    config = read_st_config(folder)
    modes = config.get("pooling_mode")
    if modes is None:
        modes = [mode for key, mode in ST_POOLING_KEYS.items() if config.get(key)] or ["mean"]
    if isinstance(modes, str):
        modes = [modes]
    if len(modes) != 1 or modes[0] not in ST_POOLING:
        raise InputError(f"{folder}: pooling mode {'+'.join(map(str, modes))}; we pool with one "
                         f"of {', '.join(ST_POOLING)}")
    return ST_POOLING[modes[0]]

def st_dense(folder, relative):
    """Our "dense" setting for a sentence-transformers Dense module (saved in folder, relative to
    the model folder): its config, with where its weights are."""
    config = read_st_config(folder)
    for key in ("module_input_name", "module_output_name"):
        if config.get(key, "sentence_embedding") != "sentence_embedding":
            raise InputError(f"{folder}: a Dense module with {key} {config[key]!r}; we project the "
                             f"sentence embedding only")
    if config.get("use_residual"):
        raise InputError(f"{folder}: a Dense module with use_residual true, which we do not run")
    if not {"in_features", "out_features"} <= config.keys():
        raise InputError(f"{folder}/config.json: a Dense module needs in_features and "
                         f"out_features")
    return {
        "path": relative,
        "in_features": config["in_features"],
        "out_features": config["out_features"],
        "bias": config.get("bias", ST_DENSE_DEFAULTS["bias"]),
        "activation_function": config.get("activation_function",
                                          ST_DENSE_DEFAULTS["activation_function"]),
    }

def tower_folders(path):
    """The folders of the query and document towers of a model with two ({"query": ..., "doc":
    ...}), or None for one tower: those sentence-transformers' router_config.json routes "query"
    and "document" to (path/query and path/document as we save them), each one Transformer."""
    file = os.path.join(path, "router_config.json")
    if not os.path.isfile(file):
        if os.path.isdir(os.path.join(path, TOWERS["query"])):  # a checkpoint of ours
            return {kind: os.path.join(path, name) for kind, name in TOWERS.items()}
        return None
    router = data.read_json(file)
    structure = router.get("structure") or {}
    types = router.get("types") or {}
    ours = (sorted(structure) == ["document", "query"]
            and all(len(route) == 1 and st_class(types.get(route[0], "")) == "Transformer"
                    for route in structure.values())
            and not (router.get("parameters") or {}).get("route_mappings"))
    if not ours:
        raise InputError(f"{file}: routes {structure}; we run one Transformer for \"query\" and "
                         f"one for \"document\"")
    return {kind: os.path.join(path, structure[name][0]) for kind, name in TOWERS.items()}

def load_dense(path, dense):
    """The Dense module of the model in path (the "dense" setting): its linear layer, with the
    weights of its folder (model.safetensors or pytorch_model.bin, as sentence-transformers saves
    them), and its activation function (a torch.nn module, built without arguments as
    sentence-transformers builds it)."""
    folder = os.path.join(path, dense["path"])
    name = dense["activation_function"]
    activation = getattr(nn, name.rsplit(".", 1)[-1], None) if name.startswith("torch.") else None
    if not (isinstance(activation, type) and issubclass(activation, nn.Module)):
        raise InputError(f"{folder}: Dense activation_function {name!r} is not a torch.nn module")
    linear = nn.Linear(dense["in_features"], dense["out_features"], bias=dense["bias"])
    files = [os.path.join(folder, n) for n in ("model.safetensors", "pytorch_model.bin")]
    if not any(os.path.isfile(f) for f in files):
        raise InputError(f"{folder}: no Dense weights in it (model.safetensors or "
                         f"pytorch_model.bin)")
    try:
        if os.path.isfile(files[0]):
            state = load_file(files[0])
        else:
            state = torch.load(files[1], map_location="cpu", weights_only=True)
        linear.load_state_dict({k.removeprefix("linear."): v for k, v in state.items()})
    # a truncated file, a missing weight, a shape its config does not give
    except Exception as e:
        raise InputError(f"{folder}: not the weights of its Dense config ({e})") from None
    return linear, activation()

# --------------------------------------------------------------------------------------- bi-encoder

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
        # a LoRA adapter (e.g. a checkpoint's model/adapter): its base with the adapter merged in
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            path = with_adapter_merged(path)
        # a checkpoint with two towers holds a Hugging Face folder for each
        towers = tower_folders(path)
        has_towers = towers is not None
        doc_path = towers["doc"] if has_towers else path
        query_path = towers["query"] if has_towers else path
        config = read_config(doc_path)
        self.decoder = is_decoder(config)
        self.settings = read_settings(path, self.decoder)
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
        if not any(os.path.isfile(os.path.join(doc_path, name)) for name in TOKENIZER_FILES):
            # transformers would build a vocabulary of its special tokens alone, without a word
            raise InputError(f"{path}: no tokenizer files in it (tokenizer.json, vocab.txt, ...)")
        # documents, and queries when shared
        self.encoder = load_encoder(doc_path, config, attention_dropout)
        self.query_encoder = None
        if self.settings["separate_towers"]:
            query_config = read_config(query_path)
            self.query_encoder = load_encoder(query_path, query_config, attention_dropout)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(doc_path)
        except (OSError, ValueError) as e:
            raise InputError(f"{path}: cannot load its tokenizer "
                             f"({str(e).splitlines()[0]})") from None
        if self.tokenizer.pad_token is None:  # decoder models (last-token pooling) often have none
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.settings["append_eos"]:
            end_with_eos(self.tokenizer, path)
        self.check_room(path)
        self.prompt_lengths = {}  # instruction -> its tokens (prompt_length)
        # sentence-transformers' Dense after pooling, where the model has one: (B, H) -> (B, D)
        self.dense = None
        self.dense_activation = None
        if self.settings["dense"] is not None:
            self.dense, self.dense_activation = load_dense(path, self.settings["dense"])
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
        """Hugging Face weights and tokenizer, biencoder.json, and the sentence-transformers files,
        so that SentenceTransformer(path) gives the same vectors: encode_document (or plain encode)
        for documents, encode_query (or prompt_name="query") for queries. With separate towers each
        tower is a Hugging Face folder of its own (path/query, path/document), routed by
        sentence-transformers' Router. A Dense goes to path/2_Dense in its format (config.json,
        model.safetensors); the config files are those its 5.x and 6.x series both read."""
        s = dict(self.settings)
        if self.query_encoder is None:
            save_encoder(self.encoder, path, self.sources["doc"])
            self.save_tokenizer(path)
            write(path, "sentence_bert_config.json", {"max_seq_length": s["passage_max_len"]})
            first = {"type": "sentence_transformers.models.Transformer"}
        else:
            towers = ((self.query_encoder, "query", s["query_max_len"]),
                      (self.encoder, "doc", s["passage_max_len"]))
            for encoder, kind, max_len in towers:
                name = TOWERS[kind]
                save_encoder(encoder, os.path.join(path, name), self.sources[kind])
                self.save_tokenizer(os.path.join(path, name))
                write(path, f"{name}/sentence_bert_config.json", {"max_seq_length": max_len})
            transformer = "sentence_transformers.models.Transformer"
            write(path, "router_config.json", {
                "types": {"query": transformer, "document": transformer},
                "structure": {"query": ["query"], "document": ["document"]},
                "parameters": {"default_route": "document", "allow_empty_key": True},
            })
            first = {"type": "sentence_transformers.models.Router"}
        modules = [first, {"type": "sentence_transformers.models.Pooling"}]
        if self.dense is not None:
            modules.append({"type": "sentence_transformers.models.Dense"})
        if s["normalize"]:
            modules.append({"type": "sentence_transformers.models.Normalize"})
        for i, module in enumerate(modules):
            # the Transformer (or Router) in the folder itself, then 1_Pooling, 2_Dense, ...
            folder = f"{i}_{st_class(module['type'])}" if i else ""
            module.update(idx=i, name=str(i), path=folder)
        write(path, "modules.json", modules)
        write(path, "1_Pooling/config.json", {
            "word_embedding_dimension": self.encoder.config.hidden_size,
            **{key: ST_POOLING[mode] == s["pooling"] for key, mode in ST_POOLING_KEYS.items()},
            "include_prompt": bool(s["pool_prompt"]),
        })
        if self.dense is not None:
            folder = modules[2]["path"]
            s["dense"] = {**s["dense"], "path": folder}
            write(path, f"{folder}/config.json", {k: v for k, v in s["dense"].items()
                                                  if k != "path"})
            weights = {f"linear.{k}": v.detach().cpu().contiguous()
                       for k, v in self.dense.state_dict().items()}
            save_file(weights, os.path.join(path, folder, "model.safetensors"),
                      metadata={"format": "pt"})
        write(path, "config_sentence_transformers.json", {
            "prompts": {"query": s["query_prefix"], "document": s["doc_prefix"]},
            "similarity_fn_name": "cosine",
        })
        write(path, SETTINGS, s)

    def save_tokenizer(self, path):
        """The tokenizer's files; when it appends an end-of-sequence token, written so that it still
        does when loaded again (some tokenizer classes rebuild their post-processing when loaded:
        those are saved as the generic fast tokenizer, which reads tokenizer.json as it is)."""
        self.tokenizer.save_pretrained(path)
        if not self.settings["append_eos"] or ends_with_eos(AutoTokenizer.from_pretrained(path)):
            return
        config_file = os.path.join(path, "tokenizer_config.json")
        config = data.read_json(config_file)
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        write(path, "tokenizer_config.json", config)
        reloaded = AutoTokenizer.from_pretrained(path)
        assert ends_with_eos(reloaded), f"{path}: the end-of-sequence token is lost on load"


def end_with_eos(tokenizer, path):
    """Make the tokenizer end every text with its end-of-sequence token, once (it may do so
    already), within the max length: last-token pooling embeds a decoder's text by its hidden state
    at that token (tevatron's append_eos_token). Done in the tokenizer's own post-processing, so
    that its saved files make sentence-transformers tokenize the same way."""
    if tokenizer.eos_token is None:
        raise InputError(f"{path}: its tokenizer has no end-of-sequence token to pool at; set "
                         f"pooling mean or cls, or give it an eos_token")
    if ends_with_eos(tokenizer):
        return
    if tokenizer.is_fast:
        from tokenizers import processors
        first = tokenizer("x")["input_ids"][0]
        bos = f"{tokenizer.bos_token} " if first == tokenizer.bos_token_id else ""
        special = [(tokenizer.eos_token, tokenizer.eos_token_id)]
        if bos:
            special.append((tokenizer.bos_token, tokenizer.bos_token_id))
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}$A {tokenizer.eos_token}",
            pair=f"{bos}$A {tokenizer.eos_token} $B {tokenizer.eos_token}", special_tokens=special)
    if not ends_with_eos(tokenizer):
        raise InputError(f"{path}: cannot make its tokenizer append {tokenizer.eos_token!r}")

def ends_with_eos(tokenizer):
    return tokenizer("x")["input_ids"][-1] == tokenizer.eos_token_id

def write(folder, name, obj):
    """folder/name as JSON, its folder made first (the model folder is swapped in whole, so no temp
    file)."""
    file = os.path.join(folder, name)
    os.makedirs(os.path.dirname(file), exist_ok=True)
    with open(file, "w") as f:
        json.dump(obj, f, indent=2)

# ---------------------------------------------------------------------------------------- inference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

def for_inference(path, device, dtype, **overrides):
    """A BiEncoder to embed with: weights in dtype (no float32 master copy is needed without an
    optimizer, and casting once beats autocast re-casting every forward), on the device, in eval
    mode."""
    return BiEncoder(path, **overrides).to(device, DTYPES[dtype]).eval()
