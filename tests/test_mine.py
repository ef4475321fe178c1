"""mine.py's negative selection on a toy corpus with known scores: margin, dedup,
hard/random mix."""
import random

import negatives


def settings(num_neg=3, margin=0.0, sampling="top"):
    """select_negatives's num_neg, margin and sampling."""
    return num_neg, margin, sampling


CORPUS = {"p": "positive text", "a": "doc a", "b": "doc b", "b2": "doc b", "c": "doc c",
          "q": "the query", "d": "doc d", "e": "doc e", "f": "doc f", "g": "doc g"}
SCORES = {"p": 0.8, "a": 0.79, "b": 0.70, "b2": 0.70, "c": 0.60, "q": 0.58, "d": 0.50, "e": 0.10,
          "f": 0.05, "g": 0.01}
# ranked, positives already removed
WINDOW = [(d, SCORES[d]) for d in ("a", "b", "b2", "q", "c", "d")]
POS = {"p": 0.8}


def select(**kw):
    return negatives.select_negatives(WINDOW, "the query", POS, CORPUS, sorted(CORPUS),
                                      *settings(**kw), random.Random(0), SCORES.get)


def test_dedup_and_query_text_removed():
    chosen, counts = select()
    assert [d for d, _ in chosen] == ["a", "b", "c"]  # b2 repeats b's text, q's text is the query
    assert counts["same_text"] == 2 and counts["random"] == 0


def test_relative_margin():
    # keep only scores < 0.95 * 0.8 = 0.76: "a" (0.79) goes
    chosen, counts = select(margin=0.95)
    assert [d for d, _ in chosen] == ["b", "c", "d"] and counts["margin"] == 1


def test_short_window_is_topped_up_at_random():
    # below 0.8 x 0.8 = 0.64: a, b and b2 go; q repeats the query's text
    chosen, counts = select(margin=0.8)
    assert ([d for d, _ in chosen][:2] == ["c", "d"] and counts["margin"] == 3
            and counts["same_text"] == 1)
    assert counts["random"] == 1 and counts["short_window"] == 1
    rand, s = chosen[2]
    assert rand not in POS and CORPUS[rand] not in {"the query", "positive text", "doc c", "doc d"}
    # a random top-up carries its real score and passes the margin too
    assert s == SCORES[rand] and s < 0.64


def test_seeded_random_sampling():
    a, b = (negatives.select_negatives(WINDOW, "the query", POS, CORPUS, sorted(CORPUS),
                                       *settings(sampling="random"), random.Random(5),
                                       SCORES.get)
            for _ in range(2))
    assert a == b


def test_relative_margin_with_a_negative_floor():
    # the lowest positive scores below zero: 0.95 x -0.2 = -0.19 would keep higher scores
    pos = {"p": -0.2}
    window = [("a", -0.1), ("b", -0.3)]
    chosen, counts = negatives.select_negatives(window, "the query", pos, CORPUS, [],
                                                *settings(margin=0.95), random.Random(0),
                                                {"a": -0.1, "b": -0.3}.get)
    assert [d for d, _ in chosen] == ["b"] and counts["margin"] == 1
