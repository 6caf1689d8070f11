"""The crawler of the collect stage: polite, defensive, and bounded.

- **URLs in one form** (``canonical_url``) before the seen-set: scheme and host lower-cased,
  default ports and fragments dropped, percent-encoding in one form, dot segments resolved, query
  parameters sorted, tracking and session parameters (``strip_query_params``) removed.
- **Bounded link-following** (``TrapGuard``): at most ``max_depth`` link hops from a start URL,
  ``max_query_variants`` URLs per path that differ only in their query string, no path with more
  than ``max_path_segments`` segments or one segment repeated more than ``max_segment_repeats``
  times, no more links of a numbered form (``/cal/#/#/x.html``) once its first
  ``max_pattern_failures`` all failed. A link not followed is a dropped row (``max_depth``,
  ``crawl_trap``), never skipped silently. URLs given explicitly (start URLs, URL lists,
  sitemaps) are not bounded.
- **Polite**: robots.txt (Disallow and Crawl-delay), per-host concurrency and rate limits.
- **Time-bounded**: connect, read and whole-request limits. A retry is made only where it can help
  (connection errors, 5xx, 429 with Retry-After, a time limit before any byte of the body); a body
  that was arriving when a limit fired is not asked for again. Messages name the limit that fired.
- **Size-bounded**: ``max_bytes`` on the wire and after gzip/deflate decompression.
- **Safe**: no private, loopback, link-local or reserved address unless allowlisted, checked where
  each connection is opened (``GuardedBackend``), so redirects and DNS rebinding cannot get past it.
- **Local sites under a name of their own** (``local_routes``): a site this process serves itself on
  a loopback port (the embedded pydoc site) is crawled under a fixed origin such as
  ``http://pydoc.localhost/`` and its connections are opened to the port it is served on, as curl's
  ``--connect-to`` does; its URLs, and the doc ids made from them, do not depend on that port. Only
  ``*.localhost`` names (RFC 6761: never a host on the network) map, each to one loopback address
  and port; every other host passes the address guard as before.
"""

from __future__ import annotations

import asyncio
import email.utils
import fnmatch
import functools
import ipaddress
import logging
import re
import socket
import string
import time
import urllib.robotparser
import zlib
from collections import Counter
from dataclasses import dataclass
from html import unescape
from typing import Callable, Sequence
from urllib.parse import quote, unquote_plus, urljoin, urlsplit, urlunsplit

import httpcore
import httpx
from tqdm.auto import tqdm

from tasks import readers
from tasks.charset import Undecodable, decode_page, looks_binary
from tasks.pages import drop_row, non_document, page_row

log = logging.getLogger(__name__)

REDIRECTS = {301, 302, 303, 307, 308}
CRAWL_DELAY_RE = re.compile(r"^(\s*crawl-delay\s*:\s*)(\d+(?:\.\d*)?|\.\d+)(?=\s|#|$)", re.I)


# ---- URLs in one form ---------------------------------------------------------------------------

DEFAULT_PORTS = {"http": 80, "https": 443}
UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
PCT_RE = re.compile(r"%([0-9A-Fa-f]{2})")
LONE_PCT_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")
PATH_SAFE = "/:@!$&'()*+,;="
QUERY_SAFE = ":@!$'()*+,;/?"
PATH_PARAM_RE = re.compile(r";([^;=/]*)=[^;/]*")


def _escape(part: str, safe: str) -> str:
    """One percent-encoding: escapes of unreserved characters decoded, the others upper-case,
    what must be escaped (spaces, controls, non-ASCII as UTF-8, a stray '%') escaped."""
    part = LONE_PCT_RE.sub("%25", part)
    part = PCT_RE.sub(lambda m: chr(int(m[1], 16)) if chr(int(m[1], 16)) in UNRESERVED else "%" + m[1].upper(),
                      part)
    return quote(part, safe=safe + "%")


@functools.lru_cache(maxsize=64)
def _strip_re(patterns: tuple[str, ...]) -> re.Pattern | None:
    """Query parameter names to strip, as glob patterns (``utm_*``), matched case-insensitively."""
    return re.compile("|".join(fnmatch.translate(p.lower()) for p in patterns)) if patterns else None


