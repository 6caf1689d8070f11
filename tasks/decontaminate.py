"""Stage 5, decontaminate: evaluation documents set aside, and training documents that overlap them dropped.

1. Held out: documents whose doc_id hash lies at the top of its range (``heldout_fraction``;
   at least ``MIN_HELDOUT`` of 10 or more) are dropped from training as ``held_out`` and kept
   as text in ``heldout.parquet``, with every document of the evaluation sources (the flow's
   ``evaluate.sources``, collected and extracted apart: ``inputs[1]``): the evaluate stage builds
   its suite from that file. A training document with the id of one of them is held out too.
2. Decontaminated (GPT-3's rule): every remaining document that shares an n-gram of ``ngram``
   words (of the text normalized as dedup normalizes it) with an evaluation document is dropped
   as ``contaminated``, naming the evaluation set (``heldout``, ``eval_sources``, ``task:NAME``
   for the local data of each lm-eval task named), the evaluation document and the n-gram. An
   evaluation n-gram that more training documents share than ``max_doc_frequency`` (GPT-3: 10)
   is common text, a template or a licence, and does not count;
   a document at least ``copy_fraction`` of whose n-grams are evaluation n-grams is a copy, and
   is contaminated whatever their counts.
   The evaluation n-grams are hashed to 64 bits into one sorted array, saved for the worker
   processes to map; one pass over the documents, in batches, finds each one's evaluation
   n-grams; their document counts decide, and a second read writes the rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
import zlib
from functools import cache
from itertools import chain
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from tasks.config import DecontaminateConfig
from tasks.dedup import normalize
from tasks.harness import TaskDataMissing, load_tasks, task_documents, task_manager
from tasks.shards import StageWriter, iter_rows, read_schema, row_digest, with_fields
from tasks.stage import stage_dir, stage_task
from tasks.workers import DaskShards, batched, ensure_forkserver, in_order, on_dask, pool_extra, shard_pool

log = logging.getLogger(__name__)
MIN_HELDOUT = 2               # documents held out at least (of 10 or more): the evaluate suite's
HELDOUT_SCHEMA = pa.schema([("doc_id", pa.string()), ("url", pa.string()), ("source", pa.string()),
                            ("text", pa.string())])
DROPPED_FIELDS = [pa.field("contaminated_by", pa.string()), pa.field("eval_doc_id", pa.string()),
                  pa.field("ngram", pa.string())]
FOLD = np.uint64(0x9E3779B97F4A7C15)   # n-gram hash: h = h * FOLD + word key, mod 2^64
BATCH, DASK_BATCH = 256, 1024          # documents per shard of work
EVAL_BATCH = 32                        # evaluation documents per shard of work (hashing)


def split_hash(doc_id: str, seed: int) -> float:
    """A document's place in [0, 1) by its doc_id: held out from the top, validation from the bottom."""
    return int(hashlib.sha256(f"{seed}:{doc_id}".encode()).hexdigest()[:12], 16) / 16 ** 12


def heldout_ids(ids: list[str], fraction: float, seed: int) -> set[str]:
    """The doc_ids at the top ``fraction`` of the hash range; of 10 documents or more, at least
    MIN_HELDOUT (the next ones down the range), so that the suite has documents to use."""
    held = {d for d in ids if split_hash(d, seed) >= 1 - fraction}
    if fraction > 0 and len(held) < MIN_HELDOUT and len(ids) >= 5 * MIN_HELDOUT:
        rest = sorted((d for d in ids if d not in held), key=lambda d: split_hash(d, seed), reverse=True)
        held |= set(rest[:MIN_HELDOUT - len(held)])
    return held


def words(text: str) -> list[bytes]:
    """The words n-grams are made of: dedup's normalization (NFKC, lower case, no punctuation)."""
    return normalize(text).encode("utf-8", "surrogatepass").split()


def word_keys(ws: list[bytes]) -> np.ndarray:
    """A 64-bit key per word: its crc32 and adler32 side by side."""
    lo = np.fromiter(map(zlib.crc32, ws), dtype=np.uint64, count=len(ws))
    hi = np.fromiter(map(zlib.adler32, ws), dtype=np.uint64, count=len(ws))
    return (hi << np.uint64(32)) | lo


