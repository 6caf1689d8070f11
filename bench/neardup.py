"""A near-duplicate benchmark built from real text, with the true Jaccard of every scored pair known.

    python bench/neardup.py [--out bench/results/neardup.json] [--baseline REF] [--rounds 3]

Two sources of real pages: the rendered pydoc site and the Python documentation as HTML
(``/usr/share/doc/python3*/html``, Debian's python3-doc: ~530 Sphinx pages, each a header,
navigation and sidebar around its body, and a footer).

``pairs``: bases are disjoint windows of 400 (or ``size``) words of real pages (each window used
by one pair only, so pairs cannot chain into each other's clusters). Each pair is a base and a
variant of it: substituted, inserted or deleted words, a truncation, added boilerplate (a window
of another page), reordered paragraphs, or two distinct windows sharing the same boilerplate (a
true negative that looks alike).

``corpus``: those pairs and hard negatives, every word from real pages, each passage used once:
  template          distinct short pages (40-150 words of a page's body) wrapped in one real
                    page's Sphinx template (its header, navigation, sidebar and footer), 12 a site;
  large_boilerplate 3-6 distinct pages (80-200 words) carrying one larger block (150-400 words)
                    as a header or footer;
  quoted_passage    2-3 distinct pages (150-350 words) quoting one passage (100-250 words) inside;
  chain             3-5 overlapping excerpts of one page (240 words, each 15-60 words on from the
                    last): A~B and B~C while A and C share less;
and every pair inside one of those groups is scored.

The true Jaccard is computed on the sets of word 5-gram shingles of the normalized texts, as
dedup defines them. Scores (``evaluate``), pairs of Jaccard >= 0.8 against pairs < 0.5:
  recall     positive pairs caught: not both kept (dropped for each other or for a third document);
  precision  those against negative pairs merged: given the same survivor (cluster_id);
  recall_same_cluster  positives given the same survivor (the stricter reading);
  template_merged      template pairs of Jaccard below the threshold given one survivor;
  content_lost         dropped documents with no kept document of Jaccard >= 0.5.
Run as a script: the dedup stage at its defaults, the stage as it was at ``--baseline`` (a git
ref, run from its source side by side) and a plain datasketch ``MinHashLSH`` (threshold 0.8,
112 permutations) with union-find, on the same corpus; prints JSON and writes it to --out.
"""

from __future__ import annotations

import glob
import html as htmllib
import itertools
import os
import random
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")

from tasks.dedup import normalize, shingles  # noqa: E402

KINDS = ("substitute", "insert", "delete", "truncate", "boilerplate", "reorder", "shared_boilerplate")
HARD_KINDS = ("template", "large_boilerplate", "quoted_passage", "chain")


def windows(texts: list[str], size: int = 400) -> Iterator[list[str]]:
    """Disjoint windows of ``size`` normalized words, each kept as paragraphs of ~40 words."""
    for text in texts:
        words = normalize(text).split()
        for i in range(0, len(words) - size + 1, size):
            yield words[i:i + size]


def jaccard(a: str, b: str, n: int = 5) -> float:
    sa, sb = set(shingles(a, n)), set(shingles(b, n))
    return len(sa & sb) / len(sa | sb)


def paragraphs(words: list[str], size: int = 40) -> list[str]:
    return [" ".join(words[i:i + size]) for i in range(0, len(words), size)]


def variant(kind: str, words: list[str], other: list[str], third: list[str], rng: random.Random) -> tuple[str, str]:
    """(base text, variant text) for one pair of the given kind, at a random strength."""
    p = rng.uniform(0.0, 0.12) if kind in ("substitute", "insert", "delete") else rng.uniform(0.05, 0.7)
    base = words
    if kind == "substitute":
        new = [rng.choice(other) if rng.random() < p else w for w in words]
    elif kind == "insert":
        new = [x for w in words for x in ([w, rng.choice(other)] if rng.random() < p else [w])]
    elif kind == "delete":
        new = [w for w in words if rng.random() >= p]
    elif kind == "truncate":
        new = words[:int(len(words) * (1 - p / 1.4))]
    elif kind == "boilerplate":
        new = words + other[:int(len(other) * p)]
    elif kind == "reorder":
        paras = paragraphs(words)
        i, j = sorted(rng.sample(range(len(paras)), 2))
        paras[i], paras[j] = paras[j], paras[i]
        return "\n\n".join(paragraphs(words)), "\n\n".join(paras)
    else:  # shared_boilerplate: two different windows with the same block appended
        block = third[:int(len(third) * rng.uniform(0.3, 1.0))]
        base, new = words + block, other + block
    return "\n\n".join(paragraphs(base)), "\n\n".join(paragraphs(new))