def canonical_url(url: str, strip: Sequence[str] = ()) -> str:
    """``url`` in one form, so that one page has one URL in the seen-set. Raises ValueError for a
    URL that cannot be parsed (a bad port, a broken IPv6 address)."""
    parts = urlsplit(url.strip())
    scheme, host = parts.scheme.lower(), parts.hostname or ""
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            pass
    port = parts.port
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != DEFAULT_PORTS.get(scheme):
        netloc += f":{port}"
    if "@" in parts.netloc:
        netloc = parts.netloc.rsplit("@", 1)[0] + "@" + netloc
    drop = _strip_re(tuple(strip))
    path = parts.path
    if "/." in path and path.startswith("/"):
        path = urljoin("/", path)   # resolves ./ and ../ segments
    if ";" in path and drop:        # ;jsessionid=... path parameters
        path = PATH_PARAM_RE.sub(lambda m: "" if drop.fullmatch(m[1].lower()) else m[0], path)
    path = _escape(path, PATH_SAFE) or "/"
    pieces = []
    for piece in parts.query.split("&"):
        name, eq, value = piece.partition("=")
        if piece and not (drop and drop.fullmatch(unquote_plus(name).lower())):
            pieces.append((_escape(name, QUERY_SAFE), eq, _escape(value, QUERY_SAFE + "=")))
    query = "&".join("".join(p) for p in sorted(pieces))
    return urlunsplit((scheme, netloc, path, query, ""))


def canonical_or_none(url: str, strip: Sequence[str] = ()) -> str | None:
    try:
        return canonical_url(url, strip)
    except ValueError:
        return None


HREF_RE = re.compile(r"""<a\s[^>]*?\bhref\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'>]+))""", re.I)
BASE_RE = re.compile(r"""<base\s[^>]*?\bhref\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'>]+))""", re.I)


@functools.lru_cache(maxsize=100_000)
def _resolve(base_url: str, href: str, strip: tuple[str, ...]) -> tuple[str, str, str] | None:
    try:
        url = canonical_url(urljoin(base_url, href), strip)
    except ValueError:
        return None
    parts = urlsplit(url)
    return url, parts.scheme, parts.netloc


def same_site_links(html: str, base_url: str, hosts: set[str], strip: tuple[str, ...] = ()) -> list[str]:
    """Canonical absolute http(s) links of a page that stay on one of ``hosts``.

    A crawler needs the links, not the document: a scan for ``<a href>`` (and ``<base href>``)
    costs a fraction of building the tree, and relative links resolve through a cache.
    """
    base = BASE_RE.search(html)
    if base:
        base_url = urljoin(base_url, unescape(next(g for g in base.groups() if g is not None)))
    base_dir = base_url.rsplit("/", 1)[0] + "/" if "?" not in base_url else base_url
    out = set()
    for m in {next(g for g in m.groups() if g is not None) for m in HREF_RE.finditer(html)}:
        href = unescape(m.strip())
        if not href or href.startswith(("#", "mailto:", "javascript:", "file:", "data:", "tel:")):
            continue
        # a query-only link ("?page=2") depends on the page's own path, not only its folder
        resolved = _resolve(base_url if href.startswith("?") else base_dir, href, strip)
        if resolved and resolved[1] in ("http", "https") and resolved[2] in hosts:
            out.add(resolved[0])
    return sorted(out)


DIGITS_RE = re.compile(r"\d+")


def url_pattern(url: str) -> str:
    """The form of a URL with its numbers left out: /cal/2024/07/x.html?d=3 -> /cal/#/#/x.html?d"""
    head, _, query = url.partition("?")
    names = sorted({p.partition("=")[0] for p in query.split("&") if p})
    return DIGITS_RE.sub("#", urlsplit(head).path) + ("?" + "&".join(names) if names else "")


