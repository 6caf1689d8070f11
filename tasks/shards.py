"""Parquet shards, manifests and atomic writes: the contract between stages.

A stage writes its kept rows to ``<stage>/part-NNNNN.parquet`` and what it drops to
``<stage>/dropped/part-NNNNN.parquet`` (each row with a ``reason``), inside a temporary
folder that is renamed into place only once everything, ``_manifest.json`` last, is on
disk. Stages pass the manifest (files, row counts, digests, counts by reason), never data.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import heapq
import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "_manifest.json"
VOLATILE = {"fetched_at"}  # when a page was fetched is not what it says: left out of content digests


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))


def read_manifest(stage_dir: str | os.PathLike) -> dict | None:
    p = Path(stage_dir) / MANIFEST
    return json.loads(p.read_text()) if p.exists() else None


def file_entry(folder: Path, rel: str, rows: int) -> dict:
    """A manifest's record of one written file."""
    return {"path": rel, "rows": rows, "bytes": (folder / rel).stat().st_size, "sha256": sha256_file(folder / rel)}


def fresh_tmp_dir(final: Path) -> Path:
    """An empty temporary folder beside ``final``; leftovers of killed earlier attempts are removed."""
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    return tmp


class StageWriter:
    """Write one stage's kept and dropped rows as Parquet shards, then publish atomically.

    Use as a context manager; call :meth:`keep` / :meth:`drop` with row dicts. On a clean
    exit the temporary folder becomes ``stage_dir`` with its manifest; on an error it is
    removed and nothing half-written is left behind. Each shard is itself written atomically.

    With ``resume=True`` the temporary folder of an attempt that was killed is taken over: its
    finished shards stay, :meth:`resumed` yields their rows so the stage can skip that work,
    and new shards continue the numbering. ``flush_every_s`` bounds what a kill can lose.
    """

    def __init__(self, stage: str, stage_dir: str | os.PathLike, schema: pa.Schema,
                 dropped_schema: pa.Schema | None = None, shard_rows: int = 2000,
                 resume: bool = False, flush_every_s: float | None = None):
        self.stage, self.final = stage, Path(stage_dir)
        self.schemas = {"kept": schema,
                        "dropped": dropped_schema or schema.append(pa.field("reason", pa.string()))}
        self.shard_rows = shard_rows
        self.buffers: dict[str, list[dict]] = {"kept": [], "dropped": []}
        self.files: dict[str, list[dict]] = {"kept": [], "dropped": []}
        self.reasons: Counter[str] = Counter()
        self.row_digests: dict[str, list[bytes]] = {"kept": [], "dropped": []}
        self.extra: dict[str, Any] = {}
        self.resume, self.flush_every_s, self.last_flush = resume, flush_every_s, time.monotonic()
        # the first shards come sooner (0.02 s, doubling up to flush_every_s): a stage that
        # follows this one (extract follows collect) gets work early in a short crawl too
        self.interval = min(0.02, flush_every_s or 0.0)

    def __enter__(self) -> "StageWriter":
        stale = sorted(self.final.parent.glob(f".{self.final.name}.tmp-*"), key=lambda p: p.stat().st_mtime)
        if self.resume and stale and (stale[-1] / "dropped").is_dir():
            self.tmp = self.final.with_name(f".{self.final.name}.tmp-{os.getpid()}")
            if stale[-1] != self.tmp:
                os.replace(stale[-1], self.tmp)
            for older in stale[:-1]:  # only the latest attempt is taken over
                shutil.rmtree(older, ignore_errors=True)
            for p in self.tmp.rglob(".part-*"):  # a shard the kill interrupted
                p.unlink()
            for kind, sub in (("kept", self.tmp), ("dropped", self.tmp / "dropped")):
                for f in sorted(sub.glob("part-*.parquet")):
                    rel = str(f.relative_to(self.tmp))
                    self.files[kind].append(file_entry(self.tmp, rel, pq.ParquetFile(f).metadata.num_rows))
                    rows = pq.read_table(f).to_pylist()
                    self.row_digests[kind] += [row_digest(r) for r in rows]
                    if kind == "dropped":
                        self.reasons.update(r["reason"] for r in rows)
        else:
            self.tmp = fresh_tmp_dir(self.final)
            (self.tmp / "dropped").mkdir()
        return self

    def resumed(self, kind: str, columns: list[str] | None = None) -> Iterator[dict]:
        """Rows of the shards taken over from a killed attempt."""
        for f in self.files[kind]:
            yield from pq.read_table(self.tmp / f["path"], columns=columns).to_pylist()

    def keep(self, row: dict) -> None:
        self._add("kept", row)

    def drop(self, row: dict, reason: str) -> None:
        self.reasons[reason] += 1
        self._add("dropped", {**row, "reason": reason})

    def _add(self, kind: str, row: dict) -> None:
        self.buffers[kind].append(row)
        self.row_digests[kind].append(row_digest(row))
        if len(self.buffers[kind]) >= self.shard_rows:
            self._flush(kind)
        elif self.flush_every_s is not None and time.monotonic() - self.last_flush > self.interval:
            for k in ("kept", "dropped"):
                if self.buffers[k]:
                    self._flush(k)

    def _flush(self, kind: str) -> None:
        self.last_flush = time.monotonic()
        if self.flush_every_s is not None:
            self.interval = min(2 * self.interval, self.flush_every_s)
        rows = self.buffers[kind]
        if not rows and self.files[kind]:
            return
        sub = "" if kind == "kept" else "dropped/"
        rel = f"{sub}part-{len(self.files[kind]):05d}.parquet"
        part = self.tmp / f"{sub}.{Path(rel).name}"
        pq.write_table(pa.Table.from_pylist(rows, schema=self.schemas[kind]), part, compression="zstd")
        os.replace(part, self.tmp / rel)
        self.files[kind].append(file_entry(self.tmp, rel, len(rows)))
        self.buffers[kind] = []

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        for kind in ("kept", "dropped"):
            self._flush(kind)
        self.manifest = make_manifest(self.stage, self.final, self.files, self.reasons, self.extra,
                                      content=content_digest(self.row_digests))
        write_json(self.tmp / MANIFEST, self.manifest)
        publish_dir(self.tmp, self.final)


