"""Embedded default corpus: pydoc's HTML docs of a curated set of stdlib modules.

We render the pages ahead of time in one isolated child process and serve them as
static files.  pydoc's own live server (``python -m pydoc -p``) is avoided on purpose:
it imports whatever module a request names, and importing runs code (``antigravity``
opens a browser, ``this`` prints, GUI modules need a display, a stray ``*.py`` in the
working directory shadows the stdlib).
"""

from __future__ import annotations

import contextlib
import functools
import html
import http.server
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Iterator, Sequence

log = logging.getLogger(__name__)

# Where the site's pages are recorded, whatever port it is served on (``tasks.collect.collect_pydoc_site``):
# a name under .localhost (RFC 6761) never names a host on the network.
ORIGIN = "http://pydoc.localhost/"

# Pure-stdlib modules of CPython 3.11 on Linux that import silently from an empty
# directory under ``python -I -W error`` (no output, warnings, threads or files).
DEFAULT_MODULES: tuple[str, ...] = tuple("""
    abc argparse array ast atexit base64 bdb binascii bisect builtins bz2 cProfile
    calendar cmath cmd code codecs codeop colorsys compileall configparser contextlib
    contextvars copy copyreg csv dataclasses datetime decimal difflib dis doctest enum
    errno faulthandler fcntl filecmp fileinput fnmatch fractions ftplib functools gc
    genericpath getopt getpass gettext glob graphlib grp gzip hashlib heapq hmac
    imaplib inspect io ipaddress itertools keyword linecache locale lzma mailbox
    marshal math mimetypes mmap modulefinder netrc ntpath numbers opcode operator
    optparse os pathlib pdb pickle pickletools pkgutil platform plistlib poplib posix
    posixpath pprint profile pstats pty pwd py_compile pyclbr pydoc pyexpat queue
    quopri random re reprlib resource runpy sched secrets select selectors shelve
    shlex shutil signal smtplib socket socketserver ssl stat statistics string
    stringprep struct subprocess symtable sys sysconfig syslog tabnanny tarfile
    tempfile termios textwrap threading time timeit token tokenize tomllib trace
    traceback tracemalloc tty types typing unicodedata uuid warnings wave weakref
    zipapp zipfile zipimport zlib zoneinfo
    asyncio asyncio.base_events asyncio.base_futures asyncio.base_subprocess
    asyncio.base_tasks asyncio.constants asyncio.coroutines asyncio.events
    asyncio.exceptions asyncio.format_helpers asyncio.futures asyncio.locks asyncio.log
    asyncio.mixins asyncio.proactor_events asyncio.protocols asyncio.queues
    asyncio.runners asyncio.selector_events asyncio.sslproto asyncio.staggered
    asyncio.streams asyncio.subprocess asyncio.taskgroups asyncio.tasks asyncio.threads
    asyncio.timeouts asyncio.transports asyncio.trsock asyncio.unix_events
    collections collections.abc
    concurrent concurrent.futures concurrent.futures.process concurrent.futures.thread
    ctypes ctypes.util
    curses curses.ascii curses.panel curses.textpad
    dbm dbm.dumb
    email email.base64mime email.charset email.contentmanager email.encoders
    email.errors email.feedparser email.generator email.header email.headerregistry
    email.iterators email.message email.mime email.mime.application email.mime.audio
    email.mime.base email.mime.image email.mime.message email.mime.multipart
    email.mime.nonmultipart email.mime.text email.parser email.policy
    email.quoprimime email.utils
    html html.entities html.parser
    http http.client http.cookiejar http.cookies http.server
    importlib importlib.abc importlib.machinery importlib.metadata importlib.readers
    importlib.resources importlib.resources.abc importlib.resources.readers
    importlib.resources.simple importlib.simple importlib.util
    json json.decoder json.encoder json.scanner json.tool
    logging logging.config logging.handlers
    multiprocessing multiprocessing.connection multiprocessing.context
    multiprocessing.dummy multiprocessing.dummy.connection multiprocessing.forkserver
    multiprocessing.heap multiprocessing.managers multiprocessing.pool
    multiprocessing.popen_fork multiprocessing.popen_forkserver
    multiprocessing.popen_spawn_posix multiprocessing.process multiprocessing.queues
    multiprocessing.reduction multiprocessing.resource_sharer
    multiprocessing.resource_tracker multiprocessing.shared_memory
    multiprocessing.sharedctypes multiprocessing.spawn multiprocessing.synchronize
    multiprocessing.util
    sqlite3 sqlite3.dbapi2 sqlite3.dump
    unittest unittest.async_case unittest.case unittest.loader unittest.main
    unittest.mock unittest.result unittest.runner unittest.signals unittest.suite
    unittest.util
    urllib urllib.error urllib.parse urllib.request urllib.response urllib.robotparser
    wsgiref wsgiref.handlers wsgiref.headers wsgiref.simple_server wsgiref.types
    wsgiref.util wsgiref.validate
    xml xml.dom xml.dom.NodeFilter xml.dom.domreg xml.dom.expatbuilder
    xml.dom.minicompat xml.dom.minidom xml.dom.pulldom xml.dom.xmlbuilder xml.etree
    xml.etree.ElementInclude xml.etree.ElementPath xml.etree.ElementTree xml.parsers
    xml.parsers.expat xml.sax xml.sax.expatreader xml.sax.handler xml.sax.saxutils
    xml.sax.xmlreader
    xmlrpc xmlrpc.client xmlrpc.server
""".split())

