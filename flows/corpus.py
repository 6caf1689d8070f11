"""``ssl-pipeline export-corpus``: a run's curated documents as a Hugging Face ``datasets`` folder.

``OUT/data/train-00000-of-0000N.parquet`` (the text and what identifies each document, in the
stage's row order) and ``OUT/README.md``, a dataset card whose YAML front matter ``datasets``
reads (``load_dataset(OUT)``) and whose body holds the funnel, the pipeline's configuration and
the lineage. The folder is written beside OUT and renamed into place; the export is logged as a
dataset input (context ``export``) of the data run's pipeline run in MLflow.
"""

from __future__ import annotations

import os
import re
import shutil
from collections import Counter
from pathlib import Path

import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.exceptions import MlflowException

from flows.data_runs import DataRun, DataRunError, log_input
from tasks import tracking
from tasks.shards import fresh_tmp_dir, publish_dir, read_schema

CORPUS_STAGES = ("extract", "filter", "dedup", "decontaminate")   # stages whose rows are documents' text
COLUMNS = ("doc_id", "text", "url", "source", "title", "date", "language", "hostname", "fetched_at",
           "content_sha256")
SHARD_BYTES = 256 << 20          # text per Parquet file at most (one input shard is never split)
SIZES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
         (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")]
LANGUAGE_RE = re.compile(r"[a-z]{2,3}")


def default_stage(run: DataRun) -> str:
    """The training corpus: the last stage before tokenize that the run has."""
    found = [s for s in CORPUS_STAGES if s in run.manifests]
    if not found:
        raise DataRunError(f"{run.spec}: no stage with documents' text ({', '.join(CORPUS_STAGES)}) in "
                           f"{run.describe()}: it stopped after {next(reversed(run.manifests), 'nothing')}")
    return found[-1]


def export_corpus(run: DataRun, out: str | Path, stage: str | None = None, force: bool = False,
                  shard_bytes: int = SHARD_BYTES) -> dict:
    """Write ``stage``'s kept documents (default: :func:`default_stage`) to ``out``; what was written."""
    stage = stage or default_stage(run)
    if stage not in CORPUS_STAGES:
        raise DataRunError(f"--stage {stage}: not a stage with documents' text ({', '.join(CORPUS_STAGES)})")
    if stage not in run.manifests:
        raise DataRunError(f"{run.spec}: {run.describe()} has no {stage} stage "
                           f"(it has {', '.join(run.manifests) or 'none'})")
    m = run.manifests[stage]
    if not Path(m["dir"]).is_dir():
        raise DataRunError(f"the {stage} data of {run.spec}, {m['dir']}, is gone")
    out = Path(out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise DataRunError(f"{out} exists and is not an empty folder (--force replaces it)")
    tmp = fresh_tmp_dir(out)
    try:
        rows, files, schema, languages = _write_shards(m, tmp / "data", shard_bytes)
        config = _config_yaml(run)
        (tmp / "README.md").write_text(card(run, stage, rows, schema, languages, config, out))
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result = {"dir": str(out), "stage": stage, "rows": rows, "files": files, "digest": m["digest"],
              "mlflow_run_id": run.mlflow_run_id, "dataset": out.name}
    if run.mlflow_run_id:
        source = LocalArtifactDatasetSource(str(out))
        log_input(run.mlflow_run_id, MetaDataset(source, name=out.name, digest=m["digest"][:36]), "export",
                  {"sha256": m["digest"], "stage": stage, "rows": str(rows)})
        result["mlflow_run_url"] = tracking.run_url(run.mlflow_run_id)
    return result


def _write_shards(m: dict, folder: Path, shard_bytes: int) -> tuple[int, list[str], pa.Schema, Counter]:
    """The stage's kept rows, shard after shard in its manifest's order, as train-*.parquet files
    of about ``shard_bytes`` of text each."""
    folder.mkdir(parents=True)
    paths = [Path(m["dir"]) / f["path"] for f in m["files"] if f["path"].endswith(".parquet")]
    names = set(read_schema(m).names)
    columns = [c for c in COLUMNS if c in names]
    parts, pending, size, rows, languages, schema = [], [], 0, 0, Counter(), None

    def flush() -> None:
        table = pa.concat_tables(pending) if pending else pa.table({c: pa.array([], pa.string()) for c in columns})
        part = folder / f".part-{len(parts):05d}.parquet"
        pq.write_table(table, part, compression="zstd", row_group_size=10_000)
        parts.append(part)

    for path in paths:
        table = pq.read_table(path, columns=columns)
        schema = schema or table.schema
        rows += table.num_rows
        if "language" in columns:
            languages.update(v for v in table["language"].to_pylist() if v)
        if pending and size + table["text"].nbytes > shard_bytes:
            flush()
            pending, size = [], 0
        pending.append(table)
        size += table["text"].nbytes
    if pending or not parts:
        flush()
    files = [f"data/train-{i:05d}-of-{len(parts):05d}.parquet" for i in range(len(parts))]
    for part, name in zip(parts, files):
        os.replace(part, folder.parent / name)
    return rows, files, schema or pq.read_schema(folder.parent / files[0]), languages


def _config_yaml(run: DataRun) -> str | None:
    """The configuration the data run's pipeline run recorded (None: not in MLflow)."""
    if not run.mlflow_run_id:
        return None
    try:
        return mlflow.artifacts.load_text(f"runs:/{run.mlflow_run_id}/config/resolved.yaml")
    except (MlflowException, OSError):
        return None


# --- the dataset card ----------------------------------------------------------------------------

def feature(t: pa.DataType) -> str:
    """A column's type as ``datasets`` names it in a card's ``dataset_info``."""
    names = {pa.string(): "string", pa.large_string(): "large_string", pa.int64(): "int64",
             pa.int32(): "int32", pa.float64(): "float64", pa.float32(): "float32", pa.bool_(): "bool"}
    return names.get(t, str(t))   # timestamp[us, tz=UTC]


def size_category(n: int) -> str:
    return next((name for limit, name in SIZES if n < limit), "n>1B")


def card(run: DataRun, stage: str, rows: int, schema: pa.Schema, languages: Counter, config: str | None,
         out: Path) -> str:
    """README.md: YAML front matter for ``datasets`` and the Hub, then funnel, lineage and config."""
    codes = Counter()
    for value, n in languages.items():   # "en", "en-US" -> en
        if LANGUAGE_RE.fullmatch(code := value.lower().split("-")[0].split("_")[0]):
            codes[code] += n
    front = {"pretty_name": out.name, "license": "unknown",
             **({"language": [c for c, _ in codes.most_common()]} if codes else {}),
             "size_categories": [size_category(rows)], "task_categories": ["text-generation"],
             "tags": ["ssl-pipeline", f"stage:{stage}"],
             "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}],
             "dataset_info": {"features": [{"name": f.name, "dtype": feature(f.type)} for f in schema],
                              "splits": [{"name": "train", "num_examples": rows}]}}
    order = list(run.manifests)
    stages = {s: m for s, m in run.manifests.items() if order.index(s) <= order.index(stage)}   # up to the export
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", f"# {out.name}", "",
             (f"{rows} documents: those the **{stage}** stage of an ssl-pipeline run kept, in its order "
              f"(digest `{run.manifests[stage]['digest']}`)."), "",
             "```python", "from datasets import load_dataset", "",
             f"corpus = load_dataset({str(out)!r}, split=\"train\")", "```", "",
             "## Columns", "", "| column | type |", "|---|---|"]
    lines += [f"| {f.name} | {feature(f.type)} |" for f in schema]
    lines += ["", "## Funnel", "", "Documents per stage, and those dropped by reason.", "",
              "| stage | docs in | docs out | dropped | dropped by reason |", "|---|---:|---:|---:|---|"]
    lines += [f"| {r['stage']} | {r['docs_in']} | {r['docs_out']} | {r['dropped']} | {r['dropped_by_reason']} |"
              for r in tracking.funnel(stages)]
    lines += ["", "## Lineage", "",
              f"- Pipeline run (MLflow): {run.mlflow_run_id or 'not recorded'}"
              + (f" ({tracking.run_url(run.mlflow_run_id)})" if run.mlflow_run_id else ""),
              f"- Prefect flow run: {run.flow_run_id or 'not recorded'}"]
    sources = run.manifests.get("collect", {}).get("sources", [])
    lines += [f"- Sources: {', '.join(sources)}" if sources else "- Sources: not recorded", "",
              "| stage | sha256 | MLflow run | folder |", "|---|---|---|---|"]
    lines += [f"| {s} | `{m['digest']}` | {m.get('mlflow_run_id', '-')} | `{m['dir']}` |" for s, m in stages.items()]
    lines += ["", "## Configuration", ""]
    lines += (["The pipeline run's resolved configuration:", "", "```yaml", config.rstrip(), "```"] if config
              else ["Not recorded (the run is not in MLflow)."])
    return "\n".join(lines) + "\n"