def publish_dir(tmp: Path, final: Path) -> None:
    """Rename a finished temporary folder into place (replacing a stale, unfinished one)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def row_digest(row: dict) -> bytes:
    """What one row says, wherever and whenever it was written: binary columns are represented
    by their sha256 column, and VOLATILE ones are left out."""
    return hashlib.sha256(json.dumps({k: v for k, v in row.items() if k not in VOLATILE
                                      and not isinstance(v, (bytes, bytearray))},
                                     sort_keys=True, default=str).encode("utf-8", "surrogatepass")).digest()


def content_digest(row_digests: dict[str, list[bytes]]) -> str:
    """A stage output's digest by content, independent of row order, shard sizes and fetch times:
    the next stage's cache key, so unchanged data reuses what was computed from it."""
    h = hashlib.sha256()
    for kind in ("kept", "dropped", *sorted(set(row_digests) - {"kept", "dropped"})):   # then a stage's own
        h.update(kind.encode())
        for d in sorted(row_digests[kind]):
            h.update(d)
    return h.hexdigest()


def make_manifest(stage: str, stage_dir: Path, files: dict[str, list[dict]],
                  reasons: Counter | dict, extra: dict | None = None, content: str | None = None) -> dict:
    """``content``: the content digest of the rows; without it the digest is over the files."""
    kept = sum(f["rows"] for f in files["kept"])
    dropped = sum(f["rows"] for f in files["dropped"])
    digest = content or hashlib.sha256(
        json.dumps([files["kept"], files["dropped"]], sort_keys=True).encode()).hexdigest()
    return {"stage": stage, "dir": str(Path(stage_dir).resolve()), "files": files["kept"],
            "dropped_files": files["dropped"], "rows": kept, "dropped": dropped,
            "bytes": sum(f["bytes"] for f in files["kept"]),
            "reasons": dict(sorted(reasons.items())), "digest": digest, **(extra or {})}


def iter_rows(manifest: dict, columns: list[str] | None = None,
              batch_size: int = 256) -> Iterator[dict]:
    """Yield the kept rows of a stage, shard by shard, as dicts."""
    for f in manifest["files"]:
        pf = pq.ParquetFile(Path(manifest["dir"]) / f["path"])
        for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
            yield from batch.to_pylist()


