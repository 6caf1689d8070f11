"""Data runs, as a user runs them against real Prefect and MLflow servers: `ssl-pipeline run --until
tokenize` curates data and stops; `export-corpus` writes it for Hugging Face `datasets`; `run --from
train --data RUN` trains on it without running a data stage, and the model's lineage still leads
back to that run's stages. One data run serves every test."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import httpx
import pytest
import yaml
from mlflow.tracking import MlflowClient

from flows.cli import build_parser
from tasks.shards import read_manifest, read_table
from tests.conftest import run_cli
from tests.test_e2e import DATA_STAGES, flow_run_id, parent_runs, stage_runs, task_states, write_config

pytestmark = pytest.mark.e2e
EXPERIMENT, MODEL = "data-runs", "data-runs-gpt"
MINIMAL_TRAIN = {"max_steps": 2, "eval_interval": 2, "eval_batches": 1, "checkpoint_interval": 2,
                 "sample_tokens": 0, "export_hf": False}
LOAD = """import json, sys
from datasets import load_dataset
ds = load_dataset(sys.argv[1], split="train")
print(json.dumps({"num_rows": ds.num_rows, "columns": ds.column_names, "doc_ids": list(ds["doc_id"]),
                  "first": {k: str(v) for k, v in ds[0].items() if k != "text"}}))
