"""Benchmark: MinHash signature speed, stage speed, near-duplicate precision/recall, dedup memory.

    python bench/dedup.py [--out bench/results/dedup.json] [--rounds 5] [--docs 200000]
                          [--speed-docs 20000] [--baseline REF]

On real text (the rendered pydoc site, the Python documentation as HTML), in one run:
  signatures   docs/s of our bulk signatures against a plain per-document datasketch loop,
               ``MinHash(num_perm=112).update_batch(shingles)``, and against ``MinHash.bulk``,
               same docs, same num_perm, one process; interleaved rounds, median of ratios
  stage        docs/s of the whole dedup stage at its defaults against the stage as it was at
               git ``--baseline`` (its source run side by side), on the near-duplicate benchmark's
               documents plus ``--speed-docs`` distinct ones; interleaved rounds, medians
  quality      the near-duplicate benchmark (bench/neardup.py: pairs of known Jaccard and hard
               negatives) at the defaults: precision and recall, pairs >= 0.8 against < 0.5,
               template pages merged, content lost
  memory       peak RSS the dedup stage adds on corpora of N/4 and N distinct documents, the
               slope per million documents, and, for comparison, what datasketch's in-memory
               MinHashLSH adds holding the same N/4 documents
Prints JSON and writes it to --out.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")

import datasketch  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
from datasketch import MinHash  # noqa: E402

from bench import neardup  # noqa: E402
from tasks import pydoc_site  # noqa: E402
from tasks.collect import collect  # noqa: E402
from tasks.config import CollectConfig, DedupConfig, ExtractConfig  # noqa: E402
from tasks.dedup import dedup, normalize, shingles, signatures  # noqa: E402
from tasks.extract import DOC_SCHEMA, extract  # noqa: E402
from tasks.shards import StageWriter, iter_rows  # noqa: E402


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


def load_baseline(ref: str, folder: Path):
    """The dedup stage as it was at git ``ref``, as module ``dedup_baseline``. Load it before
    any stage starts its worker processes: their server takes this process's import path then."""
    folder.mkdir(parents=True, exist_ok=True)
    src = subprocess.run(["git", "show", f"{ref}:tasks/dedup.py"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    (folder / "dedup_baseline.py").write_text(src)
    sys.path.insert(0, str(folder))
    return importlib.import_module("dedup_baseline")


def bench_stage(docs: list[str], baseline, rounds: int, work: Path) -> dict:
    """docs/s of the dedup stage, ours and the baseline's, at the defaults, interleaved rounds."""
    manifest = doc_table(docs, work / "speed-docs")
    runs = {"ours": dedup, "baseline": baseline.dedup}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(rounds + 1):             # round 0 warms both up (worker server, caches): not counted
        for name in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
            t0 = time.perf_counter()
            runs[name](DedupConfig(), manifest, work / f"speed-{name}-{i}")
            if i:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"docs": len(docs), "rounds": rounds, **{f"{k}_docs_per_s": round(len(docs) / v, 1) for k, v in med.items()},
            "ratio_vs_baseline": round(med["baseline"] / med["ours"], 3),
            "seconds_by_round": {k: [round(x, 3) for x in v] for k, v in times.items()}}


def bench_quality(c: dict, work: Path) -> dict:
    cluster, kept, m = neardup.stage_outcome(dedup, DedupConfig(), c["docs"], work / "quality")
    out = neardup.evaluate(c, cluster, kept)
    out["verification"] = {k: m.get(k) for k in ("candidate_pairs", "similar_pairs", "exact_checks")}
    out["floors_met"] = neardup.floors_met(out)
    return out


def synthetic(texts: list[str], n: int, seed: int = 0) -> list[str]:
    """n distinct documents of ~400 real words: windows with 30 % of words swapped at random."""
    rng = np.random.default_rng(seed)
    wins = [np.array(w, dtype=object) for w in neardup.windows(texts)]
    vocab = np.concatenate(wins)
    out = []
    for i in range(n):
        win = wins[i % len(wins)]
        swap = rng.random(len(win)) < 0.3
        out.append(" ".join(np.where(swap, vocab[rng.integers(0, len(vocab), len(win))], win)))
    return out


SAMPLER = """
import json, resource, threading, time
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20
peak, done = [rss_mb()], threading.Event()
def sample():
    while not done.is_set():
        peak.append(max(peak[-1], rss_mb()))
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
"""


def peak_rss_mb(setup: str, run: str) -> dict:
    """Resident memory of a fresh Python after ``setup`` (imports, inputs), its peak while
    ``run`` runs (sampled every 5 ms), and the largest peak of its worker processes (forked:
    their figure includes pages shared with the parent)."""
    code = (f"{setup}\n{SAMPLER}\nbefore = peak[0]\n{run}\ndone.set()\n"
            "print(json.dumps([before, max(peak[-1], rss_mb()),"
            " resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"})
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    before, after, children = json.loads(r.stdout.strip().splitlines()[-1])
    return {"setup_mb": round(before, 1), "peak_mb": round(after, 1), "added_mb": round(after - before, 1),
            "largest_worker_mb": round(children, 1)}


