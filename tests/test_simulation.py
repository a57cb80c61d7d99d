"""The protocol core under a simulated, hostile network.

Hypothesis generates programs of steps (client operations, message
delivery, loss, duplication and reordering, node crashes and restarts,
client retries and time-outs) for the simulation in ``tests/simulation.py``,
which runs the production state machines. Every history must be
linearizable; a failing program shrinks to a small, replayable example.

The same simulation with a safety rule switched off must find a violation,
which shows that these tests can fail.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from quorum.protocol.operation import SendPrepare, SendQuery, SendStore
from register.model import Key, NodeId
from tests.simulation import ClientOp, Simulation
from tests.support.history import Op
from tests.support.linearizability import check

X, N1, N2, N3 = Key(b"x"), NodeId("n1"), NodeId("n2"), NodeId("n3")
programs = st.lists(st.tuples(st.integers(0, 11), st.integers(0, 1000)), max_size=300)
#: programs that deliver most of what they send, so that more operations
#: complete (every action of ``Simulation.run``; deliveries weigh most)
busy_programs = st.lists(
    st.tuples(st.sampled_from([0, 1, *[2, 3, 4, 5, 6] * 3, 7, 8, 9, 10, 11]), st.integers(0, 1000)),
    max_size=400,
)


@settings(max_examples=1000)
@given(programs)
def test_every_simulated_history_is_linearizable(program: list[tuple[int, int]]) -> None:
    history = Simulation().run(program)
    result = check(history)
    assert result.ok, result.describe()


@settings(max_examples=300)
@given(programs)
def test_five_node_histories_are_linearizable(program: list[tuple[int, int]]) -> None:
    history = Simulation(size=5, clients=4).run(program)
    result = check(history)
    assert result.ok, result.describe()


def test_simulation_does_something() -> None:
    """Guard against a simulation that completes nothing (vacuous tests)."""
    program = [(0, i) for i in range(3)] + [(2, 0)] * 200
    history = Simulation().run(program)
    assert sum(1 for op in history if op.outcome == "ok") == 3


def test_without_read_write_back_a_read_goes_back_in_time() -> None:
    """A set stored on one node only; a read sees it through that node; a
    later read through the other two must see it too. Only the write-back
    makes sure of that."""
    assert not check(write_on_one_node_then_two_reads(skip_write_back=True)).ok
    assert check(write_on_one_node_then_two_reads(skip_write_back=False)).ok


def write_on_one_node_then_two_reads(skip_write_back: bool) -> list[Op]:
    sim = Simulation(skip_write_back=skip_write_back)
    sim.begin(0, "set", X, N1)
    sim.deliver_where(kind=SendQuery)
    sim.deliver_where(kind=None)  # query replies: the store phase begins
    sim.deliver_where(dst="n1", kind=SendStore)
    sim.give_up(0)  # the write's outcome is unknown to its client
    sim.wire.clear()  # the other stores are lost
    sim.begin(1, "get", X, N1)
    sim.deliver_where(dst="n1", kind=SendQuery)
    sim.deliver_where(dst="n2", kind=SendQuery)
    sim.deliver_where(kind=None)
    sim.deliver_where(kind=SendStore)  # the write-back, if any
    sim.deliver_where(kind=None)
    sim.begin(2, "get", X, N3)
    sim.deliver_where(dst="n3", kind=SendQuery)
    sim.deliver_where(dst="n2", kind=SendQuery)
    sim.deliver_where(kind=None)
    history = sim.history
    assert [op.outcome for op in history if op.kind == "get"] == ["ok", "ok"]
    return history


def test_acknowledging_after_one_store_loses_an_acknowledged_write() -> None:
    assert not check(write_acknowledged_by(write_quorum=1)).ok
    assert check(write_acknowledged_by(write_quorum=None)).ok


def write_acknowledged_by(write_quorum: int | None) -> list[Op]:
    sim = Simulation(write_quorum=write_quorum)
    sim.begin(0, "set", X, N1)
    sim.deliver_where(kind=SendQuery)
    sim.deliver_where(kind=None)
    sim.deliver_where(dst="n1", kind=SendStore)
    sim.deliver_where(src="n1", dst="n1", kind=None)
    if sim.active:  # not yet acknowledged: a majority needs n2 too
        sim.deliver_where(dst="n2", kind=SendStore)
        sim.deliver_where(src="n2", kind=None)
    assert [op.outcome for op in sim.history] == ["ok"]
    sim.wire.clear()
    sim.begin(1, "get", X, N3)
    sim.deliver_where(dst="n3", kind=SendQuery)
    sim.deliver_where(dst="n2", kind=SendQuery)
    sim.deliver_where(kind=None)
    sim.deliver_where(kind=SendStore)
    sim.deliver_where(kind=None)
    return sim.history


# --- cas and incr: CASPaxos on the same registers --------------------------------------


@settings(max_examples=1000)
@given(programs)
def test_atomic_histories_are_linearizable(program: list[tuple[int, int]]) -> None:
    """cas, incr, set, get and delete interleaved on two keys, over a hostile
    network with crashes, restarts, retries and time-outs."""
    history = Simulation(atomic=True).run(program)
    result = check(history)
    assert result.ok, result.describe()


@settings(max_examples=1000)
@given(busy_programs)
def test_atomic_histories_that_mostly_complete_are_linearizable(program: list[tuple[int, int]]) -> None:
    history = Simulation(atomic=True).run(program)
    result = check(history)
    assert result.ok, result.describe()


@settings(max_examples=300)
@given(busy_programs)
def test_five_node_atomic_histories_are_linearizable(program: list[tuple[int, int]]) -> None:
    history = Simulation(size=5, clients=4, atomic=True).run(program)
    result = check(history)
    assert result.ok, result.describe()


#: programs with no faults at all, only clients and deliveries in any
#: order: with six clients on two keys, rounds keep preempting each other
crowded_programs = st.lists(
    st.tuples(st.sampled_from([0, 1, 0, 1, 2, 3, 4, 5, 6, 2, 3, 4, 5, 6]), st.integers(0, 10_000)),
    min_size=100,
    max_size=400,
)


@settings(max_examples=300)
@given(crowded_programs)
def test_crowded_atomic_histories_are_linearizable(program: list[tuple[int, int]]) -> None:
    """What the smaller runs did not reach: a set whose store a cas read on
    the one node that took it, refused by the others and stored again over
    the cas (the set had taken effect twice); an incr refused by the
    majority, whose accept another round had read and built on, applied
    again (counted twice, answered once)."""
    history = Simulation(clients=6, atomic=True).run(program)
    result = check(history)
    assert result.ok, result.describe()


def start(sim: Simulation, client: int, kind: str, node: NodeId, **args: object) -> None:
    """Client ``client`` starts ``kind`` on X through ``node``, with chosen
    arguments (``value``, ``expect``, ``by``)."""
    rid = None if kind == "get" else f"rid-{client}-{sim.now}".encode()
    args.setdefault("value", None)
    sim.active[client] = ClientOp(client, kind, X, call=sim.tick(), rid=rid, **args)  # type: ignore[arg-type]
    sim.submit(client, node)


def settle(sim: Simulation) -> None:
    for _ in range(1000):
        if not sim.wire:
            return
        sim.deliver(0)


def test_atomic_simulation_does_something() -> None:
    """Guard against vacuous atomic runs: each kind completes, a cas swaps
    and another does not, an incr adds, one finds a value that is no number."""
    sim = Simulation(atomic=True)
    steps: list[tuple[str, dict[str, object]]] = [
        ("cas", {"expect": None, "value": b"1"}),
        ("cas", {"expect": None, "value": b"2"}),
        ("incr", {"by": 5, "value": None}),
        ("get", {"value": None}),
        ("set", {"value": b"x"}),
        ("incr", {"by": 1, "value": None}),
        ("delete", {"value": None}),
    ]
    for i, (kind, args) in enumerate(steps):
        start(sim, 0, kind, sim.ids[i % 3], **args)
        settle(sim)
    ops = sim.history
    assert [op.outcome for op in ops] == ["ok"] * len(steps)
    assert [op.swapped for op in ops[:2]] == [True, False] and ops[1].observed == b"1"
    assert ops[2].value == b"6" and ops[3].value == b"6"
    assert ops[5].not_integer
    assert check(ops).ok


def test_a_store_below_the_promise_breaks_atomicity() -> None:
    """A set's store reaches a node after it promised a cas's higher ballot.
    Stored and acknowledged there, the set completes unseen by the cas,
    which then swaps as if the set had never been: no order explains it."""
    assert not check(set_between_promise_and_accept(ack_below_promise=True)).ok
    assert check(set_between_promise_and_accept(ack_below_promise=False)).ok


def set_between_promise_and_accept(ack_below_promise: bool) -> list[Op]:
    sim = Simulation(atomic=True, ack_below_promise=ack_below_promise)
    start(sim, 0, "set", N1, value=b"1")
    sim.deliver_where(src="n1", dst="n1", kind=SendQuery)
    sim.deliver_where(src="n1", dst="n2", kind=SendQuery)
    sim.deliver_where(dst="n1", kind=None)  # the set's tag is issued; its stores go out
    start(sim, 1, "cas", N3, expect=None, value=b"2")  # a ballot above the set's tag
    sim.deliver_where(dst="n2", kind=SendPrepare)
    sim.deliver_where(dst="n3", kind=SendPrepare)
    sim.deliver_where(src="n1", dst="n1", kind=SendStore)
    sim.deliver_where(src="n1", dst="n2", kind=SendStore)  # after n2's promise
    sim.deliver_where(dst="n1", kind=None)
    assert bool(sim.history) == ack_below_promise  # the set completed only if n2 took it
    sim.deliver_where(dst="n3", kind=None)  # the cas's promises: it swaps
    sim.deliver_where(src="n3", kind=SendStore)
    sim.deliver_where(dst="n3", kind=None)
    settle(sim)
    start(sim, 2, "get", N2)
    settle(sim)
    return sim.history


def test_a_restarted_node_that_forgets_its_promises_breaks_atomicity() -> None:
    """A node promises a cas's ballot and restarts. Without the promise floor
    it takes a set's lower tag, the set completes, and the cas then swaps
    over it without having seen it."""
    assert not check(set_after_forgotten_promise(forget_promises=True)).ok
    assert check(set_after_forgotten_promise(forget_promises=False)).ok


def set_after_forgotten_promise(forget_promises: bool) -> list[Op]:
    sim = Simulation(atomic=True, forget_promises=forget_promises)
    start(sim, 1, "cas", N3, expect=None, value=b"2")
    sim.deliver_where(dst="n2", kind=SendPrepare)
    sim.deliver_where(dst="n3", kind=SendPrepare)
    sim.deliver_where(dst="n3", kind=None)  # promised by n2 and n3: accepts go out
    sim.crash(1)  # n2 down, and the messages to it lost ...
    sim.crash(1)  # ... and up again, its promises forgotten
    start(sim, 0, "set", N1, value=b"1")
    sim.deliver_where(src="n1", dst="n1", kind=SendQuery)
    sim.deliver_where(src="n1", dst="n2", kind=SendQuery)
    sim.deliver_where(dst="n1", kind=None)
    sim.deliver_where(src="n1", dst="n1", kind=SendStore)
    sim.deliver_where(src="n1", dst="n2", kind=SendStore)
    sim.deliver_where(dst="n1", kind=None)
    assert [op.kind for op in sim.history] == ["set"]
    sim.deliver_where(src="n3", kind=SendStore)  # the cas's accepts, to n1 and n3
    sim.deliver_where(dst="n3", kind=None)
    settle(sim)
    for client in list(sim.active):
        sim.give_up(client)
    start(sim, 2, "get", N2)
    settle(sim)
    return sim.history
