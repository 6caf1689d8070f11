"""Start and stop a local Prefect server and MLflow tracking server on 127.0.0.1, on SQLite or PostgreSQL.

    python -m infra.services start     # prints the environment to use them
    python -m infra.services status
    python -m infra.services stop
    python -m infra.services automation   # (re)create the zombie-run automation on $PREFECT_API_URL

State (databases, artifacts, logs, pid files) lives in ``$SSL_PIPELINE_HOME`` (default ``.ssl``).
With ``--database-url postgresql://user:password@host:port`` (or ``$SSL_PIPELINE_DATABASE_URL``) Prefect
keeps its state in the database ``prefect`` of that server and MLflow in ``mlflow`` (``python -m
infra.postgres start`` gives one); artifacts stay in the state folder. The demo and the tests use the
same functions.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from flows.recovery import CRASH_AFTER_S  # noqa: F401  (CRASH_AFTER_S: for callers)
from flows.recovery import crash_after_s as default_window

BIN = Path(sys.executable).parent
# Flow runs send a heartbeat event every HEARTBEAT_S seconds (Prefect's minimum is 30); a run whose
# heartbeats stop for CRASH_AFTER_S (its process killed, its machine gone) is marked Crashed by
# the automation below, and can then be retried.
HEARTBEAT_S = 30
AUTOMATION = "ssl-pipeline: crash flow runs whose heartbeats stop"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_driver(url: str, driver: str) -> str:
    """postgresql://... -> postgresql+DRIVER://... (SQLAlchemy 2.1 would pick psycopg 3 for a bare postgresql://)."""
    return url.replace("postgresql://", f"postgresql+{driver}://", 1)


@dataclass
class Service:
    name: str
    port: int
    home: Path
    database: str | None = None   # postgresql://... of this service's database; None: SQLite in home

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def health(self) -> str:
        return f"{self.url}/api/health" if self.name == "prefect" else f"{self.url}/health"

    @property
    def env(self) -> dict[str, str]:
        if self.name == "prefect":
            return {"PREFECT_API_URL": f"{self.url}/api"}
        return {"MLFLOW_TRACKING_URI": self.url}

    def command(self) -> tuple[list[str], dict[str, str]]:
        data = self.home / self.name
        data.mkdir(parents=True, exist_ok=True)
        if self.name == "prefect":
            db = with_driver(self.database, "asyncpg") if self.database else f"sqlite+aiosqlite:///{data / 'prefect.db'}"
            env = {"PREFECT_HOME": str(data), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                   "PREFECT_API_DATABASE_CONNECTION_URL": db,
                   "PREFECT_UI_API_URL": f"{self.url}/api", "PREFECT_SERVER_API_HOST": "127.0.0.1"}
            return [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)], env
        db = with_driver(self.database, "psycopg2") if self.database else f"sqlite:///{data / 'mlflow.db'}"
        return [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                "--backend-store-uri", db,
                "--artifacts-destination", str(data / "artifacts")], {}

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.health, timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    @property
    def pidfile(self) -> Path:
        return self.home / f"{self.name}.pid"

    def start(self, timeout: float = 120) -> "Service":
        """Start the server in the background (unless one already answers) and wait until it is healthy."""
        start_all([self], timeout)
        return self

    def launch(self) -> subprocess.Popen | None:
        """Start the server in the background unless one already answers; does not wait."""
        if self.healthy():
            return None
        cmd, extra = self.command()
        log = open(self.home / f"{self.name}.log", "ab")
        proc = subprocess.Popen(cmd, env={**os.environ, **extra}, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.home)
        self.pidfile.write_text(str(proc.pid))
        return proc

    def wait_healthy(self, proc: subprocess.Popen | None, deadline: float) -> None:
        while proc is not None and not self.healthy():
            if proc.poll() is not None or time.time() > deadline:
                self.stop()
                tail = (self.home / f"{self.name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{self.name} server did not start on {self.url}; log tail:\n{tail}")
            time.sleep(0.5)

    def stop(self) -> None:
        if not self.pidfile.exists():
            return
        pid = int(self.pidfile.read_text())
        try:
            os.killpg(pid, signal.SIGTERM)
            for _ in range(50):
                with contextlib.suppress(ChildProcessError):   # reap it if we started it: a zombie counts as alive
                    os.waitpid(pid, os.WNOHANG)
                os.killpg(pid, 0)
                time.sleep(0.2)
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.pidfile.unlink(missing_ok=True)


def start_all(svcs: list[Service], timeout: float = 120, crash_after_s: int | None = None) -> list[Service]:
    """Start the servers side by side (each unless one already answers), wait until all are healthy,
    and make sure Prefect's server has the automation that marks silent flow runs Crashed."""
    launched = [(s, s.launch()) for s in svcs]
    deadline = time.time() + timeout
    for s, proc in launched:
        s.wait_healthy(proc, deadline)
    for s in svcs:
        if s.name == "prefect":
            ensure_crash_automation(s.env["PREFECT_API_URL"], crash_after_s)
    return svcs


