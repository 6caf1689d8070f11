"""The pipeline flow: collect -> extract -> filter -> dedup -> tokenize -> train.

Parameters are a config file path and ``section.key=value`` overrides; the file is read when
the flow runs, so a retried run picks up a corrected file. Stages hand each other manifests.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from prefect import flow, get_run_logger
from prefect.futures import wait
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run
from prefect.states import Completed, Failed
from prefect.utilities.annotations import quote

from flows import tracking
from flows.config import ConfigError, load_config
from tasks.collect import collect_task
from tasks.dedup import dedup_task
from tasks.extract import extract_task
from tasks.filter import filter_task
from tasks.tokenize import tokenize_task
from tasks.train import train_task

STAGES = [("collect", collect_task), ("extract", extract_task), ("filter", filter_task),
          ("dedup", dedup_task), ("tokenize", tokenize_task), ("train", train_task)]


def empty_stage_message(stage: str, manifest: dict) -> str:
    reasons = ", ".join(f"{r}={n}" for r, n in manifest["reasons"].items()) or "none recorded"
    return (f"{stage}: 0 documents left (in: {manifest.get('input_rows', manifest['dropped'])}, "
            f"dropped by reason: {reasons}). Its output is kept in {manifest['dir']}.")


@flow(name="ssl-pipeline", log_prints=True)
def pipeline(config_path: str | None = None, overrides: list[str] | None = None):
    """From raw web pages to a pretrained model, every step recorded in MLflow."""
    log = get_run_logger()
    try:
        cfg = load_config(config_path, overrides)
    except ConfigError as e:
        return Failed(message=str(e))
    run_dir = Path(cfg.data_dir).resolve() / flow_run.get_id()
    parent = tracking.start_pipeline_run(cfg, flow_run.get_id(), flow_run.get_name(),
                                         yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    ctx = {"flow_run_id": flow_run.get_id(), "parent_run_id": parent, "run_dir": str(run_dir),
           "data_dir": str(Path(cfg.data_dir).resolve()), "registered_model": cfg.tracking.registered_model}
    log.info("MLflow run: %s", tracking.run_url(parent))
    manifests: dict[str, dict] = {}
    sections = {stage: getattr(cfg, stage).model_dump(mode="json") for stage, _ in STAGES}
    inputs: list[dict] = []
    try:
        collected = _collect_and_extract(ctx, sections)
        for stage, task in STAGES:
            manifest = collected[stage] if stage in collected else task(ctx, sections[stage], inputs)
            manifests[stage] = manifest
            if manifest["rows"] == 0:
                msg = empty_stage_message(stage, manifest)
                tracking.client().set_tag(parent, "ssl_pipeline.stopped_at", stage)
                _report(parent, manifests)
                tracking.end_run(parent, ok=False)
                return Failed(message=msg)
            inputs = [manifest]
    except BaseException:
        tracking.end_run(parent, ok=False)
        raise
    _report(parent, manifests)
    train = manifests["train"]
    for m in manifests.values():  # the whole lineage on the parent run too
        tracking.client().set_tag(parent, f"ssl_pipeline.{m['stage']}.digest", m["digest"])
    tracking.client().set_tag(parent, "ssl_pipeline.model_uri", train["model_uri"])
    tracking.end_run(parent, ok=True)
    summary = {"mlflow_run_id": parent, "mlflow_run_url": tracking.run_url(parent),
               "model_uri": train["model_uri"], "val_loss": train["val_loss"], "ln_vocab": train["ln_vocab"],
               "run_dir": str(run_dir)}
    return Completed(message=f"val_loss {train['val_loss']:.3f} (ln vocab {train['ln_vocab']:.3f})",
                     data=summary)


def _collect_and_extract(ctx: dict, sections: dict) -> dict[str, dict]:
    """Collect and extract run side by side: extract follows collect's shards as they are
    written, so a crawl that waits on the network does not leave the extraction cores idle."""
    collected = collect_task.submit(ctx, sections["collect"], [])

    def state() -> str | None:
        s = collected.state
        return None if not s.is_final() else "completed" if s.is_completed() else "failed"

    follow = {"stage": "collect", "key": collect_task.key(ctx, sections["collect"], []), "state": state}
    extracted = extract_task.submit(ctx, sections["extract"], [], follow=quote(follow))
    wait([collected, extracted])
    return {"collect": collected.result(), "extract": extracted.result()}


def _report(parent: str, manifests: dict[str, dict]) -> None:
    rows = tracking.funnel(manifests)
    tracking.log_funnel(parent, rows)
    create_table_artifact(key="funnel", table=rows, description="Documents per stage, dropped by reason")
