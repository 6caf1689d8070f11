"""Each stage on small real inputs: pydoc pages of the standard library, crawled over HTTP."""

from __future__ import annotations

import gc
import http.server
import json
import math
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from tasks import pydoc_site
from tasks.collect import collect
from tasks.config import CollectConfig, DedupConfig, ExtractConfig, FilterConfig, load_config
from tasks.dedup import dedup, normalize
from tasks.extract import extract
from tasks.filter import Doc, build_filters, filter_docs, judge
from tasks.shards import StageWriter, follow_rows, future_state, iter_rows, read_table
from tasks.workers import process_pool
from tests.conftest import TEST_MODULES, run_stages

LOCAL = ["127.0.0.1/32"]  # the test servers live on loopback, which the crawler refuses by default
DEMO = load_config(Path(__file__).resolve().parents[1] / "flows/profiles/demo.yaml")


def test_collect_crawls_same_host_links_and_records_dead_ones(stages):
    m = stages["collect"]
    pages = read_table(m)
    urls = set(pages["url"].to_pylist())
    assert {f"{m}.html" for m in TEST_MODULES} <= {u.rsplit("/", 1)[1] for u in urls}
    assert m["rows"] == len(urls) == len(TEST_MODULES) + 1  # the modules and the index page
    assert set(pages["status"].to_pylist()) == {200}
    for row in pages.slice(0, 3).to_pylist():
        assert row["content_sha256"] == __import__("hashlib").sha256(row["html"].encode()).hexdigest()
    # pydoc links to modules the site does not render: each is a dropped row, not a silent loss
    dropped = read_table(m, dropped=True)
    assert m["reasons"]["http_404"] == dropped.num_rows > 0
    assert set(dropped["status"].to_pylist()) == {404}


def test_the_embedded_site_is_the_same_documents_on_any_port(tmp_path, stages, site_dir, site_url):
    """The flow renders its site in each data folder and serves it on whatever port is free: its
    pages are recorded under one origin and dated as the library they document, so two runs over
    the same pages have the same URLs, doc ids, validation split and digests at
    every stage (they used to differ at each, and the split moved val_loss by 0.25)."""
    pydoc_site.render_site(tmp_path / "site", TEST_MODULES)   # rendered again: the same pages, dated alike
    with pydoc_site.serve(tmp_path / "site") as url:   # a second server beside the session's: another port
        assert url != site_url
        again = run_stages(tmp_path, url)

    def ids(m: dict, dropped: bool = False) -> list[tuple]:
        cols = ["url", "source"] if dropped else ["url", "source", "doc_id"]
        return sorted(tuple(r.values()) for r in read_table(m, dropped=dropped, columns=cols).to_pylist())

    first, second = stages["collect"], again["collect"]
    assert first["sources"] == second["sources"] == [pydoc_site.ORIGIN]
    assert ids(first) == ids(second) and ids(first, True) == ids(second, True)
    assert all(u.startswith(pydoc_site.ORIGIN) for u, *_ in ids(second) + ids(second, True))
    assert second["rows"] == len(TEST_MODULES) + 1 and second["reasons"]["http_404"] > 0
    for stage in ("collect", "extract", "filter", "dedup", "decontaminate", "tokenize"):
        assert again[stage]["digest"] == stages[stage]["digest"], stage
    split = [pq.read_table(Path(m["tokenize"]["dir"]) / "val.idx.parquet")["doc_id"].to_pylist()
             for m in (stages, again)]
    assert split[0] == split[1] and split[0]


def test_collect_honours_robots_and_page_limit(tmp_path, site_dir):
    (site_dir / "robots.txt").write_text("User-agent: *\nDisallow: /json.html\n")
    try:
        from tasks.pydoc_site import serve
        with serve(site_dir) as url:
            m = collect(CollectConfig(max_pages=15, allow_private=LOCAL), tmp_path / "c", start_urls=[url, url + "json.html"])
    finally:
        (site_dir / "robots.txt").write_text("User-agent: *\nAllow: /\n")
    dropped = read_table(m, dropped=True).to_pylist()
    assert m["rows"] + m["dropped"] <= 15
    assert any(r["reason"] == "robots" and r["url"].endswith("/json.html") for r in dropped)
    assert not any(u.endswith("/json.html") for u in read_table(m)["url"].to_pylist())