def pairs(texts: list[str], seed: int = 0, per_kind: int | None = None, size: int = 400) -> list[dict]:
    """Pairs of every kind, round robin over the windows of ``texts``: {a, b, kind, jaccard}."""
    rng = random.Random(seed)
    pool = list(windows(texts, size))
    rng.shuffle(pool)
    out = []
    k = 0
    while len(pool) >= 3 and (per_kind is None or len(out) < per_kind * len(KINDS)):
        kind = KINDS[k % len(KINDS)]
        words, other, third = pool.pop(), pool.pop(), pool.pop()
        a, b = variant(kind, words, other, third, rng)
        out.append({"a": a, "b": b, "kind": kind, "jaccard": jaccard(normalize(a), normalize(b))})
        k += 1
    return out


def score(results: list[tuple[float, bool]], high: float = 0.8, low: float = 0.5) -> dict:
    """Precision and recall of the pairs found, for pairs with Jaccard >= high against < low."""
    pos = [found for j, found in results if j >= high]
    neg = [found for j, found in results if j < low]
    tp, fp = sum(pos), sum(neg)
    return {"pairs_positive": len(pos), "pairs_negative": len(neg), "true_positives": tp, "false_positives": fp,
            "precision": round(tp / max(tp + fp, 1), 4), "recall": round(tp / max(len(pos), 1), 4)}


# --- the Python documentation as HTML: real Sphinx pages -------------------------------------

def python_docs_root() -> Path | None:
    """The folder of the Python documentation as HTML (Debian's python3-doc), if installed."""
    found = sorted({os.path.realpath(p) for p in glob.glob("/usr/share/doc/python3*/html/library/index.html")})
    return Path(found[0]).parent.parent if found else None


def html_words(html: str) -> list[str]:
    """The normalized words of an HTML fragment: scripts and styles out, tags out, entities decoded."""
    html = re.sub(r"(?is)<(script|style)\b[^>]*>.*?</\1>", " ", html)
    return normalize(htmllib.unescape(re.sub(r"<[^>]+>", " ", html))).split()


def sphinx_pages(root: Path | None = None) -> list[dict]:
    """Every page of the Python documentation split into its template's words before the body
    (title, header, sidebar, navigation), its body's words, and the template's words after it
    (sidebar, navigation, footer); index and search pages left out. Sorted by path."""
    root = root or python_docs_root()
    out = []
    for path in sorted(Path(root).rglob("*.html")):
        if path.name.startswith(("genindex", "py-modindex", "search")):
            continue
        page = path.read_text(encoding="utf-8", errors="replace")
        a = page.find('<div class="body" role="main">')
        b = page.find('<div class="sphinxsidebar"', a)
        if a < 0 or b < 0:
            continue
        out.append({"path": str(path.relative_to(root)), "head": html_words(page[:a]),
                    "body": html_words(page[a:b]), "tail": html_words(page[b:])})
    return out


class Passages:
    """Passages of real text, each handed out once: contiguous words of one page's body, page
    after page in a seeded order (the rest of a page too short for a request is skipped).
    ``used``: the pages that lent words."""

    def __init__(self, pages: list[dict], rng: random.Random):
        self.pages = [p for p in pages if p["body"]]
        rng.shuffle(self.pages)
        self.at, self.used = 0, set()

    def take(self, n: int) -> list[str]:
        while self.pages:
            page = self.pages[-1]
            if len(page["body"]) - self.at >= n:
                self.at += n
                self.used.add(page["path"])
                return page["body"][self.at - n:self.at]
            self.pages.pop()
            self.at = 0
        raise ValueError(f"no real passage of {n} words left")


