"""A minimal HTTP/1.0 endpoint for Prometheus scrapes (``--metrics``).

``GET /metrics`` (or ``/``) answers the node's metrics in the text
exposition format; anything else gets 404 (405 for other methods). One
request per connection; a client gets ``REQUEST_TIMEOUT`` seconds to send
its request head (at most 8 KiB) and the reply must be taken within
``SEND_TIMEOUT`` seconds, so a stuck scraper never holds a task for long.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import trio

from net.server import accept_connections

__all__ = ["CONTENT_TYPE", "serve_metrics"]

log = logging.getLogger("qkv.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_HEAD = 8 * 1024
REQUEST_TIMEOUT = 5.0
SEND_TIMEOUT = 10.0
MAX_CONNECTIONS = 64


async def serve_metrics(
    listeners: Sequence[trio.SocketListener],
    render: Callable[[], bytes],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer scrapes on ``listeners`` until cancelled."""
    slots = trio.Semaphore(MAX_CONNECTIONS)

    async def connection(stream: trio.SocketStream) -> None:
        try:
            slots.acquire_nowait()
        except trio.WouldBlock:
            await stream.aclose()
            return
        await _answer(stream, render, slots)

    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(accept_connections, listener, nursery, connection, "metrics")
        task_status.started()


async def _answer(stream: trio.SocketStream, render: Callable[[], bytes], slots: trio.Semaphore) -> None:
    try:
        async with stream:
            head = b""
            with trio.move_on_after(REQUEST_TIMEOUT):
                while b"\r\n\r\n" not in head and b"\n\n" not in head and len(head) < MAX_HEAD:
                    data = await stream.receive_some(4096)
                    if not data:
                        break
                    head += data
            parts = head.split(b"\r\n", 1)[0].split(b"\n", 1)[0].split()
            if len(parts) < 2:
                status, body, kind = "400 Bad Request", b"bad request\n", "text/plain"
            elif parts[0] not in (b"GET", b"HEAD"):
                status, body, kind = "405 Method Not Allowed", b"GET /metrics\n", "text/plain"
            elif parts[1].split(b"?", 1)[0] not in (b"/metrics", b"/"):
                status, body, kind = "404 Not Found", b"GET /metrics\n", "text/plain"
            else:
                status, body, kind = "200 OK", render(), CONTENT_TYPE
            reply = (
                f"HTTP/1.0 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
            if parts and parts[0] != b"HEAD":
                reply += body
            with trio.move_on_after(SEND_TIMEOUT):
                await stream.send_all(reply)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass  # the scraper went away
    finally:
        slots.release()