class TrapGuard:
    """Bounds what following links can reach: a site that generates endless distinct URLs (query
    strings that change on every page, calendars with a "next" link, ever-deeper paths, generated
    folders whose relative links all fail) stops within a few dozen requests, while a real site's
    pages stay well inside every bound."""

    def __init__(self, cfg):
        self.cfg, self.variants = cfg, Counter()
        self.failed, self.fetched = Counter(), Counter()   # by url_pattern

    def refuse(self, url: str, depth: int) -> tuple[str, str] | None:
        """(reason, message) for a discovered link that is not followed, else None."""
        cfg = self.cfg
        if depth > cfg.max_depth:
            return "max_depth", f"{depth} link hops from a start URL (max_depth {cfg.max_depth})"
        head, _, query = url.partition("?")
        segments = [s for s in urlsplit(head).path.split("/") if s]
        if len(segments) > cfg.max_path_segments:
            return "crawl_trap", f"{len(segments)} path segments (max_path_segments {cfg.max_path_segments})"
        if segments:
            segment, n = Counter(segments).most_common(1)[0]
            if n > cfg.max_segment_repeats:
                return "crawl_trap", (f"path segment {segment!r} repeated {n} times "
                                      f"(max_segment_repeats {cfg.max_segment_repeats})")
        if query:
            self.variants[head] += 1
            if self.variants[head] > cfg.max_query_variants:
                return "crawl_trap", (f"more than {cfg.max_query_variants} query variants of {head} "
                                      f"(max_query_variants)")
        return self.failing(url)

    def failing(self, url: str) -> tuple[str, str] | None:
        """A numbered form of URL whose first links all failed: the rest are not asked for."""
        pattern = url_pattern(url)
        n = self.failed[pattern]
        if n >= self.cfg.max_pattern_failures and n == self.fetched[pattern] and "#" in pattern:
            return "crawl_trap", (f"{n} links of the form {pattern} failed and none succeeded "
                                  f"(max_pattern_failures {self.cfg.max_pattern_failures})")
        return None

    def fetched_as(self, url: str, status: int) -> None:
        pattern = url_pattern(url)
        self.fetched[pattern] += 1
        self.failed[pattern] += 400 <= status < 500


# ---- fetching -----------------------------------------------------------------------------------

class Refused(Exception):
    """A fetch that ends with a reason code rather than a page; ``retry``: whether asking again
    could end otherwise."""

    def __init__(self, reason: str, error: str = "", status: int | None = None, ctype: str | None = None,
                 retry_after: float | None = None, retry: bool = False):
        super().__init__(error)
        self.reason, self.error, self.status, self.ctype = reason, error, status, ctype
        self.retry_after, self.retry = retry_after, retry


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


Route = tuple[str, int]   # (host, port)


def local_routes(sites: dict[str, str] | None) -> dict[Route, Route]:
    """``{origin: served URL}`` of sites this process serves itself, as ``{(host, port): (address,
    port)}`` for ``GuardedBackend``: e.g. ``{"http://pydoc.localhost/": "http://127.0.0.1:41469/"}``
    sends the connections for ``pydoc.localhost:80`` to ``127.0.0.1:41469``. The origin must be an
    http URL on ``localhost`` or a ``*.localhost`` name (reserved for loopback, never an Internet
    host, so no real site can be redirected), with no path; the served URL an http URL on a loopback
    address literal with its port. Anything else raises ValueError."""
    routes = {}
    for origin, served in (sites or {}).items():
        o, s = urlsplit(origin), urlsplit(served)
        host = (o.hostname or "").lower().rstrip(".")
        if o.scheme != "http" or not (host == "localhost" or host.endswith(".localhost")) \
                or o.path not in ("", "/") or o.query or o.username or o.password:
            raise ValueError(f"a local site's origin must be http://NAME.localhost/, not {origin!r}")
        try:
            address = ipaddress.ip_address(s.hostname or "")
        except ValueError:
            address = None
        if s.scheme != "http" or address is None or not address.is_loopback or s.port is None:
            raise ValueError(f"a local site must be served at http://LOOPBACK-ADDRESS:PORT/, not {served!r}")
        routes[(host, o.port or 80)] = (str(address), s.port)
    return routes


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's sockets, opened only to addresses the guard allows. The name is resolved and
    checked here, when the connection is made, and the socket goes to the very address that was
    checked: a DNS answer that changes after the check (rebinding) cannot lead elsewhere. TLS
    still verifies the certificate against the host name (httpcore passes it as server_hostname).

    ``routes`` (``local_routes``): the sites served by this process on loopback, each reached at the
    one address and port it is served on, whatever ``allow_private`` says; no other host maps."""

    def __init__(self, guard: AddressGuard, routes: dict[Route, Route] | None = None):
        self.guard, self.inner, self.routes = guard, httpcore.AnyIOBackend(), dict(routes or {})

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None, socket_options=None) -> httpcore.AsyncNetworkStream:
        route = self.routes.get((host.lower().rstrip("."), port))
        if route is not None:
            return await self.inner.connect_tcp(*route, timeout=timeout, local_address=local_address,
                                                socket_options=socket_options)
        address = await self.guard.resolve(host)
        return await self.inner.connect_tcp(address, port, timeout=timeout, local_address=local_address,
                                            socket_options=socket_options)

    async def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options=None):
        raise Refused("blocked_address", f"unix socket {path}")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


def guarded_transport(guard: AddressGuard, limits: httpx.Limits,
                      routes: dict[Route, Route] | None = None) -> httpx.AsyncHTTPTransport:
    """httpx's transport whose connection pool connects through ``GuardedBackend`` (httpx has no
    argument for httpcore's network backend, so its pool is built again with one)."""
    transport = httpx.AsyncHTTPTransport(limits=limits)
    pool = transport._pool
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=pool._ssl_context, max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections, keepalive_expiry=limits.keepalive_expiry,
        network_backend=GuardedBackend(guard, routes))
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


