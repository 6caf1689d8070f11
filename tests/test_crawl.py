"""The crawler's bounds: URLs in one form, a real multi-level documentation site crawled whole,
a site of crawler traps (built of real pages) stopped within a few dozen requests per trap."""

from __future__ import annotations

import glob
import http.server
import random
import re
import threading
from collections import Counter, deque
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import parse_qs, urljoin, urlsplit

import pytest

from tasks.collect import collect
from tasks.config import CollectConfig
from tasks.crawler import canonical_url
from tasks.pydoc_site import serve
from tasks.shards import read_table

STRIP = CollectConfig().strip_query_params


@pytest.mark.parametrize("url, canonical", [
    ("HTTP://Docs.Python.ORG:80/3/library/index.html#module-json", "http://docs.python.org/3/library/index.html"),
    ("https://docs.python.org:443/3/", "https://docs.python.org/3/"),
    ("https://docs.python.org:8443", "https://docs.python.org:8443/"),
    ("http://h/a/./b/../c.html", "http://h/a/c.html"),
    ("http://h/%7Euser/%41%2f%2F%e2%80%99 x", "http://h/~user/A%2F%2F%E2%80%99%20x"),
    ("http://h/caf\u00e9", "http://h/caf%C3%A9"),
    ("http://h/p?b=2&a=1&a=0", "http://h/p?a=0&a=1&b=2"),
    ("http://h/p?utm_source=x&id=7&UTM_Campaign=y&fbclid=z&PHPSESSID=abc", "http://h/p?id=7"),
    ("http://h/p;jsessionid=0AF3?x=1", "http://h/p?x=1"),
    ("http://h/p?", "http://h/p"),
    ("http://h/p?a=&&b", "http://h/p?a=&b"),
    ("http://h/p?q=a+b%2fc", "http://h/p?q=a+b%2Fc"),
    ("http://bücher.example/", "http://xn--bcher-kva.example/"),
])
def test_urls_are_put_in_one_form_before_they_are_compared(url, canonical):
    assert canonical_url(url, STRIP) == canonical
    assert canonical_url(canonical, STRIP) == canonical   # one form: canonical of canonical is itself


def test_a_url_that_cannot_be_parsed_is_refused_by_name():
    with pytest.raises(ValueError):
        canonical_url("http://h:99999999/")


# ---- a real multi-level documentation site ------------------------------------------------------

PYTHON_DOCS = sorted(glob.glob("/usr/share/doc/python3*/html/index.html"))


class Links(HTMLParser):
    """Every <a href> of a page, by the standard library's HTML parser (not the crawler's scan)."""

    def __init__(self):
        super().__init__()
        self.hrefs = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.hrefs += [v for k, v in attrs if k == "href" and v]


def reachable_pages(root: Path) -> set[str]:
    """The site's HTML pages reachable from index.html by links, found by walking its files."""
    seen, todo = {"index.html"}, deque(["index.html"])
    while todo:
        page = todo.popleft()
        parser = Links()
        parser.feed((root / page).read_text(errors="replace"))
        for href in parser.hrefs:
            parts = urlsplit(urljoin("http://site/" + page, href))
            path = parts.path.lstrip("/")
            if parts.netloc == "site" and path.endswith(".html") and (root / path).is_file() and path not in seen:
                seen.add(path)
                todo.append(path)
    return seen


def test_a_real_multi_level_documentation_site_is_crawled_whole_at_the_defaults(tmp_path):
    assert PYTHON_DOCS, "the Python documentation (Debian package python3-doc) is missing: `make test` installs it"
    root = Path(PYTHON_DOCS[-1]).parent
    expected = reachable_pages(root)
    assert len(expected) > 400
    with serve(root) as url:
        m = collect(CollectConfig(allow_private=["127.0.0.1/32"], per_host_rps=1000, max_pages=5000),
                    tmp_path / "c", start_urls=[url + "index.html"])
    kept = {r["url"].removeprefix(url) for r in read_table(m, columns=["url"]).to_pylist()}
    assert {p for p in kept if p.endswith(".html")} == expected
    assert not {"max_depth", "crawl_trap"} & set(m["reasons"]), m["reasons"]


