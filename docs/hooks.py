"""mkdocs hooks: the reference pages and the benchmark figures, generated from the code at build time.

A page asks for a generated part with a placeholder line: ``<!-- generated: config -->`` (every
key of the pipeline configuration, from the pydantic models in ``tasks/config.py``),
``<!-- generated: ablation -->`` (the ablation file, ``flows/ablate.py``), ``<!-- generated: cli -->``
(``flows.cli.build_parser()``), ``<!-- generated: reasons -->`` (``tasks/reasons.py``) and
``<!-- generated: benchmarks -->`` (``bench/results/*.json``). Nothing generated is committed, so
none of it can drift from the code; a config field without a description stops the build.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
PLACEHOLDER = re.compile(r"^<!-- generated: ([a-z]+) -->$", re.M)


# --- mkdocs events ---------------------------------------------------------------------------

def on_config(config, **kwargs):
    if str(ROOT) not in sys.path:   # flows/, tasks/ and ssl_model/ importable without installing
        sys.path.insert(0, str(ROOT))
    return config


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    def generate(m: re.Match) -> str:
        name = m.group(1)
        if name not in GENERATORS:
            raise ValueError(f"{page.file.src_path}: no generator named {name!r} (known: {', '.join(GENERATORS)})")
        return GENERATORS[name]()
    return PLACEHOLDER.sub(generate, markdown)


# --- helpers ---------------------------------------------------------------------------------

def cell(text: Any) -> str:
    """Text for a Markdown table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def code(value: str) -> str:
    value = str(value)
    ticks = "``" if "`" in value else "`"
    return f"{ticks}{value}{ticks}" if value else ""


def table(header: list[str], rows: list[list[Any]], align: list[str] | None = None) -> str:
    align = align or ["---"] * len(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def relative_paths(text: str) -> str:
    """Absolute paths of this checkout (in help texts) as paths in the repository."""
    return text.replace(str(ROOT) + os.sep, "").replace(str(ROOT), ".")


# --- configuration reference -----------------------------------------------------------------

def type_name(annotation: Any) -> str:
    """A field's type as a reader says it: ``int or null``, ``list of str``, ``one of a, b``."""
    from pydantic import BaseModel
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is typing.Literal:
        return "one of " + ", ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin is list:
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping {type_name(args[0])} → {type_name(args[1])}" if args else "mapping"
    if annotation is typing.Any:
        return "any"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def default_text(field) -> str:
    from pydantic_core import PydanticUndefined
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if hasattr(value, "model_dump"):
        return "(section)"
    return code(json.dumps(value, ensure_ascii=False))


def model_of(annotation: Any):
    """The section model a field holds (itself, or the items of a list of them), else None."""
    from pydantic import BaseModel
    for a in (annotation, *typing.get_args(annotation)):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def undescribed(model, prefix: str = "") -> list[str]:
    """Dotted names of the fields of ``model`` and its sections that have no description."""
    missing = []
    for name, field in model.model_fields.items():
        if not (field.description or "").strip():
            missing.append(prefix + name)
        sub = model_of(field.annotation)
        if sub is not None:
            missing += undescribed(sub, f"{prefix}{name}{'[]' if typing.get_origin(field.annotation) is list else ''}.")
    return missing


def model_tables(model, prefix: str, level: int, top: str = "top level") -> list[str]:
    """A table of the keys of ``model`` (a heading per section), then its sections, depth first."""
    missing = undescribed(model)
    if missing:
        raise ValueError(f"{model.__name__}: fields without a description: {', '.join(missing)} "
                         "(give every config field a Field(description=...))")
    plain = [(n, f) for n, f in model.model_fields.items() if model_of(f.annotation) is None]
    nested = [(n, f) for n, f in model.model_fields.items() if model_of(f.annotation) is not None]
    out = []
    if plain:
        if not prefix and nested:
            out.append(f"{'#' * level} {top}\n")
        out.append(table(["key", "type", "default", "description"],
                         [[code(prefix + n), type_name(f.annotation), default_text(f), f.description]
                          for n, f in plain]) + "\n")
    for name, f in nested:
        many = typing.get_origin(f.annotation) is list
        dotted = f"{prefix}{name}{'[]' if many else ''}"
        text = f.description + (" Each item of the list has these keys." if many else "")
        out.append(f"{'#' * level} {dotted}\n\n{text}\n")
        out += model_tables(model_of(f.annotation), dotted + ".", level + 1)
    return out


def config_reference() -> str:
    from tasks.config import PipelineConfig
    head = (f"All {count_keys(PipelineConfig)} keys of the pipeline configuration, generated from "
            "`tasks/config.py`. A YAML file names only what differs from these defaults; `--set "
            "section.key=value` overrides one key on the command line.\n")
    return head + "\n" + "\n".join(model_tables(PipelineConfig, "", 2))


def ablation_reference() -> str:
    from flows.ablate import AblationConfig
    return "\n".join(model_tables(AblationConfig, "", 3, top="the ablation file"))


def count_keys(model) -> int:
    n = 0
    for f in model.model_fields.values():
        sub = model_of(f.annotation)
        n += count_keys(sub) if sub is not None else 1
    return n


# --- command line reference ------------------------------------------------------------------

def subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, help, parser) of each subcommand, in the order they are defined."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return [(name, helps.get(name, ""), sp) for name, sp in action.choices.items()]
    return []


