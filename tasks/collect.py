"""Stage 1, collect: crawl websites over HTTP and read local files into raw-page shards.

One kept row per page (url, fetched_at, status, content type, sha256 of the body, the raw
HTML); every page not collected is a dropped row with a short reason code
(connect_error, timeout, http_404, http_5xx, robots, not_html, too_large, redirect_loop, ...).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import urllib.robotparser
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urldefrag, urljoin, urlsplit

import httpx
import lxml.html
import pyarrow as pa
from tqdm.auto import tqdm

from flows.config import CollectConfig
from tasks import pydoc_site
from tasks.shards import StageWriter
from tasks.stage import stage_dir, stage_task

log = logging.getLogger(__name__)

PAGE_SCHEMA = pa.schema([
    ("doc_id", pa.string()), ("source", pa.string()), ("url", pa.string()),
    ("fetched_at", pa.timestamp("us", tz="UTC")), ("status", pa.int32()),
    ("content_type", pa.string()), ("content_sha256", pa.string()), ("html", pa.string()),
])
DROPPED_SCHEMA = pa.schema([
    ("source", pa.string()), ("url", pa.string()), ("fetched_at", pa.timestamp("us", tz="UTC")),
    ("status", pa.int32()), ("content_type", pa.string()), ("error", pa.string()), ("reason", pa.string()),
])
TEXT_TYPES = ("text/html", "application/xhtml+xml", "text/plain")
LOCAL_SUFFIXES = {".html": "text/html", ".htm": "text/html", ".txt": "text/plain"}


def doc_id(source: str, url: str, content_sha256: str) -> str:
    """Stable document id: a hash of where it came from and what it holds."""
    return hashlib.sha256(f"{source}\n{url}\n{content_sha256}".encode()).hexdigest()[:32]


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _page_row(source: str, url: str, status: int, ctype: str, body: str) -> dict:
    sha = hashlib.sha256(body.encode("utf-8", "surrogatepass")).hexdigest()
    return {"doc_id": doc_id(source, url, sha), "source": source, "url": url, "fetched_at": _now(),
            "status": status, "content_type": ctype, "content_sha256": sha, "html": body}


def _drop_row(source: str, url: str, error: str = "", status: int | None = None, ctype: str | None = None) -> dict:
    return {"source": source, "url": url, "fetched_at": _now(), "status": status,
            "content_type": ctype, "error": error[:500]}


def normalize_url(url: str) -> str:
    return urldefrag(url.strip())[0]


def same_site_links(html: str, base_url: str, hosts: set[str]) -> list[str]:
    """Absolute http(s) links of a page that stay on one of ``hosts``, without fragments."""
    try:
        root = lxml.html.fromstring(html)
    except (ValueError, lxml.etree.ParserError):
        return []
    out = []
    for href in root.xpath("//a/@href"):
        url = normalize_url(urljoin(base_url, href))
        parts = urlsplit(url)
        if parts.scheme in ("http", "https") and parts.netloc in hosts:
            out.append(url)
    return out


class Crawler:
    """A small polite crawler: same-host links, robots.txt, retries with backoff, a page limit."""

    def __init__(self, cfg, writer: StageWriter):
        self.cfg, self.writer = cfg, writer
        self.robots: dict[str, asyncio.Future] = {}
        self.seen: set[str] = set()
        self.queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

    async def run(self, start_urls: list[str]) -> None:
        hosts = {urlsplit(u).netloc for u in start_urls}
        limits = httpx.Limits(max_connections=self.cfg.concurrency)
        timeout = httpx.Timeout(self.cfg.timeout_s)
        async with httpx.AsyncClient(timeout=timeout, limits=limits, follow_redirects=True, max_redirects=5,
                                     headers={"User-Agent": self.cfg.user_agent}) as client:
            self.client, self.hosts = client, hosts
            for url in start_urls:
                self._enqueue(normalize_url(url), source=f"crawl:{url}")
            with tqdm(total=self.cfg.max_pages, desc="collect", unit="page") as self.bar:
                workers = [asyncio.create_task(self._worker()) for _ in range(self.cfg.concurrency)]
                await self.queue.join()
                for w in workers:
                    w.cancel()
                await asyncio.gather(*workers, return_exceptions=True)

    def _enqueue(self, url: str, source: str) -> None:
        if url not in self.seen and len(self.seen) < self.cfg.max_pages:
            self.seen.add(url)
            self.queue.put_nowait((url, source))

    async def _worker(self) -> None:
        while True:
            url, source = await self.queue.get()
            try:
                await self._visit(url, source)
            except Exception as e:  # one bad page must never stop the crawl
                log.exception("collect: unexpected error on %s", url)
                self.writer.drop(_drop_row(source, url, repr(e)), "fetch_error")
            finally:
                self.bar.update(1)
                self.queue.task_done()

    async def _allowed(self, url: str) -> bool:
        if not self.cfg.respect_robots:
            return True
        parts = urlsplit(url)
        key = f"{parts.scheme}://{parts.netloc}"
        if key not in self.robots:  # one fetch per host; concurrent workers wait for the same one
            self.robots[key] = asyncio.ensure_future(self._robots(key))
        rp = await self.robots[key]
        return rp is None or rp.can_fetch(self.cfg.user_agent, url)

    async def _robots(self, origin: str) -> urllib.robotparser.RobotFileParser | None:
        try:
            r = await self.client.get(f"{origin}/robots.txt")
        except httpx.HTTPError as e:
            log.info("collect: no robots.txt at %s (%s)", origin, e)
            return None
        if r.status_code != 200:
            return None
        rp = urllib.robotparser.RobotFileParser()
        rp.parse(r.text.splitlines())
        return rp

    async def _fetch(self, url: str) -> tuple[httpx.Response | None, bytes, str, str]:
        """GET with retries; returns (response, body, reason, error); reason is '' on success."""
        reason, error = "", ""
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                await asyncio.sleep(self.cfg.backoff_s * 2 ** (attempt - 1))
            try:
                async with self.client.stream("GET", url) as r:
                    body = bytearray()
                    async for chunk in r.aiter_bytes():
                        body += chunk
                        if len(body) > self.cfg.max_bytes:
                            return r, b"", "too_large", f"more than {self.cfg.max_bytes} bytes"
            except httpx.TooManyRedirects as e:
                return None, b"", "redirect_loop", str(e)
            except httpx.TimeoutException as e:
                reason, error = "timeout", str(e) or type(e).__name__
                continue
            except httpx.TransportError as e:
                reason, error = "connect_error", str(e) or type(e).__name__
                continue
            if r.status_code == 429 or r.status_code >= 500:
                reason, error = ("http_429" if r.status_code == 429 else "http_5xx"), f"HTTP {r.status_code}"
                continue
            return r, bytes(body), "", ""
        return None, b"", reason, error

    async def _visit(self, url: str, source: str) -> None:
        if not await self._allowed(url):
            self.writer.drop(_drop_row(source, url, "disallowed by robots.txt"), "robots")
            return
        r, body, reason, error = await self._fetch(url)
        status = r.status_code if r is not None else None
        ctype = r.headers.get("content-type", "").split(";")[0].strip().lower() if r is not None else None
        if reason:
            self.writer.drop(_drop_row(source, url, error, status, ctype), reason)
        elif status != 200:
            self.writer.drop(_drop_row(source, url, f"HTTP {status}", status, ctype), f"http_{status}")
        elif ctype not in TEXT_TYPES:
            self.writer.drop(_drop_row(source, url, f"content type {ctype!r}", status, ctype), "not_html")
        else:
            try:
                html = body.decode(r.charset_encoding or "utf-8")
            except (UnicodeDecodeError, LookupError) as e:
                self.writer.drop(_drop_row(source, url, str(e), status, ctype), "decode_error")
                return
            final_url = normalize_url(str(r.url))
            self.writer.keep(_page_row(source, final_url, status, ctype, html))
            if ctype != "text/plain":
                for link in same_site_links(html, final_url, self.hosts):
                    self._enqueue(link, source)


def read_local(paths: list[str], writer: StageWriter, max_pages: int) -> None:
    """Read .html/.htm/.txt files (or folders of them, recursively) as pages."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in LOCAL_SUFFIXES and f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            writer.drop(_drop_row(f"path:{p}", p.as_uri() if p.is_absolute() else str(p), "no such file"), "not_found")
    for f in tqdm(files[:max_pages], desc="collect (files)", unit="file"):
        source, url = f"path:{f.parent.resolve()}", f.resolve().as_uri()
        ctype = LOCAL_SUFFIXES.get(f.suffix.lower())
        if ctype is None:
            writer.drop(_drop_row(source, url, f"suffix {f.suffix!r}"), "not_html")
            continue
        try:
            text = f.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            writer.drop(_drop_row(source, url, str(e), None, ctype), "decode_error")
            continue
        writer.keep(_page_row(source, url, 200, ctype, text))


