"""The string commands: ``GET``, ``SET`` (with ``NX``, ``XX``, ``GET``),
``SETNX``, ``GETSET``, ``GETDEL``, ``MGET``, ``MSET``.

Each key is one register of the native protocol: ``GET`` is a quorum read,
a plain ``SET`` a quorum write, and every command that sets a key on a
condition or returns the value it replaces is one atomic step made of
``cas`` (``native.swap``). Invariants:

- arguments (keys, values, options) are all checked before any request is
  made: a command refused for one argument writes nothing;
- a conditional or value-returning write changes the key at most once, and
  the old value it returns is exactly the one it replaced (atomic, as in
  Redis: no other write comes between the read and the write);
- ``MGET`` and ``MSET`` run one request per distinct key, concurrently
  (``native.each``); they are not one transaction (docs/resp.md);
- the values of one ``MGET`` reply stay within ``max_frame`` bytes, as a
  native reply must.
"""

from __future__ import annotations

from typing import Final

import attrs

from net.resp import native
from net.resp.context import Client, CommandError, Job
from net.resp.replies import OK, encode_array, encode_bulk, encode_error, encode_integer, show, wrong_arity
from register.model import Key

__all__ = ["get", "getdel", "getset", "mget", "mset", "set_", "setnx"]

#: SET options qkv refuses until it has TTLs (each is then an error, and
#: nothing is written)
_TTL_OPTIONS: Final = frozenset({b"ex", b"px", b"exat", b"pxat", b"keepttl"})


def get(client: Client, args: list[bytes]) -> bytes | Job:
    keys = native.keys(args[1:])
    if isinstance(keys, bytes):
        return keys
    nil = client.nil()

    async def run() -> bytes:
        value = await native.get(client, keys[0])
        return nil if value is None else encode_bulk(value)

    return Job(keys, run)


@attrs.frozen
class _SetOptions:
    #: NX: only if the key is not found
    if_absent: bool = False
    #: XX: only if the key is found
    if_present: bool = False
    #: GET: reply with the value replaced (nil: none) rather than OK
    get: bool = False


def _set_options(options: list[bytes]) -> _SetOptions | bytes:
    """The options of SET, read in order as Redis reads them: ``NX`` and
    ``XX`` together are a syntax error, as is any unknown word; a TTL
    option is refused as soon as it is met."""
    nx = xx = get = False
    for option in options:
        word = option.lower()
        if word == b"nx" and not xx:
            nx = True
        elif word == b"xx" and not nx:
            xx = True
        elif word == b"get":
            get = True
        elif word in _TTL_OPTIONS:
            return encode_error(
                f"ERR SET option '{show(option).upper()}' is not supported by qkv (no TTLs yet)"
            )
        else:
            return encode_error("ERR syntax error")
    return _SetOptions(nx, xx, get)


def _new_value(value: bytes, options: _SetOptions) -> native.Change:
    def change(current: bytes | None) -> bytes | native.Keep:
        if (options.if_absent and current is not None) or (options.if_present and current is None):
            return native.KEEP
        return value

    return change


def _key_and_value(client: Client, args: list[bytes]) -> tuple[Key, bytes] | bytes:
    keys = native.keys(args[1:2])
    if isinstance(keys, bytes):
        return keys
    if (error := native.value_error(client, args[2])) is not None:
        return error
    return keys[0], args[2]


def set_(client: Client, args: list[bytes]) -> bytes | Job:
    keys = native.keys(args[1:2])
    if isinstance(keys, bytes):
        return keys
    options = _set_options(args[3:])
    if isinstance(options, bytes):
        return options
    key, value = keys[0], args[2]
    if (error := native.value_error(client, value)) is not None:
        return error
    nil = client.nil()

    async def plain() -> bytes:
        await native.write(client, key, value)
        return OK

    async def atomic() -> bytes:
        # NX guesses the key is absent: one cas when it is.
        old, swapped = await native.swap(
            client, key, _new_value(value, options), guess_absent=options.if_absent
        )
        if options.get:
            return nil if old is None else encode_bulk(old)
        return OK if swapped else nil

    return Job([key], atomic if options != _SetOptions() else plain)


def setnx(client: Client, args: list[bytes]) -> bytes | Job:
    checked = _key_and_value(client, args)
    if isinstance(checked, bytes):
        return checked
    key, value = checked

    async def run() -> bytes:
        _, swapped = await native.swap(
            client, key, _new_value(value, _SetOptions(if_absent=True)), guess_absent=True
        )
        return encode_integer(1 if swapped else 0)

    return Job([key], run)


def getset(client: Client, args: list[bytes]) -> bytes | Job:
    checked = _key_and_value(client, args)
    if isinstance(checked, bytes):
        return checked
    key, value = checked
    nil = client.nil()

    async def run() -> bytes:
        old, _ = await native.swap(client, key, lambda current: value)
        return nil if old is None else encode_bulk(old)

    return Job([key], run)


def getdel(client: Client, args: list[bytes]) -> bytes | Job:
    keys = native.keys(args[1:])
    if isinstance(keys, bytes):
        return keys
    nil = client.nil()

    async def run() -> bytes:
        old, _ = await native.swap(client, keys[0], native.delete_if_found)
        return nil if old is None else encode_bulk(old)

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
