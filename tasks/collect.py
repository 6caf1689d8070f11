"""Stage 1, collect: crawl sites, fetch URL lists and sitemaps, read WARC/WET files, tables and
local folders into raw-page shards.

One kept row per page (source, url, fetched_at, status, content type, sha256 of the body, the
raw HTML or text); every page not collected is a dropped row with a short reason code
(connect_error, timeout, http_404, http_5xx, http_429, robots, not_html, too_large,
redirect_loop, too_many_redirects, blocked_address, empty_body, decode_error, warc_damaged, ...).

The crawler is polite and defensive: robots.txt (Disallow and Crawl-delay), per-host
concurrency and rate limits, retries with exponential backoff honouring Retry-After, connect,
read and whole-request time limits, redirects followed one hop at a time, a size cap on the
wire and after decompression, and no private, loopback, link-local or reserved address
(checked after DNS resolution, on every hop) unless allowlisted.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import hashlib
import ipaddress
import json
import logging
import re
import socket
import sys
import time
import urllib.robotparser
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from html import unescape
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import urldefrag, urljoin, urlsplit

import fsspec
import httpcore
import httpx
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from flows.config import CollectConfig
from tasks import pydoc_site, readers
from tasks.shards import StageWriter, read_manifest, read_table, sha256_text, write_json
from tasks.stage import stage_dir, stage_task
from tasks.workers import in_order, on_dask, pool_extra, shard_pool

log = logging.getLogger(__name__)

PAGE_SCHEMA = pa.schema([
    ("doc_id", pa.string()), ("source", pa.string()), ("url", pa.string()),
    ("fetched_at", pa.timestamp("us", tz="UTC")), ("status", pa.int32()),
    ("content_type", pa.string()), ("content_sha256", pa.string()), ("record_id", pa.string()),
    ("etag", pa.string()), ("last_modified", pa.string()), ("html", pa.string()),
])
DROPPED_SCHEMA = pa.schema([
    ("source", pa.string()), ("url", pa.string()), ("fetched_at", pa.timestamp("us", tz="UTC")),
    ("status", pa.int32()), ("content_type", pa.string()), ("record_id", pa.string()),
    ("error", pa.string()), ("reason", pa.string()),
])
LOCAL_SUFFIXES = {".html": "text/html", ".htm": "text/html", ".txt": "text/plain"}
REDIRECTS = {301, 302, 303, 307, 308}
CRAWL_DELAY_RE = re.compile(r"^(\s*crawl-delay\s*:\s*)(\d+(?:\.\d*)?|\.\d+)(?=\s|#|$)", re.I)


def doc_id(source: str, url: str, content_sha256: str) -> str:
    """Stable document id: a hash of where it came from and what it holds."""
    return hashlib.sha256(f"{source}\n{url}\n{content_sha256}".encode()).hexdigest()[:32]


def _now() -> datetime:
    return datetime.now(timezone.utc)


def page_row(source: str, url: str, status: int | None, ctype: str, body: str,
             fetched_at: datetime | None = None, record_id: str | None = None,
             etag: str | None = None, last_modified: str | None = None) -> dict:
    sha = sha256_text(body)
    return {"doc_id": doc_id(source, url, sha), "source": source, "url": url, "fetched_at": fetched_at or _now(),
            "status": status, "content_type": ctype, "content_sha256": sha, "record_id": record_id,
            "etag": etag, "last_modified": last_modified, "html": body}


def drop_row(source: str, url: str, error: str = "", status: int | None = None, ctype: str | None = None,
             fetched_at: datetime | None = None, record_id: str | None = None) -> dict:
    return {"source": source, "url": url, "fetched_at": fetched_at or _now(), "status": status,
            "content_type": ctype, "record_id": record_id, "error": error[:500]}


def normalize_url(url: str) -> str:
    return urldefrag(url.strip())[0]


HREF_RE = re.compile(r"""<a\s[^>]*?\bhref\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'>]+))""", re.I)
BASE_RE = re.compile(r"""<base\s[^>]*?\bhref\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'>]+))""", re.I)


@functools.lru_cache(maxsize=100_000)
def _resolve(base_url: str, href: str) -> tuple[str, str, str]:
    url = normalize_url(urljoin(base_url, href))
    parts = urlsplit(url)
    return url, parts.scheme, parts.netloc