class Flapping(http.server.BaseHTTPRequestHandler):
    """Serves a real page, but answers 503 to the first two requests for it."""
    page = b""
    hits = 0

    def do_GET(self):
        if self.path == "/robots.txt":
            self.send_response(404), self.end_headers()
            return
        Flapping.hits += 1
        code, body = (503, b"busy") if Flapping.hits <= 2 else (200, Flapping.page)
        self.send_response(code)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_collect_retries_5xx_with_backoff(tmp_path, site_dir):
    Flapping.page = (site_dir / "heapq.html").read_bytes()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flapping)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/page.html"
        ok = collect(CollectConfig(retries=2, backoff_s=0.05, allow_private=LOCAL), tmp_path / "ok", start_urls=[url])
        Flapping.hits = 0
        bad = collect(CollectConfig(retries=1, backoff_s=0.05, allow_private=LOCAL), tmp_path / "bad", start_urls=[url])
    finally:
        server.shutdown()
    assert url in read_table(ok)["url"].to_pylist() and "http_5xx" not in ok["reasons"]
    assert bad["rows"] == 0 and bad["reasons"] == {"http_5xx": 1}


def test_collect_unreachable_start_url_is_a_reason_not_a_crash(tmp_path, refused_url):
    m = collect(CollectConfig(retries=0, allow_private=LOCAL), tmp_path / "c", start_urls=[refused_url])
    assert m["rows"] == 0 and m["reasons"] == {"connect_error": 1}


def test_collect_reads_local_folders(tmp_path, site_dir):
    m = collect(CollectConfig(paths=[str(site_dir), str(tmp_path / "missing")]), tmp_path / "c")
    assert m["rows"] == len(list(site_dir.glob("*.html"))) + len(list(site_dir.glob("*.txt")))
    assert m["reasons"] == {"not_found": 1}
    assert all(u.startswith("file://") for u in read_table(m)["url"].to_pylist())


def test_extract_keeps_main_text_and_title(stages):
    m = stages["extract"]
    rows = {r["url"].rsplit("/", 1)[1]: r for r in iter_rows(m)}
    assert "JSON (JavaScript Object Notation)" in " ".join(rows["json.html"]["text"].split())
    assert "<" not in rows["textwrap.html"]["text"][:200]
    assert rows["json.html"]["title"]
    assert m["rows"] + m["dropped"] == stages["collect"]["rows"]


def test_extract_drops_pages_without_main_text(tmp_path, stages):
    # a real page cut down to its head: a title, no main text
    page = next(iter_rows(stages["collect"]))
    nav_only = page["html"].split("<body")[0] + "<body></body></html>"
    with StageWriter("collect", tmp_path / "c", pq.read_schema(Path(stages["collect"]["dir"]) / "part-00000.parquet")) as w:
        w.keep({**page, "html": nav_only, "doc_id": "nav"})
        w.keep(page)
    m = extract(ExtractConfig(), w.manifest, tmp_path / "e")
    assert m["rows"] == 1 and m["reasons"] == {"no_main_text": 1}


def test_filter_fineweb_defaults_drop_code_docs_with_reasons_and_scores(tmp_path, stages):
    m = filter_docs(FilterConfig(), stages["extract"], tmp_path / "f")
    kept, dropped = read_table(m), read_table(m, dropped=True)
    assert m["dropped"] > m["rows"]  # documentation of code is not web prose (design.md §4)
    filters = ("url", "language", "gopher_repetition", "gopher_quality", "c4", "fineweb")
    assert {r.split(":")[0] for r in m["reasons"]} <= set(filters) and "gopher_repetition:dup_5_gram" in m["reasons"]
    for col in ("gopher_quality.n_words", "gopher_quality.stop_words", "gopher_repetition.dup_5_gram_char_frac"):
        assert col in kept.column_names and col in dropped.column_names
    # the reason is the first failed rule, and the score columns show it
    for row in dropped.to_pylist():
        if row["reason"] == "gopher_quality:min_doc_words":
            assert row["gopher_quality.n_words"] < 50
        if row["reason"] == "gopher_repetition:dup_5_gram":
            assert row["gopher_repetition.dup_5_gram_char_frac"] > 0.15


