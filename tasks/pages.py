"""The collect stage's rows: one kept row per page, one dropped row per page not collected.

Shared by the crawler (``tasks.crawler``), the file readers and the stage (``tasks.collect``).
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from urllib.parse import urlsplit

import pyarrow as pa

from tasks.shards import sha256_text

PAGE_SCHEMA = pa.schema([
    ("doc_id", pa.string()), ("source", pa.string()), ("url", pa.string()),
    ("fetched_at", pa.timestamp("us", tz="UTC")), ("status", pa.int32()),
    ("content_type", pa.string()), ("content_sha256", pa.string()), ("record_id", pa.string()),
    ("etag", pa.string()), ("last_modified", pa.string()),
    ("depth", pa.int32()),              # link hops from a start URL (crawled pages only)
    ("charset", pa.string()),           # the codec the body was decoded with
    ("charset_source", pa.string()),    # what decided it: bom, http, meta, utf8, detected, wet
    ("replaced_bytes", pa.int32()),     # bytes that fit no character, replaced by U+FFFD
    ("html", pa.string()),
])
DROPPED_SCHEMA = pa.schema([
    ("source", pa.string()), ("url", pa.string()), ("fetched_at", pa.timestamp("us", tz="UTC")),
    ("status", pa.int32()), ("content_type", pa.string()), ("record_id", pa.string()),
    ("error", pa.string()), ("reason", pa.string()),
])
# well-known files of a site that are about the site, not documents (dropped as not_document)
NON_DOCUMENTS = {"/robots.txt", "/ads.txt", "/app-ads.txt", "/sellers.json", "/humans.txt", "/security.txt"}


def doc_id(source: str, url: str, content_sha256: str) -> str:
    """Stable document id: a hash of where it came from and what it holds."""
    return hashlib.sha256(f"{source}\n{url}\n{content_sha256}".encode()).hexdigest()[:32]


def now() -> datetime:
    return datetime.now(timezone.utc)


def page_row(source: str, url: str, status: int | None, ctype: str, body: str,
             fetched_at: datetime | None = None, record_id: str | None = None,
             etag: str | None = None, last_modified: str | None = None, depth: int | None = None,
             decoded=None) -> dict:
    """A kept row; ``decoded`` (a ``tasks.charset.Decoded``, when the body came as bytes) gives the
    charset columns."""
    sha = sha256_text(body)
    return {"doc_id": doc_id(source, url, sha), "source": source, "url": url, "fetched_at": fetched_at or now(),
            "status": status, "content_type": ctype, "content_sha256": sha, "record_id": record_id,
            "etag": etag, "last_modified": last_modified, "depth": depth,
            "charset": decoded and decoded.charset, "charset_source": decoded and decoded.source,
            "replaced_bytes": decoded and decoded.replaced, "html": body}


def drop_row(source: str, url: str, error: str = "", status: int | None = None, ctype: str | None = None,
             fetched_at: datetime | None = None, record_id: str | None = None) -> dict:
    return {"source": source, "url": url, "fetched_at": fetched_at or now(), "status": status,
            "content_type": ctype, "record_id": record_id, "error": error[:500]}


def non_document(url: str) -> str | None:
    """Why a URL names a site's own housekeeping file rather than a document, or None."""
    try:
        path = urlsplit(url).path.lower()
    except ValueError:   # not a URL that parses
        return None
    if path in NON_DOCUMENTS or path.startswith("/.well-known/"):
        return f"{path} is a site's housekeeping file, not a document"
    return None
