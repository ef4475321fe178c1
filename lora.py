"""LoRA (Hu et al. 2021) through peft: low-rank adapters W + (alpha / r) * B @ A on chosen linear
layers, the only weights that train; merged into the weights for a saved model, and saved apart in
peft's own format.

peft wraps each target nn.Linear in place (its weight becomes `<name>.base_layer.weight`, the
adapter `<name>.lora_A.default.weight` (r, in) and `<name>.lora_B.default.weight` (out, r)) and
freezes everything else, in our Bert as in transformers' models. B starts at zero, so training
starts from the model as it was.
"""
import json
import os

import torch
from safetensors.torch import save_file

from cli import InputError

# The layers adapted when --lora_targets is not given: attention and MLP projections, as
# FlagEmbedding's decoder_only and tevatron's LoRA training adapt them.
BERT_TARGETS = ["qkv", "attn_out", "up", "down"]
DECODER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

def add_adapters(encoder, rank, alpha, dropout, targets):
    """Wrap the target linear layers of encoder with LoRA adapters (in place); only they stay
    trainable."""
    from peft import LoraConfig, inject_adapter_in_model
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
    try:
        inject_adapter_in_model(config, encoder)
    except ValueError as e:  # no module of that name
        raise InputError(f"--lora_targets {' '.join(targets)}: {str(e).splitlines()[0]}") from None
    # merging and saving (merged_state_dict, save_adapter) know linear layers only: refused now,
    # not at the first save after hours of training
    for name, layer in adapters(encoder).items():
        if not isinstance(layer.get_base_layer(), torch.nn.Linear):
            kind = type(layer.get_base_layer()).__name__
            raise InputError(f"--lora_targets {' '.join(targets)}: {name} is not a linear layer "
                             f"({kind}); LoRA here adapts linear layers only (e.g. "
                             f"{' '.join(BERT_TARGETS)})")
    encoder.lora_config = config  # what save_adapter writes

def has_adapters(encoder):
    return hasattr(encoder, "lora_config")

def adapters(encoder):
    """{module name: its peft LoRA layer} of an encoder with adapters."""
    from peft.tuners.lora import LoraLayer
    return {name: m for name, m in encoder.named_modules() if isinstance(m, LoraLayer)}

def merged_state_dict(encoder):
    """The encoder's weights under their plain names, each adapter merged into its layer's weight (W
    + scaling * B @ A, computed in float32, stored in W's dtype). The model being trained is not
    touched: merging in place and back out would not give its weights back bit for bit."""
    deltas = {name: layer.get_delta_weight("default") for name, layer in adapters(encoder).items()}
    state = {}
    for key, value in encoder.state_dict().items():
        if ".lora_" in key:
            continue
        plain = key.replace(".base_layer.", ".")
        module = plain.rsplit(".", 1)[0]
        if key.endswith(".base_layer.weight"):
            value = (value.float() + deltas[module].float()).to(value.dtype)
        state[plain] = value
    return state

def save_adapter(encoder, path, base, hf_names=None):
    """The adapter alone, in peft's format (adapter_config.json + adapter_model.safetensors), so
    that PeftModel.from_pretrained(AutoModel.from_pretrained(base), path) gives the trained model.
    hf_names maps one of our module names to the transformers modules it stands for (our Bert's qkv
    is three of them: their adapters share A and each takes its third of B)."""
    tensors = {}
    targets = set()
    for name, layer in adapters(encoder).items():
        a = layer.lora_A["default"].weight
        b = layer.lora_B["default"].weight
        theirs = hf_names(name) if hf_names else [name]
        for their_name, b_part in zip(theirs, b.chunk(len(theirs))):
            key = f"base_model.model.{their_name}"
            tensors[f"{key}.lora_A.weight"] = a.detach().float().clone()
            tensors[f"{key}.lora_B.weight"] = b_part.detach().float().contiguous()
            targets.add(their_name)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    config = encoder.lora_config.to_dict()
    config.update(target_modules=sorted(targets), base_model_name_or_path=base, peft_type="LORA")
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2, default=list)  # target_modules may come back as a set

def frozen_to(encoder, dtype):
    """Hold the frozen base weights in dtype (bf16 halves a 7B model's memory) and the adapters in
    float32."""
    for name, param in encoder.named_parameters():
        param.data = param.data.to(torch.float32 if param.requires_grad else dtype)
