"""The evaluate stage with the real lm-evaluation-harness, on CPU, over models trained here on the
test site's pages: the held-out suite, bits per byte against our own computation, chance for an
untrained model, the probe of an encoder, a named task without its data, and lm_eval by hand."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer

from ssl_model.checkpoint import load_model
from ssl_model.config import EOT, preset
from ssl_model.export import export_checkpoint
from ssl_model.trainer import TrainSettings, train
from tasks import compare
from tasks import evaluate as ev
from tasks.config import DecontaminateConfig, EvaluateConfig, TokenizeConfig
from tasks.decontaminate import decontaminate
from tasks.shards import iter_rows
from tasks.tokenize import tokenize
from tests.conftest import BIN, cli_env

SMALL = dict(batch_size=8, lr=3e-3, warmup_steps=10, eval_batches=4, threads=2, sample_tokens=0)


@pytest.fixture(scope="module")
def heldout(stages, tmp_path_factory):
    """The test site's documents, 30 % held out (a suite of several documents). No n-gram check:
    pydoc's boilerplate would take half of the rest out of training (tests/test_decontaminate.py)."""
    return decontaminate(DecontaminateConfig(heldout_fraction=0.3, enabled=False), stages["dedup"],
                         tmp_path_factory.mktemp("eval") / "decontaminate")


@pytest.fixture(scope="module")
def shards(heldout, tmp_path_factory):
    return tokenize(TokenizeConfig(vocab_size=1024, val_fraction=0.1), heldout,
                    tmp_path_factory.mktemp("tok") / "tokenize")


def trained(shards: dict, out: Path, objective: str, steps: int, **settings) -> dict:
    """A test-size model trained on ``shards``: the part of the train stage's manifest evaluate reads."""
    cfg = preset("test", shards["vocab_size"], arch=settings.pop("arch", "gpt2"))
    s = TrainSettings(**{**SMALL, "objective": objective, "max_steps": steps, "eval_interval": steps, **settings})
    result = train(cfg, s, shards["dir"], out / "checkpoints", lambda *e: None)
    if objective == "causal":
        export_checkpoint(result["checkpoint"], out / "hf", Path(shards["dir"]) / "tokenizer.json")
    return {"dir": str(out), "checkpoint": result["checkpoint"], "objective": objective,
            "tokenizer": str(Path(shards["dir"]) / "tokenizer.json"), "model_config": cfg.to_dict(), "model_uri": None}


@pytest.fixture(scope="module")
def causal(shards, tmp_path_factory):
    return trained(shards, tmp_path_factory.mktemp("causal"), "causal", 300)


@pytest.fixture(scope="module")
def report(heldout, causal, tmp_path_factory):
    # the model's own export as a baseline too: a baseline is scored exactly as the model is
    return ev.evaluate_stage(EvaluateConfig(baselines=[f"{causal['dir']}/hf"]), causal, heldout,
                             tmp_path_factory.mktemp("evaluate") / "evaluate")


