"""Stage 6, train: self-supervised pretraining on the token shards, tracked in MLflow.

The trainer (ssl_model) reports through a callback; here that callback batches the metrics
into the stage's MLflow run while training runs (sample generations as text artifacts) and
drives the progress bar. The final checkpoint is logged, a causal model is also exported as a
Hugging Face transformers checkpoint, and the model is logged as an MLflow pyfunc model
(tasks/scoring.py) and registered.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import time
import warnings
from pathlib import Path

import mlflow
from mlflow.entities import Metric
from tqdm.auto import tqdm

from ssl_model.checkpoint import init_checkpoint
from ssl_model.config import ModelConfig
from ssl_model.export import export_checkpoint
from ssl_model.trainer import TrainSettings, train
from tasks import scoring, tracking
from tasks.config import TrainConfig
from tasks.shards import fresh_tmp_dir, publish_dir, sha256_file
from tasks.stage import stage_dir, stage_task


class MlflowReporter:
    """Trainer callback: metrics to MLflow in batches, a progress bar on the terminal."""

    def __init__(self, run_id: str, total_steps: int, every: int = 25):
        self.run_id, self.every, self.buffer = run_id, every, []
        self.bar = tqdm(total=total_steps, desc="train", unit="step")
        self.last: dict = {}
        self.logged: dict[str, int] = {}   # metric -> last step already in the run (resumed in it)

    def __call__(self, kind: str, step: int, metrics: dict) -> None:
        ts = int(time.time() * 1000)
        if kind == "resume":
            self.bar.update(step)
            tracking.client().set_tag(self.run_id, "resumed_from", metrics["checkpoint"])
            self.logged = logged_steps(self.run_id)
            return
        if kind == "checkpoint":   # what a retry resuming from this checkpoint will not log again
            self.flush()
        if kind in ("checkpoint", "init"):
            return
        if kind == "sample":
            tracking.client().log_text(self.run_id, metrics["text"], f"samples/step-{step:07d}.txt")
            return
        # a resumed training recomputes, bit for bit, the steps after its checkpoint that the killed
        # attempt had already logged in this run: logged once
        self.buffer += [Metric(k, float(v), ts, step) for k, v in metrics.items()
                        if isinstance(v, (int, float)) and step > self.logged.get(k, -1)]
        self.last.update(metrics)
        if kind == "train":
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{metrics['loss']:.3f}", val=f"{self.last.get('val_loss', float('nan')):.3f}")
        if kind == "eval" or len(self.buffer) >= self.every * 4:
            self.flush()

    def flush(self) -> None:
        for i in range(0, len(self.buffer), 1000):
            tracking.client().log_batch(self.run_id, metrics=self.buffer[i:i + 1000])
        self.buffer = []

    def close(self) -> None:
        self.flush()
        self.bar.close()


def logged_steps(run_id: str) -> dict[str, int]:
    """The last step of every metric already logged in ``run_id`` (by an earlier, killed attempt)."""
    c = tracking.client()
    return {k: max(m.step for m in c.get_metric_history(run_id, k)) for k in c.get_run(run_id).data.metrics}


def log_model(run_id: str, checkpoint: str, tokenizer: str, registered_name: str, objective: str) -> str:
    """Log the pyfunc model in ``run_id`` and register it; returns the registered model's URI."""
    with mlflow.start_run(run_id=run_id, nested=True), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*input example.*")  # the signature says it all
        info = mlflow.pyfunc.log_model(
            name="model", python_model=scoring.__file__, signature=scoring.signature(objective),
            artifacts={"checkpoint": checkpoint, "tokenizer": tokenizer},
            pip_requirements=["ssl-pipeline", "torch==2.13.0", "tokenizers", "pandas"],
            registered_model_name=registered_name)
    return f"models:/{registered_name}/{info.registered_model_version}"


def describe_model(model_uri: str, run_id: str, ctx: dict, cfg: TrainConfig, shards: dict, tokenizer: str,
                   tokens: int, result: dict, init: dict | None) -> None:
    """What the registered version was trained on, as its tags and its description's first paragraph."""
    name, version = model_uri.removeprefix("models:/").rsplit("/", 1)
    tags = {"data.sha256": shards["digest"], "data.train_docs": shards["train_docs"],
            "data.train_tokens": shards["train_tokens"], "tokenizer.sha256": sha256_file(tokenizer),
            "tokenizer.vocab_size": shards["vocab_size"], "train.objective": cfg.objective, "train.tokens": tokens,
            "train.params": result["params"], "pipeline.mlflow_run_id": ctx["parent_run_id"],
            "pipeline.prefect_flow_run_id": ctx["flow_run_id"], **({"train.init_from": init["source"]} if init else {})}
    text = (f"Trained in MLflow run {run_id} (pipeline run {ctx['parent_run_id']}): {cfg.objective} objective, "
            f"{result['params']:,} parameters, final val_loss {result['val_loss']:.4f}.\n"
            f"- data: tokenize output sha256 {shards['digest']}: {shards['train_docs']} documents, "
            f"{shards['train_tokens']:,} tokens in its train split\n"
            f"- tokenizer: sha256 {tags['tokenizer.sha256']}, vocabulary {shards['vocab_size']}\n"
            f"- training: {tokens:,} tokens ({cfg.max_steps} steps)"
            + (f"\n- initialised from {init['source']}" if init else ""))
    tracking.describe_model_version(name, version, text, replaces="Trained", tags=tags)


