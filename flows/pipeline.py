"""The pipeline flow: collect -> extract -> filter -> dedup -> decontaminate -> tokenize -> train -> evaluate.

Parameters are a config file path and ``section.key=value`` overrides; the file is read when
the flow runs, so a retried run picks up a corrected file. Stages hand each other manifests.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import yaml
from mlflow.entities import RunTag
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.deployments import run_deployment
from prefect.futures import PrefectFuture, wait
from prefect.runtime import flow_run
from prefect.states import Completed, Failed
from prefect.utilities.annotations import quote

from flows import data_runs, recovery
from tasks import tracking
from tasks.collect import collect_task
from tasks.config import ConfigError, PipelineConfig, load_config
from tasks.decontaminate import decontaminate_task
from tasks.dedup import dedup_task
from tasks.evaluate import evaluate_task, too_few_to_evaluate
from tasks.extract import extract_task
from tasks.filter import filter_task
from tasks.stage import prepared, result_store
from tasks.tokenize import tokenize_task
from tasks.train import train_task
from tasks.workers import dask_cluster

STAGES = [("collect", collect_task), ("extract", extract_task), ("filter", filter_task), ("dedup", dedup_task),
          ("decontaminate", decontaminate_task), ("tokenize", tokenize_task), ("train", train_task),
          ("evaluate", evaluate_task)]


def stage_sections(cfg: PipelineConfig) -> dict[str, dict]:
    """What each stage task receives: its config section as JSON, which the stage validates back
    to the very section the configuration made (a preset's shape included: see Section.handoff)."""
    return {stage: getattr(cfg, stage).handoff() for stage, _ in STAGES}


def empty_stage_message(stage: str, manifest: dict) -> str:
    reasons = tracking.reasons_text(manifest["reasons"], "none recorded")
    return (f"{stage}: 0 documents left (in: {manifest.get('input_rows', manifest['dropped'])}, "
            f"dropped by reason: {reasons}). Its output is kept in {manifest['dir']}.")


def eval_documents(ctx: dict, cfg: PipelineConfig, sections: dict[str, dict]) -> dict | None:
    """The manifest of the evaluation documents of ``evaluate.sources`` (None without any): those
    sources collected and extracted by the collect and extract stages, under <run>/eval_sources/."""
    if not cfg.evaluate.sources:
        return None
    sub = {**ctx, "run_dir": str(Path(ctx["run_dir"]) / "eval_sources")}
    collect = cfg.evaluate.collect_section(cfg.collect).handoff()
    pages = prepared(collect_task, sub, collect, [])(sub, collect, [])
    return prepared(extract_task, sub, sections["extract"], [pages])(sub, sections["extract"], [pages])


def make_ctx(cfg: PipelineConfig, flow_run_id: str, parent_run_id: str, run_dir: Path) -> dict:
    """What every stage task receives besides its section: where it writes, its MLflow parent, the cache."""
    data_dir = Path(cfg.data_dir).resolve()
    return {"flow_run_id": flow_run_id, "parent_run_id": parent_run_id, "run_dir": str(run_dir),
            "data_dir": str(data_dir), "registered_model": cfg.tracking.registered_model,
            "cache": {**cfg.cache.handoff(), "storage": cfg.cache.storage or str(data_dir / ".results")}}


STAGE_SUMMARY = ("digest", "rows", "dir", "mlflow_run_id", "train_tokens", "val_tokens", "train_docs",
                 "tokens_per_step", "suite_digest")


@flow(name="ssl-pipeline", log_prints=True)
def pipeline(config_path: str | None = None, overrides: list[str] | None = None, eval_docs: dict | None = None,
             parent_run_id: str | None = None, run_dir: str | None = None, until: str | None = None,
             start_from: str | None = None, data_run: str | None = None):
    """From raw web pages to a pretrained model, every step recorded in MLflow.

    ``eval_docs``: a manifest of evaluation documents (any stage's: doc_id, url, source, text),
    which the suite includes and training excludes; default: those of evaluate.sources, collected
    here. ``parent_run_id``: the MLflow run this one nests under (an ablation's); ``run_dir``: the folder
    of this run's stages (default ``<data_dir>/<flow run id>``); ``until``: the last stage to run.
    ``start_from="train"`` with ``data_run`` (an earlier run's flow run id, pipeline MLflow run id or
    folder: see flows/data_runs.py): no data stage runs; train (and evaluate) take that run's."""
    log = get_run_logger()
    try:
        cfg = load_config(config_path, overrides)
        sections = stage_sections(cfg)
        if until is not None and until not in dict(STAGES):
            raise ConfigError(f"until: {until!r} is not a stage ({', '.join(dict(STAGES))})")
        data = None
        if start_from is not None or data_run is not None:
            if start_from != "train" or not data_run or until in data_runs.DATA_STAGES:
                raise ConfigError(f"start_from={start_from!r}, data_run={data_run!r}, until={until!r}: start_from "
                                  "can only be 'train', with data_run naming the data, and until train or evaluate")
            data = data_runs.for_training(data_run, cfg)
    except (ConfigError, data_runs.DataRunError) as e:
        return Failed(message=str(e))
    data_dir = Path(cfg.data_dir).resolve()
    run_dir = Path(run_dir).resolve() if run_dir else data_dir / flow_run.get_id()
    # who runs it (ssl-pipeline retry checks this process is gone before retrying), and what an
    # earlier attempt that died left open in Prefect
    recovery.record_process(flow_run.get_id())
    if leftovers := recovery.crash_leftover_task_runs(flow_run.get_id()):
        log.warning("task runs an earlier attempt left running, now Crashed: %s", ", ".join(leftovers))
    parent = tracking.start_pipeline_run(cfg, flow_run.get_id(), flow_run.get_name(),
                                         yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False),
                                         parent_run_id=parent_run_id)
    ctx = make_ctx(cfg, flow_run.get_id(), parent, run_dir)
    log.info("MLflow run: %s", tracking.run_url(parent))
    if data:
        data_runs.record(parent, data, evaluate=cfg.evaluate.enabled)
        log.info("training on the data of %s: %s", data.describe(), data.manifests["tokenize"]["dir"])
    manifests: dict[str, dict] = {}
    inputs: list[dict] = []
    stage = "collect"
    try:
        # a Dask cluster for the shards of work of the data stages, when runner.task_runner is dask
        with dask_cluster(cfg.runner.handoff()) as ctx["runner"]:
            running = _collect_and_extract(ctx, sections) if data is None else {}
            for stage, task in STAGES:
                if data is not None and stage in data_runs.DATA_STAGES:   # the data run's stages
                    if stage in data.manifests:
                        manifests[stage] = data.manifests[stage]
                        inputs = [manifests[stage]]
                    continue
                if stage == "decontaminate":
                    eval_docs = eval_docs if eval_docs is not None else eval_documents(ctx, cfg, sections)
                    inputs = inputs + ([eval_docs] if eval_docs else [])
                if stage == "evaluate":
                    if not cfg.evaluate.enabled:
                        break
                    inputs = [manifests["train"], manifests["decontaminate"]]   # the model, the held-out documents
                if stage in running:
                    manifest = running[stage].result()
                elif stage == "train" and cfg.runner.train_deployment:
                    manifest = _train_on_deployment(cfg.runner.train_deployment, ctx, sections[stage], inputs)
                else:
                    manifest = prepared(task, ctx, sections[stage], inputs)(ctx, sections[stage], inputs)
                manifests[stage] = manifest
                msg = empty_stage_message(stage, manifest) if manifest["rows"] == 0 else \
                    f"{too_few}. Nothing was trained; its output is kept in {manifest['dir']}." \
                    if stage == "decontaminate" and until in (None, "evaluate") \
                    and (too_few := too_few_to_evaluate(cfg, manifest)) else None
                if msg:
                    tracking.client().set_tag(parent, "ssl_pipeline.stopped_at", stage)
                    _report(parent, manifests)
                    tracking.end_run(parent, ok=False)
                    notify_failure(cfg, parent, stage, msg)
                    return Failed(message=msg)
                inputs = [manifest]
                if stage == until:
                    break
    except BaseException as e:
        tracking.end_run(parent, ok=False)
        notify_failure(cfg, parent, stage, f"{type(e).__name__}: {e}")
        raise
    _report(parent, manifests)
    # the whole lineage on the parent run, stages reused from earlier runs too: one request
    tags = {f"ssl_pipeline.{m['stage']}.{k}": m[k] for m in manifests.values() for k in ("digest", "mlflow_run_id")
            if k in m}
    if "train" in manifests:
        tags["ssl_pipeline.model_uri"] = manifests["train"]["model_uri"]
    tracking.client().log_batch(parent, tags=[RunTag(k, v) for k, v in tags.items()])
    tracking.end_run(parent, ok=True)
    summary = {"mlflow_run_id": parent, "mlflow_run_url": tracking.run_url(parent), "run_dir": str(run_dir),
               "stages": {stage: {k: m[k] for k in STAGE_SUMMARY if k in m} for stage, m in manifests.items()}}
    if "train" not in manifests:
        return Completed(message=f"stopped after {until}", data=summary)
    train = manifests["train"]
    summary.update(model_uri=train["model_uri"], val_loss=train["val_loss"], ln_vocab=train["ln_vocab"])
    message = f"val_loss {train['val_loss']:.3f} (ln vocab {train['ln_vocab']:.3f})"
    if train.get("objective") == "contrastive":   # its val_loss is InfoNCE over the batch, not per token
        accuracy, chance = train["retrieval"]
        message = f"val retrieval accuracy {accuracy:.3f} (chance {chance:.3f}), InfoNCE {train['val_loss']:.3f}"
    if "evaluate" in manifests:
        summary.update(evaluation=manifests["evaluate"]["table"], headline=manifests["evaluate"]["headline"])
    return Completed(message=message, data=summary)


