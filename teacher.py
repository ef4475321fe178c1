"""A teacher's score of (query, text) pairs, for score.py (distillation data) and mine.py
(its margin): a cross-encoder gives its logit of the pair, a bi-encoder the cosine of the two
embeddings."""
import os

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoConfig, AutoTokenizer

from cli import InputError
from model import DTYPES, for_inference

def load_teacher(path, device, dtype):
    """The teacher in folder path -> score(queries, texts, batch_size=None): one float a
    (query, text) pair. A sequence-classification folder with one label is a cross-encoder; any
    other folder a bi-encoder, with its own pooling, prefixes and lengths."""
    if not os.path.isdir(path):
        raise InputError(f"--teacher {path}: not a folder (nothing is downloaded)")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise InputError(f"--teacher {path}: cannot read config.json "
                         f"({str(e).splitlines()[0]})") from None
    architectures = config.architectures or []
    classifier = any(a.endswith("ForSequenceClassification") for a in architectures)
    if classifier and config.num_labels != 1:  # e.g. a 2-label entailment classifier
        raise InputError(f"--teacher {path}: a classifier with {config.num_labels} labels; a "
                         f"teacher gives one score a pair (a cross-encoder with num_labels 1)")
    if classifier:
        return cross_encoder(path, device, dtype)
    return bi_encoder(path, device, dtype)

def cross_encoder(path, device, dtype):
    from transformers import AutoModelForSequenceClassification
    model = (AutoModelForSequenceClassification.from_pretrained(path)
             .to(device, DTYPES[dtype]).eval())
    tokenizer = AutoTokenizer.from_pretrained(path)

    @torch.inference_mode()
    def score(queries, texts, batch_size=None):
        batch_size = batch_size or 32
        out = []
        single = len(texts) <= batch_size  # no bar for a single batch (mine.py's top-ups)
        for i in tqdm(range(0, len(texts), batch_size), desc="teacher", unit="batch", mininterval=2,
                      disable=single):
            pairs = tokenizer(queries[i:i + batch_size], texts[i:i + batch_size], padding=True,
                              truncation=True, return_tensors="pt").to(device)
            out += model(**pairs).logits[:, 0].float().tolist()
        return out
    return score

def bi_encoder(path, device, dtype):
    model = for_inference(path, device, dtype)

    def score(queries, texts, batch_size=None):
        unique_queries = list(dict.fromkeys(queries))  # each distinct text embedded once
        unique_texts = list(dict.fromkeys(texts))
        q = F.normalize(torch.from_numpy(model.encode(unique_queries, "query", batch_size)), dim=-1)
        d = F.normalize(torch.from_numpy(model.encode(unique_texts, "doc", batch_size)), dim=-1)
        q_row = {text: n for n, text in enumerate(unique_queries)}
        d_row = {text: n for n, text in enumerate(unique_texts)}
        q = q[[q_row[t] for t in queries]]  # (pairs, D)
        d = d[[d_row[t] for t in texts]]
        return (q * d).sum(1).tolist()
    return score
