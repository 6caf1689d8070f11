"""The documentation site builds strictly, and its generated reference covers the code.

`mkdocs build --strict` fails on a broken link or anchor, a page missing from the nav, or a config
field without a description (docs/hooks.py raises); the built pages must then list every key of
PipelineConfig and every ssl-pipeline subcommand, so neither reference can fall behind the code.
"""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel, Field

from docs import hooks
from flows.cli import build_parser
from tasks.config import PipelineConfig

ROOT = Path(__file__).resolve().parent.parent


def config_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Dotted names of every leaf key (``collect.tables[].path`` for the items of a list of sections)."""
    keys = set()
    for name, field in model.model_fields.items():
        sub = hooks.model_of(field.annotation)
        if sub is None:
            keys.add(prefix + name)
        else:
            many = "[]" if typing.get_origin(field.annotation) is list else ""
            keys |= config_keys(sub, f"{prefix}{name}{many}.")
    return keys


def page_text(site: Path, page: str) -> str:
    return html.unescape((site / page / "index.html").read_text())


def missing_keys(text: str, keys: set[str]) -> list[str]:
    return sorted(k for k in keys if f"<code>{k}</code>" not in text)


def missing_commands(text: str, names: list[str]) -> list[str]:
    return [n for n in names if not re.search(rf'<h2 id="{re.escape(n)}"', text)
            or f"ssl-pipeline {n} " not in text]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "WARNING" not in r.stderr, r.stderr[-4000:]
    return out


def test_config_reference_lists_every_key(site):
    keys = config_keys(PipelineConfig)
    assert len(keys) > 150 and "collect.tables[].text_column" in keys and "filter.gopher_quality.min_stop_words" in keys
    assert not missing_keys(page_text(site, "reference/config"), keys)


def test_cli_reference_lists_every_subcommand(site):
    names = [name for name, _, _ in hooks.subcommands(build_parser())]
    assert {"run", "config", "retry", "lineage", "why"} <= set(names)
    text = page_text(site, "reference/cli")
    assert not missing_commands(text, names)
    assert str(ROOT) not in text   # help texts name paths in the repository, not on the build machine


def test_reason_codes_and_benchmarks_are_generated(site):
    from tasks.reasons import REASONS
    text = page_text(site, "reference/reason-codes")
    assert not [c for c in REASONS if f"<code>{c}</code>" not in text]
    bench = page_text(site, "benchmarks")
    for result in (ROOT / "bench" / "results").glob("*.json"):
        assert f"bench/results/{result.name}" in bench


def test_the_checks_can_fail(site):
    text = page_text(site, "reference/config")
    assert missing_keys(text.replace("<code>dedup.threshold</code>", ""), config_keys(PipelineConfig)) \
        == ["dedup.threshold"]
    cli = page_text(site, "reference/cli")
    assert missing_commands(cli, ["run", "export-everything"]) == ["export-everything"]

    class Section(BaseModel):
        described: int = Field(1, description="A key.")
        bare: int = 2

    class Config(BaseModel):
        part: Section = Field(default_factory=Section, description="A section.")

    with pytest.raises(ValueError, match=r"part\.bare"):
        hooks.model_tables(Config, "", 2)
