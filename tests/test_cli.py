"""The ``qkv`` command line, run as real processes (``/work/shared/spec/node-cli.md``).

Client commands against a 3-process cluster, exit statuses and one-line
messages, start-up failures of ``serve``, SIGTERM/SIGINT, ``status``,
``qkv cluster`` and ``--help``; the atomic commands ``cas``, ``incr`` and
``set --if-absent``.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from cli.main import cli as qkv_group
from net.address import Address
from tests.support.procs import (
    LOOPBACK,
    QKV,
    ProcCluster,
    QkvResult,
    consecutive_free_ports,
    free_ports,
    qkv_env,
    run_qkv,
    run_qkv_many,
    started_cluster,
    stop_process,
    wait_serving_addresses,
)

pytestmark = pytest.mark.subprocess

#: results of the one-shot commands, by name, with the data dir each was given
OneShot = dict[str, tuple[QkvResult, Path]]

#: a value with spaces, non-ASCII letters, an emoji and a trailing space
VALUE = "héllo wörld ✓ naïve 🙂 "


def assert_one_line(result: QkvResult, *, code: int) -> str:
    """Exit status ``code``, exactly one line on stderr, no traceback."""
    assert result.returncode == code, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    assert lines[0].strip(), result
    return lines[0]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcCluster]:
    """One 3-process cluster shared by the client tests that do not stop nodes."""
    with started_cluster(tmp_path_factory.mktemp("cli-cluster")) as c:
        yield c


# --- client commands ----------------------------------------------------------------


def test_set_get_delete_round_trip_through_different_nodes(cluster: ProcCluster) -> None:
    key = "greeting key ✓"
    done = run_qkv("set", key, VALUE, "--nodes", cluster.address(0))
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", ""), done

    got = run_qkv("get", key, "--nodes", cluster.address(1))
    assert got.returncode == 0, got
    assert got.stdout == VALUE.encode("utf-8")  # as stored: no newline added
    assert got.stderr == ""

    deleted = run_qkv("delete", key, "--nodes", cluster.address(2))
    assert (deleted.returncode, deleted.stdout, deleted.stderr) == (0, b"", ""), deleted

    gone = run_qkv("get", key, "--nodes", cluster.address(1))
    line = assert_one_line(gone, code=1)
    assert gone.stdout == b""
    assert "not found" in line


def test_get_of_a_key_never_written_exits_1(cluster: ProcCluster) -> None:
    result = run_qkv("get", "never-written", "--nodes", cluster.nodes_arg)
    assert_one_line(result, code=1)
    assert result.stdout == b""


def test_empty_value_round_trips(cluster: ProcCluster) -> None:
    assert run_qkv("set", "empty", "", "--nodes", cluster.address(2)).returncode == 0
    got = run_qkv("get", "empty", "--nodes", cluster.address(0))
    assert (got.returncode, got.stdout) == (0, b""), got


def test_qkv_nodes_environment_variable_is_used_without_nodes_flag(cluster: ProcCluster) -> None:
    env = {"QKV_NODES": cluster.address(2)}
    assert run_qkv("set", "from-env", "env value", env=env).returncode == 0
    got = run_qkv("get", "from-env", env={"QKV_NODES": cluster.address(0)})
    assert (got.returncode, got.stdout) == (0, b"env value"), got


def test_nodes_flag_wins_over_the_environment(cluster: ProcCluster) -> None:
    dead = f"{LOOPBACK}:{free_ports(1)[0]}"
    assert run_qkv("set", "flag-wins", "v", "--nodes", cluster.address(0)).returncode == 0
    got = run_qkv("get", "flag-wins", "--nodes", cluster.address(1), env={"QKV_NODES": dead})
    assert (got.returncode, got.stdout) == (0, b"v"), got


def test_client_fails_over_from_a_dead_address_to_a_live_one(cluster: ProcCluster) -> None:
    dead = f"{LOOPBACK}:{free_ports(1)[0]}"
    done = run_qkv("set", "failover", VALUE, "--nodes", f"{dead},{cluster.address(1)}")
    assert done.returncode == 0, done
    got = run_qkv("get", "failover", "--nodes", f"{dead},{cluster.address(2)}")
    assert (got.returncode, got.stdout) == (0, VALUE.encode()), got
    deleted = run_qkv("delete", "failover", "--nodes", f"{dead},{cluster.address(0)}")
    assert deleted.returncode == 0, deleted


# --- atomic updates: cas, incr, set --if-absent ----------------------------------------


def test_cas_swaps_through_any_node_and_exits_0(cluster: ProcCluster) -> None:
    assert run_qkv("set", "cas-k", "v1", "--nodes", cluster.address(0)).returncode == 0
    swapped = run_qkv("cas", "cas-k", "--expect", "v1", "--value", VALUE, "--nodes", cluster.address(1))
    assert (swapped.returncode, swapped.stdout, swapped.stderr) == (0, b"", ""), swapped
    got = run_qkv("get", "cas-k", "--nodes", cluster.address(2))
    assert (got.returncode, got.stdout) == (0, VALUE.encode()), got


def test_cas_that_does_not_swap_exits_1_and_prints_the_current_value(cluster: ProcCluster) -> None:
    assert run_qkv("set", "cas-no", VALUE, "--nodes", cluster.address(0)).returncode == 0
    missed = run_qkv("cas", "cas-no", "--expect", "other", "--value", "new", "--nodes", cluster.nodes_arg)
    line = assert_one_line(missed, code=1)
    assert "not swapped" in line
    assert missed.stdout == VALUE.encode()  # as get prints it: no newline added
    taken = run_qkv("cas", "cas-no", "--expect-absent", "--value", "new", "--nodes", cluster.nodes_arg)
    assert_one_line(taken, code=1)
    assert taken.stdout == VALUE.encode()
    got = run_qkv("get", "cas-no", "--nodes", cluster.address(1))
    assert (got.returncode, got.stdout) == (0, VALUE.encode()), got


def test_cas_on_an_absent_key(cluster: ProcCluster) -> None:
    missed = run_qkv("cas", "cas-absent", "--expect", "v", "--value", "w", "--nodes", cluster.nodes_arg)
    line = assert_one_line(missed, code=1)
    assert missed.stdout == b"" and "not found" in line
    created = run_qkv("cas", "cas-absent", "--expect-absent", "--value", "", "--nodes", cluster.address(2))
    assert (created.returncode, created.stdout, created.stderr) == (0, b"", ""), created
    got = run_qkv("get", "cas-absent", "--nodes", cluster.address(0))
    assert (got.returncode, got.stdout) == (0, b""), got  # the empty value, found


def test_cas_delete_if_unchanged(cluster: ProcCluster) -> None:
    assert run_qkv("set", "cas-del", "mine", "--nodes", cluster.address(0)).returncode == 0
    kept = run_qkv("cas", "cas-del", "--expect", "theirs", "--delete", "--nodes", cluster.address(1))
    assert_one_line(kept, code=1)
    assert kept.stdout == b"mine"
    deleted = run_qkv("cas", "cas-del", "--expect", "mine", "--delete", "--nodes", cluster.address(1))
    assert (deleted.returncode, deleted.stdout, deleted.stderr) == (0, b"", ""), deleted
    assert_one_line(run_qkv("get", "cas-del", "--nodes", cluster.address(2)), code=1)


def test_set_if_absent_writes_once(cluster: ProcCluster) -> None:
    first = run_qkv("set", "once", VALUE, "--if-absent", "--nodes", cluster.address(0))
    assert (first.returncode, first.stdout, first.stderr) == (0, b"", ""), first
    second = run_qkv("set", "once", "later", "--if-absent", "--nodes", cluster.address(1))
    assert_one_line(second, code=1)
    assert second.stdout == VALUE.encode()
    got = run_qkv("get", "once", "--nodes", cluster.address(2))
    assert (got.returncode, got.stdout) == (0, VALUE.encode()), got
    # after a delete the key is absent again
    assert run_qkv("delete", "once", "--nodes", cluster.address(0)).returncode == 0
    again = run_qkv("set", "once", "again", "--if-absent", "--nodes", cluster.address(1))
    assert again.returncode == 0, again


def test_incr_prints_each_new_value_in_decimal(cluster: ProcCluster) -> None:
    steps = [([], b"1\n"), (["5"], b"6\n"), (["-10"], b"-4\n"), (["0"], b"-4\n"), (["--", "-6"], b"-10\n")]
    for i, (by, printed) in enumerate(steps):
        result = run_qkv("incr", "counter", "--nodes", cluster.address(i % 3), *by)
        assert (result.returncode, result.stdout, result.stderr) == (0, printed, ""), (by, result)
    # options after a negative BY still parse
    result = run_qkv("incr", "counter", "-1", "--nodes", cluster.address(0), "--timeout", "5")
    assert (result.returncode, result.stdout) == (0, b"-11\n"), result
    got = run_qkv("get", "counter", "--nodes", cluster.address(2))
    assert (got.returncode, got.stdout) == (0, b"-11"), got


def test_incr_of_a_non_integer_exits_1_and_changes_nothing(cluster: ProcCluster) -> None:
    assert run_qkv("set", "text", "05", "--nodes", cluster.address(0)).returncode == 0
    result = run_qkv("incr", "text", "--nodes", cluster.address(1))
    line = assert_one_line(result, code=1)
    assert result.stdout == b"" and "not_integer" in line
    got = run_qkv("get", "text", "--nodes", cluster.address(2))
    assert (got.returncode, got.stdout) == (0, b"05"), got


def test_incr_overflow_exits_1(cluster: ProcCluster) -> None:
    top = str(2**63 - 1)
    assert run_qkv("set", "top", top, "--nodes", cluster.address(0)).returncode == 0
    result = run_qkv("incr", "top", "--nodes", cluster.address(1))
    assert "not_integer" in assert_one_line(result, code=1)
    assert run_qkv("get", "top", "--nodes", cluster.address(2)).stdout == top.encode()


# --- status -------------------------------------------------------------------------------


def test_status_all_up_exits_0(cluster: ProcCluster) -> None:
    table = run_qkv("status", "--nodes", cluster.nodes_arg)
    assert table.returncode == 0, table
    text = table.stdout.decode()
    for i in range(3):
        assert cluster.ids[i] in text and cluster.address(i) in text
    quiet = run_qkv("status", "--quiet", "--nodes", cluster.nodes_arg)
    assert (quiet.returncode, quiet.stdout) == (0, b""), quiet


def test_status_json_shape(cluster: ProcCluster) -> None:
    result = run_qkv("status", "--json", "--nodes", cluster.nodes_arg)
    assert result.returncode == 0, result
    report = json.loads(result.stdout)
    assert set(report) == {"nodes", "reachable", "needed", "majority_reachable", "majority_serving"}
    assert report["majority_serving"] is True and report["majority_reachable"] is True
    assert (report["reachable"], report["needed"]) == (3, 2)
    assert [n["address"] for n in report["nodes"]] == [cluster.address(i) for i in range(3)]
    assert [n["node"] for n in report["nodes"]] == cluster.ids
    assert all(n["state"] == "serving" and n["up"] is True for n in report["nodes"])
    for n in report["nodes"]:
        assert set(n) == set(STATUS_NODE_KEYS)
        assert isinstance(n["keys"], int) and isinstance(n["max_counter"], int)
        assert isinstance(n["request_rate"], float | int) and isinstance(n["errors"], int)
        assert set(n["peers"]) == set(cluster.ids) - {n["node"]}


STATUS_NODE_KEYS = (
    "address", "node", "up", "state", "error", "keys", "max_counter", "requests", "errors",
    "request_rate", "error_rate", "uptime", "peers",
)  # fmt: skip


def test_signals_stop_nodes_with_exit_0_and_status_reports_the_loss(tmp_path: Path) -> None:
    with started_cluster(tmp_path, extra_args=["--request-timeout", "0.5"]) as c:
        assert run_qkv("set", "k", "v", "--nodes", c.nodes_arg).returncode == 0
        # SIGTERM and SIGINT both stop a serving node gracefully, exit 0
        # (within 10 s: a generous bound only a hang breaks)
        assert c.terminate(0, sig=signal.SIGTERM, within=10) == 0, c.log(0)

        # one node of three down: still a majority, exit 0, the table says who
        one_down = run_qkv("status", "--json", "--nodes", c.nodes_arg)
        assert one_down.returncode == 0, one_down
        report = json.loads(one_down.stdout)
        assert (report["majority_serving"], report["majority_reachable"], report["reachable"]) == (
            True,
            True,
            2,
        )
        assert [n["up"] for n in report["nodes"]] == [False, True, True]
        assert report["nodes"][0]["keys"] is None and report["nodes"][0]["error"]
        assert report["nodes"][1]["keys"] == 1 and report["nodes"][1]["max_counter"] >= 1
        assert report["nodes"][1]["peers"] == {"n1": "down", "n3": "up"}
        table = run_qkv("status", "--nodes", c.nodes_arg)
        assert table.returncode == 0 and b"DOWN" in table.stdout and b"majority serving: yes" in table.stdout

        assert c.terminate(1, sig=signal.SIGINT, within=10) == 0, c.log(1)
        for i in (0, 1):
            assert "Traceback" not in c.log(i)

        down = run_qkv("status", "--json", "--nodes", c.nodes_arg)
        assert down.returncode == 3, down
        report = json.loads(down.stdout)
        assert report["majority_serving"] is False and report["majority_reachable"] is False
        assert [n["up"] for n in report["nodes"]] == [False, False, True]
        # the last node is up but cannot reach a majority: it says so
        assert [n["state"] for n in report["nodes"]] == ["unreachable", "unreachable", "isolated"]
        assert report["nodes"][0]["error"] and report["nodes"][2]["error"] is None

        assert run_qkv("status", "--quiet", "--nodes", c.nodes_arg).returncode == 3

        # with one node of three, a client request is unavailable: exit 3
        unavailable = run_qkv("get", "k", "--nodes", c.address(2), "--timeout", "5")
        assert_one_line(unavailable, code=3)

        assert c.terminate(2, within=10) == 0, c.log(2)


# --- failures: one line, right exit status --------------------------------------------


UNREACHABLE_COMMANDS = {
    "get": ["get", "k"],
    "set": ["set", "k", "v"],
    "delete": ["delete", "k"],
    "cas": ["cas", "k", "--expect", "v", "--value", "w"],
    "incr": ["incr", "k", "-3"],
    "set --if-absent": ["set", "k", "v", "--if-absent"],
}

USAGE_CASES = [
    "get without KEY",
    "unknown command",
    "--nodes without a port",
    "--nodes empty",
    "--timeout zero",
    "cas without --expect or --expect-absent",
    "cas with --expect and --expect-absent",
    "cas without --value or --delete",
    "cas with both --value and --delete",
    "cas without KEY",
    "incr with a BY that is not an integer",
    "incr with a BY outside 64 bits",
    "incr with an unknown option",
    "incr with an unknown option for KEY",
    "serve --peer without =",
    "serve --peer bad address",
    "serve --peer with own id",
    "serve bad --id",
    "serve bad --listen",
    "serve without --data-dir",
]


def _usage_args(case: str, listen: str, data: str) -> list[str]:
    serve = ["serve", "--id", "n1", "--listen", listen]
    return {
        "get without KEY": ["get"],
        "unknown command": ["frobnicate", "k"],
        "--nodes without a port": ["get", "k", "--nodes", "nohost"],
        "--nodes empty": ["status", "--nodes", ","],
        "--timeout zero": ["get", "k", "--timeout", "0"],
        "cas without --expect or --expect-absent": ["cas", "k", "--value", "v"],
        "cas with --expect and --expect-absent": [
            "cas",
            "k",
            "--expect",
            "a",
            "--expect-absent",
            "--delete",
        ],
        "cas without --value or --delete": ["cas", "k", "--expect-absent"],
        "cas with both --value and --delete": ["cas", "k", "--expect", "a", "--value", "b", "--delete"],
        "cas without KEY": ["cas", "--expect-absent", "--delete"],
        "incr with a BY that is not an integer": ["incr", "k", "1.5"],
        "incr with a BY outside 64 bits": ["incr", "k", str(-(2**63) - 1)],
        "incr with an unknown option": ["incr", "k", "-5", "--bogus"],
        "incr with an unknown option for KEY": ["incr", "--nodse", "127.0.0.1:1"],
        "serve --peer without =": [*serve, "--peer", "n2", "--data-dir", data],
        "serve --peer bad address": [*serve, "--peer", "n2=nohost", "--data-dir", data],
        "serve --peer with own id": [*serve, "--peer", f"n1={LOOPBACK}:1", "--data-dir", data],
        "serve bad --id": ["serve", "--id", "no spaces!", "--listen", listen, "--data-dir", data],
        "serve bad --listen": ["serve", "--id", "n1", "--listen", "nohost", "--data-dir", data],
        "serve without --data-dir": serve,
    }[case]


#: the top level and every command the group has (new ones included)
HELP_COMMANDS = ["qkv", *sorted(qkv_group.commands)]


@pytest.fixture(scope="module")
def one_shot(tmp_path_factory: pytest.TempPathFactory) -> OneShot:
    """Every short command that needs no running node, run concurrently
    (Python start-up dominates each); by name, with the data dir it was
    given (if any)."""
    tmp = tmp_path_factory.mktemp("one-shot")
    commands: dict[str, list[str]] = {}
    dirs: dict[str, Path] = {}
    dead = ",".join(f"{LOOPBACK}:{p}" for p in free_ports(2))
    for name, args in UNREACHABLE_COMMANDS.items():
        commands[f"unreachable {name}"] = [*args, "--nodes", dead]
    listen = f"{LOOPBACK}:{free_ports(1)[0]}"
    for i, case in enumerate(USAGE_CASES):
        dirs[case] = tmp / f"usage-{i}" / "data"
        commands[case] = _usage_args(case, listen, str(dirs[case]))
    for command in HELP_COMMANDS:
        commands[f"help {command}"] = [*([] if command == "qkv" else [command]), "--help"]
    # a serve that wrongly started would be killed by the timeout (and fail)
    results = run_qkv_many(commands, timeout=20)
    return {name: (result, dirs.get(name, tmp / "none")) for name, result in results.items()}


@pytest.mark.parametrize("command", list(UNREACHABLE_COMMANDS))
def test_unreachable_nodes_exit_3_with_one_line(command: str, one_shot: OneShot) -> None:
    result, _ = one_shot[f"unreachable {command}"]
    assert_one_line(result, code=3)
    assert result.stdout == b""


@pytest.mark.parametrize("case", USAGE_CASES)
def test_usage_errors_exit_2_with_one_line(case: str, one_shot: OneShot) -> None:
    result, data = one_shot[case]
    assert_one_line(result, code=2)
    assert result.stdout == b""
    assert not data.exists(), "a rejected serve must not create its data dir"


def test_serve_on_a_port_in_use_fails_with_one_line_naming_the_address(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        address = f"{LOOPBACK}:{taken.getsockname()[1]}"
        result = run_qkv(
            "serve", "--id", "n1", "--listen", address, "--data-dir", tmp_path / "n1", timeout=20
        )
    assert result.returncode != 0, result
    line = assert_one_line(result, code=result.returncode)
    assert "in use" in line
    assert address in line, f"the message should name the address in use: {line!r}"


def test_serve_with_data_dir_below_a_regular_file_fails_with_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    listen = f"{LOOPBACK}:{free_ports(1)[0]}"
    result = run_qkv("serve", "--id", "n1", "--listen", listen, "--data-dir", blocker / "data", timeout=20)
    assert result.returncode != 0, result
    line = assert_one_line(result, code=result.returncode)
    assert "data dir" in line
    assert blocker.read_text() == "not a directory"


def test_serve_on_the_data_dir_of_another_node_fails_with_one_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    # a one-node cluster is ready at once; its data dir then belongs to n1
    port = free_ports(1)[0]
    with subprocess.Popen(
        [str(QKV), "serve", "--id", "n1", "--listen", f"{LOOPBACK}:{port}", "--data-dir", str(data)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=qkv_env(),
    ) as proc:
        try:
            trio.run(wait_serving_addresses, [Address(LOOPBACK, port)], 20.0)
            assert run_qkv("set", "k", "v", "--nodes", f"{LOOPBACK}:{port}").returncode == 0
        finally:
            code = stop_process(proc)
        assert code == 0

    listen = f"{LOOPBACK}:{free_ports(1)[0]}"
    result = run_qkv("serve", "--id", "n2", "--listen", listen, "--data-dir", data, timeout=20)
    assert result.returncode != 0, result
    line = assert_one_line(result, code=result.returncode)
    assert "n1" in line and "n2" in line


# --- qkv cluster ------------------------------------------------------------------------


def test_qkv_cluster_serves_and_stops_on_sigint(tmp_path: Path) -> None:
    data = tmp_path / "cluster"
    log_path = tmp_path / "cluster.log"
    for _attempt in range(5):
        base = consecutive_free_ports(3)
        addresses = [Address(LOOPBACK, base + k) for k in range(3)]
        with (
            log_path.open("wb") as log,
            subprocess.Popen(
                [str(QKV), "cluster", "--size", "3", "--base-port", str(base), "--data-dir", str(data)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=qkv_env(),
                start_new_session=True,
            ) as proc,
        ):
            try:
                try:
                    trio.run(wait_serving_addresses, addresses, 20.0)
                except AssertionError:
                    if proc.poll() is not None and "in use" in log_path.read_text():
                        continue  # a port was taken meanwhile: try another base
                    raise
                nodes = ",".join(str(a) for a in addresses)
                assert run_qkv("set", "ck", VALUE, "--nodes", str(addresses[0])).returncode == 0
                got = run_qkv("get", "ck", "--nodes", str(addresses[2]))
                assert (got.returncode, got.stdout) == (0, VALUE.encode()), got
                assert run_qkv("status", "--quiet", "--nodes", nodes).returncode == 0

                proc.send_signal(signal.SIGINT)
                code = proc.wait(timeout=10)
            finally:
                stop_process(proc)
        log_text = log_path.read_text()
        assert code == 0, log_text
        assert "Traceback" not in log_text
        assert sorted(p.name for p in data.iterdir()) == ["n1", "n2", "n3"]
        return
    pytest.fail("could not find 3 consecutive free ports for qkv cluster")


@pytest.mark.parametrize("taken", [1, 2], ids=["one port taken", "two ports taken"])
def test_qkv_cluster_with_ports_in_use_fails_with_one_line(tmp_path: Path, taken: int) -> None:
    """cli/serve.py: start-up failures are one line on stderr and exit 1 —
    also when several nodes of ``qkv cluster`` fail at once."""
    base = consecutive_free_ports(3)
    sockets = []
    try:
        for k in range(1, 1 + taken):  # nodes n2 (and n3) cannot listen
            s = socket.socket()
            sockets.append(s)
            s.bind((LOOPBACK, base + k))
            s.listen()
        result = run_qkv(
            "cluster", "--size", "3", "--base-port", str(base), "--data-dir", tmp_path / "c", timeout=30
        )
    finally:
        for s in sockets:
            s.close()
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if not line.startswith("ts=")]  # not log lines
    assert len(errors) == 1, errors
    assert errors[0].startswith("qkv:") and "in use" in errors[0], errors


# --- help ---------------------------------------------------------------------------------


@pytest.mark.parametrize("command", HELP_COMMANDS)
def test_help_exits_0(command: str, one_shot: OneShot) -> None:
    result, _ = one_shot[f"help {command}"]
    assert result.returncode == 0, result
    assert b"Usage:" in result.stdout
    assert "Traceback" not in result.stderr
