"""The TCP server: accepts connections and speaks the client protocol.

One nursery per connection holds its reader (this task) and its writer (the
``Outbox``); a request costs no task of its own: the node answers it by a
callback. Limits, all of them back-pressure rather than buffering:

- at most ``max_connections`` connections; one more is told ``unavailable``
  and closed;
- at most ``max_inflight`` requests per connection: past that the reader
  stops reading, so a client pipelining without bound only fills its own
  socket buffers;
- replies not yet written are bounded by the outbox's high-water mark (the
  reader waits for room before it hands on the next request), and a client
  that reads nothing for ``write_timeout`` seconds is disconnected.

Errors on one connection end that connection, never the server. A
connection whose first frame is ``peer_hello`` is handed to the node's peer
session (node-to-node traffic shares the listening port).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import attrs
import trio

from net.codec import FatalRequest, Limits, MalformedMessage, decode_request, encode_reply
from net.errors import QkvError, TooLarge, Unavailable
from net.framing import FrameError, FrameTooLarge
from net.messages import ErrorReply, PeerHello, Reply, Request
from net.stream import FramedReader, Outbox
from net.tls import HANDSHAKE_TIMEOUT

__all__ = ["Handler", "ServerLimits", "ServerStats", "serve"]

log = logging.getLogger("qkv.server")


@attrs.frozen(kw_only=True)
class ServerLimits:
    max_frame: int = 2 * 1024 * 1024
    max_value: int = 1024 * 1024
    max_connections: int = 1024
    max_inflight: int = 256
    write_timeout: float = 30.0


@attrs.define
class ServerStats:
    """Connection counts, for metrics."""

    client_connections: int = 0
    peer_connections: int = 0
    accepted: int = 0


class Handler(Protocol):
    """What the node provides to the server."""

    def submit(self, request: Request, respond: Callable[[Reply], None]) -> None:
        """Start answering one client request; call ``respond`` exactly once
        with the reply, errors included, within the request deadline.
        Never raises."""

    def is_peer(self, node: str) -> bool:
        """Whether ``node`` is a member that may open a peer session."""

    async def serve_peer(self, hello: PeerHello, reader: FramedReader, outbox: Outbox) -> None:
        """Run a node-to-node session on this connection until it ends."""


def error_reply(exc: QkvError) -> ErrorReply:
    return ErrorReply(id=exc.request_id, error=exc.code, message=exc.message)


async def serve(
    listeners: Sequence[trio.SocketListener],
    handler: Handler,
    limits: ServerLimits,
    *,
    stats: ServerStats | None = None,
    ssl_context: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept connections on ``listeners`` until cancelled; ``stats`` (if
    given) is kept up to date. With ``ssl_context`` every connection is TLS,
    and a peer session needs a verified client certificate."""
    slots = trio.Semaphore(limits.max_connections)
    counts = stats if stats is not None else ServerStats()

    async def connection(stream: trio.SocketStream) -> None:
        counts.accepted += 1
        await _connection(stream, handler, limits, slots, counts, ssl_context)

    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(accept_connections, listener, nursery, connection, "client")
        task_status.started()


async def accept_connections(
    listener: trio.SocketListener,
    nursery: trio.Nursery,
    connection: Callable[[trio.SocketStream], Awaitable[object]],
    what: str,
) -> None:
    """Accept on ``listener`` until cancelled, running ``connection`` for
    each new stream in ``nursery``; shared by every listener of a node."""
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                # EMFILE and friends: back off instead of spinning.
                log.warning(
                    "%s accept failed: %s", what, exc, extra={"event": "accept_failed", "error": str(exc)}
                )
                await trio.sleep(0.1)
                continue
            nursery.start_soon(connection, stream)


async def _connection(
    raw: trio.SocketStream,
    handler: Handler,
    limits: ServerLimits,
    slots: trio.Semaphore,
    stats: ServerStats,
    ssl_context: ssl.SSLContext | None,
) -> None:
    async with raw:
        stream: trio.abc.Stream = raw
        # None: no TLS; else whether the client presented a verified certificate
        certified: bool | None = None
        if ssl_context is not None:
            tls = trio.SSLStream(raw, ssl_context, server_side=True)
            try:
                with trio.fail_after(HANDSHAKE_TIMEOUT):
                    await tls.do_handshake()
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError) as exc:
                cause = exc.__cause__ or exc
                log.debug(
                    "TLS handshake failed: %s", cause, extra={"event": "tls_refused", "error": str(cause)}
                )
                return
            stream, certified = tls, bool(tls.getpeercert())
        try:
            slots.acquire_nowait()
        except trio.WouldBlock:
            refusal = Unavailable("too many connections")
            await _send_final(stream, limits, error_reply(refusal))
            return
        held = [True]
        peer = [False]
        stats.client_connections += 1

        def release() -> None:
            # A peer link is not a client: it leaves the client cap.
            if held[0]:
                held[0] = False
                slots.release()
                stats.client_connections -= 1

        def become_peer() -> None:
            release()
            peer[0] = True
            stats.peer_connections += 1

        try:
            await _session(stream, handler, limits, become_peer, certified)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError):
            pass  # the client went away or stopped reading; nothing to answer
        except* (MalformedMessage, FrameError) as group:
            # on a peer session (a client session answers framing errors itself)
            log.warning(
                "closing a peer connection: %s",
                group.exceptions[0],
                extra={"event": "peer_frame_malformed", "error": str(group.exceptions[0])},
            )
        finally:
            release()
            if peer[0]:
                stats.peer_connections -= 1


