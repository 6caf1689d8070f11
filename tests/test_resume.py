"""Nothing lost, nothing repeated: a killed collect resumes without refetching or duplicating, and a
second collect over the same sources fetches only what changed."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pyarrow.parquet as pq

from tasks import pydoc_site
from tasks.collect import collect, collect_pydoc_site
from tasks.config import CollectConfig
from tasks.shards import read_table
from tests.conftest import ROOT

LOCAL = ["127.0.0.1/32"]


class Hits(Counter):
    """Requests per path, the status codes answered, and when each request came."""

    def __init__(self):
        super().__init__()
        self.codes: dict[str, list[int]] = {}
        self.times: list[tuple[float, str]] = []

    def clear(self):
        super().clear()
        self.codes.clear()
        self.times.clear()


def counting_server(site_dir):
    hits = Hits()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            hits[self.path] += 1
            hits.times.append((time.monotonic(), self.path))
            super().do_GET()

        def send_response(self, code, message=None):
            hits.codes.setdefault(self.path, []).append(code)
            super().send_response(code, message)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(site_dir)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, hits


def test_killed_collect_resumes_without_refetching(tmp_path, site_dir):
    server, hits = counting_server(site_dir)
    url = f"http://127.0.0.1:{server.server_port}/"
    out = tmp_path / "collect"
    slow = f"CollectConfig(allow_private={LOCAL!r}, per_host_rps=6, concurrency=2)"
    child = subprocess.Popen([sys.executable, "-c", f"from tasks.config import CollectConfig; "
                              f"from tasks.collect import collect; collect({slow}, {str(out)!r}, start_urls=[{url!r}])"],
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not list(tmp_path.glob(".collect.tmp-*/part-00001.parquet")) and time.time() < deadline:
            time.sleep(0.1)
        os.kill(child.pid, signal.SIGKILL)       # mid-crawl, with shards already on disk
        child.wait()
        (stale,) = tmp_path.glob(".collect.tmp-*")
        written = {r for f in stale.rglob("part-*.parquet") for r in pq.read_table(f, columns=["url"])["url"].to_pylist()}
        assert written and not out.exists()
        before = Counter(hits)

        m = collect(CollectConfig(allow_private=LOCAL), out, start_urls=[url])
    finally:
        server.shutdown()
    urls = read_table(m)["url"].to_pylist() + read_table(m, dropped=True)["url"].to_pylist()
    assert len(urls) == len(set(urls))                                   # no duplicate rows
    pages = {p.name for p in site_dir.glob("*.html")}
    assert {u.rsplit("/", 1)[1] for u in read_table(m)["url"].to_pylist()} >= pages - {"index.html"}
    for u in written:                                                    # nothing written is fetched again
        path = "/" + u.rsplit("/", 1)[1] if not u.endswith("/") else "/"
        assert hits[path] == before[path] == 1, u
    assert list(tmp_path.iterdir()) == [out]


def test_killed_crawl_of_the_embedded_site_resumes_on_another_port(tmp_path, site_dir):
    """A retried flow serves its site again, on another port: what the killed attempt wrote is not
    fetched again, and the crawl ends with the pages of an uninterrupted one, each once."""
    first, hits_first = counting_server(site_dir)
    out = tmp_path / "collect"
    child = subprocess.Popen([sys.executable, "-c", "from tasks.config import CollectConfig; "
                              "from tasks.collect import collect_pydoc_site; collect_pydoc_site("
                              f"CollectConfig(per_host_rps=6, concurrency=2), {str(out)!r}, "
                              f"'http://127.0.0.1:{first.server_port}/')"],
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def rows_written() -> int:
        return sum(pq.read_metadata(f).num_rows for f in tmp_path.glob(".collect.tmp-*/**/part-*.parquet"))
    try:
        deadline = time.time() + 60
        while rows_written() < 20 and time.time() < deadline:
            time.sleep(0.1)
        os.kill(child.pid, signal.SIGKILL)       # mid-crawl (about 110 URLs at 6 a second), 20 rows on disk
        child.wait()
    finally:
        first.shutdown()
        first.server_close()
    (stale,) = tmp_path.glob(".collect.tmp-*")
    written = {r for f in stale.rglob("part-*.parquet") for r in pq.read_table(f, columns=["url"])["url"].to_pylist()}
    assert len(written) >= 20 and not out.exists()

    second, hits = counting_server(site_dir)     # the retry: the same site on a new port
    try:
        assert second.server_port != first.server_port
        fast = CollectConfig(per_host_rps=1000)   # as the flow crawls its own site
        resumed = collect_pydoc_site(fast, out, f"http://127.0.0.1:{second.server_port}/")
        fetched = Counter(hits)
        whole = collect_pydoc_site(fast, tmp_path / "whole", f"http://127.0.0.1:{second.server_port}/")
    finally:
        second.shutdown()
        second.server_close()

    def rows(m: dict) -> list[tuple]:
        return sorted([(r["url"], r["doc_id"]) for r in read_table(m, columns=["url", "doc_id"]).to_pylist()]
                      + [(u, None) for u in read_table(m, dropped=True)["url"].to_pylist()])
    urls = [u for u, _ in rows(resumed)]
    assert len(urls) == len(set(urls))                                   # no page twice
    assert rows(resumed) == rows(whole)                                  # none missing, same ids
    assert written < set(urls) and all(u.startswith(pydoc_site.ORIGIN) for u in urls)
    for u in written:                                                    # nothing written is fetched again
        assert fetched["/" + u.removeprefix(pydoc_site.ORIGIN)] == 0, u
    assert sum(fetched.values()) == len(urls) - len(written) + 1         # the rest once, and robots.txt


def test_second_collect_fetches_only_what_changed(tmp_path, site_dir):
    site = tmp_path / "site"
    shutil.copytree(site_dir, site)
    server, hits = counting_server(site)
    url = f"http://127.0.0.1:{server.server_port}/"
    cfg = CollectConfig(allow_private=LOCAL)
    try:
        first = collect(cfg, tmp_path / "one", start_urls=[url])
        page = site / "heapq.html"
        page.write_text(page.read_text().replace("François", "Francois"))
        os.utime(page, (time.time() + 5, time.time() + 5))
        hits.clear()
        second = collect(cfg, tmp_path / "two", start_urls=[url], previous=first)
    finally:
        server.shutdown()
    one = {r["url"]: r for r in read_table(first).to_pylist()}
    two = {r["url"]: r for r in read_table(second).to_pylist()}
    assert one.keys() == two.keys()
    changed = [u for u in two if two[u]["content_sha256"] != one[u]["content_sha256"]]
    assert changed == [url + "heapq.html"]
    assert all(two[u]["doc_id"] == one[u]["doc_id"] for u in two if u not in changed)
    full_bodies = [p for p, codes in hits.codes.items() if 200 in codes and p.endswith(".html")]
    assert full_bodies == ["/heapq.html"]                      # every other page answered 304
    assert second["not_modified"] == len(one) - 1


def test_unchanged_warc_is_not_read_again(tmp_path, site_dir):
    from tests.test_sources import write_warc
    write_warc(tmp_path / "a.warc.gz", site_dir)
    cfg = CollectConfig(warc_files=[str(tmp_path / "a.warc.gz")])
    first = collect(cfg, tmp_path / "one")
    second = collect(cfg, tmp_path / "two", previous=first)
    assert second["files_unchanged_rows"] == first["rows"] + first["dropped"]
    assert read_table(second).to_pylist() == read_table(first).to_pylist()
    os.utime(tmp_path / "a.warc.gz", (time.time() + 5, time.time() + 5))   # touched: read again
    third = collect(cfg, tmp_path / "three", previous=second)
    assert third["files_unchanged_rows"] == 0 and third["rows"] == first["rows"]


def test_crawl_delay_spaces_requests_to_a_host(tmp_path, site_dir):
    site = tmp_path / "site"
    shutil.copytree(site_dir, site)
    # fractional, as sites write it (Python's robots parser alone reads whole seconds only);
    # the group for another crawler does not apply to ours
    (site / "robots.txt").write_text("User-agent: otherbot\nCrawl-delay: 5\n\nUser-agent: *\nCrawl-delay: 0.6\n")
    server, hits = counting_server(site)
    url = f"http://127.0.0.1:{server.server_port}/"
    (tmp_path / "urls.txt").write_text("".join(f"{url}{p}.html\n" for p in ("json", "csv", "heapq", "bisect")))
    try:
        m = collect(CollectConfig(allow_private=LOCAL, url_lists=[str(tmp_path / "urls.txt")]), tmp_path / "c")
    finally:
        server.shutdown()
    assert m["rows"] == 4
    times = [t for t, path in hits.times if path.endswith(".html")]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(gaps) == 3 and 0.55 < min(gaps) and max(gaps) < 3, gaps


def test_warc_over_http(tmp_path, site_dir):
    from tasks.pydoc_site import serve
    from tests.test_sources import PAGES, write_warc
    (tmp_path / "w").mkdir()
    write_warc(tmp_path / "w" / "a.warc.gz", site_dir)
    with serve(tmp_path / "w") as url:
        m = collect(CollectConfig(warc_files=[url + "a.warc.gz"]), tmp_path / "c")
    assert [r["url"].rsplit("/", 1)[1] for r in read_table(m).to_pylist()] == PAGES
