"""Where a stage's shards of work run: worker processes beside the stage, or Prefect tasks on Dask.

extract, filter and dedup split their input into shards of work (a batch of pages or
documents, an input shard) and hand them to a pool with ``submit(fn, *args)``. By default
(``runner.task_runner: local``) that is a pool of forked processes. With ``task_runner: dask``
every shard is a Prefect task run (``extract-shard-3``) that prefect-dask's ``DaskTaskRunner``
sends to the Dask cluster at ``runner.dask_address``; the flow starts a ``LocalCluster`` for
the run when no address is given. Results come back to the stage, which writes its shards.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import select
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Iterable, Iterator

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext


class TimeLimit(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise ``TimeLimit`` in this thread once ``seconds`` have passed. Like a SIGALRM handler it
    interrupts at the next Python bytecode, but it works in any thread (a Dask worker runs its
    tasks in threads, where signal handlers cannot be set)."""
    tid, lock, state = threading.get_ident(), threading.Lock(), {"done": False, "fired": False}

    def fire() -> None:
        with lock:
            if not state["done"]:
                state["fired"] = True
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), ctypes.py_object(TimeLimit))

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        with lock:
            state["done"] = True
            if state["fired"]:  # fired but maybe not yet raised: withdraw it
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), None)
        timer.cancel()


# Imported once by the process that worker processes are forked from (``process_pool``).
WORKER_MODULES = ["__main__", "tasks.worker_boot"]


@contextlib.contextmanager
def process_pool(processes: int) -> Iterator[ProcessPoolExecutor]:
    """Worker processes for a stage, forked from a clean server process (multiprocessing's
    ``forkserver``), never from the flow: a worker forked from the flow would inherit whatever the
    flow holds open at that moment (the crawler's sockets, which kept a refused response streaming
    until the stage ended; a renderer's stdin; locks of other threads). The server is started
    once per flow process, with nothing inherited but its own pipes, and imports the stages'
    modules once (``tasks.worker_boot``: ~2-3 s, in the background while the crawl begins); each
    worker then forks from it in milliseconds with those modules ready, and their objects frozen
    out of the garbage collector. A worker runs on the cores the stage's process may use, and ends
    itself when that process ends (``_worker_init``), killed or not: nothing is left writing to a
    dead pipe."""
    ensure_forkserver()
    with ProcessPoolExecutor(max_workers=processes, mp_context=mp.get_context("forkserver"), initializer=_worker_init,
                             initargs=(os.getpid(),)) as pool:
        pool.width = processes   # how many shards run at once, as DaskShards.width
        yield pool


def ensure_forkserver() -> None:
    """Start the worker server now (it returns at once; the server imports in the background), so
    that its imports overlap the stage's own start."""
    from multiprocessing import forkserver
    mp.get_context("forkserver").set_forkserver_preload(WORKER_MODULES)
    forkserver.ensure_running()


