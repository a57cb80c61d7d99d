"""Reply encoding: RESP2, and the RESP3 forms a connection gets after
``HELLO 3``.

Every function returns the complete bytes of one reply, ready to be queued;
an array takes replies already encoded. Invariants:

- an error line starts with its code (``ERR``, ``UNAVAILABLE``, ...) and
  never holds CR or LF (they become spaces), so that it cannot end early
  or smuggle a reply;
- a client's argument quoted in an error is cut short (``show``) and
  decoded with backslash escapes, so an error line stays short and valid
  UTF-8 whatever the client sent;
- the only replies that differ between RESP2 and RESP3 are nil and maps
  (``nil``, ``encode_map``): everything else is the same bytes in both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

__all__ = [
    "EMPTY_ARRAY",
    "NIL",
    "NULL3",
    "OK",
    "PONG",
    "bulk_text",
    "encode_array",
    "encode_bulk",
    "encode_error",
    "encode_integer",
    "encode_map",
    "nil",
    "show",
    "wrong_arity",
]

OK: Final = b"+OK\r\n"
PONG: Final = b"+PONG\r\n"
#: nil in RESP2 (a null bulk string)
NIL: Final = b"$-1\r\n"
#: nil in RESP3
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


def bulk_text(text: str) -> bytes:
    return encode_bulk(text.encode())


def nil(proto: int) -> bytes:
    """The nil reply of RESP version ``proto``."""
    return NULL3 if proto == 3 else NIL


def encode_map(pairs: Sequence[tuple[bytes, bytes]], proto: int) -> bytes:
    """A map of encoded replies (RESP2: a flat array)."""
    if proto == 3:
        return b"%%%d\r\n%b" % (len(pairs), b"".join(k + v for k, v in pairs))
    return encode_array([x for pair in pairs for x in pair])


def show(arg: bytes, limit: int = 128) -> str:
    """An argument as text fit for an error message."""
    return arg[:limit].decode("utf-8", "backslashreplace")


def wrong_arity(name: bytes) -> bytes:
    return encode_error(f"ERR wrong number of arguments for '{show(name.lower())}' command")
