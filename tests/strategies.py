"""Hypothesis strategies shared by the tests."""

from __future__ import annotations

from hypothesis import strategies as st

from register.model import Key, NodeId, Tag, Versioned

node_ids = st.sampled_from([NodeId(n) for n in ("n1", "n2", "n3", "n4", "n5")])
tags = st.builds(Tag, st.integers(min_value=0, max_value=2**64 - 1), node_ids)
small_tags = st.builds(Tag, st.integers(min_value=0, max_value=6), node_ids)
keys = st.binary(min_size=1, max_size=1024).map(Key)
values = st.binary(max_size=256)
rids = st.binary(min_size=8, max_size=64)


def versions(tag_strategy: st.SearchStrategy[Tag] = small_tags) -> st.SearchStrategy[Versioned]:
    """Versions where equal tags always carry equal values, as in a real
    cluster (a tag names one write)."""
    return tag_strategy.map(lambda t: Versioned(t, None if t.counter % 3 == 0 else f"{t}".encode()))
