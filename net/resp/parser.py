"""The Redis protocol (RESP2, and RESP3 after ``HELLO 3``) beside the
native one: ``serve_resp``.

Every command on a key becomes the native requests (``Get``, ``Set``,
``Delete``) run through ``node.handle``, the very path of the native
protocol: the same draining and recovering checks, the same deadline, the
same quorum reads and writes. So a RESP client gets linearizable registers
too. docs/resp.md lists the commands and how they differ from Redis.

One nursery per connection holds a reader (this task), one task per command
that needs quorum work, and one writer. Limits, as on the native server
(``net.server``), all of them back-pressure rather than buffering:

- at most ``max_connections`` RESP connections per node; one more is told
  ``-ERR max number of clients reached`` and closed;
- at most ``max_inflight`` commands per connection between being read and
  their reply being written: past that the reader stops reading, so a client
  that pipelines without bound, or never reads, only fills its own socket
  buffers; at most ``max_inflight`` quorum operations per connection too
  (a multi-key command runs its keys through the same bound);
- replies written late are bounded by a high-water mark in bytes, and a
  client that reads nothing for ``write_timeout`` seconds is disconnected;
- a command is at most about ``max_frame`` bytes and ``MAX_ARGS`` arguments,
  a bulk string at most ``max(max_value, 1024)`` bytes, an inline command
  at most 64 KiB: the parser checks every announced length as soon as its
  header is in, before reading or keeping the body, and answers a violation
  with ``-ERR Protocol error: ...`` and closes the connection (reading and
  dropping what the client still sends for a moment first, so that the
  error is not lost to a reset).

Replies are RESP2 until the client asks for RESP3 with ``HELLO 3``.

Replies go out in the order the commands came in (RESP has no request ids),
while the quorum work of pipelined commands runs concurrently. Commands on
the same key from one connection take effect in the order sent, as in
Redis; commands on different keys overlap.

The parser is our own, modelled on Redis's ``processMultibulkBuffer`` and
``processInlineBuffer``, rather than hiredis's ``Reader``: that one is a
reply parser for trusted servers. It has no limits, preallocates the list
of any array count it is told (a 17-byte input reserves gigabytes), and does
not check the CRLF after a bulk string. Guarding it would take a parse of
every header in front of it, which is all a request parser does anyway.
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib.metadata
import itertools
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Final, Protocol

import attrs
import trio

from net.address import Address
from net.messages import Delete, ErrorReply, Get, GetReply, Reply, Request, Set, WriteReply
from net.server import ServerLimits, accept_connections
from net.stream import send_now, wait_to_coalesce
from register.model import Key, Versioned

__all__ = [
    "MAX_ARGS",
    "MAX_INLINE",
    "ProtocolError",
    "RespNode",
    "RespParser",
    "encode_array",
    "encode_bulk",
    "encode_error",
    "encode_integer",
    "serve_resp",
    "split_inline",
]

log = logging.getLogger("qkv.resp")

#: the Redis version whose RESP2 behaviour qkv answers like (HELLO, INFO)
REDIS_COMPAT_VERSION: Final = "7.0.0"
MAX_KEY: Final = 1024
#: arguments per command, the command name included
MAX_ARGS: Final = 8192
#: longest inline command (Redis's PROTO_INLINE_MAX_SIZE)
MAX_INLINE: Final = 64 * 1024
#: longest header line (``*<count>`` or ``$<length>``) before its CRLF
MAX_COUNT_LINE: Final = 32
#: keys one multi-key command works on at once (each still takes a slot
#: of the connection's ``max_inflight`` quorum operations)
MULTI_WIDTH: Final = 32
RECEIVE_SIZE: Final = 64 * 1024
HIGH_WATER: Final = 4 * 1024 * 1024
#: seconds input is still read (and thrown away) after a protocol error
LINGER: Final = 2.0
LINGER_BYTES: Final = 16 * 1024 * 1024

try:
    QKV_VERSION = importlib.metadata.version("qkv")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - not installed
    QKV_VERSION = "unknown"


# --- what the server needs from a node ------------------------------------------


class _ConfigView(Protocol):
    @property
    def cluster_size(self) -> int: ...

    @property
    def max_value(self) -> int: ...

    @property
    def max_connections(self) -> int: ...


class _ReplicaView(Protocol):
    @property
    def state(self) -> Mapping[Key, Versioned]: ...


class RespNode(Protocol):
    """What ``serve_resp`` uses of a ``quorum.node.Node``."""

    @property
    def id(self) -> str: ...

    @property
    def state(self) -> str: ...

    @property
    def config(self) -> _ConfigView: ...

    @property
    def replica(self) -> _ReplicaView: ...

    @property
    def resp_address(self) -> Address | None: ...

    async def handle(self, request: Request) -> Reply:
        """Run one request; never raises ``QkvError``."""


# --- encoding ----------------------------------------------------------------------

OK: Final = b"+OK\r\n"
PONG: Final = b"+PONG\r\n"
NIL: Final = b"$-1\r\n"
NULL3: Final = b"_\r\n"
EMPTY_ARRAY: Final = b"*0\r\n"


def encode_bulk(value: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(value), value)


def encode_integer(value: int) -> bytes:
    return b":%d\r\n" % value


def encode_array(items: Sequence[bytes]) -> bytes:
    """An array of already encoded replies."""
    return b"*%d\r\n%b" % (len(items), b"".join(items))


def encode_error(message: str) -> bytes:
    """``-CODE message``: the text must start with its code (``ERR ...``).
    CR and LF cannot appear in an error line; they become spaces."""
    line = message.replace("\r", " ").replace("\n", " ")
    return b"-%b\r\n" % line.encode("utf-8", "backslashreplace")


def _bulk_text(text: str) -> bytes:
    return encode_bulk(text.encode())


def _show(arg: bytes, limit: int = 128) -> str:
    """An argument as text fit for an error message."""
    return arg[:limit].decode("utf-8", "backslashreplace")


# --- parsing -------------------------------------------------------------------------


class ProtocolError(Exception):
    """Input that is not RESP, or over a limit: answered, then the
    connection is closed (the rest of the stream cannot be trusted)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = f"ERR Protocol error: {message}"


