"""A three-node cluster across three network namespaces: qkv works between
hosts, not only on 127.0.0.1.

The test makes one namespace per node and a hub namespace holding a
bridge; each node's namespace is linked to the hub by a veth pair, and
gets an address of its own on a private /24. Every node listens on its own
address only, and client commands run inside a node's namespace. Every
namespace (and with it every veth) is removed at the end. Where the
machine does not allow it (not root, no ``ip``, no network namespaces, no
bridge), the test is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from net.address import Address
from tests.support.procs import QKV, ProcCluster, qkv_env

pytestmark = [pytest.mark.subprocess, pytest.mark.timeout(90)]

PORT = 7001


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=check)


@contextlib.contextmanager
def namespaces(tag: str, size: int) -> Iterator[tuple[list[str], list[str]]]:
    """``size`` namespaces bridged through a hub; yields (names, addresses).
    Skips the test if the machine does not allow it."""
    if not sys.platform.startswith("linux"):
        pytest.skip("network namespaces need Linux")
    if shutil.which("ip") is None:
        pytest.skip("the 'ip' command (iproute2) is not installed")
    if os.geteuid() != 0:
        pytest.skip("making network namespaces needs root")
    hub = f"qkv{tag}hub"
    names = [f"qkv{tag}n{i + 1}" for i in range(size)]
    subnet = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
    hosts = [f"{subnet}.{i + 1}" for i in range(size)]
    made: list[str] = []
    try:
        first = ip("netns", "add", hub, check=False)
        if first.returncode != 0:
            pytest.skip(f"'ip netns add' is not permitted here: {first.stderr.strip()}")
        made.append(hub)
        bridge = ip("-n", hub, "link", "add", "br0", "type", "bridge", check=False)
        if bridge.returncode != 0:
            pytest.skip(f"cannot make a bridge in a network namespace: {bridge.stderr.strip()}")
        ip("-n", hub, "link", "set", "br0", "up")
        for i, (name, host) in enumerate(zip(names, hosts, strict=True)):
            ip("netns", "add", name)
            made.append(name)
            inside, outside = f"qkv{tag}v{i}", f"qkv{tag}h{i}"
            ip("link", "add", inside, "type", "veth", "peer", "name", outside)
            ip("link", "set", inside, "netns", name)
            ip("link", "set", outside, "netns", hub)
            ip("-n", hub, "link", "set", outside, "master", "br0")
            ip("-n", hub, "link", "set", outside, "up")
            ip("-n", name, "addr", "add", f"{host}/24", "dev", inside)
            ip("-n", name, "link", "set", inside, "up")
            ip("-n", name, "link", "set", "lo", "up")
        yield names, hosts
    finally:
        for name in reversed(made):
            ip("netns", "del", name, check=False)  # takes its veth ends along


class NetnsCluster(ProcCluster):
    """``qkv serve`` processes, node ``i`` inside namespace ``names[i]``,
    listening on ``hosts[i]``."""

    def __init__(self, root: Path, names: list[str], hosts: list[str]) -> None:
        super().__init__(root, len(names), ports=[PORT] * len(names))
        self.names = names
        self.hosts = hosts

    @property
    def addresses(self) -> list[Address]:
        return [Address(h, PORT) for h in self.hosts]

    def serve_args(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.names[i], *super().serve_args(i)]

    def qkv_in(self, i: int, *args: str) -> subprocess.CompletedProcess[bytes]:
        """Run ``qkv ARGS`` inside node ``i``'s namespace."""
        return subprocess.run(
            ["ip", "netns", "exec", self.names[i], str(QKV), *args],
            capture_output=True,
            timeout=30,
            env=qkv_env(),
            check=False,
        )

    def wait_status(self, i: int, within: float = 30.0) -> dict[str, object]:
        """Poll ``qkv status --json`` from namespace ``i`` until every node serves."""
        deadline = time.monotonic() + within
        last: subprocess.CompletedProcess[bytes] | None = None
        while time.monotonic() < deadline:
            last = self.qkv_in(i, "status", "--json", "--timeout", "1", "--nodes", self.nodes_arg)
            if last.returncode == 0:
                report = json.loads(last.stdout)
                if all(n["state"] == "serving" for n in report["nodes"]):
                    return dict(report)
            time.sleep(0.2)
        raise AssertionError(f"cluster not serving after {within} s: {last}\n{self.logs_tail()}")


def test_a_cluster_across_three_network_namespaces(tmp_path: Path) -> None:
    tag = f"{os.getpid() % 100000}"
    with namespaces(tag, 3) as (names, hosts), NetnsCluster(tmp_path, names, hosts) as cluster:
        # the namespaces really are separate hosts: no node address is local to another
        ping = subprocess.run(
            ["ip", "netns", "exec", names[0], "ip", "-o", "addr"], capture_output=True, text=True, timeout=10
        )
        assert hosts[0] in ping.stdout and hosts[1] not in ping.stdout

        cluster.start_all()
        report = cluster.wait_status(0)
        assert [n["node"] for n in report["nodes"]] == cluster.ids
        assert all(set(n["peers"].values()) == {"up"} for n in report["nodes"])  # type: ignore[union-attr, index]

        done = cluster.qkv_in(0, "set", "across", "hosts", "--nodes", str(cluster.addresses[0]))
        assert done.returncode == 0, done
        got = cluster.qkv_in(2, "get", "across", "--nodes", str(cluster.addresses[2]))
        assert (got.returncode, got.stdout) == (0, b"hosts"), got

        # one host down: the other two still serve
        assert cluster.terminate(1) == 0, cluster.log(1)
        down = cluster.qkv_in(2, "status", "--json", "--nodes", cluster.nodes_arg)
        assert down.returncode == 0, down
        assert [n["up"] for n in json.loads(down.stdout)["nodes"]] == [True, False, True]
        again = cluster.qkv_in(2, "set", "still", "up", "--nodes", str(cluster.addresses[2]))
        assert again.returncode == 0, again
    for name in names:
        assert name not in ip("netns", "list").stdout
