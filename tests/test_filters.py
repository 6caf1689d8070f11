"""FineWeb's filters and the dedup stage on real text: extracted pydoc pages, the Python
documentation (pages and reStructuredText sources, python3-doc), and justext's stop lists (real
words of 100 languages, shipped inside a package) for language identification."""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import justext
import numpy as np
import pyarrow.parquet as pq
import pytest
from datasketch import MinHash

from tasks.config import DedupConfig, FilterConfig
from tasks.dedup import dedup, normalize, shingle_hash, shingles, signatures
from tasks.extract import extract_page
from tasks.filter import Doc, build_filters, filter_docs, judge, mask_pii
from tasks.shards import StageWriter, iter_rows, read_table

STOPLISTS = Path(justext.__file__).parent / "stoplists"
OFF = {"enabled": False}


def only(**sections) -> FilterConfig:
    """Every filter off but the given ones (with their settings)."""
    names = ("url", "language", "gopher_repetition", "gopher_quality", "c4", "fineweb")
    return FilterConfig.model_validate({**{n: OFF for n in names}, **sections})


@pytest.fixture(scope="module")
def pages(stages) -> list[dict]:
    return sorted(iter_rows(stages["extract"]), key=lambda r: -len(r["text"]))


def prose(pages) -> dict:
    """The longest page that passes C4's and FineWeb's rules as it is."""
    rules = build_filters(only(c4={}, fineweb={}))
    return next(p for p in pages if judge(Doc(p["text"], p["url"]), rules)[1] is None)


def test_language_id_keeps_english_and_drops_other_languages(pages):
    rules = build_filters(only(language={}))
    english = pages[0]
    scores, reason = judge(Doc(english["text"], english["url"]), rules)
    assert reason is None and scores["language.language"] == "en" and scores["language.score"] > 0.65
    for name, code in (("German", "de"), ("French", "fr"), ("Spanish", "es")):
        words = (STOPLISTS / f"{name}.txt").read_text(encoding="utf-8").split()
        scores, reason = judge(Doc(" ".join(words[:200]), "http://a/"), rules)
        assert scores["language.language"] == code and reason == "language:language", (name, scores)
    german = " ".join((STOPLISTS / "German.txt").read_text(encoding="utf-8").split()[:200])
    keep_de = build_filters(only(language={"languages": ["en", "de"]}))
    assert judge(Doc(german, "http://a/"), keep_de)[1] is None


def test_url_blocklist_matches_domains_with_subdomains_and_substrings(pages):
    rules = build_filters(only(url={"blocked_domains": ["python.org"], "blocked_substrings": ["/JSON"]}))
    text = pages[0]["text"]
    assert judge(Doc(text, "https://docs.python.org/3/library/heapq.html"), rules)[1] == "url:blocked_domain"
    assert judge(Doc(text, "https://python.org/"), rules)[1] == "url:blocked_domain"
    assert judge(Doc(text, "https://notpython.org/"), rules)[1] is None
    assert judge(Doc(text, "http://127.0.0.1:8000/json.html"), rules)[1] == "url:blocked_substring"


def test_c4_removes_lines_and_drops_documents_as_datatrove_does(pages):
    page = prose(pages)
    lines = page["text"].splitlines()
    long_lines = [i for i, ln in enumerate(lines) if len(ln.split()) >= 3]
    rules = build_filters(only(c4={}))
    i = long_lines[0]

    def judged(new_lines):
        doc = Doc("\n".join(new_lines), page["url"])
        return (*judge(doc, rules), doc)
    # a line mentioning javascript, a policy line and a 2-word line are removed; the rest stays
    edited = lines[:i] + [lines[i] + " Enable JavaScript.", "Read our privacy policy here.", "two words"] + lines[i:]
    scores, reason, doc = judged(edited)
    assert reason is None
    assert (scores["c4.lines_removed_javascript"], scores["c4.lines_removed_policy"]) == (1, 1)
    assert "JavaScript" not in doc.text and "privacy policy" not in doc.text and "\ntwo words\n" not in doc.text
    # lorem ipsum or a curly bracket in a line that remains drops the whole document
    assert judged(lines[:i] + [lines[i] + " lorem ipsum"] + lines[i + 1:])[1] == "c4:lorem_ipsum"
    assert judged(lines[:i] + [lines[i] + " {"] + lines[i + 1:])[1] == "c4:curly_bracket"
    # ... but not in a line already removed for being short (C4's order of checks)
    assert judged(lines + ["{ }"])[1] is None
    assert judged([lines[i]])[1] == "c4:too_few_sentences"


