"""Stage 3, filter: FineWeb's filters in FineWeb's order, with its published default thresholds.

URL blocklist -> language ID -> Gopher repetition -> Gopher quality -> C4 -> FineWeb rules, then
optional e-mail/IP masking. Every filter is a score function plus rules, checked by one
mechanism: a rule is (name, score, bound, threshold). Scores are computed for every document
and kept as columns, kept or dropped, so "why was this dropped" is answered from data; the
reason is the first rule that failed, in order, as ``<filter>:<rule>`` (for example
``gopher_quality:min_alpha_words_ratio``). C4 also removes lines (javascript, policy phrases,
lines of fewer than 3 words); the filters after it see the cleaned text, as in datatrove.
"""

from __future__ import annotations

import ipaddress
import re
import string
import time
from collections import Counter
from functools import cache
from pathlib import Path
from typing import Any, Callable, NamedTuple
from urllib.parse import urlsplit

import pyarrow as pa
from tqdm.auto import tqdm

from tasks.extract import DOC_SCHEMA
from flows.config import FilterConfig
from tasks.shards import StageWriter, iter_rows, with_fields
from tasks.stage import stage_dir, stage_task
from tasks.workers import DaskShards, batched, in_order, pool_extra, shard_pool

WORD_RE = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]+")  # words and runs of punctuation, like nltk's word_tokenize
PUNCTUATION = set(string.punctuation) | set("“”‘’«»…–—•")
PARAGRAPH_RE = re.compile(r"\n{2,}")
BULLETS = ("•", "-")   # the bullets Gopher's rule counts, as in datatrove
BATCH = 64             # documents per shard of work (~1 s): enough shards to keep every worker busy
DASK_BATCH = 128       # per Prefect task on Dask, where each one costs a few API calls
class Rule(NamedTuple):
    name: str       # reason suffix
    score: str      # score it reads
    bound: str      # the score must be: "min" >= t, "max" <= t, "above" > t, "below" < t, "in" one of t
    threshold: Any
    zero_ok: bool = False   # a score of exactly 0 passes (FineWeb's line_punct_exclude_zero)

    def fails(self, scores: dict) -> bool:
        v = scores[self.score]
        if self.zero_ok and v == 0:
            return False
        return {"min": lambda: v < self.threshold, "max": lambda: v > self.threshold,
                "above": lambda: v <= self.threshold, "below": lambda: v >= self.threshold,
                "in": lambda: v not in self.threshold}[self.bound]()


class Doc:
    """A document as the filters see it: its URL and text (C4 may remove lines), words on demand."""

    def __init__(self, text: str, url: str | None):
        self.url, self.text = url or "", text

    @property
    def text(self) -> str:
        return self._text

    @text.setter
    def text(self, value: str) -> None:
        self._text, self._words = value, None

    @property
    def words(self) -> list[str]:
        if self._words is None:
            self._words = WORD_RE.findall(self._text)
        return self._words


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


# --- URL blocklist ---------------------------------------------------------------------------

def url_scores(doc: Doc, cfg) -> dict[str, float]:
    labels = (urlsplit(doc.url).hostname or "").lower().rstrip(".").split(".")
    suffixes = {".".join(labels[i:]) for i in range(len(labels))}   # the host and each parent domain
    url = doc.url.lower()
    return {"blocked_domain": float(not _domains(tuple(cfg.blocked_domains)).isdisjoint(suffixes)),
            "blocked_substring": float(any(s.lower() in url for s in cfg.blocked_substrings))}


@cache
def _domains(blocked: tuple[str, ...]) -> frozenset[str]:
    """The blocklist as a set, built once: a host is looked up by its suffixes, not the list scanned."""
    return frozenset(d.lower().strip(".") for d in blocked)


def url_rules(cfg) -> list[Rule]:
    return [Rule("blocked_domain", "blocked_domain", "max", 0), Rule("blocked_substring", "blocked_substring", "max", 0)]


# --- language identification -----------------------------------------------------------------

@cache
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier
    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def language_scores(doc: Doc, cfg) -> dict[str, Any]:
    lang, prob = _identifier().classify(doc.text.replace("\n", " ")) if doc.text.strip() else ("", 0.0)
    return {"language": lang, "score": float(prob)}


def language_rules(cfg) -> list[Rule]:
    # FineWeb keeps a document whose best language is listed with a score above the threshold
    return [Rule("language", "language", "in", tuple(cfg.languages)), Rule("min_score", "score", "above", cfg.min_score)]


# --- Gopher ----------------------------------------------------------------------------------

def gopher_repetition_scores(doc: Doc, cfg) -> dict[str, float]:
    text, words = doc.text, doc.words
    n_chars = max(len(text), 1)
    paragraphs = PARAGRAPH_RE.split(text.strip())
    lines = text.splitlines() or [""]
    para_dups, para_chars = _duplicates(paragraphs)
    line_dups, line_chars = _duplicates(lines)
    s = {"dup_para_frac": para_dups / len(paragraphs), "dup_para_char_frac": para_chars / n_chars,
         "dup_line_frac": line_dups / len(lines), "dup_line_char_frac": line_chars / n_chars}
    for n in cfg.top_n_grams:
        top = Counter(" ".join(words[i:i + n]) for i in range(len(words) - n + 1)).most_common(1)
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


