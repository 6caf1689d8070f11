"""Stage 4, dedup: exact duplicates by normalized-text hash, near duplicates by MinHash LSH.

Near-duplicate candidates come from datasketch's MinHashLSH over word n-grams; candidate
pairs are joined into clusters by union-find, and one document per cluster survives by a
deterministic rule. Every row carries its cluster id and size; every dropped duplicate
names the document it duplicates (``duplicate_of``).
"""

from __future__ import annotations

import hashlib
import re
import time
import unicodedata
from pathlib import Path

import numpy as np
import pyarrow as pa
from datasketch import MinHash, MinHashLSH
from tqdm.auto import tqdm

from mlflow.entities import Param

from flows import tracking
from flows.config import DedupConfig
from tasks.shards import StageWriter, iter_rows, read_schema, read_table, with_fields
from tasks.stage import stage_dir, stage_task

NON_WORD_RE = re.compile(r"[^\w\s]+")
SCHEME = "affine32"          # datasketch 2.x default, recorded so signatures stay comparable
HASHFUNC = "sha1_hash32"     # datasketch's default shingle hash
DEDUP_FIELDS = [pa.field("text_hash", pa.string()), pa.field("cluster_id", pa.string()),
                pa.field("cluster_size", pa.int64())]


def normalize(text: str) -> str:
    """NFKC, lower case, punctuation removed, white space collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(NON_WORD_RE.sub(" ", text).split())


def shingles(normalized: str, n: int) -> list[bytes]:
    words = normalized.split()
    if len(words) <= n:
        return [" ".join(words).encode()]
    return [" ".join(words[i:i + n]).encode() for i in range(len(words) - n + 1)]


def lsh_params(cfg) -> tuple[int, int]:
    if cfg.bands is not None:
        return cfg.bands, cfg.rows
    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
    return lsh.b, lsh.r


def signature_params(cfg) -> dict:
    """Everything that makes two MinHash signatures comparable, for the record."""
    bands, rows = lsh_params(cfg)
    return {"num_perm": cfg.num_perm, "seed": cfg.seed, "scheme": SCHEME, "hashfunc": HASHFUNC,
            "shingle": f"word {cfg.ngram}-grams of NFKC-lowercased text without punctuation",
            "bands": bands, "rows": rows, "threshold_estimate": round((1 / bands) ** (1 / rows), 4)}


class UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def near_duplicate_groups(texts: list[str], cfg) -> list[int]:
    """For each normalized text, the index of its cluster's root (union-find over LSH candidates)."""
    bands, rows = lsh_params(cfg)
    sigs = MinHash.bulk([shingles(t, cfg.ngram) for t in texts], num_perm=cfg.num_perm,
                        seed=cfg.seed, scheme=SCHEME)
    lsh = MinHashLSH(num_perm=cfg.num_perm, params=(bands, rows))
    for i, m in enumerate(sigs):
        lsh.insert(i, m, check_duplication=False)
    uf = UnionFind(len(texts))
    for i, m in enumerate(tqdm(sigs, desc="dedup (lsh)", unit="doc")):
        for j in lsh.query(m):
            uf.union(i, j)
    return [uf.find(i) for i in range(len(texts))]


def _survivor(members: list[int], ids: list[str], lengths: list[int], rule: str) -> int:
    if rule == "first":
        return min(members, key=lambda i: ids[i])
    return min(members, key=lambda i: (-lengths[i], ids[i]))


def dedup(cfg, docs: dict, stage_dir: str | Path) -> dict:
    """Run the dedup stage over the filter manifest ``docs``; returns its manifest."""
    t0 = time.time()
    table = read_table(docs, columns=["doc_id", "text"])
    order = np.argsort(np.asarray(table["doc_id"].to_pylist(), dtype=object), kind="stable")
    ids = [table["doc_id"][int(i)].as_py() for i in order]
    norm = [normalize(table["text"][int(i)].as_py()) for i in order]
    lengths = [len(t) for t in norm]
    hashes = [hashlib.sha256(t.encode()).hexdigest() for t in norm]
    del table

    # exact: group identical normalized texts; near: group exact survivors by LSH
    groups: dict[int, list[int]] = {}
    exact_root: dict[str, int] = {}
    for i, h in enumerate(hashes):
        root = exact_root.setdefault(h, i) if cfg.exact else i
        groups.setdefault(root, []).append(i)
    reps = sorted(groups)
    near = near_duplicate_groups([norm[i] for i in reps], cfg) if cfg.near and reps else list(range(len(reps)))

    clusters: dict[int, list[int]] = {}
    for k, rep in enumerate(reps):
        clusters.setdefault(reps[near[k]], []).extend(groups[rep])
    info: dict[str, tuple[str, int, str]] = {}   # doc_id -> (cluster_id, size, reason)
    for members in clusters.values():
        keep = _survivor(members, ids, lengths, cfg.survivor)
        for i in members:
            if i == keep:
                reason = ""
            else:
                reason = "exact_duplicate" if hashes[i] == hashes[keep] else "near_duplicate"
            info[ids[i]] = (ids[keep], len(members), reason)
    text_hash = dict(zip(ids, hashes))

    schema = with_fields(read_schema(docs), DEDUP_FIELDS)
    dropped_schema = with_fields(schema, [pa.field("duplicate_of", pa.string()), pa.field("reason", pa.string())])
    with StageWriter("dedup", stage_dir, schema, dropped_schema) as w:
        for doc in tqdm(iter_rows(docs), total=docs["rows"], desc="dedup", unit="doc"):
            cluster_id, size, reason = info[doc["doc_id"]]
            row = {**doc, "text_hash": text_hash[doc["doc_id"]], "cluster_id": cluster_id, "cluster_size": size}
            if reason:
                w.drop({**row, "duplicate_of": cluster_id}, reason)
            else:
                w.keep(row)
        w.extra = {"seconds": round(time.time() - t0, 3), "input_rows": docs["rows"],
                   "clusters": len(clusters), "minhash": signature_params(cfg)}
    return w.manifest



@stage_task("dedup")
def dedup_task(ctx: dict, section: dict, inputs: list[dict], run_id: str) -> tuple[dict, dict]:
    cfg = DedupConfig.model_validate(section)
    manifest = dedup(cfg, inputs[0], stage_dir(ctx, "dedup"))
    tracking.client().log_batch(run_id, params=[Param(f"minhash.{k}", str(v))
                                                for k, v in manifest["minhash"].items()])
    return manifest, {"clusters": float(manifest["clusters"])}
