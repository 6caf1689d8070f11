"""End to end, as a user runs it: `ssl-pipeline run` against real Prefect and MLflow servers on 127.0.0.1."""

from __future__ import annotations

import contextlib
import http.server
import json
import math
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import mlflow
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.browser import descendants, stop_process_tree, wait_until
from tests.conftest import BIN, ROOT, TEST_MODULES, cli_env, run_cli

STAGES = ["collect", "extract", "filter", "dedup", "decontaminate", "tokenize", "train", "evaluate"]
DATA_STAGES = STAGES[:STAGES.index("train")]   # collect to tokenize
TRAINED = STAGES[:STAGES.index("train") + 1]   # a run with the evaluate stage off
SMALL_TRAIN = {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64, "batch_size": 8, "max_steps": 60,
               "lr": 3e-3, "warmup_steps": 5, "eval_interval": 20, "eval_batches": 4,
               "checkpoint_interval": 30, "threads": 2}

pytestmark = pytest.mark.e2e


def write_config(path, experiment: str, model: str, untrained: bool = False, evaluate: bool = True,
                 **train) -> str:
    """The shipped demo profile, on a smaller slice of the pydoc site and a tiny model; the untrained
    reference model is scored only where a test asks (``untrained``), the evaluate stage runs unless a
    test checks nothing of it (``evaluate``: test time)."""
    cfg = yaml.safe_load((ROOT / "flows/profiles/demo.yaml").read_text())
    cfg["collect"]["pydoc_modules"] = list(TEST_MODULES)
    cfg["tokenize"] = {"vocab_size": 1024}
    cfg["train"] = {**SMALL_TRAIN, **train}
    cfg["tracking"] = {"experiment": experiment, "registered_model": model}
    cfg["evaluate"] = {"max_items": 40, "untrained": untrained, "enabled": evaluate}   # cheap in the many runs the tests start
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def flow_run_id(output: str) -> str:
    return re.search(r"flow[- ]run[:/ ]+(?:.*/flow-run/)?([0-9a-f-]{36})", output).group(1)


def stage_runs(client: MlflowClient, parent_id: str) -> list:
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent_id}'")


def parent_runs(client: MlflowClient, experiment: str, fr_id: str) -> list:
    exp = client.get_experiment_by_name(experiment).experiment_id
    return client.search_runs([exp], f"tags.`prefect.flow_run_id` = '{fr_id}' and tags.`mlflow.parentRunId` IS NULL")


FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}   # state types of a run that is over