def test_fineweb_rules_on_reshaped_real_text(pages):
    page = prose(pages)
    rules = build_filters(only(fineweb={}))
    text = page["text"]
    assert judge(Doc(text, page["url"]), rules)[1] is None
    no_punct = "\n".join(ln.rstrip(".!?'\"") for ln in text.splitlines())
    assert judge(Doc(no_punct, page["url"]), rules)[1] == "fineweb:line_punct_ratio"
    words = text.split()
    short = "\n".join(" ".join(words[i:i + 3]) + "." for i in range(0, len(words), 3))
    assert judge(Doc(short, page["url"]), rules)[1] == "fineweb:short_line_ratio"
    repeated = text + "\n" + "\n".join(ln for ln in text.splitlines() if len(ln) > 40)
    assert judge(Doc(repeated, page["url"]), rules)[1] == "fineweb:char_dup_ratio"


def test_filter_stage_keeps_cleaned_text_scores_and_masks_pii(tmp_path, stages, pages):
    page = prose(pages)
    lines = page["text"].splitlines()
    i = next(i for i, ln in enumerate(lines) if len(ln.split()) >= 3)
    lines[i] += " Write to guido@python.org or reach 8.8.8.8, not 192.168.0.1."
    lines.insert(i + 1, "This site uses cookies to work.")
    schema = pq.read_schema(Path(stages["extract"]["dir"]) / "part-00000.parquet")
    with StageWriter("extract", tmp_path / "e", schema) as w:
        w.keep({**page, "text": "\n".join(lines)})
        w.keep({**page, "doc_id": "x-lorem", "text": "\n".join(lines) + "\n" + lines[i] + " lorem ipsum"})
    cfg = only(c4={}, fineweb={}, pii={"mask_emails": True, "mask_ips": True})
    m = filter_docs(cfg, w.manifest, tmp_path / "f")
    kept, dropped = read_table(m).to_pylist(), read_table(m, dropped=True).to_pylist()
    assert len(kept) == 1 and [d["reason"] for d in dropped] == ["c4:lorem_ipsum"]
    text = kept[0]["text"]
    assert "email@example.com" in text and "guido@python.org" not in text
    assert "0.0.0.0" in text and "8.8.8.8" not in text and "192.168.0.1" in text   # private stays
    assert "uses cookies" not in text and "lorem ipsum" in dropped[0]["text"]
    assert m["pii_masked"] == 2 and m["lines_removed"]["policy"] == 1
    assert kept[0]["c4.lines_removed_policy"] == 1 and dropped[0]["c4.lorem_ipsum"] == 1
    assert mask_pii("a@b.co", cfg.pii) == ("email@example.com", 1)


def test_default_filters_run_in_fineweb_order_with_every_score_column(tmp_path, stages):
    m = filter_docs(FilterConfig(), stages["extract"], tmp_path / "f")
    dropped = read_table(m, dropped=True)
    order = [f.name for f in build_filters(FilterConfig())]
    assert order == ["url", "language", "gopher_repetition", "gopher_quality", "c4", "fineweb"]
    for name in order:
        assert any(c.startswith(name + ".") for c in dropped.column_names), name
    assert dropped["language.language"].type == "string"
    filters = build_filters(FilterConfig())
    for row in dropped.to_pylist():   # the reason is the first failing rule: the filters before it pass
        before = filters[:order.index(row["reason"].split(":")[0])]
        for f in before:
            scores = {k.split(".", 1)[1]: v for k, v in row.items() if k.startswith(f.name + ".")}
            assert not any(r.fails(scores) for r in f.rules), (row["reason"], f.name)


# --- the scores as datatrove computes them -----------------------------------------------------
# datatrove counts words with spaCy's blank English tokenizer (spaCy, a test dependency, is the
# reference here) and its rules read them as below. The Python documentation is full of what
# split words differently before (dotted names, "e.g.", contractions) and its reStructuredText
# sources of blank lines.

