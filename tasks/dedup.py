"""Stage 4, dedup: exact duplicates by normalized-text hash, near duplicates by MinHash, verified.

Built to stay within memory when the corpus outgrows an in-memory LSH index:

1. per input shard, in worker processes: normalize each text, hash it (exact), compute its
   MinHash signature, and write it, cut into band keys, to a Parquet side file;
2. documents are ranked by the survivor rule (``longest``, ``oldest`` or ``first`` by doc_id;
   ties by doc_id). Documents with the same normalized text form one group, the best-ranked of
   them standing for it; only those take part in near-duplicate search;
3. per band, one at a time: sort the band keys (numpy); documents sharing a key are candidates,
   each paired with the best-ranked ``BUCKET_ANCHORS`` of its bucket ranked before it;
4. every candidate pair is verified (NeMo Curator's false-positive check): its Jaccard is
   estimated from the two signatures (the share of equal values); where that estimate lies
   within three standard errors of ``threshold``, it is computed exactly over the two sets of
   shingle hashes instead. Only pairs reaching ``threshold`` link;
5. survivors, without transitivity: the best-ranked document not yet decided survives, and
   every undecided document linked to it is dropped as its duplicate; repeat on the rest. A
   document is dropped only for a kept document it is itself similar to;
6. a second pass over the input writes every row with its survivor (``cluster_id``, the
   survivor's doc_id, and ``cluster_size``, the documents it stands for); dropped rows name it
   in ``duplicate_of`` with their ``jaccard`` to it, as ``exact_duplicate`` when their
   normalized text equals another document's, else ``near_duplicate``.

Signatures are datasketch's: ``MinHash(num_perm, seed, scheme="affine32", hashfunc=shingle_hash)``
fed the same shingles gives the same hash values (a test checks). They are computed in bulk
with numpy instead of one Python call per shingle, so they are several times faster.
"""

from __future__ import annotations

import hashlib
import math
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
from tqdm.auto import tqdm

from tasks import tracking
from tasks.config import DedupConfig
from tasks.shards import StageWriter, fresh_tmp_dir, read_schema, with_fields
from tasks.stage import stage_dir, stage_task
from tasks.workers import pool_extra, shard_pool

NON_WORD_RE = re.compile(r"[^\w\s]+")
SCHEME = "affine32"          # datasketch 2.x default, recorded so signatures stay comparable
FOLD = 0x01000193            # shingle hash: h = h * FOLD + crc32(word), mod 2^32, over its words
HASHFUNC = "tasks.dedup.shingle_hash (crc32 of each word, folded)"
DEDUP_FIELDS = [pa.field("text_hash", pa.string()), pa.field("cluster_id", pa.string()),
                pa.field("cluster_size", pa.int64())]
DROPPED_FIELDS = [pa.field("duplicate_of", pa.string()), pa.field("jaccard", pa.float64())]
BUCKET_ANCHORS = 32          # a band bucket's documents are each compared with its first 32 (by rank)
VERIFY_CHUNK = 1 << 16       # candidate pairs whose signatures are compared at once
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
    return cfg.lsh()


def verify_margin(cfg) -> float:
    """Three standard errors of the signature estimate of a Jaccard at the threshold: estimates
    this close to the threshold are settled by the exact Jaccard."""
    return 3 * math.sqrt(cfg.threshold * (1 - cfg.threshold) / cfg.num_perm)


def signature_params(cfg) -> dict:
    """Everything that makes two MinHash signatures comparable, and the decision, for the record."""
    bands, rows = lsh_params(cfg)
    return {"num_perm": cfg.num_perm, "seed": cfg.seed, "scheme": SCHEME, "hashfunc": HASHFUNC,
            "shingle": f"word {cfg.ngram}-grams of NFKC-lowercased text without punctuation",
            "bands": bands, "rows": rows, "threshold_estimate": round((1 / bands) ** (1 / rows), 4),
            "threshold": cfg.threshold,
            "candidate_probability_at_threshold": round(cfg.catch_probability(cfg.threshold), 4),
            "verification": f"signature estimate; exact Jaccard of shingle hashes within "
                            f"{verify_margin(cfg):.3f} of the threshold", "bucket_anchors": BUCKET_ANCHORS}