def _worker_init(pid: int) -> None:
    """Pool initializer: run on the cores process ``pid`` (the stage's) may use, and end this
    worker as soon as that process ends."""
    with contextlib.suppress(AttributeError, OSError):   # no affinity outside Linux
        os.sched_setaffinity(0, os.sched_getaffinity(pid))

    def wait() -> None:
        try:
            select.select([os.pidfd_open(pid)], [], [])   # readable once that process has ended
        except ProcessLookupError:
            pass
        except (AttributeError, OSError):   # no pidfd (not Linux): look every second
            while _alive(pid):
                time.sleep(1)
        os._exit(1)
    threading.Thread(target=wait, name="die-with-parent", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@task(name="shard", cache_policy=NO_CACHE, persist_result=False)
def run_shard(fn: Callable, args: tuple, index: int) -> dict:
    """One shard of a stage's work, on a Dask worker."""
    from distributed import get_worker
    return {"worker": get_worker().address, "value": fn(*args)}


class DaskShards:
    """``submit(fn, *args)`` as a Prefect task run on the Dask cluster; ``workers``: those that ran one."""

    def __init__(self, runner, stage: str):
        self.runner, self.count, self.workers = runner, 0, set()
        self.task = run_shard.with_options(name=f"{stage}-shard", task_run_name=f"{stage}-shard-{{index}}")
        self.width = sum(runner.client.nthreads().values())

    def submit(self, fn: Callable, *args) -> "DaskShards.Result":
        # submitted as tasks of the flow run, not of the stage's task run: that one's context
        # (its parameters, its task) does not travel to a worker
        token = TaskRunContext.__var__.set(None)
        try:
            future = self.runner.submit(self.task, {"fn": fn, "args": args, "index": self.count})
        finally:
            TaskRunContext.__var__.reset(token)
        self.count += 1
        return self.Result(future, self.workers)

    class Result:
        def __init__(self, future, workers: set):
            self.future, self.workers = future, workers

        def result(self) -> Any:
            out = self.future.result()
            self.workers.add(out["worker"])
            return out["value"]


def on_dask(runner: dict | None) -> bool:
    """Whether the run's ``runner`` config sends shards of work to Dask."""
    return bool(runner) and runner.get("task_runner", "local") == "dask"


@contextlib.contextmanager
def shard_pool(runner: dict | None, stage: str, processes: int | None) -> Iterator[Any]:
    """The pool a stage submits its shards of work to: ``processes`` (default: one per core)
    local processes, or Dask (``runner`` is the run's ``runner`` config, with the address)."""
    if not on_dask(runner):
        with process_pool(processes or os.cpu_count() or 1) as pool:
            yield pool
        return
    from prefect_dask import DaskTaskRunner
    with DaskTaskRunner(address=runner["dask_address"]) as dask:
        yield DaskShards(dask, stage)


def in_order(pool, batches: Iterable[Any], submit: Callable[[Any], Any], ahead: int = 4) -> Iterator[tuple[Any, Any]]:
    """(batch, result) of ``submit(batch)`` for every batch, in order, reading at most ``ahead``
    batches per worker ahead: memory stays flat and the output keeps the input's order."""
    in_flight: deque = deque()
    for batch in batches:
        in_flight.append((batch, submit(batch)))
        if len(in_flight) >= ahead * pool.width:
            done, future = in_flight.popleft()
            yield done, future.result()
    while in_flight:
        done, future = in_flight.popleft()
        yield done, future.result()


def pool_extra(pool) -> dict:
    """For the stage's manifest: how its work was spread."""
    if not isinstance(pool, DaskShards):
        return {"processes": pool.width}
    return {"task_runner": "dask", "dask_workers": sorted(pool.workers), "dask_tasks": pool.count}


def batched(rows: Iterable[Any], largest: int, total: int | Callable[[], int | None] | None = None,
            workers: int = 1) -> Iterator[list[Any]]:
    """Shards of work of at most ``largest`` rows. When the ``total`` is known they shrink as the
    end nears (guided scheduling: what is left, shared by twice the ``workers``), so the workers
    finish together instead of one of them working through a last large batch alone. While it is
    not (``total`` None, or a callable that returns None while the rows are still being collected)
    they start at a quarter of ``largest`` and double: a small input still reaches every worker."""
    def target(done: int, emitted: int) -> int:
        n = total() if callable(total) else total
        if n is None:
            return min(largest, max(largest // 4, 1) << (emitted // workers))
        return max(largest // 8, min(largest, -(-(n - done) // (2 * workers))), 1)

    batch: list[Any] = []
    done, emitted = 0, 0
    size = target(done, emitted)
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield batch
            done, emitted = done + len(batch), emitted + 1
            batch, size = [], target(done, emitted)
        elif callable(total) and len(batch) == 1:   # the total may have become known
            size = target(done, emitted)
    if batch:
        yield batch


@contextlib.contextmanager
def dask_cluster(runner: dict) -> Iterator[dict]:
    """The run's ``runner`` config, with a ``dask_address``: the configured scheduler's, or that of
    a LocalCluster started here for the run (one single-threaded worker process per core, or
    ``dask_workers``; listening on 127.0.0.1 only)."""
    if not on_dask(runner) or runner.get("dask_address"):
        yield runner
        return
    from distributed import LocalCluster
    with LocalCluster(n_workers=runner.get("dask_workers") or os.cpu_count() or 1, threads_per_worker=1,
                      processes=True, host="127.0.0.1", dashboard_address=None) as cluster:
        yield {**runner, "dask_address": cluster.scheduler_address}
