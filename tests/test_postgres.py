"""The servers on PostgreSQL, as a team runs them: the pipeline end to end with Prefect and MLflow on a
native PostgreSQL cluster (Debian's packages, infra/postgres.py), and infra/docker-compose.yml's own server
and worker commands run natively (PostgreSQL, moto's S3 server in MinIO's place, MLflow basic auth), with the
Kubernetes GPU pool's job template checked by the Prefect server.

PostgreSQL must be installed (`apt-get install -y postgresql`): without it these tests fail, they do not skip.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import httpx
import pytest
import yaml
from mlflow.tracking import MlflowClient

from infra.postgres import DATABASES, Postgres
from infra.services import Service, free_port, start_all
from infra.services import services as make_services
from tests.conftest import BIN, ROOT, run_cli
from tests.test_e2e import TRAINED, deployment_run, flow_run_id, runs_exited, stop_workers, wait_flow_run, write_config

pytestmark = pytest.mark.e2e
COMPOSE = yaml.safe_load((ROOT / "infra/docker-compose.yml").read_text())
GPU_TEMPLATE = ROOT / "infra/k8s/gpu-job-template.json"
# what a user exports before `docker compose up` (the file refuses to start without them)
COMPOSE_ENV = {"MLFLOW_ADMIN_PASSWORD": "compose-admin-pw-0123", "MLFLOW_SECRET_KEY": "test-secret-key"}
http = httpx.Client(timeout=60)   # patient: this machine's two cores are often shared


@pytest.fixture(scope="module")
def postgres():
    """Start throwaway PostgreSQL clusters on 127.0.0.1; all are stopped and removed at the end."""
    clusters = []

    def start() -> Postgres:
        # under /tmp: the server runs as the postgres user, who cannot enter pytest's root-only tmp_path
        pg = Postgres(Path(tempfile.mkdtemp(prefix="ssl-pg-")), free_port())
        clusters.append(pg)
        try:
            return pg.start()
        except FileNotFoundError as e:   # initdb missing: a failure, not a skip
            pytest.fail(f"{e}", pytrace=False)

    yield start
    for pg in clusters:
        try:
            pg.stop()
        finally:
            shutil.rmtree(pg.home, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# infra/services.py on PostgreSQL: the real pipeline, and what it leaves in the databases


def test_pipeline_on_postgresql_is_recorded_in_postgresql(tmp_path, postgres):
    pg = postgres()
    svcs = make_services(tmp_path / "services", free_port(), free_port(), database_url=pg.server_url)
    try:
        start_all(svcs)
        env = {k: v for s in svcs for k, v in s.env.items()}
        config = write_config(tmp_path / "run.yaml", "postgres", "postgres-gpt", evaluate=False,
                              max_steps=20, eval_interval=10, checkpoint_interval=20)
        proc = run_cli(["run", "--config", config], env, tmp_path)
    finally:
        for s in svcs:
            s.stop()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    fr_id = flow_run_id(proc.stdout)
    assert not list((tmp_path / "services").rglob("*.db"))   # no SQLite anywhere: both servers used PostgreSQL

    # Prefect's database: the flow run and one completed task run per stage
    assert pg.query("prefect", f"SELECT state_type FROM flow_run WHERE id = '{fr_id}'") == [["COMPLETED"]]
    tasks = pg.query("prefect", f"SELECT name, state_type FROM task_run WHERE flow_run_id = '{fr_id}'")
    assert sorted(tasks) == sorted([s, "COMPLETED"] for s in TRAINED)

    # MLflow's database: the parent run tagged with the flow run, six finished stage runs under it
    parent = pg.query("mlflow", "SELECT r.run_uuid, r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                                f"WHERE t.key = 'prefect.flow_run_id' AND t.value = '{fr_id}' AND NOT EXISTS "
                                "(SELECT 1 FROM tags p WHERE p.run_uuid = r.run_uuid AND p.key = 'mlflow.parentRunId')")
    assert len(parent) == 1 and parent[0][1] == "FINISHED", parent
    children = dict(pg.query("mlflow", "SELECT r.name, r.run_uuid FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                                       f"WHERE t.key = 'mlflow.parentRunId' AND t.value = '{parent[0][0]}' "
                                       "AND r.status = 'FINISHED'"))
    assert sorted(children) == sorted(TRAINED)
    steps = pg.query("mlflow", f"SELECT count(*) FROM metrics WHERE run_uuid = '{children['train']}' AND key = 'loss'")
    assert steps == [["20"]]
    datasets = pg.query("mlflow", "SELECT count(DISTINCT i.source_id) FROM inputs i WHERE i.destination_id "
                                  f"IN ({', '.join(repr(r) for r in children.values())})")
    assert int(datasets[0][0]) >= len(TRAINED)   # every stage logged datasets
    # the registered model, its version leading to the train run
    assert pg.query("mlflow", "SELECT name FROM registered_models WHERE name = 'postgres-gpt'") == [["postgres-gpt"]]
    assert pg.query("mlflow", "SELECT version, run_id FROM model_versions WHERE name = 'postgres-gpt'") == \
        [["1", children["train"]]]


# ----------------------------------------------------------------------------------------------
# infra/docker-compose.yml


def interpolate(value, env: dict[str, str]):
    """Docker Compose's interpolation: ${VAR}, ${VAR:-default}, ${VAR:?error}, $$ for a literal $."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m):
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op == ":?":
            raise KeyError(f"{name}: {arg}")
        return arg if op == ":-" else ""
    return re.sub(r"\$\$|\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, value)


def compose_service(name: str) -> dict:
    return interpolate(COMPOSE["services"][name], COMPOSE_ENV)


def compose_config(name: str) -> str:
    return interpolate(COMPOSE["configs"][name]["content"], COMPOSE_ENV)


def database_of(url: str) -> tuple[str, str, str]:
    """(driver, host:port, database) of a SQLAlchemy URL."""
    m = re.fullmatch(r"(postgresql\+\w+)://[^@/]+@([^/]+)/(\w+)", url)
    assert m, url
    return m.groups()


def arg(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_compose_file_is_consistent_with_the_native_setup():
    s = COMPOSE["services"]
    assert {"postgres", "minio", "minio-bucket", "prefect-server", "mlflow", "worker"} <= set(s)
    with pytest.raises(KeyError, match="MLFLOW_ADMIN_PASSWORD"):   # no default admin password
        interpolate(s["mlflow"], {})

    # the databases compose creates are the ones infra.postgres creates, and the ones the servers use
    created = re.findall(r"CREATE DATABASE (\w+);", compose_config("postgres-databases"))
    assert sorted(created) == sorted(DATABASES)
    prefect, mlflow, worker = compose_service("prefect-server"), compose_service("mlflow"), compose_service("worker")
    auth = configparser.ConfigParser()
    auth.read_string(compose_config("mlflow-basic-auth"))
    used = {database_of(prefect["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]),
            database_of(arg(mlflow["command"], "--backend-store-uri")),
            database_of(auth["mlflow"]["database_uri"])}
    assert used == {("postgresql+asyncpg", "postgres:5432", "prefect"), ("postgresql+psycopg2", "postgres:5432", "mlflow"),
                    ("postgresql+psycopg2", "postgres:5432", "mlflow_auth")}
    # the auth config is the one the server reads
    target = next(c["target"] for c in mlflow["configs"] if c["source"] == "mlflow-basic-auth")
    assert mlflow["environment"]["MLFLOW_AUTH_CONFIG_PATH"] == target

    # the artifact bucket MLflow writes to is the one the bucket job creates, on the MinIO service
    bucket = arg(mlflow["command"], "--artifacts-destination").removeprefix("s3://")
    assert re.search(rf"mc mb --ignore-existing s3/{bucket}$", compose_service("minio-bucket")["command"][0])
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert mlflow["environment"]["AWS_SECRET_ACCESS_KEY"] == compose_service("minio")["environment"]["MINIO_ROOT_PASSWORD"]

    # the worker reaches both servers where they listen, with the admin's credentials, on the deployment's pool
    assert worker["environment"]["PREFECT_API_URL"] == f"http://prefect-server:{arg(prefect['command'], '--port')}/api"
    assert worker["environment"]["MLFLOW_TRACKING_URI"] == f"http://mlflow:{arg(mlflow['command'], '--port')}"
    assert f"mlflow:{arg(mlflow['command'], '--port')}" in arg(mlflow["command"], "--allowed-hosts").split(",")
    assert worker["environment"]["MLFLOW_TRACKING_PASSWORD"] == mlflow["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"]
    assert worker["environment"]["MLFLOW_TRACKING_USERNAME"] == auth["mlflow"]["admin_username"]
    deployment = yaml.safe_load((ROOT / "deployments/prefect.yaml").read_text())
    pools = {d["work_pool"]["name"] for d in deployment["deployments"]}
    polled = re.findall(r"prefect worker start --pool ([\w-]+)", " ".join(worker["command"] + s["train-worker"]["command"]))
    assert sorted(polled) == sorted(pools)   # a worker for every pool the deployments use
    assert "--prefect-file deployments/prefect.yaml" in worker["command"][-1]
    assert s["worker"]["volumes"] == s["train-worker"]["volumes"] == ["runs:/app/runs"]   # both see the data
    assert worker["environment"]["SSL_PIPELINE_DIR"] == "/app"

    # the project image is built from a Dockerfile that exists; only the two UIs are published, on 127.0.0.1
    for name in ("prefect-server", "mlflow", "worker"):
        assert (ROOT / "infra" / s[name]["build"]["context"] / s[name]["build"]["dockerfile"]).is_file()
    assert {name: v["ports"] for name, v in s.items() if "ports" in v} == \
        {"prefect-server": ["127.0.0.1:4200:4200"], "mlflow": ["127.0.0.1:5000:5000"]}

    # the installed mlflow accepts the compose command line (click parses every option and its type)
    from mlflow.cli import server
    server.make_context("server", mlflow["command"][2:])
    with pytest.raises(Exception, match="no_such_option|No such option"):
        server.make_context("server", [*mlflow["command"][2:], "--no-such-option"])


@dataclass
class Native(Service):
    """A compose service's command and environment, run here."""
    cmd: list[str] = field(default_factory=list)
    extra: dict[str, str] = field(default_factory=dict)

    def command(self):
        return self.cmd, self.extra


def natively(name: str, port: int, home: Path, pg: Postgres, s3_url: str) -> Native:
    """The compose service `name` as written, its hosts replaced by what runs here on 127.0.0.1."""
    svc = compose_service(name)

    def local(v: str) -> str:
        v = re.sub(r"(postgresql\+\w+)://[^@/]+@postgres:5432",
                   lambda m: m.group(1) + pg.server_url.removeprefix("postgresql"), v)
        return v.replace("http://minio:9000", s3_url).replace("0.0.0.0", "127.0.0.1")

    cmd = [local(v) for v in svc["command"]]
    cmd[0] = str(BIN / cmd[0])
    cmd[cmd.index("--port") + 1] = str(port)
    env = {k: local(str(v)) for k, v in svc.get("environment", {}).items()}
    for c in svc.get("configs", []):   # compose mounts inline configs as files
        path = home / Path(c["target"]).name
        path.write_text(local(compose_config(c["source"])))
        env = {k: str(path) if v == c["target"] else v for k, v in env.items()}
    env.setdefault("PREFECT_HOME", str(home / "prefect-home"))
    return Native(name.removesuffix("-server"), port, home, cmd=cmd, extra=env)


@pytest.fixture(scope="module")
def compose_stack(tmp_path_factory, postgres):
    """prefect-server and mlflow from infra/docker-compose.yml, on a fresh cluster and moto's S3 server."""
    from moto.server import ThreadedMotoServer
    home = tmp_path_factory.mktemp("compose")
    pg = postgres()
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    s3.start()
    s3_url = "http://%s:%d" % s3.get_host_and_port()
    mlflow = compose_service("mlflow")
    bucket = arg(mlflow["command"], "--artifacts-destination").removeprefix("s3://")
    boto3.client("s3", endpoint_url=s3_url, aws_access_key_id=mlflow["environment"]["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=mlflow["environment"]["AWS_SECRET_ACCESS_KEY"],
                 region_name="us-east-1").create_bucket(Bucket=bucket)   # what minio-bucket does
    svcs = [natively("prefect-server", free_port(), home, pg, s3_url), natively("mlflow", free_port(), home, pg, s3_url)]
    try:
        start_all(svcs)
        yield {"pg": pg, "prefect": svcs[0], "mlflow": svcs[1], "s3_url": s3_url, "bucket": bucket}
    finally:
        for s in svcs:
            s.stop()
        s3.stop()


def test_compose_mlflow_server_enforces_basic_auth_and_stores_artifacts_in_s3(compose_stack, monkeypatch, tmp_path):
    url, pg = compose_stack["mlflow"].url, compose_stack["pg"]
    search = f"{url}/api/2.0/mlflow/experiments/search?max_results=10"
    password = COMPOSE_ENV["MLFLOW_ADMIN_PASSWORD"]
    assert http.get(f"{url}/health").status_code == 200                   # health stays open (compose checks it)
    assert http.get(search).status_code == 401
    assert http.get(search, auth=("admin", "wrong-password-123")).status_code == 401
    assert http.get(search, auth=("admin", password)).status_code == 200
    assert pg.query("mlflow_auth", "SELECT username, is_admin FROM users") == [["admin", "t"]]

    # the worker's way in: MLFLOW_TRACKING_USERNAME / PASSWORD; artifacts go through the server into the bucket
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    client = MlflowClient(url)
    run = client.create_run(client.create_experiment("compose-s3"))
    (tmp_path / "hello.txt").write_text("stored in S3")
    client.log_artifact(run.info.run_id, str(tmp_path / "hello.txt"))
    client.set_terminated(run.info.run_id)
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["hello.txt"]
    s3 = boto3.client("s3", endpoint_url=compose_stack["s3_url"], aws_access_key_id="x", aws_secret_access_key="x",
                      region_name="us-east-1")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=compose_stack["bucket"]).get("Contents", [])]
    assert keys == [f"{run.info.experiment_id}/{run.info.run_id}/artifacts/hello.txt"], keys
    assert pg.query("mlflow", f"SELECT status FROM runs WHERE run_uuid = '{run.info.run_id}'") == [["FINISHED"]]


def test_compose_prefect_server_on_postgresql_accepts_the_gpu_work_pool(compose_stack, tmp_path):
    prefect, pg = compose_stack["prefect"], compose_stack["pg"]
    assert pg.query("prefect", "SELECT count(*) FROM alembic_version") == [["1"]]   # migrated in PostgreSQL
    env = {**prefect.env, "PREFECT_HOME": str(tmp_path / ".prefect")}

    def create_pool(name: str, template: Path) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "prefect"), "--no-prompt", "work-pool", "create", name, "--type",
                               "kubernetes", "--base-job-template", str(template)],
                              env={**env, "PATH": str(BIN)}, capture_output=True, text=True, cwd=tmp_path)

    # (named apart from ssl-train-gpu, the process pool the compose workers use in this stack)
    proc = create_pool("ssl-train-gpu-k8s", GPU_TEMPLATE)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert pg.query("prefect", "SELECT type FROM work_pool WHERE name = 'ssl-train-gpu-k8s'") == [["kubernetes"]]
    template = json.loads(GPU_TEMPLATE.read_text())
    pool = http.get(f"{prefect.env['PREFECT_API_URL']}/work_pools/ssl-train-gpu-k8s").json()
    assert pool["base_job_template"] == template

    # the server checks the template: a placeholder without its variable is refused
    broken = json.loads(GPU_TEMPLATE.read_text())
    del broken["variables"]["properties"]["gpu_count"]
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    proc = create_pool("broken-gpu", tmp_path / "broken.json")
    assert proc.returncode != 0 and "gpu_count" in proc.stdout + proc.stderr

    # rendered with its defaults as a worker renders it: a Job asking for one GPU on a GPU node
    from prefect.utilities.templating import apply_values
    defaults = {k: p["default"] for k, p in template["variables"]["properties"].items() if "default" in p}
    job = apply_values(template["job_configuration"], defaults)
    pod = job["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert container["image"] == "ssl-pipeline:latest"
    assert set(job["env"]) == {"PREFECT_API_URL", "MLFLOW_TRACKING_URI"}


def test_compose_workers_run_the_nightly_deployment_with_basic_auth_and_s3(compose_stack, tmp_path):
    """worker and train-worker as compose starts them: the scheduled pipeline on one pool, training on the other,
    tracked through MLflow's basic auth with the model and artifacts in the S3 bucket."""
    prefect, mlflow, pg = compose_stack["prefect"], compose_stack["mlflow"], compose_stack["pg"]
    api = prefect.env["PREFECT_API_URL"]
    here = {"http://prefect-server:4200/api": api, "http://mlflow:5000": mlflow.url, "/app": str(ROOT)}
    worker = compose_service("worker")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update({k: here.get(v, v) for k, v in worker["environment"].items()},
               PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", PREFECT_HOME=str(tmp_path / ".prefect"),
               PREFECT_WORKER_QUERY_SECONDS="2", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    config = tmp_path / "run.yaml"
    write_config(config, "compose", "compose-gpt", evaluate=False, max_steps=20, eval_interval=10,
                 checkpoint_interval=20)
    config.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "data_dir": str(tmp_path / "runs")}))

    procs = [subprocess.Popen(compose_service(name)["command"], cwd=ROOT, env=env, start_new_session=True,
                              stdout=open(tmp_path / f"{name}.log", "wb"), stderr=subprocess.STDOUT)
             for name in ("worker", "train-worker")]

    def logs():
        return {n: (tmp_path / f"{n}.log").read_text(errors="replace")[-3000:] for n in ("worker", "train-worker")}
    try:
        deadline = time.time() + 120
        while http.get(f"{api}/deployments/name/ssl-train/gpu").status_code != 200:   # registered by `worker`
            assert time.time() < deadline and all(p.poll() is None for p in procs), logs()
            time.sleep(1)
        fr_id = deployment_run(["prefect"], config, env)
        state = wait_flow_run(api, fr_id, http.get)
        runs_exited(procs)
    finally:
        stop_workers(procs)
    assert state["type"] == "COMPLETED", (state, logs())
    child = pg.query("prefect", "SELECT wp.name, fr.state_type FROM flow_run fr "
                                "JOIN work_queue wq ON wq.id = fr.work_queue_id JOIN work_pool wp ON wp.id = wq.work_pool_id "
                                f"WHERE fr.parent_task_run_id IN (SELECT id FROM task_run WHERE flow_run_id = '{fr_id}')")
    assert child == [["ssl-train-gpu", "COMPLETED"]]   # training ran as its own flow run, on the train pool
    assert {r[0] for r in pg.query("prefect", "SELECT type FROM work_pool WHERE name IN "
                                              "('ssl-pipeline', 'ssl-train-gpu')")} == {"process"}

    # tracked through the authenticating server: the registered model, its files in the bucket
    (train_run,) = pg.query("mlflow", "SELECT run_id FROM model_versions WHERE name = 'compose-gpt' AND version = '1'")
    s3 = boto3.client("s3", endpoint_url=compose_stack["s3_url"], aws_access_key_id="x", aws_secret_access_key="x",
                      region_name="us-east-1")
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=compose_stack["bucket"])
            for o in page.get("Contents", [])]
    assert any(k.endswith("/MLmodel") for k in keys), keys[:50]
    assert any(f"/{train_run[0]}/artifacts/hf_model/" in k for k in keys), keys[:50]
