"""Comparing models trained on differently prepared data, on one evaluation suite (ablations).

Each variant's evaluate stage leaves lm-eval's per-item samples (``samples/model/TASK.jsonl``).
Items are paired across variants by (task, item), so a difference between two variants is
measured on the same items. A metric is recomputed from item values as lm-eval aggregates it:
the mean of 0/1 scores (acc, acc_norm), or summed bits over summed bytes (bits_per_byte).
Uncertainty comes from a bootstrap over the evaluation items, the same resampled items for
every variant (paired), and over the seeds when there are several (each variant's seeds
resampled on their own): a variant's score is mean ± the bootstrap's standard deviation; a
difference gets a percentile interval, and its verdict says only what that interval shows.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

METRICS = {"bits_per_byte": "lower", "acc": "higher", "acc_norm": "higher"}   # what is compared, and which way is better
LABEL = {"bits_per_byte": "bits/byte", "acc": "acc", "acc_norm": "acc_norm"}


def item_values(evaluate_dir: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """{"task.metric": array (items, 2)} of one evaluate stage's model: for a mean metric
    (value, 1) per item, for bits per byte (bits, bytes); items in lm-eval's doc order."""
    out: dict[str, np.ndarray] = {}
    for path in sorted((Path(evaluate_dir) / "samples" / "model").glob("*.jsonl")):
        samples = sorted((json.loads(line) for line in path.open()), key=lambda s: s["doc_id"])
        for metric in METRICS:
            values = [s.get(metric) for s in samples]
            if not values or any(v is None for v in values):
                continue
            if metric == "bits_per_byte":   # lm-eval's item: (log-likelihood, bytes)
                arr = np.array([(-v[0] / math.log(2), v[1]) for v in values], dtype=np.float64)
            else:
                arr = np.array([(float(v), 1.0) for v in values], dtype=np.float64)
            out[f"{path.stem}.{metric}"] = arr
    return out


def _score(items: np.ndarray) -> np.ndarray:
    """Sum of the first column over sum of the second, along the last-but-one axis."""
    return items[..., 0].sum(-1) / items[..., 1].sum(-1)


def compare(variants: dict[str, list[dict[str, np.ndarray]]], iters: int = 2000, confidence: float = 0.95,
            seed: int = 0) -> dict:
    """``variants``: {name: [item_values() of each seed]}, every one on the same suite.
    Returns {"metrics": {key: {"direction", "variants": {name: {value, stderr, seeds}},
    "pairs": [{a, b, diff, low, high, verdict}]}}, "iters", "confidence"}."""
    names = list(variants)
    keys = [k for k in variants[names[0]][0] if all(k in s for v in variants.values() for s in v)]
    rng = np.random.default_rng(seed)
    out: dict = {"metrics": {}, "iters": iters, "confidence": confidence}
    for key in keys:
        shapes = {s[key].shape for v in variants.values() for s in v}
        if len(shapes) != 1:
            raise ValueError(f"{key}: the variants were scored on different items {sorted(shapes)}: "
                             "not the same evaluation suite")
        n = next(iter(shapes))[0]
        idx = rng.integers(0, n, size=(iters, n))          # the same items for every variant: paired
        stacked = {v: np.stack([s[key] for s in variants[v]]) for v in names}   # (seeds, items, 2)
        boot, point = {}, {}
        for v in names:
            seeds = stacked[v]
            pick = rng.integers(0, len(seeds), size=(iters, len(seeds))) if len(seeds) > 1 else np.zeros((iters, 1), int)
            # per replicate: each resampled seed's score on the resampled items, then their mean
            per_seed = np.stack([_score(np.take_along_axis(seeds[pick[:, j]], idx[:, :, None], axis=1))
                                 for j in range(pick.shape[1])], axis=1)
            boot[v] = per_seed.mean(1)
            point[v] = float(np.mean([_score(s) for s in seeds]))
        metric = key.split(".", 1)[1]
        direction = METRICS[metric]
        entry = {"direction": direction, "items": int(n), "variants": {
            v: {"value": point[v], "stderr": float(np.std(boot[v], ddof=1)), "seeds": len(stacked[v]),
                "seed_values": [float(_score(s)) for s in stacked[v]]} for v in names}, "pairs": []}
        alpha = (1 - confidence) / 2
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                d = boot[b] - boot[a]
                low, high = (float(x) for x in np.quantile(d, [alpha, 1 - alpha]))
                entry["pairs"].append({"a": b, "b": a, "diff": point[b] - point[a], "low": low, "high": high,
                                       "verdict": pair_verdict(low, high, direction)})
        out["metrics"][key] = entry
    return out


