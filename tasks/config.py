"""The pipeline's configuration: one YAML file, one pydantic model per stage.

Unknown keys and wrong types are refused before any work starts, naming the key. Every field
has a default (FineWeb's published values for the filters) and a description.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ssl_model.config import PRESETS, ModelConfig


DATA_STAGES = ("collect", "extract", "filter", "dedup", "decontaminate", "tokenize")   # in order, before train


class ConfigError(ValueError):
    """A configuration file or override that cannot be used; the message names the key."""


class Section(BaseModel):
    """A config section. What a key means is in the fields once the section is validated (a
    preset's shape filled in where not set: see TrainConfig), never in whether a key was written,
    so its JSON dump, every key written, validates back to an equal section: what a stage rebuilds
    from the dump it receives is what the user wrote, and equal meanings dump (and cache) alike.
    A null that means "derive" stays null when what it derives from is in the section too."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def handoff(self) -> dict:
        """The section as a stage receives it (and as its cache key holds it): its JSON dump,
        checked to validate back to this very section; a ConfigError names the keys that would not."""
        data = self.model_dump(mode="json")
        back = type(self).model_validate(data)
        if back != self:
            keys = [k for k in type(self).model_fields if getattr(back, k) != getattr(self, k)]
            raise ConfigError(f"{type(self).__name__}: {', '.join(keys) or 'the section'} would not mean the same "
                              "to the stage as in the configuration")
        return data


class TableSource(Section):
    path: str = Field(description="Parquet or JSON Lines file (local, http(s) or s3 URL).")
    text_column: str = Field("text", description="Column holding the document text.")
    url_column: str | None = Field("url", description="Column holding the document URL, if any.")


class CollectConfig(Section):
    start_urls: list[str] = Field([], description="Crawl these URLs and the same-host pages they link to.")
    url_lists: list[str] = Field([], description="Text (one URL a line) or CSV (a 'url' column) files of URLs to fetch.")
    sitemaps: list[str] = Field([], description="sitemap.xml URLs (indexes followed); their pages are fetched.")
    warc_files: list[str] = Field([], description="WARC or WET files, gzipped or not: local paths or http(s)/s3 URLs.")
    tables: list[TableSource] = Field([], description="Parquet or JSON Lines files with a text column.")
    paths: list[str] = Field([], description="Local .html/.htm/.txt files or folders of them, read as pages.")
    pydoc_modules: list[str] | None = Field(
        None, description="Standard-library modules rendered as the embedded pydoc site, crawled when no "
                          "other source is given; null means the curated default list.")
    max_pages: int = Field(500, ge=1, description="Stop fetching after this many pages (crawl, URL lists, sitemaps).")
    concurrency: int = Field(8, ge=1, le=256, description="Requests in flight at once, all hosts together.")
    per_host_concurrency: int = Field(4, ge=1, description="Requests in flight at once to one host.")
    per_host_rps: float = Field(20.0, gt=0, description="Most requests started per second to one host "
                                                          "(robots.txt Crawl-delay slows it further).")
    connect_timeout_s: float = Field(5.0, gt=0, description="Time limit to connect.")
    read_timeout_s: float = Field(10.0, gt=0, description="Time limit between two reads of a response.")
    timeout_s: float = Field(30.0, gt=0, description="Time limit of a whole request, body included (slow drips).")
    retries: int = Field(2, ge=0, le=10, description="Retries after a timeout, connection error, 429 or 5xx.")
    backoff_s: float = Field(0.5, ge=0, description="First retry waits this long; each next one twice as long.")
    max_retry_after_s: float = Field(60.0, ge=0, description="Longest Retry-After honoured; longer ones give up.")
    max_redirects: int = Field(5, ge=0, description="Redirects followed per request.")
    respect_robots: bool = Field(True, description="Honour robots.txt (Disallow and Crawl-delay) of every host.")
    user_agent: str = Field("ssl-pipeline/0.1", description="User-Agent header sent with every request.")
    max_bytes: int = Field(10_000_000, ge=1024, description="Responses larger than this, on the wire or "
                                                             "decompressed, are dropped as too_large.")
    content_types: list[str] = Field(["text/html", "application/xhtml+xml", "text/plain"],
                                     description="Media types collected; others are dropped as not_html.")
    allow_private: list[str] = Field([], description="Networks (CIDR) or hosts the crawler may reach although "
                                                      "private, loopback, link-local or reserved.")
    max_depth: int = Field(10, ge=0, description="Links are followed at most this many hops from a start URL; "
                                                   "further links are recorded as max_depth.")
    max_query_variants: int = Field(50, ge=0, description="Links followed per path that differ only in their query "
                                                          "string; more are recorded as crawl_trap.")
    max_path_segments: int = Field(20, ge=1, description="Links with more path segments are recorded as crawl_trap.")
    max_segment_repeats: int = Field(2, ge=1, description="Links whose path repeats one segment more often "
                                                          "(/a/b/a/b/a/) are recorded as crawl_trap.")
    max_pattern_failures: int = Field(5, ge=1, description="Links of one numbered form (/cal/#/#/x.html) are "
                                                           "recorded as crawl_trap once this many failed (HTTP 4xx) "
                                                           "and none succeeded.")
    strip_query_params: list[str] = Field(
        ["utm_*", "gclid", "dclid", "fbclid", "msclkid", "yclid", "gbraid", "wbraid", "mc_cid", "mc_eid", "_ga",
         "_gl", "igshid", "phpsessid", "jsessionid", "aspsessionid*", "sessionid", "session_id", "sid", "cfid",
         "cftoken"],
        description="Query parameters (glob patterns, any case) removed from URLs before they are compared and "
                    "fetched: tracking and session ids.")

    @field_validator("start_urls", "sitemaps")
    @classmethod
    def _http_urls(cls, urls: list[str]) -> list[str]:
        for u in urls:
            parts = urlsplit(u)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"{u!r} is not an http(s) URL with a host")
        return urls

    def has_sources(self) -> bool:
        return bool(self.start_urls or self.url_lists or self.sitemaps or self.warc_files or self.tables
                    or self.paths)