def argument_rows(parser: argparse.ArgumentParser) -> list[list[str]]:
    rows = []
    for a in parser._actions:
        if isinstance(a, argparse._HelpAction) or a.help == argparse.SUPPRESS:
            continue
        if a.option_strings:
            name = ", ".join(code(o + (f" {a.metavar or a.dest.upper()}" if a.nargs != 0 else ""))
                             for o in a.option_strings)
        else:
            name = code(a.metavar or a.dest)
        default = a.default
        shown = "" if default in (None, False, [], argparse.SUPPRESS) else code(default)
        notes = [n for n in ("required" if a.required and a.option_strings else "",
                             "repeatable" if isinstance(a, argparse._AppendAction) and "repeatable" not in (a.help or "")
                             else "",
                             "one of " + ", ".join(map(str, a.choices)) if a.choices else "") if n]
        help_text = (a.help or "") % {"default": default, "prog": parser.prog} if a.help else ""
        rows.append([name, relative_paths(help_text) + ("" if not notes else f" ({'; '.join(notes)})"), shown])
    return rows


def cli_reference() -> str:
    from flows.cli import build_parser
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"   # argparse wraps usage lines to the terminal: the same on every machine
    try:
        parser = build_parser()
        out = [f"`{parser.prog}`: {parser.description} Generated from `flows/cli.py`; "
               f"`{parser.prog} COMMAND --help` prints the same.\n",
               table(["command", "what it does"],
                     [[f"[`{name}`](#{name})", text] for name, text, _ in subcommands(parser)]) + "\n"]
        for name, text, sp in subcommands(parser):
            usage = relative_paths(sp.format_usage().removeprefix("usage: ").rstrip())
            out.append(f"## {name}\n\n{text[:1].upper() + text[1:]}.\n\n```\n{usage}\n```\n")
            rows = argument_rows(sp)
            if rows:
                out.append(table(["argument", "meaning", "default"], rows) + "\n")
        return "\n".join(out)
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old


# --- reason codes ----------------------------------------------------------------------------

def reasons_reference() -> str:
    from tasks.reasons import REASONS, STAGES
    out = [f"All {len(REASONS)} codes, generated from `tasks/reasons.py` (a test checks that every code a "
           "stage can write is listed there). Codes with `<...>` stand for a family.\n"]
    for stage in STAGES:
        rows = [[code(c), meaning] for c, (s, meaning) in REASONS.items() if s == stage]
        out.append(f"## {stage}\n\n" + table(["reason", "a row is dropped when"], rows) + "\n")
    return "\n".join(out)


# --- benchmarks ------------------------------------------------------------------------------

def num(x: Any, digits: int = 3) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, int) or float(x).is_integer() and abs(x) >= 100:
        return f"{int(x):,}"
    return f"{x:,.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"


def speed_row(d: dict, name: str, label: str) -> list[str]:
    return [label, num(d.get(f"{name}_1p_pages_per_s")), num(d.get(f"{name}_2p_pages_per_s")),
            f"{num(d.get(f'{name}_speedup_2p'))}×",
            num(d.get(f"{name}_speedup_2p_of_reference", ""))]


