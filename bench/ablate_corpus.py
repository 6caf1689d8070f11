"""The ablation demo's question on a larger corpus: raw vs filtered vs curated on bench/corpus.py's text.

    make services && export PREFECT_API_URL=http://127.0.0.1:4200/api MLFLOW_TRACKING_URI=http://127.0.0.1:5000
    python bench/ablate_corpus.py [--workdir DIR] [--tokens 2000000] [--out bench/results/ablate_corpus.json]

The corpus is bench/corpus.py's (a few thousand documents of real text found on this machine:
Python documentation pages and their sections, pydoc pages, man and info pages, /usr/share/doc
files, Perl POD, package READMEs), read by the collect stage as a JSON Lines source. The ablation
file written to ``DIR/ablate-large.yaml`` is flows/profiles/ablate-demo.yaml's on that source:
the demo profile's filters and model, a larger vocabulary, one seed, ``--tokens`` training tokens
per variant, 5 % of the documents set aside by doc id (before any filtering) as the suite.
``ssl-pipeline ablate`` runs it in DIR; run again, finished variants come back cached. Writes the
comparison (table, verdicts, intervals), the corpus' make-up and the wall time to ``--out``.

``--eval-source NAME`` (for example ``python-page``) scores the variants on one of the corpus'
sources instead (``evaluate.sources``: neither raw nor curated pages), the others being the
training data; documents that copy from it (``python-section``: sections of those pages) are
what decontamination removes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import corpus  # noqa: E402

VARIANTS = yaml.safe_load((ROOT / "flows/profiles/ablate-demo.yaml").read_text())["variants"]   # the demo's


def ablation_file(corpus_path: Path, tokens: int, eval_path: Path | None = None) -> dict:
    evaluate = {"evaluate.sources": [str(eval_path)]} if eval_path else {}
    return {"base": str(ROOT / "flows/profiles/demo.yaml"),
            "ablate": {"tokens": tokens, "seeds": [1337], "heldout_fraction": 0.05, "heldout_by": "doc"},
            "set": {"collect.tables": [{"path": str(corpus_path), "text_column": "text", "url_column": None}], **evaluate,
                    "collect.max_pages": 20000,        # every document of the corpus
                    "tokenize.vocab_size": 8192,       # ~50 MB of text: the default vocabulary, not the demo's 4096
                    "train.eval_interval": 100, "train.checkpoint_interval": 250,
                    "evaluate.untrained": False},
            "variants": VARIANTS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=corpus.DEFAULT_PATH.parent / "ablate-large",
                    help="where the ablation file and its runs go (default: %(default)s)")
    ap.add_argument("--tokens", type=int, default=2_000_000, help="training tokens per variant")
    ap.add_argument("--eval-source", help="score on this source of the corpus (evaluate.sources), train on the others")
    ap.add_argument("--out", type=Path, help="default: bench/results/ablate_corpus.json, or "
                                             "ablate_corpus_eval_<source>.json with --eval-source")
    args = ap.parse_args()
    stem = "ablate_corpus" + (f"_eval_{args.eval_source.replace('-', '_')}" if args.eval_source else "")
    args.out = args.out or ROOT / "bench/results" / f"{stem}.json"
    for var in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        if not os.environ.get(var):
            sys.exit(f"{var} is not set: start the servers (make services) and export their addresses")
    rows = corpus.build()
    args.workdir.mkdir(parents=True, exist_ok=True)
    train_path, eval_path = corpus.DEFAULT_PATH, None
    if args.eval_source:
        if args.eval_source not in {r["source"] for r in rows}:
            sys.exit(f"--eval-source {args.eval_source}: not a source of the corpus "
                     f"({', '.join(sorted({r['source'] for r in rows}))})")
        train_path, eval_path = args.workdir / "train.jsonl", args.workdir / f"eval-{args.eval_source}.jsonl"
        for dest, keep in ((train_path, lambda r: r["source"] != args.eval_source),
                           (eval_path, lambda r: r["source"] == args.eval_source)):
            dest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows if keep(r)))
    path = args.workdir / ("ablate-large.yaml" if not args.eval_source else f"ablate-eval-{args.eval_source}.yaml")
    ablation = ablation_file(train_path, args.tokens, eval_path)
    path.write_text(yaml.safe_dump(ablation, sort_keys=False))
    t0 = time.time()
    proc = subprocess.run([str(ROOT / ".venv/bin/ssl-pipeline"), "ablate", "--config", str(path), "--json"],
                          cwd=args.workdir, stdout=subprocess.PIPE, text=True)   # progress on stderr, as it runs
    if proc.returncode != 0:
        sys.exit(f"ssl-pipeline ablate failed (rc {proc.returncode}); its folder: {args.workdir}")
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    comparison = report["comparison"]
    result = {"date": date.today().isoformat(),
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
              "command": " ".join(["python bench/ablate_corpus.py", *sys.argv[1:]]),
              "wall_s": round(time.time() - t0, 1),
              "corpus": corpus.describe(rows),
              "ablation": ablation, "eval_source": args.eval_source,
              "suite_digest": report["suite_digest"], "steps": report["steps"],
              "variants": report["variants"],
              "metrics": {k: {"items": m["items"], "direction": m["direction"],
                              "variants": {v: {"value": s["value"], "stderr": s["stderr"]}
                                           for v, s in m["variants"].items()},
                              "pairs": m["pairs"]} for k, m in comparison["metrics"].items()},
              "confidence": comparison["confidence"], "bootstrap": comparison["iters"],
              "verdicts": report["verdicts"], "mlflow_run_id": report["mlflow_run_id"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("wall_s", "variants", "verdicts")}, indent=2))


if __name__ == "__main__":
    main()
