"""Benchmark: pages/s per core of extraction and of collect+extract, against bare trafilatura.

    python bench/collect_extract.py [--out bench/results/collect_extract.json] [--modules N]

Renders the pydoc site, then measures in one run, on the same pages:
  reference   bare ``trafilatura.extract(html)`` in a loop, in a fresh interpreter that imports
              nothing else, same options as ours (its own timing of the loop)
  reference_2p  the same loop in two such interpreters at once, each over every other page: what
              two processes gain on this machine at that moment. As a ceiling of our speedups it is
              taken balanced: its wall time as if the two had finished together (half their CPU
              seconds), so only what two processes side by side cost each other is left in it
  extract     our extract stage with 1 and 2 worker processes (Parquet in and out)
  crawl       collect (HTTP crawl of the site) + extract, with 1 and 2 processes
  warc        collect (read a WARC of the same pages) + extract, with 1 and 2 processes
Collect and extract run side by side as the flow runs them: extract follows collect's shards.
A "1 process" run is pinned to one core (the crawl, the extraction worker and the stage's own
work share it), a "2 process" run to two: pages/s per core, as the floors mean it. The site is
served by a separate process, as the web would be.
Before the rounds, the start-up of worker processes is timed in fresh interpreters: the first pool
of a process (the worker server starts and imports the stages) and the next one.
Prints JSON: median pages/s, the per-core overhead of our extract against the reference, the
2-process speedups (medians of ratios taken within each round), each also as a fraction of the
reference's own balanced 2-process speedup in the same round, and the parallel efficiency of every run
(CPU seconds of its processes over processes x wall seconds; the crawl's site server not counted).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TQDM_DISABLE", "1")

from multiprocessing import forkserver  # noqa: E402

import trafilatura  # noqa: E402
from warcio.statusandheaders import StatusAndHeaders  # noqa: E402
from warcio.warcwriter import WARCWriter  # noqa: E402

from tasks import pydoc_site  # noqa: E402
from tasks.collect import collect  # noqa: E402
from tasks.config import CollectConfig, ExtractConfig  # noqa: E402
from tasks.extract import extract  # noqa: E402
from tasks.shards import follow_rows, future_state, iter_rows  # noqa: E402
from tasks.workers import process_pool  # noqa: E402


def cpu() -> float:
    """CPU seconds of this process, its finished children, and the extraction workers (forked by
    multiprocessing's worker server, which reaps them: its children's CPU time is in /proc)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime + worker_server_cpu()


def worker_server_cpu() -> float:
    """CPU seconds of the worker server and of the workers it has reaped."""
    pid = forkserver._forkserver._forkserver_pid
    if not pid:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")   # utime stime cutime cstime


WORKER_START = r"""
import json, sys, time
from tasks.workers import process_pool
if __name__ == "__main__":
    times = []
    for _ in range(2):
        t = time.perf_counter()
        with process_pool(1) as pool:
            pool.submit(int).result()
        times.append(time.perf_counter() - t)
    print(json.dumps(times))
"""