def crash_automation(crash_after_s: int) -> dict:
    """Prefect's recipe for zombie flow runs (docs: "Detect and respond to zombie flows"): after a
    flow run's heartbeat, expect another one (or the run's end) within ``crash_after_s`` seconds,
    else set the run Crashed. Needs heartbeats: PREFECT_FLOWS_HEARTBEAT_FREQUENCY (``ssl-pipeline``
    sets it to HEARTBEAT_S; workers need it in their environment)."""
    from datetime import timedelta

    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification
    return AutomationCore(
        name=AUTOMATION,
        description=f"A flow run that sent a heartbeat and then nothing for {crash_after_s} s (its process was "
                    "killed or its machine lost) is marked Crashed, so that it can be retried.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=crash_after_s)),
        actions=[ChangeFlowRunState(
            state=StateType.CRASHED,
            message=f"No heartbeat for {crash_after_s} s: the flow run's process is gone (marked by the automation "
                    f"'{AUTOMATION}')")],
    ).model_dump(mode="json", exclude={"owner_resource"})   # the server's update refuses that field


def _canonical(v):
    """JSON with its sets (lists of strings, in any order) sorted: to compare two automations."""
    if isinstance(v, dict):   # ids the server gives a trigger and an action left out
        return {k: _canonical(x) for k, x in v.items() if k != "id"}
    if isinstance(v, list):
        items = [_canonical(x) for x in v]
        return sorted(items) if all(isinstance(x, str) for x in items) else items
    return v


def ensure_crash_automation(api_url: str, crash_after_s: int | None = None) -> str:
    """Create the automation on the Prefect server at ``api_url``, or bring the one of that name up to
    date (once: duplicates are removed). Returns its id."""
    import httpx
    window = crash_after_s or default_window()
    want = crash_automation(window)
    with httpx.Client(base_url=api_url.rstrip("/") + "/", timeout=30) as http:
        found = http.post("automations/filter", json={"automations": {"name": {"any_": [AUTOMATION]}}})
        found.raise_for_status()
        found = sorted(found.json(), key=lambda a: a["created"])
        for extra in found[1:]:
            http.delete(f"automations/{extra['id']}").raise_for_status()
        if not found:
            made = http.post("automations/", json=want)
            made.raise_for_status()
            return made.json()["id"]
        have = found[0]
        if any(_canonical(have.get(k)) != _canonical(v) for k, v in want.items()):
            http.put(f"automations/{have['id']}", json=want).raise_for_status()
        return have["id"]


def services(home: str | Path | None = None, prefect_port: int = 4200, mlflow_port: int = 5000,
             database_url: str | None = None) -> list[Service]:
    """The two servers; with ``database_url`` (a PostgreSQL server) on its databases ``prefect`` and ``mlflow``."""
    home = Path(home or os.environ.get("SSL_PIPELINE_HOME", ".ssl")).resolve()
    home.mkdir(parents=True, exist_ok=True)
    base = database_url.rstrip("/") if database_url else None
    return [Service("prefect", prefect_port, home, base and f"{base}/prefect"),
            Service("mlflow", mlflow_port, home, base and f"{base}/mlflow")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infra.services", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["start", "stop", "status", "automation"])
    p.add_argument("--home", default=None, help="state folder (default $SSL_PIPELINE_HOME or .ssl)")
    p.add_argument("--prefect-port", type=int, default=int(os.environ.get("PREFECT_PORT", 4200)))
    p.add_argument("--mlflow-port", type=int, default=int(os.environ.get("MLFLOW_PORT", 5000)))
    p.add_argument("--database-url", default=os.environ.get("SSL_PIPELINE_DATABASE_URL"),
                   help="PostgreSQL server, postgresql://user:password@host:port (default: SQLite in the state folder)")
    p.add_argument("--crash-after", type=int, default=None, metavar="SECONDS",
                   help=f"mark a flow run Crashed after this long without a heartbeat (default "
                        f"$SSL_PIPELINE_CRASH_AFTER_S or {CRASH_AFTER_S})")
    a = p.parse_args(argv)
    if a.action == "automation":   # on the server PREFECT_API_URL names (a team's, infra/docker-compose.yml)
        from prefect.settings import PREFECT_API_URL
        if not PREFECT_API_URL.value():
            p.error("automation: set PREFECT_API_URL to the Prefect server's API")
        print(f"automation {ensure_crash_automation(PREFECT_API_URL.value(), a.crash_after)}: {AUTOMATION}")
        return 0
    svcs = services(a.home, a.prefect_port, a.mlflow_port, a.database_url)
    if a.action == "start":
        start_all(svcs, crash_after_s=a.crash_after)
    for s in svcs:
        if a.action == "stop":
            s.stop()
        state = "up" if s.healthy() else "down"
        print(f"{s.name:8s} {state:5s} {s.url}   (state in {s.home / s.name}, log {s.home / (s.name + '.log')})")
    if a.action == "start":
        print(f"\nFlow runs silent for {a.crash_after or default_window()} s "
              f"are marked Crashed (automation '{AUTOMATION}').")
        print("\nUse them with:\n" + "\n".join(f"  export {k}={v}" for s in svcs for k, v in s.env.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
