"""A node's register state: an immutable mapping replaced in one assignment.

``RegisterState`` is an ``immutables.Map`` (a persistent hash array mapped
trie): an update costs O(log n) and yields a new map that shares structure
with the old one. Readers holding the old map keep a consistent snapshot for
free, which is what lets a node stream its state to a recovering peer while
writes go on.
"""

from __future__ import annotations

from collections.abc import Iterable

import immutables

from register.model import Key, Versioned, newer

RegisterState = immutables.Map[Key, Versioned]


def empty_state() -> RegisterState:
    return immutables.Map()


def apply_updates(
    state: RegisterState, updates: Iterable[tuple[Key, Versioned]]
) -> tuple[RegisterState, list[tuple[Key, Versioned]]]:
    """Merge ``updates`` into ``state``.

    Returns the new state and the updates that changed it, in order, which
    are exactly what must be written to storage. Updates that lose to the
    held version (or to an earlier update of the same batch) are dropped:
    their effect is already covered by a greater tag.
    """
    changed: dict[Key, Versioned] = {}
    with state.mutate() as m:
        for key, incoming in updates:
            if newer(m.get(key), incoming):
                m[key] = incoming
                changed[key] = incoming
        new_state = m.finish()
    return new_state, list(changed.items())


def highest_counter(state: RegisterState) -> int:
    """The largest tag counter held (0 when empty)."""
    return max((v.tag.counter for v in state.values()), default=0)