def bench_collect_extract(d: dict) -> str:
    rows = [["bare `trafilatura.extract` (reference; 2 processes: the ceiling)", num(d["reference_pages_per_s"]),
             num(d["reference_2p_pages_per_s"]),
             f"{num(d['reference_speedup_2p'])}× (balanced {num(d['reference_speedup_2p_balanced'])}×)", "—"],
            speed_row(d, "extract", "our extract stage (Parquet in and out)"),
            speed_row(d, "warc_extract", "collect from a WARC + extract"),
            speed_row(d, "crawl_extract", "collect by HTTP crawl + extract")]
    eff = d.get("parallel_efficiency", {})
    return (table([f"{d['pages']} pages, {d['html_mb']} MB of HTML, medians of {d['rounds']} rounds", "1 process",
                   "2 processes", "2-process speedup", "of the ceiling"], rows,
                  ["---", "---:", "---:", "---:", "---:"]) +
            f"\n\nPer-core overhead of our extract over bare trafilatura: {d['extract_overhead_per_core']:+.2%} "
            f"CPU time per page. Parallel efficiency with 2 processes (CPU seconds over processes × wall): "
            f"extract {num(eff.get('extract_2p'))}, WARC {num(eff.get('warc_extract_2p'))}, crawl "
            f"{num(eff.get('crawl_extract_2p'))}, bare loop {num(eff.get('reference_2p'))}. Worker start: "
            f"{num(d['worker_start_cold_s'])} s for the first pool of a process, "
            f"{num(d['worker_start_warm_s'] * 1000)} ms for each later one.")


def bench_dask_scaleout(d: dict) -> str:
    labels = {"dask_1_worker": "Dask, 1 worker", "dask_2_workers": "Dask, 2 workers",
              "local_2_processes": "local processes, 2 (reference)"}
    rows = [[labels.get(k, k), num(v), num(d["pages_per_s_median"].get(k))] for k, v in d["seconds_median"].items()]
    return (f"{d.get('what', '')}\n\n" +
            table([f"{d['pages']} pages, medians of {d['rounds']} rounds", "seconds", "pages/s"], rows,
                  ["---", "---:", "---:"]) +
            f"\n\n**1 → 2 workers: {num(d['speedup_1_to_2_workers'])}×** (rounds "
            f"{', '.join(num(x) for x in d['speedup_per_round'])}; floor {d['floor']}×). Local processes are "
            f"{num(d['dask_2_workers_vs_local_2_processes'])}× as fast as Dask with 2 workers: each shard of "
            "work on Dask is a Prefect task run.")


def bench_datatrove_compare(d: dict) -> str:
    f, m = d["filters"], d["dedup_only"]
    rows = [[f"Gopher repetition + quality, C4, FineWeb rules at FineWeb's defaults, {num(f['docs'])} real "
             "documents (`bench/corpus.py`)", num(f["ours_docs_per_s"]), num(f["datatrove_docs_per_s"]),
             f"**{num(f['speed_ratio'])}×**",
             f"{f['agreement']:.0%}: {num(f['dropped_both_by_the_same_rule'])} dropped by the same rule, "
             f"{num(f['kept_both_with_the_same_text'])} kept with the same text"],
            [f"MinHash alone, {num(m['pairs'])} pairs of known Jaccard", num(m["ours_docs_per_s"]),
             num(m["datatrove_docs_per_s"]), f"{num(m['speed_ratio'])}×",
             f"{m['pair_agreement']:.0%} of pairs decided alike; precision / recall: ours "
             f"{num(m['ours']['precision'])} / {num(m['ours']['recall'])}, datatrove "
             f"{num(m['datatrove']['precision'])} / {num(m['datatrove']['recall'])}"]]
    return table(["input", "ours, docs/s", "datatrove, docs/s", "ratio", "agreement"], rows,
                 ["---", "---:", "---:", "---:", "---"])


def bench_decontaminate(d: dict) -> str:
    c = d["decontaminate"]
    by = ", ".join(f"{k} {num(v)}" for k, v in c["contaminated_by"].items())
    return (table(["measure", "result"], [
        ["corpus", f"{num(d['corpus']['documents'])} real documents; evaluation source "
                   f"`{d['corpus']['eval_source']}` ({num(d['corpus']['eval_source_docs'])} documents)"],
        ["decontaminate stage at its defaults", f"**{num(d['decontaminate_docs_per_s'])} docs/s**"],
        ["dedup stage on the same manifest", f"{num(d['dedup_docs_per_s'])} docs/s "
                                             f"(decontaminate **{num(d['ratio_decontaminate_vs_dedup'])}×** dedup's)"],
        ["dropped as contaminated, by evaluation set", by],
        ["common n-grams (ignored) / documents kept with only those / copies",
         f"{num(c['common_ngrams'])} / {num(c['kept_common_only'])} / {num(c['copies'])}"]]))