def same_site_links(html: str, base_url: str, hosts: set[str]) -> list[str]:
    """Absolute http(s) links of a page that stay on one of ``hosts``, without fragments.

    A crawler needs the links, not the document: a scan for ``<a href>`` (and ``<base href>``)
    costs a fraction of building the tree, and relative links resolve through a cache.
    """
    base = BASE_RE.search(html)
    if base:
        base_url = urljoin(base_url, unescape(next(g for g in base.groups() if g is not None)))
    base_dir = base_url.rsplit("/", 1)[0] + "/" if "?" not in base_url else base_url
    out = []
    for m in sorted({next(g for g in m.groups() if g is not None) for m in HREF_RE.finditer(html)}):
        href = unescape(m.strip())
        if not href or href.startswith(("#", "mailto:", "javascript:", "file:", "data:", "tel:")):
            continue
        # a query-only link ("?page=2") depends on the page's own path, not only its folder
        url, scheme, netloc = _resolve(base_url if href.startswith("?") else base_dir, href)
        if scheme in ("http", "https") and netloc in hosts:
            out.append(url)
    return sorted(set(out))


class Refused(Exception):
    """A fetch that ends with a reason code rather than a page."""

    def __init__(self, reason: str, error: str = "", status: int | None = None, ctype: str | None = None,
                 retry_after: float | None = None):
        super().__init__(error)
        self.reason, self.error, self.status, self.ctype, self.retry_after = reason, error, status, ctype, retry_after


class AddressGuard:
    """Refuses hosts that resolve to a non-global address (private, loopback, link-local incl. cloud
    metadata, reserved, multicast), unless a network or host name is allowlisted."""

    def __init__(self, allow: list[str]):
        self.hosts, self.networks = set(), []
        for item in allow:
            try:
                self.networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                self.hosts.add(item.lower())

    async def resolve(self, host: str) -> str:
        """The address to connect to for ``host``: every address it resolves to must be allowed.
        An allowlisted host name is returned as it is (the connection resolves it)."""
        if host.lower() in self.hosts:
            return host
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise Refused("dns_error", f"{host}: {e}") from None
        for *_, sockaddr in infos:
            ip = ipaddress.ip_address(sockaddr[0].split("%")[0])
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
                ip = ip.ipv4_mapped
            if not ip.is_global and not any(ip in net for net in self.networks):
                raise Refused("blocked_address", f"{host} resolves to {ip}, a non-public address")
        return infos[0][4][0]


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's sockets, opened only to addresses the guard allows. The name is resolved and
    checked here, when the connection is made, and the socket goes to the very address that was
    checked: a DNS answer that changes after the check (rebinding) cannot lead elsewhere. TLS
    still verifies the certificate against the host name (httpcore passes it as server_hostname)."""

    def __init__(self, guard: AddressGuard):
        self.guard, self.inner = guard, httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None, socket_options=None) -> httpcore.AsyncNetworkStream:
        address = await self.guard.resolve(host)
        return await self.inner.connect_tcp(address, port, timeout=timeout, local_address=local_address,
                                            socket_options=socket_options)

    async def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options=None):
        raise Refused("blocked_address", f"unix socket {path}")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


def guarded_transport(guard: AddressGuard, limits: httpx.Limits) -> httpx.AsyncHTTPTransport:
    """httpx's transport whose connection pool connects through ``GuardedBackend`` (httpx has no
    argument for httpcore's network backend, so its pool is built again with one)."""
    transport = httpx.AsyncHTTPTransport(limits=limits)
    pool = transport._pool
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=pool._ssl_context, max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections, keepalive_expiry=limits.keepalive_expiry,
        network_backend=GuardedBackend(guard))
    return transport


class HostGate:
    """Per-host concurrency and a minimum interval between request starts."""

    def __init__(self, concurrency: int, interval: float):
        self.sem, self.interval, self.next_start = asyncio.Semaphore(concurrency), interval, 0.0

    async def __aenter__(self) -> None:
        await self.sem.acquire()
        now = time.monotonic()
        start = max(now, self.next_start)
        self.next_start = start + self.interval
        if start > now:
            await asyncio.sleep(start - now)

    async def __aexit__(self, *exc) -> None:
        self.sem.release()