_INT: Final = re.compile(rb"-?(?:0|[1-9][0-9]{0,18})")
_STAR: Final = ord("*")
_DOLLAR: Final = ord("$")


def _count(buf: bytearray, start: int, end: int) -> int | None:
    """The decimal integer in ``buf[start:end]``, exactly as Redis's
    ``string2ll`` takes it (no sign but '-', no leading zeros, no spaces)."""
    digits = buf[start:end]
    # bytearray.isdigit is ASCII only; int() alone would take "+1", " 1", "0_1".
    if digits.isdigit() and (digits[0] != 0x30 or len(digits) == 1) and len(digits) <= 19:
        return int(digits)
    if _INT.fullmatch(digits) is None:
        return None
    return int(digits)


class RespParser:
    """Incremental parser of client commands: multibulk (``*N`` then ``N``
    bulk strings) and inline (a line of words, as typed in telnet).

    ``feed`` bytes as they arrive; ``commands`` takes every complete
    command out. Memory held is at most one command in progress (bounded by
    ``max_request``) plus what was fed since the last ``commands``.
    """

    def __init__(
        self, *, max_bulk: int, max_request: int, max_args: int = MAX_ARGS, max_inline: int = MAX_INLINE
    ) -> None:
        self.max_bulk = max_bulk
        self.max_request = max_request
        self.max_args = max_args
        self.max_inline = max_inline
        self._buf = bytearray()
        self._pos = 0
        #: the multibulk command in progress, if any
        self._args: list[bytes] | None = None
        self._missing = 0
        #: length of the next bulk string once its header is read, else -1
        self._bulk = -1
        #: bytes of the command in progress, as announced so far
        self._size = 0
        self._failed = False

    def feed(self, data: bytes) -> None:
        if not self._failed:
            self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def commands(self) -> tuple[list[list[bytes]], ProtocolError | None]:
        """The complete commands fed so far, and the protocol error that
        followed them, if any (after an error the parser takes nothing more)."""
        out: list[list[bytes]] = []
        error: ProtocolError | None = None
        try:
            while (command := self._next()) is not None:
                if command:
                    out.append(command)
        except ProtocolError as exc:
            error = exc
            self._failed = True
            self._buf = bytearray()
            self._pos = 0
            self._args = None
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        return out, error

    def _next(self) -> list[bytes] | None:
        """The next command; ``[]`` for one that Redis skips (an empty
        line, ``*0``); ``None`` if it is not all in yet."""
        buf = self._buf
        pos = self._pos
        have = len(buf)
        args = self._args
        if args is None:
            if pos >= have:
                return None
            if buf[pos] != _STAR:
                return self._inline()
            end = buf.find(b"\r\n", pos, pos + MAX_COUNT_LINE)
            if end < 0:
                if have - pos >= MAX_COUNT_LINE:
                    raise ProtocolError("too big mbulk count string")
                return None
            count = _count(buf, pos + 1, end)
            if count is None:
                raise ProtocolError("invalid multibulk length")
            if count > self.max_args:
                raise ProtocolError(f"{count} arguments are over the limit of {self.max_args}")
            self._pos = end + 2
            if count <= 0:
                return []
            args, missing, size, bulk = [], count, end + 2 - pos, -1
            pos = end + 2
        else:
            missing, size, bulk = self._missing, self._size, self._bulk
        # Locals in the loop, state saved once at the end: this loop is
        # most of the cost of parsing.
        while missing:
            if bulk < 0:
                if pos >= have:
                    break
                if buf[pos] != _DOLLAR:
                    raise ProtocolError(f"expected '$', got {chr(buf[pos])!r}")
                end = buf.find(b"\r\n", pos, pos + MAX_COUNT_LINE)
                if end < 0:
                    if have - pos >= MAX_COUNT_LINE:
                        raise ProtocolError("too big bulk count string")
                    break
                length = _count(buf, pos + 1, end)
                if length is None or length < 0:
                    raise ProtocolError("invalid bulk length")
                if length > self.max_bulk:
                    raise ProtocolError(
                        f"bulk string of {length} bytes is over the limit of {self.max_bulk} bytes"
                    )
                size += end + 4 - pos + length
                if size > self.max_request:
                    raise ProtocolError(f"command of more than {self.max_request} bytes")
                bulk = length
                pos = end + 2
            if have - pos < bulk + 2:
                break
            args.append(bytes(buf[pos : pos + bulk]))
            pos += bulk + 2
            bulk = -1
            missing -= 1
        self._pos = pos
        if missing:
            self._args, self._missing, self._size, self._bulk = args, missing, size, bulk
            return None
        self._args = None
        self._bulk = -1
        return args

    def _inline(self) -> list[bytes] | None:
        buf, pos = self._buf, self._pos
        newline = buf.find(b"\n", pos, pos + self.max_inline + 2)
        if newline < 0:
            if len(buf) - pos > self.max_inline:
                raise ProtocolError("too big inline request")
            return None
        line = bytes(buf[pos:newline])
        self._pos = newline + 1
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > self.max_inline:
            raise ProtocolError("too big inline request")
        args = split_inline(line)
        if len(args) > self.max_args:
            raise ProtocolError(f"{len(args)} arguments are over the limit of {self.max_args}")
        return args


