"""Quorum decisions, as plain code: no sockets, no trio, no clock.

Each phase of an ABD operation sends one message to every node (the
coordinator included) and collects one outcome per node: a reply, or a
failure (node unreachable, refused, timed out). A ``Vote`` turns those into
a decision that is ``PENDING`` until a majority has replied (``WON``) or so
many have failed that no majority can reply any more (``LOST``). Once made,
a decision never changes: later outcomes are ignored.

Why a majority: any two majorities of the same cluster share a node, so a
read's majority always contains a node that stored the last completed write.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Generic, TypeVar

import attrs

from register.model import NodeId, Tag, Versioned

__all__ = [
    "Decision",
    "ReadOutcome",
    "Vote",
    "majority",
    "read_outcome",
    "write_tag",
]

R = TypeVar("R")


def majority(cluster_size: int) -> int:
    """The smallest number of nodes that is more than half the cluster."""
    if cluster_size < 1:
        raise ValueError("a cluster has at least one node")
    return cluster_size // 2 + 1


class Decision(enum.Enum):
    PENDING = "pending"
    WON = "won"
    LOST = "lost"


@attrs.define
class Vote(Generic[R]):
    """Outcomes of one phase, one per node at most."""

    nodes: frozenset[NodeId]
    #: replies that win; a majority of ``nodes`` unless overridden (only
    #: the test-only fault switches override it)
    quorum: int | None = None
    replies: dict[NodeId, R] = attrs.field(factory=dict)
    failures: set[NodeId] = attrs.field(factory=set)
    decision: Decision = Decision.PENDING
    needed: int = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.needed = majority(len(self.nodes)) if self.quorum is None else self.quorum

    # A reply can only win the vote and a failure only lose it, so each
    # checks its own condition (this runs for every reply of every phase).

    def reply(self, node: NodeId, value: R) -> Decision:
        replies = self.replies
        if (
            self.decision is Decision.PENDING
            and node in self.nodes
            and node not in replies
            and node not in self.failures
        ):
            replies[node] = value
            if len(replies) >= self.needed:
                self.decision = Decision.WON
        return self.decision

    def fail(self, node: NodeId) -> Decision:
        failures = self.failures
        if (
            self.decision is Decision.PENDING
            and node in self.nodes
            and node not in self.replies
            and node not in failures
        ):
            failures.add(node)
            if len(self.nodes) - len(failures) < self.needed:
                self.decision = Decision.LOST
        return self.decision


@attrs.frozen
class ReadOutcome:
    """What a read's query majority says: the winning version (``None``:
    never written anywhere in the majority), and whether it must be written
    back to a majority before the read may answer."""

    winner: Versioned | None
    write_back: bool


def read_outcome(replies: Iterable[Versioned | None], quorum: int) -> ReadOutcome:
    """Decide a read from the replies of one majority.

    Fast path: when at least ``quorum`` replies carry exactly the highest tag,
    that version is already stored on a majority and the read answers at
    once. Otherwise a later read could reach a majority that has never seen
    it and return an older value, so the winner must first be written back.
    Tags are compared, never values: a tag names one write.
    """
    winner: Versioned | None = None
    agreeing = 0  # replies that carry exactly the winner's tag
    for v in replies:
        if v is None:
            continue
        if winner is None or v.tag > winner.tag:
            winner, agreeing = v, 1
        elif v.tag == winner.tag:
            agreeing += 1
    if winner is None:
        # Nothing written in this majority: "not found" is already the state
        # of a majority, so there is nothing to write back.
        return ReadOutcome(None, write_back=False)
    return ReadOutcome(winner, write_back=agreeing < quorum)


def write_tag(seen: Iterable[Tag | None], floor: int, writer: NodeId) -> Tag:
    """The tag of a new write: above every tag a majority reported, and above
    ``floor``, the highest counter this writer has issued so far (so that two
    writes coordinated at once by one node never share a tag)."""
    highest = Tag.zero()
    for tag in seen:
        if tag is not None and tag > highest:
            highest = tag
    return highest.successor(floor, writer)
