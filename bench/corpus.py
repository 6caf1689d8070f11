"""A real corpus for the filter benchmark: a few thousand documents of text that is on this machine.

    python bench/corpus.py [--out PATH]      # builds (or reads) it and prints its make-up

Built offline and deterministically (sorted inputs, fixed picks, no randomness), cached as JSONL
(one {"id", "source", "text"} a line) under the system's temporary folder, never committed:

- ``python-page``: every page of the Python documentation installed with the interpreter
  (/usr/share/doc/python3.11/html), its main text extracted by the extract stage's own function
  (trafilatura);
- ``python-section``: the same pages' sections (each ``<section>`` under an h2 or h3 heading,
  nested subsections included), extracted the same way: variants of real pages;
- ``pydoc``: the pydoc pages of the default demo site (tasks.pydoc_site), extracted the same way;
- ``man``: manual pages rendered to text by ``man`` (every 24th English page of sections 1, 5,
  7 and 8, and every 3rd page of section 1 in German, French, Spanish and Russian);
- ``info``: the nodes of the GNU info manuals (coreutils, grep, sed, wget, gnupg...), one
  document per node;
- ``doc-file``: README, NEWS, changelog, copyright and other text files under /usr/share/doc
  (every 2nd file in path order; identical files once; at most 50 KB each);
- ``perl-pod``: the documentation of Perl's own modules and manuals (POD), rendered by pod2text;
- ``package-readme``: the long descriptions (READMEs) of the Python packages installed in the
  environment that runs the builder (pinned by constraints.txt).

Documents under 200 characters are left out (a heading and a link say nothing about a filter).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VERSION = 2
PYTHON_HTML = Path("/usr/share/doc/python3.11/html")
DOC_ROOT = Path("/usr/share/doc")
INFO_ROOT = Path("/usr/share/info")
MAN_ROOT = Path("/usr/share/man")
MIN_CHARS = 200
MAX_FILE_BYTES = 50_000
DEFAULT_PATH = Path(tempfile.gettempdir()) / "ssl-pipeline-bench" / f"corpus-v{VERSION}.jsonl"
OPTS = {"favor_precision": False, "favor_recall": False, "include_tables": True, "include_comments": False,
        "with_metadata": False}   # the extract stage's defaults


def _extract(html: str, url: str) -> str | None:
    from tasks.extract import extract_page
    try:
        doc = extract_page(html, url, OPTS)
    except Exception:   # noqa: BLE001  trafilatura/lxml on odd markup: no document
        return None
    return doc["text"] if doc else None


def _python_page(path: str) -> list[tuple[str, str, str]]:
    """(id, source, text) of one documentation page and of each of its h2/h3 sections."""
    import lxml.html
    html = Path(path).read_text(encoding="utf-8", errors="replace")
    rel = str(Path(path).relative_to(PYTHON_HTML))
    url = f"https://docs.python.org/3.11/{rel}"
    out = []
    text = _extract(html, url)
    if text:
        out.append((f"python-page:{rel}", "python-page", text))
    tree = lxml.html.fromstring(html)
    for i, section in enumerate(tree.iter("section")):
        heading = next((c for c in section if isinstance(c.tag, str) and c.tag in ("h2", "h3")), None)
        if heading is None:
            continue
        body = lxml.html.tostring(section, encoding="unicode", with_tail=False)
        page = f"<html><head><title>{rel}</title></head><body><main>{body}</main></body></html>"
        text = _extract(page, f"{url}#{section.get('id', i)}")
        if text:
            out.append((f"python-section:{rel}#{section.get('id', i)}", "python-section", text))
    return out


def python_docs(pool) -> list[tuple[str, str, str]]:
    pages = sorted(str(p) for p in PYTHON_HTML.rglob("*.html"))
    return [d for docs in pool.map(_python_page, pages, chunksize=4) for d in docs]


def pydoc_pages(work: Path) -> list[tuple[str, str, str]]:
    from tasks import pydoc_site
    pydoc_site.render_site(work / "pydoc", pydoc_site.DEFAULT_MODULES)
    out = []
    for p in sorted((work / "pydoc").glob("*.html")):
        text = _extract(p.read_text(encoding="utf-8", errors="replace"), f"http://127.0.0.1/{p.name}")
        if text:
            out.append((f"pydoc:{p.name}", "pydoc", text))
    return out


def _man(path: str) -> tuple[str, str, str] | None:
    env = {**os.environ, "MANWIDTH": "80", "LC_ALL": "C.UTF-8", "MAN_KEEP_FORMATTING": ""}
    try:
        r = subprocess.run(["man", "-P", "cat", "-l", path], capture_output=True, env=env, timeout=30)
    except subprocess.TimeoutExpired:
        return None
    text = r.stdout.decode("utf-8", errors="replace")
    text = re.sub(".\b", "", text).strip()   # overstrike (bold, underline) if any is left
    return (f"man:{Path(path).relative_to(MAN_ROOT)}", "man", text) if r.returncode == 0 else None


def man_pages(pool) -> list[tuple[str, str, str]]:
    paths = []
    for section in ("man1", "man5", "man7", "man8"):
        paths += sorted(str(p) for p in (MAN_ROOT / section).iterdir())[::24]
    for lang in ("de", "fr", "es", "ru"):
        d = MAN_ROOT / lang / "man1"
        if d.is_dir():
            paths += sorted(str(p) for p in d.iterdir())[::3]
    return [d for d in pool.map(_man, paths, chunksize=8) if d]


def _read(path: Path) -> str:
    data = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    return data.decode("utf-8", errors="replace")


def info_nodes() -> list[tuple[str, str, str]]:
    out = []
    for path in sorted(INFO_ROOT.glob("*.info*.gz")):
        if path.name.startswith("python"):   # the Python documentation again
            continue
        for node in _read(path).split("\x1f")[1:]:
            header, _, body = node.strip("\n").partition("\n")
            m = re.search(r"Node: ([^,]+)", header)
            if m:
                out.append((f"info:{path.name}#{m.group(1)}", "info", body.strip()))
    return out


DOC_FILE_RE = re.compile(r"^(readme|news|changelog|changes|copyright|authors|thanks|todo|history|faq|bugs|"
                         r"notes|.*\.txt|.*\.md|.*\.rst)(\.gz)?$", re.I)


def doc_files() -> list[tuple[str, str, str]]:
    out, seen = [], set()
    for path in sorted(DOC_ROOT.rglob("*"))[::2]:
        if (not path.is_file() or path.is_symlink() or path.is_relative_to(PYTHON_HTML)
                or not DOC_FILE_RE.match(path.name) or path.stat().st_size > MAX_FILE_BYTES):
            continue
        text = _read(path)
        if "\x00" in text:
            continue
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            out.append((f"doc-file:{path.relative_to(DOC_ROOT)}", "doc-file", text.strip()))
    return out


PERL_ROOTS = (Path("/usr/share/perl/5.36.0"), Path("/usr/share/perl5"))


def _pod(path: str) -> tuple[str, str, str] | None:
    try:
        r = subprocess.run(["pod2text", path], capture_output=True, timeout=30)
    except subprocess.TimeoutExpired:
        return None
    root = next(r for r in PERL_ROOTS if Path(path).is_relative_to(r))
    return (f"perl-pod:{Path(path).relative_to(root)}", "perl-pod", r.stdout.decode("utf-8", errors="replace").strip())


def perl_pods(pool) -> list[tuple[str, str, str]]:
    paths = sorted({str(p) for root in PERL_ROOTS if root.is_dir() for p in root.rglob("*")
                    if p.suffix in (".pod", ".pm") and p.is_file() and b"\n=head1" in p.read_bytes()})
    return [d for d in pool.map(_pod, paths, chunksize=8) if d]


def package_readmes() -> list[tuple[str, str, str]]:
    """The long descriptions (README) of the Python packages installed in this environment."""
    import importlib.metadata as md
    out = {}
    for dist in md.distributions():
        body = dist.read_text("METADATA") or ""
        name = dist.metadata["Name"]
        text = body.partition("\n\n")[2].strip()
        if name and text:
            out.setdefault(name.lower(), (f"package-readme:{name.lower()}", "package-readme", text))
    return [out[k] for k in sorted(out)]


def build(path: Path = DEFAULT_PATH) -> list[dict]:
    """The corpus, built once and then read from ``path``."""
    if path.exists():
        return [json.loads(line) for line in path.open(encoding="utf-8")]
    with tempfile.TemporaryDirectory(prefix="corpus-") as tmp, ProcessPoolExecutor(os.cpu_count() or 1) as pool:
        docs = (python_docs(pool) + pydoc_pages(Path(tmp)) + man_pages(pool) + info_nodes() + doc_files()
                + perl_pods(pool) + package_readmes())
    rows = [{"id": i, "source": s, "text": t} for i, s, t in docs if len(t) >= MIN_CHARS]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_suffix(".tmp")
    with tmp_path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp_path, path)
    return rows


def describe(rows: list[dict]) -> dict:
    chars: Counter[str] = Counter()
    for r in rows:
        chars[r["source"]] += len(r["text"])
    return {"builder": f"bench/corpus.py v{VERSION}", "documents": len(rows), "chars": sum(chars.values()),
            "by_source": dict(sorted(Counter(r["source"] for r in rows).items())),
            "chars_by_source": dict(sorted(chars.items()))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=DEFAULT_PATH)
    args = ap.parse_args()
    print(json.dumps({"path": str(args.out), **describe(build(args.out))}, indent=2))


if __name__ == "__main__":
    main()