def test_filter_thresholds_come_from_config(stages):
    text, url = next((r["text"], r["url"]) for r in iter_rows(stages["extract"]) if r["url"].endswith("/json.html"))
    strict = FilterConfig.model_validate({"gopher_quality": {"min_doc_words": 10 ** 6}})
    loose = FilterConfig.model_validate({"gopher_repetition": {"enabled": False}, "c4": {"enabled": False},
                                         "fineweb": {"enabled": False},
                                         "gopher_quality": {"min_doc_words": 1, "min_alpha_words_ratio": 0}})
    assert judge(Doc(text, url), build_filters(strict))[1] in ("gopher_quality:min_doc_words",) or \
        judge(Doc(text, url), build_filters(strict))[1].startswith("gopher_repetition")
    assert judge(Doc(text, url), build_filters(loose))[1] is None
    # repeating a page's lines trips the duplicate-line rule
    lines = text.splitlines()[:20]
    gopher = FilterConfig.model_validate({k: {"enabled": False} for k in ("url", "language", "c4", "fineweb")})
    assert judge(Doc("\n".join(lines * 3), url), build_filters(gopher))[1].startswith("gopher_repetition:dup_")



def test_funnel_chart_and_report_show_each_stage_and_drop_reason(tmp_path, stages):
    """The pipeline's funnel (funnel.png in MLflow, the funnel-report in Prefect) on real manifests:
    the data stages as the tests run them, and a run whose filter kept nothing (it stops there)."""
    import matplotlib.pyplot as plt

    from tasks import tracking
    strict = filter_docs(FilterConfig.model_validate({"gopher_quality": {"min_doc_words": 10 ** 6}}),
                         stages["extract"], tmp_path / "f")
    assert strict["rows"] == 0 and len(strict["reasons"]) > 1
    for manifests in (stages, {"collect": stages["collect"], "extract": stages["extract"], "filter": strict}):
        fig = tracking.funnel_figure(manifests)
        top, bottom = fig.axes
        assert [t.get_text() for t in top.get_yticklabels()] == list(manifests)
        assert [p.get_width() for p in top.patches] == [m["rows"] for m in manifests.values()] + \
            [m["dropped"] for m in manifests.values()]
        drops = {f"{s}: {r}": n for s, m in manifests.items() for r, n in m["reasons"].items()}
        shown = [t.get_text() for t in bottom.get_yticklabels()]   # one bar per reason code of each stage
        assert sorted(shown) == sorted(drops) and [p.get_width() for p in bottom.patches] == [drops[k] for k in shown]
        fig.savefig(tmp_path / "funnel.png")
        plt.close(fig)
        text = tracking.funnel_markdown(manifests)
        for s, m in manifests.items():
            assert f"| {s} | {m.get('input_rows', m['rows'] + m['dropped'])} | {m['rows']} | {m['dropped']} |" in text
            assert all(f"| {s} | `{r}` | {n} |" in text for r, n in m["reasons"].items())
    assert "stopped at **filter**: no documents left" in text
    assert any(":" in r for r in stages["filter"]["reasons"])   # reason codes as long as gopher_quality:min_doc_words

