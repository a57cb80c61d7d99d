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
  argument does nothing at all;
- every ``cas`` and ``incr`` carries a fresh random request id (``rid``)
  of its own: the node's internal retries of that request then apply it at
  most once, and no two requests share a rid (the node refuses a rid
  reused with other arguments);
- ``swap``, the read-then-cas loop behind ``SET ... XX/GET``, ``GETSET``,
  ``GETDEL`` and ``DEL``, changes the key at most once: it sends a new
  ``cas`` only after the previous one answered ``swapped: false`` (which
  wrote nothing), and stops at the first swap, the first error, or once
  it has tried for longer than the node's request deadline.

Why ``swap`` is linearizable: its answer is either a ``cas`` that swapped,
which took effect at one instant while the key held exactly the value
``swap`` reports as replaced; or a decision to leave the key alone, taken
on a value that a linearizable read (a ``get``, or a ``cas`` answered
``swapped: false``, which describes the key as a ``get`` would) saw at one
instant, where the command is then a read.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, TypeAlias

import trio

from net.messages import (
    Cas,
    CasReply,
    Delete,
    ErrorReply,
    Get,
    GetReply,
    Incr,
    IncrReply,
    Reply,
    Request,
    Set,
    WriteReply,
)
from net.resp.context import MAX_KEY, Client, CommandError
from net.resp.replies import encode_error
from register.model import Key

__all__ = [
    "KEEP",
    "Change",
    "MULTI_WIDTH",
    "RID_BYTES",
    "Keep",
    "cas",
    "delete_if_found",
    "each",
    "error_from",
    "get",
    "handle",
    "incr",
    "keys",
    "swap",
    "value_error",
    "write",
]

#: keys one multi-key command works on at once (each still takes a slot
#: of the connection's ``max_inflight`` quorum operations)
MULTI_WIDTH: Final = 32
#: bytes of a request id (the protocol takes 8 to 64)
RID_BYTES: Final = 16

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


async def cas(client: Client, key: Key, expect: bytes | None, value: bytes | None) -> CasReply:
    """If the key holds ``expect`` (``None``: not found), set it to
    ``value`` (``None``: delete it), in one atomic step. Either way the
    reply says what the key holds now."""
    request = Cas(id=0, key=key, expect=expect, value=value, rid=secrets.token_bytes(RID_BYTES))
    reply = await handle(client, request)
    if isinstance(reply, CasReply):
        return reply
    if isinstance(reply, ErrorReply):
        raise CommandError(error_from(reply, write=True))
    raise _unexpected(reply)


async def incr(client: Client, key: Key, by: int) -> int | None:
    """Add ``by`` to the key's integer (not found counts as 0): the new
    value, or ``None`` if the key holds no canonical signed 64-bit decimal
    or the sum would leave that range (``not_integer``: nothing changed)."""
    reply = await handle(client, Incr(id=0, key=key, by=by, rid=secrets.token_bytes(RID_BYTES)))
    if isinstance(reply, IncrReply):
        return reply.value
    if isinstance(reply, ErrorReply):
        if reply.error == "not_integer":
            return None
        raise CommandError(error_from(reply, write=True))
    raise _unexpected(reply)


class Keep:
    """The type of ``KEEP``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "KEEP"


#: what a ``swap`` change returns to leave the key as it is
KEEP: Final = Keep()
#: given the key's current value (``None``: not found), its new value
#: (``None``: delete it), or ``KEEP``
Change: TypeAlias = Callable[[bytes | None], bytes | Keep | None]


def delete_if_found(current: bytes | None) -> Keep | None:
    """The ``swap`` change of ``DEL`` and ``GETDEL``: delete the key if it
    is found, else leave it."""
    return KEEP if current is None else None


async def swap(
    client: Client, key: Key, change: Change, *, guess_absent: bool = False
) -> tuple[bytes | None, bool]:
    """Replace the key's value ``current`` by ``change(current)`` in one
    atomic step, unless that is ``KEEP``: ``(current, True)`` once a cas
    swapped, ``(current, False)`` when the key was left as it was.

    It starts from a ``get``; with ``guess_absent`` (when "not found" is the
    likely state, as for "set if absent") it sends the first cas at once,
    expecting the key not found, and so saves a round when the guess is
    right. Each cas that does not swap says what the key holds now, and the
    next one expects that. Other clients that keep changing the key can
    beat every attempt: after the request deadline of tries (each failed
    one meaning another client's write went through, so the cluster makes
    progress) it gives up with ``TRYAGAIN``, having changed nothing."""
    # A decision to leave the key alone must rest on a read, never on the guess.
    guess = guess_absent and not isinstance(change(None), Keep)
    current = None if guess else await get(client, key)
    deadline = time.monotonic() + client.node.config.request_timeout
    while True:
        value = change(current)
        if isinstance(value, Keep):
            return current, False
        reply = await cas(client, key, current, value)
        if reply.swapped:
            return current, True
        current = reply.value if reply.found else None
        if time.monotonic() > deadline:
            raise CommandError(
                encode_error(
                    "TRYAGAIN other clients kept changing the key for the whole request deadline: "
                    "nothing was done"
                )
            )


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
