"""Tests for the history model and the linearizability checker in tests/support."""

from __future__ import annotations

import itertools
import math
import random
import re
import time
from collections.abc import Sequence
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import linearizability
from tests.support.history import HistoryRecorder, Kind, Op, Outcome, State
from tests.support.linearizability import Result, check, check_key

K = b"k"


def op(
    kind: Kind,
    value: bytes | None,
    call: float,
    ret: float | None,
    *,
    client: int = 0,
    outcome: Outcome = "ok",
    key: bytes = K,
) -> Op:
    return Op(
        client=client,
        kind=kind,
        key=key,
        value=value,
        call=call,
        ret=ret,
        outcome=outcome,
    )


def assert_ok(ops: Sequence[Op]) -> None:
    result = check(ops)
    assert result.ok, result.describe()


def assert_fails(ops: Sequence[Op]) -> Result:
    result = check(ops)
    assert not result.ok, "expected a linearizability violation"
    assert result.window
    return result


# --- hand-made histories -----------------------------------------------------


def test_empty_history_is_ok() -> None:
    assert_ok([])


def test_sequential_history() -> None:
    assert_ok(
        [
            op("get", None, 0, 1),
            op("set", b"a", 2, 3),
            op("get", b"a", 4, 5),
            op("set", b"b", 6, 7),
            op("get", b"b", 8, 9),
            op("delete", None, 10, 11),
            op("get", None, 12, 13),
            op("set", b"a", 14, 15),
            op("get", b"a", 16, 17),
        ]
    )


@pytest.mark.parametrize("final", [b"a", b"b"])
def test_concurrent_writes_read_in_either_order(final: bytes) -> None:
    assert_ok(
        [
            op("set", b"a", 0, 10, client=1),
            op("set", b"b", 1, 9, client=2),
            op("get", final, 11, 12, client=3),
            op("get", final, 13, 14, client=4),
        ]
    )


def test_reads_during_concurrent_writes_may_see_both() -> None:
    assert_ok(
        [
            op("set", b"a", 0, 10, client=1),
            op("set", b"b", 0, 10, client=2),
            op("get", b"a", 1, 2, client=3),
            op("get", b"b", 3, 4, client=3),
            op("get", b"b", 11, 12, client=3),
        ]
    )


def test_touching_intervals_count_as_concurrent() -> None:
    assert_ok([op("get", b"a", 0, 5), op("set", b"a", 5, 6)])


def test_stale_read_is_caught() -> None:
    result = assert_fails(
        [
            op("set", b"a", 0, 1, client=1),
            op("set", b"b", 2, 3, client=1),
            op("get", b"a", 4, 5, client=2),
        ]
    )
    assert result.key == K
    assert result.window[-1] == op("get", b"a", 4, 5, client=2)


def test_lost_write_is_caught() -> None:
    assert_fails(
        [
            op("set", b"a", 0, 1, client=1),
            op("get", b"a", 2, 3, client=2),
            op("set", b"b", 4, 5, client=3),  # acknowledged...
            op("get", b"a", 6, 7, client=2),  # ...but never observed
            op("get", b"a", 8, 9, client=1),
        ]
    )


def test_deleted_key_coming_back_is_caught() -> None:
    result = assert_fails(
        [
            op("set", b"a", 0, 1, client=1),
            op("delete", None, 2, 3, client=1),
            op("get", b"a", 4, 5, client=2),
        ]
    )
    assert [o.kind for o in result.window] == ["delete", "get"]


def test_unknown_write_landing_late_is_ok() -> None:
    assert_ok(
        [
            op("set", b"a", 0, 1),
            op("set", b"b", 2, None, client=1, outcome="unknown"),
            op("get", b"a", 3, 4),
            op("get", b"a", 100, 101),
            op("get", b"b", 1000, 1001),
            op("get", b"b", 1002, 1003),
        ]
    )


def test_unknown_write_never_seen_is_ok() -> None:
    assert_ok(
        [
            op("set", b"a", 0, 1),
            op("set", b"b", 2, None, client=1, outcome="unknown"),
            op("get", b"a", 3, 4),
            op("get", b"a", 1000, 1001),
        ]
    )


