"""tasks.warc: WARC/WET files of real pydoc pages, written with warcio, read record by record; each
kind of damage costs the damaged record alone, in plain files, one gzip member per record, and
one gzip stream for the whole file."""

from __future__ import annotations

import gzip
import http.server
import idlelib
import io
import tracemalloc
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import pytest
from warcio.archiveiterator import ArchiveIterator
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from tasks import warc
from tasks.warc import read_warc

URL = "https://docs.example/"
PAGES = ["json.html", "csv.html", "heapq.html", "textwrap.html", "bisect.html"]
WET_PAGES = ["fractions.html", "statistics.html", "difflib.html"]   # as conversion records: their main text
ICON = Path(idlelib.__file__).parent / "Icons" / "idle_48.png"     # a real image
DAMAGED = 6         # the response record of heapq.html, in the middle of the file
FORMATS = ["plain", "gzip", "whole"]   # plain WARC, one gzip member per record, one gzip stream


@pytest.fixture(scope="module")
def texts(site_dir) -> dict[str, str]:
    import trafilatura
    return {URL + n: trafilatura.extract((site_dir / n).read_text()) for n in WET_PAGES}


def build(site_dir: Path, texts: dict[str, str], fmt: str) -> tuple[list[bytes], list[tuple[str, str]]]:
    """A crawl's WARC with a WET's records after it, written by warcio: the bytes of each record
    (a gzip member each for "gzip") and, per record, (url, what the reader should make of it)."""
    f, parts, expect = io.BytesIO(), [], []
    w = WARCWriter(f, gzip=fmt == "gzip")

    def write(record, outcome: str):
        start = f.tell()
        w.write_record(record)
        parts.append(f.getvalue()[start:])
        expect.append((record.rec_headers.get_header("WARC-Target-URI") or "", outcome))

    def response(url, status, ctype, body, outcome, extra=()):
        headers = StatusAndHeaders(status, [("Content-Type", ctype), *extra], protocol="HTTP/1.1")
        write(w.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=headers), outcome)

    write(w.create_warcinfo_record("crawl.warc", {"software": "warcio", "format": "WARC File Format 1.0"}), "skip")
    for name in PAGES:
        request = f"GET /{name} HTTP/1.1\r\nHost: docs.example\r\n\r\n".encode()
        write(w.create_warc_record(URL + name, "request", payload=io.BytesIO(request)), "skip")
        page = (site_dir / name).read_bytes()
        if name == "textwrap.html":   # sent gzipped and chunked, as servers do
            page = gzip.compress(page)
            page = b"".join(b"%x\r\n%s\r\n" % (len(page[i:i + 4096]), page[i:i + 4096])
                            for i in range(0, len(page), 4096)) + b"0\r\n\r\n"
            response(URL + name, "200 OK", "text/html; charset=utf-8", page, "keep",
                     [("Content-Encoding", "gzip"), ("Transfer-Encoding", "chunked")])
        else:
            response(URL + name, "200 OK", "text/html; charset=utf-8", page, "keep")
    write(w.create_warc_record(URL + "json.html", "metadata", payload=io.BytesIO(b"fetchTimeMs: 12\r\n"),
                               warc_content_type="application/warc-fields"), "skip")
    response(URL + "idle_48.png", "200 OK", "image/png", ICON.read_bytes(), "not_html")
    error_page = http.server.DEFAULT_ERROR_MESSAGE % {"code": 404, "message": "File not found",
                                                      "explain": "Nothing matches the given URI"}
    response(URL + "gone.html", "404 Not Found", "text/html;charset=utf-8", error_page.encode(), "http_404")
    response(URL + "robots.txt", "200 OK", "text/plain", (site_dir / "robots.txt").read_bytes(), "not_document")
    write(w.create_warc_record(URL + "empty.html", "conversion", payload=io.BytesIO(b""),
                               warc_content_type="text/plain"), "empty_body")
    for url, text in texts.items():
        write(w.create_warc_record(url, "conversion", payload=io.BytesIO(text.encode()),
                                   warc_content_type="text/plain"), "keep")
    return parts, expect


def assemble(parts: list[bytes], fmt: str) -> bytes:
    data = b"".join(parts)
    return gzip.compress(data) if fmt == "whole" else data


def original(url: str, site_dir: Path, texts: dict[str, str]) -> bytes:
    return texts[url].encode() if url in texts else (site_dir / url.rsplit("/", 1)[1]).read_bytes()


