"""The ablation flow: the same model trained on data prepared different ways, compared on one suite.

An ablation file names a base pipeline config and variants, each a set of overrides of it::

    base: demo.yaml                 # relative to this file
    ablate: {tokens: 600000, seeds: [1337]}
    variants:
      raw: {filter.enabled: false, dedup.exact: false, dedup.near: false}
      curated: {}

Every variant trains the same model from the same seeds on the same number of tokens (the
budget sets ``train.max_steps``; a smaller dataset is repeated, its epochs reported), with one
tokenizer (trained on one variant's data), and is scored by its evaluate stage on one suite:
documents set aside from the extracted pages before any variant's filtering (by doc id, host or
source), or the pages of ``evaluate.sources``. Each variant's decontaminate stage drops those
documents, and any training document sharing an n-gram with them, from its training data.

Each variant x seed is an ordinary ``ssl-pipeline`` flow run (a child of this one) in a folder of
its own under ``<data_dir>/ablations/<name>-<config digest>/``: data stages that a variant's
overrides leave alone come back from the cache, and an ablation run again after a kill finds the
finished variants cached and resumes the interrupted training from its checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from mlflow.entities import Metric, Param
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.states import Completed, Failed
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from flows.pipeline import _collect_and_extract, eval_documents, make_ctx, pipeline, stage_sections
from tasks import compare, tracking
from tasks.config import ConfigError, PipelineConfig, Section, _describe, load_config
from tasks.decontaminate import split_hash
from tasks.extract import DOC_SCHEMA
from tasks.shards import StageWriter, iter_rows

# what every variant shares: the model, its training, the tokenizer and the evaluation
FIXED = ("train.", "tokenize.", "evaluate.", "tracking.", "cache.", "data_dir", "decontaminate.heldout_fraction",
         "decontaminate.seed")


class AblateSettings(Section):
    tokens: int = Field(1_000_000, ge=1, description="Training tokens per variant and seed: train.max_steps is "
                                                     "this over the tokens of one step (batch x grad_accum x "
                                                     "block_size), rounded up.")
    seeds: list[int] = Field([1337], min_length=1, description="train.seed of each training of each variant.")
    parallel: int = Field(1, ge=1, description="Variant trainings run side by side (on one machine: share its "
                                               "cores; with runner.train_deployment: on the GPU pool).")
    heldout_fraction: float = Field(0.1, gt=0, lt=1, description="Without evaluate.sources: the fraction of "
                                                                 "extracted pages set aside for the suite, before "
                                                                 "any filtering (by hash of heldout_by).")
    heldout_by: Literal["doc", "host", "source"] = Field(
        "doc", description="Set aside single documents, or whole hosts or sources (when there are several).")
    tokenizer: str | None = Field(None, description="The variant whose training data the one shared tokenizer "
                                                    "is trained on (null: the first variant).")
    bootstrap: int = Field(2000, ge=100, description="Bootstrap replicates over the evaluation items (and seeds).")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="Confidence level of the differences' intervals.")


class AblationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base: str | None = Field(None, description="The pipeline config every variant starts from (relative to the "
                                               "ablation file; null: the built-in defaults).")
    set: dict[str, Any] = Field({}, description="section.key: value overrides of the base, for every variant.")
    ablate: AblateSettings = Field(default_factory=AblateSettings, description="How the variants are trained, "
                                                                              "held out and compared.")
    variants: dict[str, dict[str, Any]] = Field(description="name: {section.key: value, ...} for each variant.")

    @model_validator(mode="after")
    def _variants(self) -> "AblationConfig":
        if len(self.variants) < 2:
            raise ValueError("an ablation compares at least two variants")
        for name, over in self.variants.items():
            if not name.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"variant name {name!r}: letters, digits, '-' and '_' only")
            for key in over or {}:
                if key.startswith(FIXED):
                    raise ValueError(f"variant {name} sets {key}: the model, its training, the tokenizer and the "
                                     "evaluation are the same for every variant (set them in base or set:)")
        if self.ablate.tokenizer and self.ablate.tokenizer not in self.variants:
            raise ValueError(f"ablate.tokenizer {self.ablate.tokenizer!r} is not a variant ({', '.join(self.variants)})")
        return self


def _render(key: str, value: Any) -> str:
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


def load_ablation(path: str | Path) -> tuple[AblationConfig, str | None, dict[str, PipelineConfig]]:
    """The ablation file, its base config's path and every variant's resolved config; a ConfigError
    names what is wrong (a variant's by its name)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"ablation file not found: {p}")
    try:
        ab = AblationConfig.model_validate(yaml.safe_load(p.read_text()) or {})
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    except ValidationError as e:
        raise ConfigError(f"invalid ablation file {p}:\n{_describe(e)}") from None
    base = str((p.parent / ab.base).resolve()) if ab.base else None
    cfgs = {}
    for name in ab.variants:
        try:
            cfgs[name] = load_config(base, variant_overrides(ab, name))
        except ConfigError as e:
            raise ConfigError(f"variant {name}: {e}") from None
    if not next(iter(cfgs.values())).evaluate.enabled:
        raise ConfigError("evaluate.enabled: false: an ablation compares the variants by their evaluate stage")
    return ab, base, cfgs


def variant_overrides(ab: AblationConfig, name: str) -> list[str]:
    return [_render(k, v) for k, v in {**ab.set, **(ab.variants[name] or {})}.items()]


def train_steps(cfg: PipelineConfig, tokens: int) -> int:
    t = cfg.train
    return math.ceil(tokens / (t.batch_size * t.grad_accum * t.block_size))


def ablation_dir(path: str | Path, ab: AblationConfig, cfgs: dict[str, PipelineConfig]) -> Path:
    """``<data_dir>/ablations/<file stem>-<digest of the resolved configs>``: the same ablation run
    again (after a kill) finds its variants' folders, checkpoints included."""
    resolved = json.dumps({"ablate": ab.ablate.model_dump(mode="json"),
                           "variants": {n: c.model_dump(mode="json") for n, c in cfgs.items()}}, sort_keys=True)
    digest = hashlib.sha256(resolved.encode()).hexdigest()[:12]
    data_dir = Path(next(iter(cfgs.values())).data_dir).resolve()
    return data_dir / "ablations" / f"{Path(path).stem}-{digest}"


def set_aside(extracted: dict, fraction: float, by: str, out: Path) -> dict:
    """The extracted pages whose doc id (or host, or source) hashes into the top ``fraction``: the
    evaluation documents, written as a stage folder of their own. At least one document (or host,
    or source) is set aside, and one left."""
    key = {"doc": "doc_id", "host": "hostname", "source": "source"}[by]
    rows = list(iter_rows(extracted))
    groups = sorted({r[key] or "" for r in rows})
    if len(groups) < 2:
        raise ValueError(f"ablate.heldout_by: {by}: the pages have {len(groups)} {by}(s); at least two are needed "
                         "to set one aside (use heldout_by: doc, or evaluate.sources)")
    chosen = {g for g in groups if split_hash(g, 0) >= 1 - fraction}
    if not chosen:
        chosen = {max(groups, key=lambda g: split_hash(g, 0))}
    if len(chosen) == len(groups):
        chosen.discard(min(groups, key=lambda g: split_hash(g, 0)))
    with StageWriter("eval_docs", out, DOC_SCHEMA) as w:
        for r in rows:
            if (r[key] or "") in chosen:
                w.keep(r)
        w.extra = {"heldout_by": by, "heldout_fraction": fraction, "groups": len(chosen)}
    return w.manifest


@task(name="variant", task_run_name="{name}", cache_policy=NO_CACHE)
def run_variant(name: str, config_path: str | None, overrides: list[str], eval_docs: dict, parent_run_id: str,
                run_dir: str, until: str | None = None) -> dict:
    """One variant x seed: the pipeline as a child flow run, in its own folder."""
    state = pipeline.with_options(flow_run_name=name)(
        config_path=config_path, overrides=overrides, eval_docs=eval_docs, parent_run_id=parent_run_id,
        run_dir=run_dir, until=until, return_state=True)
    if not state.is_completed():
        raise RuntimeError(f"variant {name}: {state.message}")
    return state.result()


@flow(name="ssl-ablate", log_prints=True)
def ablate(config_path: str):
    """Variants of the data preparation, each training the same model, compared on one suite."""
    log = get_run_logger()
    try:
        ab, base, cfgs = load_ablation(config_path)
    except ConfigError as e:
        return Failed(message=str(e))
    names = list(cfgs)
    first = cfgs[names[0]]
    steps = train_steps(first, ab.ablate.tokens)
    if first.train.warmup_steps >= steps:
        return Failed(message=f"ablate.tokens {ab.ablate.tokens} makes {steps} training steps, not more than "
                              f"train.warmup_steps {first.train.warmup_steps}: raise the budget or lower the warmup")
    root = ablation_dir(config_path, ab, cfgs)
    root.mkdir(parents=True, exist_ok=True)
    parent = tracking.start_pipeline_run(first, flow_run.get_id(), flow_run.get_name(), Path(config_path).read_text(),
                                         run_name=f"ablation-{Path(config_path).stem}")
    c = tracking.client()
    c.set_tag(parent, "ssl_pipeline.kind", "ablation")
    log.info("MLflow run: %s; variants' folders under %s", tracking.run_url(parent), root)
    try:
        # 1. the evaluation documents: the same for every variant
        ctx = make_ctx(first, flow_run.get_id(), parent, root / "shared")
        sections = stage_sections(first)
        if first.evaluate.sources:
            eval_docs = eval_documents(ctx, first, sections)
        else:
            extracted = _collect_and_extract(ctx, sections)["extract"].result()
            eval_docs = set_aside(extracted, ab.ablate.heldout_fraction, ab.ablate.heldout_by, root / "eval_docs")
        log.info("evaluation documents: %d (%s)", eval_docs["rows"], eval_docs["dir"])
        # 2. one tokenizer for all: trained on one variant's data (its data stages, up to tokenize)
        tok_variant = ab.ablate.tokenizer or names[0]
        fixed = ["decontaminate.heldout_fraction=0", f"train.max_steps={steps}"]
        tok = run_variant.with_options(task_run_name=f"{tok_variant}-tokenizer")(
            f"{tok_variant}-tokenizer", base, variant_overrides(ab, tok_variant) + fixed, eval_docs, parent,
            str(root / "tokenizer"), until="tokenize")
        tokenizer = str(Path(tok["stages"]["tokenize"]["dir"]) / "tokenizer.json")
        fixed.append(f"tokenize.tokenizer={tokenizer}")
        # 3. every variant x seed, side by side where ablate.parallel allows
        runs = {(n, s): run_variant.with_options(task_run_name=f"{n}-seed{s}").submit(
                    f"{n}-seed{s}", base, variant_overrides(ab, n) + fixed + [f"train.seed={s}"], eval_docs, parent,
                    str(root / f"{n}-seed{s}"))
                for n in names for s in ab.ablate.seeds}
        results = {k: f.result() for k, f in runs.items()}
        # 4. the comparison
        report = comparison(ab, results, steps)
    except BaseException as e:
        tracking.end_run(parent, ok=False)
        if isinstance(e, (ValueError, RuntimeError)):
            return Failed(message=str(e))
        raise
    log_comparison(parent, report, root)
    tracking.end_run(parent, ok=True)
    return Completed(message=f"{len(names)} variants x {len(ab.ablate.seeds)} seed(s), {ab.ablate.tokens} tokens each",
                     data={**report, "mlflow_run_id": parent, "mlflow_run_url": tracking.run_url(parent),
                           "dir": str(root)})


def comparison(ab: AblationConfig, results: dict[tuple[str, int], dict], steps: int) -> dict:
    """Scores of every variant on the one suite (refusing different suites), the paired
    bootstrap's differences and verdicts, and what each variant trained on."""
    digests = {f"{n}-seed{s}": r["stages"]["evaluate"]["suite_digest"] for (n, s), r in results.items()}
    if None in digests.values():
        raise ValueError("a variant was scored on no evaluation suite: " + ", ".join(k for k, v in digests.items() if v is None))
    if len(set(digests.values())) != 1:
        raise ValueError("the variants were scored on different evaluation suites, which cannot be compared: "
                         + ", ".join(f"{k} {v[:12]}" for k, v in digests.items()))
    names = list(ab.variants)
    items = {n: [compare.item_values(results[(n, s)]["stages"]["evaluate"]["dir"]) for s in ab.ablate.seeds]
             for n in names}
    result = compare.compare(items, ab.ablate.bootstrap, ab.ablate.confidence)
    info = {}
    for n in names:
        r = results[(n, ab.ablate.seeds[0])]["stages"]
        tokens = steps * r["train"]["tokens_per_step"]
        info[n] = {"docs": r["tokenize"]["train_docs"], "train_tokens": r["tokenize"]["train_tokens"],
                   "tokens_seen": tokens, "epochs": round(tokens / max(1, r["tokenize"]["train_tokens"]), 2),
                   "data_digest": r["decontaminate"]["digest"][:12]}
    curves = {n: mean_curve([curve(results[(n, s)]["stages"]["train"]) for s in ab.ablate.seeds]) for n in names}
    objective = results[(names[0], ab.ablate.seeds[0])]["stages"]["train"].get("objective", "causal")
    return {"suite_digest": next(iter(digests.values())), "tokens": ab.ablate.tokens, "steps": steps,
            "objective": objective,
            "seeds": ab.ablate.seeds, "variants": info, "comparison": result, "curves": curves,
            "runs": {f"{n}-seed{s}": r["mlflow_run_id"] for (n, s), r in results.items()},
            "table": compare.text_table(compare.table_rows(result, info)), "verdicts": compare.verdict_lines(result)}


CURVE = {"causal": ("heldout_bpb", "held-out bits per byte"), "mlm": ("heldout_loss", "held-out masked-LM loss"),
         "contrastive": ("heldout_loss", "held-out contrastive loss")}


def curve(train: dict) -> list[tuple[int, float]]:
    """(tokens seen, the held-out metric of CURVE) at each of the training's evaluations (from its MLflow run)."""
    history = tracking.client().get_metric_history(train["mlflow_run_id"], CURVE[train.get("objective", "causal")][0])
    return sorted((m.step * train["tokens_per_step"], m.value) for m in history)


def mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """The seeds' curves averaged at the points every seed has (the same steps, as they share a config)."""
    common = set.intersection(*(set(dict(c)) for c in curves)) if curves else set()
    return [(x, sum(dict(c)[x] for c in curves) / len(curves)) for x in sorted(common)]


def log_comparison(run_id: str, report: dict, root: Path) -> None:
    """The comparison on the ablation's MLflow run: metrics per variant, the table, the verdicts,
    the bars and the curves as pictures; and as a Prefect table artifact."""
    import matplotlib.pyplot as plt
    c = tracking.client()
    ts = int(time.time() * 1000)
    metrics = []
    for key, m in report["comparison"]["metrics"].items():
        for v, s in m["variants"].items():
            metrics += [Metric(f"{v}.{key}", s["value"], ts, 0), Metric(f"{v}.{key}_stderr", s["stderr"], ts, 0)]
        for p in m["pairs"]:
            metrics += [Metric(f"{p['a']}_vs_{p['b']}.{key}.diff", p["diff"], ts, 0),
                        Metric(f"{p['a']}_vs_{p['b']}.{key}.low", p["low"], ts, 0),
                        Metric(f"{p['a']}_vs_{p['b']}.{key}.high", p["high"], ts, 0)]
    for v, info in report["variants"].items():
        metrics += [Metric(f"{v}.epochs", float(info["epochs"]), ts, 0),
                    Metric(f"{v}.train_tokens", float(info["train_tokens"]), ts, 0)]
    for i in range(0, len(metrics), 1000):
        c.log_batch(run_id, metrics=metrics[i:i + 1000],
                    params=[Param("ablate.suite_sha256", report["suite_digest"])] if i == 0 else [])
    c.set_tag(run_id, "ssl_pipeline.eval_suite_sha256", report["suite_digest"])
    (root / "comparison.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    tracking.log_artifact(run_id, root / "comparison.json")
    c.log_text(run_id, report["table"] + "\n\n" + "\n".join(report["verdicts"]) + "\n", "comparison.txt")
    fig = compare.bars_figure(report["comparison"])
    c.log_figure(run_id, fig, "final_metrics.png")
    plt.close(fig)
    fig = compare.differences_figure(report["comparison"])
    c.log_figure(run_id, fig, "differences.png")
    plt.close(fig)
    if any(report["curves"].values()):
        seeds = len(report["seeds"])
        fig = compare.curves_figure(report["curves"], CURVE[report["objective"]][1] + (f" (mean of {seeds} seeds)" if seeds > 1 else ""))
        c.log_figure(run_id, fig, "eval_curves.png")
        plt.close(fig)
    create_table_artifact(key="ablation", table=compare.table_rows(report["comparison"], report["variants"]),
                          description="\n".join(report["verdicts"]))
