"""Stage 3, filter: Gopher repetition and quality rules with FineWeb's default thresholds.

Every rule is a (score, bound, threshold) triple checked by one mechanism. Scores are
computed for every document and kept as columns, kept or dropped, so "why was this
dropped" is answered from data; the reason is the first rule that failed, in FineWeb's
order, as ``<filter>:<rule>`` (e.g. ``gopher_quality:min_alpha_words_ratio``).
"""

from __future__ import annotations

import re
import string
import time
from collections import Counter
from pathlib import Path
from typing import Callable, NamedTuple

import pyarrow as pa
from tqdm.auto import tqdm

from tasks.extract import DOC_SCHEMA
from flows.config import FilterConfig
from tasks.shards import StageWriter, iter_rows, with_fields
from tasks.stage import stage_dir, stage_task

WORD_RE = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]+")  # words and runs of punctuation, like nltk's word_tokenize
PUNCTUATION = set(string.punctuation) | set("“”‘’«»…–—•")
PARAGRAPH_RE = re.compile(r"\n{2,}")
BULLETS = ("•", "-", "*", "·", "‣", "●", "▪", "◦")


class Rule(NamedTuple):
    name: str       # config field and reason suffix
    score: str      # score column it reads
    bound: str      # "min" or "max"
    threshold: float

    def fails(self, scores: dict) -> bool:
        v = scores[self.score]
        return v < self.threshold if self.bound == "min" else v > self.threshold


def words_of(text: str) -> list[str]:
    return WORD_RE.findall(text)


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(number of items seen before, their total characters)."""
    seen: set[str] = set()
    count = chars = 0
    for x in items:
        if x in seen:
            count, chars = count + 1, chars + len(x)
        else:
            seen.add(x)
    return count, chars


def _ngrams(words: list[str], n: int) -> list[str]:
    return [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]


def _duplicated_ngram_chars(words: list[str], n: int) -> int:
    """Characters of word n-grams that repeat an earlier n-gram, without counting overlaps twice."""
    seen: set[str] = set()
    i = chars = 0
    while i <= len(words) - n:
        gram = " ".join(words[i:i + n])
        if gram in seen:
            chars += len(gram)
            i += n
        else:
            seen.add(gram)
            i += 1
    return chars


def gopher_repetition_scores(text: str, words: list[str], cfg) -> dict[str, float]:
    n_chars = max(len(text), 1)
    paragraphs = PARAGRAPH_RE.split(text.strip())
    lines = text.splitlines() or [""]
    para_dups, para_chars = _duplicates(paragraphs)
    line_dups, line_chars = _duplicates(lines)
    s = {"dup_para_frac": para_dups / len(paragraphs), "dup_para_char_frac": para_chars / n_chars,
         "dup_line_frac": line_dups / len(lines), "dup_line_char_frac": line_chars / n_chars}
    for n in cfg.top_n_grams:
        grams = _ngrams(words, n)
        top = Counter(grams).most_common(1)
        s[f"top_{n}_gram_char_frac"] = len(top[0][0]) * top[0][1] / n_chars if top else 0.0
    for n in cfg.dup_n_grams:
        s[f"dup_{n}_gram_char_frac"] = _duplicated_ngram_chars(words, n) / n_chars
    return s


def gopher_repetition_rules(cfg) -> list[Rule]:
    rules = [Rule(k, k, "max", getattr(cfg, k))
             for k in ("dup_para_frac", "dup_para_char_frac", "dup_line_frac", "dup_line_char_frac")]
    rules += [Rule(f"top_{n}_gram", f"top_{n}_gram_char_frac", "max", t) for n, t in cfg.top_n_grams.items()]
    rules += [Rule(f"dup_{n}_gram", f"dup_{n}_gram_char_frac", "max", t) for n, t in cfg.dup_n_grams.items()]
    return rules


def gopher_quality_scores(text: str, words: list[str], cfg) -> dict[str, float]:
    real = [w for w in words if any(c not in PUNCTUATION for c in w)]
    n = max(len(real), 1)
    lines = text.splitlines() or [""]
    stop = set(cfg.stop_words)
    return {
        "n_words": float(len(real)),
        "avg_word_length": sum(map(len, real)) / n,
        "hash_word_ratio": text.count("#") / n,
        "ellipsis_word_ratio": (text.count("...") + text.count("…")) / n,
        "bullet_lines_ratio": sum(ln.lstrip().startswith(BULLETS) for ln in lines) / len(lines),
        "ellipsis_lines_ratio": sum(ln.rstrip().endswith(("...", "…")) for ln in lines) / len(lines),
        "alpha_words_ratio": sum(any(c.isalpha() for c in w) for w in real) / n,
        "stop_words": float(sum(w in stop for w in words)),
    }


def gopher_quality_rules(cfg) -> list[Rule]:
    return [
        Rule("min_doc_words", "n_words", "min", cfg.min_doc_words),
        Rule("max_doc_words", "n_words", "max", cfg.max_doc_words),
        Rule("min_avg_word_length", "avg_word_length", "min", cfg.min_avg_word_length),
        Rule("max_avg_word_length", "avg_word_length", "max", cfg.max_avg_word_length),
        Rule("max_hash_ratio", "hash_word_ratio", "max", cfg.max_symbol_word_ratio),
        Rule("max_ellipsis_ratio", "ellipsis_word_ratio", "max", cfg.max_symbol_word_ratio),
        Rule("max_bullet_lines_ratio", "bullet_lines_ratio", "max", cfg.max_bullet_lines_ratio),
        Rule("max_ellipsis_lines_ratio", "ellipsis_lines_ratio", "max", cfg.max_ellipsis_lines_ratio),
        Rule("min_alpha_words_ratio", "alpha_words_ratio", "min", cfg.min_alpha_words_ratio),
        Rule("min_stop_words", "stop_words", "min", cfg.min_stop_words),
    ]


class Filter(NamedTuple):
    name: str
    cfg: object
    scores: Callable[[str, list[str], object], dict[str, float]]
    rules: list[Rule]


def build_filters(cfg) -> list[Filter]:
    """The enabled filters, in FineWeb's order."""
    table = [("gopher_repetition", cfg.gopher_repetition, gopher_repetition_scores, gopher_repetition_rules),
             ("gopher_quality", cfg.gopher_quality, gopher_quality_scores, gopher_quality_rules)]
    return [Filter(name, c, scores, rules(c)) for name, c, scores, rules in table if c.enabled]


