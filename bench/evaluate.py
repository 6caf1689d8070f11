"""Benchmark: the evaluate stage against lm-evaluation-harness run by hand, same export, same tasks.

    python bench/evaluate.py RUN_DIR [--rounds 3] [--out bench/results/evaluate.json]

RUN_DIR is a finished pipeline run's data folder (``runs/<flow run id>``, e.g. after ``make demo``):
its ``train/hf`` export is scored on the suite built (as the evaluate stage builds it) from its
``tokenize/heldout.parquet``. Each round runs, in an
order that alternates, two fresh processes over the model and the suite's three tasks:

  ours   ``tasks.evaluate``'s path: a task index of the suite folder alone, the tasks loaded, HFLM,
         lm-eval's evaluator (``python bench/evaluate.py --ours HF SUITE OUT``)
  hand   ``lm_eval --model hf --model_args pretrained=HF,dtype=float32 --include_path SUITE
         --tasks ssl_heldout_bpb,ssl_continuation,ssl_cloze --device cpu --batch_size 32``

Both include Python's start and imports. Reported: each one's wall time (median over rounds),
the median of the per-round ratios ours / hand, and every metric of both (they must be equal).
Then the whole stage once (``evaluate_stage``: the suite built from the held-out documents, the
model and an untrained one of its shape scored), its wall time: the stage's cost in a run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
TASKS = "ssl_heldout_bpb,ssl_continuation,ssl_cloze"


def ours(hf: str, suite: str, out: str) -> None:
    from tasks import evaluate as ev
    ev.quiet_harness()
    loaded = ev.load_tasks(TASKS.split(","), ev.task_manager([suite]))
    r = ev.evaluate_hf(hf, loaded, 32, "cpu", None)
    Path(out).write_text(json.dumps({"results": r["results"]["results"], "scores": r["scores"]}))


def train_manifest(run: Path) -> dict:
    """What the evaluate stage reads of the train stage's manifest (kept by Prefect, not on disk)."""
    from ssl_model.checkpoint import latest_checkpoint, load_checkpoint
    checkpoint = latest_checkpoint(run / "train" / "checkpoints")
    ckpt = load_checkpoint(checkpoint)
    return {"dir": str(run / "train"), "checkpoint": str(checkpoint), "model_config": ckpt["model_config"],
            "objective": ckpt["train_config"]["objective"]}


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{cmd[0]} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def numbers(results: dict, stderr: bool = False) -> dict:
    """Every score (or, with ``stderr``, every standard error lm-eval computed) as TASK/METRIC."""
    return {f"{t}/{k}": v for t, r in sorted(results.items()) for k, v in sorted(r.items())
            if isinstance(v, (int, float)) and not k.startswith("sample_len") and ("_stderr" in k) == stderr}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir", nargs="?")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "bench/results/evaluate.json"))
    p.add_argument("--ours", nargs=3, metavar=("HF", "SUITE", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.ours:
        return ours(*args.ours)
    run = Path(args.run_dir).resolve()
    hf = run / "train" / "hf"
    if not (hf / "config.json").is_file() or not (run / "tokenize" / "heldout.parquet").is_file():
        raise SystemExit(f"{run}: expected train/hf and tokenize/heldout.parquet (a finished pipeline run's data)")
    from tasks import evaluate as ev
    from tasks.shards import read_manifest
    tmp = Path(tempfile.mkdtemp(prefix="bench-evaluate-"))
    # the suite as this code builds it from the run's held-out documents
    suite = Path(ev.build_suite(ev.read_heldout(read_manifest(run / "tokenize")), tmp / "suite")["dir"])
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT)}
    times: dict[str, list[float]] = {"ours": [], "hand": []}
    results: dict[str, dict] = {}
    for i in range(args.rounds):
        for who in (("ours", "hand") if i % 2 == 0 else ("hand", "ours")):
            out = tmp / f"{who}-{i}"
            if who == "ours":
                cmd = [sys.executable, __file__, "--ours", str(hf), str(suite), str(out)]
            else:
                cmd = [str(BIN / "lm_eval"), "--model", "hf", "--model_args", f"pretrained={hf},dtype=float32",
                       "--include_path", str(suite), "--tasks", TASKS, "--device", "cpu", "--batch_size", "32",
                       "--output_path", str(out)]
            times[who].append(timed(cmd, env))
            if who == "ours":
                results[who], ours_scores = json.loads(out.read_text())["results"], json.loads(out.read_text())["scores"]
            else:
                results[who] = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
            print(f"round {i + 1}: {who} {times[who][-1]:.1f} s", flush=True)
    a, b = numbers(results["ours"]), numbers(results["hand"])
    # standard errors: lm-eval's by hand (its bootstrap for perplexity); ours from the items
    hand_stderr = numbers(results["hand"], stderr=True)
    stderrs = {k: {"hand": v, "ours": ours_scores[k.split("/")[0]][k.split("/")[1].split("_stderr")[0]]["stderr"]}
               for k, v in hand_stderr.items()}
    diff = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if k in a and k in b and not (a[k] == b[k] or abs(a[k] - b[k]) <= 1e-9 * max(1, abs(b[k])))}
    missing = sorted(set(a) ^ set(b))

    from tasks.config import EvaluateConfig
    t0 = time.perf_counter()
    stage = ev.evaluate_stage(EvaluateConfig(), train_manifest(run), read_manifest(run / "tokenize"), tmp / "stage")
    stage_s = time.perf_counter() - t0
    report = {"date": time.strftime("%Y-%m-%d"), "run_dir": str(run), "cores": os.cpu_count(),
              "items": stage["suite"]["items"], "rounds": args.rounds,
              "seconds": {k: v for k, v in times.items()},
              "median_s": {k: statistics.median(v) for k, v in times.items()},
              "ratio_ours_over_hand": statistics.median(o / h for o, h in zip(times["ours"], times["hand"])),
              "same_numbers": not diff and not missing, "differences": diff, "only_one_side": missing,
              "metrics": a, "stderr_hand_vs_ours": stderrs, "stage_seconds_with_untrained_reference": round(stage_s, 1),
              "stage_headline": ev.headline_text(stage)}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("median_s", "ratio_ours_over_hand", "same_numbers",
                                              "stage_seconds_with_untrained_reference")}, indent=2))


if __name__ == "__main__":
    main()