PYTHON_DOCS = next(Path("/usr/share/doc").glob("python3*/html"))
EXTRACT = {"favor_precision": False, "favor_recall": False, "include_tables": True, "include_comments": False,
           "with_metadata": False}


@pytest.fixture(scope="module")
def python_docs() -> list[str]:
    """The main text of every 10th page of the Python documentation, and every 5th of its sources."""
    texts = []
    for page in sorted(PYTHON_DOCS.glob("**/*.html"))[::10]:
        doc = extract_page(page.read_text(encoding="utf-8", errors="replace"), f"https://docs.python.org/{page}",
                           EXTRACT)
        texts += [doc["text"]] if doc else []
    texts += [p.read_text(encoding="utf-8") for p in sorted((PYTHON_DOCS / "_sources").glob("**/*.txt"))[::5]]
    assert len(texts) > 100
    return texts


@pytest.fixture(scope="module")
def spacy_en():
    import spacy
    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    return nlp


def spacy_words(nlp, text: str) -> list[str]:
    return [t.text.strip() for t in nlp(text) if t.text.strip()]   # datatrove strips and drops blanks


def all_duplicate_chars(words: list[str], n: int, sep: str) -> int:
    """datatrove's duplicated n-gram characters: a repeat counts and skips its n-1 overlaps."""
    seen, i, chars = set(), 0, 0
    while i < len(words) - n + 1:
        gram = sep.join(words[i:i + n])
        if gram in seen:
            chars, i = chars + len(gram), i + n
        else:
            seen.add(gram)
            i += 1
    return chars


def test_words_are_split_as_datatrove_splits_english(python_docs, spacy_en):
    rules = build_filters(only(gopher_quality={}))
    split_whole = set()
    for text in python_docs:
        words = spacy_words(spacy_en, text)
        assert Doc(text, None).words == words
        scores, _ = judge(Doc(text, None), rules)
        assert scores["gopher_quality.alpha_words_ratio"] == sum(any(c.isalpha() for c in w) for w in words) / len(words)
        split_whole |= {w for w in words if w in ("e.g.", "i.e.", "email.errors", "os.path", "don't")}
    # dotted names and abbreviations are one word each ("email.errors" was three, "e.g." four)
    assert {"e.g.", "i.e.", "os.path"} <= split_whole


def test_duplicated_ngrams_are_joined_without_spaces(python_docs, spacy_en):
    rules = build_filters(only(gopher_repetition={}))
    spaced_differs = 0
    for text in python_docs:
        words = spacy_words(spacy_en, text)
        scores, _ = judge(Doc(text, None), rules)
        for n in range(5, 11):
            chars = all_duplicate_chars(words, n, "")
            assert scores[f"gopher_repetition.dup_{n}_gram_char_frac"] == chars / len(text), n
            spaced_differs += chars != all_duplicate_chars(words, n, " ")
        for n in (2, 3, 4):   # the most frequent n-gram is joined with spaces, the first seen among equals
            grams = [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]
            gram, count = Counter(grams).most_common(1)[0]
            assert scores[f"gopher_repetition.top_{n}_gram_char_frac"] == len(gram) * count / len(text), n
    assert spaced_differs > 100   # the real text repeats n-grams: joined with spaces the scores read higher


def test_blank_lines_are_no_lines(python_docs):
    rules = build_filters(only(gopher_repetition={}))
    blank_runs = 0
    for text in python_docs:
        lines, paragraphs = re.split(r"\n+", text), re.split(r"\n{2,}", text.strip())
        scores, _ = judge(Doc(text, None), rules)
        for name, items in (("line", lines), ("para", paragraphs)):
            dups = [x for i, x in enumerate(items) if x in items[:i]]
            assert scores[f"gopher_repetition.dup_{name}_frac"] == len(dups) / len(items)
            assert scores[f"gopher_repetition.dup_{name}_char_frac"] == sum(map(len, dups)) / len(text)
        blank_runs += text.count("\n\n\n")
    assert blank_runs > 100   # the sources have runs of blank lines (splitlines() counted them as lines)


def test_sentences_are_counted_as_datatrove_counts_them_for_c4(python_docs, spacy_en):
    from tasks.filter import count_sentences
    counted = 0
    for text in python_docs[::3]:
        for line in filter(None, map(str.strip, text.splitlines())):
            assert count_sentences(line) == len([s for s in spacy_en(line).sents if s.text.strip()]), line
            counted += 1
    assert counted > 5000