def collect(cfg, stage_dir: str | Path, start_urls: list[str] | None = None) -> dict:
    """Run the collect stage into ``stage_dir``; returns its manifest.

    ``start_urls`` overrides ``cfg.start_urls`` (the flow passes the embedded site's URL).
    """
    t0 = time.time()
    urls = list(start_urls if start_urls is not None else cfg.start_urls)
    with StageWriter("collect", stage_dir, PAGE_SCHEMA, DROPPED_SCHEMA) as w:
        if cfg.paths:
            read_local(cfg.paths, w, cfg.max_pages)
        if urls:
            asyncio.run(Crawler(cfg, w).run(urls))
        w.extra = {"seconds": round(time.time() - t0, 3),
                   "sources": urls + [str(Path(p).resolve()) for p in cfg.paths]}
    return w.manifest


@stage_task("collect")
def collect_task(ctx: dict, section: dict, inputs: list[dict], run_id: str) -> dict:
    """Collect the configured sources; with none, crawl the embedded pydoc site on 127.0.0.1."""
    cfg = CollectConfig.model_validate(section)
    out = stage_dir(ctx, "collect")
    if cfg.start_urls or cfg.paths:
        return collect(cfg, out)
    modules = tuple(cfg.pydoc_modules) if cfg.pydoc_modules is not None else pydoc_site.DEFAULT_MODULES
    key = hashlib.sha256("\n".join(modules).encode()).hexdigest()[:12]
    with pydoc_site.render_and_serve(Path(ctx["data_dir"]) / "pydoc-site" / key, modules) as url:
        return collect(cfg, out, start_urls=[url])
