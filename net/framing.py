"""Length-prefixed frames, sans I/O.

    frame = length (4 bytes, unsigned, big-endian) || body (length bytes)

``FrameDecoder`` takes bytes as they arrive, in chunks of any size, and hands
out whole bodies; "need more data" is ``None``, not a blocking call. The
announced length is checked against the limit as soon as the 4 header bytes
are in, so an oversized body is never read or buffered.
"""

from __future__ import annotations

import struct

__all__ = [
    "HEADER_SIZE",
    "EmptyFrame",
    "FrameDecoder",
    "FrameError",
    "FrameTooLarge",
    "encode_frame",
    "frame_header",
]

_HEADER = struct.Struct(">I")
HEADER_SIZE = _HEADER.size
MAX_LENGTH = 2**32 - 1


class FrameError(Exception):
    """The byte stream broke the framing rules; the connection must close."""


class FrameTooLarge(FrameError):
    def __init__(self, length: int, limit: int) -> None:
        super().__init__(f"frame of {length} bytes is over the limit of {limit} bytes")
        self.length = length
        self.limit = limit


class EmptyFrame(FrameError):
    def __init__(self) -> None:
        super().__init__("frame length must be at least 1")


def frame_header(length: int) -> bytes:
    """The 4 bytes that announce a body of ``length`` bytes."""
    if not 1 <= length <= MAX_LENGTH:
        raise ValueError(f"frame body of {length} bytes cannot be framed")
    return _HEADER.pack(length)


def encode_frame(body: bytes) -> bytes:
    return frame_header(len(body)) + body


class FrameDecoder:
    """Reassembles frames from a byte stream.

    After a ``FrameError`` the decoder is unusable: the stream position is
    lost, so the only sane reaction is to close the connection.
    """

    def __init__(self, max_frame: int) -> None:
        self._max = max_frame
        self._buf = bytearray()
        self._pos = 0
        self._error: FrameError | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._pos and self._pos >= len(self._buf) // 2:
            # Compact only once the consumed prefix dominates, so each byte
            # is moved O(1) times on average.
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next_frame(self) -> bytes | None:
        """The next whole body, or ``None`` if more bytes are needed."""
        end = self._pos + HEADER_SIZE
        if len(self._buf) < end:
            return None
        (length,) = _HEADER.unpack_from(self._buf, self._pos)
        if length == 0:
            raise EmptyFrame()
        if length > self._max:
            raise FrameTooLarge(length, self._max)
        if len(self._buf) < end + length:
            return None
        body = bytes(self._buf[end : end + length])
        self._pos = end + length
        return body

    def frames(self) -> list[bytes]:
        """Every whole body buffered so far.

        A framing error after some good frames is held back until those are
        returned, so that the requests before the bad frame are answered.
        """
        if self._error is not None:
            raise self._error
        out: list[bytes] = []
        try:
            while (body := self.next_frame()) is not None:
                out.append(body)
        except FrameError as exc:
            if not out:
                raise
            self._error = exc
        return out
