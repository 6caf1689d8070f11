"""Stage 2, extract: trafilatura's main text and metadata of each collected page.

Extraction is the costly part of collection (~40 pages/s per core here), so it runs in worker
processes over batches of pages, in order. Each page has a time limit: one pathological page
cannot stall a shard. Plain-text pages pass through as they are. Pages with no main text are
dropped as ``no_main_text``; a page trafilatura fails on as ``extract_error``; one over its
time limit as ``extract_timeout``.
"""

from __future__ import annotations

import logging
import re
import time
from html import unescape
from pathlib import Path
from typing import Iterable
from urllib.parse import urlsplit

import pyarrow as pa
import trafilatura
from tqdm.auto import tqdm

from tasks.config import ExtractConfig
from tasks.shards import StageWriter, follow_rows, iter_rows
from tasks.stage import stage_dir, stage_task
from tasks.workers import DaskShards, TimeLimit, batched, in_order, pool_extra, shard_pool, time_limit

log = logging.getLogger(__name__)

DOC_SCHEMA = pa.schema([
    ("doc_id", pa.string()), ("source", pa.string()), ("url", pa.string()),
    ("fetched_at", pa.timestamp("us", tz="UTC")), ("content_sha256", pa.string()),
    ("title", pa.string()), ("date", pa.string()), ("hostname", pa.string()), ("language", pa.string()),
    ("text", pa.string()),
])
META = ("title", "date", "hostname", "language")
BATCH = 16        # pages per shard of work in local processes
DASK_BATCH = 64   # per Prefect task on Dask (~4 s), where each one costs a few API calls


TITLE_RE = re.compile(r"<title[^>]*>(.*?)</title\s*>", re.I | re.S)
LANG_RE = re.compile(r"<html[^>]*?\slang\s*=\s*[\"']?([A-Za-z]{2,3}(?:-[A-Za-z0-9]+)*)", re.I)


def extract_page(html: str, url: str, opts: dict) -> dict | None:
    """Main text and metadata of one page, or None when it has no main text.

    With ``with_metadata`` trafilatura finds title, date, hostname and language itself (its
    date and author search cost ~40 % more time); without, the title comes from <title>, the
    language from <html lang>, the hostname from the URL, and there is no date.
    """
    doc = trafilatura.bare_extraction(html, url=url, **opts)
    if doc is None or not (doc.text or "").strip():
        return None
    if opts.get("with_metadata"):
        return {"text": doc.text.strip(), **{k: getattr(doc, k, None) for k in META}}
    title, lang = TITLE_RE.search(html[:20000]), LANG_RE.search(html[:5000])
    return {"text": doc.text.strip(), "title": " ".join(unescape(title.group(1)).split()) if title else None,
            "date": None, "hostname": urlsplit(url).hostname, "language": lang.group(1).lower() if lang else None}


def extract_batch(pages: list[tuple[str, str]], opts: dict, timeout_s: float) -> list[tuple[str, dict | str]]:
    """A shard of work, in a worker: ("ok", fields) | ("no_main_text", "") | ("extract_timeout"|"extract_error", msg)."""
    out = []
    for html, url in pages:
        if not html:  # plain-text pages are handled by the caller
            out.append(("no_main_text", ""))
            continue
        try:
            with time_limit(timeout_s):
                fields = extract_page(html, url, opts)
            out.append(("ok", fields) if fields else ("no_main_text", ""))
        except TimeLimit:
            out.append(("extract_timeout", f"over {timeout_s}s"))
        except Exception as e:  # trafilatura/lxml can raise on hostile markup
            out.append(("extract_error", repr(e)[:500]))
    return out


def extract(cfg: ExtractConfig, pages: dict | Iterable[dict], stage_dir: str | Path,
            runner: dict | None = None) -> dict:
    """Run the extract stage over the collect manifest ``pages``, or over collected rows as they
    come (``follow_rows`` of a collect still running); returns its manifest. ``runner``: where
    the batches of pages are extracted (``tasks.workers.shard_pool``)."""
    t0 = time.time()
    opts = {"favor_precision": cfg.favor_precision, "favor_recall": cfg.favor_recall,
            "include_tables": cfg.include_tables, "include_comments": cfg.include_comments,
            "with_metadata": cfg.with_metadata}
    total = pages["rows"] if isinstance(pages, dict) else None
    # following a collect still running: its total is known once it has published (follow_rows.total)
    known = total if total is not None else lambda: getattr(pages, "total", None)
    rows = iter_rows(pages) if isinstance(pages, dict) else pages
    with StageWriter("extract", stage_dir, DOC_SCHEMA) as w, shard_pool(runner, "extract", cfg.processes) as pool, \
            tqdm(total=total, desc="extract", unit="page") as bar:
        seen = 0

        def submit(batch: list[dict]):
            html = [(p["html"] if p["content_type"] != "text/plain" else "", p["url"]) for p in batch]
            return pool.submit(extract_batch, html, opts, cfg.timeout_s)

        batches = batched(rows, DASK_BATCH if isinstance(pool, DaskShards) else BATCH, known, pool.width)
        for batch, results in in_order(pool, batches, submit):
            seen += len(batch)
            for page, (status, value) in zip(batch, results):
                row = {k: page[k] for k in ("doc_id", "source", "url", "fetched_at", "content_sha256")}
                row.update({k: None for k in META}, text=None)
                if page["content_type"] == "text/plain":
                    status, value = ("ok", {"text": page["html"].strip()}) if page["html"].strip() \
                        else ("no_main_text", "")
                if status == "ok":
                    w.keep({**row, **value})
                else:
                    if value:
                        log.warning("extract: %s: %s %s", page["url"], status, value)
                    w.drop(row, status)
            bar.update(len(batch))
        w.extra = {"seconds": round(time.time() - t0, 3), "input_rows": seen, **pool_extra(pool)}
    return w.manifest


@stage_task("extract")
def extract_task(ctx: dict, section: dict, inputs: list[dict], run_id: str, follow: dict | None = None) -> dict:
    """Extract main text; the flow runs it beside collect, following collect's shards as they come."""
    pages = follow_rows(stage_dir(ctx, follow["stage"]), follow["state"]) if follow else inputs[0]
    return extract(ExtractConfig.model_validate(section), pages, stage_dir(ctx, "extract"), ctx.get("runner"))
