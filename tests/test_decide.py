"""Quorum decisions (quorum.protocol.decide), checked against brute-force oracles."""

from __future__ import annotations

import itertools
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quorum.protocol.decide import Decision, ReadOutcome, Vote, majority, read_outcome, write_tag
from register.model import NodeId, Tag, Versioned
from tests.strategies import node_ids, small_tags, tags, versions

KNOWN = [NodeId(f"n{i}") for i in range(1, 8)]
#: nodes that are never members of the vote's node set
STRANGERS = [NodeId("x1"), NodeId("x2")]

Event = tuple[Literal["reply", "fail"], NodeId, int]

node_sets = st.sets(st.sampled_from(KNOWN), min_size=1).map(frozenset)
events = st.lists(
    st.tuples(st.sampled_from(["reply", "fail"]), st.sampled_from(KNOWN + STRANGERS), st.integers(0, 9)),
    max_size=30,
)


# --- majority --------------------------------------------------------------


@pytest.mark.parametrize(("n", "expected"), [(1, 1), (2, 2), (3, 2), (4, 3), (5, 3), (6, 4), (7, 4)])
def test_majority_examples(n: int, expected: int) -> None:
    assert majority(n) == expected


@given(st.integers(min_value=1, max_value=10_000))
def test_majority_is_the_smallest_more_than_half(n: int) -> None:
    m = majority(n)
    assert 2 * m > n
    assert 2 * (m - 1) <= n


@pytest.mark.parametrize("n", [0, -1])
def test_majority_of_nothing_is_an_error(n: int) -> None:
    with pytest.raises(ValueError):
        majority(n)


@given(
    st.integers(min_value=1, max_value=9).flatmap(
        lambda n: st.tuples(
            st.just(n),
            st.sets(st.integers(0, n - 1), min_size=majority(n)),
            st.sets(st.integers(0, n - 1), min_size=majority(n)),
        )
    )
)
def test_two_majorities_intersect(case: tuple[int, set[int], set[int]]) -> None:
    _, a, b = case
    assert a & b


# --- Vote ------------------------------------------------------------------


def oracle(
    nodes: frozenset[NodeId], quorum: int | None, evs: list[Event]
) -> list[tuple[Decision, dict[NodeId, int]]]:
    """For every prefix of ``evs``: the decision and the replies it rests on,
    computed from scratch.

    Only the first outcome of each known node counts. The decision is taken
    at the earliest prefix where the distinct replies reach the quorum (WON)
    or the distinct failures leave too few nodes to reach it (LOST); nothing
    after that prefix matters.
    """
    needed = majority(len(nodes)) if quorum is None else quorum

    def count(prefix: list[Event]) -> tuple[dict[NodeId, int], set[NodeId]]:
        replies: dict[NodeId, int] = {}
        failures: set[NodeId] = set()
        for kind, node, value in prefix:
            if node not in nodes or node in replies or node in failures:
                continue
            if kind == "reply":
                replies[node] = value
            else:
                failures.add(node)
        return replies, failures

    out = []
    for i in range(len(evs) + 1):
        result: tuple[Decision, dict[NodeId, int]] | None = None
        for j in range(1, i + 1):
            replies, failures = count(evs[:j])
            if len(replies) >= needed:
                result = (Decision.WON, replies)
                break
            if len(nodes) - len(failures) < needed:
                result = (Decision.LOST, replies)
                break
        out.append(result or (Decision.PENDING, count(evs[:i])[0]))
    return out


@given(node_sets, events, st.data())
def test_vote_matches_oracle(nodes: frozenset[NodeId], evs: list[Event], data: st.DataObject) -> None:
    quorum = data.draw(st.none() | st.integers(1, len(nodes)), label="quorum")
    vote: Vote[int] = Vote(nodes, quorum=quorum)
    expected = oracle(nodes, quorum, evs)
    assert vote.decision is Decision.PENDING
    seen = [vote.decision]
    for kind, node, value in evs:
        got = vote.reply(node, value) if kind == "reply" else vote.fail(node)
        assert got is vote.decision
        seen.append(got)
    assert seen == [d for d, _ in expected]
    assert vote.replies == expected[-1][1]
    # once made, a decision never changes
    for before, after in itertools.pairwise(seen):
        assert before is Decision.PENDING or after is before


