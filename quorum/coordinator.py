"""The coordinator: drives client operations (``quorum.operation``) over
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
task with a FIFO queue is enough (``run_deadlines``). An expired operation
answers ``unavailable`` and ignores whatever arrives later.
"""

from __future__ import annotations

import collections
import itertools
import logging
from collections.abc import Callable

import trio

from net.codec import encode_peer
from net.errors import BadRequest, Internal, QkvError, Unavailable
from net.messages import PeerRequest, PeerResponse, Query, QueryReply, Store, StoreAck
from quorum.faults import FaultSwitches
from quorum.operation import (
    Done,
    Failed,
    IssueTag,
    Operation,
    Pending,
    QueryResult,
    Rejected,
    SendQuery,
    SendStore,
    Step,
)
from quorum.peers import PeerLink
from quorum.replica import Replica, Update
from register.model import NodeId, Tag, Versioned
from register.store import StorageError

__all__ = ["Coordinator", "Finish"]

log = logging.getLogger("qkv.coordinator")

#: seconds between two sweeps of finished operations off the deadline queue
SWEEP_INTERVAL = 0.1

#: called exactly once with the operation's result or its error
Finish = Callable[[Done | QkvError], None]
Outcome = QueryResult | bool | None


class _Run:
    """One operation being coordinated."""

    def __init__(self, coordinator: Coordinator, op: Operation, finish: Finish, deadline: float) -> None:
        self.coordinator = coordinator
        self.op = op
        self._finish = finish
        self.deadline = deadline
        self.over = False
        self._phase = 0
        self._req = 0
        self._sent: list[PeerLink] = []

    def advance(self, step: Step) -> None:
        try:
            self._advance(step)
        except Exception as exc:  # a bug: fail this request, not the node
            log.exception("operation on %r failed", self.op.key, extra={"event": "internal_error"})
            self.finish(Internal(f"{type(exc).__name__}: {exc}"))

    def _advance(self, step: Step) -> None:
        while not self.over:
            match step:
                case SendQuery() | SendStore():
                    self._send(step)
                    return
                case IssueTag(seen=seen):
                    self.coordinator.replica.issue_tag(seen, self._tag_issued)
                    return
                case Done():
                    self.finish(step)
                    return
                case Failed(reason=reason):
                    self.finish(Unavailable(reason))
                    return
                case Rejected(reason=reason):
                    self.finish(BadRequest(reason))
                    return
                case Pending():
                    return

    def _tag_issued(self, tag: Tag | StorageError) -> None:
        if self.over:
            return
        if isinstance(tag, StorageError):
            self.finish(Internal(f"cannot reserve tags: {tag}"))
        else:
            self.advance(self.op.tag_issued(tag))

    def _send(self, send: SendQuery | SendStore) -> None:
        coordinator = self.coordinator
        self._forget()
        self._phase += 1
        phase = self._phase
        self._req = req = next(coordinator.reqs)
        message: PeerRequest
        if isinstance(send, SendQuery):
            message = Query(req=req, key=send.key, rid=send.rid)
        else:
            version = send.version
            message = Store(req=req, key=send.key, tag=version.tag, value=version.value, rid=send.rid)
        encoded = encode_peer(message)
        for node, link in coordinator.links.items():

            def on_reply(reply: PeerResponse | None, node: NodeId = node) -> None:
                self.deliver(phase, node, _peer_result(reply))

            if link.send(req, encoded, on_reply):
                self._sent.append(link)
        coordinator.local(send, lambda outcome: self.deliver(phase, coordinator.me, outcome))

    def deliver(self, phase: int, node: NodeId, outcome: Outcome) -> None:
        if self.over or phase != self._phase:
            return  # a straggler of a phase that is over
        try:
            step = self.op.receive(node, outcome)
        except Exception as exc:
            log.exception("operation on %r failed", self.op.key, extra={"event": "internal_error"})
            self.finish(Internal(f"{type(exc).__name__}: {exc}"))
            return
        if not isinstance(step, Pending):
            self.advance(step)

    def finish(self, result: Done | QkvError) -> None:
        if self.over:
            return
        self.over = True
        self._forget()
        self._finish(result)

    def _forget(self) -> None:
        for link in self._sent:
            link.forget(self._req)
        self._sent.clear()


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
        self.reqs = itertools.count(1)
        self._deadlines: collections.deque[_Run] = collections.deque()
        self._timer_wakeup = trio.Event()
        self.fast_reads = 0
        self.write_backs = 0

    def start(self, op: Operation, finish: Finish) -> None:
        """Coordinate ``op``; ``finish`` gets its result, or ``Unavailable``
        once the request timeout has passed."""

        def count(result: Done | QkvError) -> None:
            if isinstance(result, Done) and op.kind.value == "get":
                if result.wrote_back:
                    self.write_backs += 1
                else:
                    self.fast_reads += 1
            finish(result)

        run = _Run(self, op, count, trio.current_time() + self.timeout)
        self._deadlines.append(run)
        self._timer_wakeup.set()
        run.advance(op.start())

    async def run_deadlines(self) -> None:
        """The timer task: fail every operation still running at its
        deadline. Deadlines are in queue order (one timeout for all).

        It also wakes every ``SWEEP_INTERVAL`` to drop finished operations
        from the head of the queue: otherwise every operation started within
        one request timeout (thousands, with their replies) stays referenced
        until the head's deadline, though almost all finish in milliseconds."""
        queue = self._deadlines
        while True:
            while queue and queue[0].over:
                queue.popleft()
            if not queue:
                self._timer_wakeup = trio.Event()
                await self._timer_wakeup.wait()
                continue
            run = queue[0]
            if run.deadline > trio.current_time() + SWEEP_INTERVAL:
                await trio.sleep(SWEEP_INTERVAL)
                continue
            await trio.sleep_until(run.deadline)
            if not run.over:
                run.finish(Unavailable(f"no majority answered within {self.timeout:g} s"))

    def local(self, send: SendQuery | SendStore, deliver: Callable[[Outcome], None]) -> None:
        """This node's own replica takes part in every phase."""
        replica = self.replica
        if isinstance(send, SendQuery):
            if replica.ready or self.switches.serve_before_catch_up:
                record = replica.rid_record(send.rid)
                deliver((replica.get(send.key), None if record is None else (record.tag, record.request)))
            else:
                deliver(None)
        else:
            replica.submit(
                [Update(send.key, send.version, send.rid)],
                lambda error: deliver(error is None or None),
            )


def _peer_result(reply: PeerResponse | None) -> Outcome:
    """A peer's reply as the operation sees it (``None``: that node failed)."""
    if isinstance(reply, QueryReply):
        held = None if reply.tag is None else Versioned(reply.tag, reply.value)
        if reply.rid_tag is None or reply.rid_request is None:
            return held, None
        return held, (reply.rid_tag, reply.rid_request)
    if isinstance(reply, StoreAck):
        return True
    return None
