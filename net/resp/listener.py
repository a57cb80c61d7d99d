"""The RESP server: ``serve_resp`` accepts connections, and one session
per connection reads commands, runs them, and writes their replies.

One nursery per connection holds a reader (the session's own task), one
task per command that needs quorum work, and one writer (the reply queue).
Limits, as on the native server (``net.server``), all of them
back-pressure rather than buffering:

- at most ``max_connections`` RESP connections per node; one more is told
  ``-ERR max number of clients reached`` and closed;
- at most ``max_inflight`` commands per connection between being read and
  their reply being written: past that the reader stops reading, so a client
  that pipelines without bound, or never reads, only fills its own socket
  buffers; at most ``max_inflight`` quorum operations per connection too
  (``Client.ops``: a multi-key command runs its keys through the same
  bound);
- replies written late are bounded by a high-water mark in bytes
  (``reply_queue``), and a client that reads nothing for ``write_timeout``
  seconds is disconnected;
- a command is at most about ``max_frame`` bytes and ``MAX_ARGS``
  arguments, a bulk string at most ``max(max_value, 1024)`` bytes, an inline
  command at most 64 KiB (``parser``); a violation is answered with
  ``-ERR Protocol error: ...`` and the connection is closed, after reading
  and dropping what the client still sends for a moment, so that the error
  is not lost to a reset.

Ordering invariants: replies go out in the order the commands came in; the
commands of one connection on the same key take effect in the order sent
(each job waits for the previous job of the connection on each of its
keys), commands on different keys overlap. A failure of one connection
(a bug included) ends that connection, never the server.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Final

import trio

from net.resp.context import Client, CommandError, Job, RespNode, Server
from net.resp.parser import RespParser
from net.resp.replies import encode_error, show
from net.resp.reply_queue import ReplyQueue, Slot
from net.resp.table import prepare
from net.server import ServerLimits, accept_connections
from register.model import Key

__all__ = ["LINGER", "LINGER_BYTES", "RECEIVE_SIZE", "serve_resp"]

log = logging.getLogger("qkv.resp")

RECEIVE_SIZE: Final = 64 * 1024
#: seconds input is still read (and thrown away) after a protocol error
LINGER: Final = 2.0
LINGER_BYTES: Final = 16 * 1024 * 1024


async def serve_resp(
    listeners: Sequence[trio.SocketListener],
    node: RespNode,
    limits: ServerLimits,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept RESP connections on ``listeners`` until cancelled."""
    server = Server(node, limits)

    async def connection(stream: trio.SocketStream) -> None:
        await _connection(server, stream)

    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(accept_connections, listener, nursery, connection, "RESP")
        task_status.started()


async def _connection(server: Server, stream: trio.SocketStream) -> None:
    async with stream:
        try:
            server.slots.acquire_nowait()
        except trio.WouldBlock:
            with (
                trio.move_on_after(server.limits.write_timeout),
                contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
            ):
                await stream.send_all(encode_error("ERR max number of clients reached"))
            return
        try:
            await _Session(Client(server, next(server.ids), stream)).run()
        except* (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError):
            pass  # the client went away or stopped reading
        except* Exception as group:
            # A bug: it ends this connection, never the node.
            log.error("RESP connection failed", exc_info=group)
        finally:
            server.slots.release()


class _Session:
    """One RESP connection: the reader loop, the jobs, the writer."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.server = client.server
        self.stream = client.stream
        limits = self.server.limits
        self.out = ReplyQueue(client.stream, send_timeout=limits.write_timeout)
        self.commands = trio.Semaphore(limits.max_inflight)
        #: key -> the event set when the last command on it sent here is done
        self.key_tails: dict[Key, trio.Event] = {}

    async def run(self) -> None:
        client = self.client
        parser = RespParser(max_bulk=self.server.max_bulk, max_request=self.server.max_request)
        failed = False
        async with trio.open_nursery() as connection:
            writer_done = trio.Event()

            async def write() -> None:
                try:
                    await self.out.run()
                finally:
                    writer_done.set()
                    connection.cancel_scope.cancel()

            connection.start_soon(write)
            async with trio.open_nursery() as jobs:
                while not client.closing:
                    data = await self.stream.receive_some(RECEIVE_SIZE)
                    if not data:
                        break
                    parser.feed(data)
                    commands, error = parser.commands()
                    for args in commands:
                        await self.commands.acquire()
                        self.dispatch(args, jobs)
                        if client.closing:
                            break
                    if error is not None and not client.closing:
                        self.out.put(encode_error(error.message))
                        client.closing = failed = True
                    await self.out.wait_room()
            # Every job has filled its slot (each runs under the request
            # deadline); flush, then close.
            self.out.close_after_flush()
            await writer_done.wait()
        if failed:
            await self._linger()

    async def _linger(self) -> None:
        """After a protocol error: say we are done writing, and throw away
        what the client still sends, for a short while. Closing with unread
        input would reset the connection, and the client could lose the
        error reply (a SET of an oversized value is still being sent)."""
        await self.stream.send_eof()
        budget = LINGER_BYTES
        with trio.move_on_after(LINGER):
            while budget > 0 and (data := await self.stream.receive_some(RECEIVE_SIZE)):
                budget -= len(data)

    def dispatch(self, args: list[bytes], jobs: trio.Nursery) -> None:
        slot = self.out.reserve(self.commands.release)
        try:
            result = prepare(self.client, args)
        except Exception:
            log.exception("RESP command %r failed", show(args[0], 32))
            result = encode_error("ERR internal error (see the node's log)")
        if isinstance(result, bytes):
            self.out.fill(slot, result)
            return
        keys = list(dict.fromkeys(result.keys))
        waits = [self.key_tails[k] for k in keys if k in self.key_tails]
        done = trio.Event()
        for k in keys:
            self.key_tails[k] = done
        jobs.start_soon(self._job, result, slot, keys, waits, done)

    async def _job(
        self, job: Job, slot: Slot, keys: list[Key], waits: list[trio.Event], done: trio.Event
    ) -> None:
        try:
            for event in waits:
                await event.wait()
            try:
                reply = await job.run()
            except CommandError as exc:
                reply = exc.reply
            except Exception:
                log.exception("RESP command failed")
                reply = encode_error("ERR internal error (see the node's log)")
            self.out.fill(slot, reply)
        finally:
            done.set()
            for k in keys:
                if self.key_tails.get(k) is done:
                    del self.key_tails[k]