def bench_dedup(d: dict) -> str:
    s, st, q, mem = d["signatures"], d["stage"], d["quality"], d["memory"]
    dl = mem.get("datasketch_minhashlsh_added_mb_per_million_docs")
    return table(["measure", "result"], [
        [f"MinHash signatures, {num(s['docs'])} documents of {num(s['words_per_doc'])} words, {s['num_perm']} "
         "permutations, one process",
         f"ours {num(s['ours_docs_per_s'])} docs/s; plain `update_batch` loop {num(s['plain_loop_docs_per_s'])} "
         f"(**{num(s['speedup_vs_plain_loop'])}×**); `MinHash.bulk` {num(s['datasketch_bulk_docs_per_s'])} "
         f"({num(s['speedup_vs_bulk'])}×)"],
        [f"dedup stage, {num(st['docs'])} documents",
         f"{num(st['ours_docs_per_s'])} docs/s, {num(st['ratio_vs_baseline'])}× the stage at "
         f"{code(st.get('baseline_ref', 'baseline'))}"],
        [f"near duplicates at the defaults ({num(q['docs'])} documents, hard negatives included)",
         f"precision **{num(q['precision'])}**, recall **{num(q['recall'])}**; template pages merged "
         f"{q['template_pages_merged']}; dropped with no similar kept document {q['content_lost']}"],
        ["memory, added per million distinct documents", f"**{num(mem['added_mb_per_million_docs'])} MB** "
                                                         f"(datasketch's in-memory `MinHashLSH`: ~{num(dl)} MB)"]])


def bench_neardup(d: dict) -> str:
    rows = []
    for key, label in (("ours", "the dedup stage"), ("baseline", f"the stage at {code(d['baseline'].get('ref', ''))}")):
        r = d[key]
        rows.append([label, num(r["precision"]), num(r["recall"]), r["template_pages_merged"],
                     f"{r['content_lost_of_dropped']:.2%}", num(r["docs_per_s"])])
    fl = d.get("floors", {})
    return (f"{num(d['corpus']['docs'])} documents built from real pages, {num(d['corpus']['pairs'])} pairs of known "
            f"Jaccard similarity (hard negatives: template pages, shared boilerplate, quoted passages, chains). "
            f"Floors: precision ≥ {fl.get('precision')}, recall ≥ {fl.get('recall')}.\n\n" +
            table(["", "precision", "recall", "template pages merged", "dropped with no similar kept document",
                   "docs/s"], rows, ["---", "---:", "---:", "---:", "---:", "---:"]))


def bench_evaluate(d: dict) -> str:
    m = d["median_s"]
    return table(["measure", "result"], [
        ["items per task", ", ".join(f"{k} {v}" for k, v in d["items"].items())],
        ["the evaluate stage's path, median wall time", f"{num(m['ours'])} s"],
        ["`lm_eval` by hand, median wall time", f"{num(m['hand'])} s"],
        ["ratio", f"**{num(d['ratio_ours_over_hand'])}**"],
        ["every score equal to lm-eval's by hand", "yes" if d.get("same_numbers") else "**no**"],
        ["the whole stage, untrained reference included", f"{num(d['stage_seconds_with_untrained_reference'])} s"],
        ["headline", d.get("stage_headline", "")]])


def bench_train_vs_hf(d: dict) -> str:
    s = d["settings"]
    shape = s["model"]
    rows = []
    for key, label in (("ours", "ours" + (" (`torch.compile`)" if s.get("compile") else "")),
                       ("hf_fused", "`GPT2LMHeadModel`, fused AdamW"), ("hf", "`GPT2LMHeadModel`, AdamW defaults")):
        mfu = d.get(f"{key}_mfu")
        rows.append([label, num(d[f"{key}_tokens_per_s"]), num(mfu) if mfu is not None else "—",
                     num(d["final_val_loss"][key], 4)])
    return (f"{shape['arch']} {shape['n_layer']}×{shape['n_embd']}, T={shape['block_size']}, vocab "
            f"{num(shape['vocab_size'])}; batch {s['batch_size']}, {s['steps']} steps ({s['measured_steps']} timed, "
            f"{d['rounds']} interleaved rounds), {s.get('device', 'cpu')}, {s['dtype']}"
            f"{', bf16 autocast' if s.get('bf16') else ''}.\n\n" +
            table(["", "tokens/s", "MFU", f"validation loss after {s['steps']} steps"], rows,
                  ["---", "---:", "---:", "---:"]) +
            f"\n\n**{num(d['ratio'])}×** the stronger reference (`{d['stronger_reference']}`; rounds "
            f"{num(min(d['ratio_per_round'][d['stronger_reference']]))}–"
            f"{num(max(d['ratio_per_round'][d['stronger_reference']]))}).")


