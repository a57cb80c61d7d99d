"""One client operation as a state machine, with no I/O.

An ``Operation`` is fed the outcome of each node for its current phase and
answers with what to do next; a driver carries that out. The trio
coordinator (``quorum.coordinator``) drives operations over real peer links;
the deterministic simulation in the tests drives the same class over a
simulated network, so the protocol that is proven is the protocol that runs.

    op = Operation.get(key, nodes)             # or .set / .delete / .cas / .incr
    step = op.start()                          # SendQuery, or IssueTag for a cas
    step = op.receive(node, reply_or_None)     # Pending, Send*, IssueTag, Done, Failed, Rejected
    step = op.tag_issued(tag)                  # after IssueTag: SendStore or SendPrepare

Blind operations are multi-writer ABD; ``cas`` and ``incr`` are CASPaxos
rounds on the same registers (see ``quorum.protocol.acceptor`` for the rule
that lets them share a key):

- get: query a majority; answer at once when a majority holds the newest
  tag; otherwise store it on a majority (write-back) first. A write-back
  refused by a node that promised a higher ballot cannot be completed as is:
  the read then finishes by a round of its own (prepare, and accept the
  current value under the new ballot when a majority does not hold it yet).
- set/delete: query a majority for the key's tag, its promise and the
  request id; if some node recorded the rid, finish that write under its
  tag; otherwise take a new tag above every tag and promise seen; store on
  a majority. Refused by a majority (a higher tag or promise got there
  first) while no node took it, it retries under a tag above what the
  refusals reported; if some node may have taken it, see "A refused set".
- cas/incr: prepare a new ballot (a tag) on a majority; the current value is
  the version with the highest tag among the promises; compute the new
  value; accept ``(ballot, new)`` on a majority; answer. Refused in either
  phase, a new round starts with a higher ballot (the driver backs off
  first, so that two coordinators do not preempt each other for ever).
  An outcome read from a version that a majority does not hold yet (a
  cas that does not swap, an incr on a non-integer) is written under the
  ballot first, as a read's write-back is.

A refused set whose store some node may have taken cannot simply store
again under a higher tag: a round may have read that store from the node
that took it and built on it (a cas that swapped from it, an incr that
added to it), and the value stored again would undo that round. Nor can it
answer as if done: a round that did not read it may have made the current
version, which leaves it out. So it settles by a round of its own: prepare
a ballot, and look at the *past* of the current version, the newest blind
write it descends from (every version carries it in the rid note of the
write that made it; ``RidNote.past``). An earlier attempt at or below that
past is ordered before the current version (read and built on, or
overwritten by a later blind write): the set is done, once the current
version is on a majority. Every attempt above it was left out and never
read by anything a majority holds: the set stores its value under the
ballot. A current version whose past is not known (copied by a catch-up,
or its record expired) leaves the outcome unknown.

Request ids of cas and incr: every round carries the rid (the driver makes
one up when the client sent none, so that a new round never applies a
change twice). A prepare majority that reports the rid on record finishes
that write instead of applying it again, and answers from the record; when
the record's version is no longer the newest and not every node of the
majority has it, the op cannot tell whether that attempt took effect and
fails with an unknown outcome instead of guessing.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import NamedTuple, TypeAlias

import attrs

from quorum.protocol.atomic import NotAnInteger, apply_cas, apply_incr
from quorum.protocol.decide import Decision, Vote, majority, read_outcome
from register.model import (
    Key,
    NodeId,
    RidNote,
    Tag,
    Versioned,
    cas_fingerprint,
    incr_fingerprint,
    request_fingerprint,
)

#: rid notes a version carries of the writes it was built on
LINEAGE = 32

__all__ = [
    "LINEAGE",
    "PENDING",
    "CasResult",
    "Done",
    "Failed",
    "IncrResult",
    "IssueTag",
    "Kind",
    "Nack",
    "Operation",
    "Pending",
    "QueryResult",
    "Rejected",
    "SendPrepare",
    "SendQuery",
    "SendStore",
    "Step",
]


class QueryResult(NamedTuple):
    """What one node answers to a query or a prepare (a named tuple: one is
    built for every reply of every phase)."""

    #: its version of the key (None: never written there)
    version: Versioned | None
    #: its record of the request's rid (None: unknown rid)
    rid_seen: RidNote | None = None
    #: its promise for the key, when above the held tag
    promise: Tag | None = None
    #: the rid notes that came with the held version: the write that made
    #: it, and those it built on (its lineage, newest first)
    lineage: tuple[RidNote, ...] = ()


@attrs.frozen
class Nack:
    """A node refused a store or a prepare; the next try goes above ``above``."""

    above: Tag


Reply: TypeAlias = QueryResult | Nack | bool | None


@attrs.frozen
class SendQuery:
    key: Key
    rid: bytes | None


@attrs.frozen
class SendPrepare:
    key: Key
    ballot: Tag
    rid: bytes | None


@attrs.frozen
class SendStore:
    key: Key
    version: Versioned
    #: rid notes that travel with the version: its own request's, and the
    #: one of the version it finishes or builds on
    notes: tuple[RidNote, ...] = ()


@attrs.frozen
class IssueTag:
    """The driver must issue a new tag above ``seen`` (and above every tag
    this node issued, and what it knows of ``key``), then call
    ``tag_issued``; ``attempt`` > 0 is a retry after a refusal, which the
    driver delays by a random backoff that grows with it."""

    key: Key
    seen: Tag
    attempt: int = 0


@attrs.frozen
class Pending:
    pass


@attrs.frozen
class CasResult:
    swapped: bool
    #: what the key holds now (None: never written)
    version: Versioned | None


@attrs.frozen
class IncrResult:
    value: int
    tag: Tag


@attrs.frozen
class Done:
    #: get: the version read (None: never written); set and delete: the
    #: tag; cas: ``CasResult``; incr: ``IncrResult``
    result: Versioned | Tag | CasResult | IncrResult | None
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
    #: an incr on a value that is not a canonical int64 (``not_integer``)
    not_integer: bool = False


Step: TypeAlias = SendQuery | SendPrepare | SendStore | IssueTag | Pending | Done | Failed | Rejected
PENDING = Pending()


class Kind(enum.Enum):
    GET = "get"
    SET = "set"
    DELETE = "delete"
    CAS = "cas"
    INCR = "incr"


class Phase(enum.Enum):
    NEW = "new"
    QUERY = "query"
    TAG = "tag"
    PREPARE = "prepare"
    STORE = "store"
    OVER = "over"


@attrs.define
class Operation:
    kind: Kind
    key: Key
    nodes: frozenset[NodeId]
    value: bytes | None = None
    rid: bytes | None = None
    #: cas: the value expected (None: not found); incr: unused
    expect: bytes | None = None
    #: incr: the step
    by: int = 0
    #: acknowledgements a write needs; None is a majority (only the
    #: test-only fault switches change it)
    write_quorum: int | None = None
    #: skip the read write-back (test-only fault switch)
    skip_write_back: bool = False
    phase: Phase = Phase.NEW
    #: rounds started after a refusal
    attempts: int = 0
    _queries: Vote[QueryResult] | None = None
    _stores: Vote[bool] | None = None
    _store: SendStore | None = None
    _read: Versioned | None = None
    #: the highest tag that refusals of the current phase reported
    _above: Tag | None = None
    #: what to issue the next tag for: a store (set, delete) or a prepare
    _next: Phase = Phase.STORE
    #: what a store phase answers once it wins
    _answer: Done | Rejected | None = None
    #: the tag last issued: the ballot of the current round
    _last_tag: Tag | None = None
    #: this op has sent an accept of its own (its rid may be on record)
    _accepted_once: bool = False
    #: nodes of the current phase that failed without an answer
    _unreachable: int = 0
    #: nodes that refused the current store phase
    _refusers: set[NodeId] = attrs.Factory(set)
    #: the tags of this op's own earlier stores (a set's value, a cas's or
    #: an incr's accept) that some node may hold, and the nodes that may
    _tried: list[Tag] = attrs.Factory(list)
    _holders: set[NodeId] = attrs.Factory(set)
    #: a cas or incr is reading where its lost accept went (a query)
    _checking: bool = False
    #: its accepts up to this tag were left out of a chosen version
    _dead: Tag | None = None
    #: versions traced (see _trace): the accept each descends from, or False
    _traced: dict[Tag, RidNote | bool] = attrs.Factory(dict)

    # --- construction -----------------------------------------------------

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

    @classmethod
    def cas(
        cls,
        key: Key,
        expect: bytes | None,
        value: bytes | None,
        nodes: frozenset[NodeId],
        rid: bytes,
        **switches: object,
    ) -> Operation:
        return cls(Kind.CAS, key, nodes, value, rid, expect, **switches)  # type: ignore[arg-type]

    @classmethod
    def incr(cls, key: Key, by: int, nodes: frozenset[NodeId], rid: bytes, **switches: object) -> Operation:
        return cls(Kind.INCR, key, nodes, None, rid, by=by, **switches)  # type: ignore[arg-type]

    @property
    def fingerprint(self) -> bytes:
        """What a rid record of this request must match."""
        if self.kind is Kind.CAS:
            return cas_fingerprint(self.key, self.expect, self.value)
        if self.kind is Kind.INCR:
            return incr_fingerprint(self.key, self.by)
        return request_fingerprint(self.key, self.value)

    # --- the driver's calls -----------------------------------------------

    def start(self) -> Step:
        assert self.phase is Phase.NEW
        if self.kind in (Kind.CAS, Kind.INCR):
            return self._round(Tag.zero())
        self.phase = Phase.QUERY
        self._queries = Vote(self.nodes)
        return SendQuery(self.key, self.rid)

    def receive(self, node: NodeId, reply: Reply) -> Step:
        """The outcome of ``node`` for the current phase: its reply, a
        refusal (``Nack``), or ``None`` if it failed (unreachable,
        recovering, link broken)."""
        phase = self.phase
        if phase is Phase.QUERY or phase is Phase.PREPARE:
            queries = self._queries
            assert queries is not None
            if type(reply) is QueryResult:
                decision = queries.reply(node, reply)
            else:
                self._refused(reply)
                decision = queries.fail(node)
            if decision is Decision.PENDING:
                return PENDING
            return self._after_query(queries) if phase is Phase.QUERY else self._after_prepare(queries)
        if phase is Phase.STORE:
            stores = self._stores
            assert stores is not None
            if reply is True:
                decision = stores.reply(node, True)
            else:
                if isinstance(reply, Nack):
                    self._refusers.add(node)
                self._refused(reply)
                decision = stores.fail(node)
            return PENDING if decision is Decision.PENDING else self._after_store(stores)
        return PENDING  # a straggler of a finished phase

    def tag_issued(self, tag: Tag) -> Step:
        assert self.phase is Phase.TAG
        self._last_tag = tag
        if self._next is Phase.PREPARE:
            self.phase = Phase.PREPARE
            # After an accept of its own that some node may hold, a cas or
            # incr hears from a majority besides those nodes (see _recorded).
            quorum = min(len(self.nodes), majority(len(self.nodes)) + len(self._holders))
            atomic = self.kind is Kind.CAS or self.kind is Kind.INCR
            self._queries = Vote(self.nodes, quorum=quorum if atomic and self._holders else None)
            self._above = None
            self._unreachable = 0
            return SendPrepare(self.key, tag, self.rid)
        return self._write(tag)

    # --- phases -----------------------------------------------------------

    def _refused(self, reply: Reply) -> None:
        if isinstance(reply, Nack):
            if self._above is None or reply.above > self._above:
                self._above = reply.above
        else:
            self._unreachable += 1

    def _after_query(self, votes: Vote[QueryResult]) -> Step:
        if self._checking:
            return self._after_check(votes)
        if votes.decision is Decision.LOST:
            return self._fail(votes)
        replies = list(votes.replies.values())
        if self.kind is Kind.GET:
            outcome = read_outcome([r.version for r in replies], votes.needed)
            self._read = winner = outcome.winner
            if winner is None or not outcome.write_back or self.skip_write_back:
                self.phase = Phase.OVER
                return Done(winner)
            self._answer = Done(winner, wrote_back=True)
            return self._store_phase(SendStore(self.key, winner, _lineage_of(replies, winner.tag)))
        seen = [r.rid_seen for r in replies if r.rid_seen is not None]
        if seen:
            mine = self.fingerprint
            if any(note.request != mine for note in seen):
                # Nothing has been stored yet, so refusing is definite.
                self.phase = Phase.OVER
                return Rejected("this rid was already used for a different request (op, key or value)")
            # A retry of a write some node already stored: finish that one,
            # under its tag (the value is the same: same fingerprint).
            note = max(seen, key=lambda n: n.tag)
            self._tried.append(note.tag)
            return self._store_phase(SendStore(self.key, Versioned(note.tag, self.value), (note,)))
        return self._issue(_highest_known(replies))

    def _after_prepare(self, votes: Vote[QueryResult]) -> Step:
        if votes.decision is Decision.LOST:
            return self._retry_or_fail(votes)
        replies = list(votes.replies.values())
        needed = majority(len(self.nodes))
        outcome = read_outcome([r.version for r in replies], needed)
        current = outcome.winner
        on_majority = not outcome.write_back
        ballot = self._ballot
        if current is not None and current.tag >= ballot:
            # Stored above this ballot since its promise was made: go higher.
            return self._round(current.tag)
        carried = _lineage_of(replies, current.tag) if current is not None else ()
        past = _past_of(replies, current)
        if self.kind is Kind.GET:
            # A read finishing by a round of its own (see the docstring).
            if current is None or on_majority:
                self.phase = Phase.OVER
                return Done(current, wrote_back=True)
            store = self._rewrite(current, carried, past)
            self._answer = Done(store.version, wrote_back=True)
            return self._store_phase(store)
        if self.kind is not Kind.CAS and self.kind is not Kind.INCR:
            return self._settle(current, on_majority, carried, past)
        # A node whose promise reports no record holds no accept of this op
        # and never will (the promise refuses them now).
        self._holders -= {n for n, r in votes.replies.items() if not self._live(r.rid_seen)}
        recorded = self._recorded(votes.replies, current, needed, past)
        if recorded is not None:
            return recorded
        value = current.value if current is not None else None
        if self.kind is Kind.CAS:
            swap = apply_cas(value, self.expect, self.value)
            if swap.swapped:
                return self._accept(swap.value, None, current, carried, past)
            return self._answer_read(current, on_majority, carried, past, None)
        try:
            added = apply_incr(value, self.by)
        except NotAnInteger as exc:
            return self._answer_read(
                current, on_majority, carried, past, Rejected(str(exc), not_integer=True)
            )
        return self._accept(added.value, added.number, current, carried, past)

    def _settle(
        self,
        current: Versioned | None,
        on_majority: bool,
        carried: tuple[RidNote, ...],
        past: Tag | None,
    ) -> Step:
        """A set or delete refused after some node may have taken it: done
        if an earlier attempt is in the current version's past, else
        written anew under the ballot (see "A refused set")."""
        if past is None:
            return self._over(
                Failed("a previous attempt of this write may or may not have taken effect (outcome unknown)")
            )
        done = [tag for tag in self._tried if tag <= past]
        if not done:
            return self._write(self._ballot)
        answer = Done(max(done))
        if on_majority:
            return self._over(answer)
        assert current is not None  # its past holds an attempt
        self._answer = answer
        return self._store_phase(self._rewrite(current, carried, past))

    def _write(self, tag: Tag) -> Step:
        """Store this set's or delete's own value under ``tag``, with its rid
        note (a rid made of the tag when the request has none: the note
        carries the version's past)."""
        rid = self.rid if self.rid is not None else _rid_of(b"w", tag)
        note = RidNote(rid=rid, request=self.fingerprint, tag=tag, past=tag)
        return self._store_phase(SendStore(self.key, Versioned(tag, self.value), (note,)))

    def _rewrite(self, current: Versioned, carried: tuple[RidNote, ...], past: Tag | None) -> SendStore:
        """``current``'s value under this round's ballot: what a round stores
        when it answers from a version a majority does not hold yet. Its
        note carries the past of ``current``; it is nobody's request."""
        ballot = self._ballot
        note = RidNote(rid=_rid_of(b"b", ballot), request=b"", tag=ballot, past=past, base=current.tag)
        return SendStore(self.key, Versioned(ballot, current.value), (note, *carried))

    def _recorded(
        self, by_node: dict[NodeId, QueryResult], current: Versioned | None, needed: int, past: Tag | None
    ) -> Step | None:
        """The rid found on record by this prepare majority: finish that
        write and answer from its record rather than apply it twice; or
        ``None``: it did not take effect, apply it."""
        replies = list(by_node.values())
        seen = [r.rid_seen for r in replies if r.rid_seen is not None]
        if not seen:
            return None
        if any(note.request != self.fingerprint for note in seen):
            if self._accepted_once:
                return self._over(Failed("conflicting records of this request id (outcome unknown)"))
            return self._over(Rejected("this rid was already used for a different request (op, key or args)"))
        seen = [n for n in seen if self._live(n)]
        if not seen:
            return None  # only accepts of this op that can no longer count
        note = max(seen, key=lambda n: n.tag)
        assert current is not None  # a node that stored the write holds a version
        lineage = _lineage_of(replies, current.tag)
        traced = self._trace(lineage, current) if self._tried else None
        built_on = next((n for n in lineage if n.rid == self.rid), None)
        if built_on is None and isinstance(traced, RidNote):
            built_on = traced
        if built_on is not None or current.tag == note.tag:
            # The current version is that write, or was built on it: it took
            # effect once the current version is on a majority.
            answer = self._from_note(built_on or note)
            if sum(1 for r in replies if r.version is not None and r.version.tag == current.tag) >= needed:
                return self._over(answer)
            self._answer = answer
            return self._store_phase(self._rewrite(current, lineage, past))
        if not self._tried:
            # No accept of this op is anywhere: the record is another
            # coordinator's attempt (a client's retry elsewhere).
            return self._over(
                Failed("a previous attempt of this request may be in progress (outcome unknown)")
            )
        # Took effect means that some version made from an accept of this
        # op (or built on one) was stored by a majority, each of which kept
        # the rid on record. A majority of nodes with no record meets every
        # such majority: nothing took effect, apply it afresh. (A prepare is
        # answered once every store judged before it is durable, records
        # with it, so no record means none of this op's accepts is there;
        # the prepare waited for replies from a majority besides the nodes
        # that may hold one. Refusals alone prove nothing: a round that left
        # an accept on a minority may have been read by another round; nor
        # do records on a majority: they may come from versions that were
        # never chosen.)
        clean = [n for n, r in by_node.items() if not self._live(r.rid_seen)]
        if len(clean) >= needed:
            return None
        if traced is False:
            if sum(1 for r in replies if r.version is not None and r.version.tag == current.tag) >= needed:
                # The current version is chosen, and left every earlier
                # accept out: no later round can read one of them as the
                # newest of a majority any more. Forget them, so that the
                # next proof need not reach back past them.
                self._forget_tried()
            return None
        return self._over(
            Failed("a previous attempt of this request may or may not have taken effect (outcome unknown)")
        )

    def _forget_tried(self) -> None:
        """A chosen version left every accept of this op out: no later
        round can read one as the newest of a majority any more. Forget
        them, so that the next proof need not reach back past them, and so
        that their records stop counting."""
        self._dead = max(self._tried)
        self._tried.clear()
        self._holders.clear()

    def _live(self, note: RidNote | None) -> bool:
        """Is ``note`` a record of an accept of this op that may still count?"""
        return note is not None and (self._dead is None or note.tag > self._dead)

    def _trace(self, lineage: tuple[RidNote, ...], current: Versioned) -> RidNote | bool | None:
        """Where ``current`` stands to this op's accepts, following each
        note's base down the chain of rounds that made it: the note of the
        accept it descends from; ``False``: the chain steps from above every
        accept to below the first without passing through one (left out);
        ``None``: cannot tell. Any version chosen after one of them was read
        descends from it (a round builds on the highest version of a
        majority, which meets the chosen one's), so a left-out one was
        never read by what a majority holds. What each version of the chain
        is found to be is remembered: the next trace, from a later version,
        stops there instead of needing the lineage to reach that far."""
        if current.tag <= max(self._tried):
            return None  # an accept above it may yet be finished by a round
        notes = {n.tag: n for n in lineage}
        lowest = min(self._tried)
        path: list[Tag] = []
        tag = current.tag
        result: RidNote | bool
        while True:
            known = self._traced.get(tag)
            if known is not None:
                result = known
                break
            note = notes.get(tag)
            if note is None or note.base is None:
                # Not known; or a set above an accept, which may have
                # overwritten it after a round read it.
                return None
            if note.rid == self.rid:
                result = note
                break
            path.append(tag)
            if note.base < lowest:
                result = False
                break
            tag = note.base
        for step in path:
            # A version left out is so for every later accept too: each is
            # issued above what this op has seen, the version included.
            self._traced[step] = result
        return result

    def _from_note(self, note: RidNote) -> Done:
        if self.kind is Kind.INCR:
            assert note.result is not None
            return Done(IncrResult(note.result, note.tag))
        return Done(CasResult(True, Versioned(note.tag, self.value)))

    def _accept(
        self,
        value: bytes | None,
        result: int | None,
        current: Versioned | None,
        carried: tuple[RidNote, ...],
        past: Tag | None,
    ) -> Step:
        ballot = self._ballot
        assert self.rid is not None
        base = current.tag if current is not None else Tag.zero()
        note = RidNote(
            rid=self.rid, request=self.fingerprint, tag=ballot, result=result, past=past, base=base
        )
        self._accepted_once = True
        if self.kind is Kind.INCR:
            assert result is not None
            self._answer = Done(IncrResult(result, ballot))
        else:
            self._answer = Done(CasResult(True, Versioned(ballot, value)))
        return self._store_phase(SendStore(self.key, Versioned(ballot, value), (note, *carried)))

    def _answer_read(
        self,
        current: Versioned | None,
        on_majority: bool,
        carried: tuple[RidNote, ...],
        past: Tag | None,
        rejection: Rejected | None,
    ) -> Step:
        """Answer from the current version without changing it: at once when
        a majority holds it, else after storing it under the ballot."""
        if current is None or on_majority:
            return self._over(rejection or Done(CasResult(False, current)))
        store = self._rewrite(current, carried, past)
        self._answer = rejection or Done(CasResult(False, store.version))
        return self._store_phase(store)

    def _store_phase(self, store: SendStore) -> Step:
        self.phase = Phase.STORE
        quorum = self.write_quorum if self.kind in (Kind.SET, Kind.DELETE) else None
        self._stores = Vote(self.nodes, quorum=quorum)
        self._store = store
        self._above = None
        self._unreachable = 0
        self._refusers = set()
        return store

    def _after_store(self, votes: Vote[bool]) -> Step:
        store = self._store
        assert store is not None
        if votes.decision is Decision.LOST:
            return self._retry_or_fail(votes)
        if self._answer is not None:
            return self._over(self._answer)
        return self._over(Done(store.version.tag))

    def _retry_or_fail(self, votes: Vote[QueryResult] | Vote[bool]) -> Step:
        """A lost phase: refused by some node (a higher tag or promise got
        there first), a new try goes above; unreachable nodes alone fail."""
        above = self._above
        if above is None:
            return self._fail(votes)
        if votes is self._stores:
            store = self._store
            assert store is not None
            # Every node but those that refused may hold it (a node not yet
            # heard from may still store it).
            if self._own_write(store) and len(self._refusers) < len(self.nodes):
                self._tried.append(store.version.tag)
                self._holders |= self.nodes - self._refusers
                self.attempts += 1
                if self.kind is Kind.CAS or self.kind is Kind.INCR:
                    return self._check()
        self.attempts += 1
        if self.kind in (Kind.SET, Kind.DELETE) and not self._tried:
            return self._issue(above)
        return self._round(above)

    def _own_write(self, store: SendStore) -> bool:
        """Is ``store`` this op's own write (a set's value, a cas's or an
        incr's accept), not a rewrite of the current version?"""
        if self.kind is Kind.GET or not store.notes:
            return False
        rid = store.notes[0].rid
        return rid == self.rid or rid == _rid_of(b"w", store.version.tag)

    def _issue(self, seen: Tag) -> Step:
        self.phase = Phase.TAG
        self._next = Phase.STORE
        return IssueTag(self.key, seen, self.attempts)

    def _round(self, seen: Tag) -> Step:
        """A CASPaxos round (cas, incr, or a read that must finish by one)."""
        self.phase = Phase.TAG
        self._next = Phase.PREPARE
        self._answer = None
        return IssueTag(self.key, seen, self.attempts)

    def _check(self) -> Step:
        """After a lost accept of its own, a cas or incr first queries where
        it went, at once: what tells whether it took effect is the lineage
        of the versions made since, which keeps only the newest notes, so
        the sooner it is read, the fewer rounds have pushed it out. A query
        promises nothing and preempts nobody."""
        self.phase = Phase.QUERY
        self._checking = True
        self._queries = Vote(self.nodes)
        self._unreachable = 0
        return SendQuery(self.key, self.rid)

    def _after_check(self, votes: Vote[QueryResult]) -> Step:
        """Answer from the record if a chosen version descends from one of
        this op's accepts; forget its accepts if a chosen version provably
        left them all out; then, unless answered, a new round."""
        self._checking = False
        above = self._above or Tag.zero()
        if votes.decision is Decision.WON:
            replies = list(votes.replies.values())
            needed = majority(len(self.nodes))
            outcome = read_outcome([r.version for r in replies], needed)
            current = outcome.winner
            if current is not None:
                # Traced even when not chosen yet: what it finds of each
                # version holds, and a later trace may stop there.
                lineage = _lineage_of(replies, current.tag)
                traced = self._trace(lineage, current) if self._tried else None
                built_on = next((n for n in lineage if n.rid == self.rid), None)
                if built_on is None and isinstance(traced, RidNote):
                    built_on = traced
                if not outcome.write_back:
                    if built_on is not None:
                        return self._over(self._from_note(built_on))
                    if traced is False:
                        self._forget_tried()
            above = max(above, _highest_known(replies))
        return self._round(above)

    @property
    def _ballot(self) -> Tag:
        """The ballot of the current round (the tag it was issued)."""
        assert self._last_tag is not None
        return self._last_tag

    def _over(self, step: Done | Failed | Rejected) -> Step:
        self.phase = Phase.OVER
        return step

    def _fail(self, votes: Vote[QueryResult] | Vote[bool]) -> Failed:
        self.phase = Phase.OVER
        return Failed(
            f"{len(votes.failures)} of {len(self.nodes)} nodes failed; a majority ({votes.needed}) is needed"
        )


def _highest_known(replies: Sequence[QueryResult]) -> Tag:
    """The highest tag or promise a query majority reported."""
    highest = Tag.zero()
    for r in replies:
        version, promise = r.version, r.promise
        if version is not None and version.tag > highest:
            highest = version.tag
        if promise is not None and promise > highest:
            highest = promise
    return highest


def _past_of(replies: Sequence[QueryResult], current: Versioned | None) -> Tag | None:
    """The past of ``current`` (see "A refused set"), from the note of the
    write that made it, as a node holding it reports; ``None``: unknown."""
    if current is None:
        return Tag.zero()
    tag = current.tag
    for r in replies:
        version = r.version
        if version is not None and version.tag == tag:
            for note in r.lineage:
                if note.tag == tag and note.past is not None:
                    return note.past
    return None


def _rid_of(kind: bytes, tag: Tag) -> bytes:
    """A rid for a note that no request named: made of the tag (issued
    once), so it names one write; the NUL first keeps it apart from the
    rids clients draw."""
    return b"\0" + kind + tag.counter.to_bytes(8, "big") + tag.writer.encode()


def _lineage_of(replies: Sequence[QueryResult], tag: Tag) -> tuple[RidNote, ...]:
    """The rid notes that came with version ``tag``, as the nodes that hold
    it report them: they travel on with the version, and with a version
    built on it (bounded to ``LINEAGE``)."""
    notes: dict[bytes, RidNote] = {}
    for r in replies:
        version = r.version
        if version is not None and version.tag == tag:
            for note in r.lineage:
                notes.setdefault(note.rid, note)
    return tuple(sorted(notes.values(), key=lambda n: n.tag, reverse=True)[:LINEAGE])
