"""A transfer probe for encoder models: frozen mean-pooled embeddings + logistic regression.

Passages are cut from documents and labelled with something the data itself tells apart (the
site, the section of a site, the source, or else which document a passage comes from). A
logistic regression on the model's frozen embeddings is scored against the majority class and
against TF-IDF features with the same classifier, on the same held-out passages.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from urllib.parse import urlsplit

import numpy as np
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

PROBE_C = 0.1  # inverse L2 strength: a few dozen passages and n_embd features want a firm prior


def passages(text: str, words: int, max_per_doc: int) -> list[str]:
    """Consecutive non-overlapping passages of ``words`` words (the original text between the first
    word's start and the last word's end), a short remainder dropped; ``max_per_doc`` at most,
    spread evenly over the document."""
    spans = [m.span() for m in re.finditer(r"\S+", text)]
    cuts = [(spans[i][0], spans[i + words - 1][1]) for i in range(0, len(spans) - words + 1, words)]
    if len(cuts) > max_per_doc:
        cuts = [cuts[i * len(cuts) // max_per_doc] for i in range(max_per_doc)]
    return [text[a:b] for a, b in cuts]


def host(doc: dict) -> str | None:
    return urlsplit(doc["url"]).hostname if doc.get("url") else None


def section(doc: dict) -> str | None:
    """The first path segment, or for a one-segment path the file name up to its first "."."""
    if not doc.get("url"):
        return None
    parts = [p for p in urlsplit(doc["url"]).path.split("/") if p]
    if not parts:
        return None
    return parts[0] if len(parts) >= 2 else parts[0].split(".")[0] or None


def labelled_passages(docs: list[dict], words: int = 64, max_per_doc: int = 20, min_class_docs: int = 2) -> dict:
    """Passages of ``docs`` and a label for each: the first of host, section, source or document
    that has at least 2 classes of ``min_class_docs`` documents each (document: of 2 passages)."""
    cut = [(d, passages(d["text"] or "", words, max_per_doc)) for d in docs]
    cut = [(d, ps) for d, ps in cut if ps]
    ways = [("host", host, min_class_docs), ("section", section, min_class_docs),
            ("source", lambda d: d.get("source") or None, min_class_docs)]
    for kind, key, need in ways:
        members = defaultdict(set)
        for d, _ in cut:
            if key(d) is not None:
                members[key(d)].add(d["doc_id"])
        keep = {k for k, ids in members.items() if len(ids) >= need}
        if len(keep) >= 2:
            break
    else:
        kind, key = "document", lambda d: d["doc_id"]
        keep = {d["doc_id"] for d, ps in cut if len(ps) >= 2}
        if len(keep) < 2:
            raise ValueError(f"{len(docs)} documents gave {sum(len(ps) for _, ps in cut)} passages of {words} words: "
                             f"a label needs 2 classes (hosts, sections or sources of {min_class_docs} documents "
                             f"each, or else 2 documents of 2 passages each); found {len(keep)} such documents")
    out = {"label": kind, "texts": [], "labels": [], "docs": [], "classes": len(keep)}
    for d, ps in cut:
        if key(d) in keep:
            out["texts"] += ps
            out["labels"] += [key(d)] * len(ps)
            out["docs"] += [d["doc_id"]] * len(ps)
    return out


@torch.no_grad()
def embed(model, tokenizer, texts: list[str], causal: bool, batch_size: int = 32) -> np.ndarray:
    """Mean-pooled final hidden states (n, n_embd), float32. ``GPT.hidden`` takes no padding mask, so
    texts are run in batches of equal token length (sorted by length): no padding at all."""
    device = next(model.parameters()).device
    ids = [e.ids[:model.cfg.block_size] for e in tokenizer.encode_batch(texts)]
    out = np.zeros((len(texts), model.cfg.n_embd), dtype=np.float32)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    was_training = model.training
    model.eval()
    try:
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and end - start < batch_size and len(ids[order[end]]) == len(ids[order[start]]):
                end += 1
            batch = order[start:end]
            x = torch.tensor([ids[i] for i in batch], dtype=torch.long, device=device)
            out[batch] = model.hidden(x, causal=causal).float().mean(dim=1).cpu().numpy()
            start = end
    finally:
        model.train(was_training)
    return out


def stderr(accuracy: float, n: int) -> float:
    return math.sqrt(accuracy * (1 - accuracy) / n)


def probe(model, tokenizer, docs: list[dict], causal: bool = False, seed: int = 0, test_fraction: float = 0.3,
          words: int = 64, max_per_doc: int = 20) -> dict:
    """Accuracy of a logistic regression on frozen embeddings at telling the labels of
    :func:`labelled_passages` apart on held-out passages, with the majority class and TF-IDF on
    the same split for comparison (accuracies with their binomial standard errors). The split
    depends only on the documents and ``seed``: models probed on the same documents are tested on
    the same passages, whose 0/1 outcomes (``test_correct``) can be compared item by item."""
    data = labelled_passages(docs, words, max_per_doc)
    counts = Counter(data["labels"])
    keep = [i for i, y in enumerate(data["labels"]) if counts[y] >= 2]   # stratifying needs 2 of each
    texts, labels = [data["texts"][i] for i in keep], [data["labels"][i] for i in keep]
    if len(set(labels)) < 2:
        raise ValueError(f"only {len(set(labels))} class has 2 passages or more; the probe needs 2")
    idx_train, idx_test = train_test_split(np.arange(len(texts)), test_size=test_fraction, stratify=labels,
                                           random_state=seed)
    y = np.array(labels)
    x = embed(model, tokenizer, texts, causal)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=PROBE_C))
    correct = clf.fit(x[idx_train], y[idx_train]).predict(x[idx_test]) == y[idx_test]
    probe_acc = float(correct.mean())
    tfidf = make_pipeline(TfidfVectorizer(sublinear_tf=True), LogisticRegression(max_iter=2000))
    t = np.array(texts, dtype=object)
    tfidf_acc = float(tfidf.fit(t[idx_train], y[idx_train]).score(t[idx_test], y[idx_test]))
    train_counts = Counter(y[idx_train].tolist())
    majority = max(sorted(train_counts), key=train_counts.get)
    majority_acc = float(np.mean(y[idx_test] == majority))
    n = len(idx_test)
    return {"label": data["label"], "classes": len(set(labels)), "train_passages": len(idx_train),
            "test_passages": n, "test_correct": correct.astype(int).tolist(), "probe_accuracy": probe_acc, "probe_accuracy_stderr": stderr(probe_acc, n),
            "majority_accuracy": majority_acc, "majority_accuracy_stderr": stderr(majority_acc, n),
            "tfidf_accuracy": tfidf_acc, "tfidf_accuracy_stderr": stderr(tfidf_acc, n)}
