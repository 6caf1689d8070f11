"""A throwaway PostgreSQL cluster from the distribution's packages, for the tests and local use.

    python -m infra.postgres start [--dir .ssl/postgres] [--port 5433]   # prints the URL for infra.services
    python -m infra.postgres stop  [--dir .ssl/postgres]

`initdb` and `pg_ctl` into one folder (the cluster in data/, its log, its password). The server listens on
127.0.0.1 only (no Unix socket), asks for a password, and holds the databases in DATABASES. PostgreSQL
refuses to run as root: as root the server runs as the `postgres` system user (created by Debian's
package), which then owns the folder. Debian: `apt-get install -y postgresql`; the binaries are in
/usr/lib/postgresql/<version>/bin, which is not on PATH.
"""

from __future__ import annotations

import argparse
import glob
import os
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# prefect and mlflow for the servers, mlflow_auth for MLflow's basic-auth users (docker-compose.yml creates the same)
DATABASES = ("prefect", "mlflow", "mlflow_auth")
OWNER = "postgres"   # the system user the server runs as when we are root


def pg_bin(name: str) -> str:
    """Path of a PostgreSQL program: the newest /usr/lib/postgresql/<version>/bin, else PATH."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                   key=lambda p: [int(x) for x in Path(p).parts[-3].split(".") if x.isdigit()])
    if found:
        return found[-1]
    if path := shutil.which(name):
        return path
    raise FileNotFoundError(f"PostgreSQL's `{name}` is not in /usr/lib/postgresql/*/bin nor on PATH: "
                            "install the server (Debian: apt-get install -y postgresql)")


@dataclass
class Postgres:
    home: Path
    port: int = 5433

    def __post_init__(self):
        self.home = Path(self.home).resolve()
        self.data, self.log, self.passfile = self.home / "data", self.home / "postgres.log", self.home / "password"

    @property
    def password(self) -> str:
        return self.passfile.read_text().strip()

    @property
    def server_url(self) -> str:
        """postgresql://user:password@127.0.0.1:port, for `infra.services --database-url`."""
        return f"postgresql://postgres:{self.password}@127.0.0.1:{self.port}"

    def url(self, database: str) -> str:
        return f"{self.server_url}/{database}"

    @staticmethod
    def _as_owner(args: list[str]) -> list[str]:
        """PostgreSQL's programs refuse root (pg_ctl even for status): run them as OWNER."""
        return ["runuser", "-u", OWNER, "--", *args] if os.geteuid() == 0 else args

    def _run(self, args: list[str], as_owner: bool = True) -> str:
        if as_owner:
            args = self._as_owner(args)
        env = {**os.environ, "PGPASSWORD": self.password} if self.passfile.exists() else None
        proc = subprocess.run(args, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(args)} exited with {proc.returncode}:\n{proc.stdout}{proc.stderr}"
                               + (f"\nserver log tail ({self.log}):\n{log}" if log else ""))
        return proc.stdout

    def init(self) -> None:
        """Create the cluster (once), owned by the postgres user when we are root."""
        if (self.data / "PG_VERSION").exists():
            return
        initdb = pg_bin("initdb")
        self.home.mkdir(parents=True, exist_ok=True)
        self.passfile.write_text(secrets.token_hex(16))
        self.passfile.chmod(0o600)
        if os.geteuid() == 0:
            shutil.chown(self.home, OWNER)
            shutil.chown(self.passfile, OWNER)
            if subprocess.run(self._as_owner(["test", "-w", str(self.home)])).returncode != 0:
                raise PermissionError(f"the `{OWNER}` user cannot write {self.home}: PostgreSQL refuses to run as "
                                      "root, so put the folder where that user can reach it (e.g. under /tmp)")
        self._run([initdb, "-D", str(self.data), "-U", "postgres", "--auth=scram-sha-256",
                   f"--pwfile={self.passfile}", "-E", "UTF8", "--locale=C", "--no-sync"])

    def running(self) -> bool:
        if not (self.data / "postmaster.pid").exists():
            return False
        cmd = self._as_owner([pg_bin("pg_ctl"), "-D", str(self.data), "status"])
        return subprocess.run(cmd, capture_output=True).returncode == 0

    def start(self, timeout: int = 60) -> "Postgres":
        """Start the server on 127.0.0.1:port (unless it runs) and create the databases that are missing."""
        self.init()
        if not self.running():
            self._run([pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", str(timeout),
                       "-o", f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories=",
                       "start"])
        existing = {row[0] for row in self.query("postgres", "SELECT datname FROM pg_database")}
        for db in DATABASES:
            if db not in existing:
                self.query("postgres", f"CREATE DATABASE {db}")
        return self

    def stop(self) -> None:
        if self.running():
            self._run([pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"])

    def query(self, database: str, sql: str) -> list[list[str]]:
        """Rows of one SQL statement, as psql prints them (text, tab-separated)."""
        out = self._run([pg_bin("psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", database,
                         "-X", "-A", "-t", "-F", "\t", "-v", "ON_ERROR_STOP=1", "-c", sql], as_owner=False)
        return [line.split("\t") for line in out.splitlines() if line]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infra.postgres", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--dir", default=os.path.join(os.environ.get("SSL_PIPELINE_HOME", ".ssl"), "postgres"),
                   help="cluster folder (default $SSL_PIPELINE_HOME/postgres or .ssl/postgres)")
    p.add_argument("--port", type=int, default=int(os.environ.get("POSTGRES_PORT", 5433)))
    a = p.parse_args(argv)
    pg = Postgres(Path(a.dir), a.port)
    if a.action != "start" and pg.running():   # the port it was started on: line 4 of postmaster.pid
        pg.port = int((pg.data / "postmaster.pid").read_text().splitlines()[3])
    if a.action == "start":
        pg.start()
    elif a.action == "stop":
        pg.stop()
    print(f"postgres {'up' if pg.running() else 'down'}  127.0.0.1:{pg.port}  (cluster in {pg.data}, log {pg.log})")
    if a.action == "start":
        print(f"\nStart Prefect and MLflow on it with:\n"
              f"  python -m infra.services start --database-url {pg.server_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