_SPACE: Final = frozenset(b" \t\n\r\v\f")
_ESCAPES: Final = {ord("n"): 10, ord("r"): 13, ord("t"): 9, ord("b"): 8, ord("a"): 7}
_HEX: Final = frozenset(b"0123456789abcdefABCDEF")


def split_inline(line: bytes) -> list[bytes]:
    """Split an inline command into words as Redis's ``sdssplitargs`` does:
    words are separated by white space; "double quotes" take the escapes
    \\n \\r \\t \\b \\a \\xHH and \\<any>; 'single quotes' take \\' only;
    a closing quote must be followed by space or the end of the line."""
    args: list[bytes] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i] in _SPACE:
            i += 1
        if i >= n:
            return args
        word = bytearray()
        quote = 0
        while True:
            if quote == 0:
                if i >= n or line[i] in _SPACE:
                    break
                c = line[i]
                if c in (0x22, 0x27):  # " or '
                    quote = c
                else:
                    word.append(c)
                i += 1
                continue
            if i >= n:
                raise ProtocolError("unbalanced quotes in request")
            c = line[i]
            if quote == 0x22 and c == 0x5C and i + 1 < n:  # backslash in "..."
                nxt = line[i + 1]
                if nxt == ord("x") and i + 3 < n and line[i + 2] in _HEX and line[i + 3] in _HEX:
                    word.append(int(line[i + 2 : i + 4], 16))
                    i += 4
                else:
                    word.append(_ESCAPES.get(nxt, nxt))
                    i += 2
                continue
            if quote == 0x27 and c == 0x5C and i + 1 < n and line[i + 1] == 0x27:
                word.append(0x27)
                i += 2
                continue
            if c == quote:
                if i + 1 < n and line[i + 1] not in _SPACE:
                    raise ProtocolError("unbalanced quotes in request")
                i += 1
                quote = 0
                break
            word.append(c)
            i += 1
        args.append(bytes(word))


# --- the reply queue: in order, one writer ------------------------------------------


class _Slot:
    __slots__ = ("data", "on_sent")

    def __init__(self, on_sent: Callable[[], None] | None) -> None:
        self.data: bytes | None = None
        self.on_sent = on_sent


