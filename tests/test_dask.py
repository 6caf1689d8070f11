"""Scale-out: the shards of work of extract, filter and dedup as Prefect tasks on a Dask cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
from mlflow.tracking import MlflowClient

from infra.services import free_port
from tasks.collect import collect
from tasks.config import CollectConfig, ExtractConfig, TableSource, load_config
from tasks.dedup import dedup
from tasks.extract import extract
from tasks.filter import filter_docs
from tasks.shards import read_table
from tasks.workers import TimeLimit, batched, dask_cluster, time_limit
from tests.browser import wait_until
from tests.conftest import BIN, ROOT, run_cli
from tests.test_e2e import flow_run_id, parent_runs, stage_runs, task_states, write_config
from tests.test_postgres import compose_service
from tests.test_sources import PAGES, write_warc


def test_pipeline_runs_its_shards_on_a_two_worker_dask_cluster(tmp_path, servers):
    config = write_config(tmp_path / "run.yaml", "dask", "dask-gpt", max_steps=20)
    proc = run_cli(["run", "--config", config, "--until", "dedup", "--set", "runner.task_runner=dask",
                    "--set", "runner.dask_workers=2"], servers, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    fr_id = flow_run_id(proc.stdout)

    # Prefect: every shard of work is a task run of the pipeline's flow run, and completed
    states = task_states(servers["PREFECT_API_URL"], fr_id)
    for stage in ("extract", "filter", "dedup"):
        shards = {n: s for n, s in states.items() if n.startswith(f"{stage}-shard-")}
        assert shards and all(s == ["Completed"] for s in shards.values()), states
    assert len([n for n in states if n.startswith("extract-shard-")]) >= 2

    # MLflow: where they ran, and the outputs are those of local worker processes
    client = MlflowClient(servers["MLFLOW_TRACKING_URI"])
    parent = parent_runs(client, "dask", fr_id)[0]
    runs = {r.info.run_name: r for r in stage_runs(client, parent.info.run_id)}
    manifests = {s: json.loads(open(client.download_artifacts(runs[s].info.run_id, "manifest.json",
                                                               str(tmp_path))).read())
                 for s in ("collect", "extract", "filter", "dedup")}
    ext = manifests["extract"]
    assert ext["task_runner"] == "dask" and len(ext["dask_workers"]) == 2
    assert all(w.startswith("tcp://127.0.0.1:") for w in ext["dask_workers"])
    assert runs["extract"].data.metrics["dask_workers"] == 2
    assert runs["extract"].data.metrics["dask_tasks"] == len([n for n in states if n.startswith("extract-shard-")])
    cfg = load_config(config)
    local = {"extract": extract(cfg.extract, manifests["collect"], tmp_path / "extract"),
             "filter": filter_docs(cfg.filter, manifests["extract"], tmp_path / "filter"),
             "dedup": dedup(cfg.dedup, manifests["filter"], tmp_path / "dedup")}
    for stage, m in local.items():
        assert m["processes"] >= 1 and "dask_workers" not in m
        assert (m["digest"], m["rows"], m["reasons"]) == \
            (manifests[stage]["digest"], manifests[stage]["rows"], manifests[stage]["reasons"]), stage


def test_shards_run_on_the_compose_dask_cluster_given_by_its_address(tmp_path, servers, stages):
    """The compose file's dask-scheduler and dask-worker commands, natively on 127.0.0.1."""
    from distributed import Client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    port = str(free_port())
    local = {"0.0.0.0": "127.0.0.1", "8786": port, "tcp://dask-scheduler:8786": f"tcp://127.0.0.1:{port}"}
    scheduler, worker = ([str(BIN / c[0]), *(local.get(a, a) for a in c[1:])]
                         for c in (compose_service(n)["command"] for n in ("dask-scheduler", "dask-worker")))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for cmd in (scheduler, [*worker, "--host", "127.0.0.1"])]
    try:
        address = f"tcp://127.0.0.1:{port}"
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=60)   # --nworkers auto with one thread each: one per core
        runner = {"task_runner": "dask", "dask_address": address}
        demo = load_config(ROOT / "flows/profiles/demo.yaml")
        with temporary_settings({PREFECT_API_URL: servers["PREFECT_API_URL"]}):
            ext = extract(ExtractConfig(), stages["collect"], tmp_path / "extract", runner)
            filtered = filter_docs(demo.filter, ext, tmp_path / "filter", runner)
        assert len(ext["dask_workers"]) == 2 and all(w.startswith("tcp://127.0.0.1:") for w in ext["dask_workers"])
        assert ext["digest"] == stages["extract"]["digest"] and filtered["digest"] == stages["filter"]["digest"]
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(30)