def test_signatures_equal_datasketch_with_the_same_hash(pages):
    texts = [normalize(p["text"]) for p in pages[:20]] + ["", "one two"]
    ours = signatures(texts, 5, 112, 1)
    for text, sig in zip(texts, ours):
        m = MinHash(num_perm=112, seed=1, scheme="affine32", hashfunc=shingle_hash)
        m.update_batch(shingles(text, 5))
        assert np.array_equal(m.hashvalues, sig)


def test_dedup_over_many_shards_in_parallel_gives_the_same_clusters(tmp_path, stages):
    rows = list(iter_rows(stages["filter"]))
    twins = [{**r, "doc_id": "zz" + r["doc_id"][2:], "text": r["text"].replace(". ", ".  ")} for r in rows[:5]]
    schema = pq.read_schema(Path(stages["filter"]["dir"]) / "part-00000.parquet")
    manifests = []
    for name, shard_rows in (("one", 10_000), ("many", 3)):
        with StageWriter("filter", tmp_path / name, schema, shard_rows=shard_rows) as w:
            for r in rows + twins:
                w.keep(r)
        manifests.append(w.manifest)
    assert len(manifests[1]["files"]) > 5
    one = dedup(DedupConfig(processes=1), manifests[0], tmp_path / "d1")
    many = dedup(DedupConfig(processes=2), manifests[1], tmp_path / "d2")
    assert read_table(one).to_pylist() == read_table(many).to_pylist()
    assert read_table(one, dropped=True).to_pylist() == read_table(many, dropped=True).to_pylist()
    assert one["reasons"]["exact_duplicate"] >= 5


def test_dedup_survivor_rules(tmp_path, stages):
    rows = list(iter_rows(stages["filter"]))
    base = max(rows, key=lambda r: len(r["text"]))
    # every 80th word deleted: Jaccard ~0.89 (every 40th gave ~0.79, below dedup.threshold 0.8)
    old = {**base, "doc_id": "zz-old", "fetched_at": base["fetched_at"].replace(year=2001),
           "text": " ".join(w for i, w in enumerate(base["text"].split()) if i % 80)}
    schema = pq.read_schema(Path(stages["filter"]["dir"]) / "part-00000.parquet")
    with StageWriter("filter", tmp_path / "f", schema) as w:
        for r in rows + [old]:
            w.keep(r)
    for rule, survivor in (("longest", base["doc_id"]), ("oldest", "zz-old"), ("first", min(base["doc_id"], "zz-old"))):
        m = dedup(DedupConfig(survivor=rule), w.manifest, tmp_path / rule)
        dropped = {r["doc_id"]: r for r in read_table(m, dropped=True).to_pylist()}
        loser = "zz-old" if survivor == base["doc_id"] else base["doc_id"]
        assert dropped[loser]["duplicate_of"] == survivor, rule
        assert os.path.isdir(m["dir"])


def test_near_duplicate_precision_and_recall_at_the_defaults(tmp_path, site_dir):
    # pairs of known Jaccard built from real pages (bench/neardup.py), deduplicated by the stage
    from bench import neardup
    from bench.dedup import doc_table
    texts = [p.read_text(encoding="utf-8") for p in sorted(site_dir.glob("*.html"))]
    texts = [normalize(re.sub(r"<[^>]+>", " ", t)) for t in texts]   # the pages' words, markup removed
    pairs = neardup.pairs(texts, seed=1, size=200)
    m = dedup(DedupConfig(), doc_table([t for p in pairs for t in (p["a"], p["b"])], tmp_path / "docs"),
              tmp_path / "d")
    cluster = {r["doc_id"]: r["cluster_id"] for t in (read_table(m), read_table(m, dropped=True))
               for r in t.select(["doc_id", "cluster_id"]).to_pylist()}
    found = [cluster[f"d{2 * i:09d}"] == cluster[f"d{2 * i + 1:09d}"] for i in range(len(pairs))]
    s = neardup.score([(p["jaccard"], f) for p, f in zip(pairs, found)])
    assert s["pairs_positive"] >= 50 and s["pairs_negative"] >= 50, s
    assert {p["kind"] for p in pairs} == set(neardup.KINDS)
    assert s["precision"] >= 0.95 and s["recall"] >= 0.90, s