def deployment_run(prefect: list[str], config, env: dict) -> str:
    """A run of ``ssl-pipeline/nightly`` on ``config``, created as its schedule would (Scheduled); its id."""
    proc = subprocess.run([*prefect, "deployment", "run", "ssl-pipeline/nightly", "--param", f"config_path={config}"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return re.search(r"UUID: ([0-9a-f-]{36})", proc.stdout).group(1)


def wait_flow_run(api_url: str, fr_id: str, get=httpx.get, timeout: float = 600) -> dict:
    """The flow run's state once it is over (or when ``timeout`` is up)."""
    deadline = time.time() + timeout
    while (state := get(f"{api_url}/flow_runs/{fr_id}").json()["state"])["type"] not in FINAL \
            and time.time() < deadline:
        time.sleep(2)
    return state


def runs_exited(workers: list[subprocess.Popen], timeout: float = 60) -> None:
    """Wait until no process is left below the workers: a flow run's process exits once its run is
    over. (A worker told to stop waits for the runs it started; SIGTERM it sooner, while a finished
    run's process is still exiting, and it may never stop.)"""
    def left() -> list[str]:
        out = []
        for pid, _ in (p for w in workers for p in descendants(w.pid)):
            with contextlib.suppress(OSError):   # it may exit meanwhile
                out.append(Path(f"/proc/{pid}/cmdline").read_text(errors="replace").replace("\0", " ")[:200])
        return out
    wait_until(lambda: not left(), timeout, "the flow-run processes to exit", every=0.5,
               describe=lambda: "\n".join(left()))


def stop_workers(workers: list[subprocess.Popen]) -> None:
    """Stop Prefect workers as a supervisor would: SIGTERM, SIGKILL after 30 s. A worker turns
    SIGTERM into a SIGINT to itself, which it sometimes swallows (seen in two fresh-clone suite
    runs: its loop idle, polling on)."""
    for w in workers:
        stop_process_tree(w, grace=30)


def task_states(api_url: str, fr_id: str, timeout: float = 60) -> dict[str, list[str]]:
    """State names of every task run of a flow run, per task name, oldest first.

    Task-run states reach the server as events, a moment after the flow run's own state: wait
    until two reads 2 s apart agree, find at least one task run, and every state is final."""
    before, deadline = None, time.time() + timeout
    while True:
        runs = httpx.post(f"{api_url}/task_runs/filter", json={"flow_runs": {"id": {"any_": [fr_id]}}}).json()
        out: dict[str, list[str]] = {}
        for r in sorted(runs, key=lambda r: r["created"]):
            out.setdefault(r["name"], []).append(r["state"]["name"])
        settled = runs and all(r["state"]["type"] in FINAL for r in runs)
        if (settled and out == before) or time.time() > deadline:
            return out
        before = out if settled else None
        time.sleep(2)


def test_pipeline_end_to_end_is_tracked_and_the_registered_model_scores(tmp_path, servers):
    config = write_config(tmp_path / "run.yaml", "e2e", "e2e-gpt", untrained=True)
    proc = run_cli(["run", "--config", config], servers, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "Model:" in proc.stdout and "MLflow run:" in proc.stdout and "Prefect flow run:" in proc.stdout
    fr_id = flow_run_id(proc.stdout)
    assert "?workflowType=machine_learning" in proc.stdout   # the printed link opens MLflow's model-training view

    client = MlflowClient(servers["MLFLOW_TRACKING_URI"])
    assert client.get_experiment_by_name("e2e").tags["mlflow.experimentKind"] == "custom_model_development"
    parents = parent_runs(client, "e2e", fr_id)
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["train.max_steps"] == "60"
    assert parent.data.params["filter.gopher_quality.min_doc_words"] == "50"
    runs = {r.info.run_name: r for r in stage_runs(client, parent.info.run_id)}
    assert sorted(runs) == sorted(STAGES)
    assert all(r.info.status == "FINISHED" for r in runs.values())

    # counts per stage, chained: what one stage keeps is what the next one reads
    for prev, stage in zip(DATA_STAGES, DATA_STAGES[1:]):
        assert runs[stage].data.metrics["docs_in"] == runs[prev].data.metrics["docs_out"]
    m = runs["collect"].data.metrics
    assert m["docs_out"] == len(TEST_MODULES) + 1 and m["dropped.http_404"] > 0 and m["bytes_out"] > 0
    assert m["links_beyond_max_pages"] == 0 and "dropped.crawl_trap" not in m   # the whole site, no trap
    f = runs["filter"].data.metrics
    assert f["docs_out"] + sum(v for k, v in f.items() if k.startswith("dropped.")) == f["docs_in"]
    assert "seconds" in f
    d = runs["decontaminate"].data.metrics   # the evaluation documents set aside, the rest checked against them
    assert d["heldout_docs"] >= 2 and d["dropped.held_out"] == d["heldout_docs"] and d["eval_ngrams"] > 0

    # datasets: each stage logs its input and its output, with digests
    for stage in STAGES:
        inputs = runs[stage].inputs.dataset_inputs
        contexts = {next(t.value for t in d.tags if t.key == "mlflow.data.context") for d in inputs}
        assert "output" in contexts and (stage == "collect" or "input" in contexts)
        for d in inputs:
            assert 0 < len(d.dataset.digest) <= 36 and d.dataset.source
    sources = [d.dataset for d in runs["collect"].inputs.dataset_inputs
               if any(t.value == "source" for t in d.tags)]
    assert [s.name for s in sources] == ["http://pydoc.localhost/"]   # the crawled site, whatever its port
    train_inputs = {d.dataset.name for d in runs["train"].inputs.dataset_inputs}
    assert "tokenize" in train_inputs

    # training metrics by step
    history = client.get_metric_history(runs["train"].info.run_id, "loss")
    assert [h.step for h in history] == list(range(1, 61))
    for key in ("lr", "tokens_per_s", "val_loss", "val_perplexity", "peak_memory_mb", "grad_norm"):
        assert client.get_metric_history(runs["train"].info.run_id, key)
    val = client.get_metric_history(runs["train"].info.run_id, "val_loss")
    assert val[-1].value < val[0].value

    # artifacts
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"config", "funnel.md", "funnel.json"}
    assert "tokenizer.json" in {a.path for a in client.list_artifacts(runs["tokenize"].info.run_id)}
    assert client.list_artifacts(runs["train"].info.run_id, "checkpoints")
    assert {"hf_model/config.json", "hf_model/model.safetensors", "hf_model/tokenizer.json"} <= \
        {a.path for a in client.list_artifacts(runs["train"].info.run_id, "hf_model")}
    samples = client.list_artifacts(runs["train"].info.run_id, "samples")
    assert [a.path for a in samples][-1] == "samples/step-0000060.txt"

    # the registered model leads to the train run, loads, and scores validation text below ln(vocab)
    version = client.get_model_version("e2e-gpt", "1")
    assert version.run_id == runs["train"].info.run_id
    mlflow.set_tracking_uri(servers["MLFLOW_TRACKING_URI"])
    model = mlflow.pyfunc.load_model("models:/e2e-gpt/1")
    manifests = {s: json.loads(open(client.download_artifacts(runs[s].info.run_id, "manifest.json",
                                                              str(tmp_path / s))).read()) for s in DATA_STAGES}
    tok_dir, dedup_dir = manifests["tokenize"]["dir"], manifests["dedup"]["dir"]
    val_ids = set(pq.read_table(f"{tok_dir}/val.idx.parquet")["doc_id"].to_pylist())
    texts = [r["text"] for r in pq.read_table(dedup_dir).to_pylist() if r["doc_id"] in val_ids]
    scores = model.predict(pd.DataFrame({"text": texts}))
    mean_loss = (scores["loss"] * scores["tokens"]).sum() / scores["tokens"].sum()
    assert mean_loss < math.log(1024) - 0.5

    # the registered version says what it was trained on (its evaluation is added below)
    tok = manifests["tokenize"]
    tags = version.tags
    assert tags["data.sha256"] == tok["digest"] and tags["tokenizer.vocab_size"] == "1024"
    assert tags["tokenizer.sha256"] == next(f["sha256"] for f in tok["files"] if f["path"] == "tokenizer.json")
    assert tags["train.objective"] == "causal" and tags["pipeline.mlflow_run_id"] == parent.info.run_id
    assert float(tags["train.tokens"]) == runs["train"].data.metrics["train_tokens_seen"] > 0
    assert tags["data.train_tokens"] == str(tok["train_tokens"]) and tags["pipeline.prefect_flow_run_id"] == fr_id
    trained, evaluated = version.description.split("\n\n")
    assert trained.startswith(f"Trained in MLflow run {version.run_id} (pipeline run {parent.info.run_id})")
    assert tok["digest"] in trained and f"{int(tags['train.tokens']):,} tokens" in trained
    assert evaluated.startswith(f"Evaluated (MLflow run {runs['evaluate'].info.run_id}): ")

    # Prefect: the funnel as a table artifact, and as a report whose numbers are the manifests'
    arts = httpx.post(f"{servers['PREFECT_API_URL']}/artifacts/filter",
                      json={"artifacts": {"key": {"any_": ["funnel", "funnel-report"]}}}).json()
    assert any(a["flow_run_id"] == fr_id and a["type"] == "table" and a["key"] == "funnel" for a in arts)
    (report,) = [a["data"] for a in arts if a["flow_run_id"] == fr_id and a["key"] == "funnel-report"
                 and a["type"] == "markdown"]
    for stage in DATA_STAGES:
        m = manifests[stage]
        assert f"| {stage} | {m.get('input_rows', m['rows'] + m['dropped'])} | {m['rows']} | {m['dropped']} |" in report
        assert all(f"| {stage} | `{r}` | {n} |" in report for r, n in m["reasons"].items()), (stage, report)
    assert f"/runs/{parent.info.run_id}?workflowType=machine_learning)" in report
    # MLflow: the funnel as a picture on the pipeline's run
    png = Path(client.download_artifacts(parent.info.run_id, "funnel.png", str(tmp_path))).read_bytes()
    width, height = struct.unpack(">II", png[16:24])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and 10_000 < len(png) < 1_000_000 and 500 < width < 3000 and 300 < height < 3000

    # evaluate: lm-eval's scores with their standard errors, on the registered model's page too
    assert "Evaluation (lm-evaluation-harness" in proc.stdout and "ssl_heldout_bpb" in proc.stdout
    ev = runs["evaluate"]
    bpb = ev.data.metrics["ssl_heldout_bpb.bits_per_byte"]
    assert 0 < bpb < ev.data.metrics["untrained.ssl_heldout_bpb.bits_per_byte"] - 0.5
    for key in ("ssl_heldout_bpb.bits_per_byte_stderr", "ssl_continuation.acc", "ssl_continuation.acc_stderr",
                "ssl_continuation.acc_norm_stderr", "ssl_cloze.acc", "untrained.ssl_continuation.acc"):
        assert key in ev.data.metrics, key
    arts = {a.path for a in client.list_artifacts(ev.info.run_id)}
    assert {"suite", "lm_eval_results", "samples", "scores.png", "scores.txt", "report.json"} <= arts, arts
    assert {"suite/ssl_cloze.yaml", "suite/ssl_cloze.jsonl"} <= {a.path for a in client.list_artifacts(ev.info.run_id, "suite")}
    tags = client.get_model_version("e2e-gpt", "1").tags
    assert tags["eval.suite_sha256"] == ev.data.tags["ssl_pipeline.eval_suite_sha256"] and \
        tags["eval.ssl_heldout_bpb.bits_per_byte"].startswith(f"{bpb:.4f} ± ")
    assert "ssl_heldout_bpb.bits_per_byte" in client.get_model_version("e2e-gpt", "1").description.split("\n\n")[1]
    arts = httpx.post(f"{servers['PREFECT_API_URL']}/artifacts/filter",
                      json={"artifacts": {"key": {"any_": ["evaluation"]}}}).json()
    assert any(a["flow_run_id"] == fr_id and a["type"] == "table" for a in arts)
    lineage = run_cli(["lineage", "models:/e2e-gpt/1"], servers, tmp_path)
    assert lineage.returncode == 0 and "suite sha256 " + tags["eval.suite_sha256"] in lineage.stdout, lineage.stdout
    # the same model scored again on demand, by its registered name: the same suite, the same numbers
    again = run_cli(["evaluate", "models:/e2e-gpt/latest", "--json"], servers, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    scored = json.loads(again.stdout)
    assert scored["suite"]["digest"] == tags["eval.suite_sha256"]
    assert scored["models"]["model"]["scores"]["ssl_heldout_bpb"]["bits_per_byte"]["value"] == pytest.approx(bpb, rel=1e-6)

    # a contrastive model on the registered causal one's weights (SimCSE starts from a pretrained
    # encoder): the data stages come back cached, train starts from what models:/e2e-gpt/latest is
    simcse = run_cli(["run", "--config", config, "--set", "train.init_from=models:/e2e-gpt/latest",
                      "--set", "train.objective=contrastive", "--set", "train.dropout=0.1",
                      "--set", "train.max_steps=10", "--set", "tracking.registered_model=e2e-simcse"], servers, tmp_path)
    assert simcse.returncode == 0, simcse.stdout[-3000:] + simcse.stderr[-5000:]
    states = task_states(servers["PREFECT_API_URL"], flow_run_id(simcse.stdout))
    assert states == {**{s: ["Cached"] for s in DATA_STAGES}, "train": ["Completed"], "evaluate": ["Completed"]}, states
    trained = client.get_run(client.get_model_version("e2e-simcse", "1").run_id)
    assert trained.data.tags["ssl_pipeline.init_from"] == "models:/e2e-gpt/1"
    assert client.get_model_version("e2e-simcse", "1").tags["train.init_from"] == "models:/e2e-gpt/1"
    asked = client.get_run(trained.data.tags["mlflow.parentRunId"]).data.params
    assert asked["train.init_from"] == "models:/e2e-gpt/latest" and asked["train.objective"] == "contrastive"
    assert "final_val_retrieval_accuracy" in trained.data.metrics
    probe = client.get_run(client.get_run(trained.data.tags["mlflow.parentRunId"]).data.tags[
        "ssl_pipeline.evaluate.mlflow_run_id"]).data.metrics   # an encoder: the transfer probe
    assert {"probe.probe_accuracy", "probe.majority_accuracy", "probe.tfidf_accuracy",
            "untrained.probe.probe_accuracy"} <= set(probe), probe
    assert re.search(r"Done: val retrieval accuracy [0-9.]+ \(chance [0-9.]+\), InfoNCE [0-9.]+", simcse.stdout)
    lineage = run_cli(["lineage", "models:/e2e-simcse/1"], servers, tmp_path)
    assert lineage.returncode == 0, lineage.stderr[-3000:]
    assert "started from models:/e2e-gpt/1" in lineage.stdout, lineage.stdout


class Receiver(http.server.ThreadingHTTPServer):
    """A webhook receiver on 127.0.0.1 that keeps the JSON bodies it is sent."""

    def __init__(self):
        self.bodies: list[dict] = []
        received = self.bodies

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_a_run_with_a_preset_registers_a_model_of_the_presets_shape(tmp_path, servers):
    """Issue 19: `--set train.preset=...` was shown by `ssl-pipeline config` and ignored by the
    train stage, which trained the default shape. Preset `test` (2 layers x 64, 2 heads, T=64)
    differs from the defaults (4 x 256, 4 heads, T=256) in every key it sets; 2 steps are enough."""
    from ssl_model.checkpoint import load_checkpoint
    from ssl_model.config import PRESETS
    from tasks.config import PRESET_KEYS
    config = tmp_path / "run.yaml"
    write_config(config, "preset", "preset-gpt", max_steps=2, warmup_steps=1, eval_interval=2, eval_batches=1,
                 checkpoint_interval=2, sample_tokens=0, export_hf=False)
    cfg = yaml.safe_load(config.read_text())
    cfg["train"] = {k: v for k, v in cfg["train"].items() if k not in PRESET_KEYS}   # the shape: the preset's alone
    config.write_text(yaml.safe_dump(cfg))
    proc = run_cli(["run", "--config", str(config), "--set", "train.preset=test"], servers, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    mlflow.set_tracking_uri(servers["MLFLOW_TRACKING_URI"])
    registered = Path(mlflow.artifacts.download_artifacts("models:/preset-gpt/1", dst_path=str(tmp_path / "model")))
    (checkpoint,) = registered.rglob("step-*.pt")
    trained = load_checkpoint(checkpoint)["model_config"]
    assert {k: trained[k] for k in PRESETS["test"]} == PRESETS["test"]
    params = MlflowClient(servers["MLFLOW_TRACKING_URI"]).get_run(
        parent_runs(MlflowClient(servers["MLFLOW_TRACKING_URI"]), "preset", flow_run_id(proc.stdout))[0].info.run_id
    ).data.params   # the parameters logged say so too
    assert {k: params[f"train.{k}"] for k in PRESETS["test"]} == {k: str(v) for k, v in PRESETS["test"].items()}


def test_runs_starting_together_share_one_new_experiment(servers, monkeypatch):
    """Two scheduled runs of a new experiment may both find it missing and both create it (seen
    with two deployment runs started at once): every caller gets the one experiment, none fails."""
    from concurrent.futures import ThreadPoolExecutor

    from tasks import tracking
    monkeypatch.setenv("MLFLOW_TRACKING_URI", servers["MLFLOW_TRACKING_URI"])
    start = threading.Barrier(8)

    def together(name: str) -> str:
        start.wait()
        return tracking.experiment_id(name)

    with ThreadPoolExecutor(8) as pool:
        for i in range(5):
            name = f"race-{i}-{time.time_ns()}"
            ids = list(pool.map(together, [name] * 8))
            assert ids == [MlflowClient(servers["MLFLOW_TRACKING_URI"]).get_experiment_by_name(name).experiment_id] * 8


def test_experiments_are_of_the_model_training_kind_unless_someone_chose_another(servers, monkeypatch):
    """MLflow's UI takes an experiment without a kind for a GenAI one: the pipeline's are model
    training, and an existing one gets the kind unless it has one."""
    from tasks import tracking
    monkeypatch.setenv("MLFLOW_TRACKING_URI", servers["MLFLOW_TRACKING_URI"])
    client, kind, t = MlflowClient(servers["MLFLOW_TRACKING_URI"]), "mlflow.experimentKind", time.time_ns()
    old = client.create_experiment(f"untagged-{t}")
    chosen = client.create_experiment(f"chosen-{t}", tags={kind: "finetuning"})
    for name in (f"new-{t}", f"untagged-{t}", f"chosen-{t}"):
        tracking.experiment_id(name)
    assert client.get_experiment_by_name(f"new-{t}").tags[kind] == "custom_model_development"
    assert client.get_experiment(old).tags[kind] == "custom_model_development"
    assert client.get_experiment(chosen).tags[kind] == "finetuning"


def test_a_dataset_logged_by_two_stages_at_once_is_linked_to_both(servers, stages, monkeypatch):
    """An extract following its collect can end with it: collect logs its dataset as output while
    extract logs it as input, both find it new, and the server refuses one of the two inserts (seen
    as a failed extract). Both stage runs get it, every time."""
    from concurrent.futures import ThreadPoolExecutor

    from tasks import tracking
    monkeypatch.setenv("MLFLOW_TRACKING_URI", servers["MLFLOW_TRACKING_URI"])
    client = MlflowClient(servers["MLFLOW_TRACKING_URI"])
    collect, extract = stages["collect"], stages["extract"]
    start = threading.Barrier(2)

    def log(run_id: str, stage: str) -> None:
        start.wait()
        tracking.log_stage(run_id, stage, stages[stage], [collect] if stage == "extract" else [])

    with ThreadPoolExecutor(2) as pool:
        for i in range(20):   # a dataset is new once per experiment
            exp = tracking.experiment_id(f"datasets-race-{i}-{time.time_ns()}")
            runs = {stage: client.create_run(exp).info.run_id for stage in ("collect", "extract")}
            list(pool.map(log, runs.values(), runs.keys()))    # re-raises what either call raised
            for stage, run_id in runs.items():
                logged = {(d.dataset.name, d.dataset.digest) for d in client.get_run(run_id).inputs.dataset_inputs}
                assert ("collect", collect["digest"][:36]) in logged, (i, stage, logged)
            assert ("extract", extract["digest"][:36]) in logged


def test_retry_after_a_failed_train_reuses_the_finished_stages(tmp_path, servers):
    config = tmp_path / "run.yaml"
    receiver = Receiver()
    write_config(config, "retry", "retry-gpt", device="cuda:99")   # a mistake the user will fix
    cfg = yaml.safe_load(config.read_text())
    cfg["notify"] = {"webhook_url": f"http://127.0.0.1:{receiver.server_port}/hook"}
    config.write_text(yaml.safe_dump(cfg))
    first = run_cli(["run", "--config", str(config)], servers, tmp_path)
    receiver.shutdown()
    assert first.returncode == 1
    assert "cuda:99" in first.stderr and "ssl-pipeline retry" in first.stderr
    fr_id = flow_run_id(first.stderr)
    states = task_states(servers["PREFECT_API_URL"], fr_id)
    assert states["train"] == ["Failed"] and states["tokenize"] == ["Completed"]
    (notice,) = receiver.bodies                                       # the failure notice, once
    assert notice["flow_run_id"] == fr_id and notice["stage"] == "train" and "cuda:99" in notice["error"]
    assert notice["prefect_flow_run_url"] == servers["PREFECT_API_URL"].removesuffix("/api") + f"/runs/flow-run/{fr_id}"
    assert parent_runs(MlflowClient(servers["MLFLOW_TRACKING_URI"]), "retry", fr_id)[0].info.run_id \
        in notice["mlflow_run_url"]

    cfg["train"]["device"] = "cpu"                                    # fixed; the flow reads it on retry
    config.write_text(yaml.safe_dump(cfg))
    retry = run_cli(["retry", fr_id], servers, tmp_path)
    assert retry.returncode == 0, retry.stdout[-3000:] + retry.stderr[-5000:]
    states = task_states(servers["PREFECT_API_URL"], fr_id)
    for stage in DATA_STAGES:
        assert states[stage] == ["Completed", "Cached"], (stage, states)
    assert states["train"] == ["Failed", "Completed"] and states["evaluate"] == ["Completed"]
    flow = httpx.get(f"{servers['PREFECT_API_URL']}/flow_runs/{fr_id}").json()
    assert flow["state"]["type"] == "COMPLETED"

    client = MlflowClient(servers["MLFLOW_TRACKING_URI"])
    parents = parent_runs(client, "retry", fr_id)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"   # reused, not duplicated
    names = sorted((r.info.run_name, r.info.status) for r in stage_runs(client, parents[0].info.run_id))
    assert names == sorted([(s, "FINISHED") for s in STAGES] + [("train", "FAILED")])
    assert parents[0].data.tags["ssl_pipeline.config_changed_on_retry"] == "train.device"

    # the next run over the same sources and config: every stage reused, by content
    again = run_cli(["run", "--config", str(config)], servers, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    again_id = flow_run_id(again.stdout + again.stderr)
    assert task_states(servers["PREFECT_API_URL"], again_id) == {s: ["Cached"] for s in STAGES}
    lineage = parent_runs(client, "retry", again_id)[0].data.tags
    assert lineage["ssl_pipeline.train.mlflow_run_id"] == parents[0].data.tags["ssl_pipeline.train.mlflow_run_id"]
    assert lineage["ssl_pipeline.model_uri"] == parents[0].data.tags["ssl_pipeline.model_uri"]

    # a changed filter threshold: filter and what comes after it run again, collect and extract do not
    changed = run_cli(["run", "--config", str(config), "--set", "filter.gopher_quality.min_doc_words=150"],
                      servers, tmp_path)
    assert changed.returncode == 0, changed.stderr[-3000:]
    states = task_states(servers["PREFECT_API_URL"], flow_run_id(changed.stdout + changed.stderr))
    assert states == {**{s: ["Cached"] for s in STAGES[:2]}, **{s: ["Completed"] for s in STAGES[2:]}}


def test_a_run_terminated_while_training_sends_its_failure_notice(tmp_path, servers):
    """SIGTERM (a worker cancelling it, a node draining) while train runs: the run is marked over in
    Prefect and MLflow and the webhook still hears which stage it was in."""
    receiver = Receiver()
    config = tmp_path / "run.yaml"
    write_config(config, "sigterm", "sigterm-gpt", max_steps=100_000, checkpoint_interval=100_000)
    cfg = yaml.safe_load(config.read_text())
    cfg["notify"] = {"webhook_url": f"http://127.0.0.1:{receiver.server_port}/hook"}
    config.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([str(BIN / "ssl-pipeline"), "run", "--config", str(config)], cwd=tmp_path,
                            env=cli_env(servers, tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = MlflowClient(servers["MLFLOW_TRACKING_URI"])

    def training() -> bool:
        assert proc.poll() is None, "the run ended before training started"
        exp = client.get_experiment_by_name("sigterm")
        runs = client.search_runs([exp.experiment_id], "tags.`ssl_pipeline.stage` = 'train'") if exp else []
        return bool(runs) and "loss" in client.get_run(runs[0].info.run_id).data.metrics
    try:
        wait_until(training, 300, "training to be under way")
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
        receiver.shutdown()
    (notice,) = receiver.bodies
    assert notice["stage"] == "train" and "Termination" in notice["error"], notice
    parent = parent_runs(client, "sigterm", notice["flow_run_id"])[0]
    assert parent.info.status == "FAILED"
    flow = httpx.get(f"{servers['PREFECT_API_URL']}/flow_runs/{notice['flow_run_id']}").json()
    assert flow["state"]["type"] in ("CRASHED", "FAILED", "CANCELLED"), flow["state"]


def test_stage_results_on_s3_are_reused_by_the_next_run(tmp_path):
    # moto's S3 server on 127.0.0.1, inside a namespace with only loopback (tests/s3_results.py)
    out = tmp_path / "s3.json"
    proc = subprocess.run(["unshare", "-n", sys.executable, "-m", "tests.s3_results", str(tmp_path), str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    first, second = json.loads(out.read_text())["runs"]
    assert first["rc"] == 0 and first["states"] == {s: "Completed" for s in TRAINED}, first["tail"]
    assert second["rc"] == 0 and second["states"] == {s: "Cached" for s in TRAINED}, second["tail"]
    assert not (tmp_path / "runs" / ".results").exists()           # the manifests went to the bucket
    assert len(json.loads(out.read_text())["objects"]) >= len(TRAINED)


def test_a_corpus_with_nothing_to_evaluate_on_stops_before_training(tmp_path, servers):
    """No held-out documents and no evaluation sources: a run stops after decontaminate, saying why,
    rather than training a model its evaluate stage cannot score; a data-only run of that corpus
    is fine, and training on it is refused before any work."""
    config = write_config(tmp_path / "run.yaml", "no-suite", "no-suite-gpt")
    none_out = ["--set", "decontaminate.heldout_fraction=0"]
    data = run_cli(["run", "--config", config, "--until", "tokenize", *none_out], servers, tmp_path)
    assert data.returncode == 0, data.stdout[-3000:] + data.stderr[-5000:]
    (run_dir,) = (tmp_path / "runs").glob("*-*-*-*-*")
    train = run_cli(["run", "--config", config, "--from", "train", "--data", run_dir.name, *none_out], servers, tmp_path)
    assert train.returncode == 2 and "0 evaluation document(s)" in train.stderr, train.stdout[-3000:] + train.stderr
    full = run_cli(["run", "--config", config, *none_out], servers, tmp_path)
    assert full.returncode == 1, full.stdout[-3000:] + full.stderr[-5000:]
    assert "decontaminate: 0 evaluation document(s)" in full.stderr and "Nothing was trained" in full.stderr, \
        full.stderr[-5000:]
    assert "Traceback" not in full.stdout + full.stderr, full.stderr[-5000:]
    states = task_states(servers["PREFECT_API_URL"], flow_run_id(full.stdout + full.stderr))
    assert "decontaminate" in states and "tokenize" not in states and "train" not in states, states
    assert not list((tmp_path / "runs").glob("*/train"))


def test_unreachable_start_url_stops_with_one_clear_message(tmp_path, servers, refused_url):
    # no PREFECT_API_URL: the flow runs on Prefect's temporary local server
    proc = run_cli(["run", "--set", f"collect.start_urls=[{refused_url}]", "--set", "collect.retries=0",
                    "--set", "collect.allow_private=[127.0.0.1/32]",
                    "--set", "tracking.experiment=bad-input"],
                   {"MLFLOW_TRACKING_URI": servers["MLFLOW_TRACKING_URI"]}, tmp_path)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "collect: 0 documents left" in proc.stderr and "connect_error=1" in proc.stderr, proc.stderr[-5000:]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout[-3000:] + proc.stderr[-8000:]
    assert list((tmp_path / "runs").glob("*/collect/dropped/part-00000.parquet"))  # what was written stays
    client = MlflowClient(servers["MLFLOW_TRACKING_URI"])
    (parent,) = client.search_runs([client.get_experiment_by_name("bad-input").experiment_id],
                                   "tags.`ssl_pipeline.stopped_at` = 'collect'")
    assert {"funnel.png", "funnel.md"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_deployments_run_the_pipeline_on_its_pool_and_training_on_the_gpu_pool(tmp_path, servers):
    env = {**os.environ, **servers, "SSL_PIPELINE_DIR": str(ROOT), "PREFECT_HOME": str(tmp_path / ".prefect"),
           "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    prefect = [str(BIN / "prefect"), "--no-prompt"]
    for cmd in (["work-pool", "create", "ssl-pipeline", "--type", "process", "--overwrite"],
                ["work-pool", "create", "ssl-train-gpu", "--type", "process", "--overwrite"],
                ["deploy", "--prefect-file", "deployments/prefect.yaml", "--all"]):
        proc = subprocess.run(prefect + cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    api = servers["PREFECT_API_URL"]
    dep = httpx.get(f"{api}/deployments/name/ssl-pipeline/nightly").json()
    assert dep["entrypoint"] == "flows/pipeline.py:pipeline" and dep["work_pool_name"] == "ssl-pipeline"
    assert dep["parameters"] == {"config_path": "flows/profiles/demo.yaml",
                                 "overrides": ["runner.train_deployment=ssl-train/gpu"]}
    assert [s["schedule"]["cron"] for s in dep["schedules"]] == ["0 3 * * *"]
    train_dep = httpx.get(f"{api}/deployments/name/ssl-train/gpu").json()
    assert train_dep["work_pool_name"] == "ssl-train-gpu"

    # a scheduled run of the nightly deployment, on a small config, picked up by real workers
    config = tmp_path / "run.yaml"
    write_config(config, "deployed", "deployed-gpt", evaluate=False)
    cfg = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**cfg, "data_dir": str(tmp_path / "runs")}))
    workers = [subprocess.Popen(prefect + ["worker", "start", "--pool", pool], cwd=ROOT, env=env,
                                stdout=open(tmp_path / f"{pool}.log", "wb"), stderr=subprocess.STDOUT,
                                start_new_session=True) for pool in ("ssl-pipeline", "ssl-train-gpu")]
    try:
        fr_id = deployment_run(prefect, config, env)
        assert httpx.get(f"{api}/flow_runs/{fr_id}").json()["state"]["type"] == "SCHEDULED"
        state = wait_flow_run(api, fr_id)
        runs_exited(workers)
    finally:
        stop_workers(workers)
    logs = {p: (tmp_path / f"{p}.log").read_text(errors="replace")[-3000:] for p in ("ssl-pipeline", "ssl-train-gpu")}
    assert state["type"] == "COMPLETED", (state, logs)
    children = httpx.post(f"{api}/flow_runs/filter", json={"flow_runs": {"parent_flow_run_id": {"any_": [fr_id]}}}
                          ).json()
    assert [(c["deployment_id"], c["work_pool_name"], c["state"]["type"]) for c in children] == \
        [(train_dep["id"], "ssl-train-gpu", "COMPLETED")]
    parent_name = httpx.get(f"{api}/flow_runs/{fr_id}").json()["name"]
    assert children[0]["name"] == f"{parent_name}-train"   # which pipeline run a training on the pool is for
    # training ran in the child only; the parent holds the run_deployment call that links them
    link = httpx.get(f"{api}/task_runs/{children[0]['parent_task_run_id']}").json()
    assert link["flow_run_id"] == fr_id
    assert set(task_states(api, fr_id)) == set(DATA_STAGES) | {link["name"]}
    assert task_states(api, children[0]["id"]) == {"train": ["Completed"]}
    client = MlflowClient(servers["MLFLOW_TRACKING_URI"])
    (parent,) = parent_runs(client, "deployed", fr_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["ssl_pipeline.model_uri"] == "models:/deployed-gpt/1"
    # the server's scheduler keeps the cron live: it has put the coming 03:00 UTC nights on the calendar
    runs = httpx.post(f"{api}/flow_runs/filter", json={"flow_runs": {"deployment_id": {"any_": [dep["id"]]}}}).json()
    nights = [r for r in runs if r["auto_scheduled"]]
    assert nights and all(r["state"]["type"] == "SCHEDULED" and r["parameters"] == dep["parameters"]
                          and r["expected_start_time"][11:19] == "03:00:00" for r in nights), runs
