"""Frames over a trio stream: a reader, and an outbox per connection.

``FramedReader`` turns received chunks into whole frame bodies, decoding
every frame that a read brought in (many per read under load).

``Outbox`` is the only writer of a connection. Producers ``put`` encoded
messages without blocking; everything queued leaves in one write: many
replies per write for clients, and for peer links many messages per frame
as well (``batch=True``). A frame never exceeds ``max_frame``; a message too
big to share a frame travels alone. Producers that could outrun the network
wait on ``wait_room`` first, which bounds the memory one connection can take
(back-pressure, never an unbounded buffer).

When a write happens: on loopback, and more so in a VM, a ``send`` is the
most expensive thing a request does (the kernel runs the receiver's side of
TCP and wakes its process), far dearer than a scheduler pass. So nothing is
written while the event loop still has tasks to run: a plain TCP outbox is
written by the loop's ``_Flusher`` just before the loop waits for I/O (its
``before_io_wait`` hook, what Redis calls beforeSleep), carrying everything
that the tasks of that pass queued for the connection. That costs no task
switch and no extra pass: a reply read, handled and answered in one pass
leaves at the end of it. Only a write the socket cannot take whole (a slow
reader) wakes the outbox's writer task, which waits for the socket and
finishes it; until then the writer owns the connection's output.

TLS connections go through their ``SSLStream``, which only a task can
drive: their writer task waits for an idle scheduler (trio's
``wait_all_tasks_blocked``, at most ``COALESCING_DELAY``) and then sends.

Reads are direct too: a read is tried at once on the non-blocking socket,
and only when it would block does the task wait for the socket
(``wait_readable``).
"""

from __future__ import annotations

import os
import threading

import trio
import trio.testing

from net.codec import peer_frame_header, peer_frame_overhead
from net.framing import HEADER_SIZE, FrameDecoder, frame_header

__all__ = ["FramedReader", "Outbox", "send_now", "wait_to_coalesce"]

RECEIVE_SIZE = 64 * 1024
#: the longest queued messages wait for the scheduler to go idle before
#: they are sent anyway (a node that never idles still answers promptly)
COALESCING_DELAY = 0.002
#: reads a reader may take in a row without yielding to other tasks (a
#: read that finds data returns at once; one that would block waits)
READS_PER_YIELD = 8


def _socket_of(stream: trio.abc.SendStream | trio.abc.ReceiveStream) -> trio.socket.SocketType | None:
    """The socket under a plain TCP stream (``None`` for TLS and others)."""
    return stream.socket if isinstance(stream, trio.SocketStream) else None


def _fileno(sock: trio.socket.SocketType) -> int:
    fd = sock.fileno()
    if fd < 0:
        raise trio.ClosedResourceError("the connection is closed")
    return fd


class FramedReader:
    def __init__(self, stream: trio.abc.ReceiveStream, max_frame: int) -> None:
        self._stream = stream
        self._socket = _socket_of(stream)
        self._decoder = FrameDecoder(max_frame)
        self._pending: list[bytes] = []
        self._reads_in_a_row = 0

    def unread(self, bodies: list[bytes]) -> None:
        """Give back bodies already taken, to be returned first."""
        self._pending = bodies + self._pending

    async def receive(self) -> list[bytes]:
        """The next frame bodies (at least one); ``[]`` at end of stream.

        Raises ``FrameError`` on a framing violation, before reading the
        body of an oversized frame.
        """
        if self._pending:
            frames, self._pending = self._pending, []
            return frames
        while True:
            frames = self._decoder.frames()
            if frames:
                return frames
            if not await self._fill():
                return []

    async def _fill(self) -> bool:
        """Read what has arrived into the decoder; ``False`` at end of stream."""
        sock = self._socket
        if sock is None:
            data = await self._stream.receive_some(RECEIVE_SIZE)
            self._decoder.feed(data)
            return bool(data)
        while True:
            if self._reads_in_a_row >= READS_PER_YIELD:
                self._reads_in_a_row = 0
                await trio.lowlevel.checkpoint()
            # Into this thread's scratch buffer, copied out by feed() before
            # any other task runs: no 64 KiB allocation per read.
            chunk = _scratch()
            try:
                count = os.readv(_fileno(sock), [chunk])
            except BlockingIOError:
                self._reads_in_a_row = 0
                await trio.lowlevel.wait_readable(sock)
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"receive failed: {exc}") from exc
            self._reads_in_a_row += 1
            with memoryview(chunk) as view:
                self._decoder.feed(view[:count])
            return count > 0


