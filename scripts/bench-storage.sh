#!/usr/bin/env bash
# Group commit check: durable (SQLite, fsync per commit) against in-memory
# set throughput, 64 concurrent clients, one run each, back to back.
#   scripts/bench-storage.sh [DURATION_SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
qkv=${QKV_BIN:-.venv/bin/qkv}
duration=${1:-10}
out=$(mktemp -d)
for storage in memory sqlite; do
    "$qkv" bench --local 3 --storage "$storage" --clients 64 --pipeline 1 --read-ratio 0 \
        --duration "$duration" --warmup 2 --json >"$out/$storage.json"
    python3 - "$storage" "$out/$storage.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[2]))
lat = r["latency_ms"]
print(f"{sys.argv[1]}: {r['ops_per_s']:,.0f} sets/s  p50 {lat['p50']:.1f} ms  p99 {lat['p99']:.1f} ms"
      f"  errors {r['errors'] or 0}  server RSS KiB {r['rss_kib'][-1]['servers']}")
PY
done
python3 - "$out" <<'PY'
import json, sys
m = json.load(open(f"{sys.argv[1]}/memory.json"))["ops_per_s"]
d = json.load(open(f"{sys.argv[1]}/sqlite.json"))["ops_per_s"]
print(f"durable / in-memory: {d / m:.0%}")
PY
rm -rf "$out"
