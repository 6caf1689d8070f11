"""Stage 7, evaluate: what the model learned, scored by lm-evaluation-harness.

The default suite is built from the documents the decontaminate stage set aside (held out by
doc_id hash, and the pages of ``evaluate.sources``; never seen by the tokenizer or the model)
and written as ordinary lm-eval tasks, YAML over JSON Lines, that anyone with lm-eval can run
again:

- ``ssl_heldout_bpb``: bits per byte (and word perplexity) of every held-out document
  (``loglikelihood_rolling``), comparable across tokenizers;
- ``ssl_continuation``: HellaSwag's form: a passage, its true continuation among three taken
  from other held-out documents (``acc``, ``acc_norm``);
- ``ssl_cloze``: LAMBADA's form: the last word of a passage (``acc``).

Causal models are scored through their Hugging Face export with lm-eval's ``HFLM``, beside an
untrained model of the same shape (chance, measured) and any baselines named in the config.
Encoders (mlm, contrastive) get a transfer probe instead (tasks/probe.py). Every metric comes
with its standard error.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import time
from pathlib import Path

import mlflow
import pyarrow.parquet as pq
import torch
import yaml
from mlflow.entities import Metric
from prefect.artifacts import create_table_artifact
from tokenizers import Tokenizer

from ssl_model.checkpoint import load_checkpoint, load_model, model_from
from ssl_model.config import ModelConfig
from ssl_model.export import export_checkpoint, export_hf
from ssl_model.model import GPT
from tasks import tracking
from tasks.compare import text_table
from tasks.config import EvaluateConfig, PipelineConfig
from tasks.harness import TaskDataMissing, load_tasks, quiet_harness, task_manager  # noqa: F401
from tasks.probe import probe
from tasks.shards import fresh_tmp_dir, publish_dir
from tasks.stage import stage_dir, stage_task
from tasks.train import REMOTE, download_checkpoint, init_source

SUITE = ("ssl_heldout_bpb", "ssl_continuation", "ssl_cloze")
CONTEXT_WORDS, ENDING_WORDS, CHOICES = 32, 16, 4     # continuation: passage, ending, choices
ENDING_CHARS, MIN_ENDING_WORDS = 60, 3               # an ending: its words that fit in 60 characters
CLOZE_WORDS, CLOZE_MIN_CONTEXT = 48, 24              # cloze: longest passage, least context
CLOZE_TARGET = re.compile(r"[^\W\d_]{2,20}")         # a cloze answer is a word of 2-20 letters
PROBE_WORDS, PROBE_PER_DOC = 32, 40                  # the probe's passages: words, at most per document
MIN_BLOCK = 64                                       # a model's context must hold an answer (tokens)
ROLLING = ("word_perplexity", "byte_perplexity", "bits_per_byte")

TASK_YAML = {
    "ssl_heldout_bpb": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "text",
                        "metric_list": [{"metric": m, "aggregation": a, "higher_is_better": False} for m, a in
                                        zip(ROLLING, ("weighted_perplexity", "weighted_perplexity", "bits_per_byte"))]},
    "ssl_continuation": {"output_type": "multiple_choice", "doc_to_text": "context", "doc_to_choice": "endings",
                         "doc_to_target": "label", "target_delimiter": "",
                         "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                         for m in ("acc", "acc_norm")]},
    "ssl_cloze": {"output_type": "loglikelihood", "doc_to_text": "context", "doc_to_target": "continuation",
                  "target_delimiter": "",
                  "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                                  {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False}]},
}


# -- the suite ---------------------------------------------------------------------------------

def read_heldout(manifest: dict) -> list[dict]:
    """The evaluation documents the decontaminate stage set aside (held out, and those of
    ``evaluate.sources``), in doc_id order."""
    name = manifest.get("heldout")
    if not name:
        raise ValueError(f"the {manifest.get('stage', 'stage')} output in {manifest['dir']} holds no documents out "
                         "for evaluation (its manifest has no 'heldout' file): give the evaluate stage the "
                         "decontaminate stage's manifest, or raise decontaminate.heldout_fraction")
    return sorted(pq.read_table(Path(manifest["dir"]) / name).to_pylist(), key=lambda r: r["doc_id"])


def _spread(items: list, n: int) -> list:
    """At most ``n`` of ``items``, evenly spread over them."""
    if len(items) <= n:
        return items
    return [items[i * len(items) // n] for i in range(n)]


def _spans(text: str) -> list[tuple[int, int]]:
    """Where each whitespace-separated word of ``text`` is."""
    return [m.span() for m in re.finditer(r"\S+", text)]


def _clip(text: str, spans: list[tuple[int, int]], start: int) -> str:
    """The text of the words from ``start`` that fits in ENDING_CHARS (at most ENDING_WORDS of
    them): an ending of at most ENDING_CHARS + 1 bytes fits any model of MIN_BLOCK tokens or more."""
    end = start
    while end < min(start + ENDING_WORDS, len(spans)) and spans[end][1] - spans[start][0] <= ENDING_CHARS:
        end += 1
    return text[spans[start][0]:spans[end - 1][1]] if end > start else ""


def continuation_items(docs: list[dict], per_doc: int, rng: random.Random) -> list[dict]:
    """Passages and endings are the documents' own text (line breaks kept), as the model read text."""
    spans = {d["doc_id"]: _spans(d["text"]) for d in docs}
    items = []
    for d in docs:
        text, w = d["text"], spans[d["doc_id"]]
        others = [o for o in docs if o["doc_id"] != d["doc_id"] and len(spans[o["doc_id"]]) >= ENDING_WORDS]
        if not others:
            continue
        span = CONTEXT_WORDS + ENDING_WORDS
        for s in _spread(range(0, len(w) - span + 1, span), per_doc):
            true = _clip(text, w, s + CONTEXT_WORDS)
            if len(true.split()) < MIN_ENDING_WORDS:
                continue
            # other documents' passages as long as the true ending, within 10 %: length is no cue
            # (a model that knows nothing, scoring about the same per token, picks the shortest)
            endings, near = [], max(2, len(true) // 10)
            for _ in range(500):
                other = rng.choice(others)
                ow = spans[other["doc_id"]]
                ending = _clip(other["text"], ow, rng.randrange(len(ow) - ENDING_WORDS + 1))
                if abs(len(ending) - len(true)) <= near and ending != true and ending not in endings:
                    endings.append(ending)
                if len(endings) == CHOICES - 1:
                    break
            else:   # text of long tokens (code, URLs) may leave none
                continue
            label = rng.randrange(CHOICES)
            endings.insert(label, true)
            # every ending after the whitespace the true one follows (a space, a line break, the
            # no-break spaces of pydoc's docstrings): the same for all, so it tells nothing
            sep = text[w[s + CONTEXT_WORDS - 1][1]:w[s + CONTEXT_WORDS][0]]
            items.append({"doc_id": d["doc_id"], "context": text[w[s][0]:w[s + CONTEXT_WORDS - 1][1]],
                          "endings": [sep + e for e in endings], "label": label})
    return items


def cloze_items(docs: list[dict], per_doc: int) -> list[dict]:
    items = []
    for d in docs:
        text, w = d["text"], _spans(d["text"])
        found = []
        for s in range(0, len(w) - CLOZE_WORDS + 1, CLOZE_WORDS):
            # the passage ends at the last all-letter word of its window that leaves enough context
            for e in range(s + CLOZE_WORDS - 1, s + CLOZE_MIN_CONTEXT - 1, -1):
                if CLOZE_TARGET.fullmatch(text[w[e][0]:w[e][1]]):
                    # the answer with the whitespace before it in the text (a space, a line break, a
                    # no-break space): the model is asked for the text as it is
                    found.append({"doc_id": d["doc_id"], "context": text[w[s][0]:w[e - 1][1]],
                                  "target": text[w[e][0]:w[e][1]], "continuation": text[w[e - 1][1]:w[e][1]]})
                    break
        items += _spread(found, per_doc)
    return items


def too_few_to_evaluate(cfg: PipelineConfig, decontaminated: dict) -> str | None:
    """Why this stage could not score a model trained on the decontaminate stage's output, said
    before training: its suite (and a non-causal model's probe) needs at least 2 evaluation documents."""
    held, sources = decontaminated.get("heldout_docs", 0), decontaminated.get("eval_source_docs", 0)
    if not cfg.evaluate.enabled or held + sources >= 2 or not (cfg.evaluate.suite or cfg.train.objective != "causal"):
        return None
    return (f"decontaminate: {held + sources} evaluation document(s) for {decontaminated['input_rows']} documents "
            f"(held out: {held}, decontaminate.heldout_fraction {cfg.decontaminate.heldout_fraction} of 10 or more "
            f"documents; from evaluate.sources: {sources}); the evaluate stage needs at least 2: add documents, "
            "name evaluate.sources, or set evaluate.enabled=false")


def build_suite(docs: list[dict], folder: str | Path, max_items: int = 500, seed: int = 0) -> dict:
    """Write the suite's JSON Lines and lm-eval YAML files into ``folder`` (replaced if there);
    returns {"dir", "tasks", "items": {task: n}, "docs", "digest"}."""
    if len(docs) < 2:
        raise ValueError(f"{len(docs)} held-out document(s): the evaluate suite needs at least 2 "
                         "(raise decontaminate.heldout_fraction, or add documents)")
    folder = Path(folder)
    tmp = fresh_tmp_dir(folder)
    per_doc = max(1, -(-max_items // len(docs)))
    data = {"ssl_heldout_bpb": [{"doc_id": d["doc_id"], "text": d["text"]} for d in _spread(docs, max_items)],
            "ssl_continuation": continuation_items(docs, per_doc, random.Random(seed))[:max_items],
            "ssl_cloze": cloze_items(docs, per_doc)[:max_items]}
    for task, rows in data.items():
        if not rows:
            raise ValueError(f"the {len(docs)} held-out documents are too short for {task} (passages of "
                             f"{CONTEXT_WORDS + ENDING_WORDS} words): raise decontaminate.heldout_fraction")
        with open(tmp / f"{task}.jsonl", "w") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    write_task_yamls(tmp)
    publish_dir(tmp, folder)
    relocate_suite(folder)
    return {"dir": str(folder), "tasks": list(SUITE), "items": {t: len(r) for t, r in data.items()},
            "docs": len(docs), "digest": suite_digest(folder)}


def write_task_yamls(folder: Path) -> None:
    """The suite's lm-eval task files (``lm_eval --include_path FOLDER --tasks ssl_cloze``)."""
    for task, spec in TASK_YAML.items():
        cfg = {"task": task, "tag": ["ssl_suite"], "dataset_path": "json",
               "dataset_kwargs": {"data_dir": str(folder.resolve()), "data_files": {"test": f"{task}.jsonl"}},
               "test_split": "test", **spec, "metadata": {"version": 1.0}}
        (folder / f"{task}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def relocate_suite(folder: str | Path) -> Path:
    """Point a suite's task files at the folder they are in now (their ``data_dir``), changing
    nothing else: a suite downloaded or moved is scored as it was written."""
    folder = Path(folder).resolve()
    for task in SUITE:
        path = folder / f"{task}.yaml"
        if not path.is_file() or not (folder / f"{task}.jsonl").is_file():
            raise FileNotFoundError(f"{folder} is not an evaluation suite folder ({path.name} or its .jsonl missing)")
        cfg = yaml.safe_load(path.read_text())
        cfg["dataset_kwargs"]["data_dir"] = str(folder)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return folder


def suite_digest(folder: str | Path) -> str:
    """sha256 of the suite's items and task files (where they lie left out)."""
    h = hashlib.sha256()
    for task in SUITE:
        cfg = yaml.safe_load((Path(folder) / f"{task}.yaml").read_text())
        cfg["dataset_kwargs"].pop("data_dir", None)
        h.update(hashlib.sha256((Path(folder) / f"{task}.jsonl").read_bytes()).digest())
        h.update(hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).digest())
    return h.hexdigest()


# -- the harness -------------------------------------------------------------------------------

def harness_model(hf_dir: str | Path, batch_size: int, device: str):
    from lm_eval.models.huggingface import HFLM
    return HFLM(pretrained=str(hf_dir), tokenizer=str(hf_dir), device=device, batch_size=batch_size,
                dtype="float32", backend="causal")


def run_harness(lm, loaded: dict, limit: int | None, bootstrap_iters: int = 0) -> dict:
    """lm-eval's evaluator over loaded tasks: its results dict, samples included (simple_evaluate
    without its task loading and environment report, which take seconds each time). No bootstrap:
    lm-eval's runs a multiprocessing pool forked from this process, whose workers can hang on a
    lock a thread held (seen inside a Prefect flow); standard errors come from the samples
    (``scores``)."""
    import lm_eval
    from lm_eval.evaluator import evaluate
    results = evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=bootstrap_iters, log_samples=True,
                       verbosity="WARNING")
    results["config"] = {"model": "hf", "batch_size": lm.batch_size, "device": str(lm.device), "limit": limit,
                         "bootstrap_iters": bootstrap_iters, "lm_eval_version": lm_eval.__version__}
    return results


def ratio_stderr(num: list[float], den: list[float]) -> float:
    """Standard error of sum(num) / sum(den) over independent items (the delta method)."""
    n = len(num)
    if n < 2 or not sum(den):
        return float("nan")
    r, mean_den = sum(num) / sum(den), sum(den) / n
    var = sum((x - r * y) ** 2 for x, y in zip(num, den)) / (n - 1)
    return math.sqrt(var / n) / mean_den


def mean_stderr(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def sample_stderrs(metrics: dict, samples: list[dict]) -> None:
    """Standard errors from the per-item values: of a mean (accuracies) as lm-eval computes it; of
    perplexity exp(-mean log-likelihood) and of the rolling ratios (bits per byte: summed bits over
    summed bytes) by the delta method. Only where the item values reproduce the score."""
    for name, m in metrics.items():
        values = [s.get(name) for s in samples]
        if any(v is None for v in values):
            continue
        if all(isinstance(v, (int, float)) for v in values):
            mean = sum(values) / len(values)
            if abs(mean - m["value"]) <= 1e-9 * max(1.0, abs(m["value"])):
                m["stderr"] = mean_stderr(values)
            elif name == "perplexity" and math.isclose(math.exp(-mean), m["value"], rel_tol=1e-6):
                m["stderr"] = m["value"] * mean_stderr(values)
        elif all(isinstance(v, (list, tuple)) and len(v) == 2 for v in values):   # (log-likelihood, units)
            nll, units = [-v[0] for v in values], [v[1] for v in values]
            rate = sum(nll) / sum(units)
            if name == "bits_per_byte" and math.isclose(rate / math.log(2), m["value"], rel_tol=1e-6):
                m["stderr"] = ratio_stderr(nll, units) / math.log(2)
            elif name.endswith("perplexity") and math.isclose(math.exp(rate), m["value"], rel_tol=1e-6):
                m["stderr"] = m["value"] * ratio_stderr(nll, units)


def scores(results: dict) -> dict[str, dict[str, dict]]:
    """{task: {metric: {"value", "stderr", "n", "chance"?}}} from lm-eval's results, standard
    errors computed from the items (``sample_stderrs``) where lm-eval gives none."""
    out: dict[str, dict] = {}
    for task, res in results["results"].items():
        samples = results.get("samples", {}).get(task, [])
        n = results.get("n-samples", {}).get(task, {}).get("effective", len(samples))
        metrics = {}
        for key, value in res.items():
            metric, _, filt = key.partition(",")
            if metric.endswith("_stderr") or metric in ("alias", "sample_len") or not isinstance(value, (int, float)):
                continue
            stderr = res.get(f"{metric}_stderr,{filt}")
            metrics[metric] = {"value": float(value), "n": n,
                               "stderr": float(stderr) if isinstance(stderr, (int, float)) else float("nan")}
        if samples:
            sample_stderrs(metrics, samples)
        if samples and "acc" in metrics and samples[0].get("arguments") and len(samples[0]["arguments"]) > 1:
            chance = sum(1 / len(s["arguments"]) for s in samples) / len(samples)
            for m in ("acc", "acc_norm"):
                if m in metrics:
                    metrics[m]["chance"] = chance
        out[task] = metrics
    return out


def verdict(m: dict) -> str:
    """'' or a note that the score is within two standard errors of chance."""
    if "chance" in m and not abs(m["value"] - m["chance"]) > 2 * m["stderr"]:
        return f"not distinguishable from chance {m['chance']:.3f} with {m['n']} items"
    return ""


def headline(task_scores: dict) -> dict[str, dict]:
    """One number per task: bits per byte, acc, or the first metric."""
    out = {}
    for task, metrics in task_scores.items():
        for m in ("bits_per_byte", "acc_norm" if task != "ssl_continuation" else "acc", "acc", *metrics):
            if m in metrics:
                out[f"{task}.{m}"] = metrics[m]
                break
    return out


def untrained_export(model_cfg: ModelConfig, tokenizer_json: str | Path, out: str | Path, seed: int) -> Path:
    """An untrained model of the same shape (initialised as training would start), exported."""
    torch.manual_seed(seed)
    return export_hf(GPT(model_cfg), out, tokenizer_json)


def sample_records(results: dict) -> dict[str, list[dict]]:
    """Per-task samples as JSON-able records."""
    from lm_eval.utils import handle_non_serializable
    return {t: json.loads(json.dumps(s, default=handle_non_serializable)) for t, s in results.get("samples", {}).items()}


def results_json(results: dict) -> dict:
    """lm-eval's results as it writes them, samples left out."""
    from lm_eval.utils import handle_non_serializable
    return json.loads(json.dumps({k: v for k, v in results.items() if k != "samples"}, default=handle_non_serializable))


def evaluate_hf(hf_dir: str | Path, loaded: dict, batch_size: int, device: str, limit: int | None) -> dict:
    """Score one exported model on loaded tasks: {"scores", "results", "samples", "seconds"}."""
    t0 = time.time()
    config = json.loads((Path(hf_dir) / "config.json").read_text())
    context = config.get("n_positions") or config.get("max_position_embeddings") or 0
    if context < MIN_BLOCK and set(SUITE) & set(loaded["tasks"]):
        raise ValueError(f"{hf_dir}: a context of {context} tokens; the suite's items need {MIN_BLOCK} "
                         "(train.block_size)")
    lm = harness_model(hf_dir, batch_size, device)
    results = run_harness(lm, loaded, limit)
    results["config"]["model_args"] = f"pretrained={hf_dir}"
    return {"scores": scores(results), "results": results_json(results), "samples": sample_records(results),
            "seconds": time.time() - t0}


# -- models --------------------------------------------------------------------------------------

def device_of(setting: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if setting == "auto" else setting


def resolve_model(spec: str, cache: str | Path) -> dict:
    """What ``spec`` names, made local under ``cache``: {"spec", "objective", "hf"?, "checkpoint"?,
    "tokenizer"?}. A Hugging Face folder is used as it is; a registered model (models:/NAME/VERSION,
    /latest, @ALIAS), a runs:/ checkpoint or a checkpoint file here is exported when causal."""
    local = Path(spec)
    if local.is_dir() and (local / "config.json").is_file():
        return {"spec": spec, "objective": "causal", "hf": str(local.resolve())}
    source = init_source(spec)   # models:/ resolved to its version; a local checkpoint to its file
    cache = Path(cache)
    if source.startswith(REMOTE):
        checkpoint = download_checkpoint(source, cache)
        tokenizers = sorted(checkpoint.parents[1].rglob("tokenizer.json")) if source.startswith("models:/") else []
        if not tokenizers and source.startswith("runs:/"):   # the train run logs it at its root
            run_id = source.removeprefix("runs:/").split("/")[0]
            tokenizers = [Path(download_tokenizer(run_id, cache))]
    else:
        checkpoint = Path(source)
        tokenizers = [p for p in (checkpoint.parent / "tokenizer.json", checkpoint.parent.parent / "tokenizer.json")
                      if p.is_file()]
    if not tokenizers:
        raise FileNotFoundError(f"{spec}: no tokenizer.json found with the checkpoint {checkpoint}")
    ckpt = load_checkpoint(checkpoint)
    objective = ckpt.get("train_config", {}).get("objective", "causal")
    out = {"spec": spec, "objective": objective, "checkpoint": str(checkpoint), "tokenizer": str(tokenizers[0]),
           "model_config": ckpt["model_config"]}
    if objective == "causal":
        hf = cache / ("hf-" + hashlib.sha256(str(checkpoint.resolve()).encode()).hexdigest()[:16])
        if not (hf / "config.json").is_file():
            shutil.rmtree(hf, ignore_errors=True)
            export_hf(model_from(ckpt), hf, tokenizers[0])
        out["hf"] = str(hf)
    return out


def download_tokenizer(run_id: str, cache: Path) -> str:
    dst = cache / f"tokenizer-{run_id}"
    dst.mkdir(parents=True, exist_ok=True)
    return mlflow.artifacts.download_artifacts(artifact_uri=f"runs:/{run_id}/tokenizer.json", dst_path=str(dst))


# -- the stage -----------------------------------------------------------------------------------

def score_models(models: dict[str, dict], loaded: dict | None, docs: list[dict], cfg, out: Path) -> dict:
    """Each of ``models`` ({label: resolve_model()}) on the loaded harness tasks (causal) or the
    probe (encoders); lm-eval's results and samples written under ``out``."""
    report = {}
    for label, m in models.items():
        t0 = time.time()
        if m["objective"] == "causal":
            if loaded is None or not loaded["tasks"]:
                continue
            r = evaluate_hf(m["hf"], loaded, cfg.batch_size, device_of(cfg.device), cfg.limit)
            (out / "results").mkdir(parents=True, exist_ok=True)
            (out / "results" / f"{label}.json").write_text(json.dumps(r["results"], indent=2) + "\n")
            for task, samples in r["samples"].items():
                (out / "samples" / label).mkdir(parents=True, exist_ok=True)
                with open(out / "samples" / label / f"{task}.jsonl", "w") as f:
                    f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
            scored = r["scores"]
        else:
            scored, correct = probe_scores(m, docs, cfg.seed)
            scored = {"probe": scored}
            (out / "samples" / label).mkdir(parents=True, exist_ok=True)
            with open(out / "samples" / label / "probe.jsonl", "w") as f:   # per test passage, as lm-eval's samples
                f.writelines(json.dumps({"doc_id": i, "acc": c}) + "\n" for i, c in enumerate(correct))
        report[label] = {"spec": m["spec"], "objective": m["objective"], "scores": scored,
                         "seconds": round(time.time() - t0, 3)}
    return report


def probe_digest(docs: list[dict], seed: int) -> str:
    """sha256 of what an encoder is probed on: the held-out documents in their order, the passage
    size and the split's seed (equal digests: the same test passages)."""
    h = hashlib.sha256(json.dumps({"words": PROBE_WORDS, "per_doc": PROBE_PER_DOC, "seed": seed}).encode())
    for d in docs:
        h.update(hashlib.sha256(f"{d['doc_id']}\0{d['text']}".encode()).digest())
    return h.hexdigest()


def tasks_digest(samples_dir: str | Path) -> str | None:
    """sha256 of the items a model was scored on by harness tasks: each task's name and its
    documents' hashes as lm-eval logs them (the same datasets and limit: the same digest)."""
    h, found = hashlib.sha256(), False
    for path in sorted(Path(samples_dir).glob("*.jsonl")):
        found = True
        h.update(path.stem.encode() + b"\0")
        for s in sorted((json.loads(line) for line in path.open()), key=lambda s: s["doc_id"]):
            h.update(f"{s['doc_id']}:{s.get('doc_hash', '')}\n".encode())
    return h.hexdigest() if found else None


def eval_digest(report: dict) -> str | None:
    """What a model was scored on: the suite's digest; without a suite, the named tasks' items or,
    for an encoder, the probe's documents."""
    return (report["suite"] or {}).get("digest") or report.get("tasks_digest") or report.get("probe_digest")


def probe_scores(m: dict, docs: list[dict], seed: int) -> tuple[dict, list[int]]:
    """The transfer probe (tasks/probe.py) of an encoder, as {metric: {"value", "stderr", "n"}}, and
    whether each test passage was labelled right (0/1, the same passages for every model)."""
    model = m["model"] if "model" in m else load_model(m["checkpoint"])
    r = probe(model, Tokenizer.from_file(m["tokenizer"]), docs, causal=False, seed=seed, words=PROBE_WORDS,
              max_per_doc=PROBE_PER_DOC)
    out = {k: {"value": float(r[k]), "stderr": float(r[f"{k}_stderr"]), "n": int(r["test_passages"])}
           for k in ("probe_accuracy", "majority_accuracy", "tfidf_accuracy")}
    out["probe_accuracy"]["chance"] = float(r["majority_accuracy"])
    out["probe_accuracy"]["label"] = f"{r['label']} ({r['classes']} classes)"
    return out, r["test_correct"]


def evaluate_stage(cfg, train: dict, heldout: dict, out: str | Path) -> dict:
    """The evaluate stage without Prefect or MLflow: ``train`` the train stage's manifest (its
    ``checkpoint``, ``tokenizer``, ``model_config``), ``heldout`` the decontaminate stage's (the
    evaluation documents it set aside). The suite from the held-out documents, the
    trained model, an untrained one of its shape and the baselines, scored; everything written to
    ``out`` (built beside it, renamed into place). Returns the report (also ``out/report.json``)."""
    t0 = time.time()
    out = Path(out)
    tmp = fresh_tmp_dir(out)
    try:
        quiet_harness()
        docs = read_heldout(heldout)
        objective = train.get("objective", "causal")
        causal = objective == "causal"
        suite = build_suite(docs, tmp / "suite", cfg.max_items, cfg.seed) if cfg.suite and causal else None
        if not causal and len(docs) < 2:
            raise ValueError(f"{len(docs)} held-out document(s): the probe needs at least 2 "
                             "(raise decontaminate.heldout_fraction)")
        names = (list(SUITE) if suite else []) + (cfg.tasks if causal else [])
        loaded = load_tasks(names, task_manager([tmp / "suite" if suite else None, *cfg.include_path], cfg.tasks)) \
            if names else None
        tokenizer = train["tokenizer"]
        model_cfg = ModelConfig.from_dict(train["model_config"])
        hf = Path(train["dir"]) / "hf"
        model = {"spec": train.get("model_uri") or train["checkpoint"], "objective": objective,
                 "checkpoint": train["checkpoint"], "tokenizer": tokenizer}
        if causal:
            if not (hf / "config.json").is_file():   # train.export_hf was off
                hf = export_checkpoint(train["checkpoint"], tmp / "hf", tokenizer)
            model["hf"] = str(hf)
        models = {"model": model}
        if cfg.untrained:
            if causal:
                ref = {"spec": "untrained", "objective": objective,
                       "hf": str(untrained_export(model_cfg, tokenizer, tmp / "untrained_hf", cfg.seed))}
            else:
                torch.manual_seed(cfg.seed)
                ref = {"spec": "untrained", "objective": objective, "model": GPT(model_cfg).eval(),
                       "tokenizer": tokenizer}
            models["untrained"] = ref
        for i, spec in enumerate(cfg.baselines):
            models[f"baseline{i + 1}"] = resolve_model(spec, tmp / "baselines")
        report = {"objective": objective, "suite": suite, "heldout_docs": len(docs), "tasks": names,
                  "probe_digest": None if causal else probe_digest(docs, cfg.seed),
                  "models": score_models(models, loaded, docs, cfg, tmp)}
        if causal and not suite:   # named harness tasks only
            report["tasks_digest"] = tasks_digest(tmp / "samples" / "model")
        report["seconds"] = round(time.time() - t0, 3)
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        publish_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if suite:   # the task files name the folder their data is in: now the published one
        relocate_suite(out / "suite")
        suite["dir"] = str(out / "suite")
    return report


def table(report: dict) -> list[dict]:
    """One row per task and metric: each model's score ± stderr, chance, and a note."""
    rows, models = [], report["models"]
    first = next(iter(models.values()), {"scores": {}})
    for task, metrics in first["scores"].items():
        for metric, m in metrics.items():
            row = {"task": task, "metric": metric}
            for label, r in models.items():
                s = r["scores"].get(task, {}).get(metric)
                row[label] = f"{s['value']:.4g} ± {s['stderr']:.2g}" if s else "-"
            row["chance"] = f"{m['chance']:.3g}" if "chance" in m else ""
            row["note"] = verdict(m)
            rows.append(row)
    return rows


def table_text(report: dict) -> str:
    rows = table(report)
    return text_table(rows) if rows else "(no scores)"


# -- MLflow and Prefect --------------------------------------------------------------------------

def metrics_of(report: dict) -> dict[str, float]:
    """Every score and its standard error as flat MLflow metrics: ``task.metric`` for the model,
    ``LABEL.task.metric`` for the untrained model and the baselines."""
    out = {}
    for label, r in report["models"].items():
        prefix = "" if label == "model" else f"{label}."
        for task, metrics in r["scores"].items():
            for metric, s in metrics.items():
                out[f"{prefix}{task}.{metric}"] = s["value"]
                if not math.isnan(s["stderr"]):
                    out[f"{prefix}{task}.{metric}_stderr"] = s["stderr"]
    return {k: v for k, v in out.items() if math.isfinite(v)}


def headline_text(report: dict) -> str:
    """One line: the model's headline scores, and the untrained model's beside them."""
    model, ref = report["models"]["model"], report["models"].get("untrained")
    parts = []
    for key, s in headline(model["scores"]).items():
        task, metric = key.split(".", 1)
        r = ref and ref["scores"].get(task, {}).get(metric)
        parts.append(f"{key} {s['value']:.3f} ± {s['stderr']:.3f}" + (f" (untrained {r['value']:.3f})" if r else ""))
    return "; ".join(parts)


def score_figure(report: dict):
    """Bars: each headline score per model, with its standard error."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = list(headline(report["models"]["model"]["scores"]))
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        task, metric = key.split(".", 1)
        labels, values, errs = [], [], []
        for label, r in report["models"].items():
            s = r["scores"].get(task, {}).get(metric)
            if s:
                labels.append(label)
                values.append(s["value"])
                errs.append(0 if math.isnan(s["stderr"]) else s["stderr"])
        ax.bar(labels, values, yerr=errs, capsize=4, color=["#3b6ea8", "#aaaaaa", "#c98b2b", "#6a9a4a"][:len(labels)])
        chance = report["models"]["model"]["scores"][task][metric].get("chance")
        if chance is not None:
            ax.axhline(chance, color="black", linestyle=":", linewidth=1, label="chance")
            ax.legend(fontsize=7)
        ax.set_title(f"{task}\n{metric}", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def log_report(run_id: str, report: dict, out: Path, model_uri: str | None, describe: bool = True) -> None:
    """Scores (with stderr) on the evaluate run, lm-eval's results, samples and the task files as
    artifacts, a chart, and the headline scores on the registered model version (as tags; with
    ``describe``, as its description too)."""
    c = tracking.client()
    ts = int(time.time() * 1000)
    values = [Metric(k, v, ts, 0) for k, v in metrics_of(report).items()]
    for i in range(0, len(values), 1000):
        c.log_batch(run_id, metrics=values[i:i + 1000])
    for sub, dest in (("suite", "suite"), ("results", "lm_eval_results"), ("samples", "samples")):
        if (out / sub).is_dir():
            tracking.log_artifact(run_id, out / sub, dest)
    tracking.log_artifact(run_id, out / "report.json")
    c.log_text(run_id, table_text(report) + "\n", "scores.txt")
    import matplotlib.pyplot as plt
    fig = score_figure(report)
    c.log_figure(run_id, fig, "scores.png")
    plt.close(fig)
    tags = {"ssl_pipeline.eval_suite_sha256": eval_digest(report) or "",
            "ssl_pipeline.eval_headline": headline_text(report)[:5000]}
    for k, v in tags.items():
        c.set_tag(run_id, k, v)
    if model_uri and model_uri.startswith("models:/"):
        mv = tracking.model_version(model_uri)
        name, version = mv.name, mv.version
        for key, s in headline(report["models"]["model"]["scores"]).items():
            c.set_model_version_tag(name, version, f"eval.{key}", f"{s['value']:.4f} ± {s['stderr']:.4f}")
        if tags["ssl_pipeline.eval_suite_sha256"]:
            c.set_model_version_tag(name, version, "eval.suite_sha256", tags["ssl_pipeline.eval_suite_sha256"])
        c.set_model_version_tag(name, version, "eval.mlflow_run_id", run_id)
        if describe:
            tracking.describe_model_version(name, version, f"Evaluated (MLflow run {run_id}): {headline_text(report)}",
                                            replaces="Evaluated")


@stage_task("evaluate")
def evaluate_task(ctx: dict, section: dict, inputs: list[dict], run_id: str) -> tuple[dict, dict]:
    cfg = EvaluateConfig.model_validate(section)
    train, heldout = inputs
    out = stage_dir(ctx, "evaluate")
    report = evaluate_stage(cfg, train, heldout, out)
    log_report(run_id, report, out, train.get("model_uri"))
    create_table_artifact(key="evaluation", table=table(report),
                          description=f"Scores ± standard error: {headline_text(report)}")
    digest = hashlib.sha256((out / "report.json").read_bytes()).hexdigest()
    manifest = {"stage": "evaluate", "dir": str(out), "rows": report["heldout_docs"], "input_rows": report["heldout_docs"],
                "dropped": 0, "reasons": {}, "digest": digest, "bytes": (out / "report.json").stat().st_size,
                "seconds": report["seconds"], "suite": report["suite"], "tasks": report["tasks"],
                "suite_digest": eval_digest(report),
                "headline": headline(report["models"]["model"]["scores"]),
                "headline_text": headline_text(report), "table": table_text(report)}
    return manifest, {}


# -- ssl-pipeline evaluate MODEL -----------------------------------------------------------------

def pipeline_suite(spec: str, cache: Path) -> tuple[Path | None, list[dict]]:
    """The suite (task files) and held-out documents of the pipeline run that trained ``spec``
    (models:/ or runs:/), found through MLflow; (None, []) when it has none."""
    run_id = tracking.model_version(spec).run_id if spec.startswith("models:/") else \
        spec.removeprefix("runs:/").split("/")[0] if spec.startswith("runs:/") else None
    if not run_id:
        return None, []
    c = tracking.client()
    parent = c.get_run(run_id).data.tags.get("mlflow.parentRunId")
    tags = c.get_run(parent).data.tags if parent else {}
    suite, docs = None, []
    if tags.get("ssl_pipeline.evaluate.mlflow_run_id"):
        dst = cache / f"suite-{tags['ssl_pipeline.evaluate.mlflow_run_id']}"
        if not (dst / "suite").is_dir():
            dst.mkdir(parents=True, exist_ok=True)
            try:
                mlflow.artifacts.download_artifacts(
                    artifact_uri=f"runs:/{tags['ssl_pipeline.evaluate.mlflow_run_id']}/suite", dst_path=str(dst))
            except Exception:
                pass
        if (dst / "suite").is_dir():
            relocate_suite(dst / "suite")
            suite = dst / "suite"
    # the stage that set the documents aside (tokenize, in runs made before decontaminate existed)
    stage = next((s for s in ("decontaminate", "tokenize") if tags.get(f"ssl_pipeline.{s}.mlflow_run_id")), None)
    if stage:
        m = mlflow.artifacts.load_dict(f"runs:/{tags[f'ssl_pipeline.{stage}.mlflow_run_id']}/manifest.json")
        if m.get("heldout") and (Path(m["dir"]) / m["heldout"]).is_file():
            docs = read_heldout(m)
    return suite, docs


def evaluate_model(spec: str, cfg, cache: str | Path, suite: str | Path | None = None) -> dict:
    """Score one model, as the evaluate stage scores the pipeline's: ``spec`` is a Hugging Face
    folder, a registered model or a runs:/ checkpoint. ``suite``: a suite folder (default: the one of
    the pipeline run that trained the model, when there is one; none with ``cfg.suite`` false)."""
    t0 = time.time()
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    quiet_harness()
    model = resolve_model(spec, cache)
    found, docs = pipeline_suite(spec, cache) if spec.startswith(("models:/", "runs:/")) else (None, [])
    if suite:
        suite = relocate_suite(suite)
    else:
        suite = found if cfg.suite else None
    causal = model["objective"] == "causal"
    if causal and not suite and not cfg.tasks:
        raise ValueError(f"{spec}: nothing to score: no suite of its own pipeline run in MLflow; give --suite "
                         "FOLDER (an evaluate run's suite artifact) or --tasks")
    if not causal and len(docs) < 2:
        raise ValueError(f"{spec}: an encoder ({model['objective']}) is scored by the probe on its pipeline run's "
                         "held-out documents, which were not found")
    names = (list(SUITE) if suite else []) + (cfg.tasks if causal else [])
    loaded = load_tasks(names, task_manager([suite, *cfg.include_path], cfg.tasks)) if causal else None
    out = cache / f"run-{os.getpid()}-{int(t0)}"
    report = {"objective": model["objective"], "heldout_docs": len(docs), "tasks": names,
              "suite": {"dir": str(suite), "digest": suite_digest(suite)} if suite else None,
              "models": score_models({"model": model}, loaded, docs, cfg, out)}
    report["seconds"] = round(time.time() - t0, 3)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    report["dir"] = str(out)
    return report
