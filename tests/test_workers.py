"""Worker processes inherit nothing of the crawl and end with the stage that made them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tasks.collect import collect
from tasks.config import CollectConfig, ExtractConfig
from tasks.extract import extract
from tasks.shards import follow_rows, future_state
from tests.browser import wait_until
from tests.conftest import ROOT


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:   # the thread ended since it was listed
            pass
    return out


def inet_sockets(pid: int) -> set[str]:
    """The TCP sockets process ``pid`` holds open (by inode)."""
    inodes = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            inodes.add(line.split()[9])
    held = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:   # closed meanwhile
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            held.add(target)
    return held


def workers() -> list[int]:
    """The processes of a pool: children of the worker server (a child of this process), or
    children of this process forked from it (the same command line)."""
    own, out = Path("/proc/self/cmdline").read_bytes(), []
    for pid in children(os.getpid()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            out += children(pid) if b"forkserver" in cmdline else [pid] if cmdline == own else []
        except FileNotFoundError:
            pass
    return out


def test_extraction_workers_hold_no_socket_of_the_crawl_beside_them(tmp_path, site_url):
    """Extraction starts while the crawl has connections open; a worker that inherited one would
    keep it open (a refused response kept streaming for 90 s that way) until the stage ended."""
    samples: list[tuple[int, set[str], set[str]]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            ours = inet_sockets(os.getpid())
            for pid in workers():
                try:
                    samples.append((pid, ours, inet_sockets(pid)))
                except (FileNotFoundError, ProcessLookupError):
                    pass
            time.sleep(0.02)
    # a crawl slow enough (40 pages/s) that extraction works beside it for a few seconds
    crawl = CollectConfig(allow_private=["127.0.0.1/32"], per_host_rps=40)
    watcher = threading.Thread(target=sample)
    watcher.start()
    try:
        with ThreadPoolExecutor(1) as ex:
            collected = ex.submit(collect, crawl, tmp_path / "collect", start_urls=[site_url])
            m = extract(ExtractConfig(processes=2), follow_rows(tmp_path / "collect", future_state(collected)),
                        tmp_path / "extract")
    finally:
        stop.set()
        watcher.join()
    assert m["rows"] > 20
    while_crawling = [s for s in samples if s[1]]   # the crawl had connections open at that moment
    assert len({pid for pid, _, _ in while_crawling}) >= 1, "no worker was seen while the crawl was connected"
    assert [(pid, held) for pid, _, held in samples if held] == []


KILLED = """
import sys, time
from tasks.workers import process_pool
if __name__ == "__main__":
    with process_pool(2) as pool:
        jobs = [pool.submit(time.sleep, 120) for _ in range(2)]
        while len(pool._processes) < 2 or not all(j.running() for j in jobs):
            time.sleep(0.05)
        print(*pool._processes, flush=True)
        time.sleep(120)
"""


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_workers_end_when_the_stage_process_is_killed(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", KILLED], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2 and all(alive(p) for p in pids)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        wait_until(lambda: not any(alive(p) for p in pids), timeout=10, what="the workers to end", every=0.1)
    finally:
        proc.kill()
        for p in pids if "pids" in locals() else []:
            if alive(p):
                os.kill(p, signal.SIGKILL)
