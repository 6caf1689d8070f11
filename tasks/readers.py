"""Readers for the collect stage's non-crawl sources: WARC/WET files, tables, URL lists, sitemaps.

Each reader yields ``("keep", page_fields)`` or ``("drop", fields, reason)`` so collect writes
every record, kept or not, through one writer. Files are opened with fsspec, so local paths,
http(s) and s3 URLs all work, gzipped or not.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import charset_normalizer
import fsspec
import lxml.etree
import pyarrow.parquet as pq
from warcio.archiveiterator import ArchiveIterator

HTML_TYPES = ("text/html", "application/xhtml+xml")
UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
LATIN = {"iso-8859-1", "latin-1", "latin1", "windows-1252", "cp1252", "us-ascii", "ascii"}


def is_utf16(body: bytes, declared: str | None) -> bool:
    """UTF-16 text (byte-order mark, or the label) is full of NUL bytes without being binary."""
    return body[:2] in UTF16_BOMS or \
        (declared or "").strip().lower().startswith("utf-16")


def decode_body(body: bytes, declared: str | None) -> str:
    """Decode a page, trusting its declared charset only when the bytes agree with it.

    Pages often lie: a Latin-1 label on UTF-8 bytes, a UTF-8 label on Windows-1252 bytes, or
    no label at all. A byte-order mark wins over the label. Raises UnicodeDecodeError when no
    encoding fits.
    """
    if body[:2] in UTF16_BOMS:
        return body.decode("utf-16")
    if body.startswith(codecs.BOM_UTF8):
        return body[3:].decode("utf-8")
    declared = (declared or "").strip().lower() or None
    if declared in LATIN or declared is None:
        try:  # valid UTF-8 with non-ASCII bytes is almost never anything else
            return body.decode("utf-8")
        except UnicodeDecodeError:
            pass
    if declared:
        try:
            return body.decode(declared)
        except (UnicodeDecodeError, LookupError):
            pass
    best = charset_normalizer.from_bytes(body).best()
    if best is None:
        raise UnicodeDecodeError(declared or "unknown", body[:1], 0, 1, "no encoding fits these bytes")
    return str(best)


def media_type(content_type: str | None) -> tuple[str, str | None]:
    """('text/html', 'utf-8') from 'text/html; charset=UTF-8'."""
    parts = [p.strip() for p in (content_type or "").split(";")]
    charset = next((p.split("=", 1)[1].strip(" \"'") for p in parts[1:] if p.lower().startswith("charset=")), None)
    return parts[0].lower(), charset


def read_warc(path: str) -> Iterator[tuple]:
    """Response records of a WARC (HTML pages) and conversion records of a WET (plain text).

    Request, metadata and other records are skipped without a row; non-HTML responses are
    dropped as ``not_html``; damage (a truncated gzip member, a wrong Content-Length) ends the
    file with one ``warc_damaged`` row, after every good record before it was kept.
    """
    source, done = f"warc:{path}", 0
    try:
        with fsspec.open(path, "rb") as f:  # warcio reads gzip member by member itself
            for record in ArchiveIterator(f):
                row = _warc_row(record, source)
                if row is not None:
                    yield row
                done += 1
    except Exception as e:  # warcio raises assorted errors on damaged archives
        yield "drop", {"source": source, "url": path, "error": f"after {done} records: {e!r}"[:500]}, "warc_damaged"


def _warc_row(record, source: str) -> tuple | None:
    if record.rec_type not in ("response", "conversion"):
        return None
    url = record.rec_headers.get_header("WARC-Target-URI") or ""
    body = record.content_stream().read()
    missing = getattr(record.raw_stream, "limit", 0)
    if missing:  # the archive ended inside this record
        raise EOFError(f"record {url} truncated: {missing} of its {record.length} bytes missing")
    if record.rec_type == "conversion":
        ctype, charset, status = "text/plain", "utf-8", 200
    elif record.http_headers is None:
        return None  # dns: and other non-HTTP responses
    else:
        status = int(record.http_headers.get_statuscode() or 0)
        ctype, charset = media_type(record.http_headers.get_header("Content-Type"))
    meta = {"source": source, "url": url, "status": status, "content_type": ctype,
            "fetched_at": _warc_date(record.rec_headers.get_header("WARC-Date")),
            "record_id": record.rec_headers.get_header("WARC-Record-ID")}
    if status != 200:
        return "drop", {**meta, "error": f"HTTP {status}"}, f"http_{status}"
    if ctype not in HTML_TYPES and ctype != "text/plain":
        return "drop", {**meta, "error": f"content type {ctype!r}"}, "not_html"
    try:
        return "keep", {**meta, "html": decode_body(body, charset)}
    except UnicodeDecodeError as e:
        return "drop", {**meta, "error": str(e)}, "decode_error"


def _warc_date(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(timezone.utc)


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
            yield "drop", {**meta, "error": "empty text"}, "empty_text"
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
