"""The one thin Prefect wrapper every stage shares.

``@stage_task("filter")`` turns ``fn(ctx, section, inputs, run_id) -> manifest`` into a Prefect
task that opens the stage's nested MLflow run, runs the stage, logs its counts and datasets,
and persists the manifest. Its cache key is the stage, its code, its config section and its
inputs by content (the input manifests' digests; for collect, the sources): any later run,
a retry or the next scheduled one, gets a finished stage back as Cached and reruns only what
a failure, a changed config section, changed data or changed stage code invalidates.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import sys
from pathlib import Path
from typing import Callable

from prefect import Task, task
from prefect.artifacts import create_table_artifact
from prefect.filesystems import RemoteFileSystem
from prefect.results import ResultStore, resolve_result_storage

from tasks import tracking
from tasks.shards import read_manifest, sha256_file

PROJECT = ("tasks", "ssl_model")  # the packages whose code makes a stage's output


def code_version(module_name: str) -> str:
    """Digest of a stage module's source and of every project module it uses, directly or not."""
    seen: dict[str, str] = {}

    def visit(mod) -> None:
        if mod is None or mod.__name__ in seen or mod.__name__.split(".")[0] not in PROJECT:
            return
        seen[mod.__name__] = sha256_file(mod.__file__)
        for v in vars(mod).values():
            visit(v if inspect.ismodule(v) else sys.modules.get(getattr(v, "__module__", None) or ""))

    visit(sys.modules[module_name])
    return hashlib.sha256(json.dumps(sorted(seen.items())).encode()).hexdigest()


def cache_key(stage: str, code: str, sources: str | None, parameters: dict) -> str:
    """Same stage code, config section and inputs (by content): the earlier result is reused.
    A stage that follows another one still running has that one's cache key as its input."""
    ctx, section, inputs = parameters["ctx"], parameters["section"], parameters["inputs"]
    follow = parameters.get("follow")
    key = {"stage": stage, "code": code, "section": section, "sources": sources,
           "inputs": [m["digest"] for m in inputs] + ([follow["key"]] if follow else []),
           "scope": None if ctx["cache"]["across_runs"] else ctx["flow_run_id"]}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def result_storage(ctx: dict) -> Path | str:
    """Where manifests are persisted for reuse: a folder, or an fsspec URL (s3://...) every worker
    reaches, saved as a Prefect block (Prefect wants remote storage as a saved block)."""
    where, options = ctx["cache"]["storage"], ctx["cache"]["storage_options"]
    if "://" not in where or where.startswith("file://"):
        return Path(where.removeprefix("file://")).resolve()
    return _saved_block(where, json.dumps(options, sort_keys=True))


@functools.cache
def _saved_block(where: str, options: str) -> str:
    name = "ssl-results-" + hashlib.sha256(f"{where} {options}".encode()).hexdigest()[:16]
    RemoteFileSystem(basepath=where, settings=json.loads(options)).save(name, overwrite=True)
    return f"remote-file-system/{name}"


def result_store(ctx: dict) -> ResultStore:
    return ResultStore(result_storage=resolve_result_storage(result_storage(ctx)))


def stage_dir(ctx: dict, stage: str) -> Path:
    return Path(ctx["run_dir"]) / stage


def stage_task(name: str, sources: Callable[[dict, dict], str] | None = None,
               resumes: Callable[[dict], bool] | None = None) -> Callable:
    """``sources(ctx, section)``: a fingerprint of what a stage without inputs reads (collect).
    ``resumes(ctx)``: whether the stage will continue from what an earlier attempt of this flow
    run left (train: a checkpoint); it then continues in that attempt's MLflow run."""
    def decorate(fn: Callable) -> Callable:
        code: list[str] = []  # computed once the module has loaded (a plain closure: the task pickles, for Dask)

        def key(parameters: dict) -> str:
            if not code:
                code.append(code_version(fn.__module__))
            return cache_key(name, code[0], sources(parameters["ctx"], parameters["section"]) if sources else None,
                             parameters)

        @task(name=name, task_run_name=name, persist_result=True, result_serializer="json",
              description=fn.__doc__, cache_key_fn=lambda context, parameters: key(parameters))
        def run(ctx: dict, section: dict, inputs: list[dict], follow: dict | None = None) -> dict:
            """``follow``: {"stage", "key", "state"} of a stage still running whose output this one
            reads as it is written (pass it wrapped in ``prefect.utilities.annotations.quote``)."""
            run_id = tracking.start_stage_run(ctx["parent_run_id"], name, ctx["flow_run_id"],
                                              key(dict(ctx=ctx, section=section, inputs=inputs, follow=follow)),
                                              resume=bool(resumes and resumes(ctx)))
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
        run.key = lambda ctx, section, inputs, follow=None: key(
            {"ctx": ctx, "section": section, "inputs": inputs, "follow": follow})
        return run
    return decorate


def prepared(stage: Task, ctx: dict, section: dict, inputs: list[dict], follow: dict | None = None) -> Task:
    """The stage task with the run's result storage; a cached result whose data folder is gone
    (someone cleaned ``data_dir``) is recomputed instead of handed on."""
    key, store = stage.key(ctx, section, inputs, follow), result_store(ctx)
    stale = store.exists(key) and not Path(store.read(key).result["dir"]).is_dir()
    return stage.with_options(result_storage=result_storage(ctx), refresh_cache=True if stale else None)
