"""Benchmark: extract + filter on Dask (prefect-dask) with 1 and with 2 workers.

    python bench/dask_scaleout.py [--out bench/results/dask_scaleout.json] [--modules N] [--rounds R]

Renders the pydoc site, collects it (``--copies`` times, from as many folders) once, then runs our extract and filter
stages over the same collected pages with ``runner.task_runner: dask`` on a LocalCluster of
1 worker and on one of 2 workers (single-threaded worker processes), in interleaved rounds, as
the flow runs them: every shard of work is a Prefect task run, so a Prefect server runs too
(on 127.0.0.1, started here). Local worker processes (``task_runner: local``) with 2 processes
are measured in the same rounds as a reference for the cost of going through Dask.
A first round warms the workers up (imports, the language model, Prefect's client) and is not
counted: the figures are throughput once running, as on a corpus of any size.
Prints JSON: seconds and pages/s per setup (medians), and the 1 -> 2 worker speedup (the
median of the ratios taken within each round; floor 1.6 on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TQDM_DISABLE", "1")

from infra.services import Service, free_port  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/dask_scaleout.json")
    ap.add_argument("--modules", type=int, default=None, help="render only the first N modules")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repetitions (medians are reported)")
    ap.add_argument("--copies", type=int, default=2, help="collect the rendered site this many times (as "
                                                          "separate folders): a corpus of several shards of work")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-dask-"))
    prefect = Service("prefect", free_port(), tmp)
    os.environ.update(prefect.env, PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_HOME=str(tmp / "home"))
    prefect.start()
    try:
        from tasks import pydoc_site
        from tasks.collect import collect
        from tasks.config import CollectConfig, ExtractConfig, load_config
        from tasks.extract import extract
        from tasks.filter import filter_docs
        from tasks.workers import dask_cluster

        modules = pydoc_site.DEFAULT_MODULES[:args.modules] if args.modules else pydoc_site.DEFAULT_MODULES
        pydoc_site.render_site(tmp / "site", modules)
        for i in range(1, args.copies):
            shutil.copytree(tmp / "site", tmp / f"site-{i}")
        pages = collect(CollectConfig(paths=[str(p) for p in sorted(tmp.glob("site*"))], max_pages=10**6),
                        tmp / "collect")
        filter_cfg = load_config(None).filter

        def run(name: str, runner: dict, rnd: int) -> float:
            t0 = time.perf_counter()
            out = tmp / f"{name}-{rnd}"
            docs = extract(ExtractConfig(processes=2), pages, out / "extract", runner)
            filter_docs(filter_cfg.model_copy(update={"processes": 2}), docs, out / "filter", runner)
            return time.perf_counter() - t0

        seconds: dict[str, list[float]] = {"dask_1_worker": [], "dask_2_workers": [], "local_2_processes": []}
        with dask_cluster({"task_runner": "dask", "dask_workers": 1}) as one, \
                dask_cluster({"task_runner": "dask", "dask_workers": 2}) as two:
            for rnd in range(-1, args.rounds):   # round -1 warms up (imports, language model, Prefect client)
                times = {"dask_1_worker": run("one", one, rnd), "dask_2_workers": run("two", two, rnd),
                         "local_2_processes": run("local", {"task_runner": "local"}, rnd)}
                for k, v in times.items():
                    seconds[k] += [v] if rnd >= 0 else []
                print(f"round {rnd}: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()), file=sys.stderr)
    finally:
        prefect.stop()

    ratios = [a / b for a, b in zip(seconds["dask_1_worker"], seconds["dask_2_workers"])]
    res = {
        "what": "extract + filter of the rendered pydoc site, collected from its folder; every shard of work "
                "a Prefect task run on a Dask LocalCluster (single-threaded worker processes)",
        "pages": pages["rows"], "copies_of_the_site": args.copies, "rounds": args.rounds,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "seconds_median": {k: round(statistics.median(v), 2) for k, v in seconds.items()},
        "pages_per_s_median": {k: round(pages["rows"] / statistics.median(v), 1) for k, v in seconds.items()},
        "speedup_1_to_2_workers": round(statistics.median(ratios), 3),
        "speedup_per_round": [round(r, 3) for r in ratios],
        "floor": 1.6,
        "dask_2_workers_vs_local_2_processes": round(statistics.median(
            [d / loc for d, loc in zip(seconds["dask_2_workers"], seconds["local_2_processes"])]), 3),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
