"""Clients of the wire protocol.

``Connection``: one pipelined connection to one node. Any number of tasks
may call ``request`` at once; requests are written in the order called and
replies, which may come back in any order, are matched by ``id``.

``Client``: the cluster client behind the ``qkv`` command and the tests. It
tries the nodes in turn until one completes the request. A set, delete,
cas or incr gets a random request id (``rid``) once, and every retry of it
carries the same rid, so a retry returns the first attempt's result instead
of writing twice (or, for an incr, adding twice) whenever the first attempt
reached a majority. A definite error (``bad_request``, ``not_integer``, ...)
is raised at once, without trying another node.
"""

from __future__ import annotations

import itertools
import secrets
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import attrs
import trio

from net.address import Address
from net.codec import MalformedMessage, encode_request, structure_reply, unpack_reply
from net.errors import PeerUnavailable, ShuttingDown, Unavailable, error_for_code
from net.framing import FrameError
from net.messages import (
    Cas,
    CasReply,
    Delete,
    ErrorReply,
    Get,
    GetReply,
    Incr,
    IncrReply,
    Ping,
    PingReply,
    Request,
    Set,
    WriteReply,
)
from net.nursery import open_service_nursery
from net.stream import FramedReader, Outbox
from net.tls import wrap_client
from register.model import Key, Tag

__all__ = [
    "CasResult",
    "Client",
    "Connection",
    "GetResult",
    "IncrResult",
    "open_client",
    "open_connection",
]

T = TypeVar("T")

DEFAULT_MAX_FRAME = 2 * 1024 * 1024
#: the range of ``incr``'s ``by`` and of the integers it stores (signed 64-bit)
MIN_INT64 = -(2**63)
MAX_INT64 = 2**63 - 1
CONNECT_TIMEOUT = 2.0
SEND_TIMEOUT = 30.0


class Connection:
    def __init__(self, stream: trio.abc.Stream, address: Address, max_frame: int) -> None:
        self.address = address
        self._reader = FramedReader(stream, max_frame)
        # Requests go out through one writer task, so that requests made
        # at the same moment by many tasks share one send.
        self._outbox = Outbox(stream, max_frame=max_frame, batch=False, send_timeout=SEND_TIMEOUT)
        self._ids = itertools.count(1)
        self._waiting: dict[int, tuple[trio.Event, list[dict[str, Any]]]] = {}
        self._broken: BaseException | None = None

    async def request(self, request: Request, expected: type[T]) -> T:
        """Send ``request`` and wait for its reply; raise the ``QkvError``
        of an error reply, ``PeerUnavailable`` if the connection fails."""
        if self._broken is not None:
            raise PeerUnavailable(f"{self.address}: connection broken: {self._broken}")
        request = attrs.evolve(request, id=next(self._ids))
        arrived = trio.Event()
        slot: list[dict[str, Any]] = []
        self._waiting[request.id] = (arrived, slot)
        try:
            await self._outbox.wait_room()
            self._outbox.put(encode_request(request))
            await arrived.wait()
        finally:
            self._waiting.pop(request.id, None)
        if not slot:
            raise PeerUnavailable(f"{self.address}: connection broken: {self._broken}")
        try:
            reply = structure_reply(slot[0], expected)
        except MalformedMessage as exc:
            raise PeerUnavailable(f"{self.address}: {exc}") from None
        if isinstance(reply, ErrorReply):
            raise error_for_code(reply.error, reply.message, reply.id)
        return reply

    @property
    def usable(self) -> bool:
        return self._broken is None

    def _fail(self, exc: BaseException) -> None:
        if self._broken is None:
            self._broken = exc
        for arrived, _ in self._waiting.values():
            arrived.set()

    async def _write_requests(self) -> None:
        try:
            await self._outbox.run()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, trio.TooSlowError) as exc:
            self._fail(exc)

    async def _read_replies(self) -> None:
        try:
            while True:
                bodies = await self._reader.receive()
                if not bodies:
                    raise trio.BrokenResourceError("the node closed the connection")
                for body in bodies:
                    raw = unpack_reply(body)
                    rid = raw.get("id")
                    if type(rid) is not int:
                        # A connection-level error (id nil): it is about to
                        # close; every request on it is answered by it.
                        raise _ConnectionError(raw)
                    waiting = self._waiting.get(rid)
                    if waiting is not None:
                        waiting[1].append(raw)
                        waiting[0].set()
        except _ConnectionError as exc:
            for arrived, slot in self._waiting.values():
                slot.append(exc.body)
                arrived.set()
            self._fail(exc)
        except (
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            OSError,
            FrameError,
            MalformedMessage,
        ) as exc:
            self._fail(exc)
        finally:
            self._fail(trio.ClosedResourceError("connection closed"))


