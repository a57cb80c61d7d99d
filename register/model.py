"""Tags, versioned values and the merge rule.

A ``Tag`` names exactly one write: ``(counter, writer)``, ordered first by
counter, then by writer id. A ``Versioned`` is what a register holds: a value
(``bytes``) or a tombstone (``value is None``) under its tag. Tombstones are
kept forever; dropping one would let an older value come back through a
replica that missed the delete.

Invariant relied on everywhere: two ``Versioned`` with equal tags carry the
same value, because a tag is issued once (see ``quorum.coordinator``). So
``merge`` may compare tags only, never values.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple, NewType

import attrs

NodeId = NewType("NodeId", str)
Key = NewType("Key", bytes)


class Tag(NamedTuple):
    """The version of a register: compared as ``(counter, writer)``.

    A named tuple rather than an attrs class: tags are compared on every
    query reply and merge, and tuple comparison runs in C."""

    counter: int
    writer: NodeId

    @classmethod
    def zero(cls) -> Tag:
        """A tag lower than any issued one (the never-written register)."""
        return cls(0, NodeId(""))

    def successor(self, floor: int, writer: NodeId) -> Tag:
        """The tag a writer issues after seeing ``self``: counter above both
        ``self`` and ``floor`` (the writer's own last issued counter)."""
        return Tag(max(self.counter, floor) + 1, writer)


@attrs.frozen
class Versioned:
    """A register's content: ``value`` under ``tag``; ``None`` is a tombstone."""

    tag: Tag
    value: bytes | None

    @property
    def deleted(self) -> bool:
        return self.value is None


@attrs.frozen(kw_only=True)
class RidNote:
    """What travels with a write that carries a request id: the rid, the
    fingerprint of its request, the tag the write was stored under and, for
    an ``incr``, its result (the new value), which a retry must answer
    without adding again (the stored version may be overwritten by then).

    ``request`` is the fingerprint of the request (``request_fingerprint``,
    ``cas_fingerprint``, ``incr_fingerprint``): a retry carries the same rid
    *and* the same op and arguments; the same rid on another request is a
    client error, never a reason to answer with another write's result.
    """

    rid: bytes
    request: bytes
    tag: Tag
    result: int | None = None
    #: the newest blind write (set or delete) in the past of the version
    #: this note came with: its own tag for a set or delete, the past of
    #: the version it was built on for a round (cas, incr, a value rewritten
    #: under a ballot); ``None`` when not known (see
    #: ``quorum.protocol.operation``, "A refused set")
    past: Tag | None = None
    #: for a round: the tag of the version it was built on (``Tag.zero()``:
    #: none); ``None`` for a set or delete, or when not known
    base: Tag | None = None


@attrs.frozen(kw_only=True)
class RidRecord:
    """A remembered request id (a ``RidNote`` a replica stored).

    ``at`` is wall-clock seconds, used only to expire old records.
    """

    rid: bytes
    request: bytes
    tag: Tag
    at: float
    result: int | None = None
    past: Tag | None = None
    base: Tag | None = None

    @classmethod
    def of(cls, note: RidNote, at: float) -> RidRecord:
        return cls(
            rid=note.rid,
            request=note.request,
            tag=note.tag,
            at=at,
            result=note.result,
            past=note.past,
            base=note.base,
        )

    @property
    def note(self) -> RidNote:
        return RidNote(
            rid=self.rid,
            request=self.request,
            tag=self.tag,
            result=self.result,
            past=self.past,
            base=self.base,
        )


def _digest(key: Key, *parts: bytes) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(len(key).to_bytes(4, "big") + key)
    for part in parts:
        digest.update(part)
    return digest.digest()


def request_fingerprint(key: Key, value: bytes | None) -> bytes:
    """A 128-bit digest of a blind write (a set of ``value``, or a delete)."""
    return _digest(key, b"d" if value is None else b"s" + value)


def cas_fingerprint(key: Key, expect: bytes | None, value: bytes | None) -> bytes:
    """A 128-bit digest of a cas request (op, key and both arguments)."""

    def part(v: bytes | None) -> bytes:
        return b"n" if v is None else b"b" + len(v).to_bytes(4, "big") + v

    return _digest(key, b"c", part(expect), part(value))


def incr_fingerprint(key: Key, by: int) -> bytes:
    """A 128-bit digest of an incr request (op, key and step)."""
    return _digest(key, b"i", by.to_bytes(9, "big", signed=True))


def newer(held: Versioned | None, incoming: Versioned) -> bool:
    """Would a replica holding ``held`` adopt ``incoming``?"""
    return held is None or incoming.tag > held.tag


def merge(a: Versioned | None, b: Versioned | None) -> Versioned | None:
    """The replica rule as a join: the version with the greater tag wins."""
    if a is None:
        return b
    if b is None:
        return a
    return b if b.tag > a.tag else a