def test_unknown_write_cannot_land_before_its_call() -> None:
    assert_fails(
        [
            op("get", b"b", 0, 1),
            op("set", b"b", 2, None, outcome="unknown"),
        ]
    )


def test_unknown_write_lands_at_most_once() -> None:
    assert_fails(
        [
            op("set", b"b", 0, None, client=1, outcome="unknown"),
            op("get", b"b", 1, 2),
            op("set", b"a", 3, 4),
            op("get", b"b", 5, 6),
        ]
    )


def test_read_of_value_never_written_is_caught() -> None:
    result = assert_fails(
        [
            op("set", b"a", 0, 1),
            op("get", b"a", 2, 3),
            op("get", b"zzz", 4, 5, client=7),
            op("get", b"a", 6, 7),
        ]
    )
    assert result.window == [op("get", b"zzz", 4, 5, client=7)]


def test_read_before_any_write_sees_absent() -> None:
    assert_fails([op("get", b"a", 0, 1), op("set", b"a", 2, 3)])


def test_flip_flopping_reads_are_caught() -> None:
    assert_fails(
        [
            op("set", b"a", 0, 1, client=1),
            op("set", b"b", 2, 20, client=1),
            op("get", b"a", 3, 4, client=2),
            op("get", b"b", 5, 6, client=2),
            op("get", b"a", 7, 8, client=3),
        ]
    )


def test_failed_ops_are_dropped() -> None:
    assert_ok(
        [
            op("set", b"a", 0, 1),
            op("set", b"b", 2, 3, outcome="fail"),
            op("get", None, 2, 3, outcome="fail"),
            op("get", b"a", 4, 5),
        ]
    )
    assert_fails(
        [
            op("set", b"a", 0, 1),
            op("set", b"b", 2, 3, outcome="fail"),
            op("get", b"b", 4, 5),
        ]
    )


def test_unknown_gets_are_dropped() -> None:
    assert_ok(
        [
            op("set", b"a", 0, 1),
            op("get", None, 2, None, outcome="unknown"),
            op("get", b"a", 4, 5),
        ]
    )


def test_a_later_write_may_explain_a_long_read() -> None:
    # The window search must keep writes called after a window's start.
    result = assert_fails(
        [
            op("set", b"a", 0, 1, client=1),
            op("get", b"b", 2, 10, client=2),
            op("set", b"b", 3, 4, client=3),
            op("get", b"a", 20, 21, client=2),
        ]
    )
    assert result.window[-1].value == b"a"
    assert_ok(
        [
            op("set", b"a", 0, 1, client=1),
            op("get", b"b", 2, 10, client=2),
            op("set", b"b", 3, 4, client=3),
            op("get", b"b", 20, 21, client=2),
        ]
    )


def test_keys_are_independent() -> None:
    assert_ok(
        [
            op("set", b"a", 0, 1, key=b"x"),
            op("set", b"b", 2, 3, key=b"y"),
            op("get", b"a", 4, 5, key=b"x"),
            op("get", None, 4, 5, key=b"z"),
        ]
    )
    result = assert_fails(
        [
            op("set", b"a", 0, 1, key=b"x"),
            op("set", b"b", 2, 3, key=b"y"),
            op("get", b"a", 4, 5, key=b"y"),
            op("get", b"a", 4, 5, key=b"x"),
        ]
    )
    assert result.key == b"y"
    assert all(o.key == b"y" for o in result.window)


def test_window_is_small_and_contains_the_offending_read() -> None:
    ops = []
    t = 0.0
    for i in range(500):
        value = b"v%d" % i
        ops.append(op("set", value, t, t + 1, client=i % 5))
        ops.append(op("get", value, t + 0.5, t + 2, client=(i + 1) % 5))
        t += 3
    bad = op("get", b"v100", t, t + 1, client=9)  # stale by 399 writes
    ops.append(bad)
    ops.append(op("set", b"late", t + 2, t + 3))
    result = assert_fails(ops)
    assert bad in result.window
    assert len(result.window) <= 3, result.describe()
    assert not result.from_start


