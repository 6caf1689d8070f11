"""A stage's config section means what the user wrote (issue 19: `train.preset` did nothing).

Each case goes the pipeline's own way: a YAML file, read by ``load_config`` as the CLI reads it,
the sections as the flow hands them to its stage tasks (``flows.pipeline.stage_sections``, then
JSON, as Prefect persists them and passes them to a deployment), and the stage's own rebuilding
of its config (``TrainConfig.model_validate`` and the model shape and trainer settings in
``tasks.train.plan``; ``XConfig.model_validate`` and what the stage derives from it elsewhere).
Every key whose meaning is derived or conditional has a case: presets, nulls that mean
"default" or "derive", settings of one objective.
"""

from __future__ import annotations

import inspect
import json

import pytest
import yaml
from pydantic import model_validator

from flows.cli import main
from flows.pipeline import STAGES, stage_sections
from ssl_model.config import PRESETS
from tasks import pydoc_site
from tasks.collect import pydoc_modules
from tasks.config import (
    PRESET_KEYS,
    CollectConfig,
    ConfigError,
    DedupConfig,
    ExtractConfig,
    FilterConfig,
    PipelineConfig,
    Section,
    TableSource,
    TokenizeConfig,
    load_config,
)
from tasks.dedup import lsh_params
from tasks.train import plan

VOCAB = 1024   # the tokenize stage's vocabulary, as its manifest gives it to train


def handed(tmp_path, text: str, overrides: list[str] | None = None) -> dict[str, dict]:
    """Config file -> the sections each stage task receives (JSON, as Prefect carries them)."""
    path = tmp_path / "config.yaml"
    path.write_text(text)
    sections = stage_sections(load_config(path, overrides))
    return json.loads(json.dumps(sections))


def shape(model) -> dict:
    return {k: getattr(model, k) for k in ("n_layer", "n_head", "n_embd", "block_size")}


# ---- train --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PRESETS))
def test_train_preset_is_the_shape_the_stage_builds(tmp_path, name):
    _, model, _ = plan(handed(tmp_path, f"train:\n  preset: {name}\n")["train"], VOCAB)
    assert shape(model) == PRESETS[name]


def test_train_preset_set_on_the_command_line_as_in_the_issue(tmp_path):
    sections = handed(tmp_path, "train:\n  max_steps: 3\n", ["train.preset=gpt2-124m"])
    cfg, model, settings = plan(sections["train"], VOCAB)
    assert shape(model) == {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024}
    assert cfg.preset == "gpt2-124m" and settings.max_steps == 3


def test_train_shape_keys_set_beside_a_preset_win_even_at_their_default(tmp_path):
    # n_layer: 4 is also the field's default: written, it still beats the preset's 12
    text = "train:\n  preset: gpt2-124m\n  n_layer: 4\n  block_size: 128\n"
    _, model, _ = plan(handed(tmp_path, text)["train"], VOCAB)
    assert shape(model) == {"n_layer": 4, "n_head": 12, "n_embd": 768, "block_size": 128}


def test_train_null_mlp_width_is_derived_from_the_presets_width(tmp_path):
    _, model, _ = plan(handed(tmp_path, "train:\n  preset: small\n  mlp_hidden: null\n")["train"], VOCAB)
    assert model.mlp_hidden is None and model.hidden == 4 * 384
    _, model, _ = plan(handed(tmp_path, "train:\n  preset: small\n  arch: llama\n")["train"], VOCAB)
    assert model.hidden == 1024   # 8/3 x 384 rounded up to 64
    _, model, _ = plan(handed(tmp_path, "train:\n  mlp_hidden: 96\n")["train"], VOCAB)
    assert model.hidden == 96


def test_train_null_kv_heads_means_one_per_head(tmp_path):
    text = "train:\n  preset: tiny\n  arch: llama\n  n_kv_head: null\n"
    _, model, _ = plan(handed(tmp_path, text)["train"], VOCAB)
    assert model.n_kv_head is None and model.kv_heads == PRESETS["tiny"]["n_head"]
    _, model, _ = plan(handed(tmp_path, "train:\n  preset: tiny\n  arch: llama\n  n_kv_head: 2\n")["train"], VOCAB)
    assert model.kv_heads == 2


