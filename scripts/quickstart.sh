#!/usr/bin/env bash
# Install qkv into .venv, start a local 3-node cluster in the background
# (scripts/cluster.sh), and show a set and a get going through it.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e .
scripts/cluster.sh start 3
export QKV_NODES=127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003
echo "+ qkv set greeting 'hello, world'   (through node 1)"
.venv/bin/qkv set greeting 'hello, world' --nodes 127.0.0.1:7001
echo "+ qkv get greeting                  (through node 3)"
.venv/bin/qkv get greeting --nodes 127.0.0.1:7003
echo
echo
echo "The cluster keeps running: scripts/cluster.sh status | kill n2 | restart n2 | stop"
