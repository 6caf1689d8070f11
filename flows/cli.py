"""``ssl-pipeline``: run the pipeline, retry a failed run, show the configuration, audit lineage."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

import yaml

from tasks.config import DATA_STAGES, ConfigError, TrackingConfig, load_config

PROFILES = Path(__file__).parent / "profiles"
PERSISTENT = ("make services, then export PREFECT_API_URL=http://127.0.0.1:4200/api "
              "MLFLOW_TRACKING_URI=http://127.0.0.1:5000")   # servers that outlive a command


def _ui_hint(flow_run_id: str | None) -> list[str]:
    from flows.pipeline import flow_run_ui_url
    url = flow_run_ui_url(flow_run_id)
    lines = [f"Prefect flow run: {url}" if url else
             f"Prefect flow run: {flow_run_id} (temporary server; set PREFECT_API_URL to keep runs)"]
    lines.append("Open the UIs:     make services   (Prefect http://127.0.0.1:4200, MLflow http://127.0.0.1:5000)")
    return lines


def _failure_hint(args, cfg, flow_run_id: str | None) -> list[str]:
    """What is true after a failed run: where its data and its MLflow records are, and how to go on.
    A retry needs the Prefect server the run is recorded on; the temporary one is gone."""
    import mlflow
    from prefect.settings import PREFECT_API_URL
    run_dir = Path(cfg.data_dir).resolve() / (flow_run_id or "<flow run id>")
    lines = [f"Data:             {run_dir}",
             f"MLflow:           {mlflow.get_tracking_uri()}"]
    if PREFECT_API_URL.value():
        lines += _ui_hint(flow_run_id)
        lines.append(f"Retry it (finished stages come back cached): ssl-pipeline retry {flow_run_id}")
        return lines
    again = shlex.join(["ssl-pipeline", "run", *(["--config", args.config] if args.config else []),
                        *(x for o in args.set for x in ("--set", o))])
    results = cfg.cache.storage or str(Path(cfg.data_dir).resolve() / ".results")
    return lines + [
        f"Prefect flow run: {flow_run_id}, on Prefect's temporary server, which stops when this command ends: "
        "the run cannot be retried.",
        f"Run it again:     {again}",
        f"                  (stages whose results are kept in {results} come back cached when their inputs, "
        "config and code are unchanged)",
        f"To be able to retry a run, run it on persistent servers: {PERSISTENT}",
        "                  (what a run on the temporary server recorded stays in the MLflow store above)"]


def tasks_available(cfg) -> bool:
    """Before hours of training: are the named harness tasks' datasets here? (False: said why.)"""
    if cfg.evaluate.enabled and cfg.evaluate.tasks:
        from tasks import evaluate
        try:
            evaluate.load_tasks(cfg.evaluate.tasks, evaluate.task_manager(cfg.evaluate.include_path, cfg.evaluate.tasks))
        except evaluate.TaskDataMissing as e:
            print(f"ssl-pipeline: evaluate.tasks: {e}", file=sys.stderr)
            return False
    return True


def cmd_ablate(args) -> int:
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.ablate import ablate, load_ablation
    try:
        ab, _, cfgs = load_ablation(args.config)
    except ConfigError as e:
        print(f"ssl-pipeline ablate: {e}", file=sys.stderr)
        return 2
    if not tasks_available(next(iter(cfgs.values()))):
        return 2
    run = ablate.with_options(task_runner=ThreadPoolTaskRunner(max_workers=ab.ablate.parallel))
    state = run(config_path=str(Path(args.config).resolve()), return_state=True)
    flow_run_id = str(state.state_details.flow_run_id) if state.state_details else None
    if not state.is_completed():
        print(f"ssl-pipeline ablate: failed: {state.message}", file=sys.stderr)
        print("Run the same command again: finished variants come back cached and an interrupted training "
              "resumes from its checkpoint.", file=sys.stderr)
        return 1
    r = state.result()
    if args.json:
        print(json.dumps({k: v for k, v in r.items() if k != "table"}, indent=2, default=str))
        return 0
    print(f"\nAblation: {state.message}; one suite (sha256 {r['suite_digest'][:12]}), "
          f"{r['comparison']['confidence']:.0%} intervals from a paired bootstrap over its items"
          + (" and the seeds" if len(r["seeds"]) > 1 else ""))
    print(f"\n{r['table']}\n")
    print("\n".join(r["verdicts"]))
    print(f"\nMLflow run:       {r['mlflow_run_url']}")
    print(f"Data:             {r['dir']}")
    print("\n".join(_ui_hint(flow_run_id)))
    return 0


