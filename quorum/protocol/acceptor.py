"""What a replica does with an incoming store or prepare: the acceptor rules.

A register holds a version (``Versioned``) and, besides it, a *promise*:
the highest ballot of a cas or incr (CASPaxos, Rystsov 2018) that it has
promised not to undercut. Ballots are tags (issued once, totally ordered),
so a promise and a version compare with each other.

The rules, the only ones there are:

- **store** ``(tag, value)``, from a set, a delete, a read's write-back or a
  cas's accept: stored if ``tag`` is above the held tag and at least the
  promise; a duplicate (acknowledged, nothing to write) if ``tag`` is the
  held tag, or a tag this node stored for the same request id; anything
  else is **refused**, with the tag to go above.
- **prepare** ``ballot``: promised if ``ballot`` is above both the promise
  and the held tag; refused otherwise, with the tag to go above.

Why a lower store is refused rather than acknowledged-and-ignored (as plain
ABD may): a cas with ballot ``b`` computes its new value from the highest
version a majority reported when it promised ``b``. A store below ``b``
that a node took after promising would be a write the cas never saw, yet
ordered before it: the cas would overwrite it without having read it. So
after a promise, only what is at least the promise goes in; and since a
store ordered below the held version could likewise slip under a cas that
sits between the two, a store below the held tag is refused too. A refused
set retries with a higher tag; a refused write-back makes the read finish
by a round of its own (see ``quorum.protocol.operation``).

Why a duplicate is safe to acknowledge whatever the promise: the node holds
(or held, durably, for that request id) exactly that version, from before
any promise that could exclude it; counting it is what Paxos calls an
acceptor having accepted that ballot.

Promises after a restart: a node keeps its promises in memory only, and
persists a *reservation* (``Meta.promise_reserved``) ahead of any promise
whose ballot counter exceeds it. A restarted node takes ``floor_after``
the reservation as the promise of every register: it refuses more than it
promised to, never less.
"""

from __future__ import annotations

import enum

import attrs

from register.model import NodeId, Tag, Versioned

__all__ = [
    "Judged",
    "Verdict",
    "floor_after",
    "prepare_verdict",
    "store_verdict",
]


class Verdict(enum.Enum):
    ACCEPT = "accept"
    DUPLICATE = "duplicate"
    REFUSE = "refuse"


@attrs.frozen
class Judged:
    verdict: Verdict
    #: for a refusal: the highest tag the node knows for the key (held or
    #: promised); the coordinator's next tag or ballot goes above it
    above: Tag | None = None


def floor_after(promise_reserved: int) -> Tag:
    """The promise a restarted node assumes for every register: above every
    ballot whose counter is at most ``promise_reserved`` (an empty writer
    sorts first among tags with the next counter). ``Tag.zero()`` when the
    node never promised anything."""
    if promise_reserved <= 0:
        return Tag.zero()
    return Tag(promise_reserved + 1, NodeId(""))


def store_verdict(held: Versioned | None, promise: Tag, tag: Tag, stored_for_rid: Tag | None) -> Judged:
    """May a node holding ``held`` under ``promise`` store a version tagged
    ``tag``? ``stored_for_rid``: the tag this node recorded for the store's
    request id, if it has one on record."""
    held_tag = held.tag if held is not None else None
    if tag == held_tag or (stored_for_rid is not None and tag == stored_for_rid):
        return Judged(Verdict.DUPLICATE)
    if (held_tag is None or tag > held_tag) and tag >= promise:
        return Judged(Verdict.ACCEPT)
    return Judged(Verdict.REFUSE, max(promise, held_tag or promise))


def prepare_verdict(held: Versioned | None, promise: Tag, ballot: Tag) -> Judged:
    """May a node holding ``held`` under ``promise`` promise ``ballot``?"""
    held_tag = held.tag if held is not None else Tag.zero()
    if ballot > promise and ballot > held_tag:
        return Judged(Verdict.ACCEPT)
    return Judged(Verdict.REFUSE, max(promise, held_tag))