@dataclass
class Fetched:
    url: str
    status: int
    ctype: str
    charset: str | None
    body: bytes
    location: str | None = None
    retry_after: float | None = None
    etag: str | None = None
    last_modified: str | None = None


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class Crawler:
    def __init__(self, cfg: CollectConfig, writer: StageWriter, previous: "Previous | None" = None,
                 done: "Done | None" = None):
        self.cfg, self.writer, self.previous = cfg, writer, previous or Previous(None)
        self.done = done or Done(None)  # what a killed earlier attempt already wrote
        self.not_modified = 0
        self.guard = AddressGuard(cfg.allow_private)
        self.robots: dict[str, asyncio.Future] = {}
        self.gates: dict[str, HostGate] = {}
        self.seen: set[str] = set()
        self.queue: asyncio.Queue[tuple[str, str, bool]] = asyncio.Queue()
        self.hosts: set[str] = set()

    async def run(self, seeds: list[tuple[str, str, bool]], sitemaps: list[str]) -> None:
        """Fetch ``(url, source, follow_links)`` seeds and the pages of ``sitemaps``, except what a
        killed earlier attempt already wrote; the links of its pages are followed again."""
        self.hosts = {urlsplit(u).netloc for u, _, follow in seeds if follow}
        self.seen |= self.done.urls
        timeout = httpx.Timeout(connect=self.cfg.connect_timeout_s, read=self.cfg.read_timeout_s,
                                write=self.cfg.read_timeout_s, pool=None)
        headers = {"User-Agent": self.cfg.user_agent, "Accept-Encoding": "gzip, deflate"}
        transport = guarded_transport(self.guard, httpx.Limits(max_connections=self.cfg.concurrency))
        async with httpx.AsyncClient(timeout=timeout, headers=headers, follow_redirects=False,
                                     transport=transport) as self.client:
            with tqdm(total=self.cfg.max_pages, desc="collect", unit="page") as self.bar:
                self.bar.update(len(self.done.urls))
                for url, source, follow in seeds:
                    self._enqueue(normalize_url(url), source, follow)
                for url, source, html in self.done.crawled:
                    for link in same_site_links(html, url, self.hosts):
                        self._enqueue(link, source, True)
                for sitemap in sitemaps:
                    await self._sitemap(sitemap, f"sitemap:{sitemap}", depth=0)
                workers = [asyncio.create_task(self._worker()) for _ in range(self.cfg.concurrency)]
                await self.queue.join()
                for w in workers:
                    w.cancel()
                await asyncio.gather(*workers, return_exceptions=True)

    def _enqueue(self, url: str, source: str, follow: bool) -> None:
        if url not in self.seen and len(self.seen) < self.cfg.max_pages:
            self.seen.add(url)
            self.queue.put_nowait((url, source, follow))

    async def _sitemap(self, url: str, source: str, depth: int) -> None:
        try:
            fetched = await self._fetch(url)
            pages, children = readers.parse_sitemap(fetched.body)
        except Refused as e:
            if url not in self.done.urls:
                self.writer.drop(drop_row(source, url, e.error, e.status, e.ctype), f"sitemap_{e.reason}")
            return
        except Exception as e:  # not XML, or not a sitemap
            if url not in self.done.urls:
                self.writer.drop(drop_row(source, url, repr(e)), "sitemap_invalid")
            return
        for page in pages:
            self._enqueue(normalize_url(page), source, False)
        for child in children[:1000] if depth < 3 else []:
            await self._sitemap(child, source, depth + 1)

    async def _worker(self) -> None:
        while True:
            url, source, follow = await self.queue.get()
            try:
                await self._visit(url, source, follow)
            except Refused as e:
                self.writer.drop(drop_row(source, url, e.error, e.status, e.ctype), e.reason)
            except Exception as e:  # one bad page must never stop the crawl
                log.exception("collect: unexpected error on %s", url)
                self.writer.drop(drop_row(source, url, repr(e)), "fetch_error")
            finally:
                self.bar.update(1)
                self.queue.task_done()

    async def _visit(self, url: str, source: str, follow: bool) -> None:
        if not await self._allowed(url):
            raise Refused("robots", "disallowed by robots.txt")
        f = await self._fetch(url)
        if f.status == 304 and url in self.previous.pages:  # unchanged since the last run: reuse its row
            row = self.previous.pages[url]
            self.writer.keep(row)
            self.not_modified += 1
            if follow and row["content_type"] != "text/plain":
                for link in same_site_links(row["html"], url, self.hosts):
                    self._enqueue(link, source, True)
            return
        if f.status != 200:
            reason = "http_5xx" if f.status >= 500 else "http_429" if f.status == 429 else f"http_{f.status}"
            raise Refused(reason, f"HTTP {f.status}", f.status, f.ctype)
        if f.ctype not in self.cfg.content_types:
            raise Refused("not_html", f"content type {f.ctype!r}", f.status, f.ctype)
        if not f.body.strip():
            raise Refused("empty_body", "no content", f.status, f.ctype)
        if b"\x00" in f.body[:4096] and not readers.is_utf16(f.body, f.charset):
            raise Refused("not_html", "binary content", f.status, f.ctype)
        try:
            html = readers.decode_body(f.body, f.charset)
        except UnicodeDecodeError as e:
            raise Refused("decode_error", str(e), f.status, f.ctype) from None
        self.writer.keep(page_row(source, f.url, f.status, f.ctype, html, etag=f.etag, last_modified=f.last_modified))
        if follow and f.ctype != "text/plain":
            for link in same_site_links(html, f.url, self.hosts):
                self._enqueue(link, source, True)

    async def _allowed(self, url: str) -> bool:
        if not self.cfg.respect_robots:
            return True
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        if origin not in self.robots:  # one fetch per host; concurrent workers wait for the same one
            self.robots[origin] = asyncio.ensure_future(self._robots(origin))
        rp = await self.robots[origin]
        return rp is None or rp.can_fetch(self.cfg.user_agent, url)

    async def _robots(self, origin: str) -> urllib.robotparser.RobotFileParser | None:
        try:
            f = await self._fetch(f"{origin}/robots.txt", retries=0)
        except Refused as e:
            log.info("collect: no robots.txt at %s (%s %s)", origin, e.reason, e.error)
            return None
        if f.status != 200:
            return None
        rp = urllib.robotparser.RobotFileParser()
        # the stdlib parser reads whole seconds only: each Crawl-delay value is swapped for its
        # index in `delays` (a whole number it accepts), so "Crawl-delay: 0.5" counts too
        delays: list[float] = []

        def index(m: re.Match) -> str:
            delays.append(float(m.group(2)))
            return f"{m.group(1)}{len(delays) - 1}"
        rp.parse([CRAWL_DELAY_RE.sub(index, line) for line in f.body.decode("utf-8", "replace").splitlines()])
        i = rp.crawl_delay(self.cfg.user_agent)
        if i is not None and delays[int(i)] > 0:
            gate = self._gate(urlsplit(origin).netloc)
            gate.interval = max(gate.interval, delays[int(i)])
        return rp

    def _gate(self, host: str) -> HostGate:
        if host not in self.gates:
            self.gates[host] = HostGate(self.cfg.per_host_concurrency, 1.0 / self.cfg.per_host_rps)
        return self.gates[host]

    async def _fetch(self, url: str, retries: int | None = None) -> Fetched:
        """GET with retries on timeouts, connection errors, 429 and 5xx (Retry-After honoured)."""
        retries = self.cfg.retries if retries is None else retries
        for attempt in range(retries + 1):
            try:
                f = await self._follow(url)
                if f.status != 429 and f.status < 500:
                    return f
                failure = Refused("http_429" if f.status == 429 else "http_5xx", f"HTTP {f.status}", f.status,
                                  f.ctype, retry_after=f.retry_after)
            except Refused as e:
                if e.reason not in ("timeout", "connect_error"):
                    raise
                failure = e
            if attempt == retries:
                break
            wait = self.cfg.backoff_s * 2 ** attempt
            if failure.retry_after is not None:
                if failure.retry_after > self.cfg.max_retry_after_s:
                    break
                wait = max(wait, failure.retry_after)
            await asyncio.sleep(wait)
        if failure.status is not None:
            return Fetched(url, failure.status, failure.ctype or "", None, b"")
        raise failure

    async def _follow(self, url: str) -> Fetched:
        """One request, following redirects hop by hop; every hop passes the address guard."""
        chain = [url]
        for _ in range(self.cfg.max_redirects + 1):
            f = await self._get(url)
            if f.status not in REDIRECTS or not f.location:
                return f
            url = normalize_url(urljoin(url, f.location))
            if url in chain:
                raise Refused("redirect_loop", " -> ".join(chain + [url])[:500], f.status)
            chain.append(url)
        raise Refused("too_many_redirects", f"more than {self.cfg.max_redirects} redirects", f.status)

    async def _get(self, url: str) -> Fetched:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise Refused("bad_url", url)
        async with self._gate(parts.netloc):   # the address guard checks every connection (GuardedBackend)
            try:
                async with asyncio.timeout(self.cfg.timeout_s):
                    async with self.client.stream("GET", url, headers=self.previous.conditional(url)) as r:
                        ctype, charset = readers.media_type(r.headers.get("content-type"))
                        body = b"" if r.status_code in REDIRECTS else await self._read(r)
            except (TimeoutError, httpx.TimeoutException) as e:
                raise Refused("timeout", f"{type(e).__name__} after at most {self.cfg.timeout_s}s") from None
            except httpx.TransportError as e:
                raise Refused("connect_error", str(e) or type(e).__name__) from None
        return Fetched(str(r.url), r.status_code, ctype, charset, body, r.headers.get("location"),
                       _retry_after(r.headers.get("retry-after")), r.headers.get("etag"),
                       r.headers.get("last-modified"))

    async def _read(self, r: httpx.Response) -> bytes:
        """The body, decompressed, refusing more than max_bytes on the wire or after decompression."""
        cap = self.cfg.max_bytes
        length = r.headers.get("content-length")
        if length and length.isdigit() and int(length) > cap:
            raise Refused("too_large", f"Content-Length {length} > {cap}", r.status_code)
        encoding = r.headers.get("content-encoding", "identity").lower().strip()
        if encoding not in ("identity", "gzip", "x-gzip", "deflate", ""):
            raise Refused("decode_error", f"content encoding {encoding!r}", r.status_code)
        inflate = zlib.decompressobj(47) if encoding in ("gzip", "x-gzip", "deflate") else None
        wire, out = 0, bytearray()
        async for chunk in r.aiter_raw():
            wire += len(chunk)
            if wire > cap:
                raise Refused("too_large", f"more than {cap} bytes on the wire", r.status_code)
            try:
                while chunk:
                    part = inflate.decompress(chunk, cap + 1 - len(out)) if inflate else chunk
                    out += part
                    if len(out) > cap:
                        raise Refused("too_large", f"more than {cap} bytes decompressed", r.status_code)
                    chunk = inflate.unconsumed_tail if inflate else b""
            except zlib.error as e:
                raise Refused("decode_error", f"bad {encoding} stream: {e}", r.status_code) from None
        return bytes(out)


