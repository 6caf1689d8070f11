"""Every ``reason`` a stage can write on a dropped row: one registry, code -> (stage, meaning).

Stages write these codes (``StageWriter.drop(row, reason)``); the manifests and MLflow count
them (``dropped.<reason>``), ``ssl-pipeline why`` shows them, and the documentation's reason-code
table is generated from this dict. ``tests/test_reasons.py`` checks that every code the stage
modules can write is listed here. Codes with ``<...>`` stand for a family (``http_<status>`` is
``http_404``, ``http_410``, ...). This module only names the codes; it changes no stage.
"""

from __future__ import annotations

import re

REASONS: dict[str, tuple[str, str]] = {
    # --- collect: a page, record or link that was not collected -------------------------------
    "http_<status>": ("collect", "the server answered with that HTTP status (a 4xx other than 429; or a WARC "
                                 "response record's status other than 200)"),
    "http_5xx": ("collect", "the server answered 5xx, still after `collect.retries`"),
    "http_429": ("collect", "the server answered 429 (too many requests), still after `collect.retries`"),
    "connect_error": ("collect", "the host could not be reached"),
    "dns_error": ("collect", "the host's name could not be resolved"),
    "timeout": ("collect", "`connect_timeout_s`, `read_timeout_s` or `timeout_s` fired (the `error` column says "
                           "which, and whether any byte of the body had come)"),
    "blocked_address": ("collect", "the host resolves to a private, loopback, link-local or reserved address not "
                                   "in `collect.allow_private`"),
    "robots": ("collect", "robots.txt disallows it"),
    "redirect_loop": ("collect", "its redirects loop"),
    "too_many_redirects": ("collect", "it redirects more than `collect.max_redirects` times"),
    "bad_url": ("collect", "its URL (or a redirect's target) cannot be parsed"),
    "not_html": ("collect", "its media type is not in `collect.content_types`, the body is binary, or a local "
                            "file's suffix is not .html/.htm/.txt"),
    "not_document": ("collect", "a site's housekeeping file (`/robots.txt`, `/ads.txt`, `/sellers.json`, "
                                "`/security.txt`, `/.well-known/...`)"),
    "too_large": ("collect", "its body exceeds `collect.max_bytes` on the wire or decompressed (for a WARC "
                             "record, its payload)"),
    "empty_body": ("collect", "its body (page, WARC/WET record, table row, local file) is empty or blank"),
    "decode_error": ("collect", "no character encoding fits its bytes, or its compression is broken"),
    "max_depth": ("collect", "a link more than `collect.max_depth` hops from a start URL (not fetched)"),
    "crawl_trap": ("collect", "a link over `max_query_variants`, `max_path_segments`, `max_segment_repeats` or "
                              "`max_pattern_failures` (not fetched; the `error` names the bound)"),
    "warc_bad_length": ("collect", "a WARC record's declared `Content-Length` does not match where it ends"),
    "warc_truncated": ("collect", "the WARC file ends inside its last record"),
    "warc_bad_gzip": ("collect", "a gzip member of the WARC file does not decompress"),
    "warc_bad_header": ("collect", "bytes where a WARC record header should be are not one"),
    "http_invalid": ("collect", "a WARC response record has no readable HTTP status line"),
    "not_found": ("collect", "a local path does not exist"),
    "fetch_error": ("collect", "anything else that went wrong with one page (its traceback is logged; the crawl "
                               "goes on)"),
    "sitemap_<reason>": ("collect", "a sitemap could not be fetched: `<reason>` is one of the codes above "
                                    "(`sitemap_http_404`, `sitemap_timeout`, ...)"),
    "sitemap_invalid": ("collect", "a sitemap's body is not a sitemap"),
    # --- extract --------------------------------------------------------------------------------
    "no_main_text": ("extract", "trafilatura finds no main text (or a plain-text page is blank)"),
    "extract_error": ("extract", "trafilatura raised an error on the page (logged)"),
    "extract_timeout": ("extract", "extraction took longer than `extract.timeout_s`"),
    # --- filter: <filter>:<rule>, the first rule that failed, in FineWeb's order ----------------
    "url:blocked_domain": ("filter", "its host is a domain of `filter.url.blocked_domains` or a subdomain of one"),
    "url:blocked_substring": ("filter", "its URL contains one of `filter.url.blocked_substrings`"),
    "language:language": ("filter", "its most likely language is not in `filter.language.languages`"),
    "language:min_score": ("filter", "that language's probability is not above `filter.language.min_score`"),
    "gopher_repetition:dup_para_frac": ("filter", "duplicate paragraphs / paragraphs exceed `dup_para_frac`"),
    "gopher_repetition:dup_para_char_frac": ("filter", "characters in duplicate paragraphs / characters exceed "
                                                       "`dup_para_char_frac`"),
    "gopher_repetition:dup_line_frac": ("filter", "duplicate lines / lines exceed `dup_line_frac` (a run of "
                                                  "newlines is one break)"),
    "gopher_repetition:dup_line_char_frac": ("filter", "characters in duplicate lines / characters exceed "
                                                       "`dup_line_char_frac`"),
    **{f"gopher_repetition:top_{n}_gram": ("filter", f"characters of the most frequent word {n}-gram / characters "
                                                     f"exceed `top_n_grams[{n}]` (one code per n listed there)")
       for n in (2, 3, 4)},
    **{f"gopher_repetition:dup_{n}_gram": ("filter", f"characters in duplicated word {n}-grams / characters exceed "
                                                     f"`dup_n_grams[{n}]` (one code per n listed there)")
       for n in (5, 6, 7, 8, 9, 10)},
    "gopher_quality:min_doc_words": ("filter", "fewer words (punctuation excluded) than `min_doc_words`"),
    "gopher_quality:max_doc_words": ("filter", "more words (punctuation excluded) than `max_doc_words`"),
    "gopher_quality:min_avg_word_length": ("filter", "mean word length below `min_avg_word_length`"),
    "gopher_quality:max_avg_word_length": ("filter", "mean word length above `max_avg_word_length`"),
    "gopher_quality:max_hash_ratio": ("filter", "`#` per word above `max_symbol_word_ratio`"),
    "gopher_quality:max_ellipsis_ratio": ("filter", "ellipses per word above `max_symbol_word_ratio`"),
    "gopher_quality:max_bullet_lines_ratio": ("filter", "lines starting with a bullet above "
                                                        "`max_bullet_lines_ratio`"),
    "gopher_quality:max_ellipsis_lines_ratio": ("filter", "lines ending with an ellipsis above "
                                                          "`max_ellipsis_lines_ratio`"),
    "gopher_quality:min_alpha_words_ratio": ("filter", "words (and punctuation tokens) containing a letter below "
                                                       "`min_alpha_words_ratio`"),
    "gopher_quality:min_stop_words": ("filter", "fewer distinct stop words than `min_stop_words`"),
    "c4:lorem_ipsum": ("filter", "a line left by C4's line removal contains \"lorem ipsum\""),
    "c4:curly_bracket": ("filter", "a line left by C4's line removal contains `{`"),
    "c4:too_few_sentences": ("filter", "fewer sentences left than `min_num_sentences`"),
    "fineweb:line_punct_ratio": ("filter", "non-blank lines ending in a sentence terminal / non-blank lines below "
                                           "`line_punct_thr` (a ratio of 0 passes with `line_punct_exclude_zero`)"),
    "fineweb:short_line_ratio": ("filter", "non-blank lines of at most `short_line_length` characters / non-blank "
                                           "lines above `short_line_thr`"),
    "fineweb:char_dup_ratio": ("filter", "characters in duplicated lines / non-newline characters above "
                                         "`char_duplicates_ratio`"),
    "fineweb:list_ratio": ("filter", "newlines per word above `new_line_ratio`"),
    # --- dedup ------------------------------------------------------------------------------------
    "exact_duplicate": ("dedup", "its normalized text equals another document's (`duplicate_of` names the kept "
                                 "one)"),
    "near_duplicate": ("dedup", "its Jaccard similarity to a kept document reaches `dedup.threshold` "
                                "(`duplicate_of`, `jaccard`)"),
    # --- decontaminate ----------------------------------------------------------------------------
    "held_out": ("decontaminate", "set aside as an evaluation document (never tokenized or trained on)"),
    "contaminated": ("decontaminate", "shares a non-common n-gram (13 words by default) with an evaluation "
                                      "document, or is a copy of one (`contaminated_by`, `eval_doc_id`, `ngram`)"),
}

STAGES = ("collect", "extract", "filter", "dedup", "decontaminate")


def _pattern(code: str) -> re.Pattern:
    return re.compile("".join(".+" if part.startswith("<") else re.escape(part)
                              for part in re.split(r"(<[^>]*>)", code)) + r"\Z")


_PATTERNS = [_pattern(code) for code in REASONS if "<" in code]


def known(code: str) -> bool:
    """Whether ``code`` is listed, by name or as one of a family's members (``http_404``)."""
    return code in REASONS or any(p.match(code) for p in _PATTERNS)
