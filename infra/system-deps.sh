#!/usr/bin/env bash
# The Debian packages the test suite needs, installed when missing (as root, with apt-get);
# otherwise one message listing what to install, and a non-zero exit before any test runs.
#   util-linux     unshare: the crawler's safety tests run in loopback-only network namespaces
#   chromium       the browser tests drive the Prefect and MLflow UIs (Playwright, no download)
#   postgresql     initdb / pg_ctl: Prefect and MLflow on PostgreSQL (tests/test_postgres.py)
#   python3-doc    the Python documentation as HTML: a real multi-level site the crawler must crawl whole
set -euo pipefail
need=()
command -v unshare >/dev/null || need+=(util-linux)
command -v chromium >/dev/null || need+=(chromium fonts-liberation)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
ls /usr/share/doc/python3*/html/index.html >/dev/null 2>&1 || need+=(python3-doc)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing the Debian packages the tests need: ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
else
  echo "the tests need these Debian packages: ${need[*]}" >&2
  echo "install them (sudo apt-get install ${need[*]}) and run make test again" >&2
  exit 1
fi
