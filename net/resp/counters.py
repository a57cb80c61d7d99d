"""The counter commands: ``INCR``, ``DECR``, ``INCRBY``, ``DECRBY``.

Each is one native ``incr``: the node adds the amount to the key's
canonical decimal (not found counts as 0) in one atomic, linearizable
step, and answers the new value. Invariants:

- the amount is read as Redis reads an integer argument (``string2ll``:
  canonical decimal, signed 64-bit), and ``DECRBY`` of -2**63, whose
  negation is out of range, is refused as Redis 7 refuses it; nothing is
  sent to the node then;
- one command is one ``incr`` with a rid of its own (``native.incr``), so
  it adds at most once, even when the node retries it internally;
- a refusal (``not_integer``) changed nothing; its text is Redis's, chosen
  by reading the key afterwards: a canonical integer there means the sum
  would have overflowed, anything else that the value is not an integer.
  (Should the key change in between, the text may name the other reason;
  the reply is an error either way.)
"""

from __future__ import annotations

from typing import Final

from net.resp import native, parser
from net.resp.context import Client, Job
from net.resp.replies import encode_error, encode_integer

__all__ = ["MAX_INT64", "MIN_INT64", "decr", "decrby", "incr", "incrby", "parse_int64"]

MIN_INT64: Final = -(2**63)
MAX_INT64: Final = 2**63 - 1

NOT_AN_INTEGER: Final = encode_error("ERR value is not an integer or out of range")
OVERFLOW: Final = encode_error("ERR increment or decrement would overflow")


def parse_int64(arg: bytes) -> int | None:
    """``arg`` as Redis's ``string2ll`` reads it: ``0``, or an optional
    ``-`` then a digit 1-9 then digits, within signed 64-bit range."""
    if len(arg) > 20 or parser.INTEGER.fullmatch(arg) is None or arg == b"-0":
        return None
    number = int(arg)
    return number if MIN_INT64 <= number <= MAX_INT64 else None


def _add(client: Client, key_arg: bytes, by: int) -> bytes | Job:
    keys = native.keys([key_arg])
    if isinstance(keys, bytes):
        return keys
    key = keys[0]

    async def run() -> bytes:
        value = await native.incr(client, key, by)
        if value is not None:
            return encode_integer(value)
        current = await native.get(client, key)
        return OVERFLOW if current is not None and parse_int64(current) is not None else NOT_AN_INTEGER

    return Job(keys, run)


def incr(client: Client, args: list[bytes]) -> bytes | Job:
    return _add(client, args[1], 1)


def decr(client: Client, args: list[bytes]) -> bytes | Job:
    return _add(client, args[1], -1)


def incrby(client: Client, args: list[bytes]) -> bytes | Job:
    by = parse_int64(args[2])
    if by is None:
        return NOT_AN_INTEGER
    return _add(client, args[1], by)


def decrby(client: Client, args: list[bytes]) -> bytes | Job:
    by = parse_int64(args[2])
    if by is None:
        return NOT_AN_INTEGER
    if by == MIN_INT64:
        # Its negation is out of range (Redis 7 refuses it the same way).
        return encode_error("ERR decrement would overflow")
    return _add(client, args[1], -by)
