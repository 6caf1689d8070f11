"""Benchmark: our filter and dedup stages against datatrove's equivalents, same input.

    make bench-datatrove-env          # datatrove in bench/.venv-datatrove, never a dependency
    flock /tmp/bench.lock python bench/datatrove_compare.py [--out bench/results/datatrove_compare.json] [--rounds 3]

1. filters: FineWeb's Gopher repetition, Gopher quality, C4 and FineWeb rules at their defaults
   (URL and language filters off on both sides: datatrove's need downloads) over the real corpus
   of bench/corpus.py (a few thousand documents of text found on this machine). Per document:
   kept or dropped by each side; for documents both drop, whether the same filter and the same
   rule dropped them; for documents both keep, whether the kept text is the same. Examples of
   every class of disagreement, with our scores for the rule in question.
2. dedup alone: MinHash over the near-duplicate pairs of bench/neardup.py (700 documents).

Speed: docs/s of each side, one process each (our stage with ``processes: 1``; datatrove's
LocalPipelineExecutor with one worker), medians of interleaved rounds, imports excluded (ours
warms its worker process once before the rounds; datatrove's clock starts after its imports and
its tokenizer's loading), and the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")

from bench import corpus, neardup  # noqa: E402
from bench.dedup import doc_table, site_texts  # noqa: E402
from tasks.config import DedupConfig, FilterConfig  # noqa: E402
from tasks.dedup import dedup  # noqa: E402
from tasks.filter import filter_docs  # noqa: E402
from tasks.shards import read_table  # noqa: E402

FILTERS = FilterConfig.model_validate({"url": {"enabled": False}, "language": {"enabled": False}, "processes": 1})
FILTER_NAMES = ("gopher_repetition", "gopher_quality", "c4", "fineweb")
# our rule -> datatrove's filter_reason, where the names differ
DATATROVE_RULE = {
    **{f"dup_{n}_gram": f"duplicated_{n}_n_grams" for n in range(5, 11)},
    "min_doc_words": "gopher_short_doc", "max_doc_words": "gopher_long_doc",
    "min_avg_word_length": "gopher_below_avg_threshold", "max_avg_word_length": "gopher_above_avg_threshold",
    "max_hash_ratio": "gopher_too_many_hashes", "max_ellipsis_ratio": "gopher_too_many_ellipsis",
    "max_bullet_lines_ratio": "gopher_too_many_bullets", "max_ellipsis_lines_ratio": "gopher_too_many_end_ellipsis",
    "min_alpha_words_ratio": "gopher_below_alpha_threshold", "min_stop_words": "gopher_enough_stop_words",
}
OUR_RULE = {v: k for k, v in DATATROVE_RULE.items()}
EXAMPLES = 5


def as_datatrove(reason: str) -> str:
    """Our reason code written as datatrove's ``<filter>:<filter_reason>``."""
    name, rule = reason.split(":")
    return f"{name}:{DATATROVE_RULE.get(rule, rule)}"