def run_options(args) -> str | None:
    """What is wrong with ``--until``, ``--from`` and ``--data`` together (None: nothing)."""
    if args.until is not None and args.until not in (*DATA_STAGES, "train"):
        return f"--until {args.until}: not a stage to stop after ({', '.join(DATA_STAGES)}, train)"
    if args.start_from is not None and args.start_from != "train":
        return (f"--from {args.start_from}: a run can only start from train (--from train --data RUN); "
                "to score a trained model again: ssl-pipeline evaluate MODEL")
    if (args.start_from is None) != (args.data is None):
        return "--from train and --data RUN go together: train on the data of an earlier run"
    if args.start_from and args.until in DATA_STAGES:
        return f"--until {args.until} with --from train: a run that starts at train has no data stage to stop after"
    return None


def cmd_run(args) -> int:
    try:  # refuse a bad config before any work starts
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        print(f"ssl-pipeline: {e}", file=sys.stderr)
        return 2
    if problem := run_options(args):
        print(f"ssl-pipeline run: {problem}", file=sys.stderr)
        return 2
    data = data_run = None
    if args.data is not None:   # the data to train on, found before any work starts
        from flows.data_runs import DataRunError, for_training
        data_run = str(Path(args.data).resolve()) if Path(args.data).exists() else args.data
        try:
            data = for_training(data_run, cfg)
        except DataRunError as e:
            print(f"ssl-pipeline run: --data {e}", file=sys.stderr)
            return 2
    if not tasks_available(cfg):
        return 2
    from flows.pipeline import pipeline
    state = pipeline(config_path=str(Path(args.config).resolve()) if args.config else None,
                     overrides=args.set, until=args.until, start_from=args.start_from, data_run=data_run,
                     return_state=True)
    flow_run_id = str(state.state_details.flow_run_id) if state.state_details else None
    if not state.is_completed():
        print(f"ssl-pipeline: run failed: {state.message}", file=sys.stderr)
        print("\n".join(_failure_hint(args, cfg, flow_run_id)), file=sys.stderr)
        return 1
    summary = state.result()
    if "model_uri" not in summary:
        print("\n".join(_data_run_text(args, state.message, summary, flow_run_id)))
        return 0
    if summary.get("evaluation"):
        print(f"\nEvaluation (lm-evaluation-harness; ± one standard error):\n{summary['evaluation']}")
    print(f"\nDone: {state.message}")
    print(f"Model:            {summary['model_uri']}")
    print(f"MLflow run:       {summary['mlflow_run_url']}")
    print(f"Data:             {summary['run_dir']}")
    print("\n".join(_ui_hint(flow_run_id)))
    if data is not None:
        print(f"Trained on:       {data.manifests['tokenize']['dir']}  (the data of {data.describe()})")
    return 0


