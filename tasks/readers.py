"""Readers for the collect stage's other sources: tables, URL lists, sitemaps, local files.

Each reader yields ``("keep", page_fields)`` or ``("drop", fields, reason)`` so collect writes
every record, kept or not, through one writer (WARC/WET files: ``tasks.warc``). Files are opened
with fsspec, so local paths, http(s) and s3 URLs all work, gzipped or not.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path
from typing import Iterator

import fsspec
import lxml.etree
import pyarrow.parquet as pq


def media_type(content_type: str | None) -> tuple[str, str | None]:
    """('text/html', 'utf-8') from 'text/html; charset=UTF-8'."""
    parts = [p.strip() for p in (content_type or "").split(";")]
    charset = next((p.split("=", 1)[1].strip(" \"'") for p in parts[1:] if p.lower().startswith("charset=")), None)
    return parts[0].lower(), charset


def read_table(path: str, text_column: str, url_column: str | None) -> Iterator[tuple]:
    """Rows of a Parquet or JSON Lines file with a text column (e.g. a Hugging Face dataset export)."""
    source = f"table:{path}"
    if path.endswith((".jsonl", ".jsonl.gz", ".json", ".ndjson")):
        with fsspec.open(path, "rt", compression="infer", encoding="utf-8") as f:
            rows = (json.loads(line) for line in f if line.strip())
            yield from _table_rows(rows, source, path, text_column, url_column)
    else:
        with fsspec.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            if text_column not in pf.schema_arrow.names:
                raise ValueError(f"{path}: no column {text_column!r} (columns: {pf.schema_arrow.names})")
            rows = (r for b in pf.iter_batches(batch_size=512) for r in b.to_pylist())
            yield from _table_rows(rows, source, path, text_column, url_column)


def _table_rows(rows, source, path, text_column, url_column) -> Iterator[tuple]:
    for i, row in enumerate(rows):
        if text_column not in row:
            raise ValueError(f"{path}: row {i} has no {text_column!r} field")
        url = str(row.get(url_column) or "") if url_column else ""
        meta = {"source": source, "url": url or f"{path}#{i}", "fetched_at": None, "status": None,
                "content_type": "text/plain", "record_id": str(i)}
        text = row[text_column]
        if not isinstance(text, str) or not text.strip():
            yield "drop", {**meta, "error": "empty text"}, "empty_body"
        else:
            yield "keep", {**meta, "html": text}


def read_url_list(path: str) -> list[str]:
    """URLs from a text file (one per line, # comments) or a CSV file (column 'url', else the first)."""
    with fsspec.open(path, "rt", compression="infer", encoding="utf-8") as f:
        text = f.read()
    if path.endswith((".csv", ".csv.gz")):
        rows = list(csv.reader(io.StringIO(text)))
        if not rows:
            return []
        header = [h.strip().lower() for h in rows[0]]
        col = header.index("url") if "url" in header else 0
        body = rows[1:] if "url" in header or not rows[0][col].startswith("http") else rows
        return [r[col].strip() for r in body if len(r) > col and r[col].strip()]
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def parse_sitemap(body: bytes) -> tuple[list[str], list[str]]:
    """(page URLs, child sitemap URLs) of a sitemap or sitemap index, gzipped or not."""
    if body[:2] == b"\x1f\x8b":
        body = gzip.decompress(body)
    root = lxml.etree.fromstring(body, parser=lxml.etree.XMLParser(resolve_entities=False, no_network=True))
    locs = [(el.getparent().tag, (el.text or "").strip()) for el in root.iter("{*}loc")]
    pages = [u for tag, u in locs if tag.endswith("url") and u]
    children = [u for tag, u in locs if tag.endswith("sitemap") and u]
    return pages, children


def local_files(paths: list[str], suffixes) -> tuple[list[Path], list[str]]:
    """Files under the given paths with one of ``suffixes`` (folders recursively), and missing paths."""
    files, missing = [], []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in suffixes and f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            missing.append(str(p))
    return files, missing