def worker_start() -> tuple[float, float]:
    """(s) from opening a pool to a first result, in a fresh interpreter: the first pool (the worker
    server starts and imports the stages) and the next one (a worker forked from it)."""
    out = subprocess.run([sys.executable, "-c", WORKER_START], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    return tuple(json.loads(out.stdout))


@contextlib.contextmanager
def site_server(directory: Path):
    """The site served by another process (``tasks.pydoc_site``'s server: HTTP/1.1 keep-alive, as
    a real web server answers), so that its work does not share the crawler's interpreter."""
    proc = subprocess.Popen([sys.executable, "-m", "tasks.pydoc_site", str(directory)], stdout=subprocess.PIPE,
                            text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        yield proc.stdout.readline().strip()
    finally:
        proc.terminate()
        proc.wait()


@contextlib.contextmanager
def cores(n: int):
    """Run on the first ``n`` allowed cores only; threads and processes started inside inherit it."""
    allowed = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, allowed[:n])
    try:
        yield
    finally:
        os.sched_setaffinity(0, allowed)


def collect_and_extract(processes: int, collect_cfg: CollectConfig, work: Path, name: str, **sources) -> dict:
    """As the flow runs them: collect in its own thread, extract following its shards."""
    with ThreadPoolExecutor(1) as ex:
        collected = ex.submit(collect, collect_cfg, work / f"{name}-collect", **sources)
        return extract(ExtractConfig(processes=processes), follow_rows(work / f"{name}-collect",
                       future_state(collected)), work / f"{name}-extract")


REFERENCE = r"""
import json, sys, time
import trafilatura
pages, opts = json.load(open(sys.argv[1]))
t, c = time.perf_counter(), time.process_time()
for html, url in pages:
    trafilatura.extract(html, url=url, **opts)
print(json.dumps([time.perf_counter() - t, time.process_time() - c]))
"""


def bare_trafilatura(*pages: Path) -> tuple[float, float]:
    """(wall s, CPU s) of the reference loop, one clean interpreter per file of ``pages`` ([html,
    url] pairs and the options), all at once: the slowest one's wall time, their CPU time summed."""
    procs = [subprocess.Popen([sys.executable, "-c", REFERENCE, str(f)], stdout=subprocess.PIPE, text=True)
             for f in pages]
    stdouts = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"the reference loop failed: exit codes {[p.returncode for p in procs]}")
    outs = [json.loads(out) for out in stdouts]
    return max(w for w, _ in outs), sum(c for _, c in outs)


def processes(name: str) -> int:
    """How many processes a run of that name has (and cores it is pinned to)."""
    return 2 if name.endswith("2p") else 1