@pytest.mark.parametrize("text, expect", [
    ("objective: mlm\n  mask_prob: 0.3", {"objective": "mlm", "mask_prob": 0.3, "temperature": 0.05}),
    ("objective: contrastive\n  temperature: 0.1\n  dropout: 0.1",
     {"objective": "contrastive", "temperature": 0.1, "mask_prob": 0.15}),
    ("objective: causal\n  sample_tokens: 0", {"objective": "causal", "sample_tokens": 0}),
    ("threads: null\n  init_from: null", {"threads": None, "init_from": None}),
    ("threads: 2", {"threads": 2}),
], ids=["mlm", "contrastive", "causal", "nulls", "threads"])
def test_train_objective_settings_reach_the_trainer(tmp_path, text, expect):
    cfg, model, settings = plan(handed(tmp_path, f"train:\n  preset: test\n  {text}\n")["train"], VOCAB)
    assert {k: getattr(settings, k) for k in expect} == expect
    assert model.dropout == cfg.dropout and shape(model) == PRESETS["test"]


def test_ssl_pipeline_config_shows_the_shape_that_is_trained(tmp_path, capsys):
    assert main(["config", "--set", "train.preset=gpt2-124m", "--set", "train.n_head=8"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)["train"]
    assert {k: shown[k] for k in PRESET_KEYS} == {"n_layer": 12, "n_head": 8, "n_embd": 768, "block_size": 1024}
    path = tmp_path / "shown.yaml"   # the printed config, run as it is, trains that shape
    path.write_text(yaml.safe_dump({"train": shown}))
    _, model, _ = plan(stage_sections(load_config(path))["train"], VOCAB)
    assert shape(model) == {"n_layer": 12, "n_head": 8, "n_embd": 768, "block_size": 1024}


def test_assigning_a_preset_later_reshapes_what_was_not_set():
    cfg = load_config(None, ["train.n_embd=512"])
    cfg.train.preset = "small"
    assert (cfg.train.n_layer, cfg.train.n_embd, cfg.train.block_size) == (6, 512, 512)
    cfg.train.preset = None
    assert (cfg.train.n_layer, cfg.train.n_embd, cfg.train.block_size) == (4, 512, 256)


# ---- the data stages ----------------------------------------------------------------------------

def test_dedup_null_bands_and_rows_are_derived_from_the_threshold(tmp_path):
    text = "dedup:\n  threshold: 0.5\n  bands: null\n  rows: null\n"
    cfg = DedupConfig.model_validate(handed(tmp_path, text)["dedup"])
    bands, rows = lsh_params(cfg)
    assert (bands, rows) != (14, 8) and bands * rows <= 112
    assert cfg.catch_probability(0.5, bands, rows) >= 0.9 > cfg.catch_probability(0.5, 112 // (rows + 1), rows + 1)
    assert lsh_params(DedupConfig.model_validate(handed(tmp_path, "dedup: {}\n")["dedup"])) == (14, 8)
    text = "dedup:\n  bands: 16\n  rows: 7\n"
    assert lsh_params(DedupConfig.model_validate(handed(tmp_path, text)["dedup"])) == (16, 7)


def test_collect_null_pydoc_modules_is_the_curated_list(tmp_path):
    cfg = CollectConfig.model_validate(handed(tmp_path, "collect:\n  pydoc_modules: null\n")["collect"])
    assert pydoc_modules(cfg) == pydoc_site.DEFAULT_MODULES and not cfg.has_sources()
    cfg = CollectConfig.model_validate(handed(tmp_path, "collect:\n  pydoc_modules: [json, csv]\n")["collect"])
    assert pydoc_modules(cfg) == ("json", "csv")
    text = "collect:\n  tables: [{path: t.parquet, url_column: null}]\n"
    cfg = CollectConfig.model_validate(handed(tmp_path, text)["collect"])
    assert cfg.has_sources() and cfg.tables[0].url_column is None and cfg.tables[0].text_column == "text"


def test_filter_settings_keep_their_meaning(tmp_path):
    text = ("filter:\n  processes: null\n  c4: {enabled: false}\n"
            "  gopher_repetition: {top_n_grams: {2: 0.5}}\n  gopher_quality: {min_avg_word_length: 2}\n")
    cfg = FilterConfig.model_validate(handed(tmp_path, text)["filter"])
    assert cfg.processes is None and not cfg.c4.enabled and cfg.fineweb.enabled
    assert cfg.gopher_repetition.top_n_grams == {2: 0.5}   # int n, as the filter looks it up
    assert cfg.gopher_quality.min_avg_word_length == 2.0


def test_extract_and_tokenize_settings_keep_their_meaning(tmp_path):
    sections = handed(tmp_path, "extract:\n  processes: null\n  favor_precision: true\ntokenize:\n  vocab_size: 300\n")
    extract = ExtractConfig.model_validate(sections["extract"])
    assert extract.processes is None and extract.favor_precision
    assert TokenizeConfig.model_validate(sections["tokenize"]).vocab_size == 300
    assert ExtractConfig.model_validate(handed(tmp_path, "extract:\n  processes: 2\n")["extract"]).processes == 2


# ---- the property behind it: dump -> validate gives the same section ----------------------------

def all_sections(cls=Section) -> list[type[Section]]:
    subs = cls.__subclasses__()
    return subs + [s for sub in subs for s in all_sections(sub)]


def meanings(section: Section) -> dict:
    """What the section's own methods derive from it (those callable without arguments)."""
    out = {}
    for name, fn in vars(type(section)).items():
        if inspect.isfunction(fn) and not name.startswith("_") and name != "handoff":
            params = list(inspect.signature(fn).parameters.values())[1:]
            if all(p.default is not p.empty for p in params):
                out[name] = fn(section)
    return out


CONFIGS = [
    "{}",
    "train: {preset: gpt2-124m}",
    "train: {preset: small, n_layer: 2, arch: llama, n_kv_head: 2}",
    "train: {preset: test, objective: contrastive, dropout: 0.1}",
    "dedup: {threshold: 0.5, bands: null, rows: null}",
    "collect: {pydoc_modules: [json], tables: [{path: t.parquet, url_column: null}]}",
    "filter: {gopher_repetition: {top_n_grams: {2: 0.3}}, gopher_quality: {min_avg_word_length: 2}}",
    "runner: {task_runner: dask, dask_workers: 2}\ncache: {storage: s3://b/p}",
]


@pytest.mark.parametrize("text", CONFIGS)
def test_every_section_validates_back_from_its_dump(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text + "\n")
    cfg = load_config(path)
    checked = set()

    def walk(section: Section) -> None:
        checked.add(type(section))
        dump = section.model_dump(mode="json")
        again = type(section).model_validate(dump)
        assert again == section, type(section).__name__
        assert again.model_dump(mode="json") == dump   # so a deployment's cache key is the flow's
        assert section.handoff() == dump
        assert meanings(again) == meanings(section), type(section).__name__   # model_shape, lsh, has_sources
        for name in type(section).model_fields:
            value = getattr(section, name)
            for sub in value if isinstance(value, list) else [value]:
                if isinstance(sub, Section):
                    walk(sub)

    walk(cfg)
    if text == "{}":   # every section class of the configuration (a table source only where listed)
        assert checked == {c for c in all_sections() if c.__module__ == "tasks.config"} - {TableSource}


def test_the_same_meaning_hands_stages_the_same_sections(tmp_path):
    """Every default written out, or a preset spelled out key by key beside it: the stages get the
    same sections, so their cache keys agree."""
    path = tmp_path / "defaults.yaml"
    path.write_text(yaml.safe_dump(PipelineConfig().model_dump(mode="json")))
    assert stage_sections(load_config(path)) == stage_sections(load_config())
    assert json.dumps(stage_sections(load_config(path)), sort_keys=True) == \
        json.dumps(stage_sections(load_config()), sort_keys=True)
    preset = load_config(None, ["train.preset=small"])
    spelled = load_config(None, ["train.preset=small", *(f"train.{k}={v}" for k, v in PRESETS["small"].items())])
    assert stage_sections(preset) == stage_sections(spelled)
    assert [s for s, _ in STAGES] == list(stage_sections(preset))


def test_a_section_that_would_not_validate_back_is_refused_naming_the_key():
    class Drifting(Section):   # a derived value computed again on every validation: not idempotent
        steps: int = 1

        @model_validator(mode="after")
        def _grow(self):
            self.__dict__["steps"] = self.steps + 1
            return self

    with pytest.raises(ConfigError, match="Drifting: steps would not mean the same"):
        Drifting().handoff()
