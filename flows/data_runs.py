"""An earlier run's data: for training on it (``run --from train --data RUN``) and exporting it.

``ssl-pipeline run --until tokenize`` curates data and stops there. RUN names such a run (or any
run that got as far) by its Prefect flow run id (its folder's name under data_dir), the MLflow run
id of its pipeline run, or its folder (one of its stage folders too). Its stages are found the way
``ssl-pipeline lineage`` finds them: from its last data stage's MLflow run back to collect, each
with its manifest and MLflow run; a stage reused from an earlier run is that run's, with its data
in that run's folder. A folder that MLflow knows nothing of gives its own stage manifests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from flows import lineage
from tasks import tracking
from tasks.config import DATA_STAGES, PipelineConfig
from tasks.evaluate import too_few_to_evaluate
from tasks.shards import read_manifest

RUN_ID_RE = re.compile(r"[0-9a-f]{32}")
FLOW_RUN_ID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class DataRunError(ValueError):
    """What is wrong with the named data run, in one line for the user (exit status 2)."""


@dataclass
class DataRun:
    """An earlier run's data stages: their manifests in stage order (each with ``mlflow_run_id``
    where MLflow has its run), its pipeline (parent) MLflow run and its Prefect flow run."""
    spec: str
    manifests: dict[str, dict] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    flow_run_id: str | None = None

    def describe(self) -> str:
        return (f"pipeline run {self.mlflow_run_id} (Prefect flow run {self.flow_run_id})" if self.mlflow_run_id
                else f"{self.spec} (not recorded in MLflow at {mlflow.get_tracking_uri()})")


def resolve(spec: str, data_dir: str | Path) -> DataRun:
    """The data run ``spec`` names: a folder, an MLflow run id, or a Prefect flow run id (looked up
    in MLflow, else as the folder ``<data_dir>/<id>``)."""
    spec = spec.strip()
    path = Path(spec).expanduser()
    if path.is_dir():
        return _from_folder(path.resolve())
    parent = _pipeline_run(spec)
    if parent is not None:
        return _from_pipeline_run(spec, parent)
    folder = Path(data_dir).expanduser().resolve() / spec
    if spec and "/" not in spec and folder.is_dir():
        return _from_folder(folder)
    raise DataRunError(f"{spec!r} is not a run folder, a flow run id with a folder under {Path(data_dir).resolve()}, "
                       f"or a pipeline run recorded in MLflow at {mlflow.get_tracking_uri()}")


def for_training(spec: str, cfg: PipelineConfig) -> DataRun:
    """The data run to train on: its tokenize stage's shards must be there, and with the evaluate
    stage enabled its decontaminate stage's held-out documents too, enough of them to score on."""
    run, heldout = resolve(spec, cfg.data_dir), cfg.evaluate.enabled
    tok = run.manifests.get("tokenize")
    if tok is None:
        last = next(reversed(run.manifests), None)
        raise DataRunError(f"{spec}: {run.describe()} has no finished tokenize stage "
                           f"(its last data stage: {last or 'none'}); run it with --until tokenize first")
    if not Path(tok["dir"]).is_dir():
        raise DataRunError(f"{spec}: its token shards, {tok['dir']}, are gone")
    if heldout:
        dec = run.manifests.get("decontaminate")
        if dec is None or not (Path(dec["dir"]) / dec.get("heldout", "heldout.parquet")).is_file():
            raise DataRunError(f"{spec}: the evaluate stage needs its decontaminate stage's held-out documents, "
                               f"which are not there ({dec['dir'] if dec else 'no decontaminate stage'}); "
                               "or set evaluate.enabled=false")
        if too_few := too_few_to_evaluate(cfg, dec):
            raise DataRunError(f"{spec}: {too_few}")
    return run