def test_describe_mentions_key_and_ops() -> None:
    result = assert_fails(
        [
            op("set", b"a", 0, 1, client=1),
            op("set", b"b", 2, 3, client=2),
            op("get", b"a", 4, 5, client=3),
        ]
    )
    text = result.describe()
    assert "b'k'" in text
    assert "client 2" in text and "set" in text and "b'b'" in text
    assert "client 3" in text and "get" in text
    assert "5.000000" in text
    assert check([]).describe() == "history is linearizable"


def test_check_key_rejects_mixed_keys() -> None:
    with pytest.raises(ValueError):
        check_key([op("get", None, 0, 1, key=b"x"), op("get", None, 0, 1, key=b"y")])


# --- the history model and recorder ------------------------------------------


def test_op_validation() -> None:
    with pytest.raises(ValueError):
        op("set", None, 0, 1)
    with pytest.raises(ValueError):
        op("delete", b"a", 0, 1)
    with pytest.raises(ValueError):
        op("get", None, 0, None)
    with pytest.raises(ValueError):
        op("get", None, 2, 1)
    with pytest.raises(ValueError):
        op("get", b"a", 0, None, outcome="unknown")


def test_recorder() -> None:
    ticks = iter(range(100))
    rec = HistoryRecorder(clock=lambda: float(next(ticks)))
    h_set = rec.invoke(1, "set", K, b"a")
    h_get = rec.invoke(2, "get", K)
    h_del = rec.invoke(3, "delete", K)
    h_lost = rec.invoke(4, "set", K, b"b")
    rec.complete(h_get, "ok", b"a")
    rec.complete(h_set, "ok")
    rec.complete(h_del, "unknown")
    assert len(rec) == 4
    assert rec.ops() == [
        op("set", b"a", 0, 5, client=1),
        op("get", b"a", 1, 4, client=2),
        op("delete", None, 2, None, client=3, outcome="unknown"),
        op("set", b"b", 3, None, client=4, outcome="unknown"),
    ]
    with pytest.raises(ValueError):
        rec.complete(h_get, "ok", b"a")
    with pytest.raises(ValueError):
        rec.complete(h_lost, "ok", b"b")
    with pytest.raises(ValueError):
        rec.invoke(1, "get", K, b"x")
    with pytest.raises(ValueError):
        rec.invoke(1, "set", K)
    assert check(rec.ops()).ok


# --- scale -------------------------------------------------------------------


def simulate(
    rng: random.Random,
    *,
    clients: int,
    ops_per_client: int,
    values: int | None = None,
    unknown: float = 0.0,
) -> list[Op]:
    """A concurrent history of a correct register.

    Each client runs ops back to back and each op takes effect at a random
    point of its interval.  A fraction ``unknown`` of the writes time out:
    half of those take effect up to 20 time units later, half never do.
    Written values are unique unless ``values`` limits them to that many.
    """
    # (effect time or None, client, kind, value, call, ret or None)
    planned: list[tuple[float | None, int, Kind, bytes | None, float, float | None]] = []
    for client in range(clients):
        t = rng.random()
        for i in range(ops_per_client):
            kind: Kind = rng.choice(["get", "get", "set", "delete"])
            value = None
            if kind == "set":
                value = b"%d" % rng.randrange(values) if values else b"%d-%d" % (client, i)
            call, ret = t, t + rng.uniform(0.1, 3.0)
            if kind != "get" and rng.random() < unknown:
                lands = rng.uniform(call, call + 20) if rng.random() < 0.5 else None
                planned.append((lands, client, kind, value, call, None))
            else:
                planned.append((rng.uniform(call, ret), client, kind, value, call, ret))
            t = ret + rng.uniform(0.0, 0.5)
    state: State = None
    ops = []
    for landed, client, kind, value, called, returned in sorted(
        planned, key=lambda p: (p[0] is None, p[0] or 0)
    ):
        if landed is not None:
            if kind == "set":
                state = value
            elif kind == "delete":
                state = None
            else:
                value = state
        outcome: Outcome = "ok" if returned is not None else "unknown"
        ops.append(op(kind, value, called, returned, client=client, outcome=outcome))
    return ops


