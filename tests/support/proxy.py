"""A controllable TCP proxy for one directed link between two nodes (tests only).

Node A dials node B at the address of B in A's ``--peer`` list. Give A, for
B, the address of a ``Proxy`` whose target is B's real listen address, and
the link A->B (A's requests to B and B's replies to them) runs through the
proxy, where a test can break it:

``cut()``
    Close every connection now and close each new one as soon as it is
    accepted, until ``heal()``: the dialer sees its connection drop and its
    reconnects fail at once (a crashed router, a firewall rejecting).
``blackhole()``
    Stop forwarding: bytes arriving either way are read and dropped, the
    connections stay open, and new connections are accepted but never
    forwarded. Nothing tells the endpoints: requests simply go unanswered
    (a silently dropping network). ``heal()`` then closes those
    connections, whose byte streams have holes, so the dialer reconnects.
``drop_replies()``
    Forward what the dialer sends, drop what comes back: the target gets
    every request and acts on it, the dialer never hears the answer. In
    front of a node, for its clients: a reply lost on its way (a write
    applied, the client left not knowing). ``heal()`` then closes the
    connections that lost replies (their reply streams have holes).
``delay(seconds)``
    Hold every chunk forwarded from now on, both ways, for ``seconds``
    before writing it on; order is kept. ``delay(0)`` stops adding latency.
``heal()``
    Back to a perfect link: forwarding, no added latency.

Run it inside a nursery the caller controls::

    async with open_proxy(target) as proxy:      # its own nursery
        ...                                      # dial proxy.address
    proxy = await nursery.start(Proxy(target).run)

``open_mesh(addresses)`` makes one proxy per directed link of a cluster and
has the partition shapes on top (isolate a node, split into groups, cut one
direction). ``open_fronts(addresses)`` puts one proxy in front of each node
for its clients, so that a client's link to one node can be broken too
(e.g. ``drop_replies``).

Every wait is bounded: dialing the target (``connect_timeout``), writing a
chunk on (``send_timeout``: a receiver that does not read, e.g. a paused
process, gets its connection closed after that long). Reading waits for as
long as the connection is idle, as a network would; cancelling the proxy's
nursery (or leaving ``open_proxy``) ends everything at once.
"""

from __future__ import annotations

import collections
import enum
import itertools
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager

import attrs
import trio

from net.address import Address

__all__ = ["Link", "Mesh", "Mode", "Proxy", "ProxyStats", "open_fronts", "open_mesh", "open_proxy"]

LOOPBACK = "127.0.0.1"
CHUNK = 65536
#: chunks read but not yet written on, per direction (back-pressure beyond)
QUEUE_CHUNKS = 256


class Mode(enum.Enum):
    OPEN = "open"
    CUT = "cut"
    BLACKHOLE = "blackhole"
    #: requests forwarded, replies dropped
    DROP_REPLIES = "drop-replies"


@attrs.define
class ProxyStats:
    accepted: int = 0
    #: connections closed at once (cut) or that could not reach the target
    refused: int = 0
    unreachable: int = 0
    closed_by_fault: int = 0
    bytes_forwarded: int = 0
    bytes_dropped: int = 0
    cuts: int = 0
    blackholes: int = 0
    reply_drops: int = 0
    delays: int = 0


@attrs.define(eq=False)
class _Connection:
    scope: trio.CancelScope
    #: saw a blackhole: its streams have holes; heal() closes it
    tainted: bool
    #: lost replies (drop_replies): heal() closes it too
    lost_replies: bool = False