def record(parent_run_id: str, run: DataRun, evaluate: bool) -> None:
    """On the pipeline run that trains on ``run``: where its data came from, as tags (the data
    run, and each data stage's digest and MLflow run, which ``ssl-pipeline lineage`` follows) and
    as dataset inputs (the token shards; the held-out documents when the model is evaluated)."""
    tags = {"ssl_pipeline.start_from": "train", "ssl_pipeline.data_run": run.spec,
            "ssl_pipeline.data_run.mlflow_run_id": run.mlflow_run_id or "",
            "ssl_pipeline.data_run.prefect_flow_run_id": run.flow_run_id or ""}
    tags.update({f"ssl_pipeline.{s}.{k}": m[k] for s, m in run.manifests.items()
                 for k in ("digest", "mlflow_run_id") if k in m})
    tracking.client().log_batch(parent_run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    log_input(parent_run_id, tracking.dataset(run.manifests["tokenize"], "tokenize"), "training",
              {"sha256": run.manifests["tokenize"]["digest"]})
    if evaluate:
        log_input(parent_run_id, tracking.dataset(run.manifests["decontaminate"], "decontaminate"), "evaluation",
                  {"sha256": run.manifests["decontaminate"]["digest"]})


def log_input(run_id: str, ds: MetaDataset, context: str, tags: dict[str, str] | None = None) -> None:
    """``ds`` as an input of ``run_id``, a finished run too: through the client, so the run's status
    and end time stay as they were (``mlflow.log_input`` needs it active, and ends it again)."""
    tags = [InputTag(MLFLOW_DATASET_CONTEXT, context), *(InputTag(k, v) for k, v in (tags or {}).items())]
    tracking.client().log_inputs(run_id, datasets=[DatasetInput(ds._to_mlflow_entity(), tags)])


# --- finding the run ---------------------------------------------------------------------------

def _pipeline_run(spec: str):
    """The pipeline (parent) MLflow run ``spec`` names, by its run id (a stage run's: its pipeline
    run) or by its Prefect flow run id; None when MLflow has none."""
    c = tracking.client()
    if RUN_ID_RE.fullmatch(spec):
        try:
            run = c.get_run(spec)
        except MlflowException:
            return None
        parent = run.data.tags.get(lineage.PARENT_TAG)
        return c.get_run(parent) if tracking.STAGE_TAG in run.data.tags and parent else run
    if FLOW_RUN_ID_RE.fullmatch(spec):
        experiments = [e.experiment_id for e in c.search_experiments()]
        runs = c.search_runs(experiments, f"tags.`{tracking.FLOW_RUN_TAG}` = '{spec}' and "
                                          f"tags.`{tracking.STAGE_TAG}` IS NULL",
                             order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0] if runs else None
    return None


def _from_pipeline_run(spec: str, parent) -> DataRun:
    """The data stages as the pipeline run recorded them (its tags), else its finished stage runs."""
    try:
        last = lineage.last_stage_run(parent, DATA_STAGES)
    except tracking.LineageError as e:
        raise DataRunError(f"{spec}: {e}") from None
    return DataRun(spec, _chain(spec, last), parent.info.run_id, parent.data.tags.get(tracking.FLOW_RUN_TAG))


def _from_folder(folder: Path) -> DataRun:
    """A run folder (or one of its stage folders): the stages its last stage came from, as MLflow
    recorded them, else the stage folders it holds."""
    if (m := read_manifest(folder)) and m.get("stage") in DATA_STAGES:   # a stage's folder: its run's
        folder = folder.parent
    found = {s: m for s in DATA_STAGES if (m := read_manifest(folder / s))}
    if not found:
        raise DataRunError(f"{folder} holds no finished data stage (no {'/, '.join(DATA_STAGES)}/ folder "
                           "with its _manifest.json)")
    if (parent := _pipeline_run(folder.name)) is not None:     # named by its flow run id
        return _from_pipeline_run(str(folder), parent)
    last = found[next(reversed(found))]
    made = _stage_run(last)
    if made is None:
        return DataRun(str(folder), found)
    return DataRun(str(folder), _chain(str(folder), made), made.data.tags.get(lineage.PARENT_TAG),
                   made.data.tags.get(tracking.FLOW_RUN_TAG))


def _stage_run(m: dict):
    """The MLflow run of the stage that wrote manifest ``m`` (its output: same digest, same folder)."""
    c = tracking.client()
    experiments = [e.experiment_id for e in c.search_experiments()]
    runs = c.search_runs(experiments, f"tags.`{tracking.STAGE_TAG}` = '{m['stage']}' and "
                                      f"datasets.digest = '{m['digest'][:36]}'",
                         order_by=["attributes.start_time DESC"])
    made = [r for r in runs if r.info.status == "FINISHED"
            and any(o["source"] == m["dir"] for o in lineage.datasets(r, "output"))]
    return made[0] if made else None


def _chain(spec: str, last) -> dict[str, dict]:
    """Stage -> manifest (with its MLflow run id), collect first, from stage run ``last`` back."""
    try:
        links = lineage.chain(last)
    except tracking.LineageError as e:
        raise DataRunError(f"{spec}: {e}") from None
    return {link["stage"]: {**link["manifest"], "mlflow_run_id": link["run"].info.run_id}
            for link in reversed(links)}
