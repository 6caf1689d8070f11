"""MLflow bookkeeping: one parent run per pipeline run, one nested run per stage, datasets, funnel.

MLflow's active run is thread-local, so nothing here relies on it between calls: run ids
are passed explicitly and every write names its run.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import mlflow
from mlflow.data.http_dataset_source import HTTPDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tasks.config import PipelineConfig, flatten

os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # the CLI prints the links once
FLOW_RUN_TAG = "prefect.flow_run_id"
STAGE_TAG = "ssl_pipeline.stage"
CACHE_KEY_TAG = "ssl_pipeline.cache_key"
# What an experiment holds, for the MLflow UI: model training (runs, their charts, registered
# models), not a GenAI app (traces). MLflow 3.17's UI opens an experiment by the GenAI / Model
# training switch, which it reads from the link (UI_QUERY) or the browser's last choice, never from
# this tag (mlflow/mlflow#24498); UIs that read the tag (earlier 3.x, MLflow's own kind selector) do.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
UI_QUERY = "?workflowType=machine_learning"


def client() -> MlflowClient:
    return MlflowClient()


def experiment_id(name: str) -> str:
    """The experiment's id, created on first use, of the model-training kind (an existing one
    without a kind gets it; a kind someone chose stays). Two runs starting together may both find it
    missing: the one whose create loses the race takes the winner's."""
    key, kind = EXPERIMENT_KIND
    exp = client().get_experiment_by_name(name)
    if exp is None:
        try:
            return client().create_experiment(name, tags={key: kind})
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client().get_experiment_by_name(name)
    if key not in exp.tags:
        client().set_experiment_tag(exp.experiment_id, key, kind)
    return exp.experiment_id


def _find_run(exp_id: str, flow_run_id: str, stage: str | None) -> str | None:
    where = f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}'"
    where += f" and tags.`{STAGE_TAG}` = '{stage}'" if stage else f" and tags.`{STAGE_TAG}` IS NULL"
    runs = client().search_runs([exp_id], where, order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def start_pipeline_run(cfg: PipelineConfig, flow_run_id: str, flow_run_name: str, config_yaml: str,
                       run_name: str | None = None, parent_run_id: str | None = None) -> str:
    """The parent run of this Prefect flow run: created once, found again (and reopened) on retry;
    nested under ``parent_run_id`` (an ablation's run) when given."""
    c = client()
    exp = experiment_id(cfg.tracking.experiment)
    run_id = _find_run(exp, flow_run_id, None)
    if run_id is not None:
        c.update_run(run_id, status="RUNNING")
        kill_leftover_stage_runs(run_id, flow_run_id)
        old = c.get_run(run_id).data.params
        changed = {k: v for k, v in flatten(cfg).items() if k in old and old[k] != v[:6000]}
        if changed:  # MLflow params are immutable: keep the retry's config as an artifact
            c.set_tag(run_id, "ssl_pipeline.config_changed_on_retry", ", ".join(sorted(changed)))
            _log_text(run_id, config_yaml, f"config/retry-{len(c.list_artifacts(run_id, 'config'))}.yaml")
        return run_id
    tags = {FLOW_RUN_TAG: flow_run_id, **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
    run = c.create_run(exp, run_name=run_name or f"pipeline-{flow_run_name}", tags=tags)
    run_id = run.info.run_id
    params = [Param(k, v[:6000]) for k, v in flatten(cfg).items()]
    for i in range(0, len(params), 100):
        c.log_batch(run_id, params=params[i:i + 100])
    _log_text(run_id, config_yaml, "config/resolved.yaml")
    return run_id


def kill_leftover_stage_runs(parent_run_id: str, flow_run_id: str) -> list[str]:
    """Stage runs of this flow run still RUNNING when it starts again: an earlier attempt's, whose
    process died before it could end them. They end KILLED (with an end time)."""
    c = client()
    exp = c.get_run(parent_run_id).info.experiment_id
    runs = c.search_runs([exp], f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}' and "
                                f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'RUNNING'")
    for r in runs:
        c.set_tag(r.info.run_id, "ssl_pipeline.ended_by", "its attempt died; closed when the flow run was retried")
        c.set_terminated(r.info.run_id, RunStatus.to_string(RunStatus.KILLED))
    return [r.info.run_name for r in runs]


def start_stage_run(parent_run_id: str, stage: str, flow_run_id: str, key: str | None = None,
                    resume: bool = False) -> str:
    """The stage's nested run. ``resume``: the stage continues where an earlier attempt of this
    flow run with the same cache key stopped (train from its checkpoint), so it continues in that
    attempt's run, reopened, and one training keeps one history."""
    c = client()
    exp = c.get_run(parent_run_id).info.experiment_id
    if resume and key:
        earlier = c.search_runs([exp], f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}' and tags.`{STAGE_TAG}` = '{stage}' "
                                       f"and tags.`{CACHE_KEY_TAG}` = '{key}' and attributes.status != 'FINISHED'",
                                order_by=["attributes.start_time DESC"], max_results=1)
        if earlier:
            run_id = earlier[0].info.run_id
            c.update_run(run_id, status="RUNNING")
            c.set_tag(run_id, "ssl_pipeline.resumed_attempts",
                      str(int(earlier[0].data.tags.get("ssl_pipeline.resumed_attempts", "0")) + 1))
            return run_id
    tags = {"mlflow.parentRunId": parent_run_id, FLOW_RUN_TAG: flow_run_id, STAGE_TAG: stage}
    run = c.create_run(exp, run_name=stage, tags={**tags, **({CACHE_KEY_TAG: key} if key else {})})
    return run.info.run_id


def end_run(run_id: str, ok: bool) -> None:
    client().set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED))