REMOTE = ("models:/", "runs:/")   # what train.init_from downloads through MLflow


def init_source(spec: str) -> str:
    """What ``train.init_from`` names: a registered model as models:/NAME/VERSION (an alias or
    /latest resolved), runs:/ as given, a local checkpoint as its file's absolute path."""
    if spec.startswith("models:/"):
        mv = tracking.model_version(spec)
        return f"models:/{mv.name}/{mv.version}"
    return spec if spec.startswith(REMOTE) else str(init_checkpoint(spec).resolve())


def init_fingerprint(ctx: dict, section: dict) -> str | None:
    """For the cache key: the model ``init_from`` names now (a local file by its content too)."""
    if not section.get("init_from"):
        return None
    source = init_source(section["init_from"])
    return source if source.startswith(REMOTE) else f"{source} sha256:{sha256_file(source)}"


def download_checkpoint(source: str, folder: Path) -> Path:
    """The training checkpoint of a model version or run artifact in MLflow (both immutable),
    downloaded once under ``folder``: a retried train task finds it there."""
    out = folder / hashlib.sha256(source.encode()).hexdigest()[:16]
    if not out.is_dir():
        tmp = fresh_tmp_dir(out)
        mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp))
        publish_dir(tmp, out)
    found = sorted(out.rglob("step-*.pt"))
    if len(found) != 1:
        raise FileNotFoundError(f"train.init_from {source}: expected one training checkpoint (step-NNNNNNN.pt) "
                                f"in it, found {[str(p.relative_to(out)) for p in found]}")
    return found[0]


def plan(section: dict, vocab_size: int) -> tuple[TrainConfig, ModelConfig, TrainSettings]:
    """The train section as the stage receives it -> its config, the model's shape and the trainer's settings."""
    cfg = TrainConfig.model_validate(section)
    return cfg, ModelConfig(vocab_size=vocab_size, **cfg.model_shape()), TrainSettings.from_dict(cfg.model_dump())


def has_checkpoint(ctx: dict) -> bool:
    """An earlier attempt of this flow run left a checkpoint: training resumes from it."""
    return any((stage_dir(ctx, "train") / "checkpoints").glob("step-*.pt"))


@stage_task("train", sources=init_fingerprint, resumes=has_checkpoint)
def train_task(ctx: dict, section: dict, inputs: list[dict], run_id: str) -> tuple[dict, dict]:
    shards = inputs[0]
    cfg, model_cfg, settings = plan(section, shards["vocab_size"])
    out = stage_dir(ctx, "train")
    init = None
    if cfg.init_from:
        source = init_source(cfg.init_from)
        path = download_checkpoint(source, out / "init") if source.startswith(REMOTE) else Path(source)
        init, settings.init_from = {"source": source, "sha256": sha256_file(path)}, str(path)
        tracking.client().set_tag(run_id, "ssl_pipeline.init_from", source)
    reporter = MlflowReporter(run_id, cfg.max_steps)
    t0 = time.time()
    try:
        result = train(model_cfg, settings, shards["dir"], out / "checkpoints", reporter)
    finally:
        reporter.close()
    seconds = time.time() - t0
    tokenizer = str(Path(shards["dir"]) / "tokenizer.json")
    tracking.log_artifact(run_id, result["checkpoint"], "checkpoints")
    tracking.log_artifact(run_id, tokenizer)
    if cfg.export_hf and cfg.objective == "causal":
        hf = out / "hf"
        shutil.rmtree(hf, ignore_errors=True)   # an earlier attempt's export, redone from this checkpoint
        tracking.log_artifact(run_id, export_checkpoint(result["checkpoint"], hf, tokenizer), "hf_model")
    model_uri = log_model(run_id, result["checkpoint"], tokenizer, ctx["registered_model"], cfg.objective)
    per_step = cfg.batch_size * cfg.grad_accum * model_cfg.block_size * result["world_size"]
    tokens = cfg.max_steps * per_step
    describe_model(model_uri, run_id, ctx, cfg, shards, tokenizer, tokens, result, init)
    manifest = {**shards, "stage": "train", "dir": str(out), "dropped": 0, "reasons": {}, "seconds": seconds,
                "checkpoint": result["checkpoint"], "tokenizer": tokenizer,
                "model_uri": model_uri, "val_loss": result["val_loss"],
                "ln_vocab": math.log(shards["vocab_size"]), "params": result["params"], "device": result["device"],
                "objective": cfg.objective, "model_config": model_cfg.to_dict(), "init_from": init, "tokens_per_step": per_step,
                "retrieval": [result.get("val_retrieval_accuracy"), result.get("val_retrieval_chance")]}
    manifest["digest"] = sha256_file(result["checkpoint"])
    manifest["bytes"] = Path(result["checkpoint"]).stat().st_size
    finals = {f"final_{k}": float(v) for k, v in result.items() if k.startswith("val_") and k != "val_tokens"}
    return manifest, {**finals, "ln_vocab_size": manifest["ln_vocab"], "params": float(result["params"]),
                      "train_tokens_seen": float(tokens), "skipped_steps": float(result["skipped_steps"])}
