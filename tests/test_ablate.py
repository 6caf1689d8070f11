"""`ssl-pipeline ablate`: two variants differing in one filter's threshold, on the test site, with real
Prefect and MLflow servers on 127.0.0.1. Killed during its second variant's training and run again:
the first variant comes back cached, the second resumes from its checkpoint; then the variants have
different datasets, the same token budget, one evaluation suite, and a comparison with intervals."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.browser import wait_until
from tests.conftest import BIN, cli_env, run_cli
from tests.test_e2e import task_states, write_config

pytestmark = pytest.mark.e2e
BUDGET = 40 * 8 * 64   # 40 steps of 8 sequences of 64 tokens


def write_ablation(tmp_path: Path) -> Path:
    base = tmp_path / "base.yaml"
    write_config(base, "ablate", "ablate-gpt", checkpoint_interval=10, eval_interval=10)
    ablation = {"base": "base.yaml",
                "ablate": {"tokens": BUDGET, "seeds": [7], "heldout_fraction": 0.15, "bootstrap": 500},
                "variants": {"loose": {},   # the demo profile's threshold (0.5)
                             "strict": {"filter.gopher_quality.min_alpha_words_ratio": 0.7}}}
    path = tmp_path / "ablation.yaml"
    path.write_text(yaml.safe_dump(ablation, sort_keys=False))
    return path


def runs_named(client: MlflowClient, name: str) -> list:
    exp = client.get_experiment_by_name("ablate")
    return client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'",
                              order_by=["attributes.start_time ASC"]) if exp else []


def test_ablation_killed_resumes_and_compares_on_one_suite(servers, tmp_path):
    client = MlflowClient(servers["MLFLOW_TRACKING_URI"])
    ablation = write_ablation(tmp_path)
    env = cli_env(servers, tmp_path)
    cmd = [str(BIN / "ssl-pipeline"), "ablate", "--config", str(ablation), "--json"]
    first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                             stderr=open(tmp_path / "first.log", "wb"))
    try:
        def second_variant_checkpointed() -> bool:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            return any(tmp_path.glob("runs/ablations/ablation-*/strict-seed7/train/checkpoints/step-*.pt"))
        wait_until(second_variant_checkpointed, 600, "the second variant's first checkpoint", every=0.2)
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
    assert not any(tmp_path.glob("runs/ablations/*/comparison.json"))

    again = run_cli(["ablate", "--config", str(ablation), "--json"], servers, tmp_path, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-5000:]
    report = json.loads(again.stdout[again.stdout.index("{"):])

    # the first variant came back cached: every stage of its second pipeline run
    loose = runs_named(client, "pipeline-loose-seed7")
    assert len(loose) == 2, [r.info.run_id for r in loose]
    states = task_states(servers["PREFECT_API_URL"], loose[1].data.tags["prefect.flow_run_id"])
    assert states and all(s == ["Cached"] for s in states.values()), states
    # the second resumed its training from the checkpoint the kill left
    strict_train = [r for r in runs_named(client, "train")
                    if r.data.tags.get("mlflow.parentRunId") in {p.info.run_id for p in runs_named(client, "pipeline-strict-seed7")}]
    assert any("resumed_from" in r.data.tags for r in strict_train), [r.data.tags for r in strict_train]

    # different data, the same budget, one suite, a comparison with intervals
    v = report["variants"]
    assert v["loose"]["data_digest"] != v["strict"]["data_digest"]
    assert v["loose"]["docs"] > v["strict"]["docs"] > 0
    assert v["loose"]["tokens_seen"] == v["strict"]["tokens_seen"] >= BUDGET
    assert v["strict"]["epochs"] > v["loose"]["epochs"]
    suites = {r.data.tags.get("ssl_pipeline.eval_suite_sha256") for r in runs_named(client, "evaluate")}
    assert suites == {report["suite_digest"]}, suites
    bpb = report["comparison"]["metrics"]["ssl_heldout_bpb.bits_per_byte"]
    assert set(bpb["variants"]) == {"loose", "strict"} and bpb["items"] >= 3
    (pair,) = bpb["pairs"]
    assert pair["low"] < pair["diff"] < pair["high"], pair
    assert any(line.startswith("strict vs loose: ssl_heldout_bpb bits/byte") for line in report["verdicts"])
    # on MLflow: the ablation run, its variants as children, the pictures
    (parent,) = [r for r in runs_named(client, "ablation-ablation") if r.info.status == "FINISHED"]
    assert parent.data.metrics["strict.ssl_heldout_bpb.bits_per_byte"] == pytest.approx(bpb["variants"]["strict"]["value"])
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert {"pipeline-loose-seed7", "pipeline-strict-seed7"} <= {r.info.run_name for r in children}
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"comparison.json", "comparison.txt", "final_metrics.png", "differences.png", "eval_curves.png"} <= arts, arts
    # the suite's documents never reached training: each variant's decontaminate stage dropped them
    for name in ("loose", "strict"):   # (a stage reused from the cache is recorded by its first run)
        finished = [r for r in runs_named(client, f"pipeline-{name}-seed7") if r.info.status == "FINISHED"]
        dec = client.get_run(finished[-1].data.tags["ssl_pipeline.decontaminate.mlflow_run_id"])
        assert dec.data.metrics["dropped.held_out"] > 0, dec.data.metrics
