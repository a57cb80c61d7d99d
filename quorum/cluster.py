"""A whole local cluster inside one trio program: for tests, ``qkv cluster``
and embedding.

    async with open_cluster(3) as cluster:
        async with cluster.client() as client:
            await client.set(b"k", b"v")
        await cluster.stop(0)       # graceful stop of node n1
        await cluster.start(0)      # back on its own storage
        cluster.wipe(1)             # node n2 loses its disk (when stopped)
        cluster.node(2).replica     # look inside a running node

Every node listens on 127.0.0.1, on a port chosen free when the cluster
opens and kept across restarts. With ``data_dir`` each node stores in
``data_dir/<id>`` (SQLite); without, each node gets a ``MemoryStore`` that
survives its restarts (its "disk") until ``wipe``.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from net.address import Address
from net.client import Client, open_client
from net.nursery import open_service_nursery
from quorum.faults import FaultSwitches
from quorum.node import Node, NodeConfig, open_node, open_store
from register.model import NodeId
from register.store import MemoryStore, Store

__all__ = ["LocalCluster", "open_cluster"]

LOOPBACK = "127.0.0.1"


class LocalCluster:
    def __init__(self, configs: list[NodeConfig], nursery: trio.Nursery) -> None:
        self.configs = configs
        self._nursery = nursery
        self._memory: list[MemoryStore | None] = [
            MemoryStore() if c.data_dir is None else None for c in configs
        ]
        self._nodes: list[Node | None] = [None] * len(configs)
        self._done: list[trio.Event] = [trio.Event() for _ in configs]

    @property
    def size(self) -> int:
        return len(self.configs)

    @property
    def addresses(self) -> list[Address]:
        return [c.listen for c in self.configs]

    @property
    def resp_addresses(self) -> list[Address]:
        """Where each node serves RESP (``open_cluster(resp=True)``)."""
        listens = [c.resp_listen for c in self.configs]
        if any(a is None for a in listens):
            raise RuntimeError("this cluster serves no RESP: open it with resp=True")
        return [a for a in listens if a is not None]

    @property
    def ids(self) -> list[NodeId]:
        return [c.node_id for c in self.configs]

    def node(self, i: int) -> Node:
        node = self._nodes[i]
        if node is None:
            raise RuntimeError(f"node {self.configs[i].node_id} is not running")
        return node

    def running(self, i: int) -> bool:
        return self._nodes[i] is not None

    def memory_store(self, i: int) -> MemoryStore | None:
        return self._memory[i]

    def client(
        self, nodes: list[int] | None = None, *, timeout: float = 5.0
    ) -> AbstractAsyncContextManager[Client]:
        """A fail-over client to the given nodes (default: all)."""
        chosen = range(self.size) if nodes is None else nodes
        return open_client([self.addresses[i] for i in chosen], timeout=timeout)

    async def start(self, i: int, *, switches: FaultSwitches | None = None) -> Node:
        """Start node ``i`` on its storage; ``switches`` (tests only) break
        chosen safety rules from its first moment."""
        if self._nodes[i] is not None:
            raise RuntimeError(f"node {self.configs[i].node_id} is already running")
        self._done[i] = trio.Event()
        node: Node = await self._nursery.start(self._run, i, switches)
        return node

    async def stop(self, i: int, *, grace: float | None = None) -> None:
        """Stop node ``i`` gracefully (``grace=0``: at once, as a crash
        would, though in-process a crash cannot lose acknowledged data)."""
        node = self._nodes[i]
        if node is None:
            return
        await node.shutdown(grace)
        await self._done[i].wait()

    async def restart(self, i: int) -> Node:
        await self.stop(i)
        return await self.start(i)

    def wipe(self, i: int) -> None:
        """Lose node ``i``'s data, as a dead disk would (node stopped)."""
        if self._nodes[i] is not None:
            raise RuntimeError("stop the node before wiping its data")
        data_dir = self.configs[i].data_dir
        if data_dir is None:
            self._memory[i] = MemoryStore()
        else:
            shutil.rmtree(data_dir, ignore_errors=True)

    def _store(self, i: int) -> Store:
        memory = self._memory[i]
        return memory if memory is not None else open_store(self.configs[i])

    async def _run(
        self, i: int, switches: FaultSwitches | None, *, task_status: trio.TaskStatus[Node]
    ) -> None:
        config = self.configs[i]
        try:
            listeners = await trio.open_tcp_listeners(config.listen.port, host=config.listen.host)
            async with open_node(
                config, store=self._store(i), listeners=listeners, switches=switches
            ) as node:
                self._nodes[i] = node
                task_status.started(node)
                await node.stopped.wait()
        finally:
            self._nodes[i] = None
            self._done[i].set()

    async def stop_all(self) -> None:
        async with trio.open_nursery() as nursery:
            for i in range(self.size):
                nursery.start_soon(self.stop, i)


def _free_ports(count: int, avoid: frozenset[int] = frozenset()) -> list[int]:
    """Ports free right now on loopback (bound, read, released), none of
    them in ``avoid``."""
    import socket

    sockets: list[socket.socket] = []
    try:
        while len([s for s in sockets if s.getsockname()[1] not in avoid]) < count:
            s = socket.socket()
            s.bind((LOOPBACK, 0))
            sockets.append(s)
        return [p for p in (s.getsockname()[1] for s in sockets) if p not in avoid]
    finally:
        for s in sockets:
            s.close()


@asynccontextmanager
async def open_cluster(
    size: int = 3,
    *,
    data_dir: Path | None = None,
    ports: list[int] | None = None,
    start: bool = True,
    resp: bool = False,
    resp_ports: list[int] | None = None,
    **overrides: Any,
) -> AsyncIterator[LocalCluster]:
    """Open a ``size``-node cluster on loopback; ``overrides`` are
    ``NodeConfig`` fields shared by all nodes. With ``resp`` (or
    ``resp_ports``) every node serves RESP too, on a port of its own
    (``cluster.resp_addresses``), chosen free unless given."""
    ports = ports if ports is not None else _free_ports(size)
    if resp and resp_ports is None:
        resp_ports = _free_ports(size, avoid=frozenset(ports))
    ids = [NodeId(f"n{i + 1}") for i in range(size)]
    addresses = [Address(LOOPBACK, p) for p in ports]
    per_node: list[dict[str, Any]] = [
        overrides if resp_ports is None else {**overrides, "resp_listen": Address(LOOPBACK, resp_ports[i])}
        for i in range(size)
    ]
    configs = [
        NodeConfig(
            node_id=ids[i],
            listen=addresses[i],
            peers={ids[j]: addresses[j] for j in range(size) if j != i},
            data_dir=None if data_dir is None else data_dir / ids[i],
            **per_node[i],
        )
        for i in range(size)
    ]
    async with open_service_nursery() as nursery:
        cluster = LocalCluster(configs, nursery)
        try:
            if start:
                async with trio.open_nursery() as starting:
                    for i in range(size):
                        starting.start_soon(cluster.start, i)
            yield cluster
        finally:
            with trio.CancelScope(shield=True):
                await cluster.stop_all()
            nursery.cancel_scope.cancel()