def judge(text: str, filters: list[Filter]) -> tuple[dict[str, float], str | None]:
    """All scores of one document (prefixed by filter name) and the first failed rule, or None."""
    words = words_of(text)
    scores: dict[str, float] = {}
    reason = None
    for f in filters:
        s = f.scores(text, words, f.cfg)
        scores.update({f"{f.name}.{k}": v for k, v in s.items()})
        if reason is None:
            failed = next((r for r in f.rules if r.fails(s)), None)
            reason = f"{f.name}:{failed.name}" if failed else None
    return scores, reason


def score_columns(filters: list[Filter]) -> list[str]:
    probe = judge("a b", filters)[0]
    return list(probe)


def filter_docs(cfg, docs: dict, stage_dir: str | Path) -> dict:
    """Run the filter stage over the extract manifest ``docs``; returns its manifest."""
    t0 = time.time()
    filters = build_filters(cfg)
    columns = score_columns(filters)
    schema = with_fields(DOC_SCHEMA, [pa.field(c, pa.float64()) for c in columns])
    with StageWriter("filter", stage_dir, schema) as w:
        for doc in tqdm(iter_rows(docs), total=docs["rows"], desc="filter", unit="doc"):
            scores, reason = judge(doc["text"], filters)
            row = {**doc, **scores}
            if reason:
                w.drop(row, reason)
            else:
                w.keep(row)
        w.extra = {"seconds": round(time.time() - t0, 3), "input_rows": docs["rows"]}
    return w.manifest


@stage_task("filter")
def filter_task(ctx: dict, section: dict, inputs: list[dict], run_id: str) -> dict:
    return filter_docs(FilterConfig.model_validate(section), inputs[0], stage_dir(ctx, "filter"))
