"""Stage 1, collect: crawl sites, fetch URL lists and sitemaps, read WARC/WET files, tables and
local folders into raw-page shards.

One kept row per page (``tasks.pages``: source, url, fetched_at, status, content type, sha256
of the body, how its bytes were decoded, the raw HTML or text); every page not collected is a
dropped row with a short reason code (connect_error, timeout, http_404, http_5xx, http_429,
robots, not_html, not_document, too_large, redirect_loop, too_many_redirects, blocked_address,
empty_body, decode_error, max_depth, crawl_trap, warc_bad_length, warc_truncated, ...).

This module chooses the sources and writes the shards; the crawler is ``tasks.crawler``, WARC/WET
files are read by ``tasks.warc``, the other files by ``tasks.readers``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import fsspec
import pyarrow.compute as pc
from tqdm.auto import tqdm

from tasks import pydoc_site, readers, warc
from tasks.charset import Undecodable, decode_page
from tasks.config import CollectConfig
from tasks.crawler import Crawler
from tasks.pages import DROPPED_SCHEMA, PAGE_SCHEMA, drop_row, page_row
from tasks.shards import StageWriter, read_manifest, read_table, write_json
from tasks.stage import stage_dir, stage_task
from tasks.workers import in_order, on_dask, pool_extra, shard_pool

log = logging.getLogger(__name__)

LOCAL_SUFFIXES = {".html": "text/html", ".htm": "text/html", ".txt": "text/plain"}


class Previous:
    """The last finished collect over the same sources: pages are asked for again only if changed
    (conditional GET with their ETag / Last-Modified), files re-read only if their size or
    modification time changed."""

    def __init__(self, manifest: dict | None):
        usable = bool(manifest) and Path(manifest["dir"]).is_dir()
        self.signatures: dict[str, str] = manifest.get("signatures", {}) if usable else {}
        self.summaries: dict[str, dict] = manifest.get("warc_records", {}) if usable else {}
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
        kept = list(writer.resumed("kept", cols + ["html", "depth"])) if writer else []
        rows = kept + (list(writer.resumed("dropped", cols)) if writer else [])
        self.urls = {r["url"] for r in rows}
        self.records = {(r["source"], r["record_id"] or r["url"]) for r in rows}
        self.crawled = [(r["url"], r["source"], r["html"], r["depth"]) for r in kept
                        if r["source"].startswith("crawl:") and r.get("html")]


def decoded_row(source: str, url: str, status: int | None, ctype: str, body: bytes, **fields) -> tuple:
    """("keep", row) for a page's bytes, or ("drop", row, reason) when there is nothing to keep."""
    if not body.strip():
        return "drop", drop_row(source, url, "no content", status, ctype, fields.get("fetched_at"),
                                fields.get("record_id")), "empty_body"
    try:
        decoded = decode_page(body, fields.pop("charset", None))
    except Undecodable as e:
        return "drop", drop_row(source, url, str(e), status, ctype, fields.get("fetched_at"),
                                fields.get("record_id")), "decode_error"
    return "keep", page_row(source, url, status, ctype, decoded.text, decoded=decoded, **fields)


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
        kind, row, *reason = decoded_row(source, url, None, ctype, f.read_bytes())
        writer.keep(row) if kind == "keep" else writer.drop(row, *reason)


def write_records(records, writer: StageWriter, desc: str, done: Done, summaries: dict) -> None:
    """Write ("keep", fields) / ("drop", fields, reason) records from a reader; ("summary", fields)
    goes to ``summaries`` under its path. Kept fields hold the page as ``html`` (text) or ``body``
    (bytes, decoded here, with the declared ``charset``)."""
    for rec in tqdm(records, desc=desc, unit="record"):
        kind, f = rec[0], rec[1]
        if kind == "summary":
            summaries[f["path"]] = f
            continue
        if (f["source"], f.get("record_id") or f["url"]) in done.records:
            continue
        if kind == "keep" and "body" in f:
            kind, row, *reason = decoded_row(f["source"], f["url"], f["status"], f["content_type"], f["body"],
                                             fetched_at=f["fetched_at"], record_id=f["record_id"],
                                             charset=f.get("charset"))
            writer.keep(row) if kind == "keep" else writer.drop(row, *reason)
        elif kind == "keep":
            writer.keep(page_row(f["source"], f["url"], f["status"], f["content_type"], f["html"],
                                 f["fetched_at"], f["record_id"]))
        else:
            writer.drop(drop_row(f["source"], f["url"], f.get("error", ""), f.get("status"), f.get("content_type"),
                                 f.get("fetched_at"), f.get("record_id")), rec[2])


def file_records(read: Callable[..., Iterable[tuple]], args: tuple) -> list[tuple]:
    """A shard of collect's work on a Dask worker: every record of one WARC/WET or table file."""
    return list(read(*args))