async def wait_to_coalesce(bound: float = COALESCING_DELAY) -> bool:
    """Let every task with work run first, for at most ``bound`` seconds:
    what a TLS writer does before it writes (so that one write carries all
    their messages), and the replica before an fsync in the loop. True if
    the loop went idle (no task to run, no I/O ready), False if the bound
    ran out (the node is busy)."""
    with trio.move_on_after(bound) as scope:
        await trio.testing.wait_all_tasks_blocked()
    return not scope.cancelled_caught


async def send_now(stream: trio.abc.SendStream, data: bytes, send_timeout: float) -> None:
    """Write ``data``: straight to the socket of a plain TCP stream when it
    takes it all (loopback almost always does), the rest through the
    stream. A receiver that reads nothing for ``send_timeout`` is gone for
    our purposes: ``TooSlowError`` ends the connection."""
    sock = _socket_of(stream)
    if sock is not None:
        try:
            sent = os.write(_fileno(sock), data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise trio.BrokenResourceError(f"send failed: {exc}") from exc
        if sent == len(data):
            return
        data = data[sent:]
    with trio.fail_after(send_timeout):
        await stream.send_all(data)


_LARGEST_PEER_FRAME_OVERHEAD = peer_frame_overhead(2**32 - 1)

_local = threading.local()


def _scratch() -> bytearray:
    chunk: bytearray | None = getattr(_local, "chunk", None)
    if chunk is None:
        chunk = _local.chunk = bytearray(RECEIVE_SIZE)
    return chunk


class _Flusher(trio.abc.Instrument):
    """Writes the outboxes that have something queued when the event loop
    is about to wait for I/O, at the end of every pass that queued
    something. One per trio run (``_flusher``)."""

    def __init__(self) -> None:
        self._dirty: list[Outbox] = []
        self._token = trio.lowlevel.current_trio_token()

    def mark(self, outbox: Outbox) -> None:
        self._dirty.append(outbox)

    def before_io_wait(self, timeout: float) -> None:
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, []
        woke = False
        for outbox in dirty:
            try:
                woke |= outbox.flush()
            except Exception as exc:  # an instrument that raises is removed by trio
                woke |= outbox.fail(exc)
        if woke and timeout > 0:
            # A task was woken (a writer to finish a write, a producer
            # waiting for room), but the loop is about to sleep for
            # ``timeout``: make it look again at once.
            self._token.run_sync_soon(_nothing)


def _nothing() -> None:
    pass


_FLUSHER: trio.lowlevel.RunVar[_Flusher] = trio.lowlevel.RunVar("qkv_flusher")


def _flusher() -> _Flusher:
    """This trio run's flusher, installed on first use."""
    try:
        return _FLUSHER.get()
    except LookupError:
        flusher = _Flusher()
        trio.lowlevel.add_instrument(flusher)
        _FLUSHER.set(flusher)
        return flusher


class Outbox:
    """The writer of one connection (see the module docstring).

    Messages are framed as they are queued: ``_chunks`` holds the bytes of
    the next write in order (frame headers and bodies, never joined until
    the write), and on a batching outbox ``_group`` holds the messages of
    the peer frame being filled, closed into ``_chunks`` when the next
    message would push it past ``max_frame`` (or one must travel alone).
    """

    def __init__(
        self,
        stream: trio.abc.SendStream,
        *,
        max_frame: int,
        batch: bool,
        send_timeout: float,
        high_water: int = 4 * 1024 * 1024,
    ) -> None:
        self._send_timeout = send_timeout
        self._stream = stream
        #: plain TCP: written by the flusher (see the module docstring)
        self._socket = _socket_of(stream)
        self._flusher = _flusher() if self._socket is not None else None
        self._batch = batch
        self._high_water = high_water
        #: message bytes a peer frame may carry beside its array header
        self._budget = max_frame - HEADER_SIZE - _LARGEST_PEER_FRAME_OVERHEAD
        self._chunks: list[bytes] = []
        self._group: list[bytes] = []
        self._group_bytes = 0
        self._queued_bytes = 0
        #: the writer task owns the output: a write the socket did not take
        #: whole (``_rest``) is being finished, or the flusher failed
        self._busy = False
        self._rest: bytes | None = None
        self._error: BaseException | None = None
        self._wakeup = trio.Event()
        self._drained = trio.Event()
        self._room_waiters = 0
        self._closing = False

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    @property
    def full(self) -> bool:
        """Over the high-water mark: producers should ``wait_room``."""
        return self._queued_bytes > self._high_water

    def put(self, message: bytes, *, alone: bool = False) -> None:
        """Queue one encoded message. ``alone``: send it as a frame of its
        own even on a batching outbox (the handshake reply of a peer link is
        a plain map)."""
        if not self._queued_bytes:
            flusher = self._flusher
            if flusher is not None and not self._busy:
                flusher.mark(self)
            else:
                self._wakeup.set()  # the writer sleeps only while nothing is queued
        size = len(message)
        self._queued_bytes += size
        if self._batch and not alone:
            if self._group_bytes + size > self._budget and self._group:
                self._close_group()
            self._group.append(message)
            self._group_bytes += size
        else:
            if self._group:
                self._close_group()  # keep the order of messages
            self._chunks += (frame_header(size), message)

    def _close_group(self) -> None:
        group = self._group
        header = peer_frame_header(len(group))
        self._chunks += (frame_header(len(header) + self._group_bytes), header, *group)
        self._group = []
        self._group_bytes = 0

    def _take(self) -> bytes:
        """Everything queued, as one write; wakes producers waiting for room."""
        if self._group:
            self._close_group()
        data = b"".join(self._chunks)
        self._chunks = []
        self._queued_bytes = 0
        if self._room_waiters:
            self._drained.set()
        return data

    def flush(self) -> bool:
        """Write what is queued straight to the socket (the flusher calls
        this); what the socket does not take goes to the writer task.
        Returns whether a task was woken."""
        sock = self._socket
        if self._busy or not self._queued_bytes or sock is None:
            return False
        woke = bool(self._room_waiters)
        data = self._take()
        try:
            sent = os.write(_fileno(sock), data)
        except BlockingIOError:
            sent = 0
        except Exception as exc:  # never out of the flusher: the writer raises it
            self._error = exc
            sent = 0
        if sent == len(data):
            return woke
        self._rest = data[sent:]
        return self._hand_to_writer()

    def fail(self, error: BaseException) -> bool:
        """The flusher could not write: the writer task raises ``error``."""
        self._error = error
        return self._hand_to_writer()

    def _hand_to_writer(self) -> bool:
        self._busy = True
        self._wakeup.set()
        return True

    def close_after_flush(self) -> None:
        """Send what is queued, then let ``run`` return."""
        self._closing = True
        self._wakeup.set()

    async def wait_room(self) -> None:
        """Block while more than ``high_water`` bytes wait to be written."""
        while self.full:
            if self._drained.is_set():
                self._drained = trio.Event()
            self._room_waiters += 1
            try:
                await self._drained.wait()
            finally:
                self._room_waiters -= 1

    async def run(self) -> None:
        """The writer task. Returns after ``close_after_flush``; trio's
        broken/closed stream errors and ``TooSlowError`` propagate."""
        direct = self._socket is not None
        while True:
            error = self._error
            if error is not None:
                if isinstance(error, OSError):
                    raise trio.BrokenResourceError(f"send failed: {error}") from error
                raise error
            rest = self._rest
            if rest is not None:
                self._rest = None
                with trio.fail_after(self._send_timeout):
                    await self._stream.send_all(rest)
                continue
            if self._queued_bytes and (self._busy or self._closing or not direct):
                # This task writes: the flusher must not slip newer bytes
                # in ahead while it waits for the socket.
                self._busy = True
                await send_now(self._stream, self._take(), self._send_timeout)
                continue
            if self._closing and not self._queued_bytes:
                return  # still busy: nothing is written after the close
            self._busy = False  # drained: the flusher writes from here on
            self._wakeup = trio.Event()
            await self._wakeup.wait()
            if not direct:
                await wait_to_coalesce()
