"""Benchmark: the decontaminate stage's docs/s against the dedup stage's, same corpus, same run.

    python bench/decontaminate.py [--out bench/results/decontaminate.json] [--rounds 3]

On the real corpus of bench/corpus.py (text found on this machine): the pages of the Python
documentation (``python-page``) are the evaluation sources; every other document is training
data, given to both stages as one manifest (dedup at its defaults; decontaminate at its defaults,
5 % held out, 13-grams, checked against the held-out documents and the evaluation pages). The
corpus' ``python-section`` documents are sections of those very pages: they are what a
decontamination must catch, and the counts say how many it did. Rounds interleave the two stages
(round 0 warms both up and is not counted); medians of wall time, and their ratio. Also reported:
decontaminate's own pass (the scan in worker processes, without reading and writing) in docs/s.
Prints JSON and writes it to --out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")

from bench import corpus  # noqa: E402
from tasks.config import DecontaminateConfig, DedupConfig  # noqa: E402
from tasks.decontaminate import decontaminate  # noqa: E402
from tasks.dedup import dedup  # noqa: E402
from tasks.extract import DOC_SCHEMA  # noqa: E402
from tasks.shards import StageWriter, read_table  # noqa: E402

EVAL_SOURCE = "python-page"


def doc_table(rows: list[dict], path: Path) -> dict:
    """The corpus rows as a stage manifest of documents (the extract stage's schema)."""
    with StageWriter("filter", path, DOC_SCHEMA) as w:
        for r in rows:
            w.keep({"doc_id": hashlib.sha256(r["id"].encode()).hexdigest()[:32], "source": r["source"], "url": r["id"],
                    "fetched_at": None, "content_sha256": None, "title": None, "date": None, "hostname": None,
                    "language": None, "text": r["text"]})
    return w.manifest


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/decontaminate.json")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--corpus", type=Path, default=corpus.DEFAULT_PATH, help="cached corpus (built when missing)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-decontaminate-"))
    rows = corpus.build(args.corpus)
    train = doc_table([r for r in rows if r["source"] != EVAL_SOURCE], work / "train")
    evaluation = doc_table([r for r in rows if r["source"] == EVAL_SOURCE], work / "eval")
    runs = {"decontaminate": lambda i: decontaminate(DecontaminateConfig(), train, work / f"decon-{i}", evaluation),
            "dedup": lambda i: dedup(DedupConfig(), train, work / f"dedup-{i}")}
    times: dict[str, list[float]] = {k: [] for k in runs}
    scan: list[float] = []
    for i in range(args.rounds + 1):           # round 0 warms both up (worker server, caches): not counted
        for name in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
            t0 = time.perf_counter()
            m = runs[name](i)
            if i:
                times[name].append(time.perf_counter() - t0)
                if name == "decontaminate":
                    scan.append(m["docs_per_s"])
                    last = m
    med = {k: statistics.median(v) for k, v in times.items()}
    dropped = read_table(last, dropped=True, columns=["source", "reason", "contaminated_by"]).to_pylist()
    res = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
           "corpus": {**corpus.describe(rows), "training_docs": train["rows"], "eval_source": EVAL_SOURCE,
                      "eval_source_docs": evaluation["rows"]},
           "rounds": args.rounds,
           **{f"{k}_docs_per_s": round(train["rows"] / v, 1) for k, v in med.items()},
           "ratio_decontaminate_vs_dedup": round(med["dedup"] / med["decontaminate"], 3),
           "decontaminate_scan_docs_per_s": round(statistics.median(scan), 1),
           "seconds_by_round": {k: [round(x, 3) for x in v] for k, v in times.items()},
           "decontaminate": {k: last[k] for k in ("heldout_docs", "eval_docs", "eval_ngrams", "eval_docs_too_short",
                                                  "contaminated_by", "common_ngrams", "kept_common_only", "copies",
                                                  "max_doc_frequency", "processes")},
           "contaminated_by_source": dict(sorted(Counter(r["source"] for r in dropped
                                                         if r["reason"] == "contaminated").items()))}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
