#!/usr/bin/env bash
# Run a local qkv cluster in the background: one process per node, a pid
# file and a log per node, all under $QKV_CLUSTER_DIR.
#
#   scripts/cluster.sh start [N]     start N nodes (default 3), wait until they serve
#   scripts/cluster.sh status        which nodes run, and what the cluster says
#   scripts/cluster.sh kill NODE     kill -9 one node (e.g. n2)
#   scripts/cluster.sh restart NODE  (re)start one node on its own data dir
#   scripts/cluster.sh stop          SIGTERM every node, wait for them to exit
#   scripts/cluster.sh logs NODE     print a node's log
#
# Environment: QKV_CLUSTER_DIR (default .qkv-cluster), QKV_BASE_PORT (default
# 7001; node i listens on 127.0.0.1:BASE+i-1), QKV_BIN (default: the
# project's .venv/bin/qkv, else qkv on PATH), QKV_SERVE_ARGS (extra flags),
# QKV_RESP_BASE_PORT (unset: no RESP; set: node i also serves the Redis
# protocol on 127.0.0.1:RESP_BASE+i-1, see docs/resp.md).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dir=${QKV_CLUSTER_DIR:-$root/.qkv-cluster}
base=${QKV_BASE_PORT:-7001}
resp_base=${QKV_RESP_BASE_PORT:-}
[[ -z "$resp_base" || "$resp_base" =~ ^[0-9]+$ ]] || { echo "cluster.sh: QKV_RESP_BASE_PORT must be a port number" >&2; exit 1; }
if [[ -n "${QKV_BIN:-}" ]]; then qkv=$QKV_BIN
elif [[ -x "$root/.venv/bin/qkv" ]]; then qkv=$root/.venv/bin/qkv
else qkv=qkv; fi

die() { echo "cluster.sh: $*" >&2; exit 1; }
size() { [[ -f "$dir/size" ]] || die "no cluster in $dir (run: $0 start)"; cat "$dir/size"; }
port_of() { echo $((base + ${1#n} - 1)); }
pid_of() { [[ -f "$dir/$1.pid" ]] && cat "$dir/$1.pid" || true; }
alive() { local pid; pid=$(pid_of "$1"); [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; }
nodes_list() { local n i; n=$(size); for ((i = 1; i <= n; i++)); do printf '127.0.0.1:%s%s' $((base + i - 1)) $([[ $i -lt $n ]] && echo ,); done; }
check_node() { [[ "$1" =~ ^n[0-9]+$ ]] && (( ${1#n} >= 1 && ${1#n} <= $(size) )) || die "unknown node '$1' (nodes are n1..n$(size))"; }

start_node() {
    local id=$1 n i peers=() resp=()
    n=$(size)
    alive "$id" && die "$id is already running (pid $(pid_of "$id"))"
    for ((i = 1; i <= n; i++)); do
        [[ "n$i" == "$id" ]] || peers+=(--peer "n$i=127.0.0.1:$((base + i - 1))")
    done
    [[ -z "$resp_base" ]] || resp=(--resp-listen "127.0.0.1:$((resp_base + ${id#n} - 1))")
    # shellcheck disable=SC2086
    nohup "$qkv" serve --id "$id" --listen "127.0.0.1:$(port_of "$id")" "${peers[@]}" "${resp[@]}" \
        --data-dir "$dir/$id/data" ${QKV_SERVE_ARGS:-} >>"$dir/$id.log" 2>&1 </dev/null &
    echo $! >"$dir/$id.pid"
}

wait_serving() {
    local deadline=$((SECONDS + ${1:-20}))
    until "$qkv" status --nodes "$(nodes_list)" --quiet >/dev/null 2>&1; do
        (( SECONDS < deadline )) || die "cluster not serving after ${1:-20} s; see the logs in $dir"
        sleep 0.2
    done
}

stop_node() {
    local id=$1 pid
    pid=$(pid_of "$id")
    if alive "$id"; then
        kill -TERM "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && { echo "$id did not stop in 10 s; killing" >&2; kill -KILL "$pid"; }
    fi
    rm -f "$dir/$id.pid"
}

cmd=${1:-}
case "$cmd" in
start)
    n=${2:-3}
    [[ "$n" =~ ^[0-9]+$ ]] && (( n >= 1 )) || die "start: N must be a positive number"
    if [[ -f "$dir/size" ]]; then
        for ((i = 1; i <= $(size); i++)); do alive "n$i" && die "a cluster is already running in $dir (stop it first)"; done
    fi
    mkdir -p "$dir"
    echo "$n" >"$dir/size"
    for ((i = 1; i <= n; i++)); do start_node "n$i"; done
    wait_serving 30
    echo "cluster of $n nodes serving; QKV_NODES=$(nodes_list)"
    [[ -z "$resp_base" ]] || echo "RESP on 127.0.0.1 ports $resp_base..$((resp_base + n - 1)) (redis-cli -p $resp_base)"
    ;;
stop)
    n=$(size)
    for ((i = 1; i <= n; i++)); do stop_node "n$i" & done
    wait
    echo "cluster stopped"
    ;;
status)
    n=$(size)
    for ((i = 1; i <= n; i++)); do
        if alive "n$i"; then echo "n$i running (pid $(pid_of "n$i"), port $(port_of "n$i"))"
        else echo "n$i stopped"; fi
    done
    exec "$qkv" status --nodes "$(nodes_list)"
    ;;
kill)
    [[ $# -eq 2 ]] || die "usage: $0 kill NODE"
    check_node "$2"
    alive "$2" || die "$2 is not running"
    pid=$(pid_of "$2")
    kill -KILL "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && die "$2 (pid $pid) is still there 5 s after kill -9"
    rm -f "$dir/$2.pid"
    echo "$2 killed"
    ;;
restart)
    [[ $# -eq 2 ]] || die "usage: $0 restart NODE"
    check_node "$2"
    stop_node "$2"
    start_node "$2"
    deadline=$((SECONDS + 30))
    until "$qkv" status --nodes "127.0.0.1:$(port_of "$2")" --quiet >/dev/null 2>&1; do
        alive "$2" || die "$2 exited at start; see $dir/$2.log"
        (( SECONDS < deadline )) || die "$2 not serving 30 s after restart; see $dir/$2.log"
        sleep 0.2
    done
    echo "$2 restarted and serving (pid $(pid_of "$2"))"
    ;;
logs)
    [[ $# -eq 2 ]] || die "usage: $0 logs NODE"
    check_node "$2"
    cat "$dir/$2.log"
    ;;
*)
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
    [[ -z "$cmd" || "$cmd" == -h || "$cmd" == --help ]] && exit 0
    exit 2
    ;;
esac
