"""Lineage audit: from a registered model back to the pages it learned from, and the fate of one page.

Everything comes from what runs recorded, so any past run can be audited: MLflow runs and their
tags, the datasets each stage logged with ``mlflow.log_input`` (its Parquet folder and digest),
each stage's ``manifest.json`` artifact, and the Parquet shards those point at.

The chain is walked backwards from a stage run: its input dataset names the stage that made it
and that output's digest. The run that made it is the one its pipeline run recorded (tag
``ssl_pipeline.<stage>.mlflow_run_id``, which also names stages reused from earlier runs), else
the run of that stage whose logged output has the same digest and folder.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from datetime import datetime
from pathlib import Path
from urllib.parse import urldefrag, urlsplit, urlunsplit

import mlflow
import pyarrow.parquet as pq
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from tasks.config import DATA_STAGES
from tasks.shards import read_schema, read_table
from tasks.tracking import FLOW_RUN_TAG, STAGE_TAG, LineageError, client, model_version, reasons_text

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # manifests are tiny
STAGES = (*DATA_STAGES, "train")
PARENT_TAG = "mlflow.parentRunId"
BULKY = {"html", "text"}                      # never read here
IDENTITY = {"doc_id", "source", "url", "fetched_at", "status", "content_sha256", "record_id", "reason"}
DOC_ID_RE = re.compile(r"[0-9a-f]{32}")
DEFAULT_PORTS = {"http": ":80", "https": ":443"}


# --- MLflow: model, runs, datasets, manifests ---------------------------------------------------

def get_run(run_id: str) -> Run:
    try:
        return client().get_run(run_id)
    except MlflowException as e:
        raise LineageError(f"no MLflow run {run_id} at {mlflow.get_tracking_uri()} ({e.message})") from None


def datasets(run: Run, context: str) -> list[dict]:
    """The datasets a run logged with this context (source, input, output): name, folder or URL, digest."""
    out = []
    for d in run.inputs.dataset_inputs:
        tags = {t.key: t.value for t in d.tags}
        if tags.get("mlflow.data.context") == context:
            source = json.loads(d.dataset.source)
            out.append({"name": d.dataset.name, "source": source.get("uri") or source.get("url") or d.dataset.source,
                        "source_type": d.dataset.source_type, "digest": tags.get("sha256", d.dataset.digest),
                        "mlflow_digest": d.dataset.digest})
    return out


def manifest(run: Run) -> dict:
    try:
        return mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/manifest.json")
    except MlflowException as e:
        raise LineageError(f"MLflow run {run.info.run_id} has no readable manifest.json ({e.message})") from None


def producer(consumer: Run, ds: dict) -> Run:
    """The stage run whose output is ``consumer``'s input dataset ``ds``."""
    parent = consumer.data.tags.get(PARENT_TAG)
    recorded = parent and get_run(parent).data.tags.get(f"ssl_pipeline.{ds['name']}.mlflow_run_id")
    if recorded:
        return get_run(recorded)
    experiments = [e.experiment_id for e in client().search_experiments()]
    runs = client().search_runs(experiments, f"tags.`{STAGE_TAG}` = '{ds['name']}' and "
                                             f"datasets.digest = '{ds['mlflow_digest']}'",
                                order_by=["attributes.start_time DESC"])
    made = [r for r in runs if any(o["source"] == ds["source"] for o in datasets(r, "output"))]
    if not made:
        raise LineageError(f"no MLflow run of stage {ds['name']} logged {ds['source']} (digest {ds['digest']}) "
                           f"as its output, the input of run {consumer.info.run_id}")
    return min(made, key=lambda r: r.data.tags.get(PARENT_TAG) != parent)   # same pipeline run first


def chain(run: Run) -> list[dict]:
    """The stage runs from ``run`` back to collect, each with its manifest, its output and input
    datasets, and what does not agree (``problems``)."""
    links: list[dict] = []
    while run is not None and len(links) < len(STAGES):
        stage = run.data.tags.get(STAGE_TAG)
        if stage not in STAGES:
            raise LineageError(f"MLflow run {run.info.run_id} is not a pipeline stage run (tag {STAGE_TAG}: {stage})")
        m = manifest(run)
        outputs, inputs = datasets(run, "output"), datasets(run, "input")
        problems = [] if Path(m["dir"]).is_dir() else [f"data folder {m['dir']} is gone"]
        if not outputs or outputs[0]["digest"] != m["digest"] or outputs[0]["mlflow_digest"] != m["digest"][:36]:
            problems.append("the logged output dataset's digest differs from manifest.json")
        # the stage before it in the chain (decontaminate also reads the evaluation sources' extract)
        before = STAGES[STAGES.index(stage) - 1] if STAGES.index(stage) else None
        inputs = sorted(inputs, key=lambda d: d["name"] != before)
        links.append({"stage": stage, "run": run, "manifest": m, "output": outputs[0] if outputs else None,
                      "input": inputs[0] if inputs else None, "problems": problems})
        run = producer(run, inputs[0]) if inputs else None
        if run is not None and (datasets(run, "output") or [{}])[0].get("digest") != inputs[0]["digest"]:
            problems.append(f"input digest differs from the output of {inputs[0]['name']} run {run.info.run_id}")
    return links


