"""One client operation as a state machine, with no I/O (the ABD protocol).

An ``Operation`` is fed the outcome of each node for its current phase and
answers with what to do next; a driver carries that out. The trio
coordinator (``quorum.coordinator``) drives operations over real peer links;
the deterministic simulation in the tests drives the same class over a
simulated network, so the protocol that is proven is the protocol that runs.

    op = Operation.get(key, nodes)             # or .set / .delete
    step = op.start()                          # Send(Query)
    step = op.receive(node, reply_or_None)     # Pending, Send, IssueTag, Done, Failed
    step = op.tag_issued(tag)                  # after IssueTag: Send(Store)

The rules (see ``quorum.protocol.decide`` for the decisions themselves):

- get: query a majority; if fewer than a majority hold the newest tag, store
  it on a majority (write-back) before answering.
- set/delete: query a majority for the key's tag and the request id; if some
  node recorded the rid, finish that write with its tag; otherwise take a new
  tag (the driver issues it: above every tag seen and every tag this node
  issued); store on a majority; answer the tag.
"""

from __future__ import annotations

import enum
from typing import TypeAlias, cast

import attrs

from quorum.protocol.decide import Decision, Vote, read_outcome
from register.model import Key, NodeId, Tag, Versioned, request_fingerprint

__all__ = [
    "PENDING",
    "Done",
    "Failed",
    "IssueTag",
    "Operation",
    "Pending",
    "QueryResult",
    "Rejected",
    "RidSeen",
    "SendQuery",
    "SendStore",
    "Step",
]

#: what one node has on record for a request id: the tag the write was
#: stored under and the fingerprint of that write (``request_fingerprint``)
RidSeen: TypeAlias = tuple[Tag, bytes]
#: what one node answers to a query: its version of the key (None: never
#: written) and its record of the request id (None: unknown rid)
QueryResult: TypeAlias = tuple[Versioned | None, RidSeen | None]


@attrs.frozen
class SendQuery:
    key: Key
    rid: bytes | None


@attrs.frozen
class SendStore:
    key: Key
    version: Versioned
    rid: bytes | None


@attrs.frozen
class IssueTag:
    """The driver must issue a new tag above ``seen`` (and above every tag
    this node issued), then call ``tag_issued``."""

    seen: Tag


@attrs.frozen
class Pending:
    pass


@attrs.frozen
class Done:
    #: for a get, the version read (None: never written); for a write, its tag
    result: Versioned | Tag | None
    #: a get that had to write back before answering
    wrote_back: bool = False


@attrs.frozen
class Failed:
    """No majority could answer: the outcome is unknown."""

    reason: str


@attrs.frozen
class Rejected:
    """The request is invalid and was not applied (nothing was stored)."""

    reason: str


Step: TypeAlias = SendQuery | SendStore | IssueTag | Pending | Done | Failed | Rejected
PENDING = Pending()


class Kind(enum.Enum):
    GET = "get"
    SET = "set"
    DELETE = "delete"


class Phase(enum.Enum):
    NEW = "new"
    QUERY = "query"
    TAG = "tag"
    STORE = "store"
    OVER = "over"


@attrs.define
class Operation:
    kind: Kind
    key: Key
    nodes: frozenset[NodeId]
    value: bytes | None = None
    rid: bytes | None = None
    #: acknowledgements a write needs; None is a majority (only the
    #: test-only fault switches change it)
    write_quorum: int | None = None
    #: skip the read write-back (test-only fault switch)
    skip_write_back: bool = False
    phase: Phase = Phase.NEW
    _queries: Vote[QueryResult] | None = None
    _stores: Vote[bool] | None = None
    _store: SendStore | None = None
    _read: Versioned | None = None

    @classmethod
    def get(cls, key: Key, nodes: frozenset[NodeId], **switches: object) -> Operation:
        return cls(Kind.GET, key, nodes, **switches)  # type: ignore[arg-type]

    @classmethod
    def set(
        cls, key: Key, value: bytes, nodes: frozenset[NodeId], rid: bytes | None = None, **switches: object
    ) -> Operation:
        return cls(Kind.SET, key, nodes, value, rid, **switches)  # type: ignore[arg-type]

    @classmethod
    def delete(
        cls, key: Key, nodes: frozenset[NodeId], rid: bytes | None = None, **switches: object
    ) -> Operation:
        return cls(Kind.DELETE, key, nodes, None, rid, **switches)  # type: ignore[arg-type]

    def start(self) -> Step:
        assert self.phase is Phase.NEW
        self.phase = Phase.QUERY
        self._queries = Vote(self.nodes)
        return SendQuery(self.key, self.rid)

    def receive(self, node: NodeId, reply: QueryResult | bool | None) -> Step:
        """The outcome of ``node`` for the current phase: its reply, or
        ``None`` if it failed (unreachable, refused, link broken)."""
        phase = self.phase
        if phase is Phase.QUERY:
            queries = self._queries
            assert queries is not None
            decision = queries.fail(node) if reply is None else queries.reply(node, cast(QueryResult, reply))
            return PENDING if decision is Decision.PENDING else self._after_query(queries)
        if phase is Phase.STORE:
            stores = self._stores
            assert stores is not None
            decision = stores.reply(node, True) if reply else stores.fail(node)
            return PENDING if decision is Decision.PENDING else self._after_store(stores)
        return PENDING  # a straggler of a finished phase

    def tag_issued(self, tag: Tag) -> Step:
        assert self.phase is Phase.TAG
        return self._store_phase(SendStore(self.key, Versioned(tag, self.value), self.rid))

    def _after_query(self, votes: Vote[QueryResult]) -> Step:
        if votes.decision is Decision.LOST:
            return self._fail(votes)
        replies = votes.replies.values()
        if self.kind is Kind.GET:
            outcome = read_outcome([v for v, _ in replies], votes.needed)
            self._read = winner = outcome.winner
            if winner is None or not outcome.write_back or self.skip_write_back:
                self.phase = Phase.OVER
                return Done(winner)
            return self._store_phase(SendStore(self.key, winner, None))
        seen = [record for _, record in replies if record is not None]
        if seen:
            mine = request_fingerprint(self.key, self.value)
            if any(request != mine for _, request in seen):
                # Nothing has been stored yet, so refusing is definite.
                self.phase = Phase.OVER
                return Rejected("this rid was already used for a different write (key or value)")
            # A retry of a write some node already stored: finish that one,
            # under its tag (the value is the same: same fingerprint).
            tag = max(tag for tag, _ in seen)
            return self._store_phase(SendStore(self.key, Versioned(tag, self.value), self.rid))
        self.phase = Phase.TAG
        return IssueTag(max((v.tag for v, _ in replies if v is not None), default=Tag.zero()))

    def _store_phase(self, store: SendStore) -> Step:
        self.phase = Phase.STORE
        quorum = self.write_quorum if self.kind is not Kind.GET else None
        self._stores = Vote(self.nodes, quorum=quorum)
        self._store = store
        return store

    def _after_store(self, votes: Vote[bool]) -> Step:
        assert self._store is not None
        if votes.decision is Decision.LOST:
            return self._fail(votes)
        self.phase = Phase.OVER
        if self.kind is Kind.GET:
            return Done(self._read, wrote_back=True)
        return Done(self._store.version.tag)

    def _fail(self, votes: Vote[QueryResult] | Vote[bool]) -> Failed:
        self.phase = Phase.OVER
        return Failed(
            f"{len(votes.failures)} of {len(self.nodes)} nodes failed; a majority ({votes.needed}) is needed"
        )
