"""The commands on keys whatever they hold: ``DEL``, ``EXISTS``.

Invariants:

- a key named twice is worked on once; ``EXISTS`` still counts it twice,
  as Redis does, and ``DEL`` once;
- keys are worked on concurrently (``native.each``), each key on its own:
  the count is a sum of per-key results, not one snapshot of all keys;
- ``DEL`` deletes each key in one atomic step (``native.swap``): a key
  counts if and only if this command deleted a value it held, so two
  concurrent ``DEL`` of one key count it once between them.
"""

from __future__ import annotations

from net.resp import native
from net.resp.context import Client, Job
from net.resp.replies import encode_integer
from register.model import Key

__all__ = ["del_", "exists"]


def del_(client: Client, args: list[bytes]) -> bytes | Job:
    keys = native.keys(args[1:])
    if isinstance(keys, bytes):
        return keys
    unique = list(dict.fromkeys(keys))
    deleted = 0

    async def one(key: Key) -> None:
        nonlocal deleted
        # One atomic step per key: counted if and only if this command's
        # cas deleted it (a plain delete cannot say whether the key existed).
        _, swapped = await native.swap(client, key, native.delete_if_found)
        if swapped:
            deleted += 1

    async def run() -> bytes:
        await native.each(unique, one)
        return encode_integer(deleted)

    return Job(keys, run)


def exists(client: Client, args: list[bytes]) -> bytes | Job:
    keys = native.keys(args[1:])
    if isinstance(keys, bytes):
        return keys
    found: set[Key] = set()

    async def one(key: Key) -> None:
        if await native.get(client, key) is not None:
            found.add(key)

    async def run() -> bytes:
        await native.each(list(dict.fromkeys(keys)), one)
        # Redis counts a key named twice twice.
        return encode_integer(sum(1 for k in keys if k in found))

    return Job(keys, run)
