"""The decontaminate stage on the test site's pages: held-out documents set aside by doc_id hash,
a real evaluation page planted in the training documents dropped as ``contaminated`` with the
suite unchanged, GPT-3's 13-word boundary, and the local data of a user's lm-eval task."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tasks import evaluate as ev
from tasks.config import DecontaminateConfig
from tasks.decontaminate import MIN_HELDOUT, decontaminate, split_hash
from tasks.dedup import normalize
from tasks.shards import StageWriter, iter_rows, read_schema, read_table

N = 13


def grams(text: str, n: int = N) -> set[str]:
    w = normalize(text).split()
    return {" ".join(w[i:i + n]) for i in range(len(w) - n + 1)}


def dropped(m: dict) -> dict[str, dict]:
    return {r["doc_id"]: r for r in read_table(m, dropped=True).to_pylist()}


def kept_ids(m: dict) -> set[str]:
    return {r["doc_id"] for r in iter_rows(m, columns=["doc_id"])}


def new_id(label: str) -> str:
    """A doc_id for a planted document, in the training part of the hash range."""
    for i in range(100):
        d = hashlib.sha256(f"{label}:{i}".encode()).hexdigest()[:32]
        if split_hash(d, 0) < 0.9:
            return d
    raise AssertionError("no id found")


def with_docs(base: dict, extra: list[dict], folder: Path) -> dict:
    """The dedup manifest ``base`` with ``extra`` rows added (same schema)."""
    with StageWriter("dedup", folder, read_schema(base)) as w:
        for row in [*iter_rows(base), *extra]:
            w.keep(row)
    return w.manifest


@pytest.fixture(scope="module")
def eval_docs(stages):
    """Evaluation documents from a source of their own: the real pages the filter dropped (so none
    of them is a training document), as a stage manifest."""
    f = stages["filter"]
    return {**f, "files": f["dropped_files"], "rows": f["dropped"]}


@pytest.fixture(scope="module")
def base(stages, eval_docs, tmp_path_factory):
    return decontaminate(DecontaminateConfig(), stages["dedup"], tmp_path_factory.mktemp("base") / "decontaminate",
                         eval_docs)


def test_held_out_documents_are_the_doc_id_hash_selection(stages):
    m = stages["decontaminate"]   # the default config: 5 %, at least MIN_HELDOUT
    ids = sorted(kept_ids(stages["dedup"]))
    by_hash = sorted(ids, key=lambda d: split_hash(d, 0), reverse=True)
    want = set(by_hash[:max(MIN_HELDOUT, sum(split_hash(d, 0) >= 0.95 for d in ids))])
    held = {d for d, r in dropped(m).items() if r["reason"] == "held_out"}
    assert held == want and len(held) == m["heldout_docs"] >= MIN_HELDOUT
    texts = {r["doc_id"]: r["text"] for r in iter_rows(stages["dedup"])}
    aside = pq.read_table(Path(m["dir"]) / m["heldout"]).to_pylist()
    assert [r["doc_id"] for r in aside] == sorted(want) and all(texts[r["doc_id"]] == r["text"] for r in aside)
    assert not held & kept_ids(m) and kept_ids(m) | set(dropped(m)) == set(ids)
    assert {r["doc_id"] for r in ev.read_heldout(m)} == want   # what the evaluate stage builds its suite from


def test_a_planted_evaluation_page_is_dropped_and_the_suite_is_unchanged(stages, eval_docs, base, tmp_path):
    evaluation = {r["doc_id"]: r for r in iter_rows(eval_docs)}
    page = max(evaluation.values(), key=lambda r: len(r["text"]))            # a real page, copied
    template = next(r for r in iter_rows(base))                               # a training document kept
    x = normalize(page["text"]).split()
    planted = {**template, "doc_id": new_id("planted"), "url": "http://mirror.example/copy.html", "text": page["text"]}
    # the boundary: a kept training document with the page's first 12 words appended, and with 13
    just12 = {**template, "doc_id": new_id("just12"), "text": template["text"] + "\n" + " ".join(x[:12])}
    just13 = {**template, "doc_id": new_id("just13"), "text": template["text"] + "\n" + " ".join(x[:13])}
    aside = pq.read_table(Path(base["dir"]) / base["heldout"]).to_pylist()
    eval_grams = set().union(*(grams(r["text"]) for r in aside))
    assert not grams(just12["text"]) & eval_grams and " ".join(x[:13]) in eval_grams   # the setup is what it says

    m = decontaminate(DecontaminateConfig(), with_docs(stages["dedup"], [planted, just12, just13], tmp_path / "in"),
                      tmp_path / "decontaminate", eval_docs)
    before, after = dropped(base), dropped(m)
    assert set(after) == set(before) | {planted["doc_id"], just13["doc_id"]}
    assert just12["doc_id"] in kept_ids(m) and template["doc_id"] in kept_ids(m)
    hit = after[planted["doc_id"]]
    assert hit["reason"] == "contaminated" and hit["contaminated_by"] == "eval_sources"
    assert len(hit["ngram"].split()) == N and hit["ngram"] in " ".join(x)    # a real 13-word run of the page
    assert hit["ngram"] in normalize(evaluation[hit["eval_doc_id"]]["text"])
    assert after[just13["doc_id"]]["ngram"] == " ".join(x[:13])
    assert m["contaminated_by"]["eval_sources"] == base["contaminated_by"].get("eval_sources", 0) + 2
    assert m["eval_docs"] == base["eval_docs"] == base["heldout_docs"] + len(evaluation) and m["eval_ngrams"] > 0
    # the evaluation documents, and so the suite, are the same with the copy in training or not
    assert (Path(m["dir"]) / "heldout.parquet").read_bytes() == (Path(base["dir"]) / "heldout.parquet").read_bytes()
    suites = [ev.build_suite(ev.read_heldout(r), tmp_path / f"suite{i}", 50) for i, r in enumerate((base, m))]
    assert suites[0]["digest"] == suites[1]["digest"] == ev.suite_digest(tmp_path / "suite1")
    assert {page["doc_id"]} <= {r["doc_id"] for r in ev.read_heldout(m)}
    # kept documents pass unchanged
    assert read_schema(m) == read_schema(stages["dedup"])
    rows = {r["doc_id"]: r for r in iter_rows(stages["dedup"])}
    assert all(rows[r["doc_id"]] == r for r in iter_rows(m) if r["doc_id"] in rows)


def test_the_local_data_of_a_named_lm_eval_task_decontaminates(stages, base, tmp_path, caplog):
    page = max((r for r in iter_rows(base)), key=lambda r: len(r["text"]))  # a training page
    words = page["text"].split()
    folder = tmp_path / "tasks"
    folder.mkdir()
    with open(folder / "passages.jsonl", "w") as f:   # a passage of that page as a question, its next word the answer
        f.write(json.dumps({"question": " ".join(words[10:40]), "answer": words[40]}) + "\n")
    spec = {"dataset_path": "json", "output_type": "generate_until", "test_split": "test",
            "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}", "metadata": {"version": 1.0}}
    (folder / "my_passages.yaml").write_text(yaml.safe_dump(
        {"task": "my_passages", **spec, "dataset_kwargs": {"data_files": {"test": str(folder / "passages.jsonl")}}}))
    (folder / "not_here.yaml").write_text(yaml.safe_dump(
        {"task": "not_here", **spec, "dataset_kwargs": {"data_files": {"test": str(folder / "missing.jsonl")}}}))
    cfg = DecontaminateConfig(tasks=["my_passages", "not_here"], include_path=[str(folder)])
    with caplog.at_level(logging.WARNING, logger="tasks.decontaminate"):
        m = decontaminate(cfg, stages["dedup"], tmp_path / "decontaminate")
    assert any("not_here" in r.getMessage() for r in caplog.records)           # skipped, named
    assert m["tasks_checked"] == ["my_passages"] and m["eval_sets"]["task:my_passages"] == 1
    hit = dropped(m)[page["doc_id"]]
    assert hit["reason"] == "contaminated" and hit["contaminated_by"] == "task:my_passages"
    assert hit["eval_doc_id"] == "my_passages:0" and hit["ngram"] in normalize(" ".join(words[10:41]))
    assert m["contaminated_by"]["task:my_passages"] >= 1


def test_disabled_only_holds_out(stages, tmp_path):
    m = decontaminate(DecontaminateConfig(enabled=False), stages["dedup"], tmp_path / "decontaminate")
    assert m["reasons"] == {"held_out": stages["decontaminate"]["heldout_docs"]} and m["eval_ngrams"] == 0
    again = decontaminate(DecontaminateConfig(enabled=False), stages["dedup"], tmp_path / "again")
    assert m["digest"] == again["digest"]


def test_common_text_does_not_count_but_copies_always_do(stages, eval_docs, base, tmp_path):
    """GPT-3's rule: an evaluation n-gram in more than max_doc_frequency training documents is common
    text. Twelve training pages that each quote the same 13 words of an evaluation page keep them
    (common), one page that quotes them alone is dropped at a limit of 12; three copies of a whole
    evaluation page are all dropped, however common their n-grams (they are copies)."""
    evaluation = {r["doc_id"]: r for r in iter_rows(eval_docs)}
    page = max(evaluation.values(), key=lambda r: len(r["text"]))
    hosts = [r for r in iter_rows(base)][:12]
    seen = set().union(*(grams(r["text"]) for r in iter_rows(stages["dedup"])))
    quote = next(g for g in sorted(grams(page["text"])) if g not in seen)      # in no training page yet
    quoting = [{**r, "doc_id": new_id(f"quote{i}"), "text": r["text"] + "\n" + quote} for i, r in enumerate(hosts)]
    copies = [{**hosts[0], "doc_id": new_id(f"copy{i}"), "text": page["text"]} for i in range(3)]
    docs = with_docs(stages["dedup"], quoting + copies, tmp_path / "in")
    ids = {r["doc_id"] for r in quoting}, {r["doc_id"] for r in copies}
    loose = decontaminate(DecontaminateConfig(max_doc_frequency=10), docs, tmp_path / "a", eval_docs)
    strict = decontaminate(DecontaminateConfig(max_doc_frequency=12), docs, tmp_path / "b", eval_docs)
    assert ids[0] <= kept_ids(loose) and ids[1] <= set(dropped(loose))
    assert ids[0] <= set(dropped(strict)) and ids[1] <= set(dropped(strict)), (strict["common_ngrams"], strict["kept_common_only"], strict["copies"], strict["reasons"])
    assert loose["copies"] >= 3 and loose["kept_common_only"] >= 12
    assert all(dropped(loose)[d]["reason"] == "contaminated" for d in ids[1])