# Runs in the child: reads {"out", "modules", "result"} as JSON on stdin, writes one
# page per module, and records what it rendered/skipped in the "result" file (not on
# stdout, which an imported module could write to).
_CHILD = r"""
import importlib, json, os, pydoc, re, sys, warnings
warnings.simplefilter("ignore")
job = json.load(sys.stdin)
done, skipped = [], {}
for name in job["modules"]:
    try:
        obj = importlib.import_module(name)
        page = pydoc.html.page(pydoc.describe(obj), pydoc.html.document(obj, name))
        # memory addresses ("at 0x7f...", ctypes' "handle 7f..."): the same page on every render
        page = re.sub(r"(?: |&nbsp;)(?:at(?: |&nbsp;)0x|handle )[0-9a-f]+", "", page)
        path = os.path.join(job["out"], name + ".html")
        with open(path + ".tmp", "w", encoding="utf-8", errors="xmlcharrefreplace") as f:
            f.write(page)
        os.replace(path + ".tmp", path)
        done.append(name)
    except (Exception, SystemExit) as e:
        skipped[name] = f"{type(e).__name__}: {e}"
with open(job["result"], "w", encoding="utf-8") as f:
    json.dump({"done": done, "skipped": skipped}, f)
sys.stdout.flush(); sys.stderr.flush()
os._exit(0)  # skip atexit hooks and non-daemon threads an import may have left
"""

# pydoc prints module data, e.g. os.environ: never let our environment into the pages.
_CHILD_ENV = {"LC_ALL": "C.UTF-8", "PATH": os.defpath}

_INTRO = (
    "Reference documentation for {n} modules of the Python {v} standard library, "
    "generated by pydoc from their docstrings. Each page lists a module's classes, "
    "functions and data, and links to related modules."
)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not all(p.isidentifier() for p in name.split(".")):
        raise ValueError(f"not a valid dotted module name: {name!r}")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _index_html(names: Sequence[str]) -> str:
    version = "%d.%d" % sys.version_info[:2]
    items = "\n".join(
        f'<li><a href="{html.escape(n)}.html">{html.escape(n)}</a></li>' for n in sorted(names)
    )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>Python {version} standard library</title>\n</head><body>\n"
        f"<h1>Python {version} standard library</h1>\n"
        f"<p>{_INTRO.format(n=len(names), v=version)}</p>\n<ul>\n{items}\n</ul>\n</body></html>\n"
    )


def render_site(out_dir: str | os.PathLike, modules: Sequence[str] = DEFAULT_MODULES) -> list[str]:
    """Render one HTML page per module as <out_dir>/<module>.html plus <out_dir>/index.html
    (a page linking every rendered module, with a short intro paragraph) and
    <out_dir>/robots.txt (User-agent: * / Allow: /). Returns the list of module names rendered.

    Modules that fail to import or render are skipped and logged as a warning.
    """
    if isinstance(modules, str):
        modules = [modules]
    modules = list(dict.fromkeys(modules))
    for name in modules:
        _check_name(name)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pydoc-site-") as tmp:
        cwd = os.path.join(tmp, "cwd")  # stays empty: nothing there to import or clobber
        os.mkdir(cwd)
        result_file = os.path.join(tmp, "result.json")
        job = {"out": str(out), "modules": modules, "result": result_file}
        proc = subprocess.run(
            [sys.executable, "-I", "-c", _CHILD], input=json.dumps(job), cwd=cwd,
            env=_CHILD_ENV, capture_output=True, text=True, errors="replace", timeout=600,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"pydoc render child failed ({proc.returncode}): {proc.stderr[-2000:]}")
        with open(result_file, encoding="utf-8") as f:
            result = json.load(f)
    if proc.stdout.strip() or proc.stderr.strip():
        log.debug("render child output: %s", (proc.stdout + proc.stderr)[-2000:])
    for name, err in result["skipped"].items():
        log.warning("skipped module %s (%s)", name, err)
    done = result["done"]
    _write_atomic(out / "robots.txt", "User-agent: *\nAllow: /\n")
    # the pages say what this Python's library is: dated (Last-Modified) as the library is, not when
    # they were rendered, so two renders of the same library are the same pages
    stamp = Path(os.__file__).stat().st_mtime
    for page in [*(out / f"{name}.html" for name in done), out / "robots.txt"]:
        os.utime(page, (stamp, stamp))
    _write_atomic(out / "index.html", _index_html(done))  # last: marks the site complete
    os.utime(out / "index.html", (stamp, stamp))
    return done


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    # keep-alive, as web servers answer: a crawler reuses its connections instead of opening one
    # per page. Headers and body go out in separate writes: without TCP_NODELAY, Nagle's algorithm
    # holds the body until the client's delayed ACK of the headers, 40 ms a page.
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, format, *args):  # noqa: A002 - silence per-request logging
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # e.g. a client hanging up early
        log.debug("error serving %s", client_address, exc_info=True)


@contextlib.contextmanager
def serve(directory: str | os.PathLike) -> Iterator[str]:
    """Serve `directory` over HTTP on 127.0.0.1 with an OS-chosen free port in a daemon
    thread. Yields the base URL 'http://127.0.0.1:PORT/'. Shuts the server down on exit.
    (The collect stage crawls it under ``ORIGIN``, which does not hold the port.)"""
    handler = functools.partial(_QuietHandler, directory=os.fspath(directory))
    server = _QuietServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="pydoc-site", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextlib.contextmanager
def render_and_serve(work_dir: str | os.PathLike, modules: Sequence[str] = DEFAULT_MODULES) -> Iterator[str]:
    """Render the site into <work_dir>/site unless index.html is already there, then serve it."""
    site = Path(work_dir) / "site"
    if not (site / "index.html").exists():
        render_site(site, modules)
    with serve(site) as url:
        yield url


if __name__ == "__main__":  # python -m tasks.pydoc_site DIR: serve DIR until killed; prints its URL
    with serve(sys.argv[1]) as url:
        print(url, flush=True)
        threading.Event().wait()
