"""Stage 4, dedup: exact duplicates by normalized-text hash, near duplicates by MinHash.

Built to stay within memory when the corpus outgrows an in-memory LSH index:

1. per input shard, in worker processes: normalize each text, hash it (exact), compute its
   MinHash signature, and write its band keys to a Parquet side file;
2. per band, one at a time: sort the band keys of all documents (numpy) and link the documents
   that share a key; the same for the exact hashes;
3. clusters are the connected components of those links (scipy), and one document per cluster
   survives by a deterministic rule (``longest``, ``oldest`` or ``first`` by doc_id);
4. a second pass over the input writes every row with its cluster id (the survivor's doc_id)
   and size; every dropped duplicate names the document it duplicates (``duplicate_of``).

Signatures are datasketch's: ``MinHash(num_perm, seed, scheme="affine32", hashfunc=shingle_hash)``
fed the same shingles gives the same hash values (a test checks). They are computed in bulk
with numpy instead of one Python call per shingle, so they are several times faster.
"""

from __future__ import annotations

import re
import shutil
import time
import unicodedata
import zlib
from functools import cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasketch import MinHash
from datasketch.minhash import _fmix
from mlflow.entities import Param
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from tqdm.auto import tqdm

from flows import tracking
from flows.config import DedupConfig
from tasks.shards import StageWriter, fresh_tmp_dir, read_schema, sha256_text, with_fields
from tasks.stage import stage_dir, stage_task
from tasks.workers import pool_extra, shard_pool

NON_WORD_RE = re.compile(r"[^\w\s]+")
SCHEME = "affine32"          # datasketch 2.x default, recorded so signatures stay comparable
FOLD = 0x01000193            # shingle hash: h = h * FOLD + crc32(word), mod 2^32, over its words
HASHFUNC = "tasks.dedup.shingle_hash (crc32 of each word, folded)"
DEDUP_FIELDS = [pa.field("text_hash", pa.string()), pa.field("cluster_id", pa.string()),
                pa.field("cluster_size", pa.int64())]
CHUNK_SHINGLES = 1 << 14     # shingles permuted at once: the matrix (~7 MB) stays in cache


def normalize(text: str) -> str:
    """NFKC, lower case, punctuation removed, white space collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(NON_WORD_RE.sub(" ", text).split())


def shingles(normalized: str, n: int) -> list[bytes]:
    """Word n-grams of a normalized text (the whole text when it has n words or fewer)."""
    words = normalized.split()
    if len(words) <= n:
        return [" ".join(words).encode()]
    return [" ".join(words[i:i + n]).encode() for i in range(len(words) - n + 1)]


def shingle_hash(shingle: bytes) -> int:
    """The 32-bit hash of one shingle, as datasketch's ``hashfunc``: crc32 of each word, folded."""
    h = 0
    for w in shingle.split(b" "):
        h = (h * FOLD + zlib.crc32(w)) & 0xFFFFFFFF
    return h


def shingle_hashes(normalized: str, n: int) -> np.ndarray:
    """``shingle_hash`` of every shingle of a normalized text, computed from its words' crc32s."""
    w = np.fromiter(map(zlib.crc32, normalized.encode().split()), dtype=np.uint32)
    m = len(w) - n + 1
    if m <= 0:
        m, n = 1, len(w)
    h = np.zeros(m, dtype=np.uint32)
    for k in range(n):
        h = h * np.uint32(FOLD) + w[k:k + m]   # uint32 arithmetic wraps: mod 2^32
    return h


@cache
def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    return MinHash(num_perm=num_perm, seed=seed, scheme=SCHEME).permutations


def signatures(normalized: list[str], n: int, num_perm: int, seed: int) -> np.ndarray:
    """MinHash signatures (one uint32 row per text), equal to datasketch's with ``shingle_hash``."""
    a, b = permutations(num_perm, seed)
    out = np.empty((len(normalized), num_perm), dtype=np.uint32)
    start = 0
    while start < len(normalized):
        hashes, total, end = [], 0, start
        while end < len(normalized) and (total < CHUNK_SHINGLES or end == start):
            hashes.append(np.unique(shingle_hashes(normalized[end], n)))   # repeats cannot change a min
            total, end = total + len(hashes[-1]), end + 1
        hv = _fmix(np.concatenate(hashes), 32).reshape(1, -1)
        starts = np.cumsum([0] + [len(h) for h in hashes[:-1]])
        phv = a.reshape(-1, 1) * hv            # (num_perm, shingles): each row's min runs contiguous
        phv += b.reshape(-1, 1)
        out[start:end] = np.minimum.reduceat(phv, starts, axis=1).T
        start = end
    return out