class _ReplyQueue:
    """Replies in command order. The reader reserves a slot per command;
    whoever answers fills it; the writer task sends every filled slot at the
    head of the queue in one write (``net.stream.send_now``)."""

    def __init__(
        self, stream: trio.abc.SendStream, *, send_timeout: float, high_water: int = HIGH_WATER
    ) -> None:
        self._stream = stream
        self._send_timeout = send_timeout
        self._high_water = high_water
        self._slots: deque[_Slot] = deque()
        self._filled_bytes = 0
        self._wakeup = trio.Event()
        self._drained = trio.Event()
        self._closing = False

    def reserve(self, on_sent: Callable[[], None] | None = None) -> _Slot:
        slot = _Slot(on_sent)
        self._slots.append(slot)
        return slot

    def fill(self, slot: _Slot, data: bytes) -> None:
        slot.data = data
        self._filled_bytes += len(data)
        if self._slots[0] is slot:
            self._wakeup.set()

    def put(self, data: bytes, on_sent: Callable[[], None] | None = None) -> None:
        self.fill(self.reserve(on_sent), data)

    def close_after_flush(self) -> None:
        self._closing = True
        self._wakeup.set()

    async def wait_room(self) -> None:
        """Block while more than ``high_water`` bytes of replies wait."""
        while self._filled_bytes > self._high_water:
            if self._drained.is_set():
                self._drained = trio.Event()
            await self._drained.wait()

    async def run(self) -> None:
        """The writer. Returns once closing and every slot is sent; trio's
        broken/closed stream errors and ``TooSlowError`` propagate."""
        slots = self._slots
        while True:
            if slots and slots[0].data is not None:
                batch: list[_Slot] = []
                while slots and slots[0].data is not None:
                    batch.append(slots.popleft())
                data = b"".join([s.data for s in batch if s.data is not None])
                self._filled_bytes -= len(data)
                self._drained.set()
                await send_now(self._stream, data, self._send_timeout)
                for s in batch:
                    if s.on_sent is not None:
                        s.on_sent()
                continue
            if not slots and self._closing:
                return
            self._wakeup = trio.Event()
            await self._wakeup.wait()
            await wait_to_coalesce()


# --- the server ----------------------------------------------------------------------


