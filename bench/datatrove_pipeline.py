"""datatrove's FineWeb filters + MinHash dedup over a JSONL corpus, for bench/datatrove_compare.py.

Runs in its own virtual environment (datatrove is never a dependency of this project):

    python bench/datatrove_pipeline.py INPUT.jsonl WORK_DIR OUT.json [--dedup-only | --filters-only]

Filters as FineWeb configures them: Gopher repetition, Gopher quality, C4 (end-punctuation line
rule off), FineWeb quality; then MinHash (5-grams, 14 buckets x 8 hashes) in its four stages.
``--filters-only`` stops after the filters, ``--dedup-only`` runs MinHash on the input as it is.
The output names every dropped document's filter and reason (datatrove's ``filter_reason``) and
gives the sha256 of each kept document's text.

nltk's punkt model cannot be downloaded here, so an empty punkt_tab is written for English. The
filters do not use it: for English, datatrove splits words and sentences with spaCy's blank
English pipeline (``datatrove.utils.word_tokenizers``), which needs no model download; it is
loaded before the clock starts, like the imports.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

FILTERS = ("gopher_repetition", "gopher_quality", "c4", "fineweb")


def empty_punkt(root: Path) -> None:
    d = root / "tokenizers" / "punkt_tab" / "english"
    d.mkdir(parents=True, exist_ok=True)
    for name in ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab"):
        (d / name).touch()
    os.environ["NLTK_DATA"] = str(root)


def main(src: str, work: str, out: str, mode: str = "all") -> None:
    work_dir = Path(work)
    empty_punkt(work_dir / "nltk_data")
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.typeshelper import Languages
    from datatrove.utils.word_tokenizers import load_word_tokenizer
    load_word_tokenizer(Languages.english).word_tokenize("Warm up. The tokenizer loads here.")

    def excluded(name: str) -> JsonlWriter:
        return JsonlWriter(str(work_dir / "dropped" / name), output_filename="${rank}.jsonl", compression=None)
    reader = JsonlReader(str(Path(src).parent), glob_pattern=Path(src).name, id_key="doc_id")
    filters = [GopherRepetitionFilter(exclusion_writer=excluded("gopher_repetition")),
               GopherQualityFilter(exclusion_writer=excluded("gopher_quality")),
               C4QualityFilter(filter_no_terminal_punct=False, exclusion_writer=excluded("c4")),
               FineWebQualityFilter(exclusion_writer=excluded("fineweb")),
               JsonlWriter(str(work_dir / "filtered"), output_filename="${rank}.jsonl", compression=None)]
    config = MinhashConfig()
    if mode == "dedup-only":   # the input goes to MinHash as it is
        filters = [JsonlWriter(str(work_dir / "filtered"), output_filename="${rank}.jsonl", compression=None)]
    filtered = JsonlReader(str(work_dir / "filtered"))
    stages = [
        ("filter", [reader, *filters]),
        ("signatures", [filtered, MinhashDedupSignature(output_folder=str(work_dir / "sigs"), config=config)]),
        ("buckets", [MinhashDedupBuckets(input_folder=str(work_dir / "sigs"), output_folder=str(work_dir / "buckets"),
                                         config=config)]),
        ("cluster", [MinhashDedupCluster(input_folder=str(work_dir / "buckets"), output_folder=str(work_dir / "remove"),
                                         config=config)]),
        ("dedup_filter", [filtered, MinhashDedupFilter(input_folder=str(work_dir / "remove"),
                                                       exclusion_writer=excluded("minhash")),
                          JsonlWriter(str(work_dir / "kept"), output_filename="${rank}.jsonl", compression=None)]),
    ]
    if mode == "filters-only":
        stages = stages[:1]
    seconds = {}
    for name, steps in stages:
        tasks = config.num_buckets if name == "buckets" else 1
        t0 = time.perf_counter()
        LocalPipelineExecutor(pipeline=steps, tasks=tasks, workers=1, logging_dir=str(work_dir / "logs" / name)).run()
        seconds[name] = round(time.perf_counter() - t0, 3)

    def rows(folder: Path) -> list[dict]:
        return [json.loads(line) for f in sorted(folder.glob("*.jsonl")) for line in f.open()] \
            if folder.is_dir() else []
    dropped = {name: rows(work_dir / "dropped" / name) for name in (*FILTERS, "minhash")}
    kept = rows(work_dir / ("filtered" if mode == "filters-only" else "kept"))
    Path(out).write_text(json.dumps({
        "seconds": seconds, "kept": [r["id"] for r in kept],
        "kept_sha256": {r["id"]: hashlib.sha256(r["text"].encode()).hexdigest() for r in kept},
        "dropped": {name: [r["id"] for r in rs] for name, rs in dropped.items()},
        "reasons": {r["id"]: f"{name}:{r['metadata'].get('filter_reason', '')}"
                    for name, rs in dropped.items() for r in rs}}))


if __name__ == "__main__":
    main(*sys.argv[1:4], mode=next((a[2:] for a in sys.argv[4:] if a in ("--dedup-only", "--filters-only")), "all"))
