"""The acceptor rules and the functions of cas and incr, as pure code.

Properties of ``quorum.protocol.acceptor`` against a restatement of the
rule in DESIGN.md, of ``quorum.protocol.atomic`` against Python's own
integers, and the replica that applies them: promises refuse lower stores,
survive a restart as a floor, and a prepare reports what was stored before.
"""

from __future__ import annotations

import re

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from quorum.protocol.acceptor import Verdict, floor_after, prepare_verdict, store_verdict
from quorum.protocol.atomic import MAX_INT64, MIN_INT64, NotAnInteger, apply_cas, apply_incr, parse_counter
from quorum.protocol.operation import Nack, QueryResult
from quorum.replica import Replica, Update
from register.model import Key, NodeId, RidNote, Tag, Versioned
from register.store import MemoryStore
from tests.strategies import tags

maybe_versions = st.none() | st.builds(Versioned, tags, st.none() | st.binary(max_size=4))
NODE = NodeId("n1")
K = Key(b"k")


# --- the rule ------------------------------------------------------------------


@given(maybe_versions, tags, tags, st.none() | tags)
def test_store_verdict_is_the_rule_of_the_design(
    held: Versioned | None, promise: Tag, tag: Tag, stored_for_rid: Tag | None
) -> None:
    judged = store_verdict(held, promise, tag, stored_for_rid)
    held_tag = None if held is None else held.tag
    if tag in (held_tag, stored_for_rid):
        assert judged.verdict is Verdict.DUPLICATE
    elif (held_tag is None or tag > held_tag) and tag >= promise:
        assert judged.verdict is Verdict.ACCEPT
    else:
        assert judged.verdict is Verdict.REFUSE
        # the coordinator's next try goes above what was reported, and
        # that clears both the promise and the held tag
        assert judged.above is not None and judged.above >= promise
        assert held_tag is None or judged.above >= held_tag


@given(maybe_versions, tags, tags)
def test_a_store_below_the_promise_is_never_taken(held: Versioned | None, promise: Tag, tag: Tag) -> None:
    judged = store_verdict(held, promise, tag, None)
    if tag < promise and (held is None or tag != held.tag):
        assert judged.verdict is Verdict.REFUSE


@given(maybe_versions, tags, tags)
def test_prepare_promises_only_above_promise_and_held(
    held: Versioned | None, promise: Tag, ballot: Tag
) -> None:
    judged = prepare_verdict(held, promise, ballot)
    above_all = ballot > promise and (held is None or ballot > held.tag)
    assert (judged.verdict is Verdict.ACCEPT) == above_all
    if not above_all:
        assert judged.above is not None and judged.above >= ballot


@given(
    st.integers(min_value=0, max_value=2**62), st.integers(min_value=0, max_value=2**62), st.text(max_size=3)
)
def test_the_floor_after_a_restart_is_above_every_reserved_promise(
    reserved: int, counter: int, writer: str
) -> None:
    floor = floor_after(reserved)
    if reserved == 0:
        assert floor == Tag.zero()
    elif counter <= reserved:
        assert Tag(counter, NodeId(writer)) < floor


# --- cas and incr on a value ------------------------------------------------------


@given(st.integers(min_value=MIN_INT64, max_value=MAX_INT64), st.integers(MIN_INT64, MAX_INT64))
def test_incr_adds_in_canonical_decimal_or_refuses_overflow(old: int, by: int) -> None:
    if MIN_INT64 <= old + by <= MAX_INT64:
        out = apply_incr(str(old).encode(), by)
        assert out.number == old + by and out.value == str(old + by).encode()
    else:
        with pytest.raises(NotAnInteger):
            apply_incr(str(old).encode(), by)


@given(st.binary(max_size=22))
def test_only_canonical_int64_decimals_are_counters(value: bytes) -> None:
    canonical = re.fullmatch(rb"0|-?[1-9][0-9]*", value) is not None and MIN_INT64 <= int(value) <= MAX_INT64
    if canonical:
        assert parse_counter(value) == int(value)
    else:
        with pytest.raises(NotAnInteger):
            parse_counter(value)


@pytest.mark.parametrize(
    "value", [b"05", b"-0", b"+5", b" 5", b"5 ", b"abc", b"", b"1e3", b"9223372036854775808"]
)
def test_non_canonical_values_are_not_integers(value: bytes) -> None:
    with pytest.raises(NotAnInteger):
        apply_incr(value, 1)


def test_absent_counts_as_zero_and_the_int64_ends_hold() -> None:
    assert apply_incr(None, 0).value == b"0"
    assert apply_incr(None, -7).number == -7
    assert apply_incr(str(MAX_INT64).encode(), 0).number == MAX_INT64
    assert apply_incr(str(MIN_INT64).encode(), 0).number == MIN_INT64
    for start, by in ((MAX_INT64, 1), (MIN_INT64, -1)):
        with pytest.raises(NotAnInteger, match="overflow"):
            apply_incr(str(start).encode(), by)