async def serve_resp(
    listeners: Sequence[trio.SocketListener],
    node: RespNode,
    limits: ServerLimits,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept RESP connections on ``listeners`` until cancelled."""
    server = _Server(node, limits)
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(accept_connections, listener, nursery, server.connection, "RESP")
        task_status.started()


class _Server:
    def __init__(self, node: RespNode, limits: ServerLimits) -> None:
        self.node = node
        self.limits = limits
        self.slots = trio.Semaphore(limits.max_connections)
        self.ids = itertools.count(1)
        self.started = time.monotonic()
        self.max_bulk = max(limits.max_value, MAX_KEY)
        # A SET of the longest key and value, with its headers, must fit.
        self.max_request = max(limits.max_frame, limits.max_value + MAX_KEY) + 4096

    @property
    def connected(self) -> int:
        return self.limits.max_connections - self.slots.value

    async def connection(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                self.slots.acquire_nowait()
            except trio.WouldBlock:
                with (
                    trio.move_on_after(self.limits.write_timeout),
                    contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
                ):
                    await stream.send_all(encode_error("ERR max number of clients reached"))
                return
            try:
                await _Session(self, next(self.ids), stream).run()
            except* (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError):
                pass  # the client went away or stopped reading
            except* Exception as group:
                # A bug: it ends this connection, never the node.
                log.error("RESP connection failed", exc_info=group)
            finally:
                self.slots.release()


@attrs.define
class _Job:
    """A command that needs quorum work: run as a task, in key order."""

    keys: list[Key]
    run: Callable[[], Awaitable[bytes]]


class _QuorumError(Exception):
    """An error reply from the node, raised to end a multi-key command."""

    def __init__(self, reply: bytes) -> None:
        super().__init__()
        self.reply = reply


_UNSUPPORTED_SET_OPTIONS: Final = {
    b"ex": "no TTLs yet",
    b"px": "no TTLs yet",
    b"exat": "no TTLs yet",
    b"pxat": "no TTLs yet",
    b"keepttl": "no TTLs yet",
    b"nx": "no conditional writes yet",
    b"xx": "no conditional writes yet",
    b"get": "no GET option yet",
}
_ERROR_CODES: Final = {
    "bad_request": "ERR",
    "too_large": "ERR",
    "unknown_op": "ERR",
    "unavailable": "UNAVAILABLE",
    "shutting_down": "SHUTTINGDOWN",
    "internal": "INTERNAL",
}


def _error_from(reply: ErrorReply, *, write: bool) -> bytes:
    message = reply.message
    if write and reply.error in ("unavailable", "internal"):
        message += " (the write may or may not have taken effect)"
    return encode_error(f"{_ERROR_CODES.get(reply.error, 'ERR')} {message}")


def _wrong_arity(name: bytes) -> bytes:
    return encode_error(f"ERR wrong number of arguments for '{_show(name.lower())}' command")


#: name -> (arity as Redis counts it: n exactly, -n at least n; flags; first
#: key, last key, step) for COMMAND
_COMMAND_TABLE: Final[dict[str, tuple[int, list[str], int, int, int]]] = {
    "get": (2, ["readonly", "fast"], 1, 1, 1),
    "set": (-3, ["write", "denyoom"], 1, 1, 1),
    "del": (-2, ["write"], 1, -1, 1),
    "exists": (-2, ["readonly", "fast"], 1, -1, 1),
    "mget": (-2, ["readonly", "fast"], 1, -1, 1),
    "mset": (-3, ["write", "denyoom"], 1, -1, 2),
    "ping": (-1, ["fast", "stale"], 0, 0, 0),
    "echo": (2, ["fast", "stale"], 0, 0, 0),
    "quit": (-1, ["fast", "stale"], 0, 0, 0),
    "select": (2, ["loading", "stale", "fast"], 0, 0, 0),
    "client": (-2, ["stale"], 0, 0, 0),
    "hello": (-1, ["noscript", "loading", "stale", "fast"], 0, 0, 0),
    "auth": (-2, ["noscript", "loading", "stale", "fast"], 0, 0, 0),
    "info": (-1, ["loading", "stale"], 0, 0, 0),
    "command": (-1, ["loading", "stale"], 0, 0, 0),
    "config": (-2, ["admin", "noscript", "loading", "stale"], 0, 0, 0),
}


def _command_entry(name: str) -> bytes:
    arity, flags, first, last, step = _COMMAND_TABLE[name]
    return encode_array(
        [
            _bulk_text(name),
            encode_integer(arity),
            encode_array([b"+%b\r\n" % f.encode() for f in flags]),
            encode_integer(first),
            encode_integer(last),
            encode_integer(step),
            EMPTY_ARRAY,
            EMPTY_ARRAY,
            EMPTY_ARRAY,
            EMPTY_ARRAY,
        ]
    )


class _Session:
    """One RESP connection."""

    def __init__(self, server: _Server, conn_id: int, stream: trio.SocketStream) -> None:
        self.server = server
        self.node = server.node
        self.id = conn_id
        self.stream = stream
        self.name = b""
        #: RESP version of the replies: 2 until HELLO 3
        self.proto = 2
        limits = server.limits
        self.out = _ReplyQueue(stream, send_timeout=limits.write_timeout)
        self.commands = trio.Semaphore(limits.max_inflight)
        self.ops = trio.Semaphore(limits.max_inflight)
        #: key -> the event set when the last command on it sent here is done
        self.key_tails: dict[Key, trio.Event] = {}
        self.closing = False

    async def run(self) -> None:
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
                while not self.closing:
                    data = await self.stream.receive_some(RECEIVE_SIZE)
                    if not data:
                        break
                    parser.feed(data)
                    commands, error = parser.commands()
                    for args in commands:
                        await self.commands.acquire()
                        self.dispatch(args, jobs)
                        if self.closing:
                            break
                    if error is not None and not self.closing:
                        self.out.put(encode_error(error.message))
                        self.closing = failed = True
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
            result = self.prepare(args)
        except Exception:
            log.exception("RESP command %r failed", _show(args[0], 32))
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
        self, job: _Job, slot: _Slot, keys: list[Key], waits: list[trio.Event], done: trio.Event
    ) -> None:
        try:
            for event in waits:
                await event.wait()
            try:
                reply = await job.run()
            except _QuorumError as exc:
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

    # --- dispatch ---

    def prepare(self, args: list[bytes]) -> bytes | _Job:
        name = args[0].lower()
        handler = _HANDLERS.get(name)
        if handler is None:
            shown = " ".join(f"'{_show(a)}'" for a in args[1:])[:128]
            return encode_error(f"ERR unknown command '{_show(args[0])}', with args beginning with: {shown}")
        arity = _COMMAND_TABLE[name.decode()][0]
        if (arity > 0 and len(args) != arity) or len(args) < -arity:
            return _wrong_arity(name)
        return handler(self, args)

    # --- replies that depend on the RESP version ---

    def nil(self) -> bytes:
        return NULL3 if self.proto == 3 else NIL

    def map(self, pairs: Sequence[tuple[bytes, bytes]]) -> bytes:
        """A map of encoded replies (RESP2: a flat array)."""
        if self.proto == 3:
            return b"%%%d\r\n%b" % (len(pairs), b"".join(k + v for k, v in pairs))
        return encode_array([x for pair in pairs for x in pair])

    # --- quorum work ---

    async def _handle(self, request: Request) -> Reply:
        async with self.ops:
            return await self.node.handle(request)

    async def _get(self, key: Key) -> bytes | None:
        reply = await self._handle(Get(id=0, key=key))
        if isinstance(reply, GetReply):
            return reply.value if reply.found else None
        if isinstance(reply, ErrorReply):
            raise _QuorumError(_error_from(reply, write=False))
        raise _QuorumError(encode_error(f"INTERNAL unexpected reply {type(reply).__name__}"))

    async def _write(self, key: Key, value: bytes | None) -> None:
        request: Request = Delete(id=0, key=key) if value is None else Set(id=0, key=key, value=value)
        reply = await self._handle(request)
        if isinstance(reply, WriteReply):
            return
        if isinstance(reply, ErrorReply):
            raise _QuorumError(_error_from(reply, write=True))
        raise _QuorumError(encode_error(f"INTERNAL unexpected reply {type(reply).__name__}"))

    async def _each(self, keys: Sequence[Key], work: Callable[[Key], Awaitable[None]]) -> None:
        """Run ``work`` for every key, ``MULTI_WIDTH`` at a time; the first
        error ends them all."""
        todo = iter(keys)

        async def worker() -> None:
            for key in todo:
                await work(key)

        try:
            async with trio.open_nursery() as nursery:
                for _ in range(min(MULTI_WIDTH, len(keys))):
                    nursery.start_soon(worker)
        except BaseExceptionGroup as group:
            first = group.exceptions[0]
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            if isinstance(first, _QuorumError):
                raise first from None
            raise

    def _keys(self, args: Sequence[bytes]) -> list[Key] | bytes:
        for arg in args:
            if not 1 <= len(arg) <= MAX_KEY:
                return encode_error(f"ERR qkv keys are 1 to {MAX_KEY} bytes, not {len(arg)}")
        return [Key(a) for a in args]

    def _value_error(self, value: bytes) -> bytes | None:
        limit = self.node.config.max_value
        if len(value) > limit:
            return encode_error(f"ERR value of {len(value)} bytes is over the limit of {limit} bytes")
        return None

    # --- key commands ---

    def cmd_get(self, args: list[bytes]) -> bytes | _Job:
        keys = self._keys(args[1:])
        if isinstance(keys, bytes):
            return keys
        nil = self.nil()

        async def run() -> bytes:
            value = await self._get(keys[0])
            return nil if value is None else encode_bulk(value)

        return _Job(keys, run)

    def cmd_set(self, args: list[bytes]) -> bytes | _Job:
        keys = self._keys(args[1:2])
        if isinstance(keys, bytes):
            return keys
        for option in args[3:]:
            why = _UNSUPPORTED_SET_OPTIONS.get(option.lower())
            if why is None:
                return encode_error("ERR syntax error")
            return encode_error(f"ERR SET option '{_show(option).upper()}' is not supported by qkv ({why})")
        value = args[2]
        if (error := self._value_error(value)) is not None:
            return error

        async def run() -> bytes:
            await self._write(keys[0], value)
            return OK

        return _Job(keys, run)

    def cmd_del(self, args: list[bytes]) -> bytes | _Job:
        keys = self._keys(args[1:])
        if isinstance(keys, bytes):
            return keys
        unique = list(dict.fromkeys(keys))
        deleted = 0

        async def one(key: Key) -> None:
            nonlocal deleted
            # The count is what the read just before each delete saw.
            if await self._get(key) is not None:
                await self._write(key, None)
                deleted += 1

        async def run() -> bytes:
            await self._each(unique, one)
            return encode_integer(deleted)

        return _Job(keys, run)

    def cmd_exists(self, args: list[bytes]) -> bytes | _Job:
        keys = self._keys(args[1:])
        if isinstance(keys, bytes):
            return keys
        found: set[Key] = set()

        async def one(key: Key) -> None:
            if await self._get(key) is not None:
                found.add(key)

        async def run() -> bytes:
            await self._each(list(dict.fromkeys(keys)), one)
            # Redis counts a key named twice twice.
            return encode_integer(sum(1 for k in keys if k in found))

        return _Job(keys, run)

    def cmd_mget(self, args: list[bytes]) -> bytes | _Job:
        keys = self._keys(args[1:])
        if isinstance(keys, bytes):
            return keys
        values: dict[Key, bytes | None] = {}
        nil = self.nil()
        budget = self.server.limits.max_frame
        total = 0

        async def one(key: Key) -> None:
            nonlocal total
            value = await self._get(key)
            if value is not None:
                total += len(value)
                if total > budget:
                    raise _QuorumError(
                        encode_error(
                            f"ERR MGET reply over the limit of {budget} bytes: ask for fewer keys at once"
                        )
                    )
            values[key] = value

        async def run() -> bytes:
            await self._each(list(dict.fromkeys(keys)), one)
            return encode_array([nil if (v := values[k]) is None else encode_bulk(v) for k in keys])

        return _Job(keys, run)

    def cmd_mset(self, args: list[bytes]) -> bytes | _Job:
        if len(args) % 2 != 1:
            return _wrong_arity(args[0])
        keys = self._keys(args[1::2])
        if isinstance(keys, bytes):
            return keys
        pairs: dict[Key, bytes] = {}
        for key, value in zip(keys, args[2::2], strict=True):
            if (error := self._value_error(value)) is not None:
                return error
            pairs[key] = value  # the last value of a key named twice wins

        async def one(key: Key) -> None:
            await self._write(key, pairs[key])

        async def run() -> bytes:
            await self._each(list(pairs), one)
            return OK

        return _Job(keys, run)

    # --- connection and server commands ---

    def cmd_ping(self, args: list[bytes]) -> bytes:
        if len(args) > 2:
            return _wrong_arity(args[0])
        return PONG if len(args) == 1 else encode_bulk(args[1])

    def cmd_echo(self, args: list[bytes]) -> bytes:
        return encode_bulk(args[1])

    def cmd_quit(self, args: list[bytes]) -> bytes:
        self.closing = True
        return OK

    def cmd_select(self, args: list[bytes]) -> bytes:
        if _INT.fullmatch(args[1]) is None:
            return encode_error("ERR value is not an integer or out of range")
        if int(args[1]) != 0:
            return encode_error("ERR DB index is out of range")
        return OK

    def cmd_auth(self, args: list[bytes]) -> bytes:
        if len(args) > 3:
            return encode_error("ERR syntax error")
        return encode_error(
            "ERR AUTH <password> called without any password configured for the default "
            "user. Are you sure your configuration is correct?"
        )

    def _set_name(self, name: bytes) -> bytes | None:
        if any(c < 0x21 or c > 0x7E for c in name):
            return encode_error("ERR Client names cannot contain spaces, newlines or special characters.")
        self.name = name
        return None

    def cmd_client(self, args: list[bytes]) -> bytes:
        sub = args[1].lower()
        if sub == b"setname" and len(args) == 3:
            return self._set_name(args[2]) or OK
        if sub == b"getname" and len(args) == 2:
            return encode_bulk(self.name) if self.name else self.nil()
        if sub == b"setinfo" and len(args) == 4:
            if args[2].lower() not in (b"lib-name", b"lib-ver"):
                return encode_error(f"ERR Unrecognized option '{_show(args[2])}'")
            return OK
        if sub == b"id" and len(args) == 2:
            return encode_integer(self.id)
        if sub == b"info" and len(args) == 2:
            return _bulk_text(self._client_info() + "\n")
        if sub in (b"setname", b"getname", b"setinfo", b"id", b"info"):
            return encode_error(f"ERR wrong number of arguments for 'client|{_show(sub)}' command")
        return encode_error(f"ERR unknown subcommand '{_show(args[1])}'. Try CLIENT HELP.")

    def _client_info(self) -> str:
        try:
            host, port = self.stream.socket.getpeername()[:2]
            peer = f"{host}:{port}"
        except OSError:
            peer = "?"
        return f"id={self.id} addr={peer} name={_show(self.name)} db=0 resp=2"

    def cmd_hello(self, args: list[bytes]) -> bytes:
        proto = self.proto
        if len(args) >= 2:
            if _INT.fullmatch(args[1]) is None:
                return encode_error("ERR Protocol version is not an integer or out of range")
            proto = int(args[1])
            if proto not in (2, 3):
                return encode_error("NOPROTO unsupported protocol version")
        i = 2
        name: bytes | None = None
        while i < len(args):
            option = args[i].lower()
            if option == b"auth" and i + 2 < len(args):
                return encode_error("ERR AUTH is not supported: qkv has no users or passwords")
            if option == b"setname" and i + 1 < len(args):
                name = args[i + 1]
                i += 2
                continue
            return encode_error(f"ERR Syntax error in HELLO option '{_show(args[i])}'")
        if name is not None and (error := self._set_name(name)) is not None:
            return error
        self.proto = proto
        return self.map(
            [
                (_bulk_text("server"), _bulk_text("qkv")),
                (_bulk_text("version"), _bulk_text(REDIS_COMPAT_VERSION)),
                (_bulk_text("proto"), encode_integer(proto)),
                (_bulk_text("id"), encode_integer(self.id)),
                (_bulk_text("mode"), _bulk_text("standalone")),
                (_bulk_text("role"), _bulk_text("master")),
                (_bulk_text("modules"), EMPTY_ARRAY),
            ]
        )

    def cmd_info(self, args: list[bytes]) -> bytes:
        wanted = {a.decode("utf-8", "replace").lower() for a in args[1:]}
        every = not wanted or bool(wanted & {"all", "everything", "default"})
        node, config = self.node, self.node.config
        # The local replica's view: live keys (tombstones left out). A count,
        # not a linearizable read.
        keys = sum(1 for v in node.replica.state.values() if v.value is not None)
        resp = node.resp_address
        sections = {
            "server": [
                f"qkv_version:{QKV_VERSION}",
                f"redis_version:{REDIS_COMPAT_VERSION}",
                "redis_mode:standalone",
                f"node_id:{node.id}",
                f"node_state:{node.state}",
                f"cluster_size:{config.cluster_size}",
                f"keys:{keys}",
                f"tcp_port:{resp.port if resp is not None else 0}",
                f"uptime_in_seconds:{int(time.monotonic() - self.server.started)}",
            ],
            "clients": [
                f"connected_clients:{self.server.connected}",
                f"maxclients:{config.max_connections}",
            ],
            "replication": ["role:master", "connected_slaves:0"],
            "keyspace": [f"db0:keys={keys},expires=0,avg_ttl=0"] if keys else [],
        }
        text = "".join(
            f"# {title.capitalize()}\r\n" + "".join(f"{line}\r\n" for line in lines) + "\r\n"
            for title, lines in sections.items()
            if every or title in wanted
        )
        return _bulk_text(text.removesuffix("\r\n"))

    def cmd_command(self, args: list[bytes]) -> bytes:
        if len(args) == 1:
            return encode_array([_command_entry(n) for n in _COMMAND_TABLE])
        sub = args[1].lower()
        if sub == b"count" and len(args) == 2:
            return encode_integer(len(_COMMAND_TABLE))
        if sub == b"list":
            return encode_array([_bulk_text(n) for n in _COMMAND_TABLE])
        if sub == b"info":
            names = [a.decode("utf-8", "replace").lower() for a in args[2:]] or list(_COMMAND_TABLE)
            return encode_array([_command_entry(n) if n in _COMMAND_TABLE else self.nil() for n in names])
        # COMMAND DOCS is left unknown on purpose: an interactive redis-cli
        # then uses its own help for every command (and asks COMMAND for
        # the table), as with Redis 6; empty docs would leave it none.
        return encode_error(f"ERR unknown subcommand '{_show(args[1])}'. Try COMMAND HELP.")

    def _config(self) -> dict[str, str]:
        config = self.node.config
        return {
            "save": "",
            "appendonly": "no",
            "databases": "1",
            "maxclients": str(config.max_connections),
            "maxmemory": "0",
            "proto-max-bulk-len": str(self.server.max_bulk),
            "timeout": "0",
        }

    def cmd_config(self, args: list[bytes]) -> bytes:
        sub = args[1].lower()
        if sub == b"get":
            if len(args) < 3:
                return encode_error("ERR wrong number of arguments for 'config|get' command")
            values = self._config()
            patterns = [a.decode("utf-8", "replace").lower() for a in args[2:]]
            return self.map(
                [
                    (_bulk_text(name), _bulk_text(value))
                    for name, value in values.items()
                    if any(fnmatch.fnmatchcase(name, p) for p in patterns)
                ]
            )
        if sub in (b"set", b"rewrite", b"resetstat"):
            return encode_error(
                f"ERR CONFIG {_show(sub).upper()} is not supported by qkv: "
                "its settings are command-line flags of 'qkv serve'"
            )
        return encode_error(f"ERR unknown subcommand '{_show(args[1])}'. Try CONFIG HELP.")


_HANDLERS: Final[dict[bytes, Callable[[_Session, list[bytes]], bytes | _Job]]] = {
    name.encode(): getattr(_Session, f"cmd_{name}") for name in _COMMAND_TABLE
}