def gopher_quality_scores(doc: Doc, cfg) -> dict[str, float]:
    """As datatrove computes them: word counts and lengths over words that are not only
    punctuation; symbol and alphabetic ratios over all tokens; distinct stop words."""
    text, words = doc.text, doc.words
    real = [w for w in words if any(c not in PUNCTUATION for c in w)]
    n, n_all = max(len(real), 1), max(len(words), 1)
    lines = text.splitlines() or [""]
    return {
        "n_words": float(len(real)),
        "avg_word_length": sum(map(len, real)) / n,
        "hash_word_ratio": text.count("#") / n_all,
        "ellipsis_word_ratio": (text.count("...") + text.count("…")) / n_all,
        "bullet_lines_ratio": sum(ln.lstrip().startswith(BULLETS) for ln in lines) / len(lines),
        "ellipsis_lines_ratio": sum(ln.rstrip().endswith(("...", "…")) for ln in lines) / len(lines),
        "alpha_words_ratio": sum(any(c.isalpha() for c in w) for w in words) / n_all,
        "stop_words": float(len(set(cfg.stop_words) & set(words))),
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


# --- C4, as FineWeb applies it ---------------------------------------------------------------

CITATION_RE = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
END_PUNCTUATION = (".", "?", "!", '"', "'")
POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
SENTENCE_END_RE = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s+\S)")  # a sentence ends and another follows


def c4_scores(doc: Doc, cfg) -> dict[str, float]:
    """C4's line rules, in C4's order; the lines that survive become the document's text."""
    removed: Counter[str] = Counter()
    flags = {"lorem_ipsum": 0.0, "curly_bracket": 0.0}
    kept, sentences = [], 0
    lines = doc.text.splitlines()
    for line in lines:
        line = line.strip()
        words = line.split()
        if cfg.max_word_length >= 0 and any(len(w) > cfg.max_word_length for w in words):
            removed["too_long_word"] += 1
            continue
        if cfg.remove_citations:
            line = CITATION_RE.sub("", line)
        if cfg.filter_no_terminal_punct and (not line.endswith(END_PUNCTUATION) or line.endswith("...")):
            removed["no_terminal_punct"] += 1
            continue
        if len(words) < cfg.min_words_per_line:
            removed["too_few_words"] += 1
            continue
        low = line.lower()
        if cfg.filter_lorem_ipsum and "lorem ipsum" in low:
            flags["lorem_ipsum"] = 1.0
        if cfg.filter_javascript and "javascript" in low:
            removed["javascript"] += 1
            continue
        if cfg.filter_curly_bracket and "{" in line:
            flags["curly_bracket"] = 1.0
        if cfg.filter_policy and any(p in low for p in POLICY):
            removed["policy"] += 1
            continue
        sentences += 1 + len(SENTENCE_END_RE.findall(line))
        kept.append(line)
    doc.text = "\n".join(kept).strip()
    return {**flags, "sentences": float(sentences), "lines": float(len(lines)),
            **{f"lines_removed_{k}": float(removed[k]) for k in C4_LINE_RULES}}


C4_LINE_RULES = ("too_long_word", "no_terminal_punct", "too_few_words", "javascript", "policy")


def c4_rules(cfg) -> list[Rule]:
    return [Rule("lorem_ipsum", "lorem_ipsum", "max", 0), Rule("curly_bracket", "curly_bracket", "max", 0),
            Rule("too_few_sentences", "sentences", "min", cfg.min_num_sentences)]


# --- FineWeb's own rules ---------------------------------------------------------------------

def fineweb_scores(doc: Doc, cfg) -> dict[str, float]:
    text = doc.text
    lines = text.split("\n")
    non_empty = [ln for ln in lines if ln.strip()]
    return {
        "line_punct_ratio": sum(ln.endswith((".", "'", '"', "!", "?")) for ln in lines) / len(lines),
        "short_line_ratio": sum(len(ln) <= cfg.short_line_length for ln in lines) / len(lines),
        "char_dup_ratio": _duplicates(non_empty)[1] / max(len(text) - text.count("\n"), 1),
        "list_ratio": text.count("\n") / max(len(doc.words), 1),
    }


def fineweb_rules(cfg) -> list[Rule]:
    return [Rule("line_punct_ratio", "line_punct_ratio", "above", cfg.line_punct_thr, cfg.line_punct_exclude_zero),
            Rule("short_line_ratio", "short_line_ratio", "below", cfg.short_line_thr),
            Rule("char_dup_ratio", "char_dup_ratio", "below", cfg.char_duplicates_ratio),
            Rule("list_ratio", "list_ratio", "max", cfg.new_line_ratio)]


# --- the shared mechanism --------------------------------------------------------------------

class Filter(NamedTuple):
    name: str
    cfg: object
    scores: Callable[[Doc, object], dict[str, Any]]
    rules: list[Rule]


