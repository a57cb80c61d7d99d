"""The coordinator: drives client operations (``quorum.protocol.operation``) over
the node's replica and its peer links, without a task per request.

An operation advances in callbacks: each phase's message goes to every node
at once (to this node's replica by a direct call, to each peer through its
``PeerLink``, encoded once, the same bytes for every peer); every outcome is
fed to the operation as it arrives, and when the operation moves on, its
next message goes out from that same callback. So a request costs no task,
no cancel scope and no task switch of its own: under load, the replies in
one incoming frame advance many operations in one go, and their next
messages leave together in one outgoing frame.

Deadlines: every operation has one; they all come from the same request
timeout, so they expire in the order the operations started, and one timer
task that sleeps until the oldest running operation's deadline is enough
(``run_deadlines``). An operation leaves the running set the moment it
finishes, so what it held is freed while still in the CPU's caches (a
sweep of finished operations, cold by then, cost 4-5% of a loaded node). An
expired operation answers ``unavailable`` and ignores whatever arrives
later.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from typing import assert_never

import trio

from net.codec import encode_peer
from net.errors import BadRequest, Internal, QkvError, Unavailable
from net.messages import PeerRequest, PeerResponse, Query, QueryReply, Store, StoreAck
from quorum.faults import FaultSwitches
from quorum.peers import PeerLink
from quorum.protocol.operation import (
    PENDING,
    Done,
    Failed,
    IssueTag,
    Kind,
    Operation,
    Pending,
    QueryResult,
    Rejected,
    SendQuery,
    SendStore,
    Step,
)
from quorum.replica import Replica, Update
from register.model import NodeId, Tag
from register.store import StorageError

__all__ = ["Coordinator", "Finish"]

log = logging.getLogger("qkv.coordinator")

#: called exactly once with the operation's result or its error
Finish = Callable[[Done | QkvError], None]
Outcome = QueryResult | bool | None


class _Run:
    """One operation being coordinated; the ``ReplyWaiter`` of its peer
    requests. Each phase has a ``req`` of its own, so a reply that carries
    another one is a straggler of a phase that is over."""

    __slots__ = ("_finish", "_req", "_sent", "coordinator", "deadline", "op", "over")

    def __init__(self, coordinator: Coordinator, op: Operation, finish: Finish, deadline: float) -> None:
        self.coordinator = coordinator
        self.op = op
        self._finish = finish
        self.deadline = deadline
        self.over = False
        self._req = 0
        #: the links this phase's request went out on (to forget it there)
        self._sent: list[PeerLink] = []

    def advance(self, step: Step) -> None:
        try:
            match step:
                case SendQuery() | SendStore():
                    self._send(step)
                case IssueTag(seen=seen):
                    self.coordinator.replica.issue_tag(seen, self._tag_issued)
                case Done():
                    self.finish(step)
                case Failed(reason=reason):
                    self.finish(Unavailable(reason))
                case Rejected(reason=reason):
                    self.finish(BadRequest(reason))
                case Pending():
                    pass
                case _:
                    assert_never(step)
        except Exception as exc:  # a bug
            self._failed_by_bug(exc)

    def _failed_by_bug(self, exc: Exception) -> None:
        """Fail this request, not the node."""
        log.exception("operation on %r failed", self.op.key, extra={"event": "internal_error"})
        self.finish(Internal(f"{type(exc).__name__}: {exc}"))

    def _tag_issued(self, tag: Tag | StorageError) -> None:
        if self.over:
            return
        if isinstance(tag, StorageError):
            self.finish(Internal(f"cannot reserve tags: {tag}"))
            return
        try:
            step = self.op.tag_issued(tag)
        except Exception as exc:  # a bug
            self._failed_by_bug(exc)
            return
        self.advance(step)

    def _send(self, send: SendQuery | SendStore) -> None:
        coordinator = self.coordinator
        self._forget()
        self._req = req = next(coordinator.reqs)
        message: PeerRequest
        if isinstance(send, SendQuery):
            message = Query(req=req, key=send.key, rid=send.rid)
        else:
            version = send.version
            message = Store(req=req, key=send.key, tag=version.tag, value=version.value, rid=send.rid)
        encoded = encode_peer(message)
        sent = self._sent
        for link in coordinator.link_list:
            if link.send(req, encoded, self):
                sent.append(link)
            if self.over:  # finished by links that failed at once
                self._forget()
                return
        coordinator.local(send, req, self)

    def peer_reply(self, node: NodeId, req: int, reply: PeerResponse | None) -> None:
        if isinstance(reply, QueryReply):
            self.deliver(req, node, (reply.version, reply.rid_seen))
        else:
            self.deliver(req, node, True if isinstance(reply, StoreAck) else None)

    def deliver(self, req: int, node: NodeId, outcome: Outcome) -> None:
        """``node``'s outcome for the phase ``req``: its reply, or ``None``
        when it failed (link down, refused)."""
        if self.over or req != self._req:
            return  # a straggler of a phase that is over
        try:
            step = self.op.receive(node, outcome)
        except Exception as exc:
            self._failed_by_bug(exc)
            return
        if step is not PENDING:
            self.advance(step)

    def finish(self, result: Done | QkvError) -> None:
        if self.over:
            return
        self.over = True
        self._forget()
        coordinator = self.coordinator
        del coordinator.running[self]
        coordinator.count(self.op, result)
        self._finish(result)

    def _forget(self) -> None:
        sent = self._sent
        if sent:
            req = self._req
            for link in sent:
                link.forget(req)
            sent.clear()


class Coordinator:
    def __init__(
        self,
        replica: Replica,
        links: dict[NodeId, PeerLink],
        switches: FaultSwitches,
        timeout: float,
    ) -> None:
        self.me = replica.node_id
        self.replica = replica
        self.links = links
        self.switches = switches
        self.timeout = timeout
        self.nodes = frozenset([self.me, *links])
        self.link_list = list(links.values())
        self.reqs = itertools.count(1)
        #: operations being coordinated, oldest first (a dict keeps the
        #: order of insertion, and any one leaves it in O(1))
        self.running: dict[_Run, None] = {}
        self._timer_wakeup = trio.Event()
        self.fast_reads = 0
        self.write_backs = 0

    def start(self, op: Operation, finish: Finish) -> None:
        """Coordinate ``op``; ``finish`` gets its result, or ``Unavailable``
        once the request timeout has passed."""
        run = _Run(self, op, finish, trio.current_time() + self.timeout)
        running = self.running
        if not running:
            self._timer_wakeup.set()  # the timer task sleeps only while none runs
        running[run] = None
        run.advance(op.start())

    def count(self, op: Operation, result: Done | QkvError) -> None:
        if isinstance(result, Done) and op.kind is Kind.GET:
            if result.wrote_back:
                self.write_backs += 1
            else:
                self.fast_reads += 1

    async def run_deadlines(self) -> None:
        """The timer task: fail every operation still running at its
        deadline. The oldest running operation's deadline comes first (one
        timeout for all); if it finishes before, the task wakes at that
        deadline anyway and moves on to the next oldest."""
        running = self.running
        while True:
            if not running:
                self._timer_wakeup = trio.Event()
                await self._timer_wakeup.wait()
                continue
            run = next(iter(running))
            await trio.sleep_until(run.deadline)
            if not run.over:
                run.finish(Unavailable(f"no majority answered within {self.timeout:g} s"))

    def local(self, send: SendQuery | SendStore, req: int, run: _Run) -> None:
        """This node's own replica takes part in every phase."""
        replica = self.replica
        me = self.me
        if isinstance(send, SendQuery):
            if replica.ready or self.switches.serve_before_catch_up:
                run.deliver(req, me, (replica.get(send.key), replica.rid_seen(send.rid)))
            else:
                run.deliver(req, me, None)
        else:
            replica.submit(
                [Update(send.key, send.version, send.rid)],
                lambda error: run.deliver(req, me, error is None or None),
            )