# Generous on purpose: about 1 s is typical, and only an exponential
# blow-up of the search (the bug these tests are after) comes near this,
# even on a busy shared machine.
SLOW = 30.0


def timed_check(ops: list[Op]) -> tuple[Result, float]:
    started = time.perf_counter()
    result = check(ops)
    return result, time.perf_counter() - started


@pytest.mark.parametrize(("values", "unknown"), [(None, 0.0), (4, 0.0), (None, 0.1), (None, 0.3), (4, 0.1)])
def test_large_concurrent_history_is_fast(values: int | None, unknown: float) -> None:
    ops = simulate(random.Random(1), clients=10, ops_per_client=250, values=values, unknown=unknown)
    result, elapsed = timed_check(ops)
    assert result.ok, result.describe()
    assert elapsed < SLOW, f"took {elapsed:.2f}s for {len(ops)} ops"


def test_large_sequential_history_with_unknown_writes_is_fast() -> None:
    rng = random.Random(2)
    ops = []
    state: State = None
    for i in range(6000):
        t = float(i)
        if i % 50 == 7:
            # Timed out and never applied.
            ops.append(op("set", b"lost%d" % i, t, None, outcome="unknown"))
        elif rng.random() < 0.5:
            state = b"v%d" % i
            ops.append(op("set", state, t, t + 0.9, client=i % 10))
        else:
            ops.append(op("get", state, t, t + 0.9, client=i % 10))
    result, elapsed = timed_check(ops)
    assert result.ok, result.describe()
    assert elapsed < SLOW, f"took {elapsed:.2f}s for {len(ops)} ops"