def build_filters(cfg) -> list[Filter]:
    """The enabled filters, in FineWeb's order."""
    table = [("url", cfg.url, url_scores, url_rules),
             ("language", cfg.language, language_scores, language_rules),
             ("gopher_repetition", cfg.gopher_repetition, gopher_repetition_scores, gopher_repetition_rules),
             ("gopher_quality", cfg.gopher_quality, gopher_quality_scores, gopher_quality_rules),
             ("c4", cfg.c4, c4_scores, c4_rules),
             ("fineweb", cfg.fineweb, fineweb_scores, fineweb_rules)]
    return [Filter(name, c, scores, rules(c)) for name, c, scores, rules in table if c.enabled]


def judge(doc: Doc, filters: list[Filter]) -> tuple[dict[str, Any], str | None]:
    """All scores of one document (prefixed by filter name) and the first failed rule, or None.
    Filters that change the text (C4) leave the cleaned text in ``doc``."""
    scores: dict[str, Any] = {}
    reason = None
    for f in filters:
        s = f.scores(doc, f.cfg)
        scores.update({f"{f.name}.{k}": v for k, v in s.items()})
        if reason is None:
            failed = next((r for r in f.rules if r.fails(s)), None)
            reason = f"{f.name}:{failed.name}" if failed else None
    return scores, reason


def score_fields(filters: list[Filter]) -> list[pa.Field]:
    probe = judge(Doc("a b", "http://a/"), filters)[0]
    return [pa.field(k, pa.string() if isinstance(v, str) else pa.float64()) for k, v in probe.items()]


EMAIL_RE = re.compile(r"\b[\w.!#$%&'*+/=?^`{|}~-]+@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}\b")
IPV4_RE = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b")


def mask_pii(text: str, cfg) -> tuple[str, int]:
    """E-mail addresses and public IPv4 addresses replaced; returns the text and how many were."""
    n = 0
    if cfg.mask_emails:
        text, k = EMAIL_RE.subn("email@example.com", text)
        n += k
    if cfg.mask_ips:
        def public(m: re.Match) -> str:
            nonlocal n
            if ipaddress.ip_address(m.group()).is_global:
                n += 1
                return "0.0.0.0"
            return m.group()
        text = IPV4_RE.sub(public, text)
    return text, n


def filter_batch(rows: list[dict], cfg) -> tuple[list[tuple[dict, str | None]], Counter, int]:
    """A shard of work, in a worker: each row with its scores and the reason it fails (None: kept,
    with the text as the filters left it); C4's removed lines by rule; PII masked."""
    filters = build_filters(cfg)
    out: list[tuple[dict, str | None]] = []
    lines_removed: Counter[str] = Counter()
    masked = 0
    for row in rows:
        doc = Doc(row["text"], row["url"])
        scores, reason = judge(doc, filters)
        if reason:
            out.append(({**row, **scores}, reason))
            continue
        lines_removed.update({k.split("lines_removed_")[1]: int(v) for k, v in scores.items()
                              if "lines_removed_" in k})
        text, n = mask_pii(doc.text, cfg.pii)
        masked += n
        out.append(({**row, **scores, "text": text}, None))
    return out, lines_removed, masked


def filter_docs(cfg, docs: dict, stage_dir: str | Path, runner: dict | None = None) -> dict:
    """Run the filter stage over the extract manifest ``docs``; returns its manifest. Batches of
    documents are judged in worker processes, or on Dask (``runner``, see tasks.workers).

    Kept documents carry the text as the filters left it (C4's line removal, masking);
    dropped ones the text they came with."""
    t0 = time.time()
    schema = with_fields(DOC_SCHEMA, score_fields(build_filters(cfg)))  # loads the language model before fork
    lines_removed: Counter[str] = Counter()
    masked = 0
    with StageWriter("filter", stage_dir, schema) as w, shard_pool(runner, "filter", cfg.processes) as pool, \
            tqdm(total=docs["rows"], desc="filter", unit="doc") as bar:
        batches = batched(iter_rows(docs), DASK_BATCH if isinstance(pool, DaskShards) else BATCH, docs["rows"], pool.width)
        for batch, (judged, removed, n) in in_order(pool, batches, lambda b: pool.submit(filter_batch, b, cfg)):
            for row, reason in judged:
                if reason:
                    w.drop(row, reason)
                else:
                    w.keep(row)
            lines_removed.update(removed)
            masked += n
            bar.update(len(batch))
        w.extra = {"seconds": round(time.time() - t0, 3), "input_rows": docs["rows"],
                   "lines_removed": dict(sorted(lines_removed.items())), "pii_masked": masked, **pool_extra(pool)}
    return w.manifest


@stage_task("filter")
def filter_task(ctx: dict, section: dict, inputs: list[dict], run_id: str) -> tuple[dict, dict]:
    m = filter_docs(FilterConfig.model_validate(section), inputs[0], stage_dir(ctx, "filter"), ctx.get("runner"))
    return m, {"pii_masked": float(m["pii_masked"]),
               **{f"c4_lines_removed.{k}": float(v) for k, v in m["lines_removed"].items()}}
