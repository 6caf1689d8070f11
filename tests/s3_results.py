"""Stage results on S3 for the cache tests: a moto S3 server on 127.0.0.1.

Run inside a network namespace that has only loopback (see ``tests/test_e2e.py``):

    unshare -n python -m tests.s3_results WORK_DIR OUT.json

starts moto's S3 server, runs the pipeline twice with ``cache.storage`` on an s3:// bucket
(Prefect's temporary server, MLflow on SQLite, all inside the namespace) and writes the task
states of both runs and the objects in the bucket to OUT.json.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from tests.hostile import loopback_up


def main(work: str, out: str) -> None:
    loopback_up()
    from moto.server import ThreadedMotoServer

    from tests.conftest import BIN
    from tests.test_e2e import write_config

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    work_dir = Path(work)
    config = work_dir / "run.yaml"
    write_config(config, "s3-cache", "s3-cache-gpt", evaluate=False)
    cfg = yaml.safe_load(config.read_text())
    cfg["cache"] = {"storage": "s3://results/ssl-cache",
                    "storage_options": {"client_kwargs": {"endpoint_url": f"http://{host}:{port}"}}}
    config.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_TRACKING_URI": f"sqlite:///{work_dir / 'mlflow.db'}",
           "PREFECT_HOME": str(work_dir / ".prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    import fsspec
    s3 = fsspec.filesystem("s3", client_kwargs={"endpoint_url": f"http://{host}:{port}"}, key="test", secret="test")
    s3.mkdir("results")
    runs = []
    for _ in range(2):
        proc = subprocess.run([str(BIN / "ssl-pipeline"), "run", "--config", str(config)], cwd=work_dir, env=env,
                              capture_output=True, text=True, timeout=600)
        log = proc.stdout + proc.stderr
        runs.append({"rc": proc.returncode, "tail": log[-3000:],
                     "states": dict(re.findall(r"Task run '(\w+)' - Finished in state (\w+)", log))})
    s3.invalidate_cache()
    Path(out).write_text(json.dumps({"runs": runs, "objects": s3.find("results/ssl-cache")}))
    server.stop()


if __name__ == "__main__":
    main(*sys.argv[1:3])
