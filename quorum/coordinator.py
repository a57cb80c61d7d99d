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

import heapq
import itertools
import logging
import random
from collections import deque
from collections.abc import Callable
from typing import assert_never

import trio

from net.codec import encode_peer
from net.errors import BadRequest, Internal, NotInteger, QkvError, Unavailable
from net.messages import Nack, PeerRequest, PeerResponse, Prepare, Query, QueryReply, Store, StoreAck
from quorum.faults import FaultSwitches
from quorum.peers import PeerLink
from quorum.protocol import operation
from quorum.protocol.acceptor import Verdict
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
    SendPrepare,
    SendQuery,
    SendStore,
    Step,
)
from quorum.replica import Replica, Update
from register.model import Key, NodeId, Tag
from register.store import StorageError

__all__ = ["Coordinator", "Finish"]

log = logging.getLogger("qkv.coordinator")

#: called exactly once with the operation's result or its error
Finish = Callable[[Done | QkvError], None]
Outcome = QueryResult | operation.Nack | bool | None
#: seconds: the first backoff after a refused round, and the largest
BACKOFF_BASE = 0.001
BACKOFF_MAX = 0.05
_ATOMIC = (Kind.CAS, Kind.INCR)


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
                case SendQuery() | SendPrepare() | SendStore():
                    self._send(step)
                case IssueTag(attempt=attempt):
                    if attempt:
                        delay = random.uniform(0, min(BACKOFF_MAX, BACKOFF_BASE * 2**attempt))
                        self.coordinator.later(delay, lambda: self._issue(step))
                    else:
                        self._issue(step)
                case Done():
                    self.finish(step)
                case Failed(reason=reason):
                    self.finish(Unavailable(reason))
                case Rejected(reason=reason, not_integer=not_integer):
                    self.finish(NotInteger(reason) if not_integer else BadRequest(reason))
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

    def _issue(self, step: IssueTag) -> None:
        if self.over:
            return
        replica = self.coordinator.replica
        # Above what this node knows of the key, too: a ballot below its own
        # promise or held tag would be refused by this very node.
        seen = max(step.seen, replica.known(step.key))
        replica.issue_tag(seen, self._tag_issued)

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

    def _send(self, send: SendQuery | SendPrepare | SendStore) -> None:
        coordinator = self.coordinator
        self._forget()
        self._req = req = next(coordinator.reqs)
        message: PeerRequest
        if isinstance(send, SendQuery):
            message = Query(req=req, key=send.key, rid=send.rid)
        elif isinstance(send, SendPrepare):
            message = Prepare(req=req, key=send.key, ballot=send.ballot, rid=send.rid)
        else:
            version = send.version
            message = Store(req=req, key=send.key, tag=version.tag, value=version.value, notes=send.notes)
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
            self.deliver(req, node, QueryResult(reply.version, reply.rid_seen, reply.promise, reply.lineage))
        elif isinstance(reply, StoreAck):
            self.deliver(req, node, True)
        elif isinstance(reply, Nack):
            self.deliver(req, node, operation.Nack(reply.above))
        else:
            self.deliver(req, node, None)

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
        if self.op.kind in _ATOMIC:
            coordinator.atomic_over(self)
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
        #: keys with an atomic operation being coordinated here -> the
        #: operations waiting for it, in arrival order
        self._atomic: dict[Key, deque[_Run]] = {}
        #: (when, seq, callback): rounds waiting out their backoff
        self._later: list[tuple[float, int, Callable[[], None]]] = []
        self._later_seq = itertools.count()
        self._later_wakeup = trio.Event()

    def start(self, op: Operation, finish: Finish) -> None:
        """Coordinate ``op``; ``finish`` gets its result, or ``Unavailable``
        once the request timeout has passed."""
        run = _Run(self, op, finish, trio.current_time() + self.timeout)
        running = self.running
        if not running:
            self._timer_wakeup.set()  # the timer task sleeps only while none runs
        running[run] = None
        if op.kind in _ATOMIC:
            waiting = self._atomic.get(op.key)
            if waiting is not None:
                waiting.append(run)  # its turn comes when the one before ends
                return
            self._atomic[op.key] = deque()
        run.advance(op.start())

    def atomic_over(self, run: _Run) -> None:
        """An atomic operation ended (done, failed or expired): the next one
        on its key, if any, starts."""
        key = run.op.key
        waiting = self._atomic.get(key)
        if waiting is None:
            return
        if run in waiting:  # expired while waiting for its turn
            waiting.remove(run)
            return
        while waiting:
            following = waiting.popleft()
            if not following.over:
                following.advance(following.op.start())
                return
        del self._atomic[key]

    def later(self, delay: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` in ``delay`` seconds (a backoff)."""
        heapq.heappush(self._later, (trio.current_time() + delay, next(self._later_seq), callback))
        self._later_wakeup.set()

    async def run_later(self) -> None:
        """The backoff task: runs each ``later`` callback when its time comes."""
        pending = self._later
        while True:
            if not pending:
                self._later_wakeup = trio.Event()
                await self._later_wakeup.wait()
                continue
            when = pending[0][0]
            if when > trio.current_time():
                self._later_wakeup = trio.Event()
                with trio.move_on_at(when):
                    await self._later_wakeup.wait()
                continue
            _, _, callback = heapq.heappop(pending)
            try:
                callback()
            except Exception:  # a bug: fail that request, not the node
                log.exception("a delayed step failed", extra={"event": "internal_error"})

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

    def local(self, send: SendQuery | SendPrepare | SendStore, req: int, run: _Run) -> None:
        """This node's own replica takes part in every phase."""
        replica = self.replica
        me = self.me
        if isinstance(send, SendStore):
            [judged] = replica.offer(
                [Update(send.key, send.version, send.notes)],
                lambda error: run.deliver(req, me, error is None or None),
            )
            if judged.verdict is Verdict.REFUSE:
                assert judged.above is not None
                run.deliver(req, me, operation.Nack(judged.above))
        elif not (replica.ready or self.switches.serve_before_catch_up):
            run.deliver(req, me, None)
        elif isinstance(send, SendQuery):
            run.deliver(req, me, replica.query(send.key, send.rid))
        else:

            def promised(result: QueryResult | operation.Nack | StorageError) -> None:
                run.deliver(req, me, None if isinstance(result, StorageError) else result)

            replica.prepare(send.key, send.ballot, send.rid, promised)
