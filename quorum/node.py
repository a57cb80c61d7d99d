"""A qkv node: replica, peer links, coordinator and server, composed.

    async with open_node(config) as node:
        ...  # serving on node.address until the block exits

Leaving the block (or ``node.shutdown()``) stops the node gracefully: it
stops accepting client requests (new ones get ``shutting_down``), lets the
ones in flight finish within their deadline, keeps serving its peers
meanwhile, then closes its storage.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import attrs
import trio

from net.address import Address
from net.errors import QkvError, ShuttingDown, Unavailable
from net.messages import (
    Cas,
    CasReply,
    Delete,
    ErrorReply,
    Get,
    GetReply,
    Incr,
    IncrReply,
    NodeStats,
    PeerHello,
    Ping,
    PingReply,
    Reply,
    Request,
    Set,
    WriteReply,
)
from net.nursery import open_service_nursery
from net.server import ServerLimits, ServerStats, error_reply, serve
from net.stream import FramedReader, Outbox
from net.tls import TlsFiles, client_context, server_context
from quorum.catch_up import catch_up
from quorum.coordinator import Coordinator
from quorum.faults import FaultSwitches
from quorum.metrics import NodeMetrics
from quorum.peer_service import PeerService, SyncSessions
from quorum.peers import PeerLink
from quorum.protocol.decide import majority
from quorum.protocol.operation import CasResult, Done, IncrResult, Operation
from quorum.replica import Replica
from quorum.stats import RequestStats
from register.model import NodeId, Tag
from register.store import MemoryStore, Store

__all__ = ["Node", "NodeConfig", "open_node"]

log = logging.getLogger("qkv.node")


@attrs.frozen(kw_only=True)
class NodeConfig:
    node_id: NodeId
    listen: Address
    peers: dict[NodeId, Address] = attrs.field(factory=dict)
    #: None: keep everything in memory (tests, benchmarks of the protocol)
    data_dir: Path | None = None
    #: where to serve the Redis protocol (RESP) too; None: not at all
    resp_listen: Address | None = None
    #: where to serve Prometheus metrics over HTTP; None: not at all
    metrics_listen: Address | None = None
    max_frame: int = 2 * 1024 * 1024
    max_value: int = 1024 * 1024
    request_timeout: float = 2.0
    max_connections: int = 1024
    max_inflight: int = 256
    #: the shared cluster secret peers prove at connection set-up; None:
    #: any connection that names a member may open a peer session
    cluster_secret: bytes | None = attrs.field(default=None, repr=False)
    #: TLS for every connection, mutual between peers; None: plain TCP
    tls: TlsFiles | None = None

    @property
    def cluster_size(self) -> int:
        return len(self.peers) + 1

    @property
    def server_limits(self) -> ServerLimits:
        return ServerLimits(
            max_frame=self.max_frame,
            max_value=self.max_value,
            max_connections=self.max_connections,
            max_inflight=self.max_inflight,
        )


def open_store(config: NodeConfig) -> Store:
    """The storage engine the config asks for."""
    if config.data_dir is None:
        return MemoryStore()
    from register.sqlite_store import SqliteStore

    return SqliteStore.open(config.data_dir, config.node_id)


class Node:
    def __init__(self, config: NodeConfig, store: Store, switches: FaultSwitches | None = None) -> None:
        self.config = config
        self.id = config.node_id
        self.switches = switches if switches is not None else FaultSwitches()
        tls = config.tls
        self.server_tls = None if tls is None else server_context(tls)
        peer_tls = None if tls is None else client_context(tls.ca, tls.cert, tls.key)
        self.replica = Replica(config.node_id, store)
        self.links = {
            peer: PeerLink(
                config.node_id,
                peer,
                address,
                max_frame=config.max_frame,
                send_timeout=config.request_timeout * 5,
                secret=config.cluster_secret,
                ssl_context=peer_tls,
            )
            for peer, address in config.peers.items()
        }
        self.coordinator = Coordinator(self.replica, self.links, self.switches, config.request_timeout)
        page_bytes = max(64 * 1024, min(512 * 1024, config.max_frame // 4))
        self.peer_service = PeerService(
            self.replica, self.switches, SyncSessions(page_bytes), secret=config.cluster_secret
        )
        self.address = config.listen
        self.resp_address: Address | None = None
        self.draining = False
        self.requests_in_flight = 0
        #: set when the last request in flight finishes, while a shutdown
        #: waits for that
        self._idle: trio.Event | None = None
        self.stopped = trio.Event()
        self._cancel: trio.CancelScope | None = None
        self.stats = RequestStats(time.monotonic())
        self.server_stats = ServerStats()
        self.metrics = NodeMetrics(self)
        self.replica.on_commit = self.metrics.observe_commit
        self.metrics_address: Address | None = None

    @property
    def state(self) -> str:
        """``stopping``; ``recovering`` (catching up after a new or lost data
        dir); ``isolated`` (cannot reach a majority: its peer links are down,
        for instance just after a start); or ``serving``."""
        if self.draining:
            return "stopping"
        if not self.replica.ready:
            return "recovering"
        reachable = 1 + sum(1 for link in self.links.values() if link.connected)
        return "serving" if reachable >= majority(self.config.cluster_size) else "isolated"

    # --- the server's handler -----------------------------------------------

    def submit(self, request: Request, respond: Callable[[Reply], None]) -> None:
        """Start answering ``request``; ``respond`` is called exactly once
        with the reply (perhaps before this returns). Never raises."""
        if isinstance(request, Ping):
            respond(PingReply(id=request.id, node=self.id, state=self.state, stats=self.node_stats()))
            return
        op_name = _OP_NAMES.get(type(request), "other")
        started = time.monotonic()
        if self.draining:
            refusal = error_reply(ShuttingDown("node is shutting down", request_id=request.id))
            self._answer(op_name, started, refusal, respond)
            return
        if not (self.replica.ready or self.switches.serve_before_catch_up):
            message = f"node {self.id} is recovering (catching up after a new or lost data dir)"
            self._answer(op_name, started, error_reply(Unavailable(message, request_id=request.id)), respond)
            return
        switches = self.switches
        match request:
            case Get(key=key):
                op = Operation.get(key, self.coordinator.nodes, skip_write_back=switches.skip_read_write_back)
            case Set(key=key, value=value, rid=rid):
                op = Operation.set(
                    key, value, self.coordinator.nodes, rid, write_quorum=switches.write_quorum
                )
            case Delete(key=key, rid=rid):
                op = Operation.delete(key, self.coordinator.nodes, rid, write_quorum=switches.write_quorum)
            # A cas or incr without a rid gets one: every round of it carries
            # the rid, so that a round started again never applies it twice.
            case Cas(key=key, expect=expect, value=value, rid=rid):
                op = Operation.cas(key, expect, value, self.coordinator.nodes, rid or _internal_rid())
            case Incr(key=key, by=by, rid=rid):
                op = Operation.incr(key, by, self.coordinator.nodes, rid or _internal_rid())
            case _:
                refusal = ErrorReply(id=request.id, error="bad_request", message="not a client request")
                self._answer(op_name, started, refusal, respond)
                return
        self.requests_in_flight += 1

        def finish(result: Done | QkvError) -> None:
            self.requests_in_flight -= 1
            if not self.requests_in_flight and self._idle is not None:
                self._idle.set()
            self._answer(op_name, started, _reply(request, result), respond)

        self.coordinator.start(op, finish)

    def _answer(self, op_name: str, started: float, reply: Reply, respond: Callable[[Reply], None]) -> None:
        now = time.monotonic()
        outcome = reply.error if isinstance(reply, ErrorReply) else "ok"
        self.stats.record(op_name, outcome, now, now - started)
        respond(reply)

    def node_stats(self) -> NodeStats:
        """This node's numbers, as ``qkv status`` shows them."""
        now = time.monotonic()
        request_rate, error_rate = self.stats.rates(now)
        return NodeStats(
            keys=len(self.replica.state),
            max_counter=self.replica.max_counter,
            requests=self.stats.requests,
            errors=self.stats.errors,
            request_rate=round(request_rate, 3),
            error_rate=round(error_rate, 3),
            uptime=round(now - self.stats.started, 3),
            peers={str(peer): "up" if link.connected else "down" for peer, link in self.links.items()},
        )

    async def handle(self, request: Request) -> Reply:
        """Answer ``request`` (for protocol front ends that await)."""
        replies: list[Reply] = []
        answered = trio.Event()

        def respond(reply: Reply) -> None:
            replies.append(reply)
            answered.set()

        self.submit(request, respond)
        await answered.wait()
        return replies[0]

    def is_peer(self, node: str) -> bool:
        return node in self.links

    async def serve_peer(self, hello: PeerHello, reader: FramedReader, outbox: Outbox) -> None:
        await self.peer_service.serve(hello, reader, outbox, self.state)

    # --- life cycle -------------------------------------------------------------

    async def _run(
        self,
        listeners: Sequence[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        config = self.config
        log.info(
            "node %s starting: listen %s, %d peers, data dir %s",
            config.node_id,
            self.address,
            len(config.peers),
            config.data_dir or "(memory)",
            extra={
                "event": "start",
                "node": config.node_id,
                "listen": str(self.address),
                "peers": ",".join(f"{p}={a}" for p, a in config.peers.items()),
                "data_dir": str(config.data_dir or ""),
            },
        )
        with trio.CancelScope() as self._cancel:
            try:
                async with open_service_nursery() as nursery:
                    await nursery.start(self.replica.run)
                    nursery.start_soon(self.coordinator.run_deadlines)
                    nursery.start_soon(self.coordinator.run_later)
                    for link in self.links.values():
                        nursery.start_soon(link.run)
                    await nursery.start(
                        partial(serve, stats=self.server_stats, ssl_context=self.server_tls),
                        listeners,
                        self,
                        self.config.server_limits,
                    )
                    if self.config.metrics_listen is not None:
                        from net.metrics_http import serve_metrics

                        where = self.config.metrics_listen
                        metrics_listeners = await trio.open_tcp_listeners(where.port, host=where.host)
                        self.metrics_address = Address(
                            where.host, metrics_listeners[0].socket.getsockname()[1]
                        )
                        await nursery.start(serve_metrics, metrics_listeners, self.metrics.render)
                    if self.config.resp_listen is not None:
                        from net.resp import serve_resp

                        resp = self.config.resp_listen
                        resp_listeners = await trio.open_tcp_listeners(resp.port, host=resp.host)
                        self.resp_address = Address(resp.host, resp_listeners[0].socket.getsockname()[1])
                        await nursery.start(serve_resp, resp_listeners, self, self.config.server_limits)
                    nursery.start_soon(catch_up, self.replica, self.links)
                    log.info(
                        "node %s listening on %s, cluster of %d",
                        self.id,
                        self.address,
                        self.config.cluster_size,
                        extra={
                            "event": "listening",
                            "node": self.id,
                            "address": str(self.address),
                            "cluster_size": self.config.cluster_size,
                        },
                    )
                    task_status.started()
            finally:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self.replica.store.close)
                self.stopped.set()
                log.info("node %s stopped", self.id, extra={"event": "stopped", "node": self.id})

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop gracefully: refuse new requests, finish those in flight
        (within ``grace`` seconds, by default the request deadline plus a
        margin), then stop everything."""
        if self._cancel is None or self.stopped.is_set():
            return
        if not self.draining:
            self.draining = True
            log.info(
                "node %s shutting down: %d requests in flight",
                self.id,
                self.requests_in_flight,
                extra={"event": "shutdown", "node": self.id, "in_flight": self.requests_in_flight},
            )
        wait = self.config.request_timeout + 1 if grace is None else grace
        if self.requests_in_flight:
            # Draining: no request starts any more, so once set it stays set.
            if self._idle is None:
                self._idle = trio.Event()
            with trio.move_on_after(wait):
                await self._idle.wait()
        self._cancel.cancel()
        await self.stopped.wait()


@asynccontextmanager
async def open_node(
    config: NodeConfig,
    *,
    store: Store | None = None,
    listeners: Sequence[trio.SocketListener] | None = None,
    switches: FaultSwitches | None = None,
) -> AsyncIterator[Node]:
    """Start a node; stop it gracefully when the block exits.

    ``store`` defaults to the engine ``config`` asks for; ``listeners``
    (already bound sockets) default to listening on ``config.listen``;
    ``switches`` (tests only) break chosen safety rules from the start.
    If ``config.listen`` has port 0, ``node.address`` has the port chosen.
    """
    node = Node(config, store if store is not None else open_store(config), switches)
    if listeners is None:
        try:
            listeners = await trio.open_tcp_listeners(config.listen.port, host=config.listen.host)
        except BaseException:
            node.replica.store.close()
            raise
    node.address = Address(config.listen.host, listeners[0].socket.getsockname()[1])
    async with open_service_nursery() as nursery:
        await nursery.start(node._run, listeners)
        try:
            yield node
        finally:
            with trio.CancelScope(shield=True):
                await node.shutdown()


_OP_NAMES: dict[type, str] = {Get: "get", Set: "set", Delete: "delete", Cas: "cas", Incr: "incr"}


def _internal_rid() -> bytes:
    return secrets.token_bytes(16)


def _reply(request: Request, result: Done | QkvError) -> Reply:
    """The client reply for an operation's result."""
    if isinstance(result, QkvError):
        result.request_id = request.id
        return error_reply(result)
    held = result.result
    if isinstance(held, Tag):
        return WriteReply(id=request.id, tag=held)
    if isinstance(held, IncrResult):
        return IncrReply(id=request.id, value=held.value, tag=held.tag)
    if isinstance(held, CasResult):
        now = held.version
        if now is None:
            return CasReply(id=request.id, swapped=held.swapped, found=False, value=None, tag=None)
        return CasReply(
            id=request.id, swapped=held.swapped, found=not now.deleted, value=now.value, tag=now.tag
        )
    if held is None:
        return GetReply(id=request.id, found=False, value=None, tag=None)
    return GetReply(id=request.id, found=not held.deleted, value=held.value, tag=held.tag)