@flow(name="ssl-train", log_prints=True)
def train_flow(ctx: dict, section: dict, inputs: list[dict]) -> dict:
    """The train stage on its own, for a deployment on a GPU work pool (runner.train_deployment)."""
    return prepared(train_task, ctx, section, inputs)(ctx, section, inputs)


def _train_on_deployment(name: str, ctx: dict, section: dict, inputs: list[dict]) -> dict:
    """Run ``train_flow`` through its deployment and wait; its manifest comes back through the
    shared result storage, under the train task's cache key."""
    child = run_deployment(name, parameters={"ctx": ctx, "section": section, "inputs": inputs}, timeout=None,
                           flow_run_name=f"{flow_run.get_name()}-train")   # named after its pipeline run
    if not child.state or not child.state.is_completed():
        state = child.state.name if child.state else "unknown"
        raise RuntimeError(f"train deployment {name}: flow run {child.id} ended {state}: "
                           f"{child.state.message if child.state else ''}")
    return result_store(ctx).read(train_task.key(ctx, section, inputs)).result


def _collect_and_extract(ctx: dict, sections: dict) -> dict[str, PrefectFuture]:
    """Collect and extract run side by side: extract follows collect's shards as they are
    written, so a crawl that waits on the network does not leave the extraction cores idle."""
    collected = prepared(collect_task, ctx, sections["collect"], []).submit(ctx, sections["collect"], [])

    def state() -> str | None:
        s = collected.state
        return None if not s.is_final() else "completed" if s.is_completed() else "failed"

    follow = {"stage": "collect", "key": collect_task.key(ctx, sections["collect"], []), "state": state}
    extract = prepared(extract_task, ctx, sections["extract"], [], follow)
    extracted = extract.submit(ctx, sections["extract"], [], follow=quote(follow))
    wait([collected, extracted])
    return {"collect": collected, "extract": extracted}


