"""Benchmark: our filter + dedup stages against datatrove's equivalent pipeline, same input.

    make bench-datatrove-env          # datatrove in bench/.venv-datatrove, never a dependency
    python bench/datatrove_compare.py [--out bench/results/datatrove_compare.json] [--rounds 3]

1. filters: FineWeb's Gopher repetition, Gopher quality, C4 and FineWeb rules at their defaults
   (URL and language filters off on both sides: datatrove's need downloads), then MinHash
   dedup, over the ~320 extracted pydoc pages;
2. dedup alone: MinHash over the near-duplicate pairs of bench/neardup.py (700 documents).
Reports docs/s of each side (medians of interleaved rounds, imports excluded), the ratio, and
how far the dropped sets agree (both, only ours, only datatrove's, with examples of each).
"""

from __future__ import annotations

import argparse
import json
import os
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

from bench import neardup  # noqa: E402
from bench.dedup import doc_table, site_texts  # noqa: E402
from flows.config import DedupConfig, FilterConfig  # noqa: E402
from tasks.dedup import dedup  # noqa: E402
from tasks.filter import filter_docs  # noqa: E402
from tasks.shards import read_table  # noqa: E402

FILTERS = FilterConfig.model_validate({"url": {"enabled": False}, "language": {"enabled": False}})


def ours(docs: dict, work: Path, with_filters: bool) -> tuple[float, dict[str, str]]:
    """Seconds, and the reason of every dropped doc_id."""
    t0 = time.perf_counter()
    kept = filter_docs(FILTERS, docs, work / "f") if with_filters else docs
    d = dedup(DedupConfig(), kept, work / "d")
    seconds = time.perf_counter() - t0
    dropped = {}
    for m in ([kept] if with_filters else []) + [d]:
        dropped.update({r["doc_id"]: r["reason"] for r in read_table(m, dropped=True, columns=["doc_id", "reason"])
                        .to_pylist()})
    return seconds, dropped


def theirs(python: str, jsonl: Path, work: Path, with_filters: bool) -> tuple[float, dict[str, str]]:
    out = work / "out.json"
    r = subprocess.run([python, str(ROOT / "bench/datatrove_pipeline.py"), str(jsonl), str(work), str(out)]
                       + ([] if with_filters else ["--dedup-only"]), capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    res = json.loads(out.read_text())
    dropped = {i: name for name, ids in res["dropped"].items() for i in ids}
    return sum(res["seconds"].values()), dropped


def compare(texts: list[str], python: str, work: Path, with_filters: bool, rounds: int,
            jaccard: list[float] | None = None) -> dict:
    """Both sides on the same documents. Without filters the input is pairs (documents 2i and
    2i+1), and agreement is also counted per pair: found as duplicates or not (the survivor rules
    differ: ours keeps the longer text, datatrove the first)."""
    docs = doc_table(texts, work / "input")
    jsonl = work / "input.jsonl"
    jsonl.write_text("".join(json.dumps({"doc_id": f"d{i:09d}", "text": t}) + "\n" for i, t in enumerate(texts)))
    times: dict[str, list[float]] = {"ours": [], "datatrove": []}
    result: dict[str, dict[str, str]] = {}   # both sides are deterministic: any round's drops
    for i in range(rounds):
        for side in (["ours", "datatrove"] if i % 2 == 0 else ["datatrove", "ours"]):
            w = work / f"{side}-{i}"
            s, dropped = ours(docs, w, with_filters) if side == "ours" else theirs(python, jsonl, w, with_filters)
            times[side].append(s)
            result[side] = dropped
    a, b = result["ours"], result["datatrove"]
    both, only_ours, only_theirs = a.keys() & b.keys(), a.keys() - b.keys(), b.keys() - a.keys()
    n = len(texts)
    return {"docs": n, "ours_docs_per_s": round(n / statistics.median(times["ours"]), 1),
            "datatrove_docs_per_s": round(n / statistics.median(times["datatrove"]), 1),
            "speed_ratio": round(statistics.median(t / o for o, t in zip(times["ours"], times["datatrove"])), 3),
            "dropped_ours": len(a), "dropped_datatrove": len(b), "dropped_both": len(both),
            "dropped_only_ours": len(only_ours), "dropped_only_datatrove": len(only_theirs),
            "agreement": round((n - len(only_ours) - len(only_theirs)) / n, 4),
            "dropped_both_by_the_same_filter": sum(stage(a[i]) == b[i] for i in both),
            "dropped_set_jaccard": round(len(both) / max(len(a.keys() | b.keys()), 1), 4),
            "only_ours_reasons": dict(sorted(Counter(a[i] for i in only_ours).items())),
            "only_datatrove_reasons": dict(sorted(Counter(b[i] for i in only_theirs).items())),
            **({} if with_filters else pair_agreement(a, b, jaccard)),
            "seconds_by_round": {k: [round(x, 3) for x in v] for k, v in times.items()}}


def stage(reason: str) -> str:
    """Our reason code as the name of datatrove's step that drops for it."""
    return "minhash" if reason.endswith("_duplicate") else reason.split(":")[0]


def pair_agreement(a: dict, b: dict, jaccard: list[float]) -> dict:
    """Per pair (documents 2i, 2i+1): found by each side, and each side's precision and recall
    for pairs with Jaccard >= 0.8 against < 0.5."""
    def found(dropped: dict) -> list[bool]:
        return [f"d{2 * i:09d}" in dropped or f"d{2 * i + 1:09d}" in dropped for i in range(len(jaccard))]
    fa, fb = found(a), found(b)
    return {"pairs": len(jaccard), "pairs_found_ours": sum(fa), "pairs_found_datatrove": sum(fb),
            "pairs_found_both": sum(x and y for x, y in zip(fa, fb)),
            "pair_agreement": round(sum(x == y for x, y in zip(fa, fb)) / len(jaccard), 4),
            "ours": neardup.score(list(zip(jaccard, fa))), "datatrove": neardup.score(list(zip(jaccard, fb)))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/datatrove_compare.json")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--datatrove-python", default=str(ROOT / "bench/.venv-datatrove/bin/python"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-dt-"))
    texts = site_texts(work)
    pairs = neardup.pairs(texts, seed=0)
    res = {"filters_and_dedup": compare(texts, args.datatrove_python, work / "fd", True, args.rounds),
           "dedup_only": compare([t for p in pairs for t in (p["a"], p["b"])], args.datatrove_python,
                                 work / "d", False, args.rounds, [p["jaccard"] for p in pairs])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
