"""A deterministic simulation of a qkv cluster's protocol core.

The nodes run the production state machine (``quorum.protocol.operation``) and the
production merge (``register.state.apply_updates``) and rid table; only the
network and the clock are simulated. A *program* (a list of integer pairs,
so that hypothesis can generate and shrink it) decides every step: which
client starts which operation at which node, which message is delivered,
dropped or duplicated, which node crashes or restarts, which client gives up
on a node and retries elsewhere, or gives up altogether.

A crashed node loses its in-flight coordinations and the messages on the
wire to it, and keeps its durable state (registers, rids, counter
reservation): exactly what a node keeps across ``kill -9``, since it only
acknowledges what is on disk. The history the clients saw is returned for
the linearizability checker.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import attrs

from quorum.protocol.operation import (
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
from register.model import Key, NodeId, RidRecord, Tag, request_fingerprint
from register.rids import RidTable
from register.state import RegisterState, apply_updates, empty_state
from tests.support.history import Op

KEYS = [Key(b"x"), Key(b"y")]
RESERVE_STEP = 4


@attrs.define
class SimNode:
    id: NodeId
    state: RegisterState = attrs.field(factory=empty_state)
    rids: RidTable = attrs.field(factory=RidTable)
    reserved: int = 0  # durable, like Meta.counter_reserved
    floor: int = 0  # in memory: resumes from ``reserved`` after a crash
    up: bool = True

    def query(self, key: Key, rid: bytes | None) -> QueryResult:
        record = None if rid is None else self.rids.lookup(rid)
        return self.state.get(key), None if record is None else (record.tag, record.request)

    def store(self, send: SendStore, now: float) -> None:
        self.state = apply_updates(self.state, [(send.key, send.version)])[0]
        if send.rid is not None:
            request = request_fingerprint(send.key, send.version.value)
            self.rids.add([RidRecord(rid=send.rid, request=request, tag=send.version.tag, at=now)], now)

    def issue_tag(self, seen: Tag) -> Tag:
        tag = seen.successor(self.floor, self.id)
        self.floor = tag.counter
        # The production node persists the reservation before using the tag.
        self.reserved = max(self.reserved, tag.counter + RESERVE_STEP)
        return tag

    def crash(self) -> None:
        self.up = False

    def restart(self) -> None:
        self.up = True
        self.floor = self.reserved


@attrs.define
class Coordination:
    """An operation being coordinated by ``node`` for ``client``."""

    client: int
    node: NodeId
    op: Operation
    phase: int = 0  # counts phases, so that stale replies are told apart


@attrs.define
class Message:
    src: NodeId
    dst: NodeId
    coordination: int
    phase: int
    request: SendQuery | SendStore | None  # None: a reply
    reply: QueryResult | bool | None = None


@attrs.define
class ClientOp:
    client: int
    kind: str
    key: Key
    value: bytes | None
    rid: bytes | None
    call: float
    coordination: int | None = None
    attempts: int = 0


@attrs.define
class Simulation:
    size: int = 3
    clients: int = 3
    write_quorum: int | None = None
    skip_write_back: bool = False
    nodes: dict[NodeId, SimNode] = attrs.field(init=False)
    wire: list[Message] = attrs.field(factory=list)
    coordinations: dict[int, Coordination] = attrs.field(factory=dict)
    active: dict[int, ClientOp] = attrs.field(factory=dict)
    history: list[Op] = attrs.field(factory=list)
    now: float = 0.0
    _ids: itertools.count[int] = attrs.field(factory=itertools.count)

    def __attrs_post_init__(self) -> None:
        self.nodes = {NodeId(f"n{i + 1}"): SimNode(NodeId(f"n{i + 1}")) for i in range(self.size)}

    @property
    def ids(self) -> list[NodeId]:
        return list(self.nodes)

    def tick(self) -> float:
        self.now += 1.0
        return self.now

    # --- clients -------------------------------------------------------------

    def start_op(self, client: int, choice: int) -> None:
        """Start a client op chosen by a number (programs)."""
        kind = ("get", "set", "delete")[choice % 3]
        self.begin(client, kind, KEYS[(choice // 3) % len(KEYS)], self.ids[(choice // 7) % self.size])

    def begin(self, client: int, kind: str, key: Key, node: NodeId) -> None:
        """Client ``client`` starts a ``kind`` op on ``key`` through ``node``."""
        if client in self.active:
            return
        serial = next(self._ids)
        value = f"c{client}-{serial}".encode() if kind == "set" else None
        rid = f"rid-{client}-{serial}".encode() if kind != "get" else None
        self.active[client] = ClientOp(client, kind, key, value, rid, self.tick())
        self.submit(client, node)

    def submit(self, client: int, node_id: NodeId) -> None:
        """The client sends (or re-sends, same rid) its op to ``node_id``."""
        cop = self.active[client]
        node = self.nodes[node_id]
        if not node.up:
            return  # connection refused; the client may retry elsewhere
        nodes = frozenset(self.nodes)
        switches: dict[str, object] = {"write_quorum": self.write_quorum}
        if cop.kind == "get":
            op = Operation.get(cop.key, nodes, skip_write_back=self.skip_write_back)
        elif cop.kind == "set":
            assert cop.value is not None
            op = Operation.set(cop.key, cop.value, nodes, cop.rid, **switches)
        else:
            op = Operation.delete(cop.key, nodes, cop.rid, **switches)
        cid = next(self._ids)
        cop.coordination = cid
        cop.attempts += 1
        self.coordinations[cid] = Coordination(client, node_id, op)
        self.advance(cid, op.start())

    def retry_elsewhere(self, client: int, choice: int) -> None:
        """The client stops waiting for its node and asks another one."""
        if client in self.active:
            self.submit(client, self.ids[choice % self.size])

    def give_up(self, client: int) -> None:
        """The client times out: the op's outcome stays unknown."""
        cop = self.active.pop(client, None)
        if cop is not None:
            self.record(cop, None, "unknown")

    def record(self, cop: ClientOp, ret: float | None, outcome: str, value: bytes | None = None) -> None:
        self.history.append(self._op(cop, ret, outcome, value))
        if cop.kind != "get":
            # Each earlier attempt of a retried write may still land, with
            # its own tag, at any later time (the protocol's documented
            # limit of rid de-duplication): an unknown write of its own.
            for _ in range(cop.attempts - 1):
                self.history.append(self._op(cop, None, "unknown"))

    def _op(self, cop: ClientOp, ret: float | None, outcome: str, value: bytes | None = None) -> Op:
        return Op(
            client=cop.client,
            kind=cop.kind,
            key=cop.key,  # type: ignore[arg-type]
            value=cop.value if cop.kind == "set" else value,
            call=cop.call,
            ret=ret,
            outcome=outcome,
        )  # type: ignore[arg-type]

    # --- coordination ------------------------------------------------------------

    def advance(self, cid: int, step: Step) -> None:
        co = self.coordinations[cid]
        node = self.nodes[co.node]
        while True:
            match step:
                case SendQuery() | SendStore():
                    co.phase += 1
                    for dst in self.nodes:
                        self.wire.append(Message(co.node, dst, cid, co.phase, step))
                    return
                case IssueTag(seen=seen):
                    step = co.op.tag_issued(node.issue_tag(seen))
                case Done(result=result):
                    self.finish(cid, "ok", result)
                    return
                case Failed():
                    self.finish(cid, "unavailable", None)
                    return
                case Rejected():
                    self.finish(cid, "rejected", None)
                    return
                case Pending():
                    return

    def finish(self, cid: int, outcome: str, result: object) -> None:
        co = self.coordinations.pop(cid)
        cop = self.active.get(co.client)
        if cop is None or cop.coordination != cid:
            return  # nobody is waiting for this answer any more
        if outcome == "unavailable":
            return  # the client may retry or give up (unknown)
        del self.active[co.client]
        if outcome == "rejected":
            self.record(cop, self.tick(), "fail")
            return
        value = getattr(result, "value", None) if cop.kind == "get" else None
        self.record(cop, self.tick(), "ok", value)

    # --- the network ---------------------------------------------------------------

    def deliver(self, index: int, duplicate: bool = False) -> None:
        if not self.wire:
            return
        message = self.wire[index % len(self.wire)]
        if not duplicate:
            self.wire.remove(message)
        node = self.nodes[message.dst]
        if not node.up:
            return
        if message.request is not None:
            if isinstance(message.request, SendQuery):
                reply: QueryResult | bool = node.query(message.request.key, message.request.rid)
            else:
                node.store(message.request, self.tick())
                reply = True
            self.wire.append(
                Message(message.dst, message.src, message.coordination, message.phase, None, reply)
            )
            return
        co = self.coordinations.get(message.coordination)
        if co is None or co.phase != message.phase:
            return  # a straggler
        self.advance(message.coordination, co.op.receive(message.src, message.reply))

    def deliver_where(
        self, *, src: str | None = None, dst: str | None = None, kind: type | None = None
    ) -> None:
        """Deliver every message on the wire that matches (scenario tests);
        replies have ``kind`` None."""

        def matches(m: Message) -> bool:
            return (
                (src is None or m.src == src)
                and (dst is None or m.dst == dst)
                and (
                    (kind is None and m.request is None) or (kind is not None and isinstance(m.request, kind))
                )
            )

        for message in [m for m in self.wire if matches(m)]:
            self.deliver(self.wire.index(message))

    def drop(self, index: int) -> None:
        if self.wire:
            del self.wire[index % len(self.wire)]

    def crash(self, choice: int) -> None:
        node_id = self.ids[choice % self.size]
        node = self.nodes[node_id]
        if not node.up:
            node.restart()
            return
        node.crash()
        # Its coordinations die with it; connections to it break.
        for cid in [c for c, co in self.coordinations.items() if co.node == node_id]:
            del self.coordinations[cid]
        self.wire = [m for m in self.wire if m.dst != node_id and m.src != node_id]

    # --- running a program ------------------------------------------------------

    def run(self, program: Sequence[tuple[int, int]]) -> list[Op]:
        for action, arg in program:
            match action % 12:
                case 0 | 1:
                    self.start_op(arg % self.clients, arg // self.clients)
                case 2 | 3 | 4 | 5 | 6:
                    self.deliver(arg)
                case 7:
                    self.drop(arg)
                case 8:
                    self.deliver(arg, duplicate=True)
                case 9:
                    self.crash(arg)
                case 10:
                    self.retry_elsewhere(arg % self.clients, arg // self.clients)
                case 11:
                    self.give_up(arg % self.clients)
        # Quiesce: restart everyone, deliver everything, in order.
        for node in self.nodes.values():
            if not node.up:
                node.restart()
        for _ in range(10_000):
            if not self.wire:
                break
            self.deliver(0)
        for client in list(self.active):
            self.give_up(client)
        return self.history