# ---- a site of crawler traps, made of real pages ------------------------------------------------

ARTICLES = ["json", "csv", "heapq", "textwrap", "bisect", "fractions", "statistics", "difflib", "shlex",
            "calendar", "base64", "fnmatch", "glob", "queue", "sched", "uuid", "zipfile", "pprint", "copy",
            "enum", "functools", "itertools", "contextlib", "gzip", "hashlib", "random", "shutil", "struct"]
ARCHIVE_PAGES = 30   # a news-style archive: ?page=1..30, numbered pagination (first, last, two either side)
TRAPS = ("/calendar", "/cal/", "/deep/", "/tree/", "/feed.html", "/shop")
FACETS = {"color": ["red", "blue", "green", "black", "white", "grey", "navy", "olive"],
          "size": ["xs", "s", "m", "l", "xl", "xxl"], "sort": ["price", "name", "new", "rating"]}


class TrapSite(http.server.BaseHTTPRequestHandler):
    """Real pydoc pages with links added: articles, a paginated archive, and six traps, each a
    way real sites generate endless (or very many) URLs."""
    protocol_version = "HTTP/1.1"
    pages: dict[str, bytes] = {}
    hits: Counter = Counter()
    asked: list[str] = []
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def page(self, name: str, links: list[str]) -> bytes:
        body = self.pages[name]
        extra = "".join(f'<a href="{h}">{h}</a>\n' for h in links).encode()
        return body.replace(b"</body>", extra + b"</body>", 1)

    def do_GET(self):
        parts = urlsplit(self.path)
        path, query = parts.path, parse_qs(parts.query)
        family = next((t for t in TRAPS if path.startswith(t)), path)
        TrapSite.hits[family] += 1
        TrapSite.asked.append(path)
        if path == "/":
            body = self.page("json", [f"/articles/{a}.html" for a in ARTICLES] + [
                "/archive?page=1", "/shop?color=red&size=m&sort=price", "/calendar?month=2024-07",
                "/cal/2024/07/", "/deep/", "/tree/1/",
                f"/list.html?sid={random.getrandbits(64):016x}", f"/feed.html?r={random.getrandbits(32)}"])
        elif path.startswith("/articles/") and path.removeprefix("/articles/")[:-5] in ARTICLES:
            body = self.page(path.removeprefix("/articles/")[:-5], ["/"])
        elif path == "/archive":
            n = int(query.get("page", ["1"])[0])
            nearby = {1, ARCHIVE_PAGES, *range(max(1, n - 2), min(ARCHIVE_PAGES, n + 2) + 1)} - {n}
            body = self.page("csv", [f"/archive?page={k}" for k in sorted(nearby)]
                             + [f"/articles/{ARTICLES[n % len(ARTICLES)]}.html"])
        elif path == "/shop":                        # faceted navigation: every combination of filters
            here = {k: v[0] for k, v in query.items()}
            body = self.page("enum", [f"/shop?{'&'.join(f'{k}={x}' for k, x in {**here, f: v}.items())}"
                                      for f, values in FACETS.items() for v in values if v != here[f]])
        elif path == "/calendar":                    # next and previous month, for ever
            y, mo = map(int, query["month"][0].split("-"))
            body = self.page("calendar", [f"?month={y + mo // 12}-{mo % 12 + 1:02d}",
                                          f"?month={y - (mo == 1)}-{(mo - 2) % 12 + 1:02d}"])
        elif re.fullmatch(r"/cal/\d+/\d+/", path):   # the same as paths
            y, mo = map(int, path.split("/")[2:4])
            body = self.page("calendar", [f"/cal/{y + mo // 12}/{mo % 12 + 1:02d}/",
                                          f"/cal/{y - (mo == 1)}/{(mo - 2) % 12 + 1:02d}/"])
        elif path.startswith("/deep/"):               # a relative link that resolves ever deeper
            body = self.page("textwrap", ["more/", "../"])
        elif path.startswith("/tree/"):               # a numbered path one level deeper each time
            body = self.page("heapq", [f"{len(path.split('/'))}/"])
        elif path == "/list.html":                    # a new session id in every link
            body = self.page("queue", [f"/list.html?sid={random.getrandbits(64):016x}"])
        elif path == "/feed.html":                    # a new cache-busting number in every link
            body = self.page("bisect", [f"/feed.html?r={random.getrandbits(32)}"])
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def trap_crawl(site_dir, tmp_path_factory):
    TrapSite.pages = {p.stem: p.read_bytes() for p in site_dir.glob("*.html")}
    TrapSite.hits.clear()
    TrapSite.asked.clear()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), TrapSite)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/"
    try:
        m = collect(CollectConfig(allow_private=["127.0.0.1/32"], per_host_rps=1000, max_pages=500),
                    tmp_path_factory.mktemp("traps") / "c", start_urls=[url])
    finally:
        server.shutdown()
        server.server_close()
    return {"url": url, "manifest": m, "hits": dict(TrapSite.hits), "asked": list(TrapSite.asked),
            "kept": [r["url"].removeprefix(url) for r in read_table(m, columns=["url"]).to_pylist()],
            "dropped": read_table(m, dropped=True).to_pylist()}


