"""Start and stop a local Prefect server and MLflow tracking server on 127.0.0.1, on SQLite or PostgreSQL.

    python -m infra.services start     # prints the environment to use them
    python -m infra.services status
    python -m infra.services stop

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

BIN = Path(sys.executable).parent


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


def start_all(svcs: list[Service], timeout: float = 120) -> list[Service]:
    """Start the servers side by side (each unless one already answers) and wait until all are healthy."""
    launched = [(s, s.launch()) for s in svcs]
    deadline = time.time() + timeout
    for s, proc in launched:
        s.wait_healthy(proc, deadline)
    return svcs


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
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--home", default=None, help="state folder (default $SSL_PIPELINE_HOME or .ssl)")
    p.add_argument("--prefect-port", type=int, default=int(os.environ.get("PREFECT_PORT", 4200)))
    p.add_argument("--mlflow-port", type=int, default=int(os.environ.get("MLFLOW_PORT", 5000)))
    p.add_argument("--database-url", default=os.environ.get("SSL_PIPELINE_DATABASE_URL"),
                   help="PostgreSQL server, postgresql://user:password@host:port (default: SQLite in the state folder)")
    a = p.parse_args(argv)
    svcs = services(a.home, a.prefect_port, a.mlflow_port, a.database_url)
    if a.action == "start":
        start_all(svcs)
    for s in svcs:
        if a.action == "stop":
            s.stop()
        state = "up" if s.healthy() else "down"
        print(f"{s.name:8s} {state:5s} {s.url}   (state in {s.home / s.name}, log {s.home / (s.name + '.log')})")
    if a.action == "start":
        print("\nUse them with:\n" + "\n".join(f"  export {k}={v}" for s in svcs for k, v in s.env.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