def test_the_suite_is_made_of_documents_the_tokenizer_and_the_model_never_saw(stages, heldout, shards, report):
    decon, heldout = heldout, {r["doc_id"] for r in ev.read_heldout(heldout)}
    trained_on = set()
    for split in ("train", "val"):
        trained_on |= set(pq.read_table(Path(shards["dir"]) / f"{split}.idx.parquet")["doc_id"].to_pylist())
    everything = {r["doc_id"] for r in iter_rows(stages["dedup"], columns=["doc_id"])}
    assert len(heldout) >= 5 and not heldout & trained_on and heldout | trained_on == everything
    assert decon["heldout_docs"] == len(heldout)

    suite = Path(report["suite"]["dir"])
    texts = {r["doc_id"]: r["text"] for r in ev.read_heldout(decon)}
    for task in ev.SUITE:
        rows = [json.loads(line) for line in (suite / f"{task}.jsonl").open()]
        assert rows and {r["doc_id"] for r in rows} <= heldout, task
        assert report["suite"]["items"][task] == len(rows)
    # the documents' own text, whitespace as it was; every ending after the same whitespace
    for r in map(json.loads, (suite / "ssl_continuation.jsonl").open()):
        assert len(set(r["endings"])) == 4 and r["context"] + r["endings"][r["label"]] in texts[r["doc_id"]]
        assert len({e[:len(e) - len(e.lstrip())] for e in r["endings"]}) == 1
        assert max(map(len, r["endings"])) - min(map(len, r["endings"])) <= 2 * max(2, len(r["endings"][0]) // 10)
    for r in map(json.loads, (suite / "ssl_cloze.jsonl").open()):
        assert r["context"] + r["continuation"] in texts[r["doc_id"]] and r["target"].isalpha()
        assert r["continuation"].strip() == r["target"] and r["continuation"][0].isspace()
    assert report["suite"]["digest"] == ev.suite_digest(suite)
    # the same documents make the same suite
    again = ev.build_suite(ev.read_heldout(decon), suite.parent / "again", 200)
    assert again["digest"] == report["suite"]["digest"]


def own_bits_per_byte(checkpoint: str, tokenizer_json: Path, texts: list[str]) -> float:
    """Bits per byte computed with our own model, not the export or the harness: every document
    after an end-of-text token, cut into windows of block_size predicted tokens, the last window
    filled up with the tokens before it (as lm-eval's rolling windows do)."""
    model, tok = load_model(checkpoint), Tokenizer.from_file(str(tokenizer_json))
    T, eot = model.cfg.block_size, tok.token_to_id(EOT)
    nll, nbytes = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = [eot] + tok.encode(text).ids
            n = len(ids) - 1   # tokens predicted
            for start in range(0, n, T):
                end = min(start + T, n)                 # predict ids[start+1 : end+1]
                lo = max(0, end - T)                    # with up to T tokens of input
                x = torch.tensor([ids[lo:end]])
                logp = torch.log_softmax(model(x)[0][0].double(), -1)
                targets = torch.tensor(ids[lo + 1:end + 1])
                nll -= logp[torch.arange(len(targets)), targets][start - lo:].sum().item()
            nbytes += len(text.encode())
    return nll / nbytes / math.log(2)


def test_bits_per_byte_agrees_with_our_own_computation(shards, causal, report):
    texts = [json.loads(line)["text"] for line in (Path(report["suite"]["dir"]) / "ssl_heldout_bpb.jsonl").open()]
    ours = own_bits_per_byte(causal["checkpoint"], Path(shards["dir"]) / "tokenizer.json", texts)
    harness = report["models"]["model"]["scores"]["ssl_heldout_bpb"]["bits_per_byte"]
    assert abs(harness["value"] - ours) < 1e-3, (harness, ours)
    assert 0 < harness["stderr"] < harness["value"] / 5


def test_an_untrained_model_scores_chance_and_the_trained_one_beats_it(report):
    model, untrained = (report["models"][k]["scores"] for k in ("model", "untrained"))
    acc = untrained["ssl_continuation"]["acc"]
    assert acc["chance"] == 0.25 and acc["n"] >= 100
    assert abs(acc["value"] - 0.25) <= 2 * acc["stderr"], acc
    assert "chance" in ev.verdict(acc)
    bpb, bpb0 = model["ssl_heldout_bpb"]["bits_per_byte"], untrained["ssl_heldout_bpb"]["bits_per_byte"]
    # untrained: about log2(vocab) bits per token
    assert bpb0["value"] > 2 and bpb["value"] < bpb0["value"] - 0.5
    assert bpb0["value"] - bpb["value"] > 4 * math.hypot(bpb["stderr"], bpb0["stderr"])   # unpaired: conservative
    # every metric with its standard error
    for scores in (model, untrained):
        for task, metrics in scores.items():
            for metric, m in metrics.items():   # (an accuracy of exactly 0 or 1 has a standard error of 0)
                assert math.isfinite(m["stderr"]) and (m["stderr"] > 0 or m["value"] in (0, 1)), (task, metric, m)
    rows = ev.table(report)
    assert {(r["task"], r["metric"]) for r in rows} >= {("ssl_heldout_bpb", "bits_per_byte"),
                                                         ("ssl_continuation", "acc"), ("ssl_cloze", "acc")}
    assert "±" in ev.table_text(report) and "untrained" in ev.headline_text(report)


def test_the_suite_files_are_ordinary_lm_eval_tasks(causal, report, tmp_path):
    """lm_eval run by hand, on the export and the suite folder, gives the stage's numbers."""
    suite = Path(report["suite"]["dir"])
    proc = subprocess.run([str(BIN / "lm_eval"), "--model", "hf", "--model_args",
                           f"pretrained={causal['dir']}/hf,dtype=float32", "--device", "cpu", "--batch_size", "32",
                           "--include_path", str(suite), "--tasks", "ssl_cloze,ssl_heldout_bpb",
                           "--output_path", str(tmp_path / "out")],
                          env=cli_env({}, tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    ours = report["models"]["model"]["scores"]
    assert results["ssl_cloze"]["acc,none"] == pytest.approx(ours["ssl_cloze"]["acc"]["value"], abs=1e-9)
    assert results["ssl_heldout_bpb"]["bits_per_byte,none"] == pytest.approx(
        ours["ssl_heldout_bpb"]["bits_per_byte"]["value"], rel=1e-6)


def test_baselines_and_any_hugging_face_folder_are_scored_alike(causal, report, tmp_path):
    model = report["models"]["model"]["scores"]
    assert report["models"]["baseline1"]["scores"] == model and report["models"]["baseline1"]["spec"].endswith("/hf")
    assert "sample_len" not in model["ssl_cloze"]   # lm-eval's item count is not a score
    moved = shutil.copytree(report["suite"]["dir"], tmp_path / "moved-suite")   # as a downloaded artifact
    proc = subprocess.run([str(BIN / "ssl-pipeline"), "evaluate", f"{causal['dir']}/hf", "--suite",
                           str(moved), "--json"], cwd=tmp_path, env=cli_env({}, tmp_path),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scored = json.loads(proc.stdout)
    assert scored["suite"]["digest"] == report["suite"]["digest"] and scored["mlflow_run_id"]
    assert str(moved) in (moved / "ssl_cloze.yaml").read_text()   # its task files now name where it is
    assert scored["models"]["model"]["scores"]["ssl_continuation"] == model["ssl_continuation"]
    assert scored["models"]["model"]["scores"]["ssl_heldout_bpb"]["bits_per_byte"]["value"] == \
        pytest.approx(model["ssl_heldout_bpb"]["bits_per_byte"]["value"], rel=1e-9)


def test_named_tasks_alone_give_the_digest_of_their_items(heldout, causal, report, tmp_path):
    """Without the suite, what a model was scored on is named by its tasks' items (lm-eval's
    doc hashes): an ablation compares variants only when it is the same."""
    tasks = dict(suite=False, tasks=["ssl_cloze"], include_path=[report["suite"]["dir"]], untrained=False)
    alone = ev.evaluate_stage(EvaluateConfig(**tasks), causal, heldout, tmp_path / "all")
    fewer = ev.evaluate_stage(EvaluateConfig(**tasks, limit=5), causal, heldout, tmp_path / "five")
    assert alone["suite"] is None and ev.eval_digest(alone) == alone["tasks_digest"]
    assert alone["tasks_digest"] == ev.tasks_digest(tmp_path / "all" / "samples" / "model")
    assert fewer["tasks_digest"] != alone["tasks_digest"]
    scored, with_suite = (r["models"]["model"]["scores"]["ssl_cloze"] for r in (alone, report))
    assert scored["acc"] == with_suite["acc"]


def test_a_named_task_whose_dataset_is_absent_stops_with_one_line(causal, tmp_path):
    """No network (its own namespace) and an empty Hugging Face cache: hellaswag cannot load."""
    env = cli_env({"HF_HOME": str(tmp_path / "hf")}, tmp_path)
    proc = subprocess.run(["unshare", "-n", str(BIN / "ssl-pipeline"), "evaluate", f"{causal['dir']}/hf",
                           "--tasks", "hellaswag", "--no-suite"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("ssl-pipeline evaluate:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "'hellaswag'" in lines[0] and "Rowan/hellaswag" in lines[0] and str(tmp_path / "hf") in lines[0]


def test_the_probe_of_an_mlm_encoder_beats_the_majority_class(heldout, shards, tmp_path):
    # the encoder of tests/test_probe.py (llama, Muon): a gpt2 one trained as briefly stays near
    # unigram prediction, and its frozen features do not yet beat an untrained model's
    mlm = trained(shards, tmp_path / "mlm", "mlm", 150, arch="llama", optimizer="muon", schedule="wsd")
    report = ev.evaluate_stage(EvaluateConfig(), mlm, heldout, tmp_path / "evaluate")
    assert report["suite"] is None   # an encoder has no next-token likelihood to score
    probe, untrained = (report["models"][k]["scores"]["probe"] for k in ("model", "untrained"))
    acc, majority = probe["probe_accuracy"], probe["majority_accuracy"]
    assert acc["value"] - majority["value"] > 2 * acc["stderr"], probe
    assert probe["tfidf_accuracy"]["n"] == acc["n"] > 0 and untrained["probe_accuracy"]["n"] == acc["n"]
    # what the probe was tested on, passage by passage, for an ablation to pair (tasks/compare.py)
    items = compare.item_values(tmp_path / "evaluate")["probe.acc"]
    assert items.shape == (acc["n"], 2) and items[:, 0].mean() == pytest.approx(acc["value"])
    assert len(report["probe_digest"]) == 64 and report["probe_digest"] == ev.probe_digest(ev.read_heldout(heldout), 0)
