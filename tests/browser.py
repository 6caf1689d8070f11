"""Helpers for the real-browser tests: headless Chromium (Debian's ``chromium`` package) driven by
Playwright, a screenshot when a step fails, and polling the servers' APIs until a condition holds."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")

# Playwright's own browser download is never used: the system's Chromium is launched instead.
CANDIDATES = ("chromium", "chromium-browser", "/usr/bin/chromium", "/usr/lib/chromium/chromium")


def chromium_path() -> str | None:
    """$CHROMIUM, else the first Chromium on this machine."""
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    for name in CANDIDATES:
        found = shutil.which(name) or (name if Path(name).is_file() and os.access(name, os.X_OK) else None)
        if found:
            return found
    return None


def launch(playwright, executable: str):
    return playwright.chromium.launch(executable_path=executable, headless=True,
                                      args=["--disable-dev-shm-usage"])  # small /dev/shm in containers


@contextlib.contextmanager
def screenshot_on_failure(page, path: Path):
    """Any exception inside: a full-page screenshot at ``path`` and the page's URL in the error."""
    try:
        yield
    except BaseException as e:
        try:
            page.screenshot(path=str(path), full_page=True)
            note = f"screenshot: {path}; page: {page.url}"
        except Exception as shot_error:  # the page itself may be gone
            note = f"no screenshot ({shot_error!r})"
        if hasattr(e, "add_note"):
            e.add_note(note)
        raise


def wait_until(probe: Callable[[], T | None], timeout: float, what: str, every: float = 1.0,
               describe: Callable[[], str] | None = None) -> T:
    """Call ``probe`` until it returns something truthy (returned) or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}"
                               + (f"\n{describe()}" if describe else ""))
        time.sleep(every)



def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live process, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), int(fields[19])


def descendants(pid: int) -> list[tuple[int, int]]:
    """Every process below ``pid`` (Linux /proc) as (pid, start time), children first."""
    children: dict[int, list[tuple[int, int]]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (st := _stat(int(d.name))):
            children.setdefault(st[0], []).append((int(d.name), st[1]))
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo += children.get(p[0], [])
    return out


def stop_process_tree(proc, grace: float = 10.0) -> None:
    """Stop a process started with ``start_new_session=True``: SIGTERM to its group, SIGKILL after
    ``grace`` seconds, then SIGKILL whatever it started in sessions of their own (a worker's flow
    runs) that is still alive. A pid is killed only while its start time is the one seen before."""
    below = descendants(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    for pid, started in below:
        st = _stat(pid)
        if st and st[1] == started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
