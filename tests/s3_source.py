"""WARC files on S3 for the collect stage's tests: a moto S3 server on 127.0.0.1.

Run inside a network namespace that has only loopback (see ``tests/test_sources.py``):

    unshare -n python -m tests.s3_source SITE_DIR OUT.json

starts moto's S3 server, uploads a WARC written by warcio, collects it twice through its
``s3://`` path (the second time as an unchanged file) and writes what came back to OUT.json.
If the S3 client ignored the local endpoint, it could reach no one from in there.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tests.hostile import loopback_up


def main(site_dir: str, out: str) -> None:
    loopback_up()
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    # the standard AWS variables: what a user sets for MinIO, Ceph or any S3-compatible store
    os.environ.update({"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
                       "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"})
    import fsspec

    from tasks.collect import collect
    from tasks.config import CollectConfig
    from tasks.shards import read_table
    from tests.test_sources import write_warc

    work = Path(out).parent
    write_warc(work / "crawl.warc.gz", Path(site_dir))
    s3 = fsspec.filesystem("s3")
    s3.mkdir("corpus")
    s3.put_file(str(work / "crawl.warc.gz"), "corpus/cc/crawl.warc.gz")
    cfg = CollectConfig(warc_files=["s3://corpus/cc/crawl.warc.gz"])
    first = collect(cfg, work / "one")
    second = collect(cfg, work / "two", previous=first)
    Path(out).write_text(json.dumps({
        "kept": [r["url"] for r in read_table(first).to_pylist()],
        "sources": sorted(set(read_table(first)["source"].to_pylist())),
        "reasons": first["reasons"], "signatures": first["signatures"],
        "second_unchanged": second["files_unchanged_rows"], "second_rows": second["rows"]}))
    server.stop()


if __name__ == "__main__":
    main(*sys.argv[1:3])