class SortedRows:
    """The kept rows of a stage in ``key`` order, whatever shards and row order the stage wrote (a
    concurrent crawl writes pages as they arrive): each shard is sorted on its own into ``folder``,
    then the sorted shards are merged as they are read, so memory holds one shard at a time.
    Iterate it as often as needed; ``folder`` is the caller's to remove."""

    def __init__(self, manifest: dict, key: str, columns: list[str], folder: Path, batch_size: int = 256):
        self.key, self.batch_size, self.files = key, batch_size, []
        folder.mkdir(parents=True, exist_ok=True)
        for i, f in enumerate(manifest["files"]):
            table = pq.read_table(Path(manifest["dir"]) / f["path"], columns=list(dict.fromkeys([key, *columns])))
            self.files.append(folder / f"sorted-{i:05d}.parquet")
            pq.write_table(table.sort_by(key), self.files[-1], row_group_size=batch_size)

    def _rows(self, path: Path) -> Iterator[dict]:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=self.batch_size):
            yield from batch.to_pylist()

    def __iter__(self) -> Iterator[dict]:
        return heapq.merge(*map(self._rows, self.files), key=lambda row: row[self.key])


class follow_rows:
    """The kept rows of a stage that another task is still writing, shard by shard as each is
    committed to its temporary folder, then the rest from its manifest once it is published.
    ``total`` is None until then, and the number of rows in all after (a follower shapes its
    last shards of work by it).

    ``state()`` tells how the writer stands: None while it runs, then "completed" or "failed".
    A manifest older than the call is a stale earlier result and is ignored while the writer runs.
    """

    def __init__(self, stage_dir: str | os.PathLike, state: Callable[[], str | None],
                 columns: list[str] | None = None, poll_s: float = 0.02):
        self.final, self.state, self.columns, self.poll_s = Path(stage_dir), state, columns, poll_s
        self.started, self._total = time.time(), None

    @property
    def total(self) -> int | None:
        """Looked up when asked: the writer may publish while a shard of its rows is being read."""
        if self._total is None:
            self._published(self.state())
        return self._total

    def _published(self, state: str | None) -> dict | None:
        """The writer's manifest once it is published; ``state`` is read before it is looked for."""
        m = read_manifest(self.final)
        if m and (state == "completed" or (self.final / MANIFEST).stat().st_mtime >= self.started):
            self._total = m["rows"]
            return m
        return None

    def __iter__(self) -> Iterator[dict]:
        final, columns, n = self.final, self.columns, 0
        while True:
            st = self.state()
            m = self._published(st)
            if m:
                for f in m["files"][n:]:
                    yield from pq.read_table(final / f["path"], columns=columns).to_pylist()
                return
            if st is not None:
                raise RuntimeError(f"{final.name}: the stage being followed ended ({st}) without publishing its output")
            parts: list[Path] = []
            with contextlib.suppress(FileNotFoundError):  # the folder is renamed once the writer finishes
                tmp = max(final.parent.glob(f".{final.name}.tmp-*"), key=lambda p: p.stat().st_mtime, default=None)
                parts = sorted(tmp.glob("part-*.parquet"))[n:] if tmp else []
            for part in parts:
                try:
                    rows = pq.read_table(part, columns=columns).to_pylist()
                except FileNotFoundError:
                    break
                n += 1
                yield from rows
            if not parts:
                time.sleep(self.poll_s)


def future_state(future: concurrent.futures.Future) -> Callable[[], str | None]:
    """``follow_rows``'s ``state`` for a writer running in a thread or process pool."""
    return lambda: None if not future.done() else "failed" if future.exception() else "completed"


def read_table(manifest: dict, dropped: bool = False, columns: list[str] | None = None) -> pa.Table:
    files = manifest["dropped_files" if dropped else "files"]
    tables = [pq.read_table(Path(manifest["dir"]) / f["path"], columns=columns) for f in files]
    return pa.concat_tables(tables) if tables else pa.table({})


def read_schema(manifest: dict) -> pa.Schema:
    """Schema of a stage's kept rows (every stage writes at least one, maybe empty, shard)."""
    return pq.read_schema(Path(manifest["dir"]) / manifest["files"][0]["path"])


def with_fields(schema: pa.Schema, fields: Iterable[pa.Field]) -> pa.Schema:
    for f in fields:
        schema = schema.append(f)
    return schema
