"""The crawler against a hostile website, inside a network namespace that has only loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.hostile import EXPECTED


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, site_dir):
    out = tmp_path_factory.mktemp("hostile") / "result.json"
    proc = subprocess.run(["unshare", "-n", sys.executable, "-m", "tests.hostile", str(site_dir), str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("path, reason", sorted(EXPECTED.items()))
def test_each_hostile_endpoint_ends_as_its_expected_record(hostile, path, reason):
    url = hostile["base"] + path
    if reason is None:
        assert url in hostile["kept"], hostile["dropped"].get(url)
    else:
        assert hostile["dropped"].get(url) == reason


def test_private_addresses_are_refused_before_any_connection(hostile):
    assert hostile["dropped"]["http://10.1.2.3/direct.html"] == "blocked_address"
    assert hostile["dropped"]["http://127.0.0.2:9/other-loopback.html"] == "blocked_address"
    # the redirect to a private address was asked for once and never followed
    assert len(hostile["hits"]["/to-private.html"]) == 1


def test_lying_charsets_are_decoded_right(hostile):
    for path in ("ok.html", "latin1-label.html", "utf8-label.html", "utf16.html"):
        assert "François Pinard" in hostile["kept"][hostile["base"] + path], path
    assert "heapq" in hostile["kept"][hostile["base"] + "invalid-utf8.html"]


def test_retries_back_off_and_honour_retry_after(hostile):
    assert len(hostile["hits"]["/flapping.html"]) == 3
    assert len(hostile["hits"]["/always-500.html"]) == 3            # 1 try + 2 retries, then given up
    first, second = hostile["hits"]["/rate-limited.html"]
    assert second - first >= 1.0                                     # Retry-After: 1 was honoured


def test_a_time_limit_is_retried_only_where_asking_again_can_help(hostile):
    """A server that never answered may answer next time; a body that was arriving when a limit
    fired would arrive as slowly again. The message names the limit that fired."""
    hits, errors, base = hostile["hits"], hostile["errors"], hostile["base"]
    assert len(hits["/stall-headers.html"]) == 3                      # 1 try + 2 retries
    assert "read_timeout_s (2 s" in errors[base + "stall-headers.html"]
    assert "before any byte" in errors[base + "stall-headers.html"]
    assert len(hits["/stall-body.html"]) == 1
    assert "read_timeout_s (2 s" in errors[base + "stall-body.html"]
    assert len(hits["/slow-drip.html"]) == 1                          # not 3 x timeout_s
    assert "timeout_s (3 s for the whole request)" in errors[base + "slow-drip.html"]
    assert "bytes of the body had arrived" in errors[base + "slow-drip.html"]


def test_a_sites_housekeeping_files_are_not_documents(hostile):
    assert hostile["dropped"][hostile["base"] + "robots.txt"] == "not_document"
    assert len(hostile["hits"]["/robots.txt"]) == 1                   # read once, for its rules


def test_how_each_page_was_decoded_is_kept_with_it(hostile):
    charsets, base = hostile["charsets"], hostile["base"]
    assert charsets[base + "ok.html"] == ["utf-8", "http", 0]
    assert charsets[base + "latin1-label.html"][:2] == ["utf-8", "utf8"]   # the bytes beat the label
    assert charsets[base + "utf16.html"][:2] == ["utf-16", "bom"]
    assert charsets[base + "utf8-label.html"][0] == "cp1252"
    charset, _, replaced = charsets[base + "invalid-utf8.html"]
    assert charset == "utf-8" and replaced == 6                        # three "\xff\xfe" pairs


def test_nothing_hangs_past_its_time_limit(hostile):
    assert hostile["seconds"] < 20
    assert hostile["manifest"]["rows"] + hostile["manifest"]["dropped"] == len(EXPECTED) + 2


def test_the_guard_checks_the_address_every_connection_goes_to(site_url):
    """The check is made where the socket is opened, on the address it is opened to, so a request
    that skips the crawler's own steps, or a name that resolves anew, cannot get past it. Loopback
    only: the addresses tried here are this machine's, whatever the guard does."""
    import asyncio

    import httpx

    from tasks.crawler import AddressGuard, Refused, guarded_transport

    async def get(url: str, allow: list[str]) -> int:
        transport = guarded_transport(AddressGuard(allow), httpx.Limits(max_connections=2))
        async with httpx.AsyncClient(transport=transport) as client:
            return (await client.get(url)).status_code

    for host in ("127.0.0.1", "localhost"):
        with pytest.raises(Refused, match="non-public address") as e:
            asyncio.run(get(site_url.replace("127.0.0.1", host) + "json.html", []))
        assert e.value.reason == "blocked_address"
    assert asyncio.run(get(site_url + "json.html", ["127.0.0.1/32"])) == 200


def test_only_the_embedded_site_name_leads_to_its_loopback_port(site_url):
    """The embedded site is crawled as http://pydoc.localhost/ and reached on the port it is served
    on, with nothing allowlisted; that one name and port lead there, nothing else: the served
    address itself, the name on another port, another .localhost name all meet the guard as before,
    and no name outside .localhost (nor a served address off loopback) can be mapped at all."""
    import asyncio

    import httpx

    from tasks.crawler import AddressGuard, Refused, guarded_transport, local_routes
    from tasks.pydoc_site import ORIGIN

    routes = local_routes({ORIGIN: site_url})

    async def get(url: str) -> int:
        transport = guarded_transport(AddressGuard([]), httpx.Limits(max_connections=2), routes)
        async with httpx.AsyncClient(transport=transport) as client:
            return (await client.get(url)).status_code

    assert asyncio.run(get(ORIGIN + "json.html")) == asyncio.run(get("http://PYDOC.localhost:80/")) == 200
    for url in (site_url + "json.html", "http://pydoc.localhost:8080/json.html", "http://other.localhost/"):
        with pytest.raises(Refused) as e:
            asyncio.run(get(url))
        assert e.value.reason in ("blocked_address", "dns_error"), url
    port = site_url.rsplit(":", 1)[1]
    for origin, served in (("http://docs.python.org/", site_url), ("https://pydoc.localhost/", site_url),
                           ("http://pydoc.localhost/lib/", site_url), ("http://localhost.example.com/", site_url),
                           (ORIGIN, f"http://10.0.0.1:{port}"), (ORIGIN, f"http://localhost:{port}/"),
                           (ORIGIN, "http://127.0.0.1/")):
        with pytest.raises(ValueError):
            local_routes({origin: served})
