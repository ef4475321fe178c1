"""Search through faiss (evaluate.py and mine.py --index): Flat ranks as exact search does, an IVF
index with every list probed is exact too, HNSW finds nearly all of the exact top 10, and what faiss
refuses is a one-line error."""
import numpy as np
import pytest

import cli
import evaluate
import mine
import retrieval
from conftest import scifact_subset

pytest.importorskip("faiss")


def random_unit(n, dim, seed):
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def vectors():
    """2000 random documents in two shards and 50 queries: random floats, so no two scores tie."""
    d = random_unit(2000, 32, 0)
    return random_unit(50, 32, 1), [d[:1200], d[1200:]]


def test_flat_and_fully_probed_ivf_equal_exact_search(vectors):
    q, shards = vectors
    exact_scores, exact_idx = retrieval.search(q, shards, 100)
    for factory, options in (("Flat", {}), ("IVF16,Flat", {"nprobe": 16})):
        scores, idx = retrieval.search(q, shards, 100, index=factory, **options)
        assert np.array_equal(idx, exact_idx), factory
        assert np.abs(scores - exact_scores).max() < 1e-5, factory


def test_hnsw_finds_nearly_all_of_the_exact_top_10(vectors):
    q, shards = vectors
    _, exact = retrieval.search(q, shards, 10)
    _, found = retrieval.search(q, shards, 10, index="HNSW32", ef_search=128)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, found)])
    assert recall >= 0.95, recall


def test_what_faiss_refuses_is_one_line(vectors):
    q, shards = vectors
    with pytest.raises(cli.InputError, match="--index 'Bogus': faiss refused it .*could not parse"):
        retrieval.search(q, shards, 10, index="Bogus")
    # 2000 documents for 4096 clusters
    with pytest.raises(cli.InputError, match="--index 'IVF4096,Flat': 4096 clusters for 2000"):
        retrieval.search(q, shards, 10, index="IVF4096,Flat")
    with pytest.raises(cli.InputError, match="--nprobe 8: the index 'HNSW32' has no such setting"):
        retrieval.search(q, shards, 10, index="HNSW32", nprobe=8)


def test_evaluate_and_mine_with_a_flat_index_equal_exact(tiny_model, tmp_path):
    """On real SciFact texts and a tiny model: evaluate.py --index Flat gives exact search's
    metrics, and mine.py --index Flat the same negatives."""
    folder = scifact_subset(str(tmp_path / "sf"), n_queries=20, n_docs=200)
    common = ["--model", tiny_model, "--dataset", folder, "--split", "test", "--device", "cpu"]
    exact = evaluate.main(evaluate.parser.parse_args(common))
    flat = evaluate.main(evaluate.parser.parse_args(common + ["--index", "Flat"]))
    assert flat.keys() == exact.keys()
    for measure, value in exact.items():
        assert flat[measure] == pytest.approx(value, abs=1e-6), measure
    negatives = []
    for i, extra in enumerate(([], ["--index", "Flat"])):
        out = str(tmp_path / f"mined{i}.jsonl")
        flags = common + ["--range", "2-30", "--num_neg", "3", "--out", out, *extra]
        negatives.append([row["neg_ids"] for row in mine.main(mine.parser.parse_args(flags))])
    assert negatives[0] == negatives[1]