def test_vote_ignores_duplicates_and_strangers() -> None:
    vote: Vote[str] = Vote(frozenset(KNOWN[:3]))
    assert vote.reply(KNOWN[0], "a") is Decision.PENDING
    assert vote.reply(KNOWN[0], "again") is Decision.PENDING  # duplicate
    assert vote.reply(STRANGERS[0], "x") is Decision.PENDING  # not a member
    assert vote.fail(KNOWN[0]) is Decision.PENDING  # already heard
    assert vote.replies == {KNOWN[0]: "a"}
    assert vote.reply(KNOWN[1], "b") is Decision.WON
    assert vote.fail(KNOWN[2]) is Decision.WON


def test_vote_lost_when_majority_impossible() -> None:
    vote: Vote[str] = Vote(frozenset(KNOWN[:5]))
    assert vote.fail(KNOWN[0]) is Decision.PENDING
    assert vote.fail(KNOWN[1]) is Decision.PENDING
    assert vote.reply(KNOWN[2], "c") is Decision.PENDING
    assert vote.fail(KNOWN[3]) is Decision.LOST  # only 2 of 5 can still reply
    assert vote.reply(KNOWN[4], "e") is Decision.LOST


# --- read_outcome -------------------------------------------------------------


def v(counter: int, writer: str, value: bytes | None) -> Versioned:
    return Versioned(Tag(counter, NodeId(writer)), value)


@given(st.lists(st.none() | versions(), min_size=1, max_size=7), st.data())
def test_read_outcome_matches_oracle(replies: list[Versioned | None], data: st.DataObject) -> None:
    quorum = data.draw(st.integers(1, len(replies)), label="quorum")
    outcome = read_outcome(replies, quorum)
    written = [r for r in replies if r is not None]
    if not written:
        assert outcome == ReadOutcome(None, write_back=False)
        return
    top = max(r.tag for r in written)
    carrying = sum(1 for r in written if r.tag == top)
    assert outcome.winner is not None
    assert outcome.winner.tag == top
    assert outcome.winner in written
    assert outcome.write_back == (carrying < quorum)


@given(st.integers(min_value=1, max_value=7))
def test_read_outcome_never_written(n: int) -> None:
    assert read_outcome([None] * n, majority(n)) == ReadOutcome(None, write_back=False)


def test_read_outcome_newest_on_less_than_a_majority() -> None:
    """3 nodes, a majority of 2 replied; the newest tag is on one of them only."""
    outcome = read_outcome([v(5, "n1", b"a"), v(4, "n2", b"b")], 2)
    assert outcome == ReadOutcome(v(5, "n1", b"a"), write_back=True)


def test_read_outcome_fast_path() -> None:
    outcome = read_outcome([v(5, "n1", b"a"), v(5, "n1", b"a"), v(4, "n2", b"b")], 2)
    assert outcome == ReadOutcome(v(5, "n1", b"a"), write_back=False)


def test_read_outcome_same_counter_other_writer_is_not_agreement() -> None:
    # (5, n2) > (5, n1): only one reply carries exactly the max tag
    outcome = read_outcome([v(5, "n1", b"a"), v(5, "n2", b"b")], 2)
    assert outcome == ReadOutcome(v(5, "n2", b"b"), write_back=True)


def test_read_outcome_tombstone_wins_and_is_written_back() -> None:
    outcome = read_outcome([v(6, "n3", None), None], 2)
    assert outcome == ReadOutcome(v(6, "n3", None), write_back=True)


# --- write_tag ---------------------------------------------------------------


@given(
    st.lists(st.none() | tags | small_tags, max_size=7),
    st.integers(min_value=0, max_value=2**64),
    node_ids,
)
def test_write_tag(seen: list[Tag | None], floor: int, writer: NodeId) -> None:
    tag = write_tag(seen, floor, writer)
    assert tag.writer == writer
    assert tag.counter > floor
    assert all(tag > s for s in seen if s is not None)
    # and no higher than needed
    assert tag.counter == max([floor] + [s.counter for s in seen if s is not None]) + 1


def test_write_tag_examples() -> None:
    n1, n2 = NodeId("n1"), NodeId("n2")
    assert write_tag([], 0, n1) == Tag(1, n1)
    assert write_tag([None, None], 0, n1) == Tag(1, n1)
    assert write_tag([Tag(4, n2), None, Tag(3, n1)], 2, n1) == Tag(5, n1)
    assert write_tag([Tag(4, n2)], 9, n1) == Tag(10, n1)
