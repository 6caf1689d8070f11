"""Stage 2, extract: trafilatura's main text (and title) of each collected page.

Plain-text pages pass through as they are. Pages with no main text are dropped as
``no_main_text``; a page trafilatura fails on is dropped as ``extract_error``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pyarrow as pa
import trafilatura
from tqdm.auto import tqdm

from flows.config import ExtractConfig
from tasks.shards import StageWriter, iter_rows
from tasks.stage import stage_dir, stage_task

log = logging.getLogger(__name__)

DOC_SCHEMA = pa.schema([
    ("doc_id", pa.string()), ("source", pa.string()), ("url", pa.string()),
    ("fetched_at", pa.timestamp("us", tz="UTC")), ("content_sha256", pa.string()),
    ("title", pa.string()), ("date", pa.string()), ("text", pa.string()),
])


def extract_page(html: str, url: str, cfg) -> tuple[str | None, str | None, str | None]:
    """(text, title, date) of one page; text is None when there is no main text."""
    doc = trafilatura.bare_extraction(
        html, url=url, with_metadata=True, favor_precision=cfg.favor_precision,
        favor_recall=cfg.favor_recall, include_tables=cfg.include_tables,
        include_comments=cfg.include_comments)
    if doc is None or not (doc.text or "").strip():
        return None, None, None
    return doc.text.strip(), doc.title, doc.date


def extract(cfg, pages: dict, stage_dir: str | Path) -> dict:
    """Run the extract stage over the collect manifest ``pages``; returns its manifest."""
    t0 = time.time()
    with StageWriter("extract", stage_dir, DOC_SCHEMA) as w:
        for page in tqdm(iter_rows(pages), total=pages["rows"], desc="extract", unit="page"):
            row = {k: page[k] for k in ("doc_id", "source", "url", "fetched_at", "content_sha256")}
            row.update(title=None, date=None, text=None)
            if page["content_type"] == "text/plain":
                text, title, date = page["html"].strip() or None, None, None
            else:
                try:
                    text, title, date = extract_page(page["html"], page["url"], cfg)
                except Exception as e:  # trafilatura/lxml can raise on hostile markup
                    log.warning("extract: %s failed: %r", page["url"], e)
                    w.drop(row, "extract_error")
                    continue
            if text is None:
                w.drop(row, "no_main_text")
            else:
                w.keep({**row, "title": title, "date": date, "text": text})
        w.extra = {"seconds": round(time.time() - t0, 3), "input_rows": pages["rows"]}
    return w.manifest


@stage_task("extract")
def extract_task(ctx: dict, section: dict, inputs: list[dict], run_id: str) -> dict:
    return extract(ExtractConfig.model_validate(section), inputs[0], stage_dir(ctx, "extract"))
