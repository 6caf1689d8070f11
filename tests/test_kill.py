"""A run killed outright (SIGKILL) is found dead, closed and retried; a failure on Prefect's temporary
server says what is true. Real Prefect and MLflow servers on 127.0.0.1, real `ssl-pipeline` processes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import torch
from mlflow.tracking import MlflowClient

from infra.services import AUTOMATION, CRASH_AFTER_S, ensure_crash_automation, start_all
from infra.services import services as make_services
from tests.browser import wait_until
from tests.conftest import BIN, cli_env, run_cli
from tests.test_e2e import DATA_STAGES, TRAINED, parent_runs, stage_runs, task_states, write_config

pytestmark = pytest.mark.e2e
SILENCE_S = 45   # the automation's window in these tests (heartbeats come every 30 s)


def flow_state(api: str, fr_id: str) -> dict:
    return httpx.get(f"{api}/flow_runs/{fr_id}").json()["state"]


def stage_run_status(client: MlflowClient, experiment: str, stage: str) -> list[str]:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.`ssl_pipeline.stage` = '{stage}'") if exp else []
    return [r.info.status for r in runs]


def test_automation_is_created_once_by_services(servers, tmp_path):
    api = servers["PREFECT_API_URL"]

    def ours() -> list[dict]:
        return httpx.post(f"{api}/automations/filter", json={"automations": {"name": {"any_": [AUTOMATION]}}}).json()
    (a,) = ours()
    assert a["enabled"] and a["trigger"]["posture"] == "Proactive"
    assert a["trigger"]["after"] == ["prefect.flow-run.heartbeat"] and a["trigger"]["within"] == CRASH_AFTER_S
    assert "prefect.flow-run.heartbeat" in a["trigger"]["expect"]
    assert [(x["type"], x["state"]) for x in a["actions"]] == [("change-flow-run-state", "CRASHED")]
    # `make services` again, on servers already up: still one, updated in place
    port = int(api.rsplit(":", 1)[1].split("/")[0])
    prefect = make_services(tmp_path, port, 1)[0]
    start_all([prefect], crash_after_s=CRASH_AFTER_S + 1)
    (again,) = ours()
    assert again["id"] == a["id"] and again["trigger"]["within"] == CRASH_AFTER_S + 1
    ensure_crash_automation(api, CRASH_AFTER_S)
    assert ours()[0]["trigger"]["within"] == CRASH_AFTER_S


def test_a_killed_run_is_found_dead_closed_and_retried_to_the_same_result(tmp_path, servers):
    """SIGKILL the run while filter runs: `ssl-pipeline retry` finds its process gone, marks it Crashed
    and retries it. SIGKILL that retry while train runs, after a checkpoint: the automation marks the
    run Crashed when its heartbeats stop, and the next retry finishes it. Finished stages come back
    Cached, what the dead attempts left open is closed, training continues in its own MLflow run with
    one history, and the outputs are those of an uninterrupted computation."""
    api, client = servers["PREFECT_API_URL"], MlflowClient(servers["MLFLOW_TRACKING_URI"])
    ensure_crash_automation(api, SILENCE_S)
    config = tmp_path / "run.yaml"
    write_config(config, "killed", "killed-gpt", evaluate=False, max_steps=30, checkpoint_interval=10,
                 eval_interval=10)
    env = cli_env(servers, tmp_path)
    procs: list[subprocess.Popen] = []
    try:
        run = subprocess.Popen([str(BIN / "ssl-pipeline"), "run", "--config", str(config)], cwd=tmp_path, env=env,
                               stdout=subprocess.DEVNULL, stderr=open(tmp_path / "run.log", "wb"))
        procs.append(run)

        def parent() -> str | None:
            assert run.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            exp = client.get_experiment_by_name("killed")
            found = client.search_runs([exp.experiment_id], "tags.`mlflow.parentRunId` IS NULL") if exp else []
            return found[0].data.tags["prefect.flow_run_id"] if found else None
        fr_id = wait_until(parent, 300, "the pipeline's MLflow run")
        # its process is alive: a retry refuses, naming it
        busy = run_cli(["retry", fr_id], servers, tmp_path)
        assert busy.returncode == 1 and f"process {run.pid} on " in busy.stderr, busy.stdout + busy.stderr
        wait_until(lambda: parent() and "RUNNING" in stage_run_status(client, "killed", "filter"),
                   300, "filter to run", every=0.2)
        run.send_signal(signal.SIGKILL)
        run.wait()
        assert flow_state(api, fr_id)["type"] == "RUNNING"          # Prefect cannot know

        # retry 1: the process is gone, so the run is Crashed and retried; SIGKILL it while it trains
        run_dir = tmp_path / "runs" / fr_id
        retry = subprocess.Popen([str(BIN / "ssl-pipeline"), "retry", fr_id], cwd=tmp_path, env=env,
                                 stdout=open(tmp_path / "retry1.log", "wb"), stderr=subprocess.STDOUT)
        procs.append(retry)

        def trained_past_checkpoint() -> bool:
            assert retry.poll() is None, (tmp_path / "retry1.log").read_text()[-3000:]
            ckpts = list((run_dir / "train" / "checkpoints").glob("step-*.pt"))
            runs = client.search_runs([client.get_experiment_by_name("killed").experiment_id],
                                      "tags.`ssl_pipeline.stage` = 'train'")
            return bool(ckpts) and bool(runs) and "loss" in runs[0].data.metrics
        wait_until(trained_past_checkpoint, 400, "training past its first checkpoint", every=0.2)
        retry.send_signal(signal.SIGKILL)
        retry.wait()
        said = (tmp_path / "retry1.log").read_text()
        assert re.search(rf"Flow run {fr_id} .*: Running since", said), said[-3000:]
        assert f"Its process {run.pid} on " in said and "no longer exists" in said and "Marked it Crashed" in said

        # the automation: no heartbeat for SILENCE_S seconds, the run is Crashed
        t0 = time.time()
        state = wait_until(lambda: (s := flow_state(api, fr_id))["type"] == "CRASHED" and s, SILENCE_S + 90,
                           "the automation to mark the run Crashed", every=2)
        assert "No heartbeat" in state["message"], state
        print(f"marked Crashed {time.time() - t0:.0f} s after the kill")

        # retry 2: it finishes
        last = run_cli(["retry", fr_id], servers, tmp_path)
        assert last.returncode == 0, last.stdout[-3000:] + last.stderr[-5000:]
        assert f"Its process {retry.pid} on " in last.stdout and "no longer exists" in last.stdout, last.stdout
    finally:
        ensure_crash_automation(api, CRASH_AFTER_S)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert flow_state(api, fr_id)["type"] == "COMPLETED"
    # the attempts sent heartbeats (those queued when a process is killed are lost with it)
    beats = httpx.post(f"{api}/events/filter", json={"limit": 50, "filter": {
        "event": {"name": ["prefect.flow-run.heartbeat"]}, "resource": {"id": [f"prefect.flow-run.{fr_id}"]},
        "order": "ASC"}}).json()["events"]
    times = [datetime.fromisoformat(e["occurred"]) for e in beats]
    gaps = [(b - a).total_seconds() for a, b in zip(times, times[1:])]
    assert len(times) >= 2, gaps

    # Prefect: the dead attempts' task runs closed, finished stages Cached
    states = task_states(api, fr_id)
    assert states["filter"] == ["Crashed", "Completed", "Cached"], states
    assert states["train"] == ["Crashed", "Completed"], states
    for stage in ("collect", "extract"):
        assert states[stage] == ["Completed", "Cached", "Cached"], states
    for stage in ("dedup", "decontaminate", "tokenize"):
        assert states[stage] == ["Completed", "Cached"], states

    # MLflow: nothing left RUNNING; the killed filter ended KILLED; one train run, steps 1..30 once each
    (parent_run,) = parent_runs(client, "killed", fr_id)
    assert parent_run.info.status == "FINISHED"
    runs = stage_runs(client, parent_run.info.run_id)
    assert sorted((r.info.run_name, r.info.status) for r in runs) == sorted(
        [(s, "FINISHED") for s in TRAINED] + [("filter", "KILLED")])
    assert all(r.info.end_time for r in runs)
    (train_run,) = [r for r in runs if r.info.run_name == "train"]
    history = client.get_metric_history(train_run.info.run_id, "loss")
    assert [h.step for h in history] == list(range(1, 31))
    assert train_run.data.tags["ssl_pipeline.resumed_attempts"] == "1" and "resumed_from" in train_run.data.tags
    assert client.get_model_version("killed-gpt", "1").run_id == train_run.info.run_id

    # the outputs are those of an uninterrupted computation: the data stages after the kill, from
    # the run's extract output, and training from the run's token shards
    from ssl_model.config import ModelConfig
    from ssl_model.trainer import TrainSettings, train
    from tasks.config import load_config
    from tasks.decontaminate import decontaminate
    from tasks.dedup import dedup
    from tasks.filter import filter_docs
    from tasks.shards import read_manifest
    from tasks.tokenize import tokenize
    cfg, ref = load_config(str(config)), tmp_path / "ref"
    got = {s: read_manifest(run_dir / s) for s in DATA_STAGES}
    want = filter_docs(cfg.filter, got["extract"], ref / "filter")
    assert want["digest"] == got["filter"]["digest"]
    want = dedup(cfg.dedup, want, ref / "dedup")
    assert want["digest"] == got["dedup"]["digest"]
    want = decontaminate(cfg.decontaminate, want, ref / "decontaminate")
    assert want["digest"] == got["decontaminate"]["digest"]
    want = tokenize(cfg.tokenize, want, ref / "tokenize")
    assert want["digest"] == got["tokenize"]["digest"]
    losses = {}
    done = train(ModelConfig(vocab_size=got["tokenize"]["vocab_size"], **cfg.train.model_shape()),
                 TrainSettings.from_dict(cfg.train.model_dump()), got["tokenize"]["dir"], ref / "ckpt",
                 lambda kind, step, m: losses.update({step: m["loss"]}) if kind == "train" else None)
    assert [h.value for h in history] == [losses[s] for s in range(1, 31)]
    mine = torch.load(run_dir / "train" / "checkpoints" / "step-0000030.pt", weights_only=True)["model"]
    theirs = torch.load(done["checkpoint"], weights_only=True)["model"]
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_a_failure_on_the_temporary_server_says_where_things_are_and_how_to_go_on(tmp_path, servers, refused_url):
    # no PREFECT_API_URL: Prefect's temporary server, gone when the command ends
    mlflow_uri = servers["MLFLOW_TRACKING_URI"]
    proc = run_cli(["run", "--set", f"collect.start_urls=[{refused_url}]", "--set", "collect.retries=0",
                    "--set", "collect.allow_private=[127.0.0.1/32]", "--set", "tracking.experiment=temporary"],
                   {"MLFLOW_TRACKING_URI": mlflow_uri}, tmp_path)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-5000:]
    err = proc.stderr
    lines = err.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("ssl-pipeline: run failed"))
    assert first == 0 or lines[first - 1].strip(), err[-3000:]          # no blank line before it
    tail = "\n".join(lines[first:])
    fr_id = re.search(r"Prefect flow run: ([0-9a-f-]{36})", tail).group(1)
    data = re.search(r"^Data: +(\S+)$", tail, re.M).group(1)
    assert Path(data) == tmp_path / "runs" / fr_id and (Path(data) / "collect").is_dir()
    assert re.search(rf"^MLflow: +{re.escape(mlflow_uri)}$", tail, re.M), tail
    assert "temporary server" in tail and "cannot be retried" in tail
    assert f"Run it again:     ssl-pipeline run --set 'collect.start_urls=[{refused_url}]'" in tail, tail
    assert f"results are kept in {tmp_path / 'runs' / '.results'} come back cached" in tail
    assert "make services" in tail and "PREFECT_API_URL=" in tail and "MLFLOW_TRACKING_URI=" in tail
    assert "ssl-pipeline retry" not in tail and "Open the UIs" not in tail, tail
    # and a retry says why it cannot work here
    retry = run_cli(["retry", fr_id], {"MLFLOW_TRACKING_URI": mlflow_uri}, tmp_path)
    assert retry.returncode == 2 and "PREFECT_API_URL is not set" in retry.stderr, retry.stderr[-2000:]
    assert "Traceback" not in retry.stderr


def test_retry_of_a_run_on_another_machine_goes_by_its_heartbeats(servers, tmp_path):
    """A run recorded on another host cannot be checked from here: a retry goes by its last
    heartbeat, and refuses while the run may still be alive."""
    api = servers["PREFECT_API_URL"]
    flow = httpx.post(f"{api}/flows/", json={"name": "elsewhere"}).json()
    fr = httpx.post(f"{api}/flow_runs/", json={"flow_id": flow["id"], "state": {"type": "RUNNING", "name": "Running"},
                                               "labels": {"ssl_pipeline.host": "gpu-node-7", "ssl_pipeline.pid": "4242",
                                                          "ssl_pipeline.process_start": "x:1"}}).json()
    proc = run_cli(["retry", fr["id"]], servers, tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert re.search(rf"Flow run {fr['id']} .*: Running since", proc.stdout), proc.stdout
    assert "Its process 4242 on gpu-node-7 cannot be checked" in proc.stdout and "last heartbeat: never" in proc.stdout
    assert "may still be running" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert flow_state(api, fr["id"])["type"] == "RUNNING"


# -- kill -9 in every other stage ------------------------------------------------------------------
# The test above kills in filter and train; these kill in collect, extract, dedup and tokenize. A
# minimal training: only the data stages are compared with an uninterrupted run here.
KILLED_IN = ["collect", "extract", "dedup", "tokenize"]
MINIMAL_TRAIN = {"max_steps": 2, "eval_interval": 2, "eval_batches": 1, "checkpoint_interval": 2}


def kill_config(path: Path, experiment: str) -> str:
    return write_config(path, experiment, f"{experiment}-gpt", evaluate=False, **MINIMAL_TRAIN)


def digests(run_dir: Path) -> dict[str, str]:
    """The digests of the data stages: by content for collect to dedup, by file for tokenize
    (its shards hold the documents in doc_id order, whatever order they came in)."""
    from tasks.shards import read_manifest
    return {s: read_manifest(run_dir / s)["digest"] for s in DATA_STAGES}


@pytest.fixture(scope="module")
def uninterrupted(servers, tmp_path_factory) -> dict:
    """One run over the same configuration, not interrupted, in a folder of its own (with its own
    results cache, nothing of it is reused by the runs killed below): its data folder, the digests
    of its data stages."""
    d = tmp_path_factory.mktemp("uninterrupted")
    proc = run_cli(["run", "--config", kill_config(d / "run.yaml", "kill-reference")], servers, d)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (run_dir,) = (d / "runs").glob("*-*-*-*-*")
    return {"data_dir": d / "runs", "digests": digests(run_dir)}


def server_task_states(api: str, fr_id: str) -> dict[str, str]:
    """The latest state type the Prefect server holds for each task of the flow run."""
    runs = httpx.post(f"{api}/task_runs/filter", json={"flow_runs": {"id": {"any_": [fr_id]}}}).json()
    return {r["name"]: r["state"]["type"] for r in sorted(runs, key=lambda r: r["created"]) if r["state"]}


def collect_cached(run_dir: Path) -> bool:
    """collect's result record is in the results cache. Prefect sets a task Completed before its
    transaction writes that record: a kill in between leaves collect to run again on retry."""
    done = str(run_dir / "collect")
    return (run_dir / "collect" / "_manifest.json").exists() and any(
        done in f.read_text(errors="replace") for f in (run_dir.parent / ".results").glob("*") if f.is_file())


def stopped_at_work(run: subprocess.Popen, stage: str, runs: Path, api: str, log: Path) -> Path:
    """Freeze ``run`` (SIGSTOP) while ``stage`` is at work, and once the Prefect server knows it is: the
    stage's temporary output folder exists and its final one does not, its task run is Running on
    the server (and, for extract, collect is Completed there; for collect, extract works beside it).
    dedup and tokenize take well under a second on the test site, less than a task run's state may
    take to reach the server (as events): so the run is stopped as soon as the folder is seen (polled
    every 10 ms), then let go on in 20 ms steps until the server has caught up. The run folder."""
    def working() -> Path | None:
        assert run.poll() is None, log.read_text()[-3000:]
        tmps = list(runs.glob(f"*/.{stage}.tmp-*"))
        run_dir = tmps[0].parent if tmps else None
        if run_dir is None or (run_dir / stage / "_manifest.json").exists():
            return None
        if stage == "extract" and not collect_cached(run_dir):
            return None   # extract follows collect: killed once collect is done and its result kept
        return run_dir
    run_dir = wait_until(working, 300, f"{stage} to be at work", every=0.01)
    want = {stage: "RUNNING", **({"collect": "COMPLETED"} if stage == "extract" else {}),
            **({"extract": "RUNNING"} if stage == "collect" else {})}
    deadline, steps = time.time() + 120, 0
    os.kill(run.pid, signal.SIGSTOP)
    while True:
        held = server_task_states(api, run_dir.name)
        # with collect, extract at work too (its MLflow run started, its folder made), not merely Running
        beside = stage != "collect" or list(run_dir.glob(".extract.tmp-*"))
        if beside and all(held.get(k) == v for k, v in want.items()):
            print(f"{stage}: stopped at work, the server caught up after {steps} steps of 20 ms")
            return run_dir
        # not there yet: a little more time for the run, if the stage is still at work
        assert time.time() < deadline, held
        assert list(run_dir.glob(f".{stage}.tmp-*")) and not (run_dir / stage / "_manifest.json").exists(), \
            f"{stage} ended before the Prefect server knew it ran: {held}"
        os.kill(run.pid, signal.SIGCONT)
        time.sleep(0.02)
        os.kill(run.pid, signal.SIGSTOP)
        steps += 1
        time.sleep(0.05)


@pytest.mark.parametrize("stage", KILLED_IN)
def test_a_run_killed_in_any_stage_is_retried_with_one_command_to_the_uninterrupted_result(
        stage, tmp_path, servers, uninterrupted):
    """SIGKILL `ssl-pipeline run` while ``stage`` runs; one `ssl-pipeline retry` finishes it: the stages
    before come back Cached, the killed one is Crashed then Completed, nothing is left running in
    MLflow, and every data stage's output has the digest of an uninterrupted run."""
    api, client = servers["PREFECT_API_URL"], MlflowClient(servers["MLFLOW_TRACKING_URI"])
    experiment = f"killed-in-{stage}"
    config = kill_config(tmp_path / "run.yaml", experiment)
    log = tmp_path / "run.log"
    run = subprocess.Popen([str(BIN / "ssl-pipeline"), "run", "--config", config], cwd=tmp_path,
                           env=cli_env(servers, tmp_path), stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    try:
        run_dir = stopped_at_work(run, stage, tmp_path / "runs", api, log)
    finally:
        run.kill()      # SIGKILL, delivered to a stopped process too
        run.wait()
    fr_id = run_dir.name
    assert flow_state(api, fr_id)["type"] == "RUNNING"          # Prefect cannot know

    retry = run_cli(["retry", fr_id], servers, tmp_path)
    assert retry.returncode == 0, retry.stdout[-3000:] + retry.stderr[-5000:]
    assert f"Its process {run.pid} on " in retry.stdout and "no longer exists" in retry.stdout, retry.stdout
    assert flow_state(api, fr_id)["type"] == "COMPLETED"

    # Prefect: the killed stage Crashed then Completed (collect's and extract's together: extract
    # follows collect), those before it Cached, those after it run once
    killed = {"collect": ["collect", "extract"]}.get(stage, [stage])
    states = task_states(api, fr_id)
    for i, s in enumerate(TRAINED):
        expected = (["Crashed", "Completed"] if s in killed else ["Completed", "Cached"]
                    if i < TRAINED.index(stage) else ["Completed"])
        assert states[s] == expected, (s, states)

    # MLflow: nothing left RUNNING; the killed stage's run KILLED, every stage FINISHED once
    (parent_run,) = parent_runs(client, experiment, fr_id)
    assert parent_run.info.status == "FINISHED"
    runs = stage_runs(client, parent_run.info.run_id)
    assert sorted((r.info.run_name, r.info.status) for r in runs) == sorted(
        [(s, "FINISHED") for s in TRAINED] + [(s, "KILLED") for s in killed])
    assert all(r.info.end_time for r in runs)
    assert "evaluate" not in states

    # the data: what an uninterrupted run over the same configuration gives
    assert digests(run_dir) == uninterrupted["digests"]
    assert not list(run_dir.glob(".*.tmp-*"))
