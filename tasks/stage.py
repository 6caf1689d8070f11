"""The one thin Prefect wrapper every stage shares.

``@stage_task("filter")`` turns ``fn(ctx, section, inputs, run_id) -> manifest`` into a Prefect
task that opens the stage's nested MLflow run, runs the stage, logs its counts and datasets,
and persists the manifest. Its cache key is the flow run, the stage, its config section and
its input digests: a retried flow run gets finished stages back as Cached and reruns only
what failed (or what a changed config section, input or stage code invalidates).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from typing import Callable

from prefect import task
from prefect.artifacts import create_table_artifact

from flows import tracking
from tasks.shards import read_manifest, sha256_file


def cache_key(stage: str, code: str, parameters: dict) -> str:
    """Same flow run, stage code, config section and inputs: the stage's earlier result is reused.
    A stage that follows another one still running has that one's cache key as its input."""
    ctx, section, inputs = parameters["ctx"], parameters["section"], parameters["inputs"]
    follow = parameters.get("follow")
    key = {"flow_run": ctx["flow_run_id"], "stage": stage, "code": code, "section": section,
           "inputs": [m["digest"] for m in inputs] + ([follow["key"]] if follow else [])}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def stage_dir(ctx: dict, stage: str) -> Path:
    return Path(ctx["run_dir"]) / stage


def stage_task(name: str) -> Callable:
    def decorate(fn: Callable) -> Callable:
        code = sha256_file(inspect.getfile(fn))  # the stage module's source: editing it invalidates

        @task(name=name, task_run_name=name, persist_result=True, description=fn.__doc__,
              cache_key_fn=lambda context, parameters: cache_key(name, code, parameters))
        def run(ctx: dict, section: dict, inputs: list[dict], follow: dict | None = None) -> dict:
            """``follow``: {"stage", "key", "state"} of a stage still running whose output this one
            reads as it is written (pass it wrapped in ``prefect.utilities.annotations.quote``)."""
            run_id = tracking.start_stage_run(ctx["parent_run_id"], name, ctx["flow_run_id"])
            try:
                result = fn(ctx, section, inputs, run_id, **({"follow": follow} if follow else {}))
                manifest, metrics = result if isinstance(result, tuple) else (result, {})
                if follow:  # its input, now published: for the lineage in MLflow
                    inputs = [read_manifest(stage_dir(ctx, follow["stage"]))]
                tracking.log_stage(run_id, name, manifest, inputs, metrics)
            except BaseException:
                tracking.end_run(run_id, ok=False)
                raise
            tracking.end_run(run_id, ok=True)
            create_table_artifact(key=f"{name}-counts", description=f"{name}: documents kept and dropped",
                                  table=tracking.funnel({name: manifest}))
            return {**manifest, "mlflow_run_id": run_id}
        run.key = lambda ctx, section, inputs: cache_key(name, code, {"ctx": ctx, "section": section, "inputs": inputs})
        return run
    return decorate