class Previous:
    """The last finished collect over the same sources: pages are asked for again only if changed
    (conditional GET with their ETag / Last-Modified), files re-read only if their size or
    modification time changed."""

    def __init__(self, manifest: dict | None):
        usable = bool(manifest) and Path(manifest["dir"]).is_dir()
        self.signatures: dict[str, str] = manifest.get("signatures", {}) if usable else {}
        # read once: the pages to revalidate, and the tables that unchanged files are copied from
        self.kept = read_table(manifest) if usable else None
        self.dropped = read_table(manifest, dropped=True) if usable else None
        self.pages: dict[str, dict] = {}
        if usable:
            self.pages = {r["url"]: r for r in self.kept.to_pylist() if r["source"].startswith(
                ("crawl:", "list:", "sitemap:")) and (r.get("etag") or r.get("last_modified"))}

    def conditional(self, url: str) -> dict[str, str]:
        row = self.pages.get(url)
        if row is None:
            return {}
        headers = {"If-None-Match": row["etag"]} if row.get("etag") else {}
        return headers | ({"If-Modified-Since": row["last_modified"]} if row.get("last_modified") else {})

    def unchanged_rows(self, source: str, signature: str) -> tuple[list[dict], list[dict]] | None:
        """(kept, dropped) rows of a file source whose signature has not changed, else None."""
        if self.kept is None or self.signatures.get(source) != signature:
            return None
        return tuple(t.filter(pc.equal(pc.field("source"), source)).to_pylist() for t in (self.kept, self.dropped))