def lsh_params(cfg) -> tuple[int, int]:
    if cfg.bands is not None:
        return cfg.bands, cfg.rows
    from datasketch import MinHashLSH
    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
    return lsh.b, lsh.r


def signature_params(cfg) -> dict:
    """Everything that makes two MinHash signatures comparable, for the record."""
    bands, rows = lsh_params(cfg)
    return {"num_perm": cfg.num_perm, "seed": cfg.seed, "scheme": SCHEME, "hashfunc": HASHFUNC,
            "shingle": f"word {cfg.ngram}-grams of NFKC-lowercased text without punctuation",
            "bands": bands, "rows": rows, "threshold_estimate": round((1 / bands) ** (1 / rows), 4)}


def shard_keys(path: str, out: str, cfg: DedupConfig) -> str:
    """Worker: the exact hash, length and band keys of one input shard's documents, to Parquet
    (in the shard's row order)."""
    t = pq.read_table(path, columns=["doc_id", "text", "fetched_at"])
    norm = [normalize(x) for x in t["text"].to_pylist()]
    cols = {"doc_id": t["doc_id"], "fetched_at": t["fetched_at"], "length": pa.array([len(x) for x in norm], pa.int64()),
            "text_hash": pa.array([sha256_text(x) for x in norm])}
    if cfg.near:
        bands, rows = lsh_params(cfg)
        sig = signatures(norm, cfg.ngram, cfg.num_perm, cfg.seed)
        for k in range(bands):
            band = np.ascontiguousarray(sig[:, k * rows:(k + 1) * rows]).view(f"V{4 * rows}").ravel()
            cols[f"band_{k}"] = pa.FixedSizeBinaryArray.from_buffers(
                pa.binary(4 * rows), len(band), [None, pa.py_buffer(band.tobytes())])
    pq.write_table(pa.table(cols), out)
    return out


def _bucket_first(keys: np.ndarray) -> np.ndarray:
    """For every row, the first row (in sorted order) of the rows that share its key."""
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    starts = np.r_[True, sk[1:] != sk[:-1]]
    del sk
    first = np.empty(len(keys), dtype=np.int64)
    first[order] = order[np.maximum.accumulate(np.where(starts, np.arange(len(keys)), 0))]
    return first


def _with_links(pairs: np.ndarray, first: np.ndarray) -> np.ndarray:
    """``pairs`` (coded a * n + b) and each row's link to the first row of its bucket, once each."""
    n = len(first)
    rows = np.flatnonzero(first != np.arange(n))
    return np.unique(np.concatenate([pairs, first[rows] * n + rows]))


def side_files(cfg: DedupConfig, docs: dict, work: Path, runner: dict | None = None) -> tuple[list[str], dict]:
    """One side file per input shard (hash, length, band keys), computed in worker processes or
    on Dask (``runner``; its workers must see ``work`` and the input: a shared file system)."""
    with shard_pool(runner, "dedup", cfg.processes) as pool:
        futures = [pool.submit(shard_keys, str(Path(docs["dir"]) / f["path"]), str(work / f"keys-{i:05d}.parquet"), cfg)
                   for i, f in enumerate(docs["files"])]
        return [f.result() for f in tqdm(futures, desc="dedup (signatures)", unit="shard")], pool_extra(pool)


def _column(files: list[str], name: str) -> pa.Array:
    return pa.concat_arrays([pq.read_table(f, columns=[name])[name].combine_chunks() for f in files])


