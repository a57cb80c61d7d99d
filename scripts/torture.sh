#!/usr/bin/env bash
# Long fault-injection run against a subprocess cluster behind proxies:
# kill -9 and restarts, pauses, lost disks, partitions of every shape,
# silent drops and delays, lost replies to clients, while clients run; the
# history is checked for linearizability at the end. See docs/testing.md for
# reading the report.
#
#   scripts/torture.sh --nodes 5 --duration 600 --clients 8 --seed 42 \
#       --report torture/report.txt
#   scripts/torture.sh --nodes 5 --duration 150 --workload mixed   # cas, incr too
#   scripts/torture.sh --help
#
# --workload register|cas-register|counter|mixed chooses the operations
# (register: get/set/delete, the default).
#
# Needs the venv that scripts/test.sh installs (.venv). Exit status: 0
# linearizable and healthy, 1 not linearizable, 2 unhealthy, 3 run failed.
# Relative paths (--report, --workdir) are taken from the current directory.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
if [[ -x "$root/.venv/bin/python" && -x "$root/.venv/bin/qkv" ]]; then
    # the same as `.venv/bin/python -m tests.torture ARGS` run from $root
    exec "$root/.venv/bin/python" -c \
        'import sys; sys.path.insert(0, sys.argv.pop(1)); from tests.torture import main; sys.exit(main())' \
        "$root" "$@"
fi
echo "torture.sh: no .venv with qkv installed here: run scripts/test.sh first" >&2
exit 3