def file_signature(path: str) -> str:
    """Size and modification time (or ETag) of a local or remote file."""
    fs, p = fsspec.core.url_to_fs(path)
    info = fs.info(p)
    return json.dumps({k: str(info.get(k)) for k in ("size", "mtime", "ETag", "LastModified", "etag")
                       if info.get(k) is not None}, sort_keys=True)


class Done:
    """What a killed earlier attempt of this stage already wrote, so that nothing is fetched twice."""

    def __init__(self, writer: StageWriter | None):
        cols = ["source", "url", "record_id"]
        rows = list(writer.resumed("kept", cols + ["html"])) + list(writer.resumed("dropped", cols)) if writer else []
        self.urls = {r["url"] for r in rows}
        self.records = {(r["source"], r["record_id"] or r["url"]) for r in rows}
        self.crawled = [(r["url"], r["source"], r["html"]) for r in rows
                        if r["source"].startswith("crawl:") and r.get("html")]


def read_local(paths: list[str], writer: StageWriter, max_pages: int, done: Done) -> None:
    """Read .html/.htm/.txt files (or folders of them, recursively) as pages."""
    files, missing = readers.local_files(paths, LOCAL_SUFFIXES)
    for p in missing:
        writer.drop(drop_row(f"path:{p}", p, "no such file"), "not_found")
    for f in tqdm(files[:max_pages], desc="collect (files)", unit="file"):
        source, url = f"path:{f.parent.resolve()}", f.resolve().as_uri()
        if url in done.urls:
            continue
        ctype = LOCAL_SUFFIXES.get(f.suffix.lower())
        if ctype is None:
            writer.drop(drop_row(source, url, f"suffix {f.suffix!r}"), "not_html")
            continue
        try:
            text = readers.decode_body(f.read_bytes(), None)
        except UnicodeDecodeError as e:
            writer.drop(drop_row(source, url, str(e), None, ctype), "decode_error")
            continue
        writer.keep(page_row(source, url, None, ctype, text))