class Fetcher:
    """HTTP for the crawler: every connection through the address guard, polite per host (robots.txt,
    concurrency, rate), bounded in time and size, and asked again only where that can help.
    ``conditional(url)``: the headers of a conditional request for a page already held;
    ``local_sites``: sites served by this process, by the origin they are crawled under
    (``local_routes``)."""

    def __init__(self, cfg, conditional: Callable[[str], dict[str, str]], local_sites: dict[str, str] | None = None):
        self.cfg, self.conditional, self.strip = cfg, conditional, tuple(cfg.strip_query_params)
        self.routes = local_routes(local_sites)
        self.robots: dict[str, asyncio.Future] = {}
        self.gates: dict[str, HostGate] = {}

    async def __aenter__(self) -> "Fetcher":
        cfg = self.cfg
        timeout = httpx.Timeout(connect=cfg.connect_timeout_s, read=cfg.read_timeout_s, write=cfg.read_timeout_s,
                                pool=None)
        headers = {"User-Agent": cfg.user_agent, "Accept-Encoding": "gzip, deflate"}
        transport = guarded_transport(AddressGuard(cfg.allow_private), httpx.Limits(max_connections=cfg.concurrency),
                                      self.routes)
        self.client = httpx.AsyncClient(timeout=timeout, headers=headers, follow_redirects=False, transport=transport)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.client.aclose()

    async def allowed(self, url: str) -> bool:
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
            f = await self.fetch(f"{origin}/robots.txt", retries=0)
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

    async def fetch(self, url: str, retries: int | None = None) -> Fetched:
        """GET, asked again (exponential backoff, Retry-After honoured) only where that can help:
        connection errors, 429, 5xx and time limits that fired before any byte of the body."""
        retries = self.cfg.retries if retries is None else retries
        for attempt in range(retries + 1):
            try:
                f = await self._follow(url)
                if f.status != 429 and f.status < 500:
                    return f
                failure = Refused("http_429" if f.status == 429 else "http_5xx", f"HTTP {f.status}", f.status,
                                  f.ctype, retry_after=f.retry_after)
            except Refused as e:
                if not e.retry:
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
        if attempt:
            failure.error += f" ({attempt + 1} attempts)"
        raise failure

    async def _follow(self, url: str) -> Fetched:
        """One request, following redirects hop by hop; every hop passes the address guard."""
        chain = [url]
        for _ in range(self.cfg.max_redirects + 1):
            f = await self._get(url)
            if f.status not in REDIRECTS or not f.location:
                return f
            url = canonical_or_none(urljoin(url, f.location), self.strip)
            if url is None:
                raise Refused("bad_url", f"redirect to an invalid URL {f.location!r}"[:500], f.status)
            if url in chain:
                raise Refused("redirect_loop", " -> ".join(chain + [url])[:500], f.status)
            chain.append(url)
        raise Refused("too_many_redirects", f"more than {self.cfg.max_redirects} redirects", f.status)

    async def _get(self, url: str) -> Fetched:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise Refused("bad_url", url)
        cfg, got = self.cfg, [0]   # got: bytes of the body received so far
        async with self._gate(parts.netloc):   # the address guard checks every connection (GuardedBackend)
            try:
                async with asyncio.timeout(cfg.timeout_s):
                    async with self.client.stream("GET", url, headers=self.conditional(url)) as r:
                        ctype, charset = readers.media_type(r.headers.get("content-type"))
                        body = b"" if r.status_code in REDIRECTS else await self._read(r, got)
            except TimeoutError:
                raise self._timed_out(f"timeout_s ({cfg.timeout_s:g} s for the whole request)", got[0]) from None
            except httpx.ConnectTimeout:
                raise Refused("timeout", f"connect_timeout_s ({cfg.connect_timeout_s:g} s) passed before the "
                                         f"connection was made", retry=True) from None
            except httpx.ReadTimeout:
                raise self._timed_out(f"read_timeout_s ({cfg.read_timeout_s:g} s without a byte)", got[0]) from None
            except httpx.WriteTimeout:
                raise Refused("timeout", f"read_timeout_s ({cfg.read_timeout_s:g} s) passed while sending the "
                                         f"request", retry=True) from None
            except httpx.TransportError as e:
                raise Refused("connect_error", str(e) or type(e).__name__, retry=True) from None
        return Fetched(str(r.url), r.status_code, ctype, charset, body, r.headers.get("location"),
                       _retry_after(r.headers.get("retry-after")), r.headers.get("etag"),
                       r.headers.get("last-modified"))

    @staticmethod
    def _timed_out(limit: str, received: int) -> Refused:
        """A time limit that fired: asked again only if no byte of the body had come (a server that
        never answered may answer next time; one that was dripping a body would drip it again)."""
        if received:
            return Refused("timeout", f"{limit} fired after {received} bytes of the body had arrived")
        return Refused("timeout", f"{limit} fired before any byte of the body arrived", retry=True)

    async def _read(self, r: httpx.Response, got: list[int]) -> bytes:
        """The body, decompressed, refusing more than max_bytes on the wire or after decompression;
        ``got[0]`` counts the bytes received so far."""
        cap = self.cfg.max_bytes
        length = r.headers.get("content-length")
        if length and length.isdigit() and int(length) > cap:
            raise Refused("too_large", f"Content-Length {length} > max_bytes {cap}", r.status_code)
        encoding = r.headers.get("content-encoding", "identity").lower().strip()
        if encoding not in ("identity", "gzip", "x-gzip", "deflate", ""):
            raise Refused("decode_error", f"content encoding {encoding!r}", r.status_code)
        inflate = zlib.decompressobj(47) if encoding in ("gzip", "x-gzip", "deflate") else None
        out = bytearray()
        async for chunk in r.aiter_raw():
            got[0] += len(chunk)
            if got[0] > cap:
                raise Refused("too_large", f"more than max_bytes ({cap}) on the wire", r.status_code)
            try:
                while chunk:
                    part = inflate.decompress(chunk, cap + 1 - len(out)) if inflate else chunk
                    out += part
                    if len(out) > cap:
                        raise Refused("too_large", f"more than max_bytes ({cap}) decompressed", r.status_code)
                    chunk = inflate.unconsumed_tail if inflate else b""
            except zlib.error as e:
                raise Refused("decode_error", f"bad {encoding} stream: {e}", r.status_code) from None
        return bytes(out)