def read_files(files: list[tuple[str, Callable, tuple]], w: StageWriter, done: Done, runner: dict | None,
               summaries: dict) -> dict:
    """Write the records of ``(path, reader, args)`` files, in order. Locally a file is streamed
    record by record; with ``runner.task_runner: dask`` each file is read on a Dask worker (a
    Prefect task run ``collect-shard-N``), one file per worker at a time, and its records are
    written here as they come back."""
    if not files or not on_dask(runner):   # no Dask cluster is started for nothing to read
        for path, read, args in files:
            write_records(read(*args), w, f"collect ({Path(path).name})", done, summaries)
        return {}
    with shard_pool(runner, "collect", None) as pool:
        for (path, _, _), records in in_order(pool, files, lambda f: pool.submit(file_records, *f[1:]), ahead=1):
            write_records(records, w, f"collect ({Path(path).name})", done, summaries)
        return pool_extra(pool)


def collect(cfg: CollectConfig, stage_dir: str | Path, start_urls: list[str] | None = None,
            previous: dict | None = None, runner: dict | None = None,
            local_sites: dict[str, str] | None = None) -> dict:
    """Run the collect stage into ``stage_dir``; returns its manifest.

    ``start_urls`` overrides ``cfg.start_urls`` (``collect_pydoc_site`` passes the embedded site's).
    ``local_sites``: ``{origin: served URL}`` of sites this process serves on loopback, crawled and
    recorded under their fixed origin (``tasks.crawler.local_routes``).
    ``previous`` is the manifest of the last collect over the same sources: what has not
    changed since is carried over instead of fetched again. ``runner``: where WARC/WET and table
    files are read (``read_files``); a crawl stays in this process, where per-host politeness is kept.
    """
    prev = Previous(previous)
    signatures: dict[str, str] = {}
    summaries: dict[str, dict] = {}
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
        files = [(p, f"warc:{p}", warc.read_warc, (p, cfg.max_bytes)) for p in cfg.warc_files]
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
            summaries[path] = prev.summaries.get(path)
            reused += len(same[0]) + len(same[1])
        spread = read_files(changed, w, done, runner, summaries)
        crawler = Crawler(cfg, w, prev, done, local_sites)
        if seeds or cfg.sitemaps:
            asyncio.run(crawler.run(seeds, cfg.sitemaps))
        w.extra = {"seconds": round(time.time() - t0, 3), "signatures": signatures,
                   "not_modified": crawler.not_modified, "files_unchanged_rows": reused,
                   "links_beyond_max_pages": crawler.beyond_max_pages, "warc_records": summaries,
                   "sources": urls + cfg.url_lists + cfg.sitemaps + cfg.warc_files + [t.path for t in cfg.tables]
                   + [str(Path(p).resolve()) for p in cfg.paths], **spread}
    return w.manifest


def collect_pydoc_site(cfg: CollectConfig, stage_dir: str | Path, served_url: str) -> dict:
    """Crawl the embedded pydoc site, served at ``served_url`` (``pydoc_site.serve``), into
    ``stage_dir``. Its pages are recorded under ``pydoc_site.ORIGIN`` whatever port it is served on
    this time: URLs, sources and doc ids are the same in every run, so a killed crawl resumed with
    the site on another port fetches nothing it wrote, and the same pages give the same digests
    at every later stage. Only this site is reached on loopback: ``allow_private`` is left as it is."""
    log.info("collect: the embedded site %s, served at %s", pydoc_site.ORIGIN, served_url)
    return collect(cfg, stage_dir, start_urls=[pydoc_site.ORIGIN], local_sites={pydoc_site.ORIGIN: served_url})


def collect_metrics(manifest: dict) -> dict[str, float]:
    """The stage's own figures for MLflow, beside its counts by reason."""
    warcs = [s for s in manifest["warc_records"].values() if s]
    return {**{k: float(manifest[k]) for k in ("not_modified", "files_unchanged_rows", "links_beyond_max_pages")},
            "warc_records": float(sum(s["records"] for s in warcs)),
            "warc_records_skipped": float(sum(s["skipped"] for s in warcs))}


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


def pydoc_modules(cfg: CollectConfig) -> tuple[str, ...]:
    """The modules of the embedded site: as configured, or (null) the curated default list."""
    return tuple(cfg.pydoc_modules) if cfg.pydoc_modules is not None else pydoc_site.DEFAULT_MODULES


@stage_task("collect", sources=sources_fingerprint)
def collect_task(ctx: dict, section: dict, inputs: list[dict], run_id: str) -> dict | tuple[dict, dict]:
    """Collect the configured sources; with none, crawl the embedded pydoc site, served on
    127.0.0.1 and recorded under http://pydoc.localhost/."""
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
        return manifest, collect_metrics(manifest)
    modules = pydoc_modules(cfg)
    key = hashlib.sha256("\n".join(modules).encode()).hexdigest()[:12]
    with pydoc_site.render_and_serve(Path(ctx["data_dir"]) / "pydoc-site" / key, modules) as url:
        # our own static site: no need to spare it
        site = cfg.model_copy(update={"per_host_rps": max(cfg.per_host_rps, 1000.0)})
        manifest = collect_pydoc_site(site, out, url)
        return manifest, collect_metrics(manifest)
