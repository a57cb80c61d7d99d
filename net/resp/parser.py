"""The parser of client commands: RESP multibulk (``*N`` then ``N`` bulk
strings) and inline commands (a line of words, as typed in telnet).

It does no I/O: bytes go in (``RespParser.feed``), complete commands come
out (``RespParser.commands``), and "not all in yet" is simply no command.

Invariants:

- every announced length (array count, bulk length, the size of the whole
  command, an inline line) is checked against its limit as soon as its
  header is in, before the body is read or kept; so memory held is at most
  one command in progress (``max_request``) plus what was fed since the
  last ``commands``;
- integers in headers are read exactly as Redis's ``string2ll`` reads
  them (no sign but ``-``, no leading zeros, no spaces);
- after a ``ProtocolError`` the parser takes nothing more: the rest of the
  stream cannot be trusted, and the connection is to be closed.

It is our own, modelled on Redis's ``processMultibulkBuffer`` and
``processInlineBuffer``, rather than hiredis's ``Reader``: that one is a
reply parser for trusted servers. It has no limits, preallocates the list
of any array count it is told (a 17-byte input reserves gigabytes), and does
not check the CRLF after a bulk string. Guarding it would take a parse of
every header in front of it, which is all a request parser does anyway.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = [
    "INTEGER",
    "MAX_ARGS",
    "MAX_COUNT_LINE",
    "MAX_INLINE",
    "ProtocolError",
    "RespParser",
    "split_inline",
]

#: arguments per command, the command name included
MAX_ARGS: Final = 8192
#: longest inline command (Redis's PROTO_INLINE_MAX_SIZE)
MAX_INLINE: Final = 64 * 1024
#: longest header line (``*<count>`` or ``$<length>``) before its CRLF
MAX_COUNT_LINE: Final = 32


class ProtocolError(Exception):
    """Input that is not RESP, or over a limit: answered, then the
    connection is closed (the rest of the stream cannot be trusted)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = f"ERR Protocol error: {message}"


#: an integer as Redis writes one (its range is not checked here)
INTEGER: Final = re.compile(rb"-?(?:0|[1-9][0-9]{0,18})")
_STAR: Final = ord("*")
_DOLLAR: Final = ord("$")


def _count(buf: bytearray, start: int, end: int) -> int | None:
    """The decimal integer in ``buf[start:end]``, exactly as Redis's
    ``string2ll`` takes it (no sign but '-', no leading zeros, no spaces)."""
    digits = buf[start:end]
    # bytearray.isdigit is ASCII only; int() alone would take "+1", " 1", "0_1".
    if digits.isdigit() and (digits[0] != 0x30 or len(digits) == 1) and len(digits) <= 19:
        return int(digits)
    if INTEGER.fullmatch(digits) is None:
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