class Crawler:
    """Fetches seeds, sitemaps and followed links into ``writer`` (a ``StageWriter`` with the rows
    of ``tasks.pages``). ``previous``: the last finished collect (conditional requests); ``done``:
    what a killed earlier attempt already wrote (``tasks.collect.Previous`` and ``Done``);
    ``local_sites``: ``{origin: served URL}`` of sites served by this process, crawled and recorded
    under their origin (``local_routes``)."""

    def __init__(self, cfg, writer, previous, done, local_sites: dict[str, str] | None = None):
        self.cfg, self.writer, self.previous, self.done = cfg, writer, previous, done
        self.local_sites = local_sites
        local_routes(local_sites)   # a mapping that is not allowed fails here, before any request
        self.not_modified = 0
        self.queued, self.beyond_max_pages = 0, 0   # URLs queued; links not followed past max_pages
        self.traps = TrapGuard(cfg)
        self.strip = tuple(cfg.strip_query_params)
        self.seen: set[str] = set()      # URLs queued (or written by a killed attempt)
        self.queue: asyncio.Queue[tuple[str, str, bool, int]] = asyncio.Queue()
        self.hosts: set[str] = set()

    def canonical(self, url: str) -> str | None:
        return canonical_or_none(url, self.strip)

    async def run(self, seeds: list[tuple[str, str, bool]], sitemaps: list[str]) -> None:
        """Fetch ``(url, source, follow_links)`` seeds and the pages of ``sitemaps``, except what a
        killed earlier attempt already wrote; the links of its pages are followed again."""
        self.hosts = {urlsplit(self.canonical(u) or u).netloc for u, _, follow in seeds if follow}
        self.seen |= self.done.urls
        self.queued = len(self.done.urls)
        async with Fetcher(self.cfg, self.previous.conditional, self.local_sites) as self.http:
            with tqdm(total=self.cfg.max_pages, desc="collect", unit="page") as self.bar:
                self.bar.update(len(self.done.urls))
                for url, source, follow in seeds:
                    canonical = self.canonical(url)
                    if canonical is None:
                        self.writer.drop(drop_row(source, url, "not a valid URL"), "bad_url")
                    else:
                        self._enqueue(canonical, source, follow, 0, explicit=True)
                for url, source, html, depth in self.done.crawled:
                    self._follow_links(html, url, source, depth)
                for sitemap in sitemaps:
                    await self._sitemap(sitemap, f"sitemap:{sitemap}", level=0)
                workers = [asyncio.create_task(self._worker()) for _ in range(self.cfg.concurrency)]
                await self.queue.join()
                for w in workers:
                    w.cancel()
                await asyncio.gather(*workers, return_exceptions=True)

    def _enqueue(self, url: str, source: str, follow: bool, depth: int, explicit: bool = False) -> None:
        if url in self.seen:
            return
        refused = None if explicit else self.traps.refuse(url, depth)
        if refused:   # recorded once, never fetched
            self.seen.add(url)
            self.writer.drop(drop_row(source, url, refused[1]), refused[0])
        elif self.queued >= self.cfg.max_pages:
            self.beyond_max_pages += 1
        else:
            self.seen.add(url)
            self.queued += 1
            self.queue.put_nowait((url, source, follow, depth))

    def _follow_links(self, html: str, url: str, source: str, depth: int | None) -> None:
        for link in same_site_links(html, url, self.hosts, self.strip):
            self._enqueue(link, source, True, (depth or 0) + 1)

    async def _sitemap(self, url: str, source: str, level: int) -> None:
        try:
            fetched = await self.http.fetch(url)
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
            canonical = self.canonical(page)
            if canonical:
                self._enqueue(canonical, source, False, 0, explicit=True)
        for child in children[:1000] if level < 3 else []:
            await self._sitemap(child, source, level + 1)

    async def _worker(self) -> None:
        while True:
            url, source, follow, depth = await self.queue.get()
            try:
                await self._visit(url, source, follow, depth)
            except Refused as e:
                self.writer.drop(drop_row(source, url, e.error, e.status, e.ctype), e.reason)
            except Exception as e:  # one bad page must never stop the crawl
                log.exception("collect: unexpected error on %s", url)
                self.writer.drop(drop_row(source, url, repr(e)), "fetch_error")
            finally:
                self.bar.update(1)
                self.queue.task_done()

    async def _visit(self, url: str, source: str, follow: bool, depth: int) -> None:
        why = non_document(url)
        if why:
            raise Refused("not_document", why)
        if not await self.http.allowed(url):
            raise Refused("robots", "disallowed by robots.txt")
        trap = depth and self.traps.failing(url)   # links queued before their form was seen to fail
        if trap:
            raise Refused(*trap)
        f = await self.http.fetch(url)
        if depth:
            self.traps.fetched_as(url, f.status)
        if f.status == 304 and url in self.previous.pages:  # unchanged since the last run: reuse its row
            row = {**self.previous.pages[url], "depth": depth}
            self.writer.keep(row)
            self.not_modified += 1
            if follow and row["content_type"] != "text/plain":
                self._follow_links(row["html"], url, source, depth)
            return
        if f.status != 200:
            reason = "http_5xx" if f.status >= 500 else "http_429" if f.status == 429 else f"http_{f.status}"
            raise Refused(reason, f"HTTP {f.status}", f.status, f.ctype)
        if f.ctype not in self.cfg.content_types:
            raise Refused("not_html", f"content type {f.ctype!r}", f.status, f.ctype)
        if not f.body.strip():
            raise Refused("empty_body", "no content", f.status, f.ctype)
        if looks_binary(f.body, f.charset):
            raise Refused("not_html", "binary content", f.status, f.ctype)
        try:
            decoded = decode_page(f.body, f.charset)
        except Undecodable as e:
            raise Refused("decode_error", str(e), f.status, f.ctype) from None
        final = self.canonical(f.url) or f.url
        self.seen.add(final)   # reached through a redirect: not fetched again under its own URL
        self.writer.keep(page_row(source, final, f.status, f.ctype, decoded.text, etag=f.etag,
                                  last_modified=f.last_modified, depth=depth, decoded=decoded))
        if follow and f.ctype != "text/plain":
            self._follow_links(decoded.text, final, source, depth)
