"""The ablation's comparison (tasks/compare.py) and its file (flows/ablate.py), without training."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from flows.ablate import load_ablation, mean_curve, set_aside, train_steps, variant_overrides
from tasks import compare
from tasks.config import ConfigError
from tests.conftest import ROOT


def items(values, units=None) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return np.stack([values, np.ones_like(values) if units is None else np.asarray(units, np.float64)], axis=1)


def test_paired_bootstrap_sees_a_paired_difference_an_unpaired_one_would_miss():
    rng = np.random.default_rng(1)
    hard = rng.uniform(0.5, 3.0, 300)                       # items differ far more than the variants do
    a = {"t.bits_per_byte": items(hard * 100, np.full(300, 100.0))}
    b = {"t.bits_per_byte": items((hard - 0.05) * 100, np.full(300, 100.0))}
    r = compare.compare({"a": [a], "b": [b]}, iters=1000)
    m = r["metrics"]["t.bits_per_byte"]
    (pair,) = m["pairs"]
    assert pair["a"] == "b" and pair["diff"] == pytest.approx(-0.05)
    assert pair["high"] < 0 and pair["verdict"] == "better"           # lower bits per byte is better
    # each variant's own standard error is far wider than the difference: only pairing sees it
    assert m["variants"]["a"]["stderr"] > 0.02
    line = compare.verdict_lines(r)[0]
    assert line.startswith("b vs a: t bits/byte -0.0500 [") and line.endswith("better")


def test_no_difference_is_said_when_the_interval_holds_zero():
    rng = np.random.default_rng(2)
    a = {"t.acc": items(rng.integers(0, 2, 80))}
    b = {"t.acc": items(rng.integers(0, 2, 80))}
    r = compare.compare({"a": [a], "b": [b]}, iters=1000)
    (pair,) = r["metrics"]["t.acc"]["pairs"]
    assert pair["low"] < 0 < pair["high"], pair
    assert pair["verdict"] == "no difference this run can detect"
    assert compare.pair_verdict(0.01, 0.2, "higher") == "better" and compare.pair_verdict(0.01, 0.2, "lower") == "worse"


def test_seeds_widen_the_error_and_items_must_match():
    base = np.linspace(0, 1, 100) > 0.4
    same = {"t.acc": items(base)}
    r1 = compare.compare({"a": [same], "b": [same]}, iters=500)
    noisy = [{"t.acc": items(np.roll(base, k))} for k in (0, 7, 31)]
    flipped = [{"t.acc": items(~base if k else base)} for k in (0, 1)]
    r2 = compare.compare({"a": noisy, "b": flipped}, iters=500)
    assert r1["metrics"]["t.acc"]["pairs"][0]["diff"] == 0
    assert r2["metrics"]["t.acc"]["variants"]["b"]["seeds"] == 2
    assert r2["metrics"]["t.acc"]["variants"]["b"]["stderr"] > r1["metrics"]["t.acc"]["variants"]["b"]["stderr"]
    with pytest.raises(ValueError, match="different items"):
        compare.compare({"a": [{"t.acc": items(base)}], "b": [{"t.acc": items(base[:50])}]})


def write(tmp_path, doc) -> str:
    p = tmp_path / "ablation.yaml"
    p.write_text(yaml.safe_dump(doc))
    return str(p)


def test_ablation_file_is_checked_and_every_variant_resolved(tmp_path):
    demo = str(ROOT / "flows/profiles/ablate-demo.yaml")
    ab, base, cfgs = load_ablation(demo)
    assert list(cfgs) == ["raw", "filtered", "curated"] and base.endswith("demo.yaml")
    assert not cfgs["raw"].filter.enabled and not cfgs["raw"].dedup.exact and cfgs["curated"].dedup.near
    assert cfgs["curated"].filter.gopher_quality.min_alpha_words_ratio == 0.5     # the base's value
    assert not cfgs["filtered"].evaluate.untrained                                # set: applies to all
    assert "filter.enabled=false" in variant_overrides(ab, "raw")
    assert train_steps(cfgs["raw"], ab.ablate.tokens) == 293                      # 600000 / (16 x 128), up
    refused = [({"variants": {"a": {}}}, "at least two variants"),
               ({"variants": {"a": {}, "b": {"train.n_layer": 8}}}, "variant b sets train.n_layer"),
               ({"variants": {"a": {}, "b": {"evaluate.max_items": 20}}}, "variant b sets evaluate.max_items"),
               ({"variants": {"a": {}, "b": {}}, "ablate": {"tokenizer": "c"}}, "ablate.tokenizer 'c' is not a variant"),
               ({"variants": {"a": {}, "b": {"filter.nope": 1}}}, "variant b: invalid configuration"),
               ({"variants": {"a": {}, "b": {}}, "ablate": {"seeds": []}}, "ablate.seeds"),
               ({"variants": {"a": {}, "b": {}}, "set": {"evaluate.enabled": False}}, "compares the variants by their evaluate")]
    for doc, message in refused:
        with pytest.raises(ConfigError, match=message):
            load_ablation(write(tmp_path, doc))


def test_set_aside_takes_whole_hosts_and_leaves_some(stages, tmp_path):
    extracted = stages["extract"]
    by_doc = set_aside(extracted, 0.2, "doc", tmp_path / "docs")
    assert 0 < by_doc["rows"] < extracted["rows"]
    again = set_aside(extracted, 0.2, "doc", tmp_path / "again")
    assert again["digest"] == by_doc["digest"]                    # the same pages every time
    with pytest.raises(ValueError, match="at least two are needed"):
        set_aside(extracted, 0.2, "host", tmp_path / "hosts")      # the test site is one host


def test_variants_scored_on_different_suites_are_not_compared():
    from flows.ablate import AblationConfig, comparison
    ab = AblationConfig.model_validate({"variants": {"a": {}, "b": {}}})
    results = {(n, 1337): {"stages": {"evaluate": {"suite_digest": digest, "dir": "/nonexistent"}}}
               for n, digest in (("a", "1" * 64), ("b", "2" * 64))}
    with pytest.raises(ValueError, match="different evaluation suites.*a-seed1337 111111111111.*b-seed1337 2222"):
        comparison(ab, results, steps=10)


def test_seeds_curves_are_averaged_where_every_seed_has_a_point():
    assert mean_curve([[(0, 4.0), (10, 3.0)], [(0, 5.0), (10, 2.0), (20, 1.0)]]) == [(0, 4.5), (10, 2.5)]
    assert mean_curve([[(0, 4.0)]]) == [(0, 4.0)] and mean_curve([]) == []