def text(*parts: list[str]) -> str:
    return "\n\n".join(p for part in parts for p in paragraphs(part))


def hard_groups(pages: list[dict], rng: random.Random, sites: int = 8, site_pages: int = 12,
                boilerplate: int = 12, quoted: int = 16, chains: int = 30) -> tuple[list[tuple[str, list[str]]], set]:
    """(kind, documents) for every group of hard negatives, from the Sphinx ``pages``; and the
    pages they used (a page lending its template lends no words of its body)."""
    pages = sorted(pages, key=lambda p: p["path"])
    rng.shuffle(pages)
    templates, src = pages[:sites], Passages(pages[sites:], rng)
    groups = []
    for t in templates:
        groups.append(("template", [text(t["head"], src.take(rng.randint(40, 150)), t["tail"])
                                    for _ in range(site_pages)]))
    for _ in range(boilerplate):
        block, footer = src.take(rng.randint(150, 400)), rng.random() < 0.5
        contents = [src.take(rng.randint(80, 200)) for _ in range(rng.randint(3, 6))]
        groups.append(("large_boilerplate", [text(*((c, block) if footer else (block, c))) for c in contents]))
    for _ in range(quoted):
        quote, docs = src.take(rng.randint(100, 250)), []
        for _ in range(rng.randint(2, 3)):
            c = src.take(rng.randint(150, 350))
            cut = rng.randint(len(c) // 3, 2 * len(c) // 3)
            docs.append(text(c[:cut], quote, c[cut:]))
        groups.append(("quoted_passage", docs))
    for _ in range(chains):
        length, step, width = rng.randint(3, 5), rng.randint(15, 60), 240
        base = src.take(width + (length - 1) * step)
        groups.append(("chain", [text(base[k * step:k * step + width]) for k in range(length)]))
    return groups, src.used | {t["path"] for t in templates}


def corpus(texts: list[str], pages: list[dict], seed: int = 0, size: int = 400, **group_sizes) -> dict:
    """The documents of the benchmark and its scored pairs: ``pairs`` over the windows of
    ``texts`` and of the bodies of the Sphinx pages that lent nothing to the hard negatives,
    then every pair inside each group of ``hard_groups``. {docs: [text], pairs: [{a, b (document
    numbers), kind, jaccard}], groups: [{kind, docs (document numbers)}]}."""
    rng = random.Random(seed)
    groups, used = hard_groups(pages, rng, **group_sizes)
    docs: list[str] = []
    scored: list[dict] = []
    rest = [" ".join(p["body"]) for p in sorted(pages, key=lambda p: p["path"]) if p["path"] not in used]
    for p in pairs(texts + rest, seed=seed, size=size):
        scored.append({"a": len(docs), "b": len(docs) + 1, "kind": p["kind"], "jaccard": p["jaccard"]})
        docs += [p["a"], p["b"]]
    out_groups = []
    for kind, members in groups:
        ids = list(range(len(docs), len(docs) + len(members)))
        docs += members
        out_groups.append({"kind": kind, "docs": ids})
        norm = [normalize(d) for d in members]
        for x, y in itertools.combinations(range(len(members)), 2):
            scored.append({"a": ids[x], "b": ids[y], "kind": kind, "jaccard": jaccard(norm[x], norm[y])})
    return {"docs": docs, "pairs": scored, "groups": out_groups}


# --- scoring -----------------------------------------------------------------------------------

def shingle_sets(docs: list[str], n: int = 5) -> list[set]:
    return [set(shingles(normalize(d), n)) for d in docs]


def content_lost(sets: list[set], kept: list[bool], low: float = 0.5) -> list[int]:
    """The dropped documents that no kept document resembles at Jaccard >= ``low`` (exact, by an
    inverted index over the kept documents' shingles)."""
    index: dict[bytes, list[int]] = {}
    for d, s in enumerate(sets):
        if kept[d]:
            for sh in s:
                index.setdefault(sh, []).append(d)
    lost = []
    for d, s in enumerate(sets):
        if kept[d]:
            continue
        shared = Counter(k for sh in s for k in index.get(sh, ()))
        if not any(c / (len(s) + len(sets[k]) - c) >= low for k, c in shared.items()):
            lost.append(d)
    return lost


def evaluate(c: dict, cluster: list[str], kept: list[bool], sets: list[set] | None = None,
             threshold: float = 0.8, high: float = 0.8, low: float = 0.5) -> dict:
    """Scores of one dedup outcome on ``corpus`` ``c``: every document's survivor (``cluster``)
    and whether it was kept. See the module's docstring."""
    caught = [not (kept[p["a"]] and kept[p["b"]]) for p in c["pairs"]]
    merged = [cluster[p["a"]] == cluster[p["b"]] for p in c["pairs"]]
    pos = [k for k, p in enumerate(c["pairs"]) if p["jaccard"] >= high]
    neg = [k for k, p in enumerate(c["pairs"]) if p["jaccard"] < low]
    tp, fp = sum(caught[k] for k in pos), sum(merged[k] for k in neg)
    out = {"pairs_positive": len(pos), "pairs_negative": len(neg), "true_positives": tp, "false_positives": fp,
           "precision": round(tp / max(tp + fp, 1), 4), "recall": round(tp / max(len(pos), 1), 4),
           "recall_same_cluster": round(sum(merged[k] for k in pos) / max(len(pos), 1), 4)}
    by_kind = {}
    for kind in KINDS + HARD_KINDS:
        kp = [k for k in pos if c["pairs"][k]["kind"] == kind]
        kn = [k for k in neg if c["pairs"][k]["kind"] == kind]
        by_kind[kind] = {"positive": len(kp), "caught": sum(caught[k] for k in kp),
                         "negative": len(kn), "merged": sum(merged[k] for k in kn)}
    out["by_kind"] = by_kind
    below = [k for k, p in enumerate(c["pairs"]) if p["kind"] == "template" and p["jaccard"] < threshold]
    out["template_pairs"] = len(below)
    out["template_merged"] = sum(merged[k] for k in below)
    out["template_pages_merged"] = len({c["pairs"][k][x] for k in below if merged[k] for x in ("a", "b")})
    sets = sets if sets is not None else shingle_sets(c["docs"])
    lost = content_lost(sets, kept, low)
    dropped = len(kept) - sum(kept)
    out.update(docs=len(kept), dropped=dropped, content_lost=len(lost),
               content_lost_of_dropped=round(len(lost) / max(dropped, 1), 4),
               content_lost_of_docs=round(len(lost) / max(len(kept), 1), 4))
    return out


def stage_outcome(dedup_fn, cfg, docs: list[str], work: Path) -> tuple[list[str], list[bool], dict]:
    """Run a dedup stage function over ``docs`` (doc_ids d000000000, ...): every document's
    cluster_id, whether it was kept, and the stage's manifest."""
    from bench.dedup import doc_table
    from tasks.shards import read_table
    m = dedup_fn(cfg, doc_table(docs, work / "docs"), work / "dedup")
    kept_rows = read_table(m, columns=["doc_id", "cluster_id"]).to_pylist()
    rows = {r["doc_id"]: r["cluster_id"] for r in kept_rows}
    dropped = read_table(m, dropped=True, columns=["doc_id", "cluster_id"]).to_pylist()
    rows.update({r["doc_id"]: r["cluster_id"] for r in dropped})
    kept = {r["doc_id"] for r in kept_rows}
    ids = [f"d{i:09d}" for i in range(len(docs))]
    return [rows[i] for i in ids], [i in kept for i in ids], m


def datasketch_outcome(docs: list[str], threshold: float = 0.8, num_perm: int = 112) -> tuple[list[str], list[bool]]:
    """A plain datasketch ``MinHashLSH(threshold, num_perm)`` over the same shingles, clusters by
    union-find over its query results, the longest document of each kept."""
    from datasketch import MinHash, MinHashLSH
    norm = [normalize(d) for d in docs]
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    sigs = MinHash.bulk([shingles(t, 5) for t in norm], num_perm=num_perm, seed=1)
    for k, m in enumerate(sigs):
        lsh.insert(k, m)
    parent = list(range(len(docs)))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x
    for k, m in enumerate(sigs):
        for other in lsh.query(m):
            a, b = root(k), root(other)
            if a != b:
                parent[max(a, b)] = min(a, b)
    best: dict[int, int] = {}
    for k in range(len(docs)):
        r = root(k)
        if r not in best or (len(norm[k]), -k) > (len(norm[best[r]]), -best[r]):
            best[r] = k
    return [str(best[root(k)]) for k in range(len(docs))], [best[root(k)] == k for k in range(len(docs))]


FLOORS = {"precision": 0.99, "recall": 0.97, "template_merged": 0, "content_lost_of_dropped": 0.005}


def floors_met(res: dict) -> dict:
    return {"precision": res["precision"] >= FLOORS["precision"], "recall": res["recall"] >= FLOORS["recall"],
            "template_merged": res["template_merged"] <= FLOORS["template_merged"],
            "content_lost": res["content_lost_of_dropped"] < FLOORS["content_lost_of_dropped"]}


def main() -> None:
    import argparse
    import json
    import platform
    import statistics
    import tempfile
    import time

    from bench.dedup import load_baseline, site_texts
    from tasks.config import DedupConfig
    from tasks.dedup import dedup

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/neardup.json")
    ap.add_argument("--baseline", default=BASELINE_REF, help="git ref of the dedup stage to compare with")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds of each stage")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-neardup-"))
    old = load_baseline(args.baseline, work / "baseline")
    texts = site_texts(work)
    pages = sphinx_pages()
    c = corpus(texts, pages, seed=args.seed)
    sets = shingle_sets(c["docs"])
    js = [p["jaccard"] for p in c["pairs"]]
    res: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                 "sources": {"pydoc_pages": len(texts), "python_docs_pages": len(pages),
                             "python_docs": str(python_docs_root())},
                 "corpus": {"docs": len(c["docs"]), "pairs": len(c["pairs"]),
                            "pairs_by_kind": dict(Counter(p["kind"] for p in c["pairs"])),
                            "groups_by_kind": dict(Counter(g["kind"] for g in c["groups"])),
                            "jaccard_histogram": dict(sorted(Counter(f"{int(j * 10) / 10:.1f}" for j in js).items()))},
                 "floors": FLOORS}
    runs = {"ours": dedup, "baseline": old.dedup}
    seconds: dict[str, list[float]] = {k: [] for k in runs}
    outcome = {}
    for r in range(args.rounds + 1):        # round 0 warms both up: not counted
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            t0 = time.perf_counter()
            outcome[name] = stage_outcome(runs[name], DedupConfig(), c["docs"], work / f"{name}-{r}")
            if r:
                seconds[name].append(time.perf_counter() - t0)
    for name in runs:
        cluster, kept, m = outcome[name]
        res[name] = evaluate(c, cluster, kept, sets)
        res[name]["docs_per_s"] = round(len(c["docs"]) / statistics.median(seconds[name]), 1)
        res[name]["seconds_by_round"] = [round(s, 3) for s in seconds[name]]
        res[name]["reasons"] = m["reasons"]
        print(json.dumps({name: {k: v for k, v in res[name].items() if k != "by_kind"}}), flush=True)
    res["ours"]["verification"] = {k: outcome["ours"][2].get(k)
                                   for k in ("candidate_pairs", "similar_pairs", "exact_checks")}
    res["baseline"]["ref"] = args.baseline
    t0 = time.perf_counter()
    cluster, kept = datasketch_outcome(c["docs"])
    res["datasketch_minhashlsh_0.8"] = {**evaluate(c, cluster, kept, sets),
                                        "docs_per_s": round(len(c["docs"]) / (time.perf_counter() - t0), 1)}
    res["stage_speed_vs_baseline"] = round(res["ours"]["docs_per_s"] / res["baseline"]["docs_per_s"], 3)
    res["floors_met"] = floors_met(res["ours"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


BASELINE_REF = "6fb5895"   # the dedup stage before candidate verification (issue 18)

if __name__ == "__main__":
    main()