def _data_run_text(args, message: str, summary: dict, flow_run_id: str | None) -> list[str]:
    """After a run that stopped before train: where its data is, and how to go on from it."""
    stages = summary["stages"]
    last = list(stages)[-1]
    lines = [f"\nDone: {message} (no model trained)", "", f"{'stage':<14}{'documents':>10}  sha256        folder"]
    lines += [f"{s:<14}{m['rows']:>10}  {m['digest'][:12]}  {m['dir']}" for s, m in stages.items()]
    if "train_tokens" in stages[last]:
        lines.append(f"{'':<14}tokens: train {stages[last]['train_tokens']}, val {stages[last].get('val_tokens')}")
    lines += ["", f"Data:             {stages[last]['dir']}  ({last}, sha256 {stages[last]['digest']})",
              f"Run folder:       {summary['run_dir']}" + ("" if Path(summary["run_dir"]).is_dir() else
                                                            "  (not written: every stage came back cached)"),
              f"MLflow run:       {summary['mlflow_run_url']}"]
    lines += _ui_hint(flow_run_id)
    again = ["ssl-pipeline", "run", *(["--config", args.config] if args.config else []),
             *(x for o in args.set for x in ("--set", o))]
    if last == "tokenize":
        lines.append(f"Train on it:      {shlex.join([*again, '--from', 'train', '--data', flow_run_id])}")
    else:
        lines.append(f"Go on to tokenize: {shlex.join([*again, '--until', 'tokenize'])}  "
                     "(finished stages come back cached)")
    if any(s in stages for s in ("extract", "filter", "dedup", "decontaminate")):
        lines.append(f"Export the corpus: ssl-pipeline export-corpus {flow_run_id} corpus-{flow_run_id[:8]}  "
                     "(a Hugging Face datasets folder)")
    return lines


def cmd_export_corpus(args) -> int:
    """An earlier run's curated documents as a Hugging Face ``datasets`` folder, logged in MLflow."""
    from flows.corpus import export_corpus
    from flows.data_runs import DataRunError, resolve
    try:
        run = resolve(args.run, args.data_dir)
        out = export_corpus(run, args.out, args.stage, args.force)
    except (DataRunError, OSError) as e:
        print(f"ssl-pipeline export-corpus: {e}", file=sys.stderr)
        return 2
    print(f"{out['rows']} documents of the {out['stage']} stage (sha256 {out['digest']}) written to {out['dir']}")
    print(f"  {len(out['files'])} Parquet file(s) under data/, and README.md (the dataset card)")
    print(f"Load it:          datasets.load_dataset({out['dir']!r}, split='train')")
    if out["mlflow_run_id"]:
        print(f"MLflow:           dataset {out['dataset']!r} logged as an input (context export) of pipeline run "
              f"{out['mlflow_run_url']}")
    else:
        print(f"MLflow:           not logged: {run.describe()}")
    return 0


def cmd_retry(args) -> int:
    """Retry a finished, failed or crashed flow run in this process: the CLI twin of the UI's Retry.
    A run still marked Running whose process is provably gone (killed) is marked Crashed first."""
    from prefect.settings import PREFECT_API_URL

    from flows import recovery
    if not PREFECT_API_URL.value():
        print("ssl-pipeline retry: PREFECT_API_URL is not set. A retry needs the Prefect server the run is "
              "recorded on; a run on Prefect's temporary server is gone with it (run it again instead). "
              f"Persistent servers: {PERSISTENT}", file=sys.stderr)
        return 2
    try:
        recovery.prepare_retry(args.flow_run_id, say=lambda line: print(line, flush=True))
    except recovery.NotRetryable as e:
        print(f"ssl-pipeline retry: {e}", file=sys.stderr)
        return 1
    entry = f"{Path(__file__).with_name('pipeline.py')}:pipeline"
    prefect = Path(sys.executable).with_name("prefect")
    # in place of this process: the flow runs in it, under its pid (killed, nothing is left behind)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(str(prefect), [str(prefect), "flow-run", "retry", args.flow_run_id, "--entrypoint", entry])