@given(
    st.none() | st.binary(max_size=2), st.none() | st.binary(max_size=2), st.none() | st.binary(max_size=2)
)
def test_cas_swaps_exactly_on_equality(
    current: bytes | None, expect: bytes | None, value: bytes | None
) -> None:
    out = apply_cas(current, expect, value)
    assert out.swapped == (current == expect)
    assert out.value == (value if out.swapped else current)


# --- the replica -------------------------------------------------------------------


def version(counter: int, writer: str = "n2", value: bytes | None = b"v") -> Versioned:
    return Versioned(Tag(counter, NodeId(writer)), value)


async def prepare(replica: Replica, ballot: Tag) -> QueryResult | Nack:
    answers: list[object] = []
    done = trio.Event()

    def reply(answer: object) -> None:
        answers.append(answer)
        done.set()

    replica.prepare(K, ballot, None, reply)  # type: ignore[arg-type]
    with trio.fail_after(5):
        await done.wait()
    answer = answers[0]
    assert isinstance(answer, QueryResult | Nack), answer
    return answer


async def stored(replica: Replica, v: Versioned, notes: tuple[RidNote, ...] = ()) -> Verdict:
    done = trio.Event()
    [judged] = replica.offer([Update(K, v, notes)], lambda error: done.set())
    if judged.verdict is not Verdict.REFUSE:
        with trio.fail_after(5):
            await done.wait()
    return judged.verdict


async def test_a_promise_refuses_lower_stores_and_ballots() -> None:
    replica = Replica(NODE, MemoryStore())
    async with trio.open_nursery() as nursery:
        await nursery.start(replica.run)
        assert await stored(replica, version(3)) is Verdict.ACCEPT
        promised = await prepare(replica, Tag(10, NodeId("n3")))
        assert isinstance(promised, QueryResult) and promised.version == version(3)
        assert await stored(replica, version(5)) is Verdict.REFUSE  # above the held tag, below the promise
        assert await stored(replica, version(3)) is Verdict.DUPLICATE  # the held version itself
        assert await prepare(replica, Tag(9, NodeId("n2"))) == Nack(Tag(10, NodeId("n3")))
        assert replica.query(K, None).promise == Tag(10, NodeId("n3"))
        assert await stored(replica, version(10, "n3")) is Verdict.ACCEPT  # the accept of that ballot
        assert replica.query(K, None).promise is None  # the held tag refuses as much now
        nursery.cancel_scope.cancel()


async def test_a_restarted_node_refuses_what_it_promised_to_refuse() -> None:
    """Promises are in memory only; the reservation on disk makes the
    restarted node refuse every ballot and store up to it."""
    disk = MemoryStore()
    replica = Replica(NODE, disk)
    async with trio.open_nursery() as nursery:
        await nursery.start(replica.run)
        assert isinstance(await prepare(replica, Tag(10, NodeId("n3"))), QueryResult)
        nursery.cancel_scope.cancel()
    again = Replica(NODE, disk)  # kill -9 and restart: the same disk
    async with trio.open_nursery() as nursery:
        await nursery.start(again.run)
        assert await stored(again, version(10, "n2")) is Verdict.REFUSE
        assert isinstance(await prepare(again, Tag(10, NodeId("n4"))), Nack)
        floor = again.query(K, None).promise
        assert floor is not None and floor > Tag(10, NodeId("n3"))
        # its own tags clear its floor, and a store above it is taken
        assert again.known(K) == floor
        assert await stored(again, Versioned(floor.successor(0, NodeId("n2")), b"w")) is Verdict.ACCEPT
        nursery.cancel_scope.cancel()


async def test_a_prepare_reports_a_store_judged_before_it() -> None:
    """A store accepted but not yet durable when a prepare arrives: the
    promise's answer waits for it and reports it."""
    replica = Replica(NODE, MemoryStore())
    async with trio.open_nursery() as nursery:
        await nursery.start(replica.run)
        await prepare(replica, Tag(1, NodeId("n3")))  # the reservation is on disk now
        [judged] = replica.offer([Update(K, version(4))], None)
        assert judged.verdict is Verdict.ACCEPT
        answer = await prepare(replica, Tag(5, NodeId("n3")))
        assert isinstance(answer, QueryResult) and answer.version == version(4)
        nursery.cancel_scope.cancel()


async def test_rid_notes_come_back_as_the_lineage_of_their_version() -> None:
    replica = Replica(NODE, MemoryStore())
    mine = RidNote(rid=b"r" * 16, request=b"q" * 16, tag=Tag(7, NodeId("n2")), result=42)
    base = RidNote(rid=b"s" * 16, request=b"p" * 16, tag=Tag(3, NodeId("n3")), result=41)
    async with trio.open_nursery() as nursery:
        await nursery.start(replica.run)
        assert await stored(replica, version(7, value=b"42"), (mine, base)) is Verdict.ACCEPT
        result = replica.query(K, mine.rid)
        assert result.rid_seen == mine
        assert set(result.lineage) == {mine, base}
        # a retry storing the same version under the same rid is a duplicate
        assert await stored(replica, version(7, value=b"42"), (mine,)) is Verdict.DUPLICATE
        nursery.cancel_scope.cancel()
