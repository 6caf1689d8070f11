"""Non-crawl sources: WARC/WET files written with warcio (damaged ones too), tables, sitemaps."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from tasks.collect import collect
from tasks.config import CollectConfig, TableSource
from tasks.pydoc_site import serve
from tasks.shards import read_table
from tests.conftest import ROOT

PAGES = ["json.html", "csv.html", "heapq.html", "textwrap.html", "bisect.html"]


def write_warc(path: Path, site_dir: Path, gz: bool = True) -> list[str]:
    """A WARC as a crawler writes it: request + response per page, a metadata record, an image, a 404."""
    urls = []
    with open(path, "wb") as f:
        w = WARCWriter(f, gzip=gz)
        for name in PAGES:
            url = f"https://docs.example/{name}"
            urls.append(url)
            w.write_record(w.create_warc_record(url, "request", payload=io.BytesIO(b"GET / HTTP/1.1\r\n\r\n")))
            headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
            w.write_record(w.create_warc_record(url, "response", payload=io.BytesIO((site_dir / name).read_bytes()),
                                                http_headers=headers))
        w.write_record(w.create_warc_record("https://docs.example/meta", "metadata",
                                            payload=io.BytesIO(b"fetchTimeMs: 12\n"),
                                            warc_content_type="application/warc-fields"))
        png = StatusAndHeaders("200 OK", [("Content-Type", "image/png")], protocol="HTTP/1.1")
        w.write_record(w.create_warc_record("https://docs.example/logo.png", "response",
                                            payload=io.BytesIO(b"\x89PNG\r\n\x1a\n" + b"\0" * 64), http_headers=png))
        missing = StatusAndHeaders("404 Not Found", [("Content-Type", "text/html")], protocol="HTTP/1.1")
        w.write_record(w.create_warc_record("https://docs.example/gone.html", "response",
                                            payload=io.BytesIO(b"<html>gone</html>"), http_headers=missing))
    return urls


def test_warc_keeps_html_responses_and_records_the_rest(tmp_path, site_dir):
    urls = write_warc(tmp_path / "crawl.warc.gz", site_dir)
    m = collect(CollectConfig(warc_files=[str(tmp_path / "crawl.warc.gz")]), tmp_path / "c")
    kept = read_table(m).to_pylist()
    assert [r["url"] for r in kept] == urls
    assert all(r["record_id"].startswith("<urn:uuid:") and r["fetched_at"] and r["status"] == 200 for r in kept)
    assert "François Pinard" in next(r["html"] for r in kept if r["url"].endswith("heapq.html"))
    assert m["reasons"] == {"http_404": 1, "not_html": 1}       # request and metadata records are not pages


def test_truncated_warc_keeps_what_came_before_the_damage(tmp_path, site_dir):
    write_warc(tmp_path / "full.warc.gz", site_dir)
    data = (tmp_path / "full.warc.gz").read_bytes()
    # cut inside the response record of the fourth page (each page is a request + a response member)
    members, pos = [], 0
    while pos < len(data):
        d = __import__("zlib").decompressobj(31)
        d.decompress(data[pos:])
        members.append(pos)
        pos = len(data) - len(d.unused_data)
    cut = members[7] + (members[8] - members[7]) // 2
    (tmp_path / "cut.warc.gz").write_bytes(data[:cut])
    m = collect(CollectConfig(warc_files=[str(tmp_path / "cut.warc.gz")]), tmp_path / "c")
    assert [r["url"].rsplit("/", 1)[1] for r in read_table(m).to_pylist()] == PAGES[:3]
    assert m["reasons"] == {"warc_truncated": 1}
    summary = m["warc_records"][str(tmp_path / "cut.warc.gz")]
    assert summary["records"] == 8 == summary["kept"] + summary["dropped"] + summary["skipped"]


def test_wrong_content_length_is_reported_not_fatal(tmp_path, site_dir):
    write_warc(tmp_path / "plain.warc", site_dir, gz=False)
    data = (tmp_path / "plain.warc").read_bytes()
    # shrink the third response's Content-Length: its tail is then read as a broken next record
    third = data.index(b"WARC-Type: response", data.index(b"heapq.html") - 400)
    start = data.index(b"Content-Length: ", third) + len(b"Content-Length: ")
    end = data.index(b"\r\n", start)
    bad = data[:start] + str(int(data[start:end]) // 2).encode() + data[end:]
    (tmp_path / "bad.warc").write_bytes(bad)
    m = collect(CollectConfig(warc_files=[str(tmp_path / "bad.warc")]), tmp_path / "c")
    kept = [r["url"].rsplit("/", 1)[1] for r in read_table(m).to_pylist()]
    assert kept == PAGES[:2] + PAGES[3:]                      # every good record after the damage too
    assert m["reasons"] == {"warc_bad_length": 1, "http_404": 1, "not_html": 1}
    assert "declared Content-Length" in read_table(m, dropped=True).to_pylist()[0]["error"]


def test_wet_conversion_records_are_plain_text(tmp_path, stages_text):
    with open(tmp_path / "crawl.warc.wet.gz", "wb") as f:
        w = WARCWriter(f, gzip=True)
        for url, text in stages_text[:3]:
            w.write_record(w.create_warc_record(url, "conversion", payload=io.BytesIO(text.encode()),
                                                warc_content_type="text/plain"))
    m = collect(CollectConfig(warc_files=[str(tmp_path / "crawl.warc.wet.gz")]), tmp_path / "c")
    rows = read_table(m).to_pylist()
    assert [(r["url"], r["html"]) for r in rows] == stages_text[:3]
    assert {r["content_type"] for r in rows} == {"text/plain"}


def test_empty_bodies_are_dropped_at_collect_from_every_source(tmp_path, site_dir, stages_text):
    with open(tmp_path / "crawl.warc.wet.gz", "wb") as f:
        w = WARCWriter(f, gzip=True)
        for url, text in [*stages_text[:2], ("https://docs.example/blank.html", "")]:
            w.write_record(w.create_warc_record(url, "conversion", payload=io.BytesIO(text.encode()),
                                                warc_content_type="text/plain"))
    (tmp_path / "pages").mkdir()
    shutil.copy(site_dir / "json.html", tmp_path / "pages")
    (tmp_path / "pages" / "empty.html").write_bytes(b"")
    (tmp_path / "pages" / "blank.txt").write_bytes(b"\r\n  \n")
    m = collect(CollectConfig(warc_files=[str(tmp_path / "crawl.warc.wet.gz")], paths=[str(tmp_path / "pages")]),
                tmp_path / "c")
    assert m["rows"] == 3 and m["reasons"] == {"empty_body": 3}
    dropped = sorted(r["url"].rsplit("/", 1)[1] for r in read_table(m, dropped=True).to_pylist())
    assert dropped == ["blank.html", "blank.txt", "empty.html"]


@pytest.fixture(scope="module")
def stages_text(site_dir) -> list[tuple[str, str]]:
    """(url, main text) of real pages, as a dataset export would hold them."""
    import trafilatura
    return [(f"https://docs.example/{n}", trafilatura.extract((site_dir / n).read_text())) for n in PAGES]


def test_parquet_and_jsonl_tables_with_a_text_column(tmp_path, stages_text):
    pq.write_table(pa.table({"url": [u for u, _ in stages_text], "content": [t for _, t in stages_text]}),
                   tmp_path / "export.parquet")
    with gzip.open(tmp_path / "export.jsonl.gz", "wt") as f:
        for u, t in stages_text:
            f.write(json.dumps({"text": t, "id": u}) + "\n")
        f.write(json.dumps({"text": "   ", "id": "blank"}) + "\n")
    cfg = CollectConfig(tables=[TableSource(path=str(tmp_path / "export.parquet"), text_column="content"),
                                TableSource(path=str(tmp_path / "export.jsonl.gz"), url_column="id")])
    m = collect(cfg, tmp_path / "c")
    rows = read_table(m).to_pylist()
    assert [(r["url"], r["html"]) for r in rows] == stages_text * 2
    assert {r["source"].split(":")[0] for r in rows} == {"table"} and len({r["source"] for r in rows}) == 2
    assert m["reasons"] == {"empty_body": 1}
    with pytest.raises(ValueError, match="no column 'body'"):
        collect(CollectConfig(tables=[TableSource(path=str(tmp_path / "export.parquet"), text_column="body")]),
                tmp_path / "c2")
    assert not (tmp_path / "c2").exists()


def test_sitemap_index_leads_to_its_pages(tmp_path, site_dir):
    site = tmp_path / "site"
    shutil.copytree(site_dir, site)
    with serve(site) as url:
        (site / "sitemap-a.xml").write_text(
            '<?xml version="1.0"?><urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">'
            + "".join(f"<url><loc>{url}{p}</loc></url>" for p in PAGES[:3]) + "</urlset>")
        (site / "sitemap-b.xml.gz").write_bytes(gzip.compress((
            '<?xml version="1.0"?><urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">'
            + "".join(f"<url><loc>{url}{p}</loc></url>" for p in PAGES[3:]) + "</urlset>").encode()))
        (site / "sitemap.xml").write_text(
            '<?xml version="1.0"?><sitemapindex xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">'
            f"<sitemap><loc>{url}sitemap-a.xml</loc></sitemap><sitemap><loc>{url}sitemap-b.xml.gz</loc></sitemap>"
            "</sitemapindex>")
        m = collect(CollectConfig(sitemaps=[url + "sitemap.xml"], allow_private=["127.0.0.1/32"]), tmp_path / "c")
    got = sorted(r["url"].rsplit("/", 1)[1] for r in read_table(m).to_pylist())
    assert got == sorted(PAGES)                       # listed pages only: sitemap pages are not crawled further
    assert {r["source"] for r in read_table(m).to_pylist()} == {f"sitemap:{url}sitemap.xml"}


def test_warc_on_s3_through_a_local_s3_server(tmp_path, site_dir):
    # moto's S3 server on 127.0.0.1, inside a namespace with only loopback: a client that
    # ignored the endpoint would find no route to AWS
    out = tmp_path / "s3.json"
    proc = subprocess.run(["unshare", "-n", sys.executable, "-m", "tests.s3_source", str(site_dir), str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert [u.rsplit("/", 1)[1] for u in r["kept"]] == PAGES
    assert r["sources"] == ["warc:s3://corpus/cc/crawl.warc.gz"]
    assert r["reasons"] == {"http_404": 1, "not_html": 1}
    assert "ETag" in r["signatures"]["warc:s3://corpus/cc/crawl.warc.gz"]
    assert r["second_unchanged"] == len(PAGES) + 2 and r["second_rows"] == len(PAGES)   # not read again
