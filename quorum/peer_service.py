"""The replica side of node-to-node traffic: answers a peer's requests.

Runs on an accepted connection that opened with ``peer_hello``. Queries are
answered from the current state at once; all the stores of one incoming
frame go to the replica as one submission, so a batch of updates costs one
group commit, and their acknowledgements leave when it is durable. The
reader waits for the outbox to drain below its high-water mark before
reading more, so a peer that sends without reading replies cannot make this
node buffer without bound.

A replica that has not caught up (see ``quorum.catch_up``) refuses queries:
answering from a wiped disk could make a read go back in time. It still
stores updates, durably, which is always safe.
"""

from __future__ import annotations

import bisect
import logging
import time
from functools import partial

import attrs
import trio

from net.codec import MalformedMessage, decode_peer_auth, decode_peer_frame, encode_peer, encode_reply
from net.messages import (
    ErrorReply,
    Nack,
    PeerHello,
    PeerMessage,
    PingReply,
    Prepare,
    Query,
    QueryReply,
    Refused,
    Store,
    StoreAck,
    SyncChunk,
    SyncEntry,
    SyncPage,
)
from net.stream import FramedReader, Outbox
from quorum.faults import FaultSwitches
from quorum.peer_auth import acceptor_proof, dialer_proof, new_nonce, proof_ok
from quorum.protocol import operation
from quorum.protocol.acceptor import Verdict
from quorum.replica import Replica, Update
from register.model import Key, NodeId, Versioned
from register.state import RegisterState
from register.store import StorageError

__all__ = ["PeerService", "SyncSessions"]

log = logging.getLogger("qkv.peers")

SESSION_IDLE = 60.0
#: seconds a dialer has to send its proof after the hello reply
AUTH_TIMEOUT = 5.0
MAX_SESSIONS = 16


@attrs.define
class _Snapshot:
    keys: list[Key]
    state: RegisterState
    used: float


class SyncSessions:
    """Snapshots being streamed to recovering peers, one per session.

    A snapshot is the state map at the first page: free to take (the map is
    persistent) and unaffected by later writes. Keys are sorted once so that
    pages can resume after any key. Idle sessions expire.
    """

    def __init__(self, page_bytes: int) -> None:
        self._page_bytes = page_bytes
        self._sessions: dict[tuple[NodeId, int], _Snapshot] = {}

    def page(
        self, peer: NodeId, request: SyncPage, state: RegisterState
    ) -> tuple[list[SyncEntry], Key | None]:
        now = time.monotonic()
        for sid, snap in list(self._sessions.items()):
            if now - snap.used > SESSION_IDLE:
                del self._sessions[sid]
        sid = (peer, request.session)
        found = self._sessions.get(sid)
        if found is None or request.after is None:
            while len(self._sessions) >= MAX_SESSIONS:
                del self._sessions[min(self._sessions, key=lambda s: self._sessions[s].used)]
            found = self._sessions[sid] = _Snapshot(sorted(state.keys()), state, now)
        snap = found
        snap.used = now
        start = 0 if request.after is None else _bisect_after(snap.keys, request.after)
        entries: list[SyncEntry] = []
        size = 0
        i = start
        while i < len(snap.keys) and (not entries or size < self._page_bytes):
            key = snap.keys[i]
            version = snap.state[key]
            size += len(key) + len(version.value or b"") + 32
            if entries and size > self._page_bytes:
                break
            entries.append(SyncEntry(key=key, tag=version.tag, value=version.value))
            i += 1
        if i >= len(snap.keys):
            del self._sessions[sid]
            return entries, None
        return entries, entries[-1].key


def _bisect_after(keys: list[Key], after: bytes) -> int:
    return bisect.bisect_right(keys, after)


