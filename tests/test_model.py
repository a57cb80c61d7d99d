"""The pure data model: tags, the merge rule, batched state updates, the rid table.

Everything here is plain Python (no trio, no sockets); the last test checks
that importing the pure core really does not pull trio in.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from collections import OrderedDict

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from register.model import Key, NodeId, RidRecord, Tag, Versioned, merge, newer
from register.rids import RidTable
from register.state import RegisterState, apply_updates, empty_state, highest_counter
from tests.strategies import node_ids, small_tags, tags, versions

#: a few keys, so that updates of one batch often hit the same key
few_keys = st.sampled_from([Key(k) for k in (b"a", b"b", b"c", b"d")])
maybe_versions = st.none() | versions()
updates = st.lists(st.tuples(few_keys, versions()), max_size=25)
states = st.dictionaries(few_keys, versions(), max_size=4)


def as_tuple(tag: Tag) -> tuple[int, str]:
    return (tag.counter, tag.writer)


# --- Tag -------------------------------------------------------------------


@given(tags | small_tags, tags | small_tags)
def test_tag_order_is_counter_then_writer(a: Tag, b: Tag) -> None:
    """Tags compare exactly like the tuple ``(counter, writer)``."""
    ta, tb = as_tuple(a), as_tuple(b)
    assert (a < b) == (ta < tb)
    assert (a <= b) == (ta <= tb)
    assert (a > b) == (ta > tb)
    assert (a >= b) == (ta >= tb)
    assert (a == b) == (ta == tb)


def test_tag_order_examples() -> None:
    # the counter dominates the writer id
    assert Tag(2, NodeId("a")) > Tag(1, NodeId("z"))
    # equal counters: the writer id breaks the tie
    assert Tag(3, NodeId("n2")) > Tag(3, NodeId("n1"))
    assert Tag(3, NodeId("n1")) == Tag(3, NodeId("n1"))


@given(tags)
def test_zero_tag_is_lowest(tag: Tag) -> None:
    assert Tag.zero() <= tag
    if tag.counter > 0:
        assert Tag.zero() < tag


@given(tags | small_tags, st.integers(min_value=0, max_value=2**64), node_ids)
def test_successor(tag: Tag, floor: int, writer: NodeId) -> None:
    nxt = tag.successor(floor, writer)
    assert nxt.writer == writer
    assert nxt.counter == max(tag.counter, floor) + 1
    assert nxt > tag
    assert nxt.counter > floor


# --- merge / newer ---------------------------------------------------------


@given(maybe_versions)
def test_merge_idempotent(a: Versioned | None) -> None:
    assert merge(a, a) == a


@given(maybe_versions, maybe_versions)
def test_merge_commutative(a: Versioned | None, b: Versioned | None) -> None:
    assert merge(a, b) == merge(b, a)


@given(maybe_versions, maybe_versions, maybe_versions)
def test_merge_associative(a: Versioned | None, b: Versioned | None, c: Versioned | None) -> None:
    assert merge(merge(a, b), c) == merge(a, merge(b, c))


@given(maybe_versions, maybe_versions)
def test_merge_keeps_the_greatest_tag(a: Versioned | None, b: Versioned | None) -> None:
    m = merge(a, b)
    present = [v for v in (a, b) if v is not None]
    if not present:
        assert m is None
    else:
        assert m is not None
        assert m in present
        assert m.tag == max(v.tag for v in present)


@given(maybe_versions, versions())
def test_newer_agrees_with_merge(held: Versioned | None, incoming: Versioned) -> None:
    """A replica adopts ``incoming`` exactly when merge picks it."""
    adopt = newer(held, incoming)
    assert adopt == (held is None or incoming.tag > held.tag)
    assert merge(held, incoming) is (incoming if adopt else held)


def test_tombstone_is_deleted() -> None:
    assert Versioned(Tag(1, NodeId("n1")), None).deleted
    assert not Versioned(Tag(1, NodeId("n1")), b"").deleted


# --- apply_updates ---------------------------------------------------------


def fold(initial: dict[Key, Versioned], batch: list[tuple[Key, Versioned]]) -> dict[Key, Versioned]:
    """Oracle: per key, merge the held version with every update of it."""
    out = dict(initial)
    for key in {k for k, _ in batch}:
        result = functools.reduce(merge, [v for k, v in batch if k == key], initial.get(key))
        assert result is not None
        out[key] = result
    return out


def state_of(d: dict[Key, Versioned]) -> RegisterState:
    state = empty_state()
    for k, v in d.items():
        state = state.set(k, v)
    return state


@given(states, updates, st.data())
def test_apply_updates_is_a_fold_of_merge_in_any_order(
    initial: dict[Key, Versioned], batch: list[tuple[Key, Versioned]], data: st.DataObject
) -> None:
    expected = fold(initial, batch)
    shuffled = data.draw(st.permutations(batch), label="order")
    new, _ = apply_updates(state_of(initial), batch)
    new_shuffled, _ = apply_updates(state_of(initial), shuffled)
    assert dict(new) == expected
    assert dict(new_shuffled) == expected


@given(states, updates)
def test_apply_updates_reports_exactly_the_changed_keys(
    initial: dict[Key, Versioned], batch: list[tuple[Key, Versioned]]
) -> None:
    old = state_of(initial)
    new, changed = apply_updates(old, batch)
    changed_keys = [k for k, _ in changed]
    assert len(changed_keys) == len(set(changed_keys)), "a key is reported once per batch"
    assert set(changed_keys) == {k for k in new if old.get(k) != new[k]}
    # what is reported is what the new state holds (what storage must get)
    for key, version in changed:
        assert new[key] == version
    # the old map is a snapshot: untouched by the update
    assert dict(old) == initial


@given(states, updates)
def test_apply_updates_twice_changes_nothing(
    initial: dict[Key, Versioned], batch: list[tuple[Key, Versioned]]
) -> None:
    once, _ = apply_updates(state_of(initial), batch)
    twice, changed = apply_updates(once, batch)
    assert changed == []
    assert dict(twice) == dict(once)


def test_apply_updates_drops_losers_within_a_batch() -> None:
    k = Key(b"k")
    v5 = Versioned(Tag(5, NodeId("n1")), b"five")
    v3 = Versioned(Tag(3, NodeId("n2")), b"three")
    new, changed = apply_updates(empty_state(), [(k, v5), (k, v3)])
    assert dict(new) == {k: v5}
    assert changed == [(k, v5)]


@given(states)
def test_highest_counter(initial: dict[Key, Versioned]) -> None:
    assert highest_counter(state_of(initial)) == max((v.tag.counter for v in initial.values()), default=0)


# --- RidTable --------------------------------------------------------------

rid_pool = st.sampled_from([bytes([i]) * 8 for i in range(8)])
#: one add() call: how far the clock moves, then the records (rid, tag counter)
steps = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=10),
        st.lists(st.tuples(rid_pool, st.integers(min_value=1, max_value=50)), max_size=5),
    ),
    max_size=20,
)


def record(rid: bytes, counter: int, at: float) -> RidRecord:
    return RidRecord(rid=rid, request=b"k" + rid, tag=Tag(counter, NodeId("n1")), at=at)


# Whole seconds keep the age arithmetic exact (no float rounding at the horizon).
@given(st.integers(min_value=0, max_value=6), st.integers(min_value=0, max_value=25), steps)
def test_rid_table_bounded_and_complete(
    max_count: int, max_age: int, script: list[tuple[int, list[tuple[bytes, int]]]]
) -> None:
    table = RidTable(max_count=max_count, max_age=float(max_age))
    #: reference model: rid -> record, oldest first
    model: OrderedDict[bytes, RidRecord] = OrderedDict()
    added: set[bytes] = set()
    dropped_ever: set[bytes] = set()
    now = 1000.0
    for dt, batch in script:
        now += dt
        records = [record(rid, counter, now) for rid, counter in batch]
        before = set(model)
        for r in records:
            held = model.pop(r.rid, None)
            model[r.rid] = attrs.evolve(held, at=r.at) if held is not None and held.tag > r.tag else r
        expected_dropped = []
        for rid, r in list(model.items()):
            if len(model) > max_count or r.at < now - max_age:
                expected_dropped.append(rid)
                del model[rid]
            else:
                break

        dropped = table.add(records, now)
        added |= {r.rid for r in records}
        dropped_ever |= set(dropped)
        kept = {r.rid for r in table.records()}

        assert len(table) <= max_count
        assert all(now - r.at <= max_age for r in table.records())
        assert len(dropped) == len(set(dropped))
        assert not set(dropped) & kept, "a dropped rid is gone"
        assert set(dropped) <= before | {r.rid for r in records}
        assert dropped_ever | kept == added
        # differential: the exact records (highest tag, refreshed age, order)
        assert dropped == expected_dropped
        assert table.records() == list(model.values())
        for rid in kept:
            assert table.lookup(rid) == model[rid]


def test_rid_readd_keeps_the_highest_tag_and_refreshes_age() -> None:
    table = RidTable(max_count=10, max_age=10.0)
    a, b = b"a" * 8, b"b" * 8
    assert table.add([record(a, 5, 0.0), record(b, 2, 0.0)], now=0.0) == []
    # re-adding a with a lower tag (a late duplicate): the higher one kept, age refreshed
    assert table.add([record(a, 1, 8.0)], now=8.0) == []
    assert (found := table.lookup(a)) is not None and found.tag == Tag(5, NodeId("n1"))
    # at 12, b (stored at 0) is too old; a (refreshed at 8) is not
    assert table.add([], now=12.0) == [b]
    assert (found := table.lookup(a)) is not None and found.tag == Tag(5, NodeId("n1"))
    # a write refused by a majority retried under a higher tag: that one is kept
    assert table.add([record(a, 99, 13.0)], now=13.0) == []
    assert (found := table.lookup(a)) is not None and found.tag == Tag(99, NodeId("n1"))
    assert table.lookup(b) is None


def test_lineage_names_the_notes_that_came_with_a_version() -> None:
    table = RidTable(max_count=10, max_age=10.0)
    a, b, c = b"a" * 8, b"b" * 8, b"c" * 8
    t5, t7 = Tag(5, NodeId("n1")), Tag(7, NodeId("n2"))
    table.add([record(a, 5, 0.0)], now=0.0)
    # the version 7 was built on version 5: its store carried a's note too
    table.add([record(b, 7, 1.0), record(a, 5, 1.0)], now=1.0, came_with=[t7, t7])
    assert [n.rid for n in table.lineage(t7)] == [b, a]
    assert [n.rid for n in table.lineage(t5)] == [a]
    assert table.lineage(Tag(9, NodeId("n1"))) == ()
    table.add([record(c, 9, 30.0)], now=30.0)  # a and b expire
    assert table.lineage(t7) == ()


def test_rid_table_count_bound_drops_oldest_first() -> None:
    table = RidTable(max_count=2, max_age=1000.0)
    rids = [bytes([i]) * 8 for i in range(4)]
    dropped = table.add([record(r, i + 1, 0.0) for i, r in enumerate(rids)], now=0.0)
    assert dropped == rids[:2]
    assert [r.rid for r in table.records()] == rids[2:]


# --- the pure core does not import trio -------------------------------------


@pytest.mark.parametrize(
    ("modules", "forbidden"),
    [
        (["register", "register.rids", "register.state", "quorum.protocol", "net.framing"], "trio"),
        (["quorum.protocol.acceptor", "quorum.protocol.atomic", "quorum.protocol.operation"], "trio"),
        (["quorum.protocol.acceptor", "quorum.protocol.atomic", "quorum.protocol.operation"], "msgpack"),
        (["net.codec", "net.messages", "net.errors"], "trio"),
        (["register", "register.rids", "register.state", "register.sqlite_store"], "msgpack"),
    ],
)
def test_pure_core_does_not_import(modules: list[str], forbidden: str) -> None:
    code = f"import sys\nfor m in {modules!r}: __import__(m)\nprint({forbidden!r} in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False"