class _ConnectionError(Exception):
    def __init__(self, reply: dict[str, Any]) -> None:
        super().__init__("connection-level error from the node")
        self.body = reply


@asynccontextmanager
async def open_connection(
    address: Address,
    *,
    max_frame: int = DEFAULT_MAX_FRAME,
    connect_timeout: float = CONNECT_TIMEOUT,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[Connection]:
    try:
        with trio.fail_after(connect_timeout):
            raw = await trio.open_tcp_stream(address.host, address.port)
    except (OSError, trio.TooSlowError) as exc:
        raise PeerUnavailable(f"{address}: cannot connect: {exc or 'timed out'}") from None
    stream: trio.abc.Stream = raw
    if ssl_context is not None:
        try:
            stream = await wrap_client(raw, ssl_context, address.host)
        except (trio.BrokenResourceError, trio.TooSlowError, OSError) as exc:
            await raw.aclose()
            cause = exc.__cause__ or exc or "timed out"
            raise PeerUnavailable(f"{address}: TLS handshake failed: {cause}") from None
    async with stream, open_service_nursery() as nursery:
        connection = Connection(stream, address, max_frame)
        nursery.start_soon(connection._read_replies)
        nursery.start_soon(connection._write_requests)
        try:
            yield connection
        finally:
            nursery.cancel_scope.cancel()


@attrs.frozen
class GetResult:
    found: bool
    value: bytes | None
    tag: Tag | None


@attrs.frozen
class CasResult:
    """What a cas did: ``swapped`` if it took effect; either way ``found``,
    ``value`` and ``tag`` describe what the key holds now, as a get would
    (after a swap, what the cas wrote)."""

    swapped: bool
    found: bool
    value: bytes | None
    tag: Tag | None


@attrs.frozen
class IncrResult:
    """The key's value after an incr, and the tag it is stored under."""

    value: int
    tag: Tag


class Client:
    """Fail-over client over a list of nodes (use ``open_client``)."""

    def __init__(
        self,
        nodes: Sequence[Address],
        nursery: trio.Nursery,
        *,
        timeout: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.ssl_context = ssl_context
        if not nodes:
            raise ValueError("a client needs at least one node address")
        self.nodes = list(nodes)
        self.timeout = timeout
        self._nursery = nursery
        self._connections: dict[Address, Connection] = {}
        self._closers: dict[Address, trio.CancelScope] = {}
        self._locks: dict[Address, trio.Lock] = {}
        self._preferred = 0

    async def ping(self, address: Address) -> PingReply:
        connection = await self._connect(address)
        with trio.fail_after(self.timeout):
            return await connection.request(Ping(id=0), PingReply)

    async def get(self, key: bytes) -> GetResult:
        reply = await self._call(Get(id=0, key=Key(key)), GetReply)
        return GetResult(reply.found, reply.value, reply.tag)

    async def set(self, key: bytes, value: bytes, *, rid: bytes | None = None) -> Tag:
        rid = rid or secrets.token_bytes(16)
        return (await self._call(Set(id=0, key=Key(key), value=value, rid=rid), WriteReply)).tag

    async def delete(self, key: bytes, *, rid: bytes | None = None) -> Tag:
        rid = rid or secrets.token_bytes(16)
        return (await self._call(Delete(id=0, key=Key(key), rid=rid), WriteReply)).tag

    async def cas(
        self, key: bytes, expect: bytes | None, value: bytes | None, *, rid: bytes | None = None
    ) -> CasResult:
        """If ``key`` holds ``expect`` (``None``: not found), store ``value``
        (``None``: delete it), in one atomic step. Not swapping is a
        result, not an error: the result then shows the current state."""
        rid = rid or secrets.token_bytes(16)
        request = Cas(id=0, key=Key(key), expect=expect, value=value, rid=rid)
        reply = await self._call(request, CasReply)
        return CasResult(reply.swapped, reply.found, reply.value, reply.tag)

    async def incr(self, key: bytes, by: int = 1, *, rid: bytes | None = None) -> IncrResult:
        """Add ``by`` (signed 64-bit, may be negative or zero) to the
        canonical decimal integer ``key`` holds (not found counts as 0);
        raise ``NotInteger``, having changed nothing, if it holds anything
        else or the sum leaves the signed 64-bit range."""
        if not MIN_INT64 <= by <= MAX_INT64:
            raise ValueError(f"incr: by={by} is outside the signed 64-bit range")
        rid = rid or secrets.token_bytes(16)
        reply = await self._call(Incr(id=0, key=Key(key), by=by, rid=rid), IncrReply)
        return IncrResult(reply.value, reply.tag)

    async def _call(self, request: Request, expected: type[T]) -> T:
        """Try each node once, starting with the one that last answered.

        Only an attempt of unknown or no outcome on that node (unavailable,
        shutting_down, a broken connection, no answer in time) moves on to
        the next node, with the same request and so the same rid; any
        other error reply (``bad_request``, ``not_integer``, ...) is raised
        as it came."""
        errors: list[str] = []
        for i in range(len(self.nodes)):
            index = (self._preferred + i) % len(self.nodes)
            address = self.nodes[index]
            try:
                connection = await self._connect(address)
                # The node answers unavailable within its own deadline; the
                # margin only covers a node that stopped answering at all.
                with trio.fail_after(self.timeout):
                    reply = await connection.request(request, expected)
            except (Unavailable, ShuttingDown) as exc:
                errors.append(f"{address}: {exc.code}: {exc.message}")
                continue
            except (PeerUnavailable, trio.TooSlowError) as exc:
                errors.append(
                    str(exc) if isinstance(exc, PeerUnavailable) else f"{address}: no answer in time"
                )
                self._disconnect(address)
                continue
            self._preferred = index
            return reply
        raise Unavailable("no node could complete the request (" + "; ".join(errors) + ")")

    async def _connect(self, address: Address) -> Connection:
        async with self._locks.setdefault(address, trio.Lock()):
            connection = self._connections.get(address)
            if connection is not None and connection.usable:
                return connection
            self._disconnect(address)
            return await self._dial(address)

    async def _dial(self, address: Address) -> Connection:
        ready: trio.Event = trio.Event()
        outcome: list[Connection | BaseException] = []

        async def hold() -> None:
            with trio.CancelScope() as scope:
                self._closers[address] = scope
                try:
                    timeout = min(CONNECT_TIMEOUT, self.timeout)
                    async with open_connection(
                        address, connect_timeout=timeout, ssl_context=self.ssl_context
                    ) as c:
                        outcome.append(c)
                        ready.set()
                        await trio.sleep_forever()
                except PeerUnavailable as exc:
                    outcome.append(exc)
                    ready.set()

        self._nursery.start_soon(hold)
        try:
            await ready.wait()
        except BaseException:
            self._disconnect(address)
            raise
        result = outcome[0]
        if isinstance(result, BaseException):
            raise result
        self._connections[address] = result
        return result

    def _disconnect(self, address: Address) -> None:
        self._connections.pop(address, None)
        closer = self._closers.pop(address, None)
        if closer is not None:
            closer.cancel()


@asynccontextmanager
async def open_client(
    nodes: Sequence[Address],
    *,
    timeout: float = 5.0,  # noqa: ASYNC109 - a limit per attempt, not a deadline of this call
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[Client]:
    """A fail-over client; ``timeout`` bounds each attempt on one node;
    with ``ssl_context`` (see ``net.tls.client_context``) it speaks TLS."""
    async with open_service_nursery() as nursery:
        client = Client(nodes, nursery, timeout=timeout, ssl_context=ssl_context)
        try:
            yield client
        finally:
            nursery.cancel_scope.cancel()