def test_dedup_exact_and_near_duplicates_name_their_survivor(tmp_path, stages):
    src = list(iter_rows(stages["filter"]))
    base = max(src, key=lambda r: len(r["text"]))
    words = base["text"].split()
    near = " ".join(w for i, w in enumerate(words) if i % 50)                       # ~2% of words deleted
    exact = base["text"].replace(" ", "  ")                                         # same after normalizing
    schema = pq.read_schema(Path(stages["filter"]["dir"]) / "part-00000.parquet")
    with StageWriter("filter", tmp_path / "f", schema) as w:
        for r in src:
            w.keep(r)
        w.keep({**base, "doc_id": "zz-exact", "text": exact})
        w.keep({**base, "doc_id": "zz-near", "text": near})
    m = dedup(DedupConfig(), w.manifest, tmp_path / "d")
    dropped = {r["doc_id"]: r for r in read_table(m, dropped=True).to_pylist()}
    assert dropped["zz-exact"]["reason"] == "exact_duplicate"
    assert dropped["zz-exact"]["duplicate_of"] == base["doc_id"]
    assert dropped["zz-near"]["reason"] == "near_duplicate"
    assert dropped["zz-near"]["duplicate_of"] == base["doc_id"]  # survivor: the longest, ties by doc_id
    assert dropped["zz-exact"]["jaccard"] == 1.0 and dropped["zz-near"]["jaccard"] >= DedupConfig().threshold
    kept = {r["doc_id"]: r for r in read_table(m).to_pylist()}
    assert kept[base["doc_id"]]["cluster_size"] >= 3
    assert m["rows"] + m["dropped"] == len(src) + 2
    assert m["minhash"]["bands"] * m["minhash"]["rows"] == m["minhash"]["num_perm"] == 112
    # deterministic: a second run gives the same rows
    again = dedup(DedupConfig(), w.manifest, tmp_path / "d2")
    assert again["digest"] == m["digest"]


def test_normalize_ignores_case_punctuation_and_spacing():
    assert normalize("Hello,  World!\n") == normalize("hello world") == "hello world"


def test_tokenize_gives_the_same_shards_whatever_order_the_documents_came_in(tmp_path, stages):
    """collect writes pages as concurrent fetches return them, so the same documents reach tokenize
    in another order and other shards from run to run; the token shards must not follow it."""
    from tasks.config import TokenizeConfig
    from tasks.tokenize import tokenize
    rows = list(iter_rows(stages["decontaminate"]))
    schema = pq.read_schema(Path(stages["decontaminate"]["dir"]) / "part-00000.parquet")
    with StageWriter("decontaminate", tmp_path / "decontaminate", schema, shard_rows=7) as w:
        for row in reversed(rows):
            w.keep(row)
    assert len(w.manifest["files"]) > 1
    held = stages["decontaminate"]["heldout"]   # the evaluation documents, tokenized apart: the same file
    shutil.copy(Path(stages["decontaminate"]["dir"]) / held, tmp_path / "decontaminate" / held)
    again = tokenize(TokenizeConfig(vocab_size=1024, val_fraction=0.25), {**w.manifest, "heldout": held},
                     tmp_path / "tokenize")
    assert again["digest"] == stages["tokenize"]["digest"]
    index = pq.read_table(Path(again["dir"]) / "train.idx.parquet")["doc_id"].to_pylist()
    assert index == sorted(index) and not list(Path(again["dir"]).glob(".*"))


def test_tokenize_writes_uint16_shards_with_a_document_index(stages):
    m = stages["tokenize"]
    folder = Path(m["dir"])
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 1024
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    texts = {r["doc_id"]: r["text"] for r in iter_rows(stages["dedup"])}
    index = pq.read_table(folder / "train.idx.parquet").to_pylist()
    val_ids = set(pq.read_table(folder / "val.idx.parquet")["doc_id"].to_pylist())
    decon = stages["decontaminate"]
    heldout = {r["doc_id"]: r["text"] for r in pq.read_table(Path(decon["dir"]) / decon["heldout"]).to_pylist()}
    assert val_ids and not val_ids & {r["doc_id"] for r in index}          # split by document
    assert len(heldout) == decon["heldout_docs"] >= 2 and not set(heldout) & (val_ids | {r["doc_id"] for r in index})
    assert len(index) + len(val_ids) + len(heldout) + decon["reasons"].get("contaminated", 0) == len(texts)
    assert all(texts[d] == t for d, t in heldout.items())                  # kept as text, for the evaluate stage
    assert "heldout" not in m and not (folder / "heldout.parquet").exists()   # tokenize holds nothing out
    tokens = np.fromfile(folder / index[0]["shard"], dtype="<u2")
    assert len(tokens) == meta["splits"]["train"]["tokens"] == index[-1]["end"]
    first = index[0]
    ids = tokens[first["start"]:first["end"]].tolist()
    assert ids[-1] == meta["eot_id"]
    assert tok.decode(ids[:-1]) == texts[first["doc_id"]]  # byte-level BPE round-trips the text


