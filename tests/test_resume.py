"""A collect killed with SIGKILL resumes without refetching what it wrote and without duplicate rows."""

from __future__ import annotations

import functools
import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pyarrow.parquet as pq

from flows.config import CollectConfig
from tasks.collect import collect
from tasks.shards import read_table
from tests.conftest import ROOT

LOCAL = ["127.0.0.1/32"]


def counting_server(site_dir):
    hits: Counter[str] = Counter()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            hits[self.path] += 1
            super().do_GET()

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
    child = subprocess.Popen([sys.executable, "-c", f"from flows.config import CollectConfig; "
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