def theirs(python: str, jsonl: Path, work: Path, mode: str) -> tuple[float, dict]:
    out = work / "out.json"
    r = subprocess.run([python, str(ROOT / "bench/datatrove_pipeline.py"), str(jsonl), str(work), str(out)]
                       + ([f"--{mode}"] if mode != "all" else []), capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    res = json.loads(out.read_text())
    return sum(res["seconds"].values()), res


def write_jsonl(texts: list[str], path: Path) -> None:
    path.write_text("".join(json.dumps({"doc_id": f"d{i:09d}", "text": t}) + "\n" for i, t in enumerate(texts)))


# --- 1. filters on the real corpus -------------------------------------------------------------

def our_filters(docs: dict, work: Path) -> tuple[float, dict]:
    t0 = time.perf_counter()
    m = filter_docs(FILTERS, docs, work)
    seconds = time.perf_counter() - t0
    kept = read_table(m, columns=["doc_id", "text"]).to_pylist()
    dropped = read_table(m, dropped=True, columns=["doc_id", "reason"]).to_pylist()
    return seconds, {"manifest": m, "reasons": {r["doc_id"]: r["reason"] for r in dropped},
                     "kept_sha256": {r["doc_id"]: hashlib.sha256(r["text"].encode()).hexdigest() for r in kept}}


def score_of(manifest: dict, doc_ids: set[str]) -> dict[str, dict]:
    """Our score columns of some documents, kept or dropped."""
    out = {}
    for dropped in (False, True):
        for row in read_table(manifest, dropped=dropped).to_pylist():
            if row["doc_id"] in doc_ids:
                out[row["doc_id"]] = row
    return out


def rule_score(reason: str) -> str | None:
    """Our score column that a rule (ours or datatrove's, as ``<filter>:<rule>``) reads."""
    from tasks.filter import build_filters
    name, rule = reason.split(":")
    rule = OUR_RULE.get(rule, rule)
    f = next((f for f in build_filters(FILTERS) if f.name == name), None)
    r = next((r for r in f.rules if r.name == rule), None) if f else None
    return f"{name}.{r.score}" if r else None


def compare_filters(rows: list[dict], python: str, work: Path, rounds: int) -> dict:
    texts = [r["text"] for r in rows]
    ids = {f"d{i:09d}": r for i, r in enumerate(rows)}
    docs = doc_table(texts, work / "input")
    jsonl = work / "input.jsonl"
    write_jsonl(texts, jsonl)
    our_filters(doc_table(texts[:64], work / "warm-input"), work / "warm")   # worker server started, modules loaded
    times: dict[str, list[float]] = {"ours": [], "datatrove": []}
    res: dict[str, dict] = {}   # both sides are deterministic: any round's result
    for i in range(rounds):
        for side in (["ours", "datatrove"] if i % 2 == 0 else ["datatrove", "ours"]):
            w = work / f"{side}-{i}"
            s, res[side] = our_filters(docs, w) if side == "ours" else theirs(python, jsonl, w, "filters-only")
            times[side].append(s)
    a = {k: as_datatrove(v) for k, v in res["ours"]["reasons"].items()}
    b = res["datatrove"]["reasons"]
    n = len(rows)
    both, only_ours, only_theirs = a.keys() & b.keys(), a.keys() - b.keys(), b.keys() - a.keys()
    kept_both = ids.keys() - a.keys() - b.keys()
    same_filter = [i for i in both if a[i].split(":")[0] == b[i].split(":")[0]]
    same_rule = [i for i in both if a[i] == b[i]]
    same_text = [i for i in kept_both if res["ours"]["kept_sha256"][i] == res["datatrove"]["kept_sha256"][i]]

    classes: dict[str, list[str]] = defaultdict(list)
    for i in sorted(only_ours):
        classes[f"dropped only by ours: {a[i]}"].append(i)
    for i in sorted(only_theirs):
        classes[f"dropped only by datatrove: {b[i]}"].append(i)
    for i in sorted(set(both) - set(same_rule)):
        classes[f"dropped by both, ours {a[i]}, datatrove {b[i]}"].append(i)
    for i in sorted(set(kept_both) - set(same_text)):
        classes["kept by both, kept text differs"].append(i)
    picked = {i for members in classes.values() for i in members[:EXAMPLES]}
    scores = score_of(res["ours"]["manifest"], picked)

    def example(i: str, cls: str) -> dict:
        r = ids[i]
        ex = {"doc": r["id"], "source": r["source"], "chars": len(r["text"]),
              "ours": a.get(i, "kept"), "datatrove": b.get(i, "kept")}
        for reason in {a.get(i), b.get(i)} - {None}:
            col = rule_score(reason)
            if col and col in scores.get(i, {}):
                ex[col] = round(scores[i][col], 6)
        return ex
    by_source: dict[str, Counter] = defaultdict(Counter)
    for i, r in ids.items():
        by_source[r["source"]]["docs"] += 1
        by_source[r["source"]]["kept_ours"] += i not in a
        by_source[r["source"]]["kept_datatrove"] += i not in b
    return {
        "docs": n, "chars": sum(map(len, texts)),
        "ours_docs_per_s": round(n / statistics.median(times["ours"]), 1),
        "datatrove_docs_per_s": round(n / statistics.median(times["datatrove"]), 1),
        "speed_ratio": round(statistics.median(t / o for o, t in zip(times["ours"], times["datatrove"])), 3),
        "kept_ours": n - len(a), "kept_datatrove": n - len(b), "kept_both": len(kept_both),
        "dropped_ours": len(a), "dropped_datatrove": len(b), "dropped_both": len(both),
        "dropped_only_ours": len(only_ours), "dropped_only_datatrove": len(only_theirs),
        "agreement": round((n - len(only_ours) - len(only_theirs)) / n, 4),
        "dropped_both_by_the_same_filter": len(same_filter), "dropped_both_by_the_same_rule": len(same_rule),
        "kept_both_with_the_same_text": len(same_text),
        "by_source": {k: dict(v) for k, v in sorted(by_source.items())},
        "reasons_ours": dict(Counter(a.values()).most_common()),
        "reasons_datatrove": dict(Counter(b.values()).most_common()),
        "disagreements": {cls: {"count": len(members), "examples": [example(i, cls) for i in members[:EXAMPLES]]}
                          for cls, members in sorted(classes.items(), key=lambda c: -len(c[1]))},
        "seconds_by_round": {k: [round(x, 3) for x in v] for k, v in times.items()},
    }


# --- 2. dedup alone ----------------------------------------------------------------------------

def our_dedup(docs: dict, work: Path) -> tuple[float, dict[str, str]]:
    t0 = time.perf_counter()
    d = dedup(DedupConfig(), docs, work / "d")
    seconds = time.perf_counter() - t0
    return seconds, {r["doc_id"]: r["reason"] for r in read_table(d, dropped=True, columns=["doc_id", "reason"])
                     .to_pylist()}


def compare_dedup(texts: list[str], python: str, work: Path, rounds: int, jaccard: list[float]) -> dict:
    """Both sides on the same documents, pairs (documents 2i and 2i+1); agreement is also counted
    per pair: found as duplicates or not (the survivor rules differ: ours keeps the longer text,
    datatrove the first)."""
    docs = doc_table(texts, work / "input")
    jsonl = work / "input.jsonl"
    write_jsonl(texts, jsonl)
    times: dict[str, list[float]] = {"ours": [], "datatrove": []}
    result: dict[str, dict[str, str]] = {}
    for i in range(rounds):
        for side in (["ours", "datatrove"] if i % 2 == 0 else ["datatrove", "ours"]):
            w = work / f"{side}-{i}"
            if side == "ours":
                s, dropped = our_dedup(docs, w)
            else:
                s, out = theirs(python, jsonl, w, "dedup-only")
                dropped = {i: name for name, ids in out["dropped"].items() for i in ids}
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
            "dropped_set_jaccard": round(len(both) / max(len(a.keys() | b.keys()), 1), 4),
            **pair_agreement(a, b, jaccard),
            "seconds_by_round": {k: [round(x, 3) for x in v] for k, v in times.items()}}


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
    ap.add_argument("--corpus", type=Path, default=corpus.DEFAULT_PATH, help="cached corpus (built when missing)")
    ap.add_argument("--only", choices=("filters", "dedup_only"), help="run one part")
    ap.add_argument("--datatrove-python", default=str(ROOT / "bench/.venv-datatrove/bin/python"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-dt-"))
    res = {}
    if args.only in (None, "filters"):
        rows = corpus.build(args.corpus)
        res["filters"] = {"corpus": corpus.describe(rows),
                          **compare_filters(rows, args.datatrove_python, work / "f", args.rounds)}
    if args.only in (None, "dedup_only"):
        pairs = neardup.pairs(site_texts(work), seed=0)
        res["dedup_only"] = compare_dedup([t for p in pairs for t in (p["a"], p["b"])], args.datatrove_python,
                                          work / "d", args.rounds, [p["jaccard"] for p in pairs])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(res, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
