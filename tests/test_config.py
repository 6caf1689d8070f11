"""Configuration: bad keys and types are refused before any work, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.cli import main
from tasks.config import ConfigError, PipelineConfig, flatten, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_fineweb_values_and_every_field_is_described():
    cfg = load_config()
    assert cfg.filter.gopher_quality.min_doc_words == 50
    assert cfg.filter.gopher_repetition.dup_n_grams[5] == 0.15
    assert (cfg.dedup.num_perm, cfg.dedup.bands, cfg.dedup.rows) == (112, 14, 8)

    def walk(model):
        for name, field in type(model).model_fields.items():
            assert field.description, f"{type(model).__name__}.{name} has no description"
            value = getattr(model, name)
            if hasattr(type(value), "model_fields"):
                walk(value)
    walk(cfg)


def test_demo_profile_loads_and_loosens_only_what_it_says():
    text = (ROOT / "flows/profiles/demo.yaml").read_text()
    demo, default = flatten(load_config(ROOT / "flows/profiles/demo.yaml")), flatten(PipelineConfig())
    changed = {k for k in default if demo[k] != default[k]}
    assert "filter.gopher_repetition.dup_n_grams.5" in changed and "filter.gopher_quality.min_doc_words" not in changed
    for key in changed:   # each change is commented with the default it replaces (on it or its parent)
        names = key.split(".")[-2:]
        lines = [ln for ln in text.splitlines() if ln.strip().startswith(tuple(n + ":" for n in names))]
        assert any("default" in ln for ln in lines), f"{key} differs from the default without saying so"


@pytest.mark.parametrize("text, key", [
    ("train:\n  learning_rate: 0.1\n", "train.learning_rate: unknown key"),
    ("train:\n  max_steps: many\n", "train.max_steps"),
    ("colect: {}\n", "colect: unknown key"),
    ("dedup:\n  bands: 10\n", "dedup"),
    ("collect:\n  start_urls: [example.org]\n", "collect.start_urls: Value error, 'example.org' is not an http(s) URL"),
    ("evaluate:\n  suite: false\n", "evaluate: Value error, evaluate has nothing to score"),
    ("tokenize:\n  heldout_fraction: 0.1\n", "tokenize.heldout_fraction: unknown key"),   # decontaminate's now
    ("decontaminate:\n  ngram: 3\n", "decontaminate.ngram"),
    ("evaluate:\n  sources: ['http://']\n", "'http://' is not an http(s) URL with a host"),
])
def test_bad_config_names_the_key(tmp_path, text, key):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert key in str(e.value)


def test_overrides_parse_yaml_values_and_are_validated():
    cfg = load_config(None, ["train.max_steps=7", "collect.start_urls=[http://127.0.0.1:1/]"])
    assert cfg.train.max_steps == 7 and cfg.collect.start_urls == ["http://127.0.0.1:1/"]
    with pytest.raises(ConfigError, match="train.nope: unknown key"):
        load_config(None, ["train.nope=1"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["train.max_steps"])


def test_cli_refuses_bad_config_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--set", "train.lr=fast"]) == 2
    err = capsys.readouterr().err
    assert "train.lr" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_flatten_gives_one_param_per_leaf():
    params = flatten(load_config())
    assert params["train.max_steps"] == "1000"
    assert params["filter.gopher_quality.min_doc_words"] == "50"


def test_decontaminate_checks_against_the_evaluate_tasks_unless_told_otherwise():
    cfg = load_config(None, ["evaluate.tasks=[arc_easy]", "evaluate.include_path=[/tmp/my-tasks]"])
    assert cfg.decontaminate.tasks == ["arc_easy"] and cfg.decontaminate.include_path == ["/tmp/my-tasks"]
    assert cfg.decontaminate.handoff()["tasks"] == ["arc_easy"]   # the stage's section (its cache key) says so
    assert load_config(None, ["evaluate.tasks=[arc_easy]", "decontaminate.tasks=[]"]).decontaminate.tasks == []


def test_evaluation_sources_are_read_as_collect_reads_them():
    from tasks.config import CollectConfig, EvaluateConfig
    ev = EvaluateConfig(sources=["https://example.org/docs/", "https://example.org/sitemap.xml", "/data/a.warc.gz",
                                 "s3://bucket/eval.parquet", "/data/pages"])
    c = ev.collect_section(CollectConfig(max_pages=7))
    assert (c.start_urls, c.sitemaps, c.warc_files, c.paths) == (["https://example.org/docs/"],
                                                                 ["https://example.org/sitemap.xml"],
                                                                 ["/data/a.warc.gz"], ["/data/pages"])
    assert [t.path for t in c.tables] == ["s3://bucket/eval.parquet"] and c.pydoc_modules == [] and c.max_pages == 7