def bench_memory(texts: list[str], n: int, work: Path) -> dict:
    """The dedup stage's peak memory on n/4 and n distinct documents, and datasketch's
    in-memory MinHashLSH holding the n/4 documents' signatures (computed in batches, not held)."""
    sizes = [n // 4, n]
    out: dict = {"docs": sizes}
    for size in sizes:
        manifest = doc_table(synthetic(texts, size), work / f"syn-{size}")
        (work / f"syn-{size}.json").write_text(json.dumps(manifest))
        t0 = time.perf_counter()
        out[size] = peak_rss_mb(
            "import json\nfrom tasks.config import DedupConfig\nfrom tasks.dedup import dedup\n"
            f"m = json.load(open({str(work / f'syn-{size}.json')!r}))",
            f"dedup(DedupConfig(), m, {str(work / f'syn-{size}-d')!r})")
        out[size]["seconds"] = round(time.perf_counter() - t0, 1)
        out[size]["docs_per_s"] = round(size / out[size]["seconds"], 1)
    out["added_mb_per_million_docs"] = round((out[n]["added_mb"] - out[sizes[0]]["added_mb"]) / (n - sizes[0]) * 1e6, 1)
    out["datasketch_minhashlsh"] = peak_rss_mb(
        "import json\nfrom datasketch import MinHash, MinHashLSH\nfrom tasks.dedup import normalize, signatures\n"
        f"from tasks.shards import iter_rows\nm = json.load(open({str(work / f'syn-{sizes[0]}.json')!r}))",
        "lsh = MinHashLSH(num_perm=112, params=(14, 8))\nbatch = []\n"
        "def flush(start):\n"
        "    for k, s in enumerate(signatures(batch, 5, 112, 1)):\n"
        "        lsh.insert(start + k, MinHash(num_perm=112, hashvalues=s, scheme='affine32'), check_duplication=False)\n"
        "for i, r in enumerate(iter_rows(m, columns=['text'])):\n"
        "    batch.append(normalize(r['text']))\n"
        "    if len(batch) == 2000:\n"
        "        flush(i + 1 - len(batch)); batch = []\n"
        "flush(m['rows'] - len(batch))")
    out["datasketch_minhashlsh"]["docs"] = sizes[0]
    out["datasketch_minhashlsh_added_mb_per_million_docs"] = round(
        out["datasketch_minhashlsh"]["added_mb"] / sizes[0] * 1e6, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/dedup.json")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--docs", type=int, default=200_000, help="largest corpus of the memory measure")
    ap.add_argument("--speed-docs", type=int, default=20_000, help="distinct documents added to the stage speed corpus")
    ap.add_argument("--baseline", default=neardup.BASELINE_REF, help="git ref of the dedup stage to compare speed with")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-dedup-"))
    baseline = load_baseline(args.baseline, work / "baseline")
    texts = site_texts(work)
    pages = neardup.sphinx_pages()
    res = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "datasketch": datasketch.__version__, "pyarrow": pa.__version__},
           "pages": len(texts), "python_docs_pages": len(pages)}
    wins = [" ".join(w) for w in neardup.windows(texts)]
    res["signatures"] = bench_signatures(wins, args.rounds)
    print(json.dumps(res["signatures"], indent=2), flush=True)
    c = neardup.corpus(texts, pages)
    res["stage"] = bench_stage(c["docs"] + synthetic(texts, args.speed_docs, seed=1), baseline,
                               max(args.rounds - 2, 1), work)
    res["stage"]["baseline_ref"] = args.baseline
    print(json.dumps(res["stage"], indent=2), flush=True)
    res["quality"] = bench_quality(c, work)
    print(json.dumps({k: v for k, v in res["quality"].items() if k != "by_kind"}, indent=2), flush=True)
    res["memory"] = bench_memory(texts, args.docs, work)
    print(json.dumps(res["memory"], indent=2), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
