"""``scripts/cluster.sh`` end to end: start, kill -9 one node, restart it, stop."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import attrs
import pytest

from tests.support.procs import (
    LOOPBACK,
    QKV,
    consecutive_free_ports,
    pid_alive,
    qkv_env,
    run_qkv,
)

pytestmark = pytest.mark.subprocess

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "cluster.sh"


@attrs.frozen
class Done:
    returncode: int
    stdout: str
    stderr: str


class Script:
    """Runs ``cluster.sh`` with its environment; remembers every node pid it
    has seen in the pid files, so the test can kill leftovers."""

    def __init__(self, cluster_dir: Path, base_port: int) -> None:
        self.dir = cluster_dir
        self.base = base_port
        self.env = qkv_env(
            {
                "QKV_CLUSTER_DIR": str(cluster_dir),
                "QKV_BASE_PORT": str(base_port),
                "QKV_BIN": str(QKV),
            }
        )
        self.seen: set[int] = set()

    def __call__(self, *args: str, timeout: float = 60.0) -> Done:
        try:
            done = subprocess.run(
                ["bash", str(SCRIPT), *args],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                env=self.env,
                timeout=timeout,
                check=False,
                text=True,
            )
        finally:
            self.pids()
        return Done(done.returncode, done.stdout, done.stderr)

    def pids(self) -> dict[str, int]:
        """The pid files now (and remember their pids)."""
        found = {}
        for path in sorted(self.dir.glob("n*.pid")):
            with contextlib.suppress(OSError, ValueError):
                found[path.stem] = int(path.read_text().strip())
        self.seen.update(found.values())
        return found

    def address(self, i: int) -> str:
        return f"{LOOPBACK}:{self.base + i - 1}"

    @property
    def nodes(self) -> str:
        return ",".join(self.address(i) for i in (1, 2, 3))

    def kill_leftovers(self) -> list[int]:
        """SIGKILL every node pid ever seen that still runs; returns them."""
        left = [pid for pid in sorted(self.seen | set(self.pids().values())) if pid_alive(pid)]
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return left


def wait_get(script: Script, key: str, nodes: str, expected: bytes, within: float = 20.0) -> None:
    """``qkv get`` until it returns ``expected`` (the cluster may still be
    reconnecting after a restart); bounded."""
    deadline = time.monotonic() + within
    while True:
        got = run_qkv("get", key, "--nodes", nodes, "--timeout", "2")
        if got.returncode == 0 and got.stdout == expected:
            return
        if time.monotonic() >= deadline:
            alive = {node: (pid, pid_alive(pid)) for node, pid in script.pids().items()}
            raise AssertionError(f"get {key} through {nodes}: {got}\n(pid, alive): {alive}\n{logs(script)}")
        time.sleep(0.2)


def logs(script: Script) -> str:
    return "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(script.dir.glob("n*.log"))
    )


def test_cluster_script_start_kill_restart_stop(tmp_path: Path) -> None:
    script = Script(tmp_path / "cluster", consecutive_free_ports(3))
    try:
        started = script("start", "3")
        assert started.returncode == 0, (started, logs(script))
        assert script.nodes in started.stdout
        pids = script.pids()
        assert sorted(pids) == ["n1", "n2", "n3"]
        assert all(pid_alive(pid) for pid in pids.values())
        assert sorted(p.name for p in script.dir.glob("n*.log")) == ["n1.log", "n2.log", "n3.log"]

        value = "scripted ✓ value"
        done = run_qkv("set", "sk", value, "--nodes", script.address(1))
        assert done.returncode == 0, done
        got = run_qkv("get", "sk", "--nodes", script.address(2))
        assert (got.returncode, got.stdout) == (0, value.encode()), got

        # usage errors against the running cluster: a message, no effect
        for bad, message in ((["kill"], "usage"), (["kill", "n9"], "unknown node")):
            done = script(*bad, timeout=20)
            assert done.returncode != 0, done
            assert message in done.stderr.lower(), done
        assert script.pids() == pids

        old_n2 = pids["n2"]
        killed = script("kill", "n2")
        assert killed.returncode == 0, killed
        deadline = time.monotonic() + 10
        while pid_alive(old_n2):
            assert time.monotonic() < deadline, "kill n2 left it running"
            time.sleep(0.05)
        # two of three still serve
        got = run_qkv("get", "sk", "--nodes", f"{script.address(2)},{script.address(1)},{script.address(3)}")
        assert (got.returncode, got.stdout) == (0, value.encode()), got

        status = script("status")
        assert status.returncode == 0, status  # a majority serves
        assert "n2 stopped" in status.stdout
        assert "n1 running" in status.stdout and "n3 running" in status.stdout

        restarted = script("restart", "n2")
        assert restarted.returncode == 0, restarted
        new_n2 = script.pids()["n2"]
        assert new_n2 != old_n2
        assert pid_alive(new_n2), logs(script)
        wait_get(script, "sk", script.address(2), value.encode())

        status = script("status")
        assert status.returncode == 0, status
        assert "n2 running" in status.stdout

        # a second start refuses while the cluster runs
        again = script("start", "3")
        assert again.returncode != 0
        assert again.stderr.strip(), again

        before_stop = script.pids()
        assert sorted(before_stop) == ["n1", "n2", "n3"]
        stopped = script("stop")
        assert stopped.returncode == 0, stopped
        still = [pid for pid in before_stop.values() if pid_alive(pid)]
        assert not still, f"processes still alive after stop: {still}"
        for pid in before_stop.values():
            # os.kill(pid, 0) fails: the process is gone (an exited orphan
            # that PID 1 has not reaped yet still answers; wait, bounded)
            with pytest.raises(ProcessLookupError):
                _wait_gone(pid)
        assert script.pids() == {}
    finally:
        script("stop")
        left = script.kill_leftovers()
        assert not left, f"nodes left running, killed: {left}"


def _wait_gone(pid: int, within: float = 15.0) -> None:
    """Raise ``ProcessLookupError`` once ``os.kill(pid, 0)`` does (bounded:
    ``AssertionError`` if the pid still exists after ``within`` seconds)."""
    deadline = time.monotonic() + within
    while True:
        os.kill(pid, 0)
        assert time.monotonic() < deadline, f"pid {pid} still exists"
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["kill"], "usage"),
        (["kill", "n9"], "unknown node"),
        (["restart"], "usage"),
        (["restart", "x1"], "unknown node"),
        (["logs"], "usage"),
        (["start", "zero"], "positive"),
        (["frobnicate"], "start"),
    ],
)
def test_cluster_script_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    script = Script(tmp_path / "cluster", consecutive_free_ports(3))
    # a size file as left by 'start', so node checks have a cluster to check against
    script.dir.mkdir()
    (script.dir / "size").write_text("3\n")
    try:
        done = script(*args, timeout=20)
        assert done.returncode != 0, done
        assert message in (done.stderr + done.stdout).lower(), done
        assert script.pids() == {}
    finally:
        script.kill_leftovers()


def test_cluster_script_without_a_cluster_says_so(tmp_path: Path) -> None:
    script = Script(tmp_path / "nothing-here", consecutive_free_ports(3))
    for command in (["status"], ["stop"], ["kill", "n1"]):
        done = script(*command, timeout=20)
        assert done.returncode != 0, done
        assert "no cluster" in done.stderr, done