def bench_ablate_corpus(d: dict) -> str:
    metrics = d["metrics"]
    header = ["variant", "documents", "training tokens", "epochs"] + [code(k) for k in metrics]
    rows = [[v, num(i["docs"]), num(i["train_tokens"]), num(i["epochs"])]
            + [f"{m['variants'][v]['value']:.4f} ± {m['variants'][v]['stderr']:.4f}" for m in metrics.values()]
            for v, i in d["variants"].items()]
    c = d["corpus"]
    return (f"{num(c['documents'])} documents ({num(c['chars'])} characters), {num(d['ablation']['ablate']['tokens'])} "
            f"training tokens per variant, wall time {num(d.get('first_run_wall_s', d['wall_s']) / 60)} min.\n\n" + table(header, rows)
            + "\n\n```\n" + "\n".join(d["verdicts"]) + "\n```")


def bench_generic(d: dict) -> str:
    rows = [[code(k), num(v)] for k, v in d.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)]
    return table(["figure", "value"], rows[:12]) if rows else "No scalar figures at the top level of this file."


# stem -> (title, what it measures, command, formatter); files not listed get the generic one
BENCHMARKS: dict[str, tuple[str, str, str, Callable[[dict], str]]] = {
    "collect_extract": (
        "Collection and extraction",
        "Bare `trafilatura.extract` (in a clean interpreter) against our extract stage, and collect + extract "
        "from an HTTP crawl and from a WARC of the same pages, with 1 and 2 processes, in interleaved rounds. "
        "The bare loop in two processes at once is the machine's own 2-process speedup: the ceiling of ours.",
        "python bench/collect_extract.py", bench_collect_extract),
    "dask_scaleout": (
        "Scale-out on Dask",
        "Our extract and filter stages with `runner.task_runner: dask` on a LocalCluster of 1 and of 2 "
        "workers, every shard of work a Prefect task run, with local worker processes as the reference.",
        "python bench/dask_scaleout.py", bench_dask_scaleout),
    "dedup": (
        "Dedup",
        "MinHash signature speed against datasketch, the dedup stage's speed and memory per million "
        "documents, and its near-duplicate quality at the defaults.",
        "python bench/dedup.py [--docs 1000000]", bench_dedup),
    "neardup": (
        "Near-duplicate quality",
        "Precision and recall of the dedup stage on pairs of known Jaccard similarity, hard negatives "
        "included, against the stage before candidates were verified.",
        "python bench/neardup.py", bench_neardup),
    "decontaminate": (
        "Decontamination",
        "The decontaminate stage at its defaults against the dedup stage on the same real corpus, with one "
        "source as the evaluation documents.",
        "python bench/decontaminate.py", bench_decontaminate),
    "datatrove_compare": (
        "Against datatrove",
        "datatrove 0.10.1 (in its own virtual environment) and our stages on the same input, one process each: "
        "speed, and whether the same documents are dropped by the same rule.",
        "make bench-datatrove-env && python bench/datatrove_compare.py", bench_datatrove_compare),
    "ablate_corpus": (
        "Ablation on a larger corpus",
        "The ablation demo's variants (raw: no filters, no dedup; filtered: the demo profile's filters; curated: "
        "filters and dedup) on bench/corpus.py's real text, one seed, scored on 5 % of its documents set aside "
        "before any filtering. Differences: 95 % intervals from a paired bootstrap over the suite's items.",
        "make services && export PREFECT_API_URL=http://127.0.0.1:4200/api MLFLOW_TRACKING_URI=http://127.0.0.1:5000\n"
        "python bench/ablate_corpus.py", bench_ablate_corpus),
    "ablate_corpus_eval_python_page": (
        "Ablation on a larger corpus, scored on a source of its own",
        "The same ablation, trained on every other source of the corpus and scored on the pages of the Python "
        "documentation (`evaluate.sources`): evaluation text that is neither raw nor curated. The sections of "
        "those pages in the training sources are removed by decontamination in every variant.",
        "python bench/ablate_corpus.py --eval-source python-page", bench_ablate_corpus),
    "train_vs_hf": (
        "Training against Hugging Face transformers (CPU)",
        "Our trainer against `GPT2LMHeadModel` of the same shape in a plain PyTorch loop (same batches, "
        "schedule, clipping; from our initial weights), interleaved step by step in one process.",
        "python bench/train_vs_hf.py", bench_train_vs_hf),
    "train_vs_hf_compile": (
        "Training against Hugging Face transformers (CPU, torch.compile)",
        "The same, ours with `train.compile: true` (compilation time left out).",
        "python bench/train_vs_hf.py --compile --out bench/results/train_vs_hf_compile.json", bench_train_vs_hf),
    "train_vs_hf_gpu": (
        "Training against Hugging Face transformers (GPU)",
        "GPT-2 124M at T=1024 in bf16: ours (compiled) against `GPT2LMHeadModel` with fused and foreach AdamW "
        "(not compiled), each step timed to a CUDA synchronize; MFU against the device's bf16 peak.",
        "python bench/train_vs_hf.py --save-shards bench-tokens   # anywhere the project is installed\n"
        "python bench/train_vs_hf.py --shards bench-tokens --device cuda --preset gpt2-124m \\\n"
        "    --model-vocab 50304 --batch-size 16 --steps 200 --warmup 20 --round-steps 20 --compile \\\n"
        "    --out bench/results/train_vs_hf_gpu.json", bench_train_vs_hf),
    "evaluate": (
        "Evaluation against lm-eval by hand",
        "The evaluate stage's path (a task index of the suite folder alone) against `lm_eval --model hf "
        "--include_path SUITE` run by hand, on a demo run's model, each in a fresh process, interleaved.",
        "python bench/evaluate.py runs/<flow run id> --rounds 3", bench_evaluate),
}