def read(path: Path, **kw) -> tuple[list[tuple], dict | None]:
    """The rows of a file, and its summary (the last row)."""
    rows = list(read_warc(str(path), **kw))
    summary = rows.pop()[1] if rows and rows[-1][0] == "summary" else None
    assert all(r[0] in ("keep", "drop") for r in rows)
    return rows, summary


def check(path: Path, expect: list[tuple[str, str]], site_dir, texts, junk_after: int | None = None) -> list[tuple]:
    """Every record as ``expect`` says, in file order (damage rows whose record is unknown have no URL
    to compare); a junk row after record ``junk_after``; kept bodies equal the pages; and every
    record written is kept, dropped or skipped exactly once."""
    rows, summary = read(path)
    wanted = [(url, outcome) for url, outcome in expect if outcome != "skip"]
    if junk_after is not None:
        wanted.insert(sum(o != "skip" for _, o in expect[:junk_after + 1]), (None, "warc_bad_header"))
    got = [(r[1]["url"], "keep" if r[0] == "keep" else r[2]) for r in rows]
    assert len(got) == len(wanted) and \
        [(u if w is not None else None, o) for (u, o), (w, _) in zip(got, wanted)] == wanted  # None: no URL known
    for kind, fields, *_ in rows:
        if kind == "keep":
            assert fields["body"] == original(fields["url"], site_dir, texts)
            assert fields["status"] == 200 and fields["record_id"].startswith("<urn:uuid:")
            assert fields["fetched_at"].tzinfo is not None and fields["wet"] == (fields["url"] in texts)
    damage = Counter(o for _, o in wanted if o.startswith("warc_"))
    kept = sum(o == "keep" for _, o in wanted)
    assert summary is not None and summary["damaged"] == damage and summary["kept"] == kept
    assert summary["kept"] + summary["dropped"] + summary["skipped"] == summary["records"] == len(expect)
    assert summary["dropped"] + (junk_after is not None) == sum(r[0] == "drop" for r in rows)
    return rows


@pytest.mark.parametrize("fmt", FORMATS)
def test_intact_file_reads_as_warcio_reads_it(tmp_path, site_dir, texts, fmt):
    parts, expect = build(site_dir, texts, fmt)
    (tmp_path / "crawl.warc").write_bytes(assemble(parts, fmt))
    rows = check(tmp_path / "crawl.warc", expect, site_dir, texts)
    # warcio's view of the same documents (it refuses a whole-file gzip stream: it reads it unzipped)
    theirs = {r.rec_headers.get_header("WARC-Record-ID"): (r, r.content_stream().read())
              for r in ArchiveIterator(io.BytesIO(b"".join(parts))) if r.rec_type in ("response", "conversion")}
    ours = {fields["record_id"]: fields for _, fields, *_ in rows}
    assert set(ours) == set(theirs)
    for rid, (record, body) in theirs.items():
        if ours[rid].get("body") is not None:
            assert ours[rid]["body"] == body
        date = datetime.fromisoformat(record.rec_headers.get_header("WARC-Date").replace("Z", "+00:00"))
        assert ours[rid]["fetched_at"] == date.astimezone(timezone.utc)
    html = [f for k, f, *_ in rows if k == "keep" and not f["wet"]]
    assert {(f["content_type"], f["charset"]) for f in html} == {("text/html", "utf-8")}
    assert {(f["content_type"], f["charset"]) for k, f, *_ in rows if k == "keep" and f["wet"]} == \
        {("text/plain", "utf-8")}
    robots = next(f for f in ours.values() if f["url"] == URL + "robots.txt")
    assert robots["error"].startswith("/robots.txt is a site's housekeeping file")
    assert "François Pinard" in next(f["body"].decode() for f in html if f["url"].endswith("heapq.html"))


def set_length(part: bytes, fmt: str, new_length) -> bytes:
    """The record with its WARC Content-Length header replaced by ``new_length(old)``."""
    record = gzip.decompress(part) if fmt == "gzip" else part
    start = record.index(b"\r\nContent-Length: ") + len(b"\r\nContent-Length: ")
    end = record.index(b"\r\n", start)
    record = record[:start] + str(new_length(int(record[start:end]))).encode() + record[end:]
    return gzip.compress(record) if fmt == "gzip" else record


LENGTHS = {"longer": lambda n: n + 700,               # its declared end falls inside the next records
           "shorter": lambda n: n // 2,               # ... in the middle of its page
           "past_the_end": lambda n: n * 10 ** 6,     # ... far past the end of the file (over max_bytes)
           "not_a_number": lambda n: f"{n}x"}          # no length: not a record header


