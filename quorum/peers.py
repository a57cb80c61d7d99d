"""Outbound links to peers: one long-lived connection per peer.

A ``PeerLink`` dials its peer, introduces itself with ``peer_hello``, then
carries this node's peer requests (queries, stores, sync pages) and their
replies. Requests are matched to replies by ``req``; the coordinator uses
one ``req`` for all links of a phase, so a phase's message is encoded once
and the same bytes go to every peer.

A link never makes anyone wait for it: while it is down, or its outbox is
over its limit (a slow peer), ``send`` fails the request at once, and the
phase goes on with the other nodes. When the connection breaks, every
request waiting on it fails at once. It reconnects with exponential backoff.

Whoever sends a request is its ``ReplyWaiter``: the link calls its
``peer_reply`` with the reply, or with ``None`` when the request failed. A
waiter is an object rather than a callback so that an operation waiting on
every peer of a phase needs no closure per peer.
"""

from __future__ import annotations

import logging
import ssl
from typing import Protocol

import trio

from net.address import Address
from net.codec import (
    MalformedMessage,
    decode_peer_message,
    decode_reply,
    encode_peer_auth,
    encode_request,
    split_peer_frame,
)
from net.framing import FrameError, encode_frame
from net.messages import PeerHello, PeerResponse, PingReply
from net.stream import FramedReader, Outbox
from net.tls import wrap_client
from quorum.peer_auth import acceptor_proof, dialer_proof, new_nonce, proof_ok
from register.model import NodeId

__all__ = ["PeerLink", "ReplyWaiter"]

log = logging.getLogger("qkv.peers")


class ReplyWaiter(Protocol):
    def peer_reply(self, node: NodeId, req: int, reply: PeerResponse | None) -> None:
        """The reply of ``node`` to request ``req``; ``None``: it failed."""


CONNECT_TIMEOUT = 1.0
BACKOFF_MIN, BACKOFF_MAX = 0.05, 2.0


class PeerLink:
    def __init__(
        self,
        me: NodeId,
        peer: NodeId,
        address: Address,
        *,
        max_frame: int,
        send_timeout: float,
        outbox_limit: int = 32 * 1024 * 1024,
        secret: bytes | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._secret = secret
        self._ssl_context = ssl_context
        self.me = me
        self.peer = peer
        self.address = address
        self._max_frame = max_frame
        self._send_timeout = send_timeout
        self._outbox_limit = outbox_limit
        self._outbox: Outbox | None = None
        self._pending: dict[int, ReplyWaiter] = {}
        self.up = trio.Event()
        self.peer_state = "unknown"

    @property
    def connected(self) -> bool:
        return self._outbox is not None

    def send(self, req: int, encoded: bytes, waiter: ReplyWaiter) -> bool:
        """Send an encoded request; ``waiter`` gets the reply, or ``None``
        if the link fails first. Returns False (having given ``waiter``
        ``None``) when the request cannot be sent now."""
        outbox = self._outbox
        if outbox is None or outbox.queued_bytes > self._outbox_limit:
            waiter.peer_reply(self.peer, req, None)
            return False
        self._pending[req] = waiter
        outbox.put(encoded)
        return True

    def forget(self, req: int) -> None:
        """Drop interest in a reply (its phase is decided or timed out)."""
        self._pending.pop(req, None)

    async def run(self) -> None:
        """Keep the link up until cancelled."""
        backoff = BACKOFF_MIN
        while True:
            try:
                await self._session()
            except* _LINK_ERRORS as group:
                level = logging.WARNING if self.up.is_set() else logging.DEBUG
                log.log(
                    level,
                    "peer %s (%s) down: %s",
                    self.peer,
                    self.address,
                    _first(group),
                    extra={
                        "event": "peer_down" if self.up.is_set() else "peer_connect_failed",
                        "peer": self.peer,
                        "address": str(self.address),
                        "error": _first(group),
                    },
                )
            finally:
                was_up = self.up.is_set()
                self._drop_session()
            backoff = BACKOFF_MIN if was_up else min(backoff * 2, BACKOFF_MAX)
            await trio.sleep(backoff)

    def _drop_session(self) -> None:
        self._outbox = None
        if self.up.is_set():
            # Waiters on a never-set event must keep it: it is the one that
            # the next successful connection sets.
            self.up = trio.Event()
        pending, self._pending = self._pending, {}
        for req, waiter in pending.items():
            waiter.peer_reply(self.peer, req, None)

    async def _session(self) -> None:
        with trio.fail_after(CONNECT_TIMEOUT):
            raw = await trio.open_tcp_stream(self.address.host, self.address.port)
        stream: trio.abc.Stream = raw
        if self._ssl_context is not None:
            try:
                stream = await wrap_client(raw, self._ssl_context, self.address.host)
            except BaseException:
                await raw.aclose()
                raise
        async with stream:
            reader = FramedReader(stream, self._max_frame)
            secret = self._secret
            nonce = None if secret is None else new_nonce()
            with trio.fail_after(CONNECT_TIMEOUT):
                await stream.send_all(
                    encode_frame(encode_request(PeerHello(id=0, node=self.me, nonce=nonce)))
                )
                bodies = await reader.receive()
            if not bodies:
                raise _HandshakeFailed("closed during handshake")
            hello = decode_reply(bodies[0], PingReply)
            if not isinstance(hello, PingReply):
                raise _HandshakeFailed(f"refused: {hello.error}: {hello.message}")
            if hello.node != self.peer:
                raise _HandshakeFailed(f"{self.address} is node {hello.node!r}, expected {self.peer!r}")
            if secret is not None:
                assert nonce is not None
                if hello.nonce is None or not proof_ok(
                    acceptor_proof(secret, nonce, hello.nonce, self.me, self.peer), hello.proof
                ):
                    raise _HandshakeFailed(f"{self.peer} did not prove the cluster secret")
                proof = dialer_proof(secret, nonce, hello.nonce, self.me, self.peer)
                with trio.fail_after(CONNECT_TIMEOUT):
                    await stream.send_all(encode_frame(encode_peer_auth(proof)))
            reader.unread(bodies[1:])
            self.peer_state = hello.state
            outbox = Outbox(stream, max_frame=self._max_frame, batch=True, send_timeout=self._send_timeout)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(outbox.run)
                self._outbox = outbox
                self.up.set()
                log.info(
                    "peer %s (%s) up",
                    self.peer,
                    self.address,
                    extra={"event": "peer_up", "peer": self.peer, "address": str(self.address)},
                )
                await self._read_replies(reader)
                nursery.cancel_scope.cancel()

    async def _read_replies(self, reader: FramedReader) -> None:
        pending, peer = self._pending, self.peer
        while True:
            bodies = await reader.receive()
            if not bodies:
                raise trio.BrokenResourceError("peer closed the connection")
            for body in bodies:
                for raw in split_peer_frame(body):
                    req = raw[1]
                    waiter = pending.pop(req, None)
                    if waiter is None:
                        continue  # a straggler of a phase that is over: not even decoded
                    try:
                        message = decode_peer_message(raw)
                    except MalformedMessage:
                        waiter.peer_reply(peer, req, None)
                        raise  # the link is dropped, failing the others
                    waiter.peer_reply(peer, req, message)  # type: ignore[arg-type]


class _HandshakeFailed(Exception):
    pass


_LINK_ERRORS = (
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
    FrameError,
    MalformedMessage,
    _HandshakeFailed,
)


def _first(group: BaseExceptionGroup[BaseException]) -> str:
    """The first leaf error of a group, for a one-line log message."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return str(exc) or type(exc).__name__