def shard_keys(path: str, out: str, cfg: DedupConfig) -> str:
    """Worker: the exact hash, length and signature (cut into band keys) of one input shard's
    documents, to Parquet (in the shard's row order)."""
    t = pq.read_table(path, columns=["doc_id", "text", "fetched_at"])
    norm = [normalize(x) for x in t["text"].to_pylist()]
    digests = [hashlib.sha256(x.encode("utf-8", "surrogatepass")).digest() for x in norm]   # = sha256_text
    cols = {"doc_id": t["doc_id"], "fetched_at": t["fetched_at"], "length": pa.array([len(x) for x in norm], pa.int64()),
            "text_hash": pa.array([d.hex() for d in digests]), "text_digest": pa.array(digests, pa.binary(32))}
    if cfg.near:
        bands, rows = lsh_params(cfg)
        sig = signatures(norm, cfg.ngram, cfg.num_perm, cfg.seed)
        parts = [(f"band_{k}", k * rows, (k + 1) * rows) for k in range(bands)]
        if bands * rows < cfg.num_perm:   # derived bands x rows may leave some values out of LSH
            parts.append(("sig_rest", bands * rows, cfg.num_perm))
        for name, a, b in parts:
            part = np.ascontiguousarray(sig[:, a:b])
            cols[name] = pa.FixedSizeBinaryArray.from_buffers(
                pa.binary(4 * (b - a)), len(part), [None, pa.py_buffer(part.tobytes())])
    pq.write_table(pa.table(cols), out)
    return out


def side_files(cfg: DedupConfig, docs: dict, work: Path, runner: dict | None = None) -> tuple[list[str], dict]:
    """One side file per input shard (hash, length, signature), computed in worker processes or
    on Dask (``runner``; its workers must see ``work`` and the input: a shared file system)."""
    with shard_pool(runner, "dedup", cfg.processes) as pool:
        futures = [pool.submit(shard_keys, str(Path(docs["dir"]) / f["path"]), str(work / f"keys-{i:05d}.parquet"), cfg)
                   for i, f in enumerate(docs["files"])]
        return [f.result() for f in tqdm(futures, desc="dedup (signatures)", unit="shard")], pool_extra(pool)


def _column(files: list[str], name: str) -> pa.Array:
    return pa.concat_arrays([pq.read_table(f, columns=[name])[name].combine_chunks() for f in files])


def _fixed(col: pa.Array) -> np.ndarray:
    """A fixed-size binary column as bytes, one row per value (no copy)."""
    width = col.type.byte_width
    return np.frombuffer(col.buffers()[1], dtype=f"S{width}", count=len(col), offset=col.offset * width)


def ranking(files: list[str], rule: str) -> tuple[np.ndarray, pa.Array]:
    """(the rows in survivor order: the rule, then doc_id; the doc_ids)."""
    ids = _column(files, "doc_id")
    if rule == "longest":
        first_key = -_column(files, "length").to_numpy()
    elif rule == "oldest":
        first_key = _column(files, "fetched_at").cast(pa.int64()).fill_null(np.iinfo(np.int64).max).to_numpy()
    else:  # "first": smallest doc_id
        first_key = np.zeros(len(ids), dtype=np.int64)
    id_rank = pc.rank(ids, sort_keys="ascending", tiebreaker="first").to_numpy()
    return np.lexsort((id_rank, first_key)), ids


def _bucket_best(keys: np.ndarray) -> np.ndarray:
    """For every position, the first position holding the same key (positions in rank order)."""
    if not len(keys):
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    starts = np.r_[True, sk[1:] != sk[:-1]]
    del sk
    best = np.empty(len(keys), dtype=np.int64)
    best[order] = order[np.maximum.accumulate(np.where(starts, np.arange(len(keys)), 0))]
    return best


def bucket_pairs(keys: np.ndarray, anchors: int = BUCKET_ANCHORS) -> tuple[np.ndarray, np.ndarray]:
    """Candidate pairs (i, j), i < j, of positions sharing a key: within each bucket, every
    position with each of the first ``anchors`` positions before it (all pairs of a bucket of up
    to anchors + 1). Positions are in rank order, so a bucket's anchors are its best-ranked."""
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    starts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
    del sk
    sizes = np.diff(np.r_[starts, len(keys)])
    starts, sizes = starts[sizes > 1], sizes[sizes > 1]
    per = np.minimum(sizes - 1, anchors)                       # anchors of each bucket
    bucket = np.repeat(np.arange(len(starts)), per)
    q = np.arange(len(bucket)) - np.repeat(np.cumsum(per) - per, per)   # an anchor's place in its bucket
    anchor = starts[bucket] + q
    after = sizes[bucket] - 1 - q                              # the positions after it in its bucket
    i = np.repeat(anchor, after)
    j = i + 1 + np.arange(len(i)) - np.repeat(np.cumsum(after) - after, after)
    return order[i], order[j]