@pytest.mark.parametrize("fmt, damage", [(f, d) for f in FORMATS for d in LENGTHS
                                         # a gzip stream cannot be read again from the start of a
                                         # block skipped unread: what followed it there is lost
                                         if (f, d) != ("whole", "past_the_end")])
def test_a_wrong_content_length_costs_that_record_alone(tmp_path, site_dir, texts, fmt, damage):
    """The records after a wrong Content-Length are all kept (the reader built on warcio before
    with it, lost them all), and the damage is not called truncation."""
    reason = "warc_bad_header" if damage == "not_a_number" else "warc_bad_length"
    new = LENGTHS[damage]
    parts, expect = build(site_dir, texts, fmt)
    assert expect[DAMAGED] == (URL + "heapq.html", "keep")
    length = []
    parts[DAMAGED] = set_length(parts[DAMAGED], fmt, lambda n: length.append(n) or new(n))
    expect[DAMAGED] = (URL + "heapq.html", reason)
    (tmp_path / "bad.warc").write_bytes(assemble(parts, fmt))
    rows = check(tmp_path / "bad.warc", expect, site_dir, texts)
    error = next(r[1]["error"] for r in rows if r[0] == "drop" and r[2] == reason)
    if reason == "warc_bad_length" and fmt != "gzip":    # the next header shows where it really ended
        assert error == f"declared Content-Length {new(length[0])}, but the record ends after {length[0]} bytes"
    elif reason == "warc_bad_length":                    # its gzip member ends it
        assert error.startswith(f"declared Content-Length {new(length[0])}, but ")


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_file_cut_inside_its_last_record_is_truncated(tmp_path, site_dir, texts, fmt):
    parts, expect = build(site_dir, texts, fmt)
    data = assemble(parts, fmt)
    cut = len(data) - (40 if fmt == "whole" else len(parts[-1]) // 2)   # a whole gzip stream: its last bytes
    (tmp_path / "cut.warc").write_bytes(data[:cut])
    expect[-1] = (expect[-1][0], "warc_truncated")
    check(tmp_path / "cut.warc", expect, site_dir, texts)


def test_a_gzip_member_that_does_not_decompress_costs_that_record_alone(tmp_path, site_dir, texts):
    parts, expect = build(site_dir, texts, "gzip")
    member = bytearray(parts[DAMAGED])
    for i in range(len(member) // 2, len(member) // 2 + 16):   # inside its deflate data
        member[i] ^= 0x5A
    parts[DAMAGED] = bytes(member)
    expect[DAMAGED] = (None, "warc_bad_gzip")
    (tmp_path / "bad.warc.gz").write_bytes(b"".join(parts))
    rows = check(tmp_path / "bad.warc.gz", expect, site_dir, texts)
    assert [r[1]["error"] for r in rows if r[0] == "drop" and r[2] == "warc_bad_gzip"][0].startswith(
        f"gzip member at byte {sum(map(len, parts[:DAMAGED]))} does not decompress")


def garbage(site_dir: Path, member: bool = True) -> bytes:
    """Bytes of an image, then a gzip member that is no WARC record (robots.txt gzipped)."""
    return ICON.read_bytes()[100:1100] + (gzip.compress((site_dir / "robots.txt").read_bytes()) if member else b"")


@pytest.mark.parametrize("fmt", FORMATS)
def test_garbage_between_two_records_is_reported_and_both_are_kept(tmp_path, site_dir, texts, fmt):
    parts, expect = build(site_dir, texts, fmt)
    parts.insert(DAMAGED + 1, garbage(site_dir))             # where a record should start
    (tmp_path / "junk.warc").write_bytes(assemble(parts, fmt))
    rows = check(tmp_path / "junk.warc", expect, site_dir, texts, junk_after=DAMAGED)
    assert [r[1]["url"] for r in rows if r[0] == "keep"][2:4] == [URL + "heapq.html", URL + "textwrap.html"]


@pytest.mark.parametrize("fmt", ["plain", "gzip"])
def test_a_record_over_max_bytes_is_dropped_unread_and_the_next_kept(tmp_path, site_dir, texts, fmt):
    parts, expect = build(site_dir, texts, fmt)
    (tmp_path / "crawl.warc").write_bytes(assemble(parts, fmt))
    limit = len((site_dir / "json.html").read_bytes())   # json.html's block (HTTP headers + page) is over it
    rows, summary = read(tmp_path / "crawl.warc", max_bytes=limit)
    outcome = {r[1]["url"]: "keep" if r[0] == "keep" else r[2] for r in rows}
    big = [u for u, o in expect if o == "keep" and len(original(u, site_dir, texts)) >= limit]
    assert big[0] == URL + "json.html" and URL + "csv.html" not in big
    assert [u for u in outcome if outcome[u] == "too_large"] == big
    assert outcome[URL + "csv.html"] == "keep"       # the record after the first one too large
    assert next(f["body"] for k, f, *_ in rows if k == "keep" and f["url"] == URL + "csv.html") == \
        (site_dir / "csv.html").read_bytes()
    assert summary["kept"] + summary["dropped"] + summary["skipped"] == len(expect)
    assert summary["kept"] == sum(o == "keep" for _, o in expect) - len(big)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_big_file_is_read_in_bounded_memory(tmp_path, site_dir, fmt):
    """20 MB of pages (the site's, eight times over) are read holding a few MB at most, in one
    gzip stream for the whole file too."""
    pages = sorted(site_dir.glob("*.html"))
    headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
    path = tmp_path / "big.warc"
    with (gzip.open(path, "wb", compresslevel=1) if fmt == "whole" else open(path, "wb")) as f:
        w = WARCWriter(f, gzip=fmt == "gzip")
        for copy in range(8):
            for page in pages:
                w.write_record(w.create_warc_record(f"{URL}{copy}/{page.name}", "response",
                                                    payload=io.BytesIO(page.read_bytes()), http_headers=headers))
    size = sum(p.stat().st_size for p in pages) * 8
    tracemalloc.start()
    try:
        kept = sum(row[0] == "keep" for row in read_warc(str(path)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert kept == 8 * len(pages) and size > 16e6
    assert peak < 8e6, f"{peak / 1e6:.1f} MB held to read {size / 1e6:.1f} MB"


@pytest.mark.parametrize("fmt", FORMATS)
def test_small_reads_change_nothing(tmp_path, site_dir, texts, fmt, monkeypatch):
    """With reads of a few hundred bytes, headers, separators and gzip members straddle reads, and
    a member that does not decompress has given some of its bytes before its error shows."""
    parts, expect = build(site_dir, texts, fmt)
    parts[DAMAGED] = set_length(parts[DAMAGED], fmt, lambda n: n // 2)
    parts.insert(DAMAGED + 4, garbage(site_dir))
    if fmt == "gzip":
        parts[DAMAGED + 5] = parts[DAMAGED + 5][:800] + bytes(b ^ 0x5A for b in parts[DAMAGED + 5][800:816]) + \
            parts[DAMAGED + 5][816:]
    (tmp_path / "bad.warc").write_bytes(assemble(parts, fmt))
    rows = list(read_warc(str(tmp_path / "bad.warc")))
    assert [r[2] for r in rows if r[0] == "drop" and r[2].startswith("warc_")] == \
        ["warc_bad_length", "warc_bad_header"] + ["warc_bad_gzip"] * (fmt == "gzip")
    monkeypatch.setattr(warc, "READ", 397)
    monkeypatch.setattr(warc, "FEED", 401)
    assert list(read_warc(str(tmp_path / "bad.warc"))) == rows


@pytest.mark.parametrize("fmt, split", [("plain", n) for n in range(1, len("WARC/1."))] +
                         [("gzip", n) for n in range(1, len(b"\x1f\x8b\x08"))])
def test_the_next_record_is_found_across_two_reads(tmp_path, site_dir, texts, monkeypatch, fmt, split):
    """After damage, the next record is found when a read ends inside its ``WARC/1.`` line (after
    a wrong Content-Length in a plain file) or inside its gzip magic bytes (after garbage)."""
    parts, expect = build(site_dir, texts, fmt)
    if fmt == "plain":
        parts[DAMAGED] = set_length(parts[DAMAGED], "plain", lambda n: n // 2)
        expect[DAMAGED] = (URL + "heapq.html", "warc_bad_length")
    else:
        parts.insert(DAMAGED + 1, garbage(site_dir, member=False))
    (tmp_path / "bad.warc").write_bytes(b"".join(parts))
    monkeypatch.setattr(warc, "READ", len(b"".join(parts[:DAMAGED + 1 + (fmt == "gzip")])) + split)
    monkeypatch.setattr(warc, "FEED", 997)
    check(tmp_path / "bad.warc", expect, site_dir, texts, junk_after=DAMAGED if fmt == "gzip" else None)


def test_blank_lines_between_records_are_no_damage(tmp_path, site_dir, texts):
    parts, expect = build(site_dir, texts, "plain")
    (tmp_path / "crawl.warc").write_bytes(b"\r\n".join(parts))
    check(tmp_path / "crawl.warc", expect, site_dir, texts)