def test_collect_reads_each_warc_and_table_file_on_a_dask_worker(tmp_path, servers, site_dir):
    from prefect.settings import PREFECT_API_URL, temporary_settings
    for name in ("a", "b", "c"):
        write_warc(tmp_path / f"{name}.warc.gz", site_dir)
    pq.write_table(pa.table({"text": [(site_dir / p).read_text() for p in PAGES]}), tmp_path / "t.parquet")
    cfg = CollectConfig(warc_files=[str(tmp_path / f"{n}.warc.gz") for n in "abc"],
                        tables=[TableSource(path=str(tmp_path / "t.parquet"))])
    local = collect(cfg, tmp_path / "local")
    with dask_cluster({"task_runner": "dask", "dask_workers": 2}) as runner, \
            temporary_settings({PREFECT_API_URL: servers["PREFECT_API_URL"]}):
        m = collect(cfg, tmp_path / "dask", runner=runner)
    assert m["task_runner"] == "dask" and m["dask_tasks"] == 4 and len(m["dask_workers"]) == 2
    assert (m["digest"], m["rows"], m["reasons"]) == (local["digest"], local["rows"], local["reasons"])
    assert [r["url"] for r in read_table(m).to_pylist()] == [r["url"] for r in read_table(local).to_pylist()]
    # each file a Prefect task run; their states reach the server as events, a moment later
    def shard_runs() -> list[dict]:
        return httpx.post(f"{servers['PREFECT_API_URL']}/task_runs/filter",
                          json={"task_runs": {"name": {"like_": "collect-shard-"}}}).json()

    def completed() -> bool:
        runs = shard_runs()
        return len(runs) >= 4 and all(r["state"]["type"] == "COMPLETED" for r in runs)
    wait_until(completed, 60, "4 completed collect-shard task runs", describe=lambda: str(shard_runs()))


def test_dask_settings_without_dask_are_refused(tmp_path, servers):
    proc = run_cli(["run", "--set", "runner.dask_address=tcp://127.0.0.1:8786"], servers, tmp_path)
    assert proc.returncode != 0
    assert "runner.dask_address and runner.dask_workers apply to runner.task_runner: dask" in proc.stdout + proc.stderr


def test_time_limit_interrupts_work_in_a_thread_that_is_not_the_main_one():
    # Dask runs tasks in worker threads, where no signal handler can be set
    import threading
    out = {}

    def busy():
        try:
            with time_limit(0.2):
                while True:
                    pass
        except TimeLimit:
            out["cut"] = True
        with time_limit(5):   # a limit that is not reached leaves nothing pending behind it
            out["after"] = sum(range(1000))

    t = threading.Thread(target=busy)
    t.start()
    t.join(10)
    assert not t.is_alive() and out == {"cut": True, "after": 499500}



def test_shards_of_work_keep_the_order_and_shrink_towards_the_end():
    rows = list(range(321))
    known = list(batched(rows, 64, total=len(rows), workers=2))
    sizes = [len(b) for b in known]
    assert sum(known, []) == rows
    assert sizes[0] == 64 and sizes == sorted(sizes, reverse=True) and sizes[-1] <= 8   # workers finish together
    following = [len(b) for b in batched(iter(rows[:62]), 64, workers=2)]   # the total is not known yet
    assert following[0] == 16 and sum(following) == 62 and len(following) >= 3
    # extract following a collect: the total becomes known when collect publishes, and the tail shrinks
    known: dict = {"total": None}

    def collected():
        for i in rows:
            if i == 100:
                known["total"] = len(rows)
            yield i
    tail = list(batched(collected(), 64, lambda: known["total"], workers=2))
    assert sum(tail, []) == rows and len(tail[-1]) <= 8 and max(map(len, tail)) == 64