def ngram_hashes(keys: np.ndarray, n: int) -> np.ndarray:
    """The hash of every window of ``n`` consecutive keys (none when there are fewer)."""
    m = len(keys) - n + 1
    h = np.zeros(max(m, 0), dtype=np.uint64)
    for k in range(n if m > 0 else 0):
        h = h * FOLD + keys[k:k + m]   # uint64 arithmetic wraps: mod 2^64
    return h


@cache
def _index(path: str) -> np.ndarray:
    return np.load(path, mmap_mode="r")   # shared by the processes through the page cache


def scan_batch(texts: list[str], index_path: str, n: int) -> list[tuple[np.ndarray, float]]:
    """Worker: for each text, the distinct hashes of its n-grams found in the index (in the order
    they first occur), and the share of its n-grams found there. The batch's windows are hashed at once, over its
    texts' words laid end to end."""
    index = _index(index_path)
    ws = [words(t) for t in texts]
    lengths = np.fromiter(map(len, ws), dtype=np.int64, count=len(ws))
    h = ngram_hashes(word_keys(list(chain.from_iterable(ws))), n)
    starts = np.r_[0, np.cumsum(lengths)[:-1]]
    doc = np.repeat(np.arange(len(ws)), lengths)[:len(h)]     # the text each window starts in
    valid = np.arange(len(h)) + n <= (starts + lengths)[doc] if len(h) else np.zeros(0, dtype=bool)
    windows = np.maximum(lengths - n + 1, 0)
    out = [(np.zeros(0, dtype=np.uint64), 0.0)] * len(texts)
    if not len(index) or not valid.any():
        return out
    hit = np.flatnonzero(valid & (index[np.minimum(np.searchsorted(index, h), len(index) - 1)] == h))
    share = np.bincount(doc[hit], minlength=len(texts)) / np.maximum(windows, 1)
    hit_doc = doc[hit]                        # ascending: windows are in text order
    cuts = np.flatnonzero(np.diff(hit_doc)) + 1
    for d, found in zip(hit_doc[np.r_[0, cuts]].tolist() if len(hit) else [], np.split(h[hit], cuts)):
        _, first = np.unique(found, return_index=True)
        out[d] = (found[np.sort(first)], float(share[d]))
    return out


def ngram_text(text: str, target: int, n: int) -> str:
    """The words of the first n-gram of ``text`` whose hash is ``target``."""
    ws = words(text)
    at = int(np.flatnonzero(ngram_hashes(word_keys(ws), n) == np.uint64(target))[0])
    return b" ".join(ws[at:at + n]).decode("utf-8", "surrogatepass")


def hash_texts(texts: list[str], n: int) -> list[np.ndarray]:
    """Worker: the hashes of every n-gram of each text."""
    return [ngram_hashes(word_keys(words(t)), n) for t in texts]


class EvalIndex:
    """The n-grams of the evaluation documents: their sorted hashes (a .npy file for the workers)
    and, per hash, the first evaluation set and document that has it."""

    def __init__(self, n: int):
        self.n, self.parts, self.owners = n, [], []
        self.docs: dict[str, int] = {}
        self.too_short = 0

    def add(self, set_name: str, doc_id: str | None, h: np.ndarray) -> None:
        """An evaluation document, by the hashes of its n-grams (``hash_texts``)."""
        self.docs[set_name] = self.docs.get(set_name, 0) + 1
        if not len(h):
            self.too_short += 1
            return
        self.parts.append(h)
        self.owners.append((set_name, doc_id))

    def save(self, folder: Path) -> Path:
        """The sorted distinct hashes as a .npy file named by its content (a worker that outlives the
        stage, on Dask, never maps an earlier run's index); its path."""
        h = np.concatenate(self.parts) if self.parts else np.zeros(0, dtype=np.uint64)
        owner = np.repeat(np.arange(len(self.parts)), [len(p) for p in self.parts])
        order = np.argsort(h, kind="stable")            # the first owner of a hash first
        h, owner = h[order], owner[order]
        first = np.r_[True, h[1:] != h[:-1]] if len(h) else np.zeros(0, dtype=bool)
        self.hashes, self.owner = h[first], owner[first]
        self.parts = []
        path = folder / f".eval-ngrams-{hashlib.sha256(self.hashes.tobytes()).hexdigest()[:16]}.npy"
        np.save(path, self.hashes)
        return path

    def owners_of(self, hashes: list[int]) -> list[tuple[str, str | None]]:
        """(set, doc_id) of the first evaluation document with each of these (indexed) hashes."""
        at = np.searchsorted(self.hashes, np.array(hashes, dtype=np.uint64))
        return [self.owners[i] for i in self.owner[at].tolist()]


