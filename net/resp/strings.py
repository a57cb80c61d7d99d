"""The string commands: ``GET``, ``SET``, ``MGET``, ``MSET``.

Each key is one register of the native protocol: ``GET`` is a quorum read,
``SET`` a quorum write. Invariants:

- arguments (keys, values, options) are all checked before any request is
  made: a command refused for one argument writes nothing;
- ``MGET`` and ``MSET`` run one request per distinct key, concurrently
  (``native.each``); they are not one transaction (docs/resp.md);
- the values of one ``MGET`` reply stay within ``max_frame`` bytes, as a
  native reply must.
"""

from __future__ import annotations

from typing import Final

from net.resp import native
from net.resp.context import Client, CommandError, Job
from net.resp.replies import OK, encode_array, encode_bulk, encode_error, show, wrong_arity
from register.model import Key

__all__ = ["get", "mget", "mset", "set_"]

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


def get(client: Client, args: list[bytes]) -> bytes | Job:
    keys = native.keys(args[1:])
    if isinstance(keys, bytes):
        return keys
    nil = client.nil()

    async def run() -> bytes:
        value = await native.get(client, keys[0])
        return nil if value is None else encode_bulk(value)

    return Job(keys, run)


def set_(client: Client, args: list[bytes]) -> bytes | Job:
    keys = native.keys(args[1:2])
    if isinstance(keys, bytes):
        return keys
    for option in args[3:]:
        why = _UNSUPPORTED_SET_OPTIONS.get(option.lower())
        if why is None:
            return encode_error("ERR syntax error")
        return encode_error(f"ERR SET option '{show(option).upper()}' is not supported by qkv ({why})")
    value = args[2]
    if (error := native.value_error(client, value)) is not None:
        return error

    async def run() -> bytes:
        await native.write(client, keys[0], value)
        return OK

    return Job(keys, run)


def mget(client: Client, args: list[bytes]) -> bytes | Job:
    keys = native.keys(args[1:])
    if isinstance(keys, bytes):
        return keys
    values: dict[Key, bytes | None] = {}
    nil = client.nil()
    budget = client.server.limits.max_frame
    total = 0

    async def one(key: Key) -> None:
        nonlocal total
        value = await native.get(client, key)
        if value is not None:
            total += len(value)
            if total > budget:
                message = f"ERR MGET reply over the limit of {budget} bytes: ask for fewer keys at once"
                raise CommandError(encode_error(message))
        values[key] = value

    async def run() -> bytes:
        await native.each(list(dict.fromkeys(keys)), one)
        return encode_array([nil if (v := values[k]) is None else encode_bulk(v) for k in keys])

    return Job(keys, run)


def mset(client: Client, args: list[bytes]) -> bytes | Job:
    if len(args) % 2 != 1:
        return wrong_arity(args[0])
    keys = native.keys(args[1::2])
    if isinstance(keys, bytes):
        return keys
    pairs: dict[Key, bytes] = {}
    for key, value in zip(keys, args[2::2], strict=True):
        if (error := native.value_error(client, value)) is not None:
            return error
        pairs[key] = value  # the last value of a key named twice wins

    async def one(key: Key) -> None:
        await native.write(client, key, pairs[key])

    async def run() -> bytes:
        await native.each(list(pairs), one)
        return OK

    return Job(keys, run)