def _log_text(run_id: str, text: str, artifact_file: str) -> None:
    client().log_text(run_id, text, artifact_file)


def dataset(manifest: dict, name: str) -> MetaDataset:
    """A stage's Parquet output as an MLflow dataset: its folder as source, its digest (36 chars max)."""
    return MetaDataset(LocalArtifactDatasetSource(manifest["dir"]), name=name, digest=manifest["digest"][:36])


def stage_metrics(manifest: dict, inputs: list[dict]) -> dict[str, float]:
    m = {"docs_in": float(inputs[0]["rows"]) if inputs else float(manifest["rows"] + manifest["dropped"]),
         "docs_out": float(manifest["rows"]), "dropped": float(manifest["dropped"]),
         "bytes_in": float(inputs[0]["bytes"]) if inputs else 0.0,
         "bytes_out": float(manifest["bytes"]), "seconds": float(manifest.get("seconds", 0.0))}
    m.update({f"dropped.{reason}": float(n) for reason, n in manifest["reasons"].items()})
    if "dask_workers" in manifest:  # its shards ran as Prefect tasks on Dask
        m.update(dask_workers=float(len(manifest["dask_workers"])), dask_tasks=float(manifest["dask_tasks"]))
    return m


# what the tracking server's database says when two inserts of one dataset race (SQLite, PostgreSQL, MySQL)
DUPLICATE_ROW = ("UNIQUE constraint failed", "duplicate key value violates unique constraint", "Duplicate entry")


def _log_input(ds: MetaDataset, context: str, tags: dict | None = None) -> None:
    """mlflow.log_input into the active run. Two stages logging one dataset at the same moment (an
    extract following its collect: one logs it as output, the other as input) can both find it new
    on the server, which then refuses the second insert; logged again, it finds the first one's."""
    try:
        mlflow.log_input(ds, context=context, tags=tags)
    except MlflowException as e:
        if not any(s in str(e) for s in DUPLICATE_ROW):
            raise
        mlflow.log_input(ds, context=context, tags=tags)


def log_stage(run_id: str, stage: str, manifest: dict, inputs: list[dict], metrics: dict | None = None) -> None:
    """Counts, seconds and bytes as metrics; input and output datasets with mlflow.log_input.

    A manifest's ``sources`` (crawl start URLs, local folders) are logged as inputs too."""
    values = {**stage_metrics(manifest, inputs), **(metrics or {})}
    client().log_batch(run_id, metrics=[Metric(k, v, int(mlflow.utils.time.get_current_time_millis()), 0)
                                        for k, v in values.items()])
    with mlflow.start_run(run_id=run_id, nested=True):  # log_input needs an active run: only inside this block
        for src in manifest.get("sources", []):
            source = HTTPDatasetSource(src) if src.startswith("http") else LocalArtifactDatasetSource(src)
            _log_input(MetaDataset(source, name=src), "source")
        for m in inputs:
            _log_input(dataset(m, m["stage"]), "input", {"sha256": m["digest"]})
        _log_input(dataset(manifest, stage), "output", {"sha256": manifest["digest"]})
    _log_text(run_id, json.dumps(manifest, indent=2, default=str), "manifest.json")