async def _send_final(stream: trio.abc.SendStream, limits: ServerLimits, reply: ErrorReply) -> None:
    outbox = Outbox(stream, max_frame=limits.max_frame, batch=False, send_timeout=limits.write_timeout)
    outbox.put(encode_reply(reply))
    outbox.close_after_flush()
    await outbox.run()


async def _session(
    stream: trio.abc.Stream,
    handler: Handler,
    limits: ServerLimits,
    leave_client_cap: Callable[[], None],
    certified: bool | None = None,
) -> None:
    reader = FramedReader(stream, limits.max_frame)
    request_limits = Limits(max_value=limits.max_value)
    try:
        bodies = await reader.receive()
    except FrameError as exc:
        await _send_final(stream, limits, _frame_error_reply(exc))
        return
    if not bodies:
        return
    try:
        first = decode_request(bodies[0], request_limits)
    except QkvError:
        first = None  # answered in order by the client session below
    if isinstance(first, PeerHello):
        if not handler.is_peer(first.node):
            await _send_final(
                stream,
                limits,
                ErrorReply(
                    id=first.id,
                    error="bad_request",
                    message=f"{first.node!r} is not a member of this cluster",
                ),
            )
            return
        if certified is False:
            message = "a peer connection needs a TLS client certificate signed by the cluster CA"
            await _send_final(stream, limits, ErrorReply(id=first.id, error="bad_request", message=message))
            return
        leave_client_cap()
        outbox = Outbox(stream, max_frame=limits.max_frame, batch=True, send_timeout=limits.write_timeout)
        reader.unread(bodies[1:])
        await handler.serve_peer(first, reader, outbox)
        return
    await _client_session(
        reader,
        Outbox(stream, max_frame=limits.max_frame, batch=False, send_timeout=limits.write_timeout),
        bodies,
        handler,
        limits,
    )


def _frame_error_reply(exc: FrameError) -> ErrorReply:
    if isinstance(exc, FrameTooLarge):
        return error_reply(TooLarge(str(exc)))
    return ErrorReply(id=None, error="bad_request", message=str(exc))


async def _client_session(
    reader: FramedReader, outbox: Outbox, bodies: list[bytes], handler: Handler, limits: ServerLimits
) -> None:
    request_limits = Limits(max_value=limits.max_value)
    # A slot per request from reading it until its reply is queued: the
    # reader waits for a free slot, and for the queued replies to drain
    # below the outbox's high-water mark (wait_room), which together are
    # the per-connection back-pressure.
    inflight = trio.Semaphore(limits.max_inflight)
    unanswered = 0
    all_answered = trio.Event()

    def respond(reply: Reply) -> None:
        nonlocal unanswered
        outbox.put(encode_reply(reply))
        inflight.release()
        unanswered -= 1
        if not unanswered:
            all_answered.set()

    async with trio.open_nursery() as connection:
        writer_done = trio.Event()

        async def write() -> None:
            try:
                await outbox.run()
            finally:
                writer_done.set()
                connection.cancel_scope.cancel()

        connection.start_soon(write)
        while bodies:
            closing = False
            for body in bodies:
                try:
                    request = decode_request(body, request_limits)
                except QkvError as exc:
                    outbox.put(encode_reply(error_reply(exc)))
                    closing = isinstance(exc, FatalRequest)
                    if closing:
                        break
                    continue
                if isinstance(request, PeerHello):
                    message = "peer_hello must be the first frame of a connection"
                    outbox.put(encode_reply(ErrorReply(id=request.id, error="bad_request", message=message)))
                    continue
                if outbox.full:
                    # Replies are queued faster than the client reads them
                    # (a read can bring thousands of requests).
                    await outbox.wait_room()
                try:
                    # No yield per request while slots are free: a read
                    # brings many requests, and each acquire() would be a
                    # scheduler pass of its own.
                    inflight.acquire_nowait()
                except trio.WouldBlock:
                    await inflight.acquire()
                unanswered += 1
                handler.submit(request, respond)
            if closing:
                break
            await outbox.wait_room()
            try:
                bodies = await reader.receive()
            except FrameError as exc:
                outbox.put(encode_reply(_frame_error_reply(exc)))
                break
        # Every request gets its answer (each runs under the request
        # deadline); then the replies are flushed and the connection closed.
        if unanswered:
            all_answered = trio.Event()  # respond() sees this one
            await all_answered.wait()
        outbox.close_after_flush()
        await writer_done.wait()