def cmd_config(args) -> int:
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        print(f"ssl-pipeline: {e}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    return 0


def cmd_export(args) -> int:
    from ssl_model.export import export_checkpoint
    try:
        out = export_checkpoint(args.checkpoint, args.out, args.tokenizer)
    except (OSError, ValueError) as e:
        print(f"ssl-pipeline export: {e}", file=sys.stderr)
        return 2
    print(f"Hugging Face checkpoint written to {out}")
    return 0


def cmd_evaluate(args) -> int:
    """Score a registered model, a runs:/ checkpoint or a Hugging Face folder as the evaluate stage
    does; the scores go to an MLflow run of their own (and on a registered model's version)."""
    from flows.lineage import LineageError
    from tasks import evaluate, tracking
    from tasks.config import EvaluateConfig
    try:
        cfg = EvaluateConfig(tasks=[t for t in (args.tasks or "").split(",") if t], suite=not args.no_suite,
                             limit=args.limit, batch_size=args.batch_size, device=args.device)
        report = evaluate.evaluate_model(args.model, cfg, Path(args.cache).resolve(), args.suite)
    except (evaluate.TaskDataMissing, LineageError, ValueError, OSError) as e:
        print(f"ssl-pipeline evaluate: {e}", file=sys.stderr)
        return 2
    c = tracking.client()
    run = c.create_run(tracking.experiment_id(args.experiment), run_name="evaluate",
                       tags={tracking.STAGE_TAG: "evaluate", "ssl_pipeline.evaluated_model": args.model})
    evaluate.log_report(run.info.run_id, report, Path(report["dir"]), args.model, describe=False)
    tracking.end_run(run.info.run_id, ok=True)
    report["mlflow_run_id"] = run.info.run_id
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(evaluate.table_text(report))
        print(f"\n{args.model}: {evaluate.headline_text(report)}")
        print(f"MLflow run: {tracking.run_url(run.info.run_id)}")
    return 0


def cmd_audit(args) -> int:
    """``lineage`` and ``why``: read only MLflow and the run's data; print text or JSON."""
    from flows import lineage
    try:
        if args.command == "lineage":
            report, text = lineage.lineage(args.model_uri), lineage.format_lineage
        else:
            report, text = lineage.why(args.query, args.model, args.run, args.experiment), lineage.format_why
    except lineage.LineageError as e:
        print(f"ssl-pipeline {args.command}: {e}", file=sys.stderr)
        return e.code
    print(json.dumps(report, indent=2) if args.json else text(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ssl-pipeline", description="Raw web pages to a pretrained model.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, fn, text in [("run", cmd_run, "run the whole pipeline"),
                           ("config", cmd_config, "print the resolved configuration")]:
        sp = sub.add_parser(name, help=text)
        sp.add_argument("--config", help=f"YAML config file (default: built-in defaults; demo profile: "
                                         f"{PROFILES / 'demo.yaml'})")
        sp.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one setting, e.g. --set train.max_steps=200 (repeatable)")
        sp.set_defaults(fn=fn)
        if name == "run":
            sp.add_argument("--until", metavar="STAGE", help=f"stop after this stage ({', '.join(DATA_STAGES)}, "
                                                             "train): curate data here, train elsewhere")
            sp.add_argument("--from", dest="start_from", metavar="STAGE",
                            help="start from this stage: only train, on the data named by --data")
            sp.add_argument("--data", metavar="RUN", help="with --from train: the run whose token shards to train "
                                                          "on: its Prefect flow run id, its pipeline MLflow run id, "
                                                          "or its folder")
    sp = sub.add_parser("ablate", help="train the same model on data prepared different ways (variants) and "
                                       "compare them on one evaluation suite")
    sp.add_argument("--config", required=True, help=f"ablation file: base config, ablate settings, variants "
                                                    f"(example: {PROFILES / 'ablate-demo.yaml'})")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(fn=cmd_ablate)
    sp = sub.add_parser("retry", help="retry a failed flow run; finished stages come back cached")
    sp.add_argument("flow_run_id")
    sp.set_defaults(fn=cmd_retry)
    sp = sub.add_parser("export", help="export a training checkpoint as a Hugging Face transformers model")
    sp.add_argument("checkpoint", help="a step-NNNNNNN.pt file from the train stage")
    sp.add_argument("out", help="new folder for config.json, model.safetensors and the tokenizer")
    sp.add_argument("--tokenizer", help="tokenizer.json to include (the tokenize stage's)")
    sp.set_defaults(fn=cmd_export)
    sp = sub.add_parser("export-corpus", help="export a run's curated documents as a Hugging Face datasets "
                                              "folder (Parquet shards and a dataset card)")
    sp.add_argument("run", metavar="RUN", help="the run: its Prefect flow run id, its pipeline MLflow run id, or "
                                               "its folder")
    sp.add_argument("out", help="new folder for data/train-*.parquet and README.md")
    sp.add_argument("--stage", choices=["extract", "filter", "dedup", "decontaminate"],
                    help="the documents kept by this stage (default: the last of these the run has, "
                         "the training corpus)")
    sp.add_argument("--force", action="store_true", help="replace OUT if it exists")
    sp.add_argument("--data-dir", default="runs", help="where a flow run id's folder is looked for when MLflow "
                                                       "does not know it (default: %(default)s)")
    sp.set_defaults(fn=cmd_export_corpus)
    sp = sub.add_parser("evaluate", help="score a model with lm-evaluation-harness as the evaluate stage does")
    sp.add_argument("model", help="models:/NAME/VERSION (or /latest, @ALIAS), runs:/RUN_ID/PATH to a checkpoint, "
                                  "or a Hugging Face model folder")
    sp.add_argument("--tasks", help="lm-eval tasks by name, comma-separated (hellaswag,arc_easy,...), besides the suite")
    sp.add_argument("--suite", metavar="FOLDER", help="an evaluation suite folder (an evaluate run's 'suite' "
                                                      "artifact); default: the model's own pipeline run's")
    sp.add_argument("--no-suite", action="store_true", help="only the named --tasks")
    sp.add_argument("--limit", type=int, help="items per named task at most")
    sp.add_argument("--batch-size", type=int, default=32)
    sp.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    sp.add_argument("--cache", default=".ssl/evaluate", help="where models are downloaded and exported "
                                                              "(default: %(default)s)")
    sp.add_argument("--experiment", default=TrackingConfig().experiment, help="MLflow experiment of the "
                                                                              "evaluation run (default: %(default)s)")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(fn=cmd_evaluate)
    sp = sub.add_parser("lineage", help="a registered model's lineage: training run, token shards, every "
                                        "stage's dataset and counts, sources")
    sp.add_argument("model_uri", help="models:/NAME/VERSION (or models:/NAME/latest, models:/NAME@ALIAS)")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(fn=cmd_audit)
    sp = sub.add_parser("why", help="what became of one document: dropped where and why, or where its tokens are")
    sp.add_argument("query", metavar="URL_OR_DOC_ID")
    which = sp.add_mutually_exclusive_group()
    which.add_argument("--model", metavar="MODEL_URI", help="the pipeline run that trained this model")
    which.add_argument("--run", metavar="MLFLOW_RUN_ID", help="this pipeline (parent) run")
    sp.add_argument("--experiment", default=TrackingConfig().experiment,
                    help="without --model or --run: the latest finished pipeline run of this MLflow experiment "
                         "(default: %(default)s)")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(fn=cmd_audit)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # without PREFECT_API_URL a run starts Prefect's temporary server, which creates its database
    # first: on a busy 2-core machine that took over Prefect's default 20 s (two suite runs failed
    # with "Timed out while attempting to connect to ephemeral Prefect API server")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # a heartbeat event every 30 s (Prefect's minimum) while a flow runs: the Prefect server's
    # automation (infra/services.py) marks a run whose heartbeats stop Crashed, so it can be retried
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30")
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
