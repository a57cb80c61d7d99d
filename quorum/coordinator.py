"""The coordinator: runs a client's get, set or delete as ABD phases.

A phase sends one message to every node at once (this node's replica is
served in-process, the others over their ``PeerLink``) and goes on as soon
as the first majority has answered; stragglers' replies are ignored. The
decisions themselves (majority reached? which version wins? write back?)
are ``quorum.decide``'s.

- get: query a majority; if fewer than a majority hold the newest tag,
  store it on a majority first (write-back), then answer. Without the
  write-back, a read could return a version that a later read misses.
- set/delete: query a majority for the key's tag (and the request id); the
  new tag is above every tag seen and above every tag this node issued;
  store it on a majority, then answer. If any node of the query majority has
  the rid on record, the write happened before: finish that one (store the
  recorded tag again) and answer with its tag instead of writing again.

The caller puts the whole operation under its deadline; this module never
waits without one.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Generic, TypeVar

import trio

from net.codec import encode_peer
from net.errors import Unavailable
from net.messages import PeerRequest, PeerResponse, Query, QueryReply, Store, StoreAck
from quorum.decide import Decision, Vote, majority, read_outcome
from quorum.faults import FaultSwitches
from quorum.peers import PeerLink
from quorum.replica import Replica, Update
from register.model import Key, NodeId, Tag, Versioned

__all__ = ["Coordinator", "QueryResult"]

R = TypeVar("R")
QueryResult = tuple[Versioned | None, Tag | None]


class _Phase(Generic[R]):
    def __init__(self, vote: Vote[R]) -> None:
        self.vote = vote
        self.decided = trio.Event()

    def reply(self, node: NodeId, value: R | None) -> None:
        decision = self.vote.fail(node) if value is None else self.vote.reply(node, value)
        if decision is not Decision.PENDING:
            self.decided.set()


class Coordinator:
    def __init__(self, replica: Replica, links: dict[NodeId, PeerLink], switches: FaultSwitches) -> None:
        self.me = replica.node_id
        self.replica = replica
        self.links = links
        self.switches = switches
        self.nodes = frozenset([self.me, *links])
        self._reqs = itertools.count(1)
        self.fast_reads = 0
        self.write_backs = 0

    @property
    def cluster_size(self) -> int:
        return len(self.nodes)

    async def get(self, key: Key) -> Versioned | None:
        replies = await self._query(key, None)
        outcome = read_outcome((v for v, _ in replies.values()), majority(self.cluster_size))
        if outcome.write_back and outcome.winner is not None and not self.switches.skip_read_write_back:
            self.write_backs += 1
            await self._store(Update(key, outcome.winner))
        else:
            self.fast_reads += 1
        return outcome.winner

    async def write(self, key: Key, value: bytes | None, rid: bytes | None) -> Tag:
        replies = await self._query(key, rid)
        recorded = [rid_tag for _, rid_tag in replies.values() if rid_tag is not None]
        if recorded:
            # A retry of a write that some node already stored: complete
            # that write rather than making a second one.
            tag = max(recorded)
        else:
            seen = max((v.tag for v, _ in replies.values() if v is not None), default=Tag.zero())
            tag = await self.replica.issue_tag(seen)
        await self._store(Update(key, Versioned(tag, value), rid), quorum=self.switches.write_quorum)
        return tag

    async def _query(self, key: Key, rid: bytes | None) -> dict[NodeId, QueryResult]:
        def convert(reply: PeerResponse) -> QueryResult | None:
            if not isinstance(reply, QueryReply):
                return None
            held = None if reply.tag is None else Versioned(reply.tag, reply.value)
            return held, reply.rid_tag

        def local(phase: _Phase[QueryResult]) -> None:
            if self.replica.ready or self.switches.serve_before_catch_up:
                phase.reply(self.me, (self.replica.get(key), self.replica.rid_tag(rid)))
            else:
                phase.reply(self.me, None)

        return await self._phase(lambda req: Query(req=req, key=key, rid=rid), convert, local)

    async def _store(self, update: Update, quorum: int | None = None) -> None:
        def convert(reply: PeerResponse) -> bool | None:
            return True if isinstance(reply, StoreAck) else None

        def local(phase: _Phase[bool]) -> None:
            self.replica.submit([update], lambda error: phase.reply(self.me, True if error is None else None))

        version = update.version
        await self._phase(
            lambda req: Store(req=req, key=update.key, tag=version.tag, value=version.value, rid=update.rid),
            convert,
            local,
            quorum,
        )

    async def _phase(
        self,
        make: Callable[[int], PeerRequest],
        convert: Callable[[PeerResponse], R | None],
        local: Callable[[_Phase[R]], None],
        quorum: int | None = None,
    ) -> dict[NodeId, R]:
        phase: _Phase[R] = _Phase(Vote(self.nodes, quorum=quorum))
        req = next(self._reqs)
        encoded = encode_peer(make(req))
        sent: list[PeerLink] = []
        for node, link in self.links.items():

            def on_reply(reply: PeerResponse | None, node: NodeId = node) -> None:
                phase.reply(node, None if reply is None else convert(reply))

            if link.send(req, encoded, on_reply):
                sent.append(link)
        local(phase)
        try:
            await phase.decided.wait()
        finally:
            for link in sent:
                link.forget(req)
        vote = phase.vote
        if vote.decision is not Decision.WON:
            raise Unavailable(
                f"{len(vote.failures)} of {len(self.nodes)} nodes failed; "
                f"a majority ({vote.needed}) is needed"
            )
        return vote.replies