def latest_pipeline_run(experiment: str) -> Run:
    exp = client().get_experiment_by_name(experiment)
    if exp is None:
        raise LineageError(f"no MLflow experiment {experiment!r} at {mlflow.get_tracking_uri()}")
    runs = client().search_runs([exp.experiment_id], f"tags.`{FLOW_RUN_TAG}` IS NOT NULL and tags.`{STAGE_TAG}` "
                                                     "IS NULL and tags.`ssl_pipeline.kind` IS NULL and "
                                                     "attributes.status = 'FINISHED'",
                                order_by=["attributes.end_time DESC"], max_results=1)
    if not runs:
        raise LineageError(f"no finished pipeline run in MLflow experiment {experiment!r}")
    return runs[0]


def last_stage_run(pipeline_run: Run, stages: tuple[str, ...] = STAGES) -> Run:
    """The latest of ``stages`` a pipeline (parent) run has, as it recorded it, else its last finished
    nested run of them."""
    tags = pipeline_run.data.tags
    for stage in reversed(stages):
        if f"ssl_pipeline.{stage}.mlflow_run_id" in tags:
            return get_run(tags[f"ssl_pipeline.{stage}.mlflow_run_id"])
    runs = [r for r in client().search_runs([pipeline_run.info.experiment_id],
                                            f"tags.`{PARENT_TAG}` = '{pipeline_run.info.run_id}' and "
                                            f"attributes.status = 'FINISHED'")
            if r.data.tags.get(STAGE_TAG) in stages]
    if not runs:
        raise LineageError(f"MLflow run {pipeline_run.info.run_id} has no finished stage runs "
                           f"({', '.join(stages)})")
    return max(runs, key=lambda r: (stages.index(r.data.tags[STAGE_TAG]), r.info.start_time))


# --- the data: Parquet shards of a stage ---------------------------------------------------------

def shard_paths(m: dict, dropped: bool = False) -> list[Path]:
    return [Path(m["dir"]) / f["path"] for f in m["dropped_files" if dropped else "files"]
            if f["path"].endswith(".parquet")]


def lookup(paths: list[Path], column: str, values: list[str]) -> list[dict]:
    """The rows whose ``column`` is one of ``values``, without the text columns."""
    rows = []
    for path in paths if values else []:   # no values: nothing to read
        names = [n for n in pq.read_schema(path).names if n not in BULKY]
        if column in names:
            rows += pq.read_table(path, columns=names, filters=[(column, "in", values)]).to_pylist()
    return [plain(r) for r in rows]


def plain(row: dict) -> dict:
    """JSON-ready: times as ISO 8601, NaN as None."""
    return {k: v.isoformat() if isinstance(v, datetime) else None if isinstance(v, float) and math.isnan(v) else v
            for k, v in row.items()}


def counts_by_source(m: dict, dropped: bool = False) -> Counter:
    if not shard_paths(m, dropped):
        return Counter()
    values = read_table(m, dropped, columns=["source"])["source"].value_counts().to_pylist()
    return Counter({d["values"]: d["counts"] for d in values})


def url_key(url: str) -> str:
    """A URL as compared here: no fragment, scheme and host in lower case, no default port, no trailing slash."""
    parts = urlsplit(urldefrag(url.strip())[0])
    scheme = parts.scheme.lower()
    netloc = parts.netloc.lower().removesuffix(DEFAULT_PORTS.get(scheme, "\0"))
    return urlunsplit((scheme, netloc, parts.path.rstrip("/"), parts.query, ""))


# --- lineage MODEL_URI ---------------------------------------------------------------------------

