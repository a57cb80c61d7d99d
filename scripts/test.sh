#!/usr/bin/env bash
# Install qkv with its test dependencies into .venv and run the whole test
# suite. Extra arguments go to pytest (e.g. scripts/test.sh -k cluster).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e '.[test]'
# redis-cli and redis-benchmark for tests/test_resp.py, from Debian's
# redis-tools; best effort: without them those tests are skipped.
if ! command -v redis-cli >/dev/null 2>&1 && [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-tools; } >/dev/null 2>&1 \
        || echo "test.sh: could not install redis-tools; the redis-cli tests will be skipped" >&2
fi
exec .venv/bin/python -m pytest "$@"