def write_records(records, writer: StageWriter, desc: str, done: Done) -> None:
    """Write ("keep", fields) / ("drop", fields, reason) records from a reader."""
    for rec in tqdm(records, desc=desc, unit="record"):
        f = rec[1]
        if (f["source"], f.get("record_id") or f["url"]) in done.records:
            continue
        if rec[0] == "keep":
            writer.keep(page_row(f["source"], f["url"], f["status"], f["content_type"], f["html"],
                                 f["fetched_at"], f["record_id"]))
        else:
            writer.drop(drop_row(f["source"], f["url"], f.get("error", ""), f.get("status"), f.get("content_type"),
                                 f.get("fetched_at"), f.get("record_id")), rec[2])


def file_records(read: Callable[..., Iterable[tuple]], args: tuple) -> list[tuple]:
    """A shard of collect's work on a Dask worker: every record of one WARC/WET or table file."""
    return list(read(*args))


def read_files(files: list[tuple[str, Callable, tuple]], w: StageWriter, done: Done, runner: dict | None) -> dict:
    """Write the records of ``(path, reader, args)`` files, in order. Locally a file is streamed
    record by record; with ``runner.task_runner: dask`` each file is read on a Dask worker (a
    Prefect task run ``collect-shard-N``), one file per worker at a time, and its records are
    written here as they come back."""
    if not files or not on_dask(runner):   # no Dask cluster is started for nothing to read
        for path, read, args in files:
            write_records(read(*args), w, f"collect ({Path(path).name})", done)
        return {}
    with shard_pool(runner, "collect", None) as pool:
        for (path, _, _), records in in_order(pool, files, lambda f: pool.submit(file_records, *f[1:]), ahead=1):
            write_records(records, w, f"collect ({Path(path).name})", done)
        return pool_extra(pool)