def test_stage_writer_leaves_nothing_half_written(tmp_path, stages):
    schema = pq.read_schema(Path(stages["extract"]["dir"]) / "part-00000.parquet")
    with pytest.raises(RuntimeError):
        with StageWriter("extract", tmp_path / "x", schema, shard_rows=1) as w:
            for row in iter_rows(stages["extract"]):
                w.keep(row)
            raise RuntimeError("killed mid-stage")
    assert list(tmp_path.iterdir()) == []
    # a stage killed outright (SIGKILL) leaves only its temporary folder; the next attempt clears it
    (tmp_path / ".x.tmp-999999").mkdir()
    with StageWriter("extract", tmp_path / "x", schema) as w:
        w.keep(next(iter_rows(stages["extract"])))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]
    assert w.manifest["rows"] == 1 and (tmp_path / "x" / "_manifest.json").exists()


def test_training_lowers_validation_loss_below_ln_vocab_and_resumes(tmp_path, stages):
    from ssl_model.checkpoint import latest_checkpoint, load_checkpoint
    from ssl_model.model import GPTConfig
    from ssl_model.trainer import TrainSettings, train
    events = []
    cfg = GPTConfig(vocab_size=1024, block_size=64, n_layer=2, n_head=2, n_embd=64)
    s = TrainSettings(batch_size=8, max_steps=40, lr=3e-3, warmup_steps=5, eval_interval=20,
                      checkpoint_interval=20, eval_batches=4, threads=2)
    result = train(cfg, s, stages["tokenize"]["dir"], tmp_path / "ckpt", lambda *e: events.append(e))
    evals = [m["val_loss"] for kind, _, m in events if kind == "eval"]
    assert evals[0] > result["val_loss"] and result["val_loss"] < math.log(1024) - 1
    assert [step for kind, step, _ in events if kind == "checkpoint"] == [20, 40]
    assert {"loss", "lr", "tokens_per_s"} <= set(next(m for k, _, m in events if k == "train"))
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "ckpt"))  # weights_only load
    assert ckpt["step"] == 40
    # a longer run over the same folder resumes at step 40 instead of starting over
    events.clear()
    s.max_steps = 50
    train(cfg, s, stages["tokenize"]["dir"], tmp_path / "ckpt", lambda *e: events.append(e))
    assert events[0][:2] == ("resume", 40)
    assert [step for kind, step, _ in events if kind == "train"] == list(range(41, 51))


def test_extract_in_parallel_processes_gives_the_same_rows(tmp_path, stages):
    one = extract(ExtractConfig(processes=1), stages["collect"], tmp_path / "one")
    assert one["digest"] == stages["extract"]["digest"] == \
        extract(ExtractConfig(processes=2), stages["collect"], tmp_path / "two")["digest"]
    assert {"hostname", "language", "date"} <= set(read_table(one).column_names)


def test_worker_processes_leave_the_stage_modules_out_of_their_garbage_collection():
    # a full collection in a worker would otherwise walk (and copy) every object it inherited from
    # the worker server: the stages' modules (trafilatura, pyarrow, Prefect, ...)
    with process_pool(2) as pool:
        assert pool.submit(gc.get_freeze_count).result() > 100_000
    assert gc.get_freeze_count() == 0   # the flow's own collections are as they were