class PeerService:
    def __init__(
        self,
        replica: Replica,
        switches: FaultSwitches,
        sessions: SyncSessions,
        secret: bytes | None = None,
        auth_timeout: float = AUTH_TIMEOUT,
    ) -> None:
        self.replica = replica
        self.switches = switches
        self.sessions = sessions
        self.secret = secret
        self.auth_timeout = auth_timeout
        self.auth_failures = 0

    def hello_reply(self, hello: PeerHello, state: str) -> PingReply:
        return PingReply(id=hello.id, node=self.replica.node_id, state=state)

    def _refuse(self, hello: PeerHello, outbox: Outbox, message: str) -> None:
        self.auth_failures += 1
        log.warning(
            "refused a peer connection claiming to be %s: %s",
            hello.node,
            message,
            extra={"event": "peer_auth_failed", "peer": hello.node, "error": message},
        )
        outbox.put(encode_reply(ErrorReply(id=hello.id, error="bad_request", message=message)), alone=True)
        outbox.close_after_flush()

    async def serve(self, hello: PeerHello, reader: FramedReader, outbox: Outbox, state: str) -> None:
        reply = self.hello_reply(hello, state)
        secret = self.secret
        if secret is not None:
            if hello.nonce is None:
                self._refuse(hello, outbox, "peer authentication required: this cluster has a secret")
                await outbox.run()
                return
            nonce = new_nonce()
            proof = acceptor_proof(secret, hello.nonce, nonce, hello.node, self.replica.node_id)
            reply = attrs.evolve(reply, nonce=nonce, proof=proof)
        outbox.put(encode_reply(reply), alone=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outbox.run)
            if secret is not None:
                assert reply.nonce is not None and hello.nonce is not None
                bodies: list[bytes] = []
                with trio.move_on_after(self.auth_timeout):
                    bodies = await reader.receive()
                try:
                    received = decode_peer_auth(bodies[0]) if bodies else None
                except MalformedMessage:
                    received = None
                expected = dialer_proof(secret, hello.nonce, reply.nonce, hello.node, self.replica.node_id)
                if not proof_ok(expected, received):
                    self._refuse(hello, outbox, "peer authentication failed")
                    return  # the nursery waits for the refusal to be written
                reader.unread(bodies[1:])
            while True:
                await outbox.wait_room()
                bodies = await reader.receive()
                if not bodies:
                    break
                for body in bodies:
                    self._handle_frame(hello.node, decode_peer_frame(body), outbox)
            nursery.cancel_scope.cancel()

    def _handle_frame(self, peer: NodeId, messages: list[PeerMessage], outbox: Outbox) -> None:
        replica = self.replica
        serving = replica.ready or self.switches.serve_before_catch_up
        stores: list[Store] = []
        for message in messages:
            match message:
                case Query(req=req, key=key, rid=rid):
                    if serving:
                        reply: QueryReply | Refused = _query_reply(req, replica.query(key, rid))
                    else:
                        reply = Refused(req=req, reason="recovering")
                    outbox.put(encode_peer(reply))
                case Prepare(req=req, key=key, ballot=ballot, rid=rid):
                    if serving:
                        replica.prepare(key, ballot, rid, partial(_answer_prepare, outbox, req))
                    else:
                        outbox.put(encode_peer(Refused(req=req, reason="recovering")))
                case Store():
                    if not self.switches.drop_stores:
                        stores.append(message)
                case SyncPage(req=req):
                    entries, next_after = self.sessions.page(peer, message, replica.state)
                    chunk = SyncChunk(req=req, entries=entries, next_after=next_after, fresh=replica.fresh)
                    outbox.put(encode_peer(chunk))
                case _:
                    # Replies have no business on this side of a link.
                    pass
        if stores:
            updates = [Update(s.key, Versioned(s.tag, s.value), s.notes) for s in stores]
            # Filled once ``offer`` has judged them; ``done`` runs later
            # (never, when every store was refused).
            taken: list[Store] = []

            def done(error: StorageError | None) -> None:
                for s in taken:
                    if error is None:
                        outbox.put(encode_peer(StoreAck(req=s.req)))
                    else:
                        outbox.put(encode_peer(Refused(req=s.req, reason=f"storage: {error}")))

            judged = replica.offer(updates, done)
            for store, verdict in zip(stores, judged, strict=True):
                if verdict.verdict is Verdict.REFUSE:
                    assert verdict.above is not None
                    outbox.put(encode_peer(Nack(req=store.req, above=verdict.above)))
                else:
                    taken.append(store)


def _query_reply(req: int, result: operation.QueryResult) -> QueryReply:
    return QueryReply(
        req=req,
        version=result.version,
        rid_seen=result.rid_seen,
        promise=result.promise,
        lineage=result.lineage,
    )


def _answer_prepare(
    outbox: Outbox, req: int, result: operation.QueryResult | operation.Nack | StorageError
) -> None:
    if isinstance(result, operation.Nack):
        outbox.put(encode_peer(Nack(req=req, above=result.above)))
    elif isinstance(result, StorageError):
        outbox.put(encode_peer(Refused(req=req, reason=f"storage: {result}")))
    else:
        outbox.put(encode_peer(_query_reply(req, result)))