class Proxy:
    """Forwards connections made to ``address`` on to ``target``."""

    def __init__(
        self,
        target: Address,
        *,
        name: str = "",
        connect_timeout: float = 2.0,
        send_timeout: float = 20.0,
    ) -> None:
        self.target = target
        self.name = name or f"->{target}"
        self.connect_timeout = connect_timeout
        self.send_timeout = send_timeout
        self.stats = ProxyStats()
        self._mode = Mode.OPEN
        self._latency = 0.0
        self._connections: set[_Connection] = set()
        self._address: Address | None = None

    def __repr__(self) -> str:
        return f"<Proxy {self.name} {self._mode.value} +{self._latency:g}s>"

    # --- controls (plain functions: call them from any task) ---

    @property
    def address(self) -> Address:
        if self._address is None:
            raise RuntimeError("the proxy is not listening yet (start its run())")
        return self._address

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def latency(self) -> float:
        return self._latency

    @property
    def connections(self) -> int:
        return len(self._connections)

    def cut(self) -> None:
        """Close every connection; close new ones at once until ``heal()``."""
        self._mode = Mode.CUT
        self.stats.cuts += 1
        for connection in list(self._connections):
            self.stats.closed_by_fault += 1
            connection.scope.cancel()

    def blackhole(self) -> None:
        """Drop every byte, keep connections open, until ``heal()``."""
        if self._mode is Mode.CUT:
            raise RuntimeError(f"{self.name}: heal a cut link before blackholing it")
        self._mode = Mode.BLACKHOLE
        self.stats.blackholes += 1
        for connection in self._connections:
            connection.tainted = True

    def drop_replies(self) -> None:
        """Forward requests, drop every reply, until ``heal()``."""
        if self._mode is not Mode.OPEN:
            raise RuntimeError(f"{self.name}: heal a {self._mode.value} link before dropping its replies")
        self._mode = Mode.DROP_REPLIES
        self.stats.reply_drops += 1

    def delay(self, seconds: float) -> None:
        """Add ``seconds`` of latency to every chunk forwarded from now on."""
        if seconds < 0:
            raise ValueError("a delay is not negative")
        self._latency = float(seconds)
        if seconds:
            self.stats.delays += 1

    def heal(self) -> None:
        """A perfect link again; connections that lost bytes are closed."""
        self._mode = Mode.OPEN
        self._latency = 0.0
        for connection in list(self._connections):
            if connection.tainted or connection.lost_replies:
                self.stats.closed_by_fault += 1
                connection.scope.cancel()

    @property
    def healthy(self) -> bool:
        return self._mode is Mode.OPEN and not self._latency

    # --- running ---

    async def run(self, *, task_status: trio.TaskStatus[Proxy] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on a free loopback port and forward until cancelled."""
        listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
        self._address = Address(LOOPBACK, listeners[0].socket.getsockname()[1])
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self._handle, listeners)
                task_status.started(self)
        finally:
            for listener in listeners:
                with trio.CancelScope(shield=True):
                    await listener.aclose()

    async def _handle(self, inbound: trio.SocketStream) -> None:
        async with inbound:
            self.stats.accepted += 1
            if self._mode is Mode.CUT:
                self.stats.refused += 1
                return
            connection = _Connection(trio.CancelScope(), tainted=self._mode is Mode.BLACKHOLE)
            self._connections.add(connection)
            try:
                with connection.scope:
                    if connection.tainted:
                        # A connection opened into a blackhole goes nowhere.
                        await self._drain(inbound)
                        return
                    try:
                        with trio.fail_after(self.connect_timeout):
                            outbound = await trio.open_tcp_stream(self.target.host, self.target.port)
                    except (OSError, trio.TooSlowError):
                        self.stats.unreachable += 1
                        return
                    async with outbound, trio.open_nursery() as nursery:
                        done = nursery.cancel_scope
                        nursery.start_soon(self._pipe, connection, inbound, outbound, done, False)
                        nursery.start_soon(self._pipe, connection, outbound, inbound, done, True)
            finally:
                self._connections.discard(connection)

    async def _drain(self, stream: trio.SocketStream) -> None:
        try:
            while data := await stream.receive_some(CHUNK):
                self.stats.bytes_dropped += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    async def _pipe(
        self,
        connection: _Connection,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        done: trio.CancelScope,
        replies: bool,
    ) -> None:
        """Forward one direction (``replies``: from the target back to the
        dialer); when it ends (end of stream, an error, a receiver too
        slow), the whole connection ends."""

        def dropped(data: bytes) -> bool:
            if connection.tainted:
                self.stats.bytes_dropped += len(data)
                return True
            if replies and self._mode is Mode.DROP_REPLIES:
                connection.lost_replies = True
                self.stats.bytes_dropped += len(data)
                return True
            return False

        send, receive = trio.open_memory_channel[tuple[float, bytes]](QUEUE_CHUNKS)

        async def write_on() -> None:
            try:
                async for due, data in receive:
                    await trio.sleep_until(due)
                    if dropped(data):
                        continue
                    with trio.fail_after(self.send_timeout):
                        await sink.send_all(data)
                    self.stats.bytes_forwarded += len(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, trio.TooSlowError):
                pass
            finally:
                done.cancel()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(write_on)
                async with send:
                    while data := await source.receive_some(CHUNK):
                        if dropped(data):
                            continue
                        await send.send((trio.current_time() + self._latency, data))
                # end of stream: the writer sends what is queued, then ends
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            done.cancel()


@asynccontextmanager
async def open_proxy(target: Address, **options: object) -> AsyncIterator[Proxy]:
    """A proxy to ``target`` running until the block exits."""
    async with trio.open_nursery() as nursery:
        proxy: Proxy = await nursery.start(Proxy(target, **options).run)  # type: ignore[arg-type]
        try:
            yield proxy
        finally:
            nursery.cancel_scope.cancel()


# --- a cluster's links ---------------------------------------------------------------

Link = tuple[int, int]


class Mesh:
    """One proxy per directed link ``(i, j)`` (node ``i`` dials node ``j``)
    of an ``n``-node cluster; nodes are 0-based indices."""

    def __init__(self, proxies: dict[Link, Proxy], size: int) -> None:
        self.proxies = proxies
        self.size = size

    def proxy(self, i: int, j: int) -> Proxy:
        return self.proxies[(i, j)]

    def peer_address(self, i: int, j: int) -> Address:
        """The address node ``i`` must dial to reach node ``j``."""
        return self.proxies[(i, j)].address

    @property
    def links(self) -> list[Link]:
        return sorted(self.proxies)

    @staticmethod
    def links_of(node: int, size: int) -> list[Link]:
        """Both directions of every link of ``node``."""
        return [link for j in range(size) if j != node for link in ((node, j), (j, node))]

    @staticmethod
    def links_between(groups: Sequence[Iterable[int]]) -> list[Link]:
        """Both directions of every link joining two different groups."""
        sets = [set(g) for g in groups]
        out: list[Link] = []
        for a, b in itertools.permutations(range(len(sets)), 2):
            out += [(i, j) for i in sets[a] for j in sets[b]]
        return sorted(out)

    def cut(self, links: Iterable[Link]) -> None:
        for link in links:
            self.proxies[link].cut()

    def blackhole(self, links: Iterable[Link]) -> None:
        for link in links:
            self.proxies[link].blackhole()

    def delay(self, links: Iterable[Link], seconds: float) -> None:
        for link in links:
            self.proxies[link].delay(seconds)

    def heal(self, links: Iterable[Link] | None = None) -> None:
        for link in self.proxies if links is None else links:
            self.proxies[link].heal()

    def isolate(self, node: int) -> list[Link]:
        links = self.links_of(node, self.size)
        self.cut(links)
        return links

    def partition(self, groups: Sequence[Iterable[int]]) -> list[Link]:
        links = self.links_between(groups)
        self.cut(links)
        return links

    def stats(self) -> dict[str, int]:
        total: collections.Counter[str] = collections.Counter()
        for proxy in self.proxies.values():
            total.update(attrs.asdict(proxy.stats))
        return dict(total)


@asynccontextmanager
async def open_mesh(targets: Sequence[Address], **options: object) -> AsyncIterator[Mesh]:
    """Proxies for every directed link between the nodes listening at
    ``targets``; they listen before the block starts (so their ports can go
    into the nodes' ``--peer`` flags) and stop when it exits."""
    size = len(targets)
    async with trio.open_nursery() as nursery:
        proxies: dict[Link, Proxy] = {}
        for i in range(size):
            for j in range(size):
                if i != j:
                    proxy = Proxy(targets[j], name=f"n{i + 1}->n{j + 1}", **options)  # type: ignore[arg-type]
                    proxies[(i, j)] = await nursery.start(proxy.run)
        try:
            yield Mesh(proxies, size)
        finally:
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_fronts(targets: Sequence[Address], **options: object) -> AsyncIterator[list[Proxy]]:
    """One proxy in front of each node listening at ``targets``, for its
    clients (``fronts[i]`` forwards to node ``i``); they listen before the
    block starts and stop when it exits."""
    async with trio.open_nursery() as nursery:
        fronts: list[Proxy] = []
        for i, target in enumerate(targets):
            proxy = Proxy(target, name=f"clients->n{i + 1}", **options)  # type: ignore[arg-type]
            fronts.append(await nursery.start(proxy.run))
        try:
            yield fronts
        finally:
            nursery.cancel_scope.cancel()
