"""Stage: checkpoints of one architecture -> their weighted average, as a checkpoint like any other.

    python merge.py --models runs/s0/model runs/s1/model runs/s2/model --out runs/soup  # a soup
    python merge.py --models runs/ft/model all-MiniLM-L6-v2/ --weights 0.7 0.3 --out runs/cocktail

Averaging the weights of models fine-tuned from one start (Wortsman et al. 2022, "model soups")
often beats each of them; averaging a fine-tuned model with the model it started from keeps part of
what the start knew (LM-Cocktail, FlagEmbedding's answer to forgetting). Every weight is sum_m w_m *
theta_m with the --weights normalised to sum to 1 (default: equal). The settings (pooling, prefixes,
lengths, towers) are the first model's; the models must agree on them, on their tokenizers (a word
must become the same ids in each: an embedding row means the same token only then), and on every
weight's name and shape.
"""
import torch

import cli
from model import BiEncoder

parser = cli.parser(__doc__, out=...)
parser.add_argument("--models", nargs="+", required=True,
                    help="The checkpoints (or Hugging Face folders) to average, two or more.")
parser.add_argument("--weights", nargs="+", type=cli.rate,
                    help="One weight a model, normalised to sum to 1. Default: equal weights.")

# settings a merged model cannot mix: its vectors mean something else if any differs
SAME_SETTINGS = (
    "pooling",
    "normalize",
    "query_prefix",
    "doc_prefix",
    "separate_towers",
    "append_eos",
    "pool_prompt",
)
# a text that shows lowercasing, accents, punctuation, digits, other scripts and the special tokens
# added around a text
PROBE = "Hello WORLD: naïve Café, 3.14 km/h -- Ünïcode 東京 résumé?!"

def tokenizer_facts(tokenizer):
    """What decides the ids a text becomes, by name: two tokenizers that agree on all of them
    tokenize alike."""
    return {
        "vocabulary": tokenizer.get_vocab(),
        "special tokens": tokenizer.special_tokens_map,
        "padding side": tokenizer.padding_side,
        "ids of a probe text": tokenizer(PROBE)["input_ids"],
    }

def dense_activation(settings):
    """The activation of the model's Dense, where it has one (the weights' shapes are checked
    apart)."""
    return (settings["dense"] or {}).get("activation_function")

def check(args):
    if len(args.models) < 2:
        raise cli.InputError("--models: give two or more checkpoints to average")
    if args.weights and len(args.weights) != len(args.models):
        raise cli.InputError(f"--weights: {len(args.weights)} weights for {len(args.models)} "
                             f"models")

def main(args):
    check(args)
    cli.check_folder(args.out, "merge.py")  # before any work: new, empty or a merge
    weights = args.weights or [1.0] * len(args.models)
    weights = [w / sum(weights) for w in weights]
    merged = BiEncoder(args.models[0])  # the result: the first model's settings and tokenizer
    first = merged.state_dict()
    first_tokenizer = tokenizer_facts(merged.tokenizer)
    total = {name: weights[0] * value.double() for name, value in first.items()}
    for path, weight in zip(args.models[1:], weights[1:]):
        model = BiEncoder(path)
        for key in SAME_SETTINGS:
            if model.settings[key] != merged.settings[key]:
                raise cli.InputError(f"{path}: {key} {model.settings[key]!r}, not "
                                     f"{merged.settings[key]!r} as in {args.models[0]}")
        if dense_activation(model.settings) != dense_activation(merged.settings):
            raise cli.InputError(f"{path}: Dense activation {dense_activation(model.settings)!r}, "
                                 f"not {dense_activation(merged.settings)!r} as in "
                                 f"{args.models[0]}")
        tokenizer = tokenizer_facts(model.tokenizer)
        differs = [fact for fact in tokenizer if tokenizer[fact] != first_tokenizer[fact]]
        if differs:
            raise cli.InputError(f"{path}: its tokenizer differs from that of {args.models[0]} "
                                 f"({', '.join(differs)}); models that give a word other ids "
                                 f"cannot be averaged")
        state = model.state_dict()
        if state.keys() != first.keys():
            other = sorted(state.keys() ^ first.keys())[0]
            raise cli.InputError(f"{path}: another architecture than {args.models[0]} (weight "
                                 f"{other!r} is in one of them only)")
        for name, value in state.items():
            if value.shape != first[name].shape:
                raise cli.InputError(f"{path}: {name} has shape {tuple(value.shape)}, not "
                                     f"{tuple(first[name].shape)} as in {args.models[0]}")
            total[name] += weight * value.double()
    with torch.no_grad():  # averaged in float64, stored in each weight's own dtype
        merged.load_state_dict({name: value.to(first[name].dtype) for name, value in total.items()})
    cli.write_folder(args.out, "merge.py", merged.save)  # written beside, then swapped in whole
    shares = ", ".join(f"{w:.3g} x {path}" for w, path in zip(weights, args.models))
    print(f"merged {shares} -> {args.out}")
    return merged

if __name__ == "__main__":
    cli.run(main, parser)