def reasons_text(reasons: dict, empty: str = "-") -> str:
    """Counts by drop reason as one line: ``http_404=55, near_duplicate=1``."""
    return ", ".join(f"{r}={n}" for r, n in reasons.items()) or empty


def funnel(manifests: dict[str, dict]) -> list[dict]:
    """Documents per stage and dropped by reason: one row per stage."""
    return [{"stage": s, "docs_in": m.get("input_rows", m["rows"] + m["dropped"]), "docs_out": m["rows"],
             "dropped": m["dropped"],
             "dropped_by_reason": reasons_text(m["reasons"])}
            for s, m in manifests.items()]


MODEL_STAGES = ("train", "evaluate")   # their rows count other things than the documents kept


def _documents(manifests: dict[str, dict]) -> dict[str, dict]:
    return {s: m for s, m in manifests.items() if s not in MODEL_STAGES}


def _drops(manifests: dict[str, dict]) -> list[tuple[str, str, int]]:
    """(stage, reason, documents) for every drop reason of every data stage, the largest first in a stage."""
    return [(s, reason, n) for s, m in _documents(manifests).items()
            for reason, n in sorted(m["reasons"].items(), key=lambda x: -x[1])]


def funnel_figure(manifests: dict[str, dict]):
    """The funnel of the data stages as a chart: per stage the documents kept and dropped (top),
    and every stage's drops by reason, one labelled bar per reason code (bottom)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = funnel(_documents(manifests))
    order = [r["stage"] for r in rows]
    drops = [(stage, reason, n, order.index(stage)) for stage, reason, n in _drops(manifests)]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 1.6 + 0.3 * (len(rows) + max(len(drops), 1))),
                                      height_ratios=[max(len(rows), 1), max(len(drops), 1)])
    y = range(len(rows))
    top.barh(y, [r["docs_out"] for r in rows], color="#3b6ea8", label="kept")
    top.barh(y, [r["dropped"] for r in rows], left=[r["docs_out"] for r in rows], color="#c9c9c9", label="dropped")
    for i, r in enumerate(rows):
        top.text(r["docs_out"] + r["dropped"], i, f" {r['docs_out']} kept, {r['dropped']} dropped", va="center",
                 fontsize=8)
    top.set_yticks(list(y), [r["stage"] for r in rows])
    top.set_title("Documents per stage", fontsize=10)
    top.legend(fontsize=8, loc="lower right")
    if drops:
        bottom.barh(range(len(drops)), [n for _, _, n, _ in drops], color=[f"C{i % 10}" for *_, i in drops])
        for j, (_, _, n, _) in enumerate(drops):
            bottom.text(n, j, f" {n}", va="center", fontsize=8)
        bottom.set_yticks(range(len(drops)), [f"{stage}: {reason}" for stage, reason, _, _ in drops])
    else:
        bottom.set_yticks([])
        bottom.text(0.5, 0.5, "nothing dropped", ha="center", va="center", transform=bottom.transAxes)
    bottom.set_title("Dropped, by stage and reason", fontsize=10)
    bottom.set_xlabel("documents")
    for ax in (top, bottom):
        ax.invert_yaxis()
        ax.tick_params(labelsize=8)
        ax.margins(x=0.25)
    fig.tight_layout()
    return fig


def funnel_markdown(manifests: dict[str, dict], run_id: str | None = None) -> str:
    """The funnel for Prefect's UI: a sentence, the counts per stage, the drops by reason; with
    ``run_id`` (the pipeline's MLflow run), links to it and to its experiment's runs."""
    rows = funnel(_documents(manifests))
    if not rows:
        return "No data stage ran."
    first, last = rows[0], rows[-1]
    text = [f"**{first['docs_in']}** documents in at {first['stage']}, **{last['docs_out']}** left after "
            f"{last['stage']}."]
    if last["docs_out"] == 0:
        text[0] += f" The run stopped at **{last['stage']}**: no documents left."
    if "train" in manifests:
        text.append(f"Model trained on them: `{manifests['train']['model_uri']}`.")
    if run_id and (url := run_url(run_id)).startswith("http"):
        text.append(f"MLflow: [the pipeline run]({url}) (its artifacts `funnel.png`, `funnel.md`, `funnel.json`), "
                    f"[the experiment's runs]({run_url(run_id, experiment=True)}).")
    lines = [" ".join(text), "", "| stage | in | kept | dropped |", "|---|---:|---:|---:|"]
    lines += [f"| {r['stage']} | {r['docs_in']} | {r['docs_out']} | {r['dropped']} |" for r in rows]
    if drops := _drops(manifests):
        lines += ["", "| stage | dropped because | documents |", "|---|---|---:|"]
        lines += [f"| {stage} | `{reason}` | {n} |" for stage, reason, n in drops]
    return "\n".join(lines) + "\n"


def log_funnel(run_id: str, manifests: dict[str, dict]) -> list[dict]:
    """The funnel on the pipeline's run: ``funnel.md``, ``funnel.json``, ``funnel.png`` and each
    stage's documents out as a metric; returns its rows."""
    rows = funnel(manifests)
    lines = ["| stage | docs in | docs out | dropped | dropped by reason |", "|---|---:|---:|---:|---|"]
    lines += [f"| {r['stage']} | {r['docs_in']} | {r['docs_out']} | {r['dropped']} | {r['dropped_by_reason']} |"
              for r in rows]
    _log_text(run_id, "\n".join(lines) + "\n", "funnel.md")
    _log_text(run_id, json.dumps(rows, indent=2), "funnel.json")
    fig = funnel_figure(manifests)
    import matplotlib.pyplot as plt
    client().log_figure(run_id, fig, "funnel.png")
    plt.close(fig)
    ts = int(mlflow.utils.time.get_current_time_millis())
    client().log_batch(run_id, metrics=[Metric(f"{r['stage']}.docs_out", float(r["docs_out"]), ts, 0)
                                        for r in rows])
    return rows


def run_url(run_id: str, experiment: bool = False) -> str:
    """The run's page in the MLflow UI (``experiment``: its experiment's runs), as model training."""
    uri = mlflow.get_tracking_uri()
    if not uri.startswith("http"):
        return f"run {run_id} in {uri}"
    exp = client().get_run(run_id).info.experiment_id
    return f"{uri.rstrip('/')}/#/experiments/{exp}/runs{'' if experiment else '/' + run_id}{UI_QUERY}"


def log_artifact(run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    """A file, or a folder's contents under ``artifact_path``."""
    if Path(path).is_dir():
        client().log_artifacts(run_id, str(path), artifact_path)
    else:
        client().log_artifact(run_id, str(path), artifact_path)


# --- registered models ---------------------------------------------------------------------
MODEL_URI_RE = re.compile(r"models:/([^/@]+)(?:/([^/@]+)|@([^/@]+))")


class LineageError(Exception):
    """A message for the user; ``code`` is the exit status (1: no such document, 2: no such model or run)."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def model_version(uri: str):
    """The registered model version of ``models:/NAME/VERSION``, ``models:/NAME/latest`` or ``models:/NAME@ALIAS``."""
    m = MODEL_URI_RE.fullmatch(uri.strip())
    if not m:
        raise LineageError(f"{uri!r} is not a registered model URI: models:/NAME/VERSION, models:/NAME/latest "
                           f"or models:/NAME@ALIAS")
    name, version, alias = m.groups()
    try:
        if alias:
            return client().get_model_version_by_alias(name, alias)
        if version == "latest":
            versions = client().search_model_versions(f"name = '{name}'")
            if versions:
                return max(versions, key=lambda v: int(v.version))
            raise LineageError(f"no registered model {name!r} at {mlflow.get_tracking_uri()}")
        return client().get_model_version(name, version)
    except MlflowException as e:
        raise LineageError(f"no registered model {uri} at {mlflow.get_tracking_uri()} ({e.message})") from None


def describe_model_version(name: str, version: str, paragraph: str, replaces: str, tags: dict | None = None) -> None:
    """``tags`` on a registered model version, and ``paragraph`` in its description: in place of
    an earlier paragraph that starts with ``replaces``, after the others (train writes what the
    model was trained on, evaluate adds its scores)."""
    c = client()
    for k, v in (tags or {}).items():
        c.set_model_version_tag(name, version, k, str(v))
    current = c.get_model_version(name, version).description or ""
    kept = [p for p in current.split("\n\n") if p.strip() and not p.startswith(replaces)]
    c.update_model_version(name, version, description="\n\n".join(kept + [paragraph]))