class ExtractConfig(Section):
    favor_precision: bool = Field(False, description="trafilatura: prefer less text but less noise.")
    favor_recall: bool = Field(False, description="trafilatura: prefer more text even if noisier.")
    include_tables: bool = Field(True, description="trafilatura: keep text found in tables.")
    include_comments: bool = Field(False, description="trafilatura: keep comment sections.")
    with_metadata: bool = Field(False, description="trafilatura's own metadata search (date, title, language); "
                                                    "~40% slower. Off: title from <title>, language from <html lang>.")
    processes: int | None = Field(None, ge=1, description="Extraction worker processes (null: one per CPU core).")
    timeout_s: float = Field(30.0, gt=0, description="Time limit per page; slower pages are dropped as extract_timeout.")


class GopherRepetitionConfig(Section):
    enabled: bool = Field(True, description="Apply Gopher's repetition rules.")
    dup_line_frac: float = Field(0.30, description="Max fraction of lines that are duplicates.")
    dup_para_frac: float = Field(0.30, description="Max fraction of paragraphs that are duplicates.")
    dup_line_char_frac: float = Field(0.20, description="Max fraction of characters in duplicate lines.")
    dup_para_char_frac: float = Field(0.20, description="Max fraction of characters in duplicate paragraphs.")
    top_n_grams: dict[int, float] = Field(
        {2: 0.20, 3: 0.18, 4: 0.16}, description="n -> max char fraction of the most frequent word n-gram.")
    dup_n_grams: dict[int, float] = Field(
        {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
        description="n -> max char fraction covered by duplicated word n-grams.")


class GopherQualityConfig(Section):
    enabled: bool = Field(True, description="Apply Gopher's quality rules.")
    min_doc_words: int = Field(50, description="Min words (punctuation excluded).")
    max_doc_words: int = Field(100_000, description="Max words (punctuation excluded).")
    min_avg_word_length: float = Field(3, description="Min mean word length, characters.")
    max_avg_word_length: float = Field(10, description="Max mean word length, characters.")
    max_symbol_word_ratio: float = Field(0.1, description="Max '#' per word, and max ellipses per word.")
    max_bullet_lines_ratio: float = Field(0.9, description="Max fraction of lines starting with a bullet.")
    max_ellipsis_lines_ratio: float = Field(0.3, description="Max fraction of lines ending with an ellipsis.")
    min_alpha_words_ratio: float = Field(0.8, description="Min fraction of words with an alphabetic character.")
    min_stop_words: int = Field(2, description="Min count of stop words.")
    stop_words: list[str] = Field(["the", "be", "to", "of", "and", "that", "have", "with"],
                                  description="The stop words counted by min_stop_words.")


class UrlFilterConfig(Section):
    enabled: bool = Field(True, description="Drop documents whose URL is on the blocklist.")
    blocked_domains: list[str] = Field([], description="Domains dropped with all their subdomains "
                                                        "(example.com also blocks www.example.com).")
    blocked_substrings: list[str] = Field([], description="Drop URLs containing any of these (case-insensitive).")


class LanguageConfig(Section):
    enabled: bool = Field(True, description="Identify each document's language (py3langid, model inside the "
                                            "package) and keep only the listed languages.")
    languages: list[str] = Field(["en"], description="ISO 639-1 codes of the languages kept.")
    min_score: float = Field(0.65, ge=0, le=1, description="Min probability of the identified language "
                                                           "(FineWeb: 0.65 with fastText).")


class C4Config(Section):
    enabled: bool = Field(True, description="Apply C4's rules as FineWeb uses them (lines are removed, "
                                            "some documents dropped).")
    remove_citations: bool = Field(True, description="Remove Wikipedia-style citations: [1], [edit], "
                                                      "[citation needed].")
    filter_no_terminal_punct: bool = Field(False, description="Remove lines not ending in . ? ! \" ' "
                                                              "(FineWeb turns this C4 rule off).")
    min_words_per_line: int = Field(3, description="Remove lines with fewer words.")
    max_word_length: int = Field(1000, description="Remove lines with a longer word (characters).")
    filter_javascript: bool = Field(True, description="Remove lines that mention javascript.")
    filter_policy: bool = Field(True, description="Remove lines with terms-of-use, privacy or cookie phrases.")
    filter_lorem_ipsum: bool = Field(True, description="Drop documents containing 'lorem ipsum'.")
    filter_curly_bracket: bool = Field(True, description="Drop documents containing '{'.")
    min_num_sentences: int = Field(5, description="Drop documents with fewer sentences left (-1: off).")


class FineWebConfig(Section):
    enabled: bool = Field(True, description="Apply FineWeb's own quality rules.")
    line_punct_thr: float = Field(0.12, description="Drop when the fraction of lines ending in terminal "
                                                    "punctuation is below this.")
    line_punct_exclude_zero: bool = Field(False, description="Keep documents with no such line at all.")
    short_line_thr: float = Field(0.67, description="Drop when the fraction of short lines is above this.")
    short_line_length: int = Field(30, description="Lines of at most this many characters are short.")
    char_duplicates_ratio: float = Field(0.01, description="Drop when characters in duplicated lines / "
                                                           "non-newline characters is above this.")
    new_line_ratio: float = Field(0.3, description="Drop when newlines per word exceed this (lists).")


class PiiConfig(Section):
    mask_emails: bool = Field(False, description="Replace e-mail addresses in kept documents with "
                                                 "email@example.com.")
    mask_ips: bool = Field(False, description="Replace public IPv4 addresses in kept documents with 0.0.0.0.")


class FilterConfig(Section):
    enabled: bool = Field(True, description="false: every quality filter off, all documents pass (PII masking "
                                            "still applies as set): a raw-data baseline.")
    url: UrlFilterConfig = Field(default_factory=UrlFilterConfig, description="URL blocklist.")
    language: LanguageConfig = Field(default_factory=LanguageConfig, description="Language identification.")
    gopher_repetition: GopherRepetitionConfig = Field(default_factory=GopherRepetitionConfig,
                                                      description="Gopher repetition rules (FineWeb defaults).")
    gopher_quality: GopherQualityConfig = Field(default_factory=GopherQualityConfig,
                                                description="Gopher quality rules (FineWeb defaults).")
    c4: C4Config = Field(default_factory=C4Config, description="C4 rules as FineWeb applies them.")
    fineweb: FineWebConfig = Field(default_factory=FineWebConfig, description="FineWeb's quality rules.")
    pii: PiiConfig = Field(default_factory=PiiConfig, description="Masking of e-mail and IP addresses.")
    processes: int | None = Field(None, ge=1, description="Worker processes judging batches of documents "
                                                          "(null: one per CPU core).")


class DedupConfig(Section):
    exact: bool = Field(True, description="Drop documents whose normalized text equals another's (exact_duplicate).")
    near: bool = Field(True, description="Drop near duplicates: MinHash LSH candidates whose Jaccard reaches threshold.")
    ngram: int = Field(5, ge=1, description="Shingles are word n-grams of this size.")
    num_perm: int = Field(112, ge=8, description="MinHash permutations; must equal bands * rows when both are set.")
    bands: int | None = Field(14, ge=1, description="LSH bands (null, with rows: derive both from threshold).")
    rows: int | None = Field(8, ge=1, description="LSH rows per band (null, with bands: derive both from threshold).")
    threshold: float = Field(0.8, gt=0, le=1,
                             description="Jaccard similarity of word n-gram sets that makes two documents near "
                                         "duplicates: every LSH candidate pair is verified against it.")
    seed: int = Field(1, description="MinHash seed: signatures are comparable only with the same seed.")
    survivor: Literal["longest", "oldest", "first"] = Field(
        "longest", description="Kept document, picked first: longest text, earliest fetched_at, or smallest "
                               "doc_id (ties always by smallest doc_id).")
    processes: int | None = Field(None, ge=1, description="Worker processes computing signatures, one input "
                                                          "shard each (null: one per CPU core).")

    def catch_probability(self, jaccard: float, bands: int | None = None, rows: int | None = None) -> float:
        """Probability that a pair of this Jaccard shares at least one LSH band (becomes a candidate)."""
        b, r = (bands, rows) if bands is not None else self.lsh()
        return 1 - (1 - jaccard ** r) ** b

    def lsh(self, recall: float = 0.9) -> tuple[int, int]:
        """(bands, rows): as set, or derived from the threshold: the most rows per band (fewest
        candidates to verify) whose bands = num_perm // rows still catch pairs at the threshold
        with probability ``recall`` (14 x 8 for 112 permutations at 0.8)."""
        if self.bands is not None:
            return self.bands, self.rows
        for r in range(self.num_perm, 0, -1):
            if self.catch_probability(self.threshold, self.num_perm // r, r) >= recall:
                return self.num_perm // r, r
        return self.num_perm, 1

    @model_validator(mode="after")
    def _lsh_params(self) -> "DedupConfig":
        if (self.bands is None) != (self.rows is None):
            raise ValueError("set both bands and rows, or neither (then they are derived from threshold)")
        if self.bands is not None and self.bands * self.rows != self.num_perm:
            raise ValueError(f"bands * rows = {self.bands * self.rows} must equal num_perm = {self.num_perm}")
        if self.near and self.bands is not None:
            p = self.catch_probability(self.threshold)
            if p < 0.5:   # most pairs at the threshold would never be compared
                raise ValueError(f"{self.bands} bands x {self.rows} rows find pairs at the threshold "
                                 f"{self.threshold} with probability {p:.2f}: set bands and rows to null to "
                                 "derive them from the threshold, or give ones that find them")
        return self


class TokenizeConfig(Section):
    vocab_size: int = Field(8192, ge=300, le=1_000_000, description="BPE vocabulary size, special tokens included.")
    min_frequency: int = Field(2, ge=1, description="Merges need at least this many occurrences.")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="Fraction of documents held out for validation.")
    seed: int = Field(0, description="Seed of the train/validation split (by doc_id hash).")
    tokenizer: str | None = Field(None, description="An existing tokenizer.json (a tokenize stage's) to use instead of "
                                                    "training one, vocab_size then ignored: an ablation's variants "
                                                    "share one.")


class DecontaminateConfig(Section):
    enabled: bool = Field(True, description="Drop every training document that shares an n-gram with an evaluation "
                                            "document (false: no n-gram check; held-out documents still set aside).")
    ngram: int = Field(13, ge=5, description="Words per n-gram (13, as GPT-3), of the text normalized as dedup does.")
    heldout_fraction: float = Field(0.05, ge=0, lt=1, description="Fraction of documents kept out of the tokenizer "
                                                                  "and the model, as text for the evaluate stage's "
                                                                  "suite (by doc_id hash).")
    seed: int = Field(0, description="Seed of the held-out selection (by doc_id hash: the top of its range).")
    tasks: list[str] | None = Field(None, description="lm-eval tasks whose local data are evaluation documents too "
                                                      "(null: evaluate.tasks); one whose data is missing is skipped.")
    include_path: list[str] | None = Field(None, description="Folders of lm-eval task files those tasks may be in "
                                                             "(null: evaluate.include_path).")
    max_doc_frequency: int | None = Field(10, ge=1, description="An evaluation n-gram found in more training documents "
                                                                "than this is ignored as common text (boilerplate, "
                                                                "licences, navigation), as GPT-3 did; null: none is.")
    copy_fraction: float = Field(0.5, gt=0, le=1, description="A training document at least this fraction of whose "
                                                              "n-grams are evaluation n-grams is a copy: contaminated, "
                                                              "common n-grams or not.")
    processes: int | None = Field(None, ge=1, description="Worker processes for the n-gram pass (null: one per core).")


PRESET_KEYS = frozenset(k for shape in PRESETS.values() for k in shape)   # the fields a preset sets


class TrainConfig(Section):
    preset: Literal["test", "tiny", "small", "gpt2-124m"] | None = Field(
        None, description="Model shape preset (see ssl_model/config.py): sets n_layer, n_head, n_embd and "
                          "block_size; those set here override it.")
    arch: Literal["gpt2", "llama"] = Field("gpt2", description="gpt2: learned positions, LayerNorm, GELU; "
                                                                 "llama: RoPE, RMSNorm, SwiGLU, no biases.")
    n_layer: int = Field(4, ge=1, description="Transformer blocks.")
    n_head: int = Field(4, ge=1, description="Attention heads.")
    n_embd: int = Field(256, ge=8, description="Model width.")
    n_kv_head: int | None = Field(None, ge=1, description="llama: key/value heads (null: n_head).")
    mlp_hidden: int | None = Field(None, ge=8, description="MLP width (null: 4x width for gpt2, ~8/3x for llama).")
    block_size: int = Field(256, ge=8, description="Context length in tokens.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout probability (contrastive needs > 0).")
    tie_embeddings: bool = Field(True, description="Share the input embedding and the output head.")
    qk_norm: bool = Field(False, description="llama: RMSNorm on queries and keys per head.")
    rope_theta: float = Field(10000.0, gt=0, description="llama: RoPE base.")
    objective: Literal["causal", "mlm", "contrastive"] = Field(
        "causal", description="causal: next token; mlm: BERT-style masked tokens; contrastive: SimCSE.")
    mask_prob: float = Field(0.15, gt=0, lt=1, description="mlm: fraction of tokens chosen (80/10/10).")
    temperature: float = Field(0.05, gt=0, description="contrastive: InfoNCE temperature.")
    batch_size: int = Field(16, ge=1, description="Sequences per micro-batch (per GPU under torchrun).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_steps: int = Field(1000, ge=1, description="Optimizer steps.")
    optimizer: Literal["adamw", "muon"] = Field("adamw", description="muon: Muon for the blocks' 2-D weights, "
                                                                   "AdamW for the rest.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    min_lr: float = Field(1e-4, ge=0, description="Learning rate at the end of the decay.")
    warmup_steps: int = Field(100, ge=0, description="Linear warmup steps.")
    schedule: Literal["cosine", "wsd"] = Field("cosine", description="cosine decay, or warmup-stable-decay.")
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: fraction of steps in the final decay.")
    weight_decay: float = Field(0.1, ge=0, description="Weight decay (2-D weights only).")
    grad_clip: float = Field(1.0, ge=0, description="Clip the gradient norm to this (0: off).")
    spike_factor: float = Field(4.0, ge=0, description="Skip a step whose loss exceeds this times the recent "
                                                       "average (0: only non-finite losses are skipped).")
    max_bad_steps: int = Field(5, ge=1, description="Stop after this many skipped steps in a row.")
    eval_interval: int = Field(100, ge=1, description="Validate every this many steps (and at the end).")
    eval_batches: int = Field(10, ge=1, description="Validation batches per evaluation.")
    sample_tokens: int = Field(48, ge=0, description="causal: tokens generated at each evaluation (0: none).")
    checkpoint_interval: int = Field(250, ge=1, description="Checkpoint every this many steps (and at the end).")
    seed: int = Field(1337, description="Seed of initialisation, batch order, dropout and masks.")
    device: str = Field("auto", description="'auto' (CUDA if present, else CPU), 'cpu', 'cuda' or 'cuda:N'.")
    threads: int | None = Field(None, ge=1, description="CPU threads for torch (null: torch's default).")
    compile: bool = Field(False, description="torch.compile the model and loss.")
    bf16: bool = Field(True, description="bf16 autocast on CUDA.")
    export_hf: bool = Field(True, description="causal: also export a Hugging Face transformers checkpoint.")
    init_from: str | None = Field(
        None, description="Start from this model's weights, not random ones (step 0, a new optimizer): a registered "
                          "model (models:/NAME/VERSION, /latest or @ALIAS), a runs:/ID/PATH checkpoint, or a checkpoint "
                          "file or folder here. Same shape (dropout aside) and the same tokenizer.")

    @model_validator(mode="after")
    def _apply_preset(self) -> "TrainConfig":
        """The preset's shape in the fields themselves, where the config does not set them: the
        section then says what is trained, and its dump (every key set) validates to the same
        shape. Assigning ``preset`` later re-applies it (or the defaults, for None) the same way."""
        shape = PRESETS[self.preset] if self.preset else {}
        for key in PRESET_KEYS - self.model_fields_set:
            # not setattr: validate_assignment would run this validator again
            self.__dict__[key] = shape.get(key, type(self).model_fields[key].default)
        return self

    def model_shape(self) -> dict:
        """The model fields (the preset applied: see ``_apply_preset``)."""
        return {k: getattr(self, k) for k in ModelConfig.__dataclass_fields__ if k in type(self).model_fields}


class EvaluateConfig(Section):
    enabled: bool = Field(True, description="Run the evaluate stage after train.")
    suite: bool = Field(True, description="Score the built-in suite made from the held-out documents: bits per "
                                          "byte, a continuation choice (HellaSwag's form), a cloze (LAMBADA's form).")
    max_items: int = Field(200, ge=10, description="Items per suite task at most, spread evenly over the held-out "
                                                   "documents (a standard error shrinks as 1/sqrt(items)).")
    tasks: list[str] = Field([], description="lm-evaluation-harness tasks by name (hellaswag, arc_easy, piqa, ...), "
                                             "scored where their datasets are in the Hugging Face datasets cache.")
    include_path: list[str] = Field([], description="Folders of your own lm-eval task files (YAML), whose tasks "
                                                     "can then be named in tasks.")
    sources: list[str] = Field([], description="Sources whose pages are evaluation documents, collected and extracted "
                                               "on their own, in the suite, and kept out of training (decontaminate): "
                                               "what collect reads, each by its form: an http(s) URL to crawl, a "
                                               "sitemap .xml URL, a WARC/WET file, a Parquet/JSON Lines table (text "
                                               "column 'text'), or a local .html/.txt file or folder.")
    limit: int | None = Field(None, ge=1, description="Items per named task at most (null: all of them).")
    untrained: bool = Field(True, description="Score an untrained model of the same shape too: chance, measured.")
    baselines: list[str] = Field([], description="Other models scored on the same tasks: Hugging Face folders, "
                                                 "registered models (models:/NAME/VERSION) or runs:/ checkpoints.")
    batch_size: int = Field(32, ge=1, description="Requests per forward pass.")
    device: str = Field("auto", description="'auto' (CUDA if present, else CPU), 'cpu', 'cuda' or 'cuda:N'.")
    seed: int = Field(0, description="Seed of the suite's distractors, the untrained model and the probe's split.")

    def collect_section(self, collect: CollectConfig) -> CollectConfig:
        """``collect`` reading ``sources`` instead of its own sources (its other settings kept)."""
        found: dict[str, list] = {"start_urls": [], "sitemaps": [], "warc_files": [], "tables": [], "paths": []}
        for spec in self.sources:
            name = urlsplit(spec).path.lower().removesuffix(".gz")
            web = spec.startswith(("http://", "https://"))
            kind = ("warc_files" if name.endswith((".warc", ".wet")) else
                    "tables" if name.endswith((".parquet", ".jsonl", ".json")) else
                    "sitemaps" if web and name.endswith(".xml") else "start_urls" if web else "paths")
            found[kind].append({"path": spec} if kind == "tables" else spec)
        return CollectConfig.model_validate({**collect.model_dump(), **found, "url_lists": [], "pydoc_modules": []})

    @model_validator(mode="after")
    def _something_to_score(self) -> "EvaluateConfig":
        if self.enabled and not self.suite and not self.tasks:
            raise ValueError("evaluate has nothing to score: set suite: true or name tasks (or enabled: false)")
        try:
            self.collect_section(CollectConfig())
        except ValidationError as e:
            raise ValueError(f"sources: {e.errors()[0]['msg']}") from None
        return self


class TrackingConfig(Section):
    experiment: str = Field("ssl-pipeline", description="MLflow experiment name.")
    registered_model: str = Field("ssl-gpt", description="Name under which the trained model is registered.")


class CacheConfig(Section):
    across_runs: bool = Field(True, description="Reuse a stage's result from any earlier run with the same "
                                                "inputs (by content), config section and code; false: only "
                                                "within one flow run, on retry.")
    storage: str | None = Field(None, description="Where stage results (manifests) are kept for reuse, shared "
                                                  "by every worker: a folder (default <data_dir>/.results) or "
                                                  "an s3://bucket/prefix URL.")
    storage_options: dict[str, Any] = Field({}, description="fsspec options for an s3:// storage, e.g. "
                                                           "{client_kwargs: {endpoint_url: http://minio:9000}}.")


class RunnerConfig(Section):
    train_deployment: str | None = Field(None, description="Run the train stage as this Prefect deployment "
                                                           "(e.g. ssl-train/gpu, on a GPU work pool) with "
                                                           "run_deployment; null: in the pipeline's process.")
    task_runner: Literal["local", "dask"] = Field(
        "local", description="Where the shards of work of collect (WARC/WET and table files), extract, filter and "
                             "dedup run: local worker processes, or Prefect tasks on a Dask cluster (prefect-dask).")
    dask_address: str | None = Field(None, description="Scheduler of a running Dask cluster (tcp://host:8786) for "
                                                       "task_runner: dask; null: a LocalCluster for each run. Its "
                                                       "workers need this package and the data_dir (shared storage).")
    dask_workers: int | None = Field(None, ge=1, description="Worker processes of the LocalCluster "
                                                             "(null: one per CPU core).")

    @model_validator(mode="after")
    def _dask_settings_need_dask(self):
        if self.task_runner != "dask" and (self.dask_address or self.dask_workers):
            raise ValueError("runner.dask_address and runner.dask_workers apply to runner.task_runner: dask "
                             f"(it is {self.task_runner!r})")
        return self


class NotifyConfig(Section):
    webhook_url: str | None = Field(None, description="On a failed run, POST a JSON notice (flow run id, stage, "
                                                      "error, UI links) to this URL.")
    timeout_s: float = Field(10.0, gt=0, description="Time limit of the webhook request.")


class PipelineConfig(Section):
    data_dir: str = Field("runs", description="Where every stage writes its Parquet shards, per flow run.")
    collect: CollectConfig = Field(default_factory=CollectConfig, description="Stage 1: collect pages.")
    extract: ExtractConfig = Field(default_factory=ExtractConfig, description="Stage 2: extract main text.")
    filter: FilterConfig = Field(default_factory=FilterConfig, description="Stage 3: quality filters.")
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="Stage 4: deduplication.")
    decontaminate: DecontaminateConfig = Field(default_factory=DecontaminateConfig,
                                               description="Stage 5: held-out documents and decontamination.")
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig, description="Stage 6: tokenizer and shards.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Stage 7: pretraining.")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig, description="Stage 8: evaluation.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow names.")
    cache: CacheConfig = Field(default_factory=CacheConfig, description="Reuse of finished stages.")
    runner: RunnerConfig = Field(default_factory=RunnerConfig, description="Where stages run.")
    notify: NotifyConfig = Field(default_factory=NotifyConfig, description="Failure notices.")

    @model_validator(mode="after")
    def _decontaminate_against_evaluate(self) -> "PipelineConfig":
        """decontaminate's null tasks and include_path mean evaluate's: filled in, so that the
        stage's section (and its cache key) says which tasks it checked against."""
        for key in ("tasks", "include_path"):
            if getattr(self.decontaminate, key) is None:
                self.decontaminate.__dict__[key] = list(getattr(self.evaluate, key))
        return self


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is not a section")
        node = child
    node[leaf] = value


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read the YAML file (or nothing: all defaults), apply ``section.key=value`` overrides, validate."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        _set(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as e:
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid configuration{where}:\n{_describe(e)}") from None


def flatten(cfg: PipelineConfig) -> dict[str, str]:
    """The resolved config as flat ``section.key`` -> string params for MLflow."""
    out: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node and all(isinstance(k, str) for k in node):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = json.dumps(node) if not isinstance(node, str) else node

    walk("", cfg.model_dump(mode="json"))
    return out