def timed(fn):
    t0, c0 = time.perf_counter(), cpu()
    out = fn()
    timed.cpu = cpu() - c0
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/collect_extract.json")
    ap.add_argument("--modules", type=int, default=None, help="render only the first N modules")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved repetitions (medians are reported)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    modules = pydoc_site.DEFAULT_MODULES[:args.modules] if args.modules else pydoc_site.DEFAULT_MODULES
    pydoc_site.render_site(work / "site", modules)
    local = ["127.0.0.1/32"]  # our own site on loopback: no politeness limits needed
    res: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                             "trafilatura": trafilatura.__version__}}
    with site_server(work / "site") as url:
        crawl = CollectConfig(allow_private=local, max_pages=10_000, per_host_rps=10_000)
        pages = collect(crawl, work / "pages", start_urls=[url])
        html = [(r["html"], r["url"]) for r in iter_rows(pages)]
        n = len(html)
        res["pages"] = n
        res["html_mb"] = round(sum(len(h.encode()) for h, _ in html) / 1e6, 2)
        with open(work / "pages.warc.gz", "wb") as f:
            w = WARCWriter(f, gzip=True)
            for h, u in html:
                hdr = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
                w.write_record(w.create_warc_record(u, "response", payload=io.BytesIO(h.encode()), http_headers=hdr))
        # the reference runs with our default options (comments off, tables on)
        opts = ExtractConfig().model_dump(include={"favor_precision", "favor_recall", "include_tables",
                                                   "include_comments"})
        (work / "reference.json").write_text(json.dumps([html, opts]))
        halves = [work / f"reference-{k}.json" for k in (0, 1)]
        for k, f in enumerate(halves):
            f.write_text(json.dumps([html[k::2], opts]))
        runs = {
            **{f"extract_{p}p": (lambda i, p=p: extract(ExtractConfig(processes=p), pages, work / f"e{p}-{i}"))
               for p in (1, 2)},
            **{f"crawl_extract_{p}p": (lambda i, p=p: collect_and_extract(p, crawl, work, f"c{p}-{i}",
                                                                          start_urls=[url])) for p in (1, 2)},
            **{f"warc_extract_{p}p": (lambda i, p=p: collect_and_extract(
                p, CollectConfig(warc_files=[str(work / "pages.warc.gz")]), work, f"w{p}-{i}")) for p in (1, 2)},
        }
        # interleaved rounds: this machine's speed drifts by +-20 % within minutes, so the runs
        # compared with each other are run back to back (reference, extract 1p and 2p; crawl 1p
        # and 2p; WARC 1p and 2p), in an order rotated every round, and the median of the ratios
        # over rounds is reported
        starts = [worker_start() for _ in range(3)]
        res["worker_start_cold_s"] = round(statistics.median(c for c, _ in starts), 3)
        res["worker_start_warm_s"] = round(statistics.median(w for _, w in starts), 4)
        with process_pool(1) as pool:   # the worker server is started once per process, before the rounds
            pool.submit(int).result()
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in ["reference", "reference_2p", *runs]}
        groups = [["reference", "reference_2p", "extract_1p", "extract_2p"], ["crawl_extract_1p", "crawl_extract_2p"],
                  ["warc_extract_1p", "warc_extract_2p"]]
        for i in range(args.rounds):
            for group in groups[i % 3:] + groups[:i % 3]:
                for name in group[i % len(group):] + group[:i % len(group)]:
                    with cores(processes(name)):
                        if name == "reference":
                            times[name].append(bare_trafilatura(work / "reference.json"))
                        elif name == "reference_2p":
                            times[name].append(bare_trafilatura(*halves))
                        else:
                            _, s = timed(lambda: runs[name](i))
                            times[name].append((s, timed.cpu))
        res["seconds_by_round"] = {name: [round(s, 3) for s, _ in ts] for name, ts in times.items()}
        res["cpu_seconds_by_round"] = {name: [round(c, 3) for _, c in ts] for name, ts in times.items()}
        res["parallel_efficiency"] = {}
        for name, ts in times.items():
            res[f"{name}_pages_per_s"] = round(n / statistics.median(s for s, _ in ts), 2)
            if name in ("reference", "extract_1p", "extract_2p"):
                res[f"{name}_pages_per_cpu_s"] = round(n / statistics.median(c for _, c in ts), 2)
            res["parallel_efficiency"][name] = round(statistics.median(c / (processes(name) * s) for s, c in ts), 4)

        def ratios(a: str, b: str, cpu: bool = False) -> list[float]:
            return [x[cpu] / y[cpu] for x, y in zip(times[a], times[b])]

        def ratio(a: str, b: str, cpu: bool = False) -> float:
            return round(statistics.median(ratios(a, b, cpu)), 4)

        # per core: CPU time per page, all processes counted, against the bare loop's
        res["extract_overhead_per_core"] = round(ratio("extract_1p", "reference", cpu=True) - 1, 4)
        res["extract_1p_wall_overhead"] = round(ratio("extract_1p", "reference") - 1, 4)
        res["reference_speedup_2p"] = ratio("reference", "reference_2p")
        res["reference_speedup_2p_by_round"] = [round(r, 3) for r in ratios("reference", "reference_2p")]
        ceiling = [w1 / (c2 / 2) for (w1, _), (_, c2) in zip(times["reference"], times["reference_2p"])]
        res["reference_speedup_2p_balanced"] = round(statistics.median(ceiling), 4)
        res["reference_speedup_2p_balanced_by_round"] = [round(r, 3) for r in ceiling]
        for k in ("extract", "crawl_extract", "warc_extract"):
            res[f"{k}_speedup_2p"] = ratio(f"{k}_1p", f"{k}_2p")
            res[f"{k}_speedup_2p_by_round"] = [round(r, 3) for r in ratios(f"{k}_1p", f"{k}_2p")]
            # against what two processes gained on the machine in the same round
            res[f"{k}_speedup_2p_of_reference"] = round(statistics.median(
                ours / ref for ours, ref in zip(ratios(f"{k}_1p", f"{k}_2p"), ceiling)), 4)
    res["rounds"] = args.rounds
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
