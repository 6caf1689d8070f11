"""Shared fixtures: a real pydoc website on 127.0.0.1, and real Prefect and MLflow servers."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from infra.services import free_port, start_all
from infra.services import services as make_services
from tasks import pydoc_site

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# nothing a test runs tries the Hugging Face hub: lm-eval's datasets come from local files or not at all
os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
# A small slice of the standard library's documentation: real prose and real code listings.
TEST_MODULES = ("json csv argparse textwrap heapq bisect fractions statistics difflib shlex string calendar "
                "base64 colorsys fnmatch glob getopt gettext queue sched secrets uuid wave zipfile tarfile "
                "pprint reprlib numbers abc copy email.message http.client urllib.parse logging pathlib "
                "dataclasses enum functools itertools contextlib "
                # enough prose left after the filters for the tokenizer and training tests
                "bz2 codecs datetime gzip hashlib hmac locale lzma operator random selectors shutil "
                "socketserver struct tempfile threading typing weakref zlib collections sqlite3").split()


@pytest.fixture
def refused_url() -> str:
    """A URL on 127.0.0.1 whose connections are refused: its port stays bound, never listening,
    for the whole test (a port that is merely free now may be another process's a moment later)."""
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}/"


@pytest.fixture(scope="session")
def site_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pydoc") / "site"
    pydoc_site.render_site(d, TEST_MODULES)
    return d


@pytest.fixture(scope="session")
def site_url(site_dir) -> str:
    with pydoc_site.serve(site_dir) as url:
        yield url


@pytest.fixture(scope="session")
def servers(tmp_path_factory) -> dict[str, str]:
    """A Prefect server and an MLflow tracking server on 127.0.0.1 (SQLite), as the demo starts them."""
    home = tmp_path_factory.mktemp("services")
    svcs = make_services(home, free_port(), free_port())
    try:
        start_all(svcs)
        yield {k: v for s in svcs for k, v in s.env.items()}
    finally:
        for s in svcs:
            s.stop()


def cli_env(env: dict[str, str], cwd: Path) -> dict[str, str]:
    """The environment of an ``ssl-pipeline`` command run by a test: ours without Prefect and
    MLflow settings, then ``env`` (the servers), and a Prefect home of its own under ``cwd``."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    full_env.update(env, PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONUNBUFFERED="1")
    full_env.setdefault("PREFECT_HOME", str(cwd / ".prefect"))
    return full_env


def run_cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the ``ssl-pipeline`` command as a user would, in its own process."""
    return subprocess.run([str(BIN / "ssl-pipeline"), *args], cwd=cwd, env=cli_env(env, cwd), capture_output=True,
                          text=True, timeout=timeout)


def run_stages(d: Path, served_url: str) -> dict[str, dict]:
    """collect (the embedded site served at ``served_url``, as the flow crawls it) -> extract ->
    filter (demo profile) -> dedup -> decontaminate -> tokenize into folders under ``d``; their manifests."""
    from tasks.collect import collect_pydoc_site
    from tasks.config import CollectConfig, DecontaminateConfig, DedupConfig, ExtractConfig, TokenizeConfig, load_config
    from tasks.decontaminate import decontaminate
    from tasks.dedup import dedup
    from tasks.extract import extract
    from tasks.filter import filter_docs
    from tasks.tokenize import tokenize
    demo = load_config(ROOT / "flows/profiles/demo.yaml")
    out = {"collect": collect_pydoc_site(CollectConfig(), d / "collect", served_url)}
    out["extract"] = extract(ExtractConfig(), out["collect"], d / "extract")
    out["filter"] = filter_docs(demo.filter, out["extract"], d / "filter")
    out["dedup"] = dedup(DedupConfig(), out["filter"], d / "dedup")
    out["decontaminate"] = decontaminate(DecontaminateConfig(), out["dedup"], d / "decontaminate")
    # a quarter held out: the split goes by a hash of each doc_id. The ids used to hold the port the
    # site happened to be served on, so the split changed from run to run, and with 30 documents a
    # tenth left under 3 % of the text for validation in 1 port of 4 (one 1357-token document
    # failed four training tests' thresholds). Pages are recorded under pydoc_site.ORIGIN now: the
    # split is the same in every run (on Python 3.11, 6 documents of 35 and 17 % of the tokens),
    # and a quarter keeps that margin should the test site change.
    out["tokenize"] = tokenize(TokenizeConfig(vocab_size=1024, val_fraction=0.25), out["decontaminate"], d / "tokenize")
    return out


@pytest.fixture(scope="session")
def stages(tmp_path_factory, site_url):
    """collect -> extract -> filter (demo profile) -> dedup -> decontaminate -> tokenize over the test site."""
    return run_stages(tmp_path_factory.mktemp("stages"), site_url)
