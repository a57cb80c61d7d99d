"""The native requests a RESP command is made of, and the RESP error each
native error becomes.

Every read and write of a key goes through ``node.handle``, one request at
a time per call, under the connection's bound of quorum operations
(``Client.ops``). Invariants:

- a native error reply ends the command with ``CommandError``: the command
  answers that error and nothing else;
- an error of unknown outcome (``unavailable``, ``internal``) on a write
  says so in its message: the write may or may not have taken effect;
- keys and values are checked here, before any request is made, against
  the limits of the native protocol, so that a command with one bad
  argument does nothing at all.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import trio

from net.messages import Delete, ErrorReply, Get, GetReply, Reply, Request, Set, WriteReply
from net.resp.context import MAX_KEY, Client, CommandError
from net.resp.replies import encode_error
from register.model import Key

__all__ = ["MULTI_WIDTH", "each", "error_from", "get", "handle", "keys", "value_error", "write"]

#: keys one multi-key command works on at once (each still takes a slot
#: of the connection's ``max_inflight`` quorum operations)
MULTI_WIDTH: Final = 32

_ERROR_CODES: Final = {
    "bad_request": "ERR",
    "too_large": "ERR",
    "unknown_op": "ERR",
    "unavailable": "UNAVAILABLE",
    "shutting_down": "SHUTTINGDOWN",
    "internal": "INTERNAL",
}


def error_from(reply: ErrorReply, *, write: bool) -> bytes:
    """The RESP error for a native error reply."""
    message = reply.message
    if write and reply.error in ("unavailable", "internal"):
        message += " (the write may or may not have taken effect)"
    return encode_error(f"{_ERROR_CODES.get(reply.error, 'ERR')} {message}")


def _unexpected(reply: Reply) -> CommandError:
    return CommandError(encode_error(f"INTERNAL unexpected reply {type(reply).__name__}"))


async def handle(client: Client, request: Request) -> Reply:
    async with client.ops:
        return await client.node.handle(request)


async def get(client: Client, key: Key) -> bytes | None:
    """The key's value (``None``: not found), by a quorum read."""
    reply = await handle(client, Get(id=0, key=key))
    if isinstance(reply, GetReply):
        return reply.value if reply.found else None
    if isinstance(reply, ErrorReply):
        raise CommandError(error_from(reply, write=False))
    raise _unexpected(reply)


async def write(client: Client, key: Key, value: bytes | None) -> None:
    """Set the key (``None``: delete it), by a quorum write."""
    request: Request = Delete(id=0, key=key) if value is None else Set(id=0, key=key, value=value)
    reply = await handle(client, request)
    if isinstance(reply, WriteReply):
        return
    if isinstance(reply, ErrorReply):
        raise CommandError(error_from(reply, write=True))
    raise _unexpected(reply)


async def each(keys: Sequence[Key], work: Callable[[Key], Awaitable[None]]) -> None:
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
        if isinstance(first, CommandError):
            raise first from None
        raise


def keys(args: Sequence[bytes]) -> list[Key] | bytes:
    """The arguments as keys, or the error reply for the first bad one."""
    for arg in args:
        if not 1 <= len(arg) <= MAX_KEY:
            return encode_error(f"ERR qkv keys are 1 to {MAX_KEY} bytes, not {len(arg)}")
    return [Key(a) for a in args]


def value_error(client: Client, value: bytes) -> bytes | None:
    """The error reply for a value over the node's limit, if it is."""
    limit = client.node.config.max_value
    if len(value) > limit:
        return encode_error(f"ERR value of {len(value)} bytes is over the limit of {limit} bytes")
    return None