def flow_run_ui_url(flow_run_id: str) -> str | None:
    """The flow run's page in the Prefect UI (None on a temporary server)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL
    api = PREFECT_API_URL.value()
    return f"{PREFECT_UI_URL.value() or api.removesuffix('/api')}/runs/flow-run/{flow_run_id}" if api else None


def notify_failure(cfg, parent_run_id: str, stage: str, error: str) -> None:
    """POST a JSON notice of the failed run to ``notify.webhook_url``; a webhook that fails is logged,
    never allowed to hide the run's own error."""
    if not cfg.notify.webhook_url:
        return
    notice = {"event": "ssl-pipeline.failed", "flow_run_id": flow_run.get_id(),
              "flow_run_name": flow_run.get_name(), "stage": stage, "error": error[-4000:],
              "prefect_flow_run_url": flow_run_ui_url(flow_run.get_id()),
              "mlflow_run_url": tracking.run_url(parent_run_id),
              "retry": f"ssl-pipeline retry {flow_run.get_id()}"}
    try:
        httpx.post(cfg.notify.webhook_url, json=notice, timeout=cfg.notify.timeout_s).raise_for_status()
    except httpx.HTTPError as e:
        get_run_logger().warning("failure webhook %s: %s", cfg.notify.webhook_url, e)


def _report(parent: str, manifests: dict[str, dict]) -> None:
    rows = tracking.log_funnel(parent, manifests)
    create_table_artifact(key="funnel", table=rows, description="Documents per stage, dropped by reason")
    create_markdown_artifact(key="funnel-report", description="The funnel: documents per stage, dropped by reason",
                             markdown=tracking.funnel_markdown(manifests, parent))