@pytest.mark.parametrize("unknown", [0.0, 0.1, 0.3])
def test_large_concurrent_failure_is_found_fast_with_small_window(unknown: float) -> None:
    ops = simulate(random.Random(3), clients=10, ops_per_client=200, unknown=unknown)
    gets = [i for i, o in enumerate(ops) if o.kind == "get" and o.outcome == "ok"]
    victim = gets[len(gets) // 2]
    ops[victim] = op("get", b"never", ops[victim].call, ops[victim].ret, client=ops[victim].client)
    result, elapsed = timed_check(ops)
    assert not result.ok
    assert result.window == [ops[victim]]
    assert elapsed < SLOW, f"took {elapsed:.2f}s"


@pytest.mark.parametrize("unknown", [0.0, 0.1, 0.3])
def test_large_concurrent_stale_read_is_found_fast(unknown: float) -> None:
    ops = simulate(random.Random(4), clients=10, ops_per_client=200, unknown=unknown)
    gets = [i for i, o in enumerate(ops) if o.kind == "get" and o.outcome == "ok"]
    victim = ops[gets[len(gets) // 2]]
    overwritten = [w for w in ops if w.kind == "set" and w.ret is not None and w.ret < victim.call - 10]
    stale = op("get", overwritten[-1].value, victim.call, victim.ret, client=victim.client)
    ops[gets[len(gets) // 2]] = stale
    result, elapsed = timed_check(ops)
    assert not result.ok
    assert stale in result.window
    assert len(result.window) <= 12, result.describe()
    assert elapsed < SLOW, f"took {elapsed:.2f}s"


# --- properties ----------------------------------------------------------------

VALUES = [b"a", b"b", b"c"]


@st.composite
def valid_histories(draw: st.DrawFn) -> tuple[list[Op], list[int]]:
    """A sequential run of a random register program: step k takes effect at
    time 10*k, and its interval is widened randomly around that point.
    Returns the history and the indices of its ok gets."""
    steps = draw(st.integers(min_value=1, max_value=40))
    widen = st.floats(min_value=0, max_value=60, allow_nan=False)
    state: State = None
    ops: list[Op] = []
    ok_gets: list[int] = []
    for k in range(steps):
        t = 10.0 * k
        kind: Kind = draw(st.sampled_from(["get", "set", "delete"]))
        outcome: Outcome = draw(st.sampled_from(["ok", "ok", "ok", "fail", "unknown"]))
        value = draw(st.sampled_from(VALUES)) if kind == "set" else None
        call = max(0.0, t - draw(widen))
        ret = t + draw(widen)
        client = draw(st.integers(0, 9))
        if outcome == "ok" or (outcome == "unknown" and draw(st.booleans())):
            if kind == "set":
                state = value
            elif kind == "delete":
                state = None
        if kind == "get" and outcome == "ok":
            value = state
            ok_gets.append(len(ops))
        ops.append(
            op(
                kind,
                value,
                call,
                None if outcome == "unknown" else ret,
                client=client,
                outcome=outcome,
            )
        )
    return ops, ok_gets


@settings(max_examples=200, deadline=None)
@given(valid_histories())
def test_real_executions_always_pass(history: tuple[list[Op], list[int]]) -> None:
    ops, _ = history
    assert_ok(ops)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(valid_histories().filter(lambda h: bool(h[1])), st.randoms(use_true_random=False))
def test_reading_a_value_never_written_always_fails(
    history: tuple[list[Op], list[int]], rng: random.Random
) -> None:
    ops, ok_gets = history
    i = rng.choice(ok_gets)
    mutated = op("get", b"never", ops[i].call, ops[i].ret, client=ops[i].client)
    ops[i] = mutated
    result = assert_fails(ops)
    assert result.window == [mutated]


# A brute-force reference: try every subset of the optional ops in every
# order that respects real time, straight from the register's semantics
# (tests/support/history.py), written independently of the checker's model.

_COUNTER = re.compile(rb"0|-?[1-9][0-9]*")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def counter(state: State) -> int | None:
    """What incr sees: 0 for absent, the int of a canonical signed 64-bit
    decimal, None for anything else."""
    if state is None:
        return 0
    if not _COUNTER.fullmatch(state):
        return None
    n = int(state)
    return n if INT64_MIN <= n <= INT64_MAX else None


def apply(o: Op, state: State) -> tuple[bool, State]:
    """Whether ``o`` can take effect at ``state`` with the answer it got, and
    the state after it.  An op whose outcome is unknown always can (on a
    state where it would change nothing, it is a no-op)."""
    ok = o.outcome == "ok"
    if o.kind == "get":
        return o.value == state, state
    if o.kind == "set":
        return True, o.value
    if o.kind == "delete":
        return True, None
    if o.kind == "cas":
        match = state == o.expect
        if not ok:
            return True, o.value if match else state
        if o.swapped:
            return match, o.value
        return not match and state == o.observed, state
    assert o.kind == "incr" and o.by is not None
    n = counter(state)
    total = None if n is None or not INT64_MIN <= n + o.by <= INT64_MAX else n + o.by
    if not ok:
        return True, state if total is None else b"%d" % total
    if o.not_integer:
        return total is None, state
    return total is not None and o.value == b"%d" % total, o.value


def brute_force(ops: Sequence[Op], optional: Sequence[bool], initial_states: Sequence[State]) -> bool:
    def ret(o: Op) -> float:
        return o.ret if o.outcome == "ok" and o.ret is not None else math.inf

    def orders(remaining: list[Op], state: State) -> bool:
        if not remaining:
            return True
        for i, o in enumerate(remaining):
            # o can come next unless another remaining op returned before it was called.
            if any(ret(p) < o.call for j, p in enumerate(remaining) if j != i):
                continue
            legal, after = apply(o, state)
            if legal and orders(remaining[:i] + remaining[i + 1 :], after):
                return True
        return False

    required = [o for o, opt in zip(ops, optional, strict=True) if not opt]
    maybe = [o for o, opt in zip(ops, optional, strict=True) if opt]
    for r in range(len(maybe) + 1):
        for chosen in itertools.combinations(maybe, r):
            if any(orders([*required, *chosen], state) for state in initial_states):
                return True
    return False


def possible_states(ops: Sequence[Op]) -> list[State]:
    """Every state the key may hold at some point of a linearization of
    ``ops`` (and more): absent, what any op leaves, and any counter reachable
    from those by incrs whose result is unknown (each at most once)."""
    states: set[State] = {None}
    for o in ops:
        if o.kind == "set" or (o.kind == "cas" and o.swapped is not False) or (o.kind == "incr" and o.value):
            states.add(o.value)
    bumps = [o.by for o in ops if o.kind == "incr" and o.outcome != "ok" and o.by is not None]
    sums = {sum(c) for r in range(1, len(bumps) + 1) for c in itertools.combinations(bumps, r)}
    for n in [counter(s) for s in list(states)]:
        if n is not None:
            states.update(b"%d" % (n + d) for d in sums if INT64_MIN <= n + d <= INT64_MAX)
    return sorted(states, key=lambda s: (s is not None, s or b""))


@st.composite
def arbitrary_histories(draw: st.DrawFn) -> list[Op]:
    ops = []
    for _ in range(draw(st.integers(1, 6))):
        kind: Kind = draw(st.sampled_from(["get", "set", "delete"]))
        outcome: Outcome = draw(st.sampled_from(["ok", "ok", "ok", "fail", "unknown"]))
        if kind == "set":
            value: bytes | None = draw(st.sampled_from(VALUES))
        elif kind == "get" and outcome == "ok":
            value = draw(st.sampled_from([None, *VALUES]))
        else:
            value = None
        call = draw(st.integers(0, 12))
        ret = call + draw(st.integers(0, 6))
        ops.append(
            op(
                kind,
                value,
                call,
                None if outcome == "unknown" else ret,
                outcome=outcome,
            )
        )
    return ops


@settings(max_examples=500, deadline=None)
@given(arbitrary_histories(), st.sampled_from([None, 1]))
def test_agrees_with_brute_force(ops: list[Op], slice_steps: int | None) -> None:
    relevant = [o for o in ops if o.outcome == "ok" or (o.outcome == "unknown" and o.kind != "get")]
    optional = [o.outcome == "unknown" for o in relevant]
    expected = brute_force(relevant, optional, [None])
    # With slices of one step, windows are looked for during the search too.
    with mock.patch.object(linearizability, "_SLICE", slice_steps or linearizability._SLICE):
        result = check(ops)
    assert result.ok == expected, result.describe()
    if not result.ok:
        # The reported window must itself be a witness of the violation.
        initial = [None] if result.from_start else possible_states(relevant)
        window = [*result.window, *result.context]
        window_optional = [o.outcome == "unknown" for o in result.window]
        window_optional += [True] * len(result.context)
        assert not brute_force(window, window_optional, initial)


@settings(max_examples=100, deadline=None)
@given(valid_histories(), st.booleans(), st.randoms(use_true_random=False))
def test_looking_for_windows_during_the_search_changes_nothing(
    history: tuple[list[Op], list[int]], mutate: bool, rng: random.Random
) -> None:
    ops, ok_gets = history
    if mutate and ok_gets:
        i = rng.choice(ok_gets)
        ops[i] = op("get", rng.choice([*VALUES, None]), ops[i].call, ops[i].ret, client=ops[i].client)
    expected = check(ops)
    # Pause the search at every step to look for a failing window.
    with mock.patch.object(linearizability, "_SLICE", 1):
        result = check(ops)
    assert result.ok == expected.ok
    if not result.ok:
        assert len(result.window) <= len(ops)


def test_violation_found_by_looking_near_the_frontier() -> None:
    ops = simulate(random.Random(5), clients=10, ops_per_client=100, unknown=0.1)
    gets = [i for i, o in enumerate(ops) if o.kind == "get" and o.outcome == "ok"]
    victim = gets[len(gets) // 2]
    ops[victim] = op("get", b"never", ops[victim].call, ops[victim].ret, client=ops[victim].client)
    with mock.patch.object(linearizability, "_SLICE", 500):
        result = check(ops)
    assert result.window == [ops[victim]]


def test_duplicated_unknown_writes_may_each_land_once() -> None:
    # A client that retried a timed-out write: each attempt may land, once.
    history = [
        op("set", b"a", 0, 1, client=1),
        op("set", b"a", 0, None, client=1, outcome="unknown"),
        op("set", b"b", 2, 3, client=2),
        op("get", b"a", 4, 5, client=3),
    ]
    assert_ok(history)
    again = [op("set", b"b", 6, 7, client=2), op("get", b"a", 8, 9, client=3)]
    assert_fails(history + again)
    assert_ok([*history, *again, op("set", b"a", 0, None, client=1, outcome="unknown")])