def collect(cfg: CollectConfig, stage_dir: str | Path, start_urls: list[str] | None = None,
            previous: dict | None = None, runner: dict | None = None) -> dict:
    """Run the collect stage into ``stage_dir``; returns its manifest.

    ``start_urls`` overrides ``cfg.start_urls`` (the flow passes the embedded site's URL).
    ``previous`` is the manifest of the last collect over the same sources: what has not
    changed since is carried over instead of fetched again. ``runner``: where WARC/WET and table
    files are read (``read_files``); a crawl stays in this process, where per-host politeness is kept.
    """
    prev = Previous(previous)
    signatures: dict[str, str] = {}
    reused = 0
    t0 = time.time()
    urls = list(start_urls if start_urls is not None else cfg.start_urls)
    seeds = [(u, f"crawl:{u}", True) for u in urls]
    for path in cfg.url_lists:
        seeds += [(u, f"list:{path}", False) for u in readers.read_url_list(path)]
    # shards every 256 rows or 2 s: a killed collect resumes without fetching what it wrote
    with StageWriter("collect", stage_dir, PAGE_SCHEMA, DROPPED_SCHEMA, shard_rows=256, resume=True,
                     flush_every_s=2.0) as w:
        done = Done(w)
        if cfg.paths:
            read_local(cfg.paths, w, cfg.max_pages, done)
        files = [(p, f"warc:{p}", readers.read_warc, (p,)) for p in cfg.warc_files]
        files += [(t.path, f"table:{t.path}", readers.read_table, (t.path, t.text_column, t.url_column))
                  for t in cfg.tables]
        changed = []
        for path, source, read, args in files:
            signatures[source] = file_signature(path)
            same = prev.unchanged_rows(source, signatures[source])
            if same is None:
                changed.append((path, read, args))
                continue
            for row in same[0]:
                w.keep(row)
            for row in same[1]:
                w.drop({k: v for k, v in row.items() if k != "reason"}, row["reason"])
            reused += len(same[0]) + len(same[1])
        spread = read_files(changed, w, done, runner)
        crawler = Crawler(cfg, w, prev, done)
        if seeds or cfg.sitemaps:
            asyncio.run(crawler.run(seeds, cfg.sitemaps))
        w.extra = {"seconds": round(time.time() - t0, 3), "signatures": signatures,
                   "not_modified": crawler.not_modified, "files_unchanged_rows": reused,
                   "sources": urls + cfg.url_lists + cfg.sitemaps + cfg.warc_files + [t.path for t in cfg.tables]
                   + [str(Path(p).resolve()) for p in cfg.paths], **spread}
    return w.manifest


def sources_fingerprint(ctx: dict, section: dict) -> str:
    """What collect would read, for its cache key: local files by path, size and modification
    time; the embedded site by the Python that renders it. What a website holds now is only
    known by fetching it, so a crawl is keyed to its flow run: each new run crawls again
    (conditional requests, only what changed is downloaded) and the next stages are reused
    when the content comes out the same."""
    cfg = CollectConfig.model_validate(section)
    if not cfg.has_sources():
        return f"pydoc:{sys.version}"
    files = [*cfg.warc_files, *(t.path for t in cfg.tables), *cfg.paths]
    if cfg.start_urls or cfg.sitemaps or cfg.url_lists or any("://" in f for f in files):
        return f"crawl:{ctx['flow_run_id']}"
    stats = []
    for f in map(Path, files):
        for p in sorted(f.rglob("*")) if f.is_dir() else [f]:
            st = p.stat() if p.exists() else None
            stats.append([str(p.resolve()), st and st.st_size, st and st.st_mtime_ns])
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()


@stage_task("collect", sources=sources_fingerprint)
def collect_task(ctx: dict, section: dict, inputs: list[dict], run_id: str) -> dict | tuple[dict, dict]:
    """Collect the configured sources; with none, crawl the embedded pydoc site on 127.0.0.1."""
    cfg = CollectConfig.model_validate(section)
    out = stage_dir(ctx, "collect")
    if cfg.has_sources():
        # the last finished collect over these sources, so that only what changed is fetched
        key = hashlib.sha256(json.dumps(cfg.model_dump(mode="json", include={
            "start_urls", "url_lists", "sitemaps", "warc_files", "tables", "paths"}), sort_keys=True).encode())
        state = Path(ctx["data_dir"]) / "collect-state" / f"{key.hexdigest()[:16]}.json"
        last = json.loads(state.read_text())["dir"] if state.exists() else None
        manifest = collect(cfg, out, previous=read_manifest(last) if last else None, runner=ctx.get("runner"))
        write_json(state, {"dir": manifest["dir"]})
        return manifest, {k: float(manifest[k]) for k in ("not_modified", "files_unchanged_rows")}
    modules = tuple(cfg.pydoc_modules) if cfg.pydoc_modules is not None else pydoc_site.DEFAULT_MODULES
    key = hashlib.sha256("\n".join(modules).encode()).hexdigest()[:12]
    with pydoc_site.render_and_serve(Path(ctx["data_dir"]) / "pydoc-site" / key, modules) as url:
        # our own static site on loopback: allowlisted, and no need to spare it
        site = cfg.model_copy(update={"allow_private": cfg.allow_private + ["127.0.0.1/32"],
                                      "per_host_rps": max(cfg.per_host_rps, 1000.0)})
        return collect(site, out, start_urls=[url])
