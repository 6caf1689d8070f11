"""A near-duplicate benchmark built from real text, with the true Jaccard of every pair known.

Bases are disjoint windows of 400 (or ``size``) words of real pages (each window used by one pair only, so
pairs cannot chain into each other's clusters). Each pair is a base and a variant of it:
substituted, inserted or deleted words, a truncation, added boilerplate (a window of another
page), reordered paragraphs, or two distinct windows sharing the same boilerplate (a true
negative that looks alike). The true Jaccard is computed on the sets of word 5-gram shingles of
the normalized texts, as dedup defines them.
"""

from __future__ import annotations

import random
from typing import Iterator

from tasks.dedup import normalize, shingles

KINDS = ("substitute", "insert", "delete", "truncate", "boilerplate", "reorder", "shared_boilerplate")


def windows(texts: list[str], size: int = 400) -> Iterator[list[str]]:
    """Disjoint windows of ``size`` normalized words, each kept as paragraphs of ~40 words."""
    for text in texts:
        words = normalize(text).split()
        for i in range(0, len(words) - size + 1, size):
            yield words[i:i + size]


def jaccard(a: str, b: str, n: int = 5) -> float:
    sa, sb = set(shingles(a, n)), set(shingles(b, n))
    return len(sa & sb) / len(sa | sb)


def paragraphs(words: list[str], size: int = 40) -> list[str]:
    return [" ".join(words[i:i + size]) for i in range(0, len(words), size)]


def variant(kind: str, words: list[str], other: list[str], third: list[str], rng: random.Random) -> tuple[str, str]:
    """(base text, variant text) for one pair of the given kind, at a random strength."""
    p = rng.uniform(0.0, 0.12) if kind in ("substitute", "insert", "delete") else rng.uniform(0.05, 0.7)
    base = words
    if kind == "substitute":
        new = [rng.choice(other) if rng.random() < p else w for w in words]
    elif kind == "insert":
        new = [x for w in words for x in ([w, rng.choice(other)] if rng.random() < p else [w])]
    elif kind == "delete":
        new = [w for w in words if rng.random() >= p]
    elif kind == "truncate":
        new = words[:int(len(words) * (1 - p / 1.4))]
    elif kind == "boilerplate":
        new = words + other[:int(len(other) * p)]
    elif kind == "reorder":
        paras = paragraphs(words)
        i, j = sorted(rng.sample(range(len(paras)), 2))
        paras[i], paras[j] = paras[j], paras[i]
        return "\n\n".join(paragraphs(words)), "\n\n".join(paras)
    else:  # shared_boilerplate: two different windows with the same block appended
        block = third[:int(len(third) * rng.uniform(0.3, 1.0))]
        base, new = words + block, other + block
    return "\n\n".join(paragraphs(base)), "\n\n".join(paragraphs(new))


def pairs(texts: list[str], seed: int = 0, per_kind: int | None = None, size: int = 400) -> list[dict]:
    """Pairs of every kind, round robin over the windows of ``texts``: {a, b, kind, jaccard}."""
    rng = random.Random(seed)
    pool = list(windows(texts, size))
    rng.shuffle(pool)
    out = []
    k = 0
    while len(pool) >= 3 and (per_kind is None or len(out) < per_kind * len(KINDS)):
        kind = KINDS[k % len(KINDS)]
        words, other, third = pool.pop(), pool.pop(), pool.pop()
        a, b = variant(kind, words, other, third, rng)
        out.append({"a": a, "b": b, "kind": kind, "jaccard": jaccard(normalize(a), normalize(b))})
        k += 1
    return out


def score(results: list[tuple[float, bool]], high: float = 0.8, low: float = 0.5) -> dict:
    """Precision and recall of the pairs found, for pairs with Jaccard >= high against < low."""
    pos = [found for j, found in results if j >= high]
    neg = [found for j, found in results if j < low]
    tp, fp = sum(pos), sum(neg)
    return {"pairs_positive": len(pos), "pairs_negative": len(neg), "true_positives": tp, "false_positives": fp,
            "precision": round(tp / max(tp + fp, 1), 4), "recall": round(tp / max(len(pos), 1), 4)}
