"""Benchmark: MinHash signature speed, near-duplicate precision/recall, dedup memory per million docs.

    python bench/dedup.py [--out bench/results/dedup.json] [--rounds 5] [--docs 200000]

On the rendered pydoc site (real text), in one run:
  signatures   docs/s of our bulk signatures against a plain per-document datasketch loop,
               ``MinHash(num_perm=112).update_batch(shingles)``, and against ``MinHash.bulk``,
               same docs, same num_perm, one process; interleaved rounds, median of ratios
  quality      precision and recall of the dedup stage at its defaults on pairs of known
               Jaccard (bench/neardup.py): pairs >= 0.8 against pairs < 0.5
  memory       peak RSS of the dedup stage (all its processes) on corpora of N/4 and N distinct
               documents, the slope per million documents, and, for comparison, datasketch's
               in-memory MinHashLSH holding the same N/4 documents' signatures
Prints JSON and writes it to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")

import datasketch  # noqa: E402
import pyarrow as pa  # noqa: E402
from datasketch import MinHash  # noqa: E402

from bench import neardup  # noqa: E402
from flows.config import CollectConfig, DedupConfig, ExtractConfig  # noqa: E402
from tasks import pydoc_site  # noqa: E402
from tasks.collect import collect  # noqa: E402
from tasks.dedup import dedup, normalize, shingles, signatures  # noqa: E402
from tasks.extract import DOC_SCHEMA, extract  # noqa: E402
from tasks.shards import StageWriter, iter_rows, read_table  # noqa: E402


def site_texts(work: Path) -> list[str]:
    pydoc_site.render_site(work / "site", pydoc_site.DEFAULT_MODULES)
    pages = collect(CollectConfig(paths=[str(work / "site")], max_pages=10_000), work / "collect")
    return [r["text"] for r in iter_rows(extract(ExtractConfig(), pages, work / "extract"))]


def doc_table(texts: list[str], path: Path, prefix: str = "d") -> dict:
    """A filter-stage-like manifest holding ``texts`` as documents."""
    with StageWriter("filter", path, DOC_SCHEMA) as w:
        for i, t in enumerate(texts):
            w.keep({"doc_id": f"{prefix}{i:09d}", "source": "bench", "url": f"bench://{i}", "fetched_at": None,
                    "content_sha256": None, "title": None, "date": None, "hostname": None, "language": None,
                    "text": t})
    return w.manifest


def bench_signatures(texts: list[str], rounds: int) -> dict:
    norm = [normalize(t) for t in texts]
    runs = {
        "plain_loop": lambda: [MinHash(num_perm=112, seed=1).update_batch(shingles(t, 5)) for t in norm],
        "datasketch_bulk": lambda: MinHash.bulk([shingles(t, 5) for t in norm], num_perm=112, seed=1),
        "ours": lambda: signatures(norm, 5, 112, 1),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    for i in range(rounds):
        for name in names[i % 3:] + names[:i % 3]:
            t0 = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"docs": len(norm), "words_per_doc": round(sum(len(t.split()) for t in norm) / len(norm), 1),
            "num_perm": 112, **{f"{k}_docs_per_s": round(len(norm) / v, 1) for k, v in med.items()},
            "speedup_vs_plain_loop": round(statistics.median(a / b for a, b in zip(times["plain_loop"], times["ours"])), 3),
            "speedup_vs_bulk": round(statistics.median(a / b for a, b in zip(times["datasketch_bulk"], times["ours"])), 3),
            "seconds_by_round": {k: [round(x, 3) for x in v] for k, v in times.items()}}


def bench_quality(texts: list[str], work: Path) -> dict:
    pairs = neardup.pairs(texts, seed=0)
    docs = [t for p in pairs for t in (p["a"], p["b"])]
    m = dedup(DedupConfig(), doc_table(docs, work / "pairs"), work / "pairs-dedup")
    cluster = {r["doc_id"]: r["cluster_id"] for r in read_table(m, columns=["doc_id", "cluster_id"]).to_pylist()}
    cluster.update({r["doc_id"]: r["cluster_id"] for r in read_table(m, dropped=True).to_pylist()})
    found = [cluster[f"d{2 * i:09d}"] == cluster[f"d{2 * i + 1:09d}"] for i in range(len(pairs))]
    out = neardup.score([(p["jaccard"], f) for p, f in zip(pairs, found)])
    out["by_kind"] = {k: neardup.score([(p["jaccard"], f) for p, f in zip(pairs, found) if p["kind"] == k])
                      for k in neardup.KINDS}
    out["jaccard_histogram"] = dict(sorted(Counter(f"{int(p['jaccard'] * 10) / 10:.1f}" for p in pairs).items()))
    return out


def synthetic(texts: list[str], n: int, seed: int = 0) -> list[str]:
    """n distinct documents of ~400 real words: windows with 30 % of words swapped at random."""
    rng = random.Random(seed)
    wins = list(neardup.windows(texts))
    vocab = [w for win in wins for w in win]
    out = []
    for i in range(n):
        win = wins[i % len(wins)]
        out.append(" ".join(rng.choice(vocab) if rng.random() < 0.3 else w for w in win))
    return out


def peak_rss_mb(code: str) -> float:
    """Peak resident memory of a fresh Python running ``code``, its child processes included."""
    r = subprocess.run([sys.executable, "-c", code + "\nimport resource, json\n"
                        "print(json.dumps(max(resource.getrusage(w).ru_maxrss for w in "
                        "(resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 1024))"],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    return float(r.stdout.strip().splitlines()[-1])


def bench_memory(texts: list[str], n: int, work: Path) -> dict:
    sizes = [n // 4, n]
    res = {}
    for size in sizes:
        manifest = doc_table(synthetic(texts, size), work / f"syn-{size}")
        (work / f"syn-{size}.json").write_text(json.dumps(manifest))
        t0 = time.perf_counter()
        res[size] = peak_rss_mb(
            "import json, os; os.environ['TQDM_DISABLE'] = '1'\n"
            "from flows.config import DedupConfig; from tasks.dedup import dedup\n"
            f"dedup(DedupConfig(), json.load(open({str(work / f'syn-{size}.json')!r})), {str(work / f'syn-{size}-d')!r})")
        res[f"{size}_seconds"] = round(time.perf_counter() - t0, 1)
    small = sizes[0]
    lsh = peak_rss_mb(
        "import json, os\n"
        "from datasketch import MinHash, MinHashLSH\n"
        "from tasks.dedup import normalize, signatures\n"
        "from tasks.shards import iter_rows\n"
        f"m = json.load(open({str(work / f'syn-{small}.json')!r}))\n"
        "lsh = MinHashLSH(num_perm=112, params=(14, 8))\n"
        "rows = [normalize(r['text']) for r in iter_rows(m, columns=['text'])]\n"
        "for i in range(0, len(rows), 5000):\n"
        "    sig = signatures(rows[i:i + 5000], 5, 112, 1)\n"
        "    for k, s in enumerate(sig):\n"
        "        lsh.insert(i + k, MinHash(num_perm=112, hashvalues=s, scheme='affine32'), check_duplication=False)\n"
        "del rows\n")
    baseline = peak_rss_mb("import tasks.dedup")
    slope = (res[n] - res[small]) / (n - small) * 1e6
    return {"docs": sizes, "peak_rss_mb": [res[s] for s in sizes], "seconds": [res[f"{s}_seconds"] for s in sizes],
            "python_with_imports_mb": baseline, "peak_mb_per_million_docs": round(slope, 1),
            "datasketch_minhashlsh_peak_rss_mb": lsh,
            "datasketch_minhashlsh_mb_per_million_docs": round((lsh - baseline) / small * 1e6, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/dedup.json")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--docs", type=int, default=200_000, help="largest corpus of the memory measure")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-dedup-"))
    texts = site_texts(work)
    res = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "datasketch": datasketch.__version__, "pyarrow": pa.__version__},
           "pages": len(texts)}
    wins = [" ".join(w) for w in neardup.windows(texts)]
    res["signatures"] = bench_signatures(wins, args.rounds)
    print(json.dumps(res["signatures"], indent=2), flush=True)
    res["quality"] = bench_quality(texts, work)
    print(json.dumps(res["quality"], indent=2), flush=True)
    res["memory"] = bench_memory(texts, args.docs, work)
    print(json.dumps(res["memory"], indent=2), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
