"""The lineage audit, as a user runs it: `ssl-pipeline lineage` and `ssl-pipeline why` over one real
pipeline run (real Prefect and MLflow servers). Every expectation is read from the run's own data:
the stage folders' _manifest.json, the Parquet shards, the token index, and MLflow's records."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from tasks.shards import read_manifest, read_table, sha256_file
from tests.conftest import run_cli
from tests.test_e2e import DATA_STAGES, flow_run_id, parent_runs, stage_runs, write_config

pytestmark = pytest.mark.e2e
EXPERIMENT, MODEL = "lineage", "lineage-gpt"


@pytest.fixture(scope="module")
def run(tmp_path_factory, servers) -> dict:
    """One pipeline run, and what it left: its MLflow runs and its stages' manifests on disk."""
    cwd = tmp_path_factory.mktemp("lineage")
    proc = run_cli(["run", "--config", write_config(cwd / "run.yaml", EXPERIMENT, MODEL)], servers, cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    client = MlflowClient(servers["MLFLOW_TRACKING_URI"])
    parent = parent_runs(client, EXPERIMENT, flow_run_id(proc.stdout))[0]
    run_dir = Path(re.search(r"Data:\s+(\S+)", proc.stdout).group(1))
    return {"env": servers, "cwd": cwd, "client": client, "parent": parent,
            "model_uri": re.search(r"Model:\s+(\S+)", proc.stdout).group(1),
            "stages": {r.info.run_name: r for r in stage_runs(client, parent.info.run_id)},
            "manifests": {s: read_manifest(run_dir / s) for s in DATA_STAGES}}


def cli(run: dict, *args: str):
    return run_cli(list(args), run["env"], run["cwd"], timeout=120)


def audit(run: dict, *args: str) -> dict:
    proc = cli(run, *args, "--json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout)


def only_doc(report: dict) -> dict:
    assert len(report["documents"]) == 1, report
    return report["documents"][0]


def test_lineage_leads_from_the_model_to_every_stage_dataset_and_the_source(run):
    out = audit(run, "lineage", run["model_uri"])
    version = run["client"].get_model_version(MODEL, run["model_uri"].rsplit("/", 1)[1])
    assert out["model"]["mlflow_run_id"] == version.run_id == run["stages"]["train"].info.run_id
    assert out["pipeline_run"]["mlflow_run_id"] == run["parent"].info.run_id
    assert [s["stage"] for s in out["stages"]] == [*DATA_STAGES, "train"][::-1]   # train back to collect
    stages = {s["stage"]: s for s in out["stages"]}
    for name in DATA_STAGES:
        s, m, mlflow_run = stages[name], run["manifests"][name], run["stages"][name]
        logged = [d.dataset for d in mlflow_run.inputs.dataset_inputs
                  if any(t.key == "mlflow.data.context" and t.value == "output" for t in d.tags)]
        assert s["mlflow_run_id"] == mlflow_run.info.run_id
        assert s["digest"] == s["logged_digest"] == m["digest"] and logged[0].digest == m["digest"][:36]
        assert (s["dir"], s["docs_out"], s["dropped"], s["reasons"]) == \
            (m["dir"], m["rows"], m["dropped"], m["reasons"])
        assert s["problems"] == []
    assert stages["train"]["model_uri"] == run["model_uri"]
    assert stages["train"]["digest"] == sha256_file(stages["train"]["checkpoint"])

    # token shards: as the tokenizer's meta.json and the files themselves say
    tok_dir = Path(run["manifests"]["tokenize"]["dir"])
    meta = json.loads((tok_dir / "meta.json").read_text())
    shards = {sh["path"]: (sh["sha256"], sh["tokens"]) for split in meta["splits"].values() for sh in split["shards"]}
    assert {t["path"]: (t["sha256"], t["tokens"]) for t in stages["tokenize"]["token_shards"]} == shards
    assert all(sha256_file(tok_dir / path) == sha for path, (sha, _) in shards.items())

    # the source, and documents by source at each step, counted from the Parquet shards
    collect = run["manifests"]["collect"]
    url = collect["sources"][0]
    assert url == "http://pydoc.localhost/" and [d["source"] for d in out["sources"]["datasets"]] == [url]
    kept = {s: Counter(read_table(run["manifests"][s], columns=["source"])["source"].to_pylist())
            for s in ("collect", "extract", "filter", "dedup", "decontaminate")}
    dropped = Counter(read_table(collect, dropped=True, columns=["source"])["source"].to_pylist())
    tokens = sum(pq.read_metadata(tok_dir / s["index"]).num_rows for name, s in meta["splits"].items() if name != "heldout")
    [docs] = out["sources"]["documents"]
    assert docs["source"] == f"crawl:{url}"
    assert docs["kept"] == {**{s: c[docs["source"]] for s, c in kept.items()}, "tokenize": tokens}
    assert docs["dropped"]["collect"] == dropped[docs["source"]] > 0

    text = cli(run, "lineage", run["model_uri"])
    assert text.returncode == 0, text.stderr[-3000:]
    for needle in [run["model_uri"], version.run_id, run["parent"].info.run_id, url, "checks     OK",
                   *(run["manifests"][s]["digest"] for s in DATA_STAGES), *(sha for sha, _ in shards.values())]:
        assert needle in text.stdout, needle


@pytest.mark.parametrize("uri", [f"models:/{MODEL}/99", "models:/no-such-model/1", "no-such-model"])
def test_lineage_of_a_model_that_does_not_exist(run, uri):
    proc = cli(run, "lineage", uri)
    assert proc.returncode == 2
    assert uri in proc.stderr and "Traceback" not in proc.stdout + proc.stderr


def test_why_a_document_was_dropped_by_the_filter(run):
    row = read_table(run["manifests"]["filter"], dropped=True).to_pylist()[0]
    url = row["url"][:-1] if row["url"].endswith("/") else row["url"] + "/"   # the other spelling
    doc = only_doc(audit(run, "why", url, "--model", run["model_uri"]))
    assert (doc["doc_id"], doc["url"], doc["source"]) == (row["doc_id"], row["url"], row["source"])
    assert doc["fetched_at"] == row["fetched_at"].isoformat()
    assert (doc["fate"], doc["dropped_at"], doc["reason"]) == ("dropped", "filter", row["reason"])
    scores = set(row) - set(read_table(run["manifests"]["extract"]).column_names) - {"reason"}
    assert doc["scores"] == {k: row[k] for k in scores if row[k] is not None and row[k] == row[k]} and doc["scores"]

    text = cli(run, "why", url, "--model", run["model_uri"])
    assert f"filter     DROPPED: {row['reason']}" in text.stdout


def test_why_a_document_was_dropped_as_a_duplicate(run):
    dedup = run["manifests"]["dedup"]
    rows = read_table(dedup, dropped=True).to_pylist()
    assert rows, "the test site (tests/conftest.py TEST_MODULES) has near duplicates: secrets and random"
    row = rows[0]
    survivor = {r["doc_id"]: r["url"] for r in read_table(dedup, columns=["doc_id", "url"]).to_pylist()}
    doc = only_doc(audit(run, "why", row["doc_id"], "--run", run["parent"].info.run_id))
    assert (doc["dropped_at"], doc["reason"]) == ("dedup", row["reason"])
    assert doc["duplicate_of"] == {"doc_id": row["duplicate_of"], "url": survivor[row["duplicate_of"]]}


def test_where_the_tokens_of_a_kept_document_are(run):
    tok_dir = Path(run["manifests"]["tokenize"]["dir"])
    index = pq.read_table(tok_dir / "train.idx.parquet").to_pylist()
    entry = index[len(index) // 2]
    url = {r["doc_id"]: r["url"] for r in read_table(run["manifests"]["dedup"], columns=["doc_id", "url"]).to_pylist()}
    for query in (entry["doc_id"], url[entry["doc_id"]]):   # the latest finished run of the experiment
        doc = only_doc(audit(run, "why", query, "--experiment", EXPERIMENT))
        assert doc["fate"] == "kept" and doc["stages"] == DATA_STAGES
        assert {k: doc["tokens"][k] for k in ("shard", "start", "end")} == \
            {k: entry[k] for k in ("shard", "start", "end")}
        assert doc["tokens"]["shard_sha256"] == sha256_file(tok_dir / entry["shard"])
    # a document held out for evaluation: set aside by decontaminate, never tokenized
    decon = run["manifests"]["decontaminate"]
    held = pq.read_table(Path(decon["dir"]) / decon["heldout"], columns=["doc_id"])["doc_id"].to_pylist()[0]
    doc = only_doc(audit(run, "why", held, "--experiment", EXPERIMENT))
    assert doc["fate"] == "held_out" and doc["stages"] == DATA_STAGES[:-1] and "tokens" not in doc
    assert doc["heldout"] == {"file": "heldout.parquet", "dir": decon["dir"]}
    assert "held out for evaluation" in cli(run, "why", held, "--experiment", EXPERIMENT).stdout


def test_why_a_page_was_not_collected(run):
    rows = [r for r in read_table(run["manifests"]["collect"], dropped=True).to_pylist() if r["reason"] == "http_404"]
    doc = only_doc(audit(run, "why", rows[0]["url"], "--run", run["parent"].info.run_id))
    assert (doc["dropped_at"], doc["reason"], doc["status"], doc["doc_id"]) == ("collect", "http_404", 404, None)


@pytest.mark.parametrize("query", ["/no-such-page.html", "0123456789abcdef0123456789abcdef"])
def test_why_of_an_unknown_document(run, query):
    if query.startswith("/"):
        query = run["manifests"]["collect"]["sources"][0].rstrip("/") + query
    proc = cli(run, "why", query, "--run", run["parent"].info.run_id)
    assert proc.returncode == 1
    assert f"{query}: no document" in proc.stderr and "Traceback" not in proc.stdout + proc.stderr


def test_lineage_of_a_run_without_stage_run_tags_follows_the_logged_datasets(run):
    """Runs recorded before the parent run named its stage runs: the chain is found by dataset digests.
    (Runs last: it removes those tags from the module's pipeline run.)"""
    before = [(s["stage"], s["mlflow_run_id"]) for s in audit(run, "lineage", run["model_uri"])["stages"]]
    for key in [k for k in run["parent"].data.tags if k.endswith(".mlflow_run_id")]:
        run["client"].delete_tag(run["parent"].info.run_id, key)
    assert [(s["stage"], s["mlflow_run_id"]) for s in audit(run, "lineage", run["model_uri"])["stages"]] == before