def candidates(cfg: DedupConfig, files: list[str], rows: np.ndarray) -> np.ndarray:
    """Candidate pairs among ``rows`` (input rows, in rank order), coded i * len(rows) + j with
    i < j their places in ``rows``, one band at a time from sorted keys: memory holds one band's
    keys and the pairs, never an index."""
    m = len(rows)
    pairs = np.zeros(0, dtype=np.int64)
    for k in tqdm(range(lsh_params(cfg)[0]), desc="dedup (bands)", unit="band"):
        col = _column(files, f"band_{k}")
        keys = _fixed(col)[rows]
        del col
        i, j = bucket_pairs(keys)
        pairs = np.unique(np.concatenate([pairs, i * m + j]))
        del keys, i, j
    return pairs


def _signatures_of(cfg: DedupConfig, files: list[str], rows: np.ndarray) -> np.ndarray:
    """The signatures of the input ``rows`` (sorted), read from the side files."""
    bands, width = lsh_params(cfg)
    names = [f"band_{k}" for k in range(bands)] + (["sig_rest"] if bands * width < cfg.num_perm else [])
    out = np.empty((len(rows), cfg.num_perm), dtype=np.uint32)
    start = 0
    for f in files:
        n = pq.ParquetFile(f).metadata.num_rows
        lo, hi = np.searchsorted(rows, [start, start + n])
        if hi > lo:
            local, col0 = rows[lo:hi] - start, 0
            for name in names:
                part = _fixed(pq.read_table(f, columns=[name])[name].combine_chunks())[local]
                values = np.frombuffer(part.tobytes(), dtype=np.uint32).reshape(hi - lo, -1)
                out[lo:hi, col0:col0 + values.shape[1]] = values
                col0 += values.shape[1]
        start += n
    return out


def _shingle_sets(cfg: DedupConfig, docs: dict, rows: np.ndarray) -> list[np.ndarray]:
    """The sorted distinct shingle hashes of the input ``rows`` (sorted), from their texts."""
    out, start = [], 0
    for f in docs["files"]:
        path = Path(docs["dir"]) / f["path"]
        n = pq.ParquetFile(path).metadata.num_rows
        lo, hi = np.searchsorted(rows, [start, start + n])
        if hi > lo:
            texts = pq.read_table(path, columns=["text"])["text"].take(pa.array(rows[lo:hi] - start)).to_pylist()
            out += [np.unique(shingle_hashes(normalize(t), cfg.ngram)) for t in texts]
        start += n
    return out


def verify(cfg: DedupConfig, docs: dict, files: list[str], rows: np.ndarray, pairs: np.ndarray) -> tuple:
    """The candidate pairs (coded over ``rows``) whose Jaccard reaches the threshold: (i, j, jaccard,
    how many were settled exactly). The signature estimate decides unless it lies within
    ``verify_margin`` of the threshold; then the exact Jaccard of the shingle-hash sets does."""
    m = len(rows)
    i, j = pairs // max(m, 1), pairs % max(m, 1)
    used = np.unique(np.concatenate([i, j]))
    by_row = np.argsort(rows[used])
    sig = np.empty((len(used), cfg.num_perm), dtype=np.uint32)
    sig[by_row] = _signatures_of(cfg, files, rows[used][by_row])
    a, b = np.searchsorted(used, i), np.searchsorted(used, j)
    est = np.empty(len(pairs), dtype=np.float64)
    for s in range(0, len(pairs), VERIFY_CHUNK):
        est[s:s + VERIFY_CHUNK] = (sig[a[s:s + VERIFY_CHUNK]] == sig[b[s:s + VERIFY_CHUNK]]).sum(axis=1)
    est /= cfg.num_perm
    del sig
    margin = verify_margin(cfg)
    close = np.flatnonzero((est >= cfg.threshold - margin) & (est < cfg.threshold + margin))
    if len(close):
        need = np.unique(np.concatenate([i[close], j[close]]))
        by_row = np.argsort(rows[need])
        sets = [None] * len(need)
        for k, s in zip(by_row, _shingle_sets(cfg, docs, rows[need][by_row])):
            sets[k] = s
        ca, cb = np.searchsorted(need, i[close]), np.searchsorted(need, j[close])
        for p, x, y in zip(close, ca, cb):
            inter = len(np.intersect1d(sets[x], sets[y], assume_unique=True))
            est[p] = inter / (len(sets[x]) + len(sets[y]) - inter)
    ok = est >= cfg.threshold
    return i[ok], j[ok], est[ok], len(close)