def pair_verdict(low: float, high: float, direction: str) -> str:
    """'better' or 'worse' (for the first of the pair) only when the interval excludes zero."""
    if low <= 0 <= high:
        return "no difference this run can detect"
    up = low > 0
    return "better" if up == (direction == "higher") else "worse"


def verdict_lines(result: dict) -> list[str]:
    """``curated vs raw: ssl_heldout_bpb bits/byte -0.041 [-0.058, -0.024], better``"""
    pct = round(result["confidence"] * 100)
    lines = []
    for key, m in result["metrics"].items():
        task, metric = key.split(".", 1)
        for p in m["pairs"]:
            lines.append(f"{p['a']} vs {p['b']}: {task} {LABEL[metric]} {p['diff']:+.4f} "
                         f"[{p['low']:+.4f}, {p['high']:+.4f}] ({pct}% CI, {m['items']} items), {p['verdict']}")
    return lines


def table_rows(result: dict, info: dict[str, dict] | None = None) -> list[dict]:
    """One row per variant: each metric as value ± stderr, and ``info``'s columns (tokens, epochs, ...)."""
    names = list(next(iter(result["metrics"].values()))["variants"]) if result["metrics"] else list(info or {})
    rows = []
    for v in names:
        row = {"variant": v, **(info or {}).get(v, {})}
        for key, m in result["metrics"].items():
            s = m["variants"][v]
            row[key] = f"{s['value']:.4f} ± {s['stderr']:.4f}"
        rows.append(row)
    return rows


def text_table(rows: list[dict]) -> str:
    if not rows:
        return "(nothing to compare)"
    cols = list(rows[0])
    width = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(width[c]) for c in cols)]
    lines += ["  ".join(str(r.get(c, "")).ljust(width[c]) for c in cols) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def bars_figure(result: dict):
    """Final metrics: one panel per metric, a bar per variant with its standard error."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = list(result["metrics"])
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(3.2 * max(1, len(keys)), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        m = result["metrics"][key]
        names = list(m["variants"])
        ax.bar(names, [m["variants"][v]["value"] for v in names], yerr=[m["variants"][v]["stderr"] for v in names],
               capsize=4, color=[f"C{i}" for i in range(len(names))])
        task, metric = key.split(".", 1)
        ax.set_title(f"{task}\n{LABEL[metric]} ({m['direction']} is better)", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def differences_figure(result: dict):
    """Each pair's difference with its confidence interval, one panel per metric, zero marked:
    an interval that crosses the line is no difference this run can detect."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = list(result["metrics"])
    pairs = max([len(m["pairs"]) for m in result["metrics"].values()], default=1)
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(3.4 * max(1, len(keys)), 1.5 + 0.45 * pairs),
                             squeeze=False)
    colour = {"better": "C2", "worse": "C3"}
    for ax, key in zip(axes[0], keys):
        m = result["metrics"][key]
        for y, p in enumerate(m["pairs"]):
            ax.errorbar(p["diff"], y, xerr=[[p["diff"] - p["low"]], [p["high"] - p["diff"]]], fmt="o", capsize=3,
                        color=colour.get(p["verdict"], "C7"))
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(m["pairs"])), [f"{p['a']} vs {p['b']}" for p in m["pairs"]], fontsize=7)
        ax.set_ylim(-0.6, len(m["pairs"]) - 0.4)
        ax.invert_yaxis()
        task, metric = key.split(".", 1)
        ax.set_title(f"{task} {LABEL[metric]}: difference\n({m['direction']} is better, "
                     f"{round(result['confidence'] * 100)}% CI)", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    return fig


def curves_figure(curves: dict[str, list[tuple[float, float]]], ylabel: str):
    """Each variant's evaluation curve ((tokens seen, value) points) on one chart."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for i, (name, points) in enumerate(curves.items()):
        if points:
            x, y = zip(*points)
            ax.plot(x, y, marker="o", markersize=3, label=name, color=f"C{i}")
    ax.set_xlabel("training tokens")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
