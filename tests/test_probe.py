"""The transfer probe on the test site's real pages: which label it finds there, and a trained
encoder's frozen embeddings telling held-out documents' passages apart."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer

from ssl_model.checkpoint import load_model
from ssl_model.config import preset
from ssl_model.model import GPT
from ssl_model.trainer import TrainSettings, train
from tasks import compare
from tasks.probe import embed, labelled_passages, probe
from tasks.shards import iter_rows
from tests.test_compare import items as as_items

KEYS = {"label", "classes", "train_passages", "test_passages", "test_correct", "probe_accuracy", "probe_accuracy_stderr",
        "majority_accuracy", "majority_accuracy_stderr", "tfidf_accuracy", "tfidf_accuracy_stderr"}


def dedup_rows(stages) -> list[dict]:
    return list(iter_rows(stages["dedup"], columns=["doc_id", "text", "url", "source"]))


def test_passages_of_the_pydoc_site_are_labelled_by_document(stages):
    rows = dedup_rows(stages)
    text = {r["doc_id"]: r["text"] for r in rows}
    data = labelled_passages(rows, words=64, max_per_doc=20)
    # one host, one source, one page per module (section): only the documents themselves differ
    assert data["label"] == "document"
    assert data["labels"] == data["docs"] and data["classes"] == len(set(data["docs"])) >= 2
    per_doc = {d: data["docs"].count(d) for d in set(data["docs"])}
    assert min(per_doc.values()) >= 2 and max(per_doc.values()) == 20    # long pages: 20, spread over them
    end = dict.fromkeys(text, 0)
    for passage, doc in zip(data["texts"], data["docs"]):   # the document's own words, in order, no overlap
        start = text[doc].find(passage, end[doc])
        assert start >= 0 and len(re.findall(r"\S+", passage)) == 64
        end[doc] = start + len(passage)
    if data["label"] != "document":
        for c in set(data["labels"]):
            assert len({d for d, y in zip(data["docs"], data["labels"]) if y == c}) >= 2

    # the same pages served from two sites: the host is the label, each site's passages from many pages
    two_sites = [{**r, "url": r["url"].replace("pydoc.localhost", f"site{i % 2}.example")} for i, r in enumerate(rows)]
    data = labelled_passages(two_sites)
    assert data["label"] == "host" and sorted(set(data["labels"])) == ["site0.example", "site1.example"]
    for c in set(data["labels"]):
        assert len({d for d, y in zip(data["docs"], data["labels"]) if y == c}) >= 2

    with pytest.raises(ValueError, match="1 documents gave"):
        labelled_passages(rows[:1])


def test_a_trained_encoder_tells_held_out_documents_apart(tmp_path, stages):
    tok_dir = Path(stages["tokenize"]["dir"])
    vocab = stages["tokenize"]["vocab_size"]
    # test_training's masked-LM run (llama, Muon, WSD), longer. gpt2 + AdamW trained so (150 steps)
    # still predicts mostly unigram statistics: its pooled final layer scored 0.23-0.48 here (the
    # majority 0.27, untrained weights 0.52-0.77) and passed the assertion below in 4 of 16 seeds
    cfg = preset("test", vocab, arch="llama")
    s = TrainSettings(objective="mlm", optimizer="muon", schedule="wsd", batch_size=8, lr=3e-3, warmup_steps=5,
                      eval_batches=4, threads=2, sample_tokens=0, max_steps=150, eval_interval=150)
    model = load_model(train(cfg, s, str(tok_dir), tmp_path, lambda *e: None)["checkpoint"])
    tokenizer = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    held_out = {r["doc_id"] for r in pq.read_table(tok_dir / "val.idx.parquet", columns=["doc_id"]).to_pylist()}
    docs = [r for r in dedup_rows(stages) if r["doc_id"] in held_out]   # neither model nor tokenizer saw them
    # batched as run one by one (no padding leaks into a passage's mean)
    texts = labelled_passages(docs, words=32, max_per_doc=40)["texts"][:48]
    batched = embed(model, tokenizer, texts, causal=False, batch_size=8)
    one_by_one = np.concatenate([embed(model, tokenizer, [t], causal=False) for t in texts])
    assert batched.dtype == np.float32 and batched.shape == (48, cfg.n_embd)
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    # more, shorter passages than the defaults: 44 held out, not 22, for a standard error of 0.07. At
    # about 3 tokens a word (1024-token vocabulary) either length is cut to the preset's 64-token block
    result = probe(model, tokenizer, docs, seed=0, words=32, max_per_doc=40)
    torch.manual_seed(0)
    untrained = probe(GPT(cfg).eval(), tokenizer, docs, seed=0, words=32, max_per_doc=40)
    print(f"\ntrained: {result}\nuntrained: {untrained}")
    assert set(result) == KEYS and all(isinstance(v, (int, float, str)) for k, v in result.items() if k != "test_correct")
    assert result["label"] == "document" and result["classes"] == len(docs) >= 2
    assert result["test_passages"] >= 30
    assert result["probe_accuracy"] - result["majority_accuracy"] > 2 * result["probe_accuracy_stderr"]
    assert result == probe(model, tokenizer, docs, seed=0, words=32, max_per_doc=40)   # deterministic
    # the same passages and split: majority and TF-IDF do not depend on the model
    model_keys = {k for k in KEYS if k.startswith("probe")} | {"test_correct"}
    assert {k: untrained[k] for k in KEYS - model_keys} == {k: result[k] for k in KEYS - model_keys}
    # each test passage's outcome, the same passages for both models: an ablation pairs them
    assert len(result["test_correct"]) == result["test_passages"] and set(result["test_correct"]) <= {0, 1}
    assert np.mean(result["test_correct"]) == pytest.approx(result["probe_accuracy"])
    paired = compare.compare({"untrained": [{"probe.acc": as_items(untrained["test_correct"])}],
                              "trained": [{"probe.acc": as_items(result["test_correct"])}]}, iters=500)
    (pair,) = paired["metrics"]["probe.acc"]["pairs"]
    assert pair["diff"] == pytest.approx(result["probe_accuracy"] - untrained["probe_accuracy"])
