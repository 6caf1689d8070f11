"""A hostile website on 127.0.0.1 for the crawler's tests, serving real pydoc pages.

Run inside a network namespace that has only loopback (see ``tests/test_hostile.py``):

    unshare -n python -m tests.hostile SITE_DIR OUT.json

brings loopback up, serves the endpoints below, crawls them with ``collect`` and writes what
became of each URL to OUT.json. Any address but 127.0.0.1 is unreachable in there, so a broken
address guard cannot send a packet anywhere.
"""

from __future__ import annotations

import fcntl
import gzip
import http.server
import json
import socket
import struct
import sys
import threading
import time
from pathlib import Path

SLOW_S = 0.3
STALL_S = 4.0   # longer than the crawl's read_timeout_s (2 s)


def loopback_up() -> None:
    """`ip link set lo up`, without needing iproute2."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = struct.unpack("16sH", fcntl.ioctl(s, 0x8913, struct.pack("16sH", b"lo", 0)))[1]  # SIOCGIFFLAGS
        fcntl.ioctl(s, 0x8914, struct.pack("16sH", b"lo", flags | 1))                             # SIOCSIFFLAGS


class Hostile(http.server.BaseHTTPRequestHandler):
    page = b""          # a real pydoc page (UTF-8), set by serve()
    hits: dict[str, list[float]] = {}

    def log_message(self, *args):
        pass

    def send(self, code: int, body: bytes = b"", ctype: str = "text/html; charset=utf-8", **headers):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = self.path
        Hostile.hits.setdefault(path, []).append(time.monotonic())
        n = len(Hostile.hits[path])
        page = Hostile.page
        try:
            if path == "/robots.txt":
                self.send(200, b"User-agent: *\nDisallow: /private/\n", "text/plain")
            elif path == "/ok.html":
                self.send(200, page)
            elif path == "/slow-drip.html":          # a byte at a time, never done in time
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.end_headers()
                for b in page:
                    self.wfile.write(bytes([b]))
                    self.wfile.flush()
                    time.sleep(SLOW_S)
            elif path == "/stall-headers.html":      # no answer for longer than read_timeout_s
                time.sleep(STALL_S)
                self.send(200, page)
            elif path == "/stall-body.html":         # half a body, then silence
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page[:len(page) // 2])
                self.wfile.flush()
                time.sleep(STALL_S)
            elif path == "/endless.html":            # a body without end
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.end_headers()
                while True:
                    self.wfile.write(page)
            elif path == "/gzip-bomb.html":          # 50 KB on the wire, 50 MB inflated
                self.send(200, gzip.compress(b"\0" * 50_000_000, 9), Content_Encoding="gzip")
            elif path == "/binary.html":             # an executable served as HTML
                self.send(200, Path(sys.executable).read_bytes()[:65536])
            elif path == "/latin1-label.html":       # UTF-8 bytes labelled ISO-8859-1
                self.send(200, page, "text/html; charset=iso-8859-1")
            elif path == "/utf8-label.html":         # Windows-1252 bytes labelled UTF-8
                self.send(200, page.decode("utf-8").encode("cp1252", "xmlcharrefreplace"))
            elif path == "/utf16.html":              # UTF-16 with a byte-order mark, no charset label
                self.send(200, page.decode("utf-8").encode("utf-16"), "text/html")
            elif path == "/invalid-utf8.html":       # mostly UTF-8 with stray invalid bytes
                self.send(200, page.replace(b"heap", b"he\xff\xfeap", 3))
            elif path == "/loop-a.html":
                self.send(302, Location="/loop-b.html")
            elif path == "/loop-b.html":
                self.send(302, Location="/loop-a.html")
            elif path == "/to-private.html":         # redirect to a private address
                self.send(302, Location="http://10.0.0.1/secret.html")
            elif path == "/to-metadata.html":        # redirect to cloud metadata
                self.send(302, Location="http://169.254.169.254/latest/meta-data/")
            elif path == "/flapping.html":           # 500 twice, then fine
                self.send(500, b"oops") if n <= 2 else self.send(200, page)
            elif path == "/always-500.html":
                self.send(503, b"down")
            elif path == "/rate-limited.html":       # 429 with Retry-After: 1, then fine
                self.send(429, b"slow down", Retry_After="1") if n == 1 else self.send(200, page)
            elif path == "/private/page.html":
                self.send(200, page)
            elif path == "/empty.html":
                self.send(200, b"")
            elif path == "/image.png":
                self.send(200, b"\x89PNG\r\n\x1a\n" + b"\0" * 100, "image/png")
            else:
                self.send(404, b"not found")
        except (BrokenPipeError, ConnectionResetError):
            pass


EXPECTED = {
    "ok.html": None, "latin1-label.html": None, "utf8-label.html": None, "utf16.html": None,
    "invalid-utf8.html": None,
    "flapping.html": None, "rate-limited.html": None,
    "slow-drip.html": "timeout", "endless.html": "too_large", "gzip-bomb.html": "too_large",
    "binary.html": "not_html", "image.png": "not_html", "loop-a.html": "redirect_loop",
    "to-private.html": "blocked_address", "to-metadata.html": "blocked_address",
    "always-500.html": "http_5xx", "private/page.html": "robots", "empty.html": "empty_body",
    "missing.html": "http_404", "stall-headers.html": "timeout", "stall-body.html": "timeout",
    "robots.txt": "not_document",
}


def main(site_dir: str, out: str) -> None:
    from tasks.collect import collect
    from tasks.config import CollectConfig
    from tasks.shards import read_table

    loopback_up()
    Hostile.page = (Path(site_dir) / "heapq.html").read_bytes()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}/"
    work = Path(out).parent
    (work / "urls.txt").write_text("\n".join(base + p for p in EXPECTED) + "\n"
                                   + "http://10.1.2.3/direct.html\nhttp://127.0.0.2:9/other-loopback.html\n")
    cfg = CollectConfig(url_lists=[str(work / "urls.txt")], allow_private=["127.0.0.1/32"], timeout_s=3,
                        read_timeout_s=2, max_bytes=2_000_000, retries=2, backoff_s=0.1, per_host_rps=50)
    t0 = time.monotonic()
    m = collect(cfg, work / "collect")
    kept = {r["url"]: r["html"] for r in read_table(m).to_pylist()}
    charsets = {r["url"]: [r["charset"], r["charset_source"], r["replaced_bytes"]] for r in read_table(m).to_pylist()}
    dropped = {r["url"]: r["reason"] for r in read_table(m, dropped=True).to_pylist()}
    errors = {r["url"]: r["error"] for r in read_table(m, dropped=True).to_pylist()}
    hits = {k: [round(t - v[0], 3) for t in v] for k, v in Hostile.hits.items()}
    Path(out).write_text(json.dumps({"base": base, "kept": kept, "dropped": dropped, "hits": hits,
                                     "errors": errors, "charsets": charsets,
                                     "seconds": time.monotonic() - t0, "manifest": m}, default=str))
    server.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:3])