def test_extract_time_limit_drops_slow_pages_instead_of_stalling(tmp_path, stages):
    # the largest real pages take longer than 1 ms to extract: each one is cut off and recorded
    m = extract(ExtractConfig(timeout_s=0.001, processes=2), stages["collect"], tmp_path / "e")
    assert m["reasons"].get("extract_timeout", 0) > 0
    assert m["rows"] + m["dropped"] == stages["collect"]["rows"]
    assert set(m["reasons"]) <= {"extract_timeout", "no_main_text"}


def test_follow_rows_reads_shards_as_they_are_written_and_ignores_a_stale_result(tmp_path):
    schema = pa.schema([("x", pa.int64())])
    with StageWriter("s", tmp_path / "s", schema) as w:  # an earlier, finished result
        w.keep({"x": -1})
    seen_while_writing = []

    def write() -> None:
        with StageWriter("s", tmp_path / "s", schema, shard_rows=10_000, flush_every_s=0.2) as w:
            for x in range(60):
                w.keep({"x": x})
                time.sleep(0.02)
    with ThreadPoolExecutor(1) as ex:
        writer = ex.submit(write)
        rows = []
        for r in follow_rows(tmp_path / "s", future_state(writer)):
            rows.append(r["x"])
            seen_while_writing.append(not writer.done())
    assert rows == list(range(60))
    assert any(seen_while_writing)
    with pytest.raises(RuntimeError, match="without publishing"):
        list(follow_rows(tmp_path / "never", lambda: "failed"))


def test_follow_rows_knows_the_total_once_published_while_a_shard_is_being_read(tmp_path):
    # extract shapes its last shards of work by the total: it must not wait for the follower to
    # finish the shard it is reading (the writer may publish meanwhile)
    schema, release = pa.schema([("x", pa.int64())]), threading.Event()

    def write() -> None:
        with StageWriter("s", tmp_path / "s", schema, shard_rows=10) as w:
            for x in range(11):
                w.keep({"x": x})   # the 10th commits the first shard
                if x == 9:
                    release.wait(30)
    with ThreadPoolExecutor(1) as ex:
        writer = ex.submit(write)
        follower = follow_rows(tmp_path / "s", future_state(writer))
        rows = iter(follower)
        first = next(rows)
        assert follower.total is None
        release.set()
        writer.result(30)
        assert follower.total == 11
        assert [first["x"], *(r["x"] for r in rows)] == list(range(11))


def test_extract_following_a_running_collect_gives_the_same_rows(tmp_path, site_url):
    # a polite crawl (20 pages/s) still running while extraction works through its first shards
    cfg = CollectConfig(allow_private=LOCAL, per_host_rps=20)
    with ThreadPoolExecutor(1) as ex:
        crawl = ex.submit(collect, cfg, tmp_path / "collect", start_urls=[site_url])
        early = []

        def pages():
            for row in follow_rows(tmp_path / "collect", future_state(crawl)):
                early.append(not crawl.done())
                yield row
        followed = extract(ExtractConfig(processes=2), pages(), tmp_path / "followed")
    assert early[0] and len(early) == crawl.result()["rows"]
    after = extract(ExtractConfig(processes=2), crawl.result(), tmp_path / "after")
    assert followed["digest"] == after["digest"] and followed["input_rows"] == after["input_rows"]


def test_rendered_site_is_the_same_on_every_render(tmp_path):
    # pydoc writes memory addresses into some pages; left in, doc ids would change between renders
    pages = []
    for name in ("one", "two"):
        pydoc_site.render_site(tmp_path / name, ["difflib", "ctypes", "sched"])
        pages.append({p.name: p.read_text() for p in (tmp_path / name).glob("*.html")})
    assert len(pages[0]) == 4 and pages[0] == pages[1]
    assert not any(re.search(r"0x[0-9a-f]{6,}", text) for text in pages[0].values())