def test_the_real_part_of_a_trap_site_is_crawled_whole(trap_crawl):
    kept = set(trap_crawl["kept"])
    assert {f"articles/{a}.html" for a in ARTICLES} <= kept
    assert {f"archive?page={n}" for n in range(1, ARCHIVE_PAGES + 1)} <= kept


def test_each_trap_stops_within_a_few_dozen_requests(trap_crawl):
    hits = trap_crawl["hits"]
    for trap in TRAPS:
        assert 0 < hits.get(trap, 0) <= 60, (trap, hits)
    deep = [u for u in trap_crawl["asked"] if u.startswith("/deep/")]
    assert max(u.count("/more") for u in deep) == 2   # /deep/more/more/ is the deepest one asked for
    assert trap_crawl["manifest"]["links_beyond_max_pages"] == 0   # the crawl ended by itself, not at max_pages


def test_a_session_id_that_changes_in_every_link_is_one_page(trap_crawl):
    assert trap_crawl["hits"]["/list.html"] == 1
    assert trap_crawl["kept"].count("list.html") == 1


def test_what_is_not_followed_is_recorded_with_its_reason(trap_crawl):
    by_reason = Counter(r["reason"] for r in trap_crawl["dropped"])
    assert by_reason == {k: v for k, v in trap_crawl["manifest"]["reasons"].items()}
    assert by_reason["max_depth"] >= 1 and by_reason["crawl_trap"] >= 3
    errors = {r["reason"]: [] for r in trap_crawl["dropped"]}
    for r in trap_crawl["dropped"]:
        errors[r["reason"]].append(r["error"])
    assert all("max_depth 10" in e for e in errors["max_depth"])
    traps = " ".join(errors["crawl_trap"])
    assert "max_query_variants" in traps and "max_segment_repeats" in traps
    # every refused link once, and none of them was fetched
    urls = [r["url"] for r in trap_crawl["dropped"] if r["reason"] in ("max_depth", "crawl_trap")]
    assert len(urls) == len(set(urls))
    assert not set(u.removeprefix(trap_crawl["url"]) for u in urls) & set(trap_crawl["kept"])


def test_depth_is_kept_with_each_page(trap_crawl):
    m = trap_crawl["manifest"]
    rows = {r["url"].removeprefix(trap_crawl["url"]): r["depth"]
            for r in read_table(m, columns=["url", "depth"]).to_pylist()}
    assert rows[""] == 0 and rows["articles/json.html"] == 1 and rows["archive?page=1"] == 1
    assert max(rows.values()) == 10

