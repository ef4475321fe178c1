"""Evaluation while training: train.py scores the model on a dev set before the first step, every
--eval_every steps and after the last, exactly as evaluate.py --model would, and keeps the best so
far in out_dir/best/ (with best/eval.json)."""
import json
import math
import os
import shutil

import torch.distributed as dist
from tqdm import tqdm

import cli
import data
import retrieval
from model import for_inference

def load_eval_set(args):
    """The set to evaluate on while training, {"name", "corpus", "queries", "qrels"}, or None:
    --eval_dataset, else the dev split beside the --dataset whose qrels are the train data (an
    ir_datasets id such as beir/nfcorpus/train), if it has one."""
    ref = args.eval_dataset
    if ref is None and not args.train_data and not os.path.isdir(args.dataset):
        import ir_datasets
        dev = args.dataset.rsplit("/", 1)[0] + "/dev"
        if dev in ir_datasets.registry and dev != args.dataset:
            ref = dev
    if ref in (None, "none"):
        given = [flag for flag, value in (("--eval_queries", args.eval_queries),
                                          ("--eval_every", args.eval_every),
                                          ("--eval_split", args.eval_split),
                                          ("--eval_metric", args.eval_metric != "ndcg@10"))
                 if value]
        if given:
            raise cli.InputError(f"{given[0]} without an evaluation set: give --eval_dataset too")
        return None
    measures = retrieval.evaluate_run({"q": {"d": 1.0}}, {"q": {"d": 1}})[0]  # every measure's name
    if args.eval_metric not in measures:
        raise cli.InputError(f"--eval_metric {args.eval_metric}: not a measure; "
                             f"e.g. ndcg@10, recall@100, map")
    corpus, queries, qrels = data.load_dataset(ref, args.eval_split, "--eval_split")
    if args.eval_queries:
        qrels = {qid: qrels[qid] for qid in data.read_ids(args.eval_queries, qrels)}
    if not qrels:
        raise cli.InputError(f"--eval_dataset {ref}: no qrels to evaluate against")
    return {"name": ref, "corpus": corpus, "queries": queries, "qrels": qrels}

def evaluate(model, eval_set, step, args, dtype, log, rank, world):
    """Rank 0 saves the model to the run's temporary folder and scores it exactly as evaluate.py
    --model would (loaded from those files, weights in dtype; exact search, pytrec_eval), logs it,
    and keeps it as out_dir/best/ (with best/eval.json: its step and value; the best so far survives
    a resume) if it beats the best so far. The model being trained is not touched, nor its RNG; the
    other ranks wait."""
    if rank == 0:
        if step == 0:  # the encoding of a large dev corpus takes a while: say what it is
            tqdm.write(f"scoring the starting model on {eval_set['name']} "
                       f"({len(eval_set['qrels'])} queries, {len(eval_set['corpus'])} documents) "
                       f"before the first step; --eval_dataset none: no evaluation")
        best = os.path.join(args.out_dir, "best")
        tmp = os.path.join(cli.temp_folder(best), "best")
        shutil.rmtree(tmp, ignore_errors=True)
        with cli.disk_full_is_an_error(tmp):
            model.save(tmp)
        candidate = for_inference(tmp, next(model.parameters()).device, dtype)
        means = retrieval.evaluate_model(candidate, eval_set["corpus"], eval_set["queries"],
                                         eval_set["qrels"])[1]
        log.write(json.dumps({"step": step, "eval": means}) + "\n")
        log.flush()
        value = means[args.eval_metric]
        before = -math.inf
        if os.path.isfile(os.path.join(best, "eval.json")):
            before = data.read_json(os.path.join(best, "eval.json"))[args.eval_metric]
        if value > before:
            cli.write_json(os.path.join(tmp, "eval.json"), {"step": step, args.eval_metric: value})
            cli.swap_in(tmp, best)
        shutil.rmtree(tmp, ignore_errors=True)
        tqdm.write(f"eval step {step} | {args.eval_metric} {value:.4f} | "
                   f"best {max(value, before):.4f}")
    if world > 1:
        dist.barrier()