def clusters(cfg: DedupConfig, files: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(cluster label, first row with the same text hash) of every row. Links come one band at a
    time from sorted keys, so memory holds a few numbers per document, never an index."""
    hashes = np.asarray(_column(files, "text_hash").to_numpy(zero_copy_only=False)).astype("S64")
    n = len(hashes)
    same_text = _bucket_first(hashes)
    del hashes
    pairs = np.zeros(0, dtype=np.int64)   # link (a, b) coded as a * n + b
    if cfg.exact:
        pairs = _with_links(pairs, same_text)
    if cfg.near:
        for k in tqdm(range(lsh_params(cfg)[0]), desc="dedup (bands)", unit="band"):
            col = _column(files, f"band_{k}")
            width = col.type.byte_width
            keys = np.frombuffer(col.buffers()[1], dtype=f"S{width}", count=n, offset=col.offset * width)
            pairs = _with_links(pairs, _bucket_first(keys))
            del col, keys
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs // max(n, 1), pairs % max(n, 1))), shape=(n, n))
    _, labels = connected_components(graph.tocsr(), directed=False)
    return labels, same_text


def survivors(files: list[str], labels: np.ndarray, rule: str) -> tuple[np.ndarray, pa.Array]:
    """For every row, the row that survives in its cluster (ties by smallest doc_id); and the doc_ids."""
    ids = _column(files, "doc_id")
    if rule == "longest":
        first_key = -_column(files, "length").to_numpy()
    elif rule == "oldest":
        first_key = _column(files, "fetched_at").cast(pa.int64()).fill_null(np.iinfo(np.int64).max).to_numpy()
    else:  # "first": smallest doc_id
        first_key = np.zeros(len(ids), dtype=np.int64)
    id_rank = pc.rank(ids, sort_keys="ascending", tiebreaker="first").to_numpy()
    order = np.lexsort((id_rank, first_key, labels))       # by cluster, then the rule, then doc_id
    del id_rank, first_key
    sl = labels[order]
    starts = np.flatnonzero(np.r_[True, sl[1:] != sl[:-1]])  # the first row of each cluster wins
    best = np.empty(labels.max() + 1 if len(labels) else 0, dtype=np.int64)
    best[sl[starts]] = order[starts]
    return best[labels], ids


def dedup(cfg, docs: dict, stage_dir: str | Path, runner: dict | None = None) -> dict:
    """Run the dedup stage over the filter manifest ``docs``; returns its manifest."""
    t0 = time.time()
    work = fresh_tmp_dir(Path(stage_dir).with_name(Path(stage_dir).name + "-keys"))
    try:
        files, spread = side_files(cfg, docs, work, runner)
        labels, same_text = clusters(cfg, files)
        keep, ids = survivors(files, labels, cfg.survivor)
        sizes = np.bincount(labels) if len(labels) else labels
        schema = with_fields(read_schema(docs), DEDUP_FIELDS)
        dropped_schema = with_fields(schema, [pa.field("duplicate_of", pa.string()), pa.field("reason", pa.string())])
        with StageWriter("dedup", stage_dir, schema, dropped_schema) as w, \
                tqdm(total=docs["rows"], desc="dedup", unit="doc") as bar:
            i = 0   # the input row; side files hold the same rows in the same order
            for shard, side in zip(docs["files"], files):
                pf = pq.ParquetFile(Path(docs["dir"]) / shard["path"])
                first = i
                text_hash = pq.read_table(side, columns=["text_hash"])["text_hash"].to_pylist()
                cluster_id = ids.take(pa.array(keep[first:first + pf.metadata.num_rows])).to_pylist()
                for batch in pf.iter_batches(batch_size=256):
                    for doc in batch.to_pylist():
                        s, j = int(keep[i]), i - first
                        row = {**doc, "text_hash": text_hash[j], "cluster_id": cluster_id[j],
                               "cluster_size": int(sizes[labels[i]])}
                        if s == i:
                            w.keep(row)
                        else:
                            exact = cfg.exact and same_text[i] == same_text[s]
                            w.drop({**row, "duplicate_of": cluster_id[j]}, "exact_duplicate" if exact else "near_duplicate")
                        i += 1
                    bar.update(batch.num_rows)
            w.extra = {"seconds": round(time.time() - t0, 3), "input_rows": docs["rows"],
                       "clusters": int(np.count_nonzero(sizes)), "minhash": signature_params(cfg), **spread}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return w.manifest


@stage_task("dedup")
def dedup_task(ctx: dict, section: dict, inputs: list[dict], run_id: str) -> tuple[dict, dict]:
    cfg = DedupConfig.model_validate(section)
    manifest = dedup(cfg, inputs[0], stage_dir(ctx, "dedup"), ctx.get("runner"))
    tracking.client().log_batch(run_id, params=[Param(f"minhash.{k}", str(v))
                                                for k, v in manifest["minhash"].items()])
    return manifest, {"clusters": float(manifest["clusters"])}