def harness_documents(names: list[str], include_path: list[str]) -> dict[str, list[tuple[str, str]]]:
    """{task: [(id, text)]} of the named lm-eval tasks whose data is here; the others are skipped
    with a warning (the evaluate stage itself refuses them)."""
    if not names:
        return {}
    manager = task_manager(include_path, names)
    out = {}
    for name in names:
        try:
            loaded = load_tasks([name], manager)
        except TaskDataMissing as e:
            log.warning("decontaminate: lm-eval task %r skipped: %s", name, e)
            continue
        for task_name, task in loaded["tasks"].items():
            out[task_name] = task_documents(task)
    return out


def decontaminate(cfg: DecontaminateConfig, docs: dict, stage_dir: str | Path, eval_docs: dict | None = None,
                  runner: dict | None = None) -> dict:
    """Run the stage over the dedup manifest ``docs``, with the evaluation documents of the manifest
    ``eval_docs`` (any stage's: doc_id, url, source, text); returns its manifest."""
    t0 = time.time()
    if cfg.enabled and not on_dask(runner):
        ensure_forkserver()   # the workers' server starts while the index is built
    ids = [r["doc_id"] for r in iter_rows(docs, columns=["doc_id"])]
    held = heldout_ids(ids, cfg.heldout_fraction, cfg.seed)
    cols = HELDOUT_SCHEMA.names
    evaluation = {r["doc_id"]: r for r in iter_rows(eval_docs, columns=cols)} if eval_docs else {}
    held |= set(ids) & set(evaluation)
    heldout = {r["doc_id"]: r for f in docs["files"] for r in pq.read_table(
        Path(docs["dir"]) / f["path"], columns=cols, filters=[("doc_id", "in", sorted(held))]).to_pylist()} \
        if held else {}
    aside = sorted({**heldout, **evaluation}.values(), key=lambda r: r["doc_id"])

    task_docs = harness_documents(cfg.tasks or [], cfg.include_path or []) if cfg.enabled else {}
    evals = [("heldout", r["doc_id"], r["text"]) for r in sorted(heldout.values(), key=lambda r: r["doc_id"])]
    evals += [("eval_sources", r["doc_id"], r["text"]) for r in sorted(evaluation.values(), key=lambda r: r["doc_id"])]
    evals += [(f"task:{name}", doc_id, text) for name, items in task_docs.items() for doc_id, text in items]
    schema = read_schema(docs)
    dropped_schema = with_fields(schema, [*DROPPED_FIELDS, pa.field("reason", pa.string())])
    none = {"contaminated_by": None, "eval_doc_id": None, "ngram": None}
    by_set: dict[str, int] = {}
    index = EvalIndex(cfg.ngram)
    with StageWriter("decontaminate", stage_dir, schema, dropped_schema) as w, \
            tqdm(total=docs["rows"], desc="decontaminate", unit="doc") as bar, \
            (shard_pool(runner, "decontaminate", cfg.processes) if cfg.enabled else contextlib.nullcontext()) as pool:
        pq.write_table(pa.Table.from_pylist(aside, schema=HELDOUT_SCHEMA), w.tmp / "heldout.parquet")
        w.row_digests["heldout"] = [row_digest(r) for r in aside]   # the suite's text: in the digest too
        dask = isinstance(pool, DaskShards)
        if pool is not None:   # the evaluation documents' n-grams, hashed in the workers
            parts = batched(evals, EVAL_BATCH, len(evals), pool.width)
            for part, hashes in in_order(pool, parts, lambda b: pool.submit(hash_texts, [t for *_, t in b], cfg.ngram)):
                for (set_name, doc_id, _), h in zip(part, hashes):
                    index.add(set_name, doc_id, h)
        index_path = index.save(w.tmp)
        scan_t0 = time.time()

        # pass 1: the training documents' texts only, to the workers; the rows are written in pass 2
        rows = (r for r in iter_rows(docs, columns=["doc_id", "text"]) if r["doc_id"] not in held)
        matched: dict[int, np.ndarray] = {}   # training row (in order) -> the evaluation n-grams it has
        copies: set[int] = set()              # ... and those that are mostly evaluation text
        if pool is not None and len(index.hashes):
            path = str(index_path)   # Dask workers share the file system, as dedup's do
            batches = batched(rows, DASK_BATCH if dask else BATCH, docs["rows"] - len(held), pool.width)
            submit = lambda b: pool.submit(scan_batch, [r["text"] for r in b], path, cfg.ngram)  # noqa: E731
            i = 0
            for batch, found in in_order(pool, batches, submit):
                for hashes, share in found:
                    if len(hashes):
                        matched[i] = hashes
                        if share >= cfg.copy_fraction:
                            copies.add(i)
                    i += 1
                bar.update(len(batch))
        else:   # nothing to look for: pass 2 keeps them all
            bar.update(docs["rows"] - len(held))
        # GPT-3's rule: an evaluation n-gram that many training documents share is common text
        # (boilerplate, a licence), not a leak; only the others make a document contaminated. A
        # document that is mostly evaluation text is a copy: contaminated, and not counted (copies
        # of a leaked page would otherwise make its n-grams look common)
        common = np.zeros(0, dtype=np.uint64)
        limit = cfg.max_doc_frequency
        counted = [h for i, h in matched.items() if i not in copies]
        if counted and limit:
            uniq, counts = np.unique(np.concatenate(counted), return_counts=True)
            common = uniq[counts > limit]
        only_common = 0
        i = -1   # the training row, counted as in pass 1
        for row in iter_rows(docs):
            if row["doc_id"] in held:
                w.drop({**row, **none}, "held_out")
                bar.update(1)
                continue
            i += 1
            hashes = matched.get(i)
            if hashes is not None and i not in copies:
                hashes = hashes[np.isin(hashes, common, invert=True)]
                only_common += not len(hashes)
            if hashes is None or not len(hashes):
                w.keep(row)
                continue
            ((set_name, eval_id),) = index.owners_of([int(hashes[0])])
            by_set[set_name] = by_set.get(set_name, 0) + 1
            w.drop({**row, "contaminated_by": set_name, "eval_doc_id": eval_id,
                    "ngram": ngram_text(row["text"], int(hashes[0]), cfg.ngram)}, "contaminated")
        spread = pool_extra(pool) if pool is not None else {}
        scan_s = time.time() - scan_t0
        index_path.unlink()
        scanned = docs["rows"] - len(held)
        w.extra = {"seconds": round(time.time() - t0, 3), "input_rows": docs["rows"], "heldout": "heldout.parquet",
                   "heldout_docs": len(held), "eval_docs": len(aside), "eval_source_docs": len(evaluation),
                   "eval_sets": index.docs, "eval_docs_too_short": index.too_short,
                   "eval_ngrams": int(len(index.hashes)) if cfg.enabled else 0, "ngram": cfg.ngram,
                   "contaminated_by": dict(sorted(by_set.items())), "common_ngrams": int(len(common)),
                   "kept_common_only": only_common, "copies": len(copies), "max_doc_frequency": limit,
                   "tasks_checked": sorted(task_docs),
                   "scan_seconds": round(scan_s, 3), "docs_per_s": round(scanned / scan_s, 1) if scan_s > 0 else None,
                   **spread}
    return w.manifest


def stage_metrics(manifest: dict) -> dict[str, float]:
    m = {"heldout_docs": manifest["heldout_docs"], "eval_docs": manifest["eval_docs"],
         "eval_ngrams": manifest["eval_ngrams"], "docs_per_s": manifest["docs_per_s"] or 0.0,
         "common_ngrams": manifest["common_ngrams"], "kept_common_only": manifest["kept_common_only"],
         **{f"contaminated.{k}": v for k, v in manifest["contaminated_by"].items()}}
    return {k: float(v) for k, v in m.items()}


@stage_task("decontaminate")
def decontaminate_task(ctx: dict, section: dict, inputs: list[dict], run_id: str) -> tuple[dict, dict]:
    """Set the held-out documents aside and drop training documents that overlap evaluation ones."""
    manifest = decontaminate(DecontaminateConfig.model_validate(section), inputs[0], stage_dir(ctx, "decontaminate"),
                             inputs[1] if len(inputs) > 1 else None, ctx.get("runner"))
    return manifest, stage_metrics(manifest)
