"""Catch-up: a node that is not ready copies the state of its peers first.

A node is *not ready* when its data dir has never completed a catch-up: a
brand-new node, or one whose disk was lost. Until it is ready it refuses
quorum queries and client requests; it does store the updates it receives.

Why: a write acknowledged by a majority W may have reached, besides this
node, only ``|W| - 1`` others. If this node lost its copy and answered
queries, a read majority made of it and nodes outside W could miss the write
and go back in time. So the node first copies the full state of enough
peers that every possible ``W`` minus itself is hit: ``n - majority(n) + 1``
peers (for 3 nodes: both others). The copy is a stream of bounded pages from
a snapshot on each peer while writes go on; merging is commutative, so pages
and live updates may arrive in any order.

A brand-new cluster, every data dir empty, would wait forever for a peer
with data; so if a majority of the cluster (this node included) reports
being *fresh* (never ready, holding nothing), no write can ever have been
acknowledged, and those nodes become ready at once.
"""

from __future__ import annotations

import itertools
import logging
import secrets

import trio

from net.codec import encode_peer
from net.messages import PeerResponse, SyncChunk, SyncPage
from quorum.peers import PeerLink
from quorum.protocol.decide import majority
from quorum.replica import Replica, Update
from register.model import NodeId, Versioned
from register.state import highest_counter
from register.store import StorageError

__all__ = ["catch_up", "peers_needed"]

log = logging.getLogger("qkv.catch_up")

PAGE_TIMEOUT = 5.0
RETRY_DELAY = 0.2
LOST_COUNTER_MARGIN = 2**32
_reqs = itertools.count(2**62)  # apart from the coordinator's request ids


def peers_needed(cluster_size: int) -> int:
    """How many peers' full state a recovering node must copy."""
    return cluster_size - majority(cluster_size) + 1


async def catch_up(replica: Replica, links: dict[NodeId, PeerLink]) -> None:
    """Return once ``replica`` is ready (it may already be)."""
    if replica.ready:
        return
    size = len(links) + 1
    needed = peers_needed(size)
    log.warning(
        "node %s is recovering: its data dir has not caught up yet (new or lost); "
        "copying the state of %d of its peers before answering queries",
        replica.node_id,
        needed,
        extra={"event": "recovery_start", "node": replica.node_id, "peers_needed": needed},
    )
    copied: set[NodeId] = set()
    fresh: set[NodeId] = set()
    enough = trio.Event()

    def check() -> None:
        fresh_majority = replica.fresh and len(fresh) + 1 >= majority(size)
        if len(copied) >= needed or fresh_majority:
            enough.set()

    check()

    async def copy_from(peer: NodeId, link: PeerLink) -> None:
        while True:
            try:
                was_fresh = await _copy(replica, link)
            except _PageFailed as exc:
                log.info(
                    "catch-up from %s interrupted (%s); retrying",
                    peer,
                    exc,
                    extra={"event": "recovery_retry", "peer": peer, "error": str(exc)},
                )
                await trio.sleep(RETRY_DELAY)
                continue
            copied.add(peer)
            if was_fresh:
                fresh.add(peer)
            check()
            return

    async with trio.open_nursery() as nursery:
        for peer, link in links.items():
            nursery.start_soon(copy_from, peer, link)
        await enough.wait()
        nursery.cancel_scope.cancel()
    if len(copied) >= needed:
        # This data dir may have lost the reservation of counters it issued
        # (a lost disk). A write it coordinated just before, stored only on
        # nodes we did not copy from, may carry a counter above everything
        # copied; jumping far above makes reissuing that tag impossible in
        # practice (it would take 2**32 lost unacknowledged writes).
        replica.raise_floor(highest_counter(replica.state) + LOST_COUNTER_MARGIN)
        # It may have lost its promises with the disk, too: a ballot it
        # promised carries a counter that some coordinator issued above the
        # tags it saw; the same margin covers it, and refusing every store
        # and ballot below it keeps what it promised.
        replica.raise_promise_floor(highest_counter(replica.state) + LOST_COUNTER_MARGIN)
    await replica.mark_ready()
    log.warning(
        "node %s caught up from %s and is serving",
        replica.node_id,
        ", ".join(sorted(copied)) or "a fresh cluster",
        extra={"event": "recovery_done", "node": replica.node_id, "copied_from": ",".join(sorted(copied))},
    )


class _PageFailed(Exception):
    pass


async def _copy(replica: Replica, link: PeerLink) -> bool:
    """Copy one peer's whole state; return whether it reported being fresh."""
    await link.up.wait()
    session = secrets.randbits(62)
    after: bytes | None = None
    fresh = True
    while True:
        chunk = await _page(link, SyncPage(req=next(_reqs), session=session, after=after))
        fresh = fresh and chunk.fresh
        if chunk.entries:
            replica.raise_floor(max(e.tag.counter for e in chunk.entries))
            try:
                await replica.persist(Update(e.key, Versioned(e.tag, e.value)) for e in chunk.entries)
            except StorageError as exc:
                raise _PageFailed(f"storage: {exc}") from exc
        if chunk.next_after is None:
            return fresh
        after = chunk.next_after


class _PageWaiter:
    def __init__(self) -> None:
        self.reply: PeerResponse | None = None
        self.arrived = trio.Event()

    def peer_reply(self, node: NodeId, req: int, reply: PeerResponse | None) -> None:
        self.reply = reply
        self.arrived.set()


async def _page(link: PeerLink, request: SyncPage) -> SyncChunk:
    waiter = _PageWaiter()
    link.send(request.req, encode_peer(request), waiter)
    with trio.move_on_after(PAGE_TIMEOUT):
        await waiter.arrived.wait()
    link.forget(request.req)
    reply = waiter.reply
    if not isinstance(reply, SyncChunk):
        raise _PageFailed("no answer" if reply is None else f"unexpected {type(reply).__name__}")
    return reply