def _greedy(i: np.ndarray, j: np.ndarray, m: int, rounds: int = 64) -> np.ndarray:
    """Survivors without transitivity over links (i, j), i < j, of places in rank order: the
    best-ranked undecided place survives and the undecided places linked to it are dropped,
    until none is left. True where a place survives. Done in rounds (every undecided place with
    no undecided link to a better one survives at once: the same result), then one by one."""
    keep = np.ones(m, dtype=bool)
    open_ = np.ones(m, dtype=bool)
    live = np.arange(len(i))
    for _ in range(rounds):
        if not len(live):
            return keep
        li, lj = i[live], j[live]
        blocked = np.zeros(m, dtype=bool)
        blocked[lj] = True                  # has an undecided link to a better-ranked place
        new = li[~blocked[li]]
        open_[new] = False                  # survivors
        lost = lj[~open_[li]]
        keep[lost], open_[lost] = False, False
        live = live[open_[li] & open_[lj]]
    order = np.argsort(i[live], kind="stable")
    li, lj = i[live][order], j[live][order]
    starts = np.searchsorted(li, np.unique(li))
    for s, e in zip(starts, np.r_[starts[1:], len(li)]):
        if open_[li[s]]:                    # undecided: its better-ranked links were all dropped
            open_[li[s]] = False
            nb = lj[s:e][open_[lj[s:e]]]
            keep[nb], open_[nb] = False, False
    return keep


def decide(cfg: DedupConfig, docs: dict, files: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, pa.Array, dict]:
    """For every input row: the row it is kept as or dropped for (itself when kept), the Jaccard
    to it (NaN when kept), whether it was dropped as an exact duplicate; the doc_ids; counts."""
    order, ids = ranking(files, cfg.survivor)
    n = len(order)
    stats = {"candidate_pairs": 0, "similar_pairs": 0, "exact_checks": 0}
    by = np.arange(n)                                   # by place in rank order: the place it goes to
    jac = np.full(n, np.nan)
    digests = _column(files, "text_digest")
    group = _bucket_best(_fixed(digests)[order]) if (cfg.exact or cfg.near) else by   # best place of its text
    del digests
    same = group != by                                  # not the place standing for its text
    reps = np.flatnonzero(~same)                        # one place per distinct text
    if cfg.near and len(reps) > 1:
        pairs = candidates(cfg, files, order[reps])
        i, j, sim, stats["exact_checks"] = verify(cfg, docs, files, order[reps], pairs)
        stats.update(candidate_pairs=len(pairs), similar_pairs=len(i))
        keep = _greedy(i, j, len(reps))
        ok = keep[i] & ~keep[j]                         # links from a survivor to a dropped place
        li, lj, ls = i[ok], j[ok], sim[ok]
        first = np.lexsort((li, lj))                    # the best survivor of each dropped place
        li, lj, ls = li[first], lj[first], ls[first]
        one = np.ones(len(lj), dtype=bool)
        one[1:] = lj[1:] != lj[:-1]
        by[reps[lj[one]]] = reps[li[one]]
        jac[reps[lj[one]]] = ls[one]
    by[same] = by[group[same]]                          # goes where its text's best place goes
    jac[same] = np.where(np.isnan(jac[group[same]]), 1.0, jac[group[same]])
    exact = same if cfg.exact else np.zeros(n, dtype=bool)
    # back to input rows
    to, out_jac, out_exact = np.empty(n, dtype=np.int64), np.empty(n), np.empty(n, dtype=bool)
    to[order], out_jac[order], out_exact[order] = order[by], jac, exact
    return to, out_jac, out_exact, ids, stats


def dedup(cfg, docs: dict, stage_dir: str | Path, runner: dict | None = None) -> dict:
    """Run the dedup stage over the filter manifest ``docs``; returns its manifest."""
    t0 = time.time()
    work = fresh_tmp_dir(Path(stage_dir).with_name(Path(stage_dir).name + "-keys"))
    try:
        files, spread = side_files(cfg, docs, work, runner)
        keep, jac, exact, ids, stats = decide(cfg, docs, files)
        sizes = np.bincount(keep, minlength=len(keep))
        schema = with_fields(read_schema(docs), DEDUP_FIELDS)
        dropped_schema = with_fields(schema, [*DROPPED_FIELDS, pa.field("reason", pa.string())])
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
                               "cluster_size": int(sizes[s])}
                        if s == i:
                            w.keep(row)
                        else:
                            w.drop({**row, "duplicate_of": cluster_id[j], "jaccard": float(jac[i])},
                                   "exact_duplicate" if exact[i] else "near_duplicate")
                        i += 1
                    bar.update(batch.num_rows)
            w.extra = {"seconds": round(time.time() - t0, 3), "input_rows": docs["rows"],
                       "clusters": int(np.count_nonzero(sizes)), **stats, "minhash": signature_params(cfg), **spread}
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