def lineage(model_uri: str) -> dict:
    """Registered model -> training run -> token shards -> datasets of every stage -> sources."""
    mv = model_version(model_uri)
    links = chain(get_run(mv.run_id))
    train = links[0]["run"]
    parent = train.data.tags.get(PARENT_TAG)
    return {"model": {"uri": model_uri, "name": mv.name, "version": str(mv.version), "status": mv.status,
                      "mlflow_run_id": mv.run_id, "source": mv.source},
            "pipeline_run": {"mlflow_run_id": parent, "prefect_flow_run_id": train.data.tags.get(FLOW_RUN_TAG),
                             "run_name": parent and get_run(parent).info.run_name},
            "evaluation": {k.removeprefix("eval."): v for k, v in sorted((mv.tags or {}).items())
                           if k.startswith("eval.")},
            "stages": [stage_summary(link) for link in links],
            "sources": sources(links)}


def stage_summary(link: dict) -> dict:
    m, run = link["manifest"], link["run"]
    out = {"stage": link["stage"], "mlflow_run_id": run.info.run_id, "status": run.info.status,
           "pipeline_run_id": run.data.tags.get(PARENT_TAG), "prefect_flow_run_id": run.data.tags.get(FLOW_RUN_TAG),
           "dir": m["dir"], "digest": m["digest"], "logged_digest": (link["output"] or {}).get("digest"),
           "input": link["input"] and {k: link["input"][k] for k in ("name", "source", "digest")},
           "docs_in": m.get("input_rows", m["rows"] + m["dropped"]), "docs_out": m["rows"],
           "dropped": m["dropped"], "reasons": m["reasons"], "problems": link["problems"]}
    if link["stage"] == "tokenize":
        size = {"uint16": 2, "uint32": 4}[m["dtype"]]
        out["token_shards"] = [{"path": f["path"], "sha256": f["sha256"], "tokens": f["bytes"] // size}
                               for f in m["files"] if f["path"].endswith(".bin")]
        out.update({k: m[k] for k in ("train_tokens", "val_tokens", "vocab_size", "dtype")})
    if link["stage"] == "train":
        out.update({k: m.get(k) for k in ("model_uri", "checkpoint", "val_loss", "params", "objective", "init_from")})
    if link["stage"] == "dedup":
        out["clusters"] = m.get("clusters")
    return out


def sources(links: list[dict]) -> dict:
    """What collect read (its logged source datasets), and documents by source after each stage."""
    by_stage = {link["stage"]: link for link in links}
    if "collect" not in by_stage:
        return {"datasets": [], "documents": []}
    counts: dict[str, dict] = {}
    for stage in ("collect", "extract", "filter", "dedup", "decontaminate"):
        if stage in by_stage and Path(by_stage[stage]["manifest"]["dir"]).is_dir():
            m = by_stage[stage]["manifest"]
            for kind in ("kept", "dropped"):
                for source, n in counts_by_source(m, kind == "dropped").items():
                    counts.setdefault(source, {"source": source, "kept": {}, "dropped": {}})[kind][stage] = n
    before = by_stage.get("decontaminate") or by_stage.get("dedup")
    if "tokenize" in by_stage and before and Path(before["manifest"]["dir"]).is_dir():
        tok = by_stage["tokenize"]["manifest"]
        ids = {r["doc_id"] for p in shard_paths(tok) for r in pq.read_table(p, columns=["doc_id"]).to_pylist()}
        docs = read_table(before["manifest"], columns=["doc_id", "source"]).to_pylist()
        for source, n in Counter(d["source"] for d in docs if d["doc_id"] in ids).items():
            counts.setdefault(source, {"source": source, "kept": {}, "dropped": {}})["kept"]["tokenize"] = n
    return {"datasets": [{k: d[k] for k in ("name", "source_type", "source")}
                         for d in datasets(by_stage["collect"]["run"], "source")],
            "documents": sorted(counts.values(), key=lambda c: c["source"])}


# --- why URL_OR_DOC_ID -----------------------------------------------------------------------------

def start_run(model: str | None, run: str | None, experiment: str) -> Run:
    """The stage run to walk back from: the model's training run, or the last stage of a pipeline run
    (``run``, default the latest finished one of ``experiment``). A stage run id works too."""
    if model:
        return get_run(model_version(model).run_id)
    r = get_run(run) if run else latest_pipeline_run(experiment)
    return r if STAGE_TAG in r.data.tags else last_stage_run(r)


def why(query: str, model: str | None = None, run: str | None = None, experiment: str = "ssl-pipeline") -> dict:
    """What became of the documents with this URL or doc_id in one pipeline run."""
    start = start_run(model, run, experiment)
    links = {link["stage"]: link for link in chain(start)}
    for stage, link in links.items():
        if stage != "train" and not Path(link["manifest"]["dir"]).is_dir():
            raise LineageError(f"the {stage} data of this run, {link['manifest']['dir']}, is gone")
    collect = links["collect"]["manifest"]
    q = query.strip()
    if DOC_ID_RE.fullmatch(q.lower()):
        q = q.lower()
        pages, failed = lookup(shard_paths(collect), "doc_id", [q]), []
    else:
        if "://" not in q and Path(q).exists():   # a local file given by its path
            q = Path(q).resolve().as_uri()
        key = url_key(q)
        urls = [u for dropped in (False, True) if shard_paths(collect, dropped)
                for u in set(read_table(collect, dropped, columns=["url"])["url"].to_pylist())
                if u and url_key(u) == key]
        pages, failed = lookup(shard_paths(collect), "url", urls), lookup(shard_paths(collect, True), "url", urls)
    parent = start.data.tags.get(PARENT_TAG)
    if not pages and not failed:
        raise LineageError(f"{query}: no document with this {'doc_id' if DOC_ID_RE.fullmatch(q) else 'URL'} "
                           f"was collected in pipeline run {parent} (collect data: {collect['dir']})", code=1)
    docs = [{**identity(row), "fate": "dropped", "dropped_at": "collect", "reason": row["reason"],
             "scores": added(row, None), "stages": []} for row in failed]
    return {"query": query, "pipeline_run_id": parent, "model": model,
            "documents": [fate(identity(p), links) for p in pages] + docs}


def identity(row: dict) -> dict:
    return {k: row.get(k) for k in ("doc_id", "url", "source", "fetched_at", "status", "content_sha256")}


def added(row: dict, before: dict | None) -> dict:
    """The columns a stage added to a row it dropped (scores, cluster, error), without empty ones."""
    known = set(read_schema(before).names) if before else set()
    return {k: v for k, v in row.items() if k not in known and k not in IDENTITY and v is not None}


def fate(doc: dict, links: dict) -> dict:
    """Follow one collected document through the stages this run has."""
    doc.update(stages=["collect"], fate="kept")
    previous = links["collect"]["manifest"]
    for stage in ("extract", "filter", "dedup", "decontaminate"):
        if stage not in links:
            doc["note"] = f"the pipeline run has no {stage} stage: it stopped after {doc['stages'][-1]}"
            return doc
        m = links[stage]["manifest"]
        if lookup(shard_paths(m), "doc_id", [doc["doc_id"]]):
            doc["stages"].append(stage)
            previous = m
            continue
        dropped = lookup(shard_paths(m, True), "doc_id", [doc["doc_id"]])
        if not dropped:
            doc.update(fate="missing", note=f"neither kept nor dropped by {stage}")
            return doc
        row = dropped[0]
        if row["reason"] == "held_out":   # set aside as text for the evaluate stage's suite
            doc["stages"].append(stage)
            doc.update(fate="held_out", heldout={"file": m.get("heldout", "heldout.parquet"), "dir": m["dir"]})
            return doc
        doc.update(fate="dropped", dropped_at=stage, reason=row["reason"], scores=added(row, previous))
        if row.get("duplicate_of"):
            survivor = lookup(shard_paths(m), "doc_id", [row["duplicate_of"]])
            doc["duplicate_of"] = {"doc_id": row["duplicate_of"], "url": survivor[0]["url"] if survivor else None}
        return doc
    if "tokenize" in links:
        tok = links["tokenize"]["manifest"]
        hit = [r for r in lookup(shard_paths(tok), "doc_id", [doc["doc_id"]]) if "shard" in r]   # the doc indexes
        if hit:
            sha = {f["path"]: f["sha256"] for f in tok["files"]}
            r = hit[0]
            doc["stages"].append("tokenize")
            doc["tokens"] = {"shard": r["shard"], "start": r["start"], "end": r["end"], "count": r["end"] - r["start"],
                             "split": r["shard"].split("-")[0], "shard_sha256": sha.get(r["shard"]),
                             "tokenize_dir": tok["dir"]}
    return doc


# --- text -----------------------------------------------------------------------------------------

def format_lineage(r: dict) -> str:
    m, p = r["model"], r["pipeline_run"]
    lines = [f"model      {m['uri']}  (version {m['version']}, {m['status']}, {m['source']})",
             f"training   MLflow run {m['mlflow_run_id']}  of pipeline run {p['mlflow_run_id']} ({p['run_name']}), "
             f"Prefect flow run {p['prefect_flow_run_id']}"]
    ev = r.get("evaluation") or {}
    if ev:
        lines += ["", f"evaluation MLflow run {ev.get('mlflow_run_id', '-')}, suite sha256 {ev.get('suite_sha256', '-')}"]
        lines += [f"{'':<10} {k} = {v}" for k, v in ev.items() if k not in ("mlflow_run_id", "suite_sha256")]
    for s in r["stages"]:
        reused = "" if s["pipeline_run_id"] == p["mlflow_run_id"] else \
            f", reused from pipeline run {s['pipeline_run_id']}"
        lines += ["", f"{s['stage']:<10} MLflow run {s['mlflow_run_id']}  ({s['status']}{reused})",
                  f"{'':<10} {s['dir']}"]
        if s["stage"] == "train":
            lines += [f"{'':<10} checkpoint {s['checkpoint']}  sha256 {s['digest']}",
                      f"{'':<10} {s['model_uri']}: {s['params']} parameters, {s['objective']}, "
                      f"val_loss {s['val_loss']:.4f}"]
            if s["init_from"]:
                src = s["init_from"]["source"]
                lines.append(f"{'':<10} started from {src}  (checkpoint sha256 {s['init_from']['sha256']}"
                             + (f"; its lineage: ssl-pipeline lineage {src})" if src.startswith("models:/") else ")"))
            continue
        lines.append(f"{'':<10} sha256 {s['digest']}")
        lines.append(f"{'':<10} documents in {s['docs_in']}, kept {s['docs_out']}, dropped {s['dropped']}"
                     f"{': ' + reasons_text(s['reasons']) if s['dropped'] else ''}")
        if s["stage"] == "tokenize":
            lines.append(f"{'':<10} tokens: train {s['train_tokens']}, val {s['val_tokens']} "
                         f"(vocab {s['vocab_size']}, {s['dtype']})")
            lines += [f"{'':<12}{t['path']:<18} {t['tokens']:>10} tokens  sha256 {t['sha256']}"
                      for t in s["token_shards"]]
    lines += ["", "sources"]
    lines += [f"{'':<10} {d['source']}  ({d['source_type']})" for d in r["sources"]["datasets"]]
    steps = ("collect", "extract", "filter", "dedup", "decontaminate", "tokenize")
    for c in r["sources"]["documents"]:
        lines.append(f"{'':<10} {c['source']}: " + ", ".join(
            f"{s} {c['kept'].get(s, 0)}" + (f" (-{c['dropped'][s]})" if c["dropped"].get(s) else "")
            for s in steps if s in c["kept"] or s in c["dropped"]))
    problems = [f"{s['stage']}: {x}" for s in r["stages"] for x in s["problems"]]
    lines += ["", "checks     " + ("; ".join(problems) if problems else
                                   "OK: every logged digest equals its manifest's and the next stage's input")]
    return "\n".join(lines)


def format_why(r: dict) -> str:
    lines = []
    for d in r["documents"]:
        http = f", HTTP {d['status']}" if d["status"] else ""
        lines += [f"{d['url']}", f"  doc_id     {d['doc_id'] or '-'}  (pipeline run {r['pipeline_run_id']})",
                  f"  collected  {d['fetched_at']} from {d['source']}{http}"]
        lines += [f"  {s:<10} kept" for s in d["stages"][1:] if s != "tokenize" and not (s == "decontaminate"
                                                                                    and "heldout" in d)]
        if d["fate"] == "dropped":
            lines.append(f"  {d['dropped_at']:<10} DROPPED: {d['reason']}")
            if "duplicate_of" in d:
                lines.append(f"  {'':<10} duplicate of {d['duplicate_of']['doc_id']} ({d['duplicate_of']['url']})")
            prefix = d["reason"].split(":")[0] + "." if ":" in d["reason"] else ""
            shown = {k: v for k, v in d["scores"].items() if k.startswith(prefix)} or d["scores"]
            lines += [f"  {'':<10} {k} = {v}" for k, v in shown.items() if k != "duplicate_of"]
        elif "heldout" in d:
            lines.append(f"  {'decontaminate':<10} held out for evaluation ({d['heldout']['file']}): never tokenized, "
                         "trained on or seen by the tokenizer")
        elif "tokens" in d:
            t = d["tokens"]
            lines.append(f"  {'tokenize':<10} {t['split']} shard {t['shard']}, tokens [{t['start']}, {t['end']}) "
                         f"= {t['count']} tokens (sha256 {t['shard_sha256']})")
        if d.get("note"):
            lines.append(f"  note       {d['note']}")
        lines.append("")
    return "\n".join(lines).rstrip()