"""


@pytest.fixture(scope="module")
def data_run(tmp_path_factory, servers) -> dict:
    """One run stopped after tokenize, and what it left: its MLflow run and its stages' manifests."""
    cwd = tmp_path_factory.mktemp("data-runs")
    config = write_config(cwd / "run.yaml", EXPERIMENT, MODEL, **MINIMAL_TRAIN)
    proc = run_cli(["run", "--config", config, "--until", "tokenize"], servers, cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    fr_id = flow_run_id(proc.stdout)
    client = MlflowClient(servers["MLFLOW_TRACKING_URI"])
    (parent,) = parent_runs(client, EXPERIMENT, fr_id)
    return {"cwd": cwd, "config": config, "env": servers, "proc": proc, "fr_id": fr_id, "client": client,
            "parent": parent, "run_dir": cwd / "runs" / fr_id,
            "manifests": {s: read_manifest(cwd / "runs" / fr_id / s) for s in DATA_STAGES}}


def cli(run: dict, *args: str):
    return run_cli(list(args), run["env"], run["cwd"])


def test_a_run_until_tokenize_says_where_its_data_is_and_how_to_train_on_it(data_run):
    out, fr_id, tok = data_run["proc"].stdout, data_run["fr_id"], data_run["manifests"]["tokenize"]
    assert "stopped after tokenize (no model trained)" in out and "Model:" not in out, out
    assert f"Data:             {tok['dir']}  (tokenize, sha256 {tok['digest']})" in out, out
    assert f"tokens: train {tok['train_tokens']}, val {tok['val_tokens']}" in out
    assert f"MLflow run:       {data_run['env']['MLFLOW_TRACKING_URI']}" in out
    assert f"ssl-pipeline run --config {data_run['config']} --from train --data {fr_id}" in out
    assert f"ssl-pipeline export-corpus {fr_id} " in out
    for stage, m in data_run["manifests"].items():   # each stage: documents, digest, folder
        assert re.search(rf"^{stage}\s+{m['rows']}\s+{m['digest'][:12]}\s+{re.escape(m['dir'])}$", out, re.M), stage

    api = data_run["env"]["PREFECT_API_URL"]
    assert task_states(api, fr_id) == {s: ["Completed"] for s in DATA_STAGES}
    # what a retry of it runs again: the same stages, no further
    assert httpx.get(f"{api}/flow_runs/{fr_id}").json()["parameters"]["until"] == "tokenize"
    parent, client = data_run["parent"], data_run["client"]
    assert parent.info.status == "FINISHED" and "ssl_pipeline.model_uri" not in parent.data.tags
    assert sorted(r.info.run_name for r in stage_runs(client, parent.info.run_id)) == sorted(DATA_STAGES)
    assert parent.data.tags["ssl_pipeline.tokenize.digest"] == tok["digest"]


def test_export_corpus_writes_a_datasets_folder_logged_on_the_run(data_run, tmp_path):
    out, m = tmp_path / "corpus", data_run["manifests"]["decontaminate"]
    proc = cli(data_run, "export-corpus", data_run["fr_id"], str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ids = read_table(m, columns=["doc_id"])["doc_id"].to_pylist()
    assert f"{len(ids)} documents of the decontaminate stage (sha256 {m['digest']}) written to {out}" in proc.stdout
    assert [p.name for p in (out / "data").iterdir()] == ["train-00000-of-00001.parquet"]
    assert not list(tmp_path.glob(".corpus.tmp-*"))

    # datasets, offline, loads every kept document in the stage's order, with its metadata, no html
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    loaded = subprocess.run([sys.executable, "-c", LOAD, str(out)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    got = json.loads(loaded.stdout)
    assert got["num_rows"] == len(ids) == m["rows"] and got["doc_ids"] == ids
    assert {"doc_id", "text", "url", "source", "title", "language", "hostname"} <= set(got["columns"])
    assert "html" not in got["columns"] and got["first"]["url"].startswith("http://pydoc.localhost/")

    # the card: YAML that datasets reads, the funnel, the lineage, the configuration
    text = (out / "README.md").read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}]
    assert front["language"] == ["en"] and front["size_categories"] == ["n<1K"] and front["license"] == "unknown"
    assert front["dataset_info"]["splits"] == [{"name": "train", "num_examples": len(ids)}]
    body = text.split("---\n", 2)[2]
    for stage in DATA_STAGES[:-1]:
        s = data_run["manifests"][stage]
        assert f"| {stage} | {s.get('input_rows', s['rows'] + s['dropped'])} | {s['rows']} | {s['dropped']} |" in body
        assert f"| {stage} | `{s['digest']}` |" in body
    assert data_run["parent"].info.run_id in body and data_run["fr_id"] in body and "http://pydoc.localhost/" in body
    assert "tracking:\n  experiment: data-runs" in body   # the resolved configuration

    # in MLflow: an input of the data run's pipeline run, its source the folder, its digest the stage's
    run = data_run["client"].get_run(data_run["parent"].info.run_id)
    exports = [d for d in run.inputs.dataset_inputs if {"key": "mlflow.data.context", "value": "export"}
               in [{"key": t.key, "value": t.value} for t in d.tags]]
    assert [(d.dataset.name, d.dataset.digest, json.loads(d.dataset.source)["uri"]) for d in exports] == \
        [("corpus", m["digest"][:36], str(out))]
    assert run.info.status == "FINISHED" and run.info.end_time == data_run["parent"].info.end_time

    # never over a folder with files in it, unless asked; the run named by its folder, another stage
    again = cli(data_run, "export-corpus", str(data_run["run_dir"]), str(out), "--stage", "dedup")
    assert again.returncode == 2 and "--force" in again.stderr and len(again.stderr.splitlines()) == 1
    forced = cli(data_run, "export-corpus", str(data_run["run_dir"]), str(out), "--stage", "dedup", "--force")
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert f"{data_run['manifests']['dedup']['rows']} documents of the dedup stage" in forced.stdout


def test_train_from_the_data_run_and_trace_the_model_back_to_its_stages(data_run):
    parent = data_run["parent"]
    proc = cli(data_run, "run", "--config", data_run["config"], "--from", "train", "--data", parent.info.run_id)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    tok = data_run["manifests"]["tokenize"]
    assert f"Model:            models:/{MODEL}/1" in proc.stdout
    assert f"Trained on:       {tok['dir']}  (the data of pipeline run {parent.info.run_id}" in proc.stdout
    fr_id = flow_run_id(proc.stdout)
    assert task_states(data_run["env"]["PREFECT_API_URL"], fr_id) == {"train": ["Completed"],
                                                                        "evaluate": ["Completed"]}
    client = data_run["client"]
    (trained,) = parent_runs(client, EXPERIMENT, fr_id)
    tags = trained.data.tags
    assert tags["ssl_pipeline.data_run.mlflow_run_id"] == parent.info.run_id
    assert tags["ssl_pipeline.data_run.prefect_flow_run_id"] == data_run["fr_id"]
    for stage in DATA_STAGES:
        assert tags[f"ssl_pipeline.{stage}.mlflow_run_id"] == parent.data.tags[f"ssl_pipeline.{stage}.mlflow_run_id"]
        assert tags[f"ssl_pipeline.{stage}.digest"] == data_run["manifests"][stage]["digest"]
    used = {(d.dataset.name, d.dataset.digest, [t.value for t in d.tags if t.key == "mlflow.data.context"][0])
            for d in trained.inputs.dataset_inputs}
    assert used == {("tokenize", tok["digest"][:36], "training"),
                    ("decontaminate", data_run["manifests"]["decontaminate"]["digest"][:36], "evaluation")}
    assert sorted(r.info.run_name for r in stage_runs(client, trained.info.run_id)) == ["evaluate", "train"]

    # lineage: the model, its training in this run, every data stage in the data run
    proc = cli(data_run, "lineage", f"models:/{MODEL}/1", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["pipeline_run"]["mlflow_run_id"] == trained.info.run_id
    assert [s["stage"] for s in report["stages"]] == ["train", *DATA_STAGES[::-1]]
    for s in report["stages"][1:]:
        assert (s["pipeline_run_id"], s["digest"], s["problems"]) == \
            (parent.info.run_id, data_run["manifests"][s["stage"]]["digest"], [])
    assert report["sources"]["datasets"][0]["source"] == "http://pydoc.localhost/"

    # why: one trained-on document, from the model back to its tokens in the data run
    doc_id = read_table(data_run["manifests"]["decontaminate"], columns=["doc_id"])["doc_id"][0].as_py()
    proc = cli(data_run, "why", doc_id, "--model", f"models:/{MODEL}/1", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (doc,) = json.loads(proc.stdout)["documents"]
    assert doc["fate"] == "kept" and doc["stages"] == [*DATA_STAGES] and doc["tokens"]["tokenize_dir"] == tok["dir"]


def test_bad_from_until_and_data_are_refused_in_one_line(data_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", data_run["env"]["MLFLOW_TRACKING_URI"])
    monkeypatch.chdir(data_run["cwd"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "partial").mkdir()     # a run folder with a collect stage only
    (tmp_path / "partial" / "collect").symlink_to(data_run["run_dir"] / "collect")
    config = ["--config", data_run["config"]]
    cases = [(["--from", "evaluate", "--data", data_run["fr_id"]], "--from evaluate: a run can only start from train"),
             (["--until", "train_more"], "--until train_more: not a stage"),
             (["--data", data_run["fr_id"]], "--from train and --data RUN go together"),
             (["--from", "train", "--data", data_run["fr_id"], "--until", "dedup"], "--until dedup with --from train"),
             (["--from", "train", "--data", "no/such/run"], "'no/such/run' is not a run folder"),
             (["--from", "train", "--data", "0" * 32], f"'{'0' * 32}' is not a run folder"),
             (["--from", "train", "--data", str(tmp_path / "empty")], "holds no finished data stage"),
             (["--from", "train", "--data", str(tmp_path / "partial")],
              "has no finished tokenize stage (its last data stage: collect)")]
    for extra, message in cases:
        args = build_parser().parse_args(["run", *config, *extra])
        assert args.fn(args) == 2, extra
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (extra, err)


def test_a_retry_of_the_data_run_stops_after_tokenize_again(data_run):
    """Last: it reopens the data run's MLflow run, which the tests above read as it was."""
    proc = cli(data_run, "retry", data_run["fr_id"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    api = data_run["env"]["PREFECT_API_URL"]
    assert task_states(api, data_run["fr_id"]) == {s: ["Completed", "Cached"] for s in DATA_STAGES}
    flow = httpx.get(f"{api}/flow_runs/{data_run['fr_id']}").json()
    assert flow["state"]["type"] == "COMPLETED" and flow["state"]["message"] == "stopped after tokenize"
    (parent,) = parent_runs(data_run["client"], EXPERIMENT, data_run["fr_id"])
    assert parent.info.status == "FINISHED" and "ssl_pipeline.model_uri" not in parent.data.tags