def result_date(path: Path, data: dict) -> str:
    """The date the file records, else the date of the last commit that changed it."""
    if data.get("date"):
        return str(data["date"])
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%cs", "--", str(path)], cwd=ROOT,
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return f"{out} (last commit of the file)" if out else "not recorded (file not committed yet)"


def machine_text(data: dict) -> str:
    m = data.get("machine")
    if isinstance(m, dict):
        parts = [f"{m['cpus']} CPU cores" if m.get("cpus") else "", m.get("cpu") or "", m.get("gpu") or "",
                 f"Python {m['python']}" if m.get("python") else ""]
        parts += [f"{k} {v}" for k, v in m.items() if k not in ("cpus", "cpu", "gpu", "python", "platform") and v]
        return ", ".join(p for p in parts if p)
    if data.get("cores"):
        return f"{data['cores']} CPU cores"
    return "not recorded in the file"


def benchmarks() -> str:
    out = []
    files = sorted((ROOT / "bench" / "results").glob("*.json"))
    order = {stem: i for i, stem in enumerate(BENCHMARKS)}
    for path in sorted(files, key=lambda p: (order.get(p.stem, len(order)), p.stem)):
        data = json.loads(path.read_text())
        title, what, command, fmt = BENCHMARKS.get(
            path.stem, (path.stem, "A result file without a formatter here: its top-level figures.", "", bench_generic))
        try:
            body = fmt(data)
        except (KeyError, TypeError, ValueError) as e:   # a file whose layout changed: still listed
            body = f"(its layout is not the one this page knows: {type(e).__name__} {e}; top-level figures:)\n\n" \
                   + bench_generic(data)
        rel = path.relative_to(ROOT)
        cmd = f"\n\n```bash\n{command}\n```" if command else ""
        out.append(f"## {title}\n\n{what}\n\n- **Date:** {result_date(path, data)}\n- **Machine:** "
                   f"{machine_text(data)}\n- **File:** `{rel}` (earlier runs: `git log -p {rel}`){cmd}\n\n{body}\n")
    return "\n".join(out)


GENERATORS: dict[str, Callable[[], str]] = {
    "config": config_reference,
    "ablation": ablation_reference,
    "cli": cli_reference,
    "reasons": reasons_reference,
    "benchmarks": benchmarks,
}
