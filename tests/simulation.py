"""A deterministic simulation of a qkv cluster's protocol core.

The nodes run the production state machine (``quorum.protocol.operation``) and the
production merge (``register.state.apply_updates``) and rid table; only the
network and the clock are simulated. A *program* (a list of integer pairs,
so that hypothesis can generate and shrink it) decides every step: which
client starts which operation at which node, which message is delivered,
dropped or duplicated, which node crashes or restarts, which client gives up
on a node and retries elsewhere, or gives up altogether.

A crashed node loses its in-flight coordinations, the messages on the
wire to it and its promises (memory), and keeps its durable state
(registers, rids, counter and promise reservations): exactly what a node
keeps across ``kill -9``, since it only acknowledges what is on disk. The
replica side judges every store and prepare by the production acceptor
rules (``quorum.protocol.acceptor``). The history the clients saw is
returned for the linearizability checker.

``atomic=True`` mixes cas and incr in with get, set and delete, over a few
small values (so that a cas finds what it expects, and an incr now and then
finds a value that is not a number). Two switches break an acceptor rule on
purpose, for the tests that show the checker then finds a violation:
``ack_below_promise`` (a store below the promise is stored and
acknowledged) and ``forget_promises`` (a restarted node keeps no promise
floor).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import attrs

from quorum.protocol.acceptor import Verdict, floor_after, prepare_verdict, store_verdict
from quorum.protocol.operation import (
    CasResult,
    Done,
    Failed,
    IncrResult,
    IssueTag,
    Nack,
    Operation,
    Pending,
    QueryResult,
    Rejected,
    SendPrepare,
    SendQuery,
    SendStore,
    Step,
)
from register.model import Key, NodeId, RidRecord, Tag
from register.rids import RidTable
from register.state import RegisterState, empty_state
from tests.support.history import Op

KEYS = [Key(b"x"), Key(b"y")]
RESERVE_STEP = 4
#: the values of an atomic simulation: small, so that a cas finds what it
#: expects; ``b"x"`` is not a number (an incr on it is ``not_integer``)
VALUES: list[bytes | None] = [None, b"0", b"1", b"2", b"x"]
STEPS = [1, -1, 2]
_ZERO = Tag.zero()


@attrs.define
class SimNode:
    id: NodeId
    state: RegisterState = attrs.field(factory=empty_state)
    rids: RidTable = attrs.field(factory=RidTable)
    reserved: int = 0  # durable, like Meta.counter_reserved
    floor: int = 0  # in memory: resumes from ``reserved`` after a crash
    promise_reserved: int = 0  # durable, like Meta.promise_reserved
    promise_floor: Tag = _ZERO  # from ``promise_reserved`` after a crash
    promises: dict[Key, Tag] = attrs.field(factory=dict)  # in memory
    up: bool = True
    ack_below_promise: bool = False
    forget_promises: bool = False

    def promise(self, key: Key) -> Tag:
        return max(self.promises.get(key, _ZERO), self.promise_floor)

    def known(self, key: Key) -> Tag:
        held = self.state.get(key)
        return max(self.promise(key), held.tag if held is not None else _ZERO)

    def query(self, key: Key, rid: bytes | None) -> QueryResult:
        # As ``Replica.query`` answers (the promise only when above the tag).
        version = self.state.get(key)
        promise: Tag | None = self.promise(key)
        if promise is not None and (promise == _ZERO or (version is not None and promise <= version.tag)):
            promise = None
        lineage = () if version is None else self.rids.lineage(version.tag)
        record = None if rid is None else self.rids.lookup(rid)
        return QueryResult(version, None if record is None else record.note, promise, lineage)

    def store(self, send: SendStore, now: float) -> Nack | bool:
        key, version = send.key, send.version
        stored_for_rid = None
        for note in send.notes:
            if note.tag == version.tag and (record := self.rids.lookup(note.rid)) is not None:
                stored_for_rid = record.tag
        judged = store_verdict(self.state.get(key), self.promise(key), version.tag, stored_for_rid)
        if judged.verdict is Verdict.REFUSE:
            held = self.state.get(key)
            if not (self.ack_below_promise and (held is None or version.tag > held.tag)):
                assert judged.above is not None
                return Nack(judged.above)
            judged = attrs.evolve(judged, verdict=Verdict.ACCEPT)  # the broken rule
        if judged.verdict is Verdict.ACCEPT:
            self.state = self.state.set(key, version)
        records = [RidRecord.of(n, now) for n in send.notes]
        self.rids.add(records, now, [version.tag] * len(records))
        return True

    def prepare(self, send: SendPrepare) -> QueryResult | Nack:
        judged = prepare_verdict(self.state.get(send.key), self.promise(send.key), send.ballot)
        if judged.verdict is Verdict.REFUSE:
            assert judged.above is not None
            return Nack(judged.above)
        self.promises[send.key] = send.ballot
        # The production node persists the reservation before answering.
        self.promise_reserved = max(self.promise_reserved, send.ballot.counter + RESERVE_STEP)
        return self.query(send.key, send.rid)

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
        self.promises = {}
        if not self.forget_promises:
            self.promise_floor = floor_after(self.promise_reserved)
        self.floor = max(self.reserved, self.promise_floor.counter)


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
    request: SendQuery | SendPrepare | SendStore | None  # None: a reply
    reply: QueryResult | Nack | bool | None = None


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
    expect: bytes | None = None
    by: int = 0


@attrs.define
class Simulation:
    size: int = 3
    clients: int = 3
    write_quorum: int | None = None
    skip_write_back: bool = False
    atomic: bool = False
    ack_below_promise: bool = False
    forget_promises: bool = False
    nodes: dict[NodeId, SimNode] = attrs.field(init=False)
    wire: list[Message] = attrs.field(factory=list)
    coordinations: dict[int, Coordination] = attrs.field(factory=dict)
    active: dict[int, ClientOp] = attrs.field(factory=dict)
    history: list[Op] = attrs.field(factory=list)
    now: float = 0.0
    _ids: itertools.count[int] = attrs.field(factory=itertools.count)

    def __attrs_post_init__(self) -> None:
        self.nodes = {
            NodeId(f"n{i + 1}"): SimNode(
                NodeId(f"n{i + 1}"),
                ack_below_promise=self.ack_below_promise,
                forget_promises=self.forget_promises,
            )
            for i in range(self.size)
        }

    @property
    def ids(self) -> list[NodeId]:
        return list(self.nodes)

    def tick(self) -> float:
        self.now += 1.0
        return self.now

    # --- clients -------------------------------------------------------------

    def start_op(self, client: int, choice: int) -> None:
        """Start a client op chosen by a number (programs)."""
        kinds = ("get", "set", "delete", "cas", "incr") if self.atomic else ("get", "set", "delete")
        kind = kinds[choice % len(kinds)]
        rest = choice // len(kinds)
        self.begin(client, kind, KEYS[rest % len(KEYS)], self.ids[(rest // 2) % self.size], rest // 16)

    def begin(self, client: int, kind: str, key: Key, node: NodeId, args: int = 0) -> None:
        """Client ``client`` starts a ``kind`` op on ``key`` through ``node``;
        ``args`` chooses the values of an atomic simulation."""
        if client in self.active:
            return
        serial = next(self._ids)
        value: bytes | None = None
        expect: bytes | None = None
        if self.atomic:
            value = VALUES[1 + args % (len(VALUES) - 1)] if kind == "set" else VALUES[args % len(VALUES)]
            expect = VALUES[(args // len(VALUES)) % len(VALUES)]
        elif kind == "set":
            value = f"c{client}-{serial}".encode()
        rid = f"rid-{client}-{serial}".encode() if kind != "get" else None
        by = STEPS[args % len(STEPS)]
        self.active[client] = ClientOp(client, kind, key, value, rid, self.tick(), expect=expect, by=by)
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
        elif cop.kind == "cas":
            assert cop.rid is not None
            op = Operation.cas(cop.key, cop.expect, cop.value, nodes, cop.rid)
        elif cop.kind == "incr":
            assert cop.rid is not None
            op = Operation.incr(cop.key, cop.by, nodes, cop.rid)
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

    def record(self, cop: ClientOp, ret: float | None, outcome: str, result: object = None) -> None:
        self.history.append(self._op(cop, ret, outcome, result))
        if cop.kind != "get":
            # Each earlier attempt of a retried write may still land, with
            # its own tag, at any later time (the protocol's documented
            # limit of rid de-duplication): an unknown write of its own.
            for _ in range(cop.attempts - 1):
                self.history.append(self._op(cop, None, "unknown"))

    def _op(self, cop: ClientOp, ret: float | None, outcome: str, result: object = None) -> Op:
        fields: dict[str, object] = {}
        value = cop.value if cop.kind in ("set", "cas") else None
        if outcome == "ok":
            if cop.kind == "get":
                value = getattr(result, "value", None)
            elif isinstance(result, CasResult):
                fields["swapped"] = result.swapped
                if not result.swapped:
                    fields["observed"] = None if result.version is None else result.version.value
            elif isinstance(result, IncrResult):
                value = str(result.value).encode()
            elif isinstance(result, Rejected):
                fields["not_integer"] = True
        if cop.kind == "cas":
            fields["expect"] = cop.expect
        if cop.kind == "incr":
            fields["by"] = cop.by
        return Op(
            client=cop.client,
            kind=cop.kind,  # type: ignore[arg-type]
            key=cop.key,
            value=value,
            call=cop.call,
            ret=ret,
            outcome=outcome,  # type: ignore[arg-type]
            **fields,  # type: ignore[arg-type]
        )

    # --- coordination ------------------------------------------------------------

    def advance(self, cid: int, step: Step) -> None:
        co = self.coordinations[cid]
        node = self.nodes[co.node]
        while True:
            match step:
                case SendQuery() | SendPrepare() | SendStore():
                    co.phase += 1
                    for dst in self.nodes:
                        self.wire.append(Message(co.node, dst, cid, co.phase, step))
                    return
                case IssueTag(key=key, seen=seen):
                    step = co.op.tag_issued(node.issue_tag(max(seen, node.known(key))))
                case Done(result=result):
                    self.finish(cid, "ok", result)
                    return
                case Failed():
                    self.finish(cid, "unavailable", None)
                    return
                case Rejected(not_integer=True):
                    self.finish(cid, "ok", step)
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
        self.record(cop, self.tick(), "ok", result)

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
        request = message.request
        if request is not None:
            reply: QueryResult | Nack | bool
            if isinstance(request, SendQuery):
                reply = node.query(request.key, request.rid)
            elif isinstance(request, SendPrepare):
                reply = node.prepare(request)
            else:
                reply = node.store(request, self.tick())
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
