"""The coordinator: drives client operations (``quorum.operation``) over
the node's replica and its peer links.

Each phase's message goes to every node at once: to this node's replica by
a direct call, to each peer through its ``PeerLink`` (encoded once, the same
bytes for every peer). Outcomes are fed to the operation as they arrive;
the phase is over as soon as the operation says so (a majority answered, or
can no longer answer), and stragglers are ignored. The caller puts the whole
operation under its deadline; nothing here waits without one.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import trio

from net.codec import encode_peer
from net.errors import Unavailable
from net.messages import PeerRequest, PeerResponse, Query, QueryReply, Store, StoreAck
from quorum.faults import FaultSwitches
from quorum.operation import (
    Done,
    Failed,
    IssueTag,
    Operation,
    Pending,
    QueryResult,
    SendQuery,
    SendStore,
    Step,
)
from quorum.peers import PeerLink
from quorum.replica import Replica, Update
from register.model import Key, NodeId, Tag, Versioned

__all__ = ["Coordinator"]


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

    async def get(self, key: Key) -> Versioned | None:
        op = Operation.get(key, self.nodes, skip_write_back=self.switches.skip_read_write_back)
        done = await self.run(op)
        if done.wrote_back:
            self.write_backs += 1
        else:
            self.fast_reads += 1
        assert not isinstance(done.result, Tag)
        return done.result

    async def write(self, key: Key, value: bytes | None, rid: bytes | None) -> Tag:
        quorum = self.switches.write_quorum
        if value is None:
            op = Operation.delete(key, self.nodes, rid, write_quorum=quorum)
        else:
            op = Operation.set(key, value, self.nodes, rid, write_quorum=quorum)
        done = await self.run(op)
        assert isinstance(done.result, Tag)
        return done.result

    async def run(self, op: Operation) -> Done:
        """Carry ``op`` out; raise ``Unavailable`` if it fails."""
        step: Step = op.start()
        while True:
            match step:
                case SendQuery() | SendStore():
                    step = await self._phase(op, step)
                case IssueTag(seen=seen):
                    step = op.tag_issued(await self.replica.issue_tag(seen))
                case Done():
                    return step
                case Failed(reason=reason):
                    raise Unavailable(reason)
                case Pending():
                    raise AssertionError("a phase ended without a decision")

    async def _phase(self, op: Operation, send: SendQuery | SendStore) -> Step:
        moved = trio.Event()
        outcome: list[Step] = []

        def deliver(node: NodeId, result: QueryResult | bool | None) -> None:
            if outcome:
                return  # the phase is over: a straggler
            step = op.receive(node, result)
            if not isinstance(step, Pending):
                outcome.append(step)
                moved.set()

        req = next(self._reqs)
        message: PeerRequest
        if isinstance(send, SendQuery):
            message = Query(req=req, key=send.key, rid=send.rid)
        else:
            version = send.version
            message = Store(req=req, key=send.key, tag=version.tag, value=version.value, rid=send.rid)
        encoded = encode_peer(message)
        sent: list[PeerLink] = []
        for node, link in self.links.items():

            def on_reply(reply: PeerResponse | None, node: NodeId = node) -> None:
                deliver(node, _peer_result(reply))

            if link.send(req, encoded, on_reply):
                sent.append(link)
        self._local(send, deliver)
        try:
            await moved.wait()
        finally:
            for link in sent:
                link.forget(req)
        return outcome[0]

    def _local(
        self, send: SendQuery | SendStore, deliver: Callable[[NodeId, QueryResult | bool | None], None]
    ) -> None:
        """This node's own replica takes part in every phase."""
        replica = self.replica
        if isinstance(send, SendQuery):
            if replica.ready or self.switches.serve_before_catch_up:
                deliver(self.me, (replica.get(send.key), replica.rid_tag(send.rid)))
            else:
                deliver(self.me, None)
        else:
            replica.submit(
                [Update(send.key, send.version, send.rid)],
                lambda error: deliver(self.me, error is None or None),
            )


def _peer_result(reply: PeerResponse | None) -> QueryResult | bool | None:
    """A peer's reply as the operation sees it (``None``: that node failed)."""
    if isinstance(reply, QueryReply):
        return (None if reply.tag is None else Versioned(reply.tag, reply.value)), reply.rid_tag
    if isinstance(reply, StoreAck):
        return True
    return None
