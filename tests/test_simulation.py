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

from quorum.protocol.operation import SendQuery, SendStore
from register.model import Key, NodeId
from tests.simulation import Simulation
from tests.support.history import Op
from tests.support.linearizability import check

X, N1, N3 = Key(b"x"), NodeId("n1"), NodeId("n3")
programs = st.lists(st.tuples(st.integers(0, 11), st.integers(0, 1000)), max_size=300)


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
