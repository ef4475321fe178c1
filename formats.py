"""The folders a model is read from and written to: ours (biencoder.json beside the Hugging Face
files), Hugging Face's, sentence-transformers' (its 5.x and 6.x layouts) and peft's adapters.

Settings that must match between training and inference (pooling, normalize, prefixes, max lengths,
separate towers) travel in `biencoder.json` inside the saved folder. A plain Hugging Face folder
gets them from its sentence-transformers files when it has them (all-MiniLM-L6-v2: mean pooling,
normalize, 256 tokens), else from DEFAULTS (BGE's: the CLS token, normalized). Those files are read
whole: the Transformer or a Router of two towers, Pooling in any one of its modes with or without
the instruction's tokens, a Dense layer (trained with the rest), Normalize and the query and
document prompts; a module or option we cannot run is refused, never ignored. What we save is read
back by sentence-transformers with the same vectors.
"""
import atexit
import json
import os
import shutil
import tempfile

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoTokenizer

import data
from cli import InputError

# --------------------------------------------------------------------------------- Hugging Face

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
    st_files = os.path.isfile(os.path.join(path, "modules.json"))
    if os.path.isfile(os.path.join(path, SETTINGS)):
        ours = {**defaults, **data.read_json(os.path.join(path, SETTINGS))}
        if st_files:  # saved by us; then perhaps saved again by sentence-transformers
            check_same(path, ours, read_st_settings(path, defaults))
        return ours
    if st_files:
        return read_st_settings(path, defaults)
    return dict(defaults)

def check_same(path, ours, theirs):
    """biencoder.json and the sentence-transformers files of one folder must say the same: where a
    folder we saved was saved again by sentence-transformers (another prompt, another length), the
    two would give other vectors, and neither can be taken over the other in silence."""
    keys = ["pooling", "normalize", "query_prefix", "doc_prefix", "passage_max_len", "pool_prompt",
            "separate_towers"]
    if ours["separate_towers"]:  # each tower's max_seq_length is its own length
        keys.append("query_max_len")
    differ = [key for key in keys if ours[key] != theirs[key]]
    if (ours["dense"] is None) != (theirs["dense"] is None):
        differ.append("dense")
    if differ:
        key = differ[0]
        raise InputError(f"{path}: its {SETTINGS} says {key} {ours.get(key)!r}, its "
                         f"sentence-transformers files {theirs.get(key)!r} (saved again by another "
                         f"program?); remove the stale one: {SETTINGS}, or modules.json and the "
                         f"files it names")

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
    if not os.path.isfile(os.path.join(folder, "config.json")):  # sentence-transformers needs it
        raise InputError(f"{folder}: a Pooling module without its config.json")
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

# ------------------------------------------------------------------------------------- writing

def write_settings(path, settings, hidden_size, dense=None):
    """biencoder.json and the sentence-transformers files of a model saved in path (its towers'
    Hugging Face folders written already): modules.json, the Pooling config, the Dense (its config
    and weights, from the nn.Linear dense) where there is one, Normalize, the prompts, and a Router
    over path/query and path/document for separate towers. The config files are those its 5.x and
    6.x series both read."""
    s = dict(settings)
    if not s["separate_towers"]:
        write(path, "sentence_bert_config.json", {"max_seq_length": s["passage_max_len"]})
        first = {"type": "sentence_transformers.models.Transformer"}
    else:
        for kind, max_len in (("query", s["query_max_len"]), ("doc", s["passage_max_len"])):
            write(path, f"{TOWERS[kind]}/sentence_bert_config.json", {"max_seq_length": max_len})
        transformer = "sentence_transformers.models.Transformer"
        write(path, "router_config.json", {
            "types": {"query": transformer, "document": transformer},
            "structure": {"query": ["query"], "document": ["document"]},
            "parameters": {"default_route": "document", "allow_empty_key": True},
        })
        first = {"type": "sentence_transformers.models.Router"}
    modules = [first, {"type": "sentence_transformers.models.Pooling"}]
    if dense is not None:
        modules.append({"type": "sentence_transformers.models.Dense"})
    if s["normalize"]:
        modules.append({"type": "sentence_transformers.models.Normalize"})
    for i, module in enumerate(modules):
        # the Transformer (or Router) in the folder itself, then 1_Pooling, 2_Dense, ...
        folder = f"{i}_{st_class(module['type'])}" if i else ""
        module.update(idx=i, name=str(i), path=folder)
    write(path, "modules.json", modules)
    write(path, "1_Pooling/config.json", {
        "word_embedding_dimension": hidden_size,
        **{key: ST_POOLING[mode] == s["pooling"] for key, mode in ST_POOLING_KEYS.items()},
        "include_prompt": bool(s["pool_prompt"]),
    })
    if dense is not None:
        folder = modules[2]["path"]
        s["dense"] = {**s["dense"], "path": folder}
        write(path, f"{folder}/config.json", {k: v for k, v in s["dense"].items() if k != "path"})
        weights = {f"linear.{k}": v.detach().cpu().contiguous()
                   for k, v in dense.state_dict().items()}
        save_file(weights, os.path.join(path, folder, "model.safetensors"),
                  metadata={"format": "pt"})
    write(path, "config_sentence_transformers.json", {
        "prompts": {"query": s["query_prefix"], "document": s["doc_prefix"]},
        "similarity_fn_name": "cosine",
    })
    write(path, SETTINGS, s)

def save_tokenizer(tokenizer, path, append_eos):
    """The tokenizer's files; when it appends an end-of-sequence token, written so that it still
    does when loaded again (some tokenizer classes rebuild their post-processing when loaded:
    those are saved as the generic fast tokenizer, which reads tokenizer.json as it is)."""
    tokenizer.save_pretrained(path)
    if not append_eos or ends_with_eos(AutoTokenizer.from_pretrained(path)):
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
