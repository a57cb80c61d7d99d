"""Message classes: the client protocol v1 and the node-to-node protocol.

These are plain frozen values; how they look on the wire is the business of
``net.codec`` alone.

Client requests carry the client's ``id``; every reply echoes it. Peer
messages carry ``req``, chosen by the sending node to match replies to
requests on one peer link.
"""

from __future__ import annotations

from typing import TypeAlias

import attrs

from register.model import Key, NodeId, RidNote, Tag, Versioned

PROTOCOL_VERSION = 1
#: the node-to-node protocol spoken after ``peer_hello``; 2 since peer
#: messages became positional arrays (version 1 sent maps); 3 since cas
#: and incr (prepare, refusals of stores, promises and rid notes)
PEER_PROTOCOL_VERSION = 3

# --- client requests -------------------------------------------------------


@attrs.frozen(kw_only=True)
class Ping:
    id: int


@attrs.frozen(kw_only=True)
class Get:
    id: int
    key: Key


@attrs.frozen(kw_only=True)
class Set:
    id: int
    key: Key
    value: bytes
    rid: bytes | None = None


@attrs.frozen(kw_only=True)
class Delete:
    id: int
    key: Key
    rid: bytes | None = None


@attrs.frozen(kw_only=True)
class Cas:
    """Compare-and-set: if the key holds ``expect`` (``None``: not found),
    it takes ``value`` (``None``: deleted), in one atomic step."""

    id: int
    key: Key
    expect: bytes | None
    value: bytes | None
    rid: bytes | None = None


@attrs.frozen(kw_only=True)
class Incr:
    """Add ``by`` to the key's canonical decimal integer (absent counts as 0)."""

    id: int
    key: Key
    by: int
    rid: bytes | None = None


@attrs.frozen(kw_only=True)
class PeerHello:
    """First frame of a node-to-node connection (op ``peer_hello``): the
    connection then carries peer frames (see docs/protocol.md)."""

    id: int
    node: NodeId
    protocol: int = PEER_PROTOCOL_VERSION
    #: the dialer's fresh nonce, when it holds a cluster secret
    nonce: bytes | None = None


Request: TypeAlias = Ping | Get | Set | Delete | Cas | Incr | PeerHello
WriteRequest: TypeAlias = Set | Delete
AtomicRequest: TypeAlias = Cas | Incr

# --- client replies --------------------------------------------------------


@attrs.frozen(kw_only=True)
class NodeStats:
    """What ``qkv status`` shows of a node (the ``stats`` extra of a ping
    reply). Rates are per second over the last 10 seconds."""

    keys: int
    max_counter: int
    requests: int
    errors: int
    request_rate: float
    error_rate: float
    uptime: float
    #: peer id -> ``up`` or ``down`` (this node's outbound link)
    peers: dict[str, str]


@attrs.frozen(kw_only=True)
class PingReply:
    id: int
    node: NodeId
    protocol: int = PROTOCOL_VERSION
    #: ``serving`` or ``recovering`` (an extra key; clients may ignore it)
    state: str = "serving"
    #: a qkv extra; left out of the reply when ``None``
    stats: NodeStats | None = None
    #: answering a ``peer_hello`` on a node with a cluster secret: its own
    #: nonce and its proof of the secret (see ``quorum.peer_auth``)
    nonce: bytes | None = None
    proof: bytes | None = None


@attrs.frozen(kw_only=True)
class GetReply:
    id: int
    found: bool
    value: bytes | None
    tag: Tag | None


@attrs.frozen(kw_only=True)
class WriteReply:
    id: int
    tag: Tag


@attrs.frozen(kw_only=True)
class CasReply:
    """``swapped``: the cas took effect; either way ``found``, ``value`` and
    ``tag`` describe what the key holds now (as a get would)."""

    id: int
    swapped: bool
    found: bool
    value: bytes | None
    tag: Tag | None


@attrs.frozen(kw_only=True)
class IncrReply:
    id: int
    #: the key's new value
    value: int
    tag: Tag


@attrs.frozen(kw_only=True)
class ErrorReply:
    id: int | None
    error: str
    message: str


Reply: TypeAlias = PingReply | GetReply | WriteReply | CasReply | IncrReply | ErrorReply

# --- node to node ----------------------------------------------------------


@attrs.frozen(kw_only=True)
class Query:
    """Phase 1 of a read or write: what do you hold for ``key``? ``rid``,
    for a write, also asks whether that request id was already stored."""

    req: int
    key: Key
    rid: bytes | None = None


@attrs.frozen(kw_only=True)
class QueryReply:
    """The answer to a ``Query`` or, once promised, to a ``Prepare``."""

    req: int
    #: the node's version of the key; ``None``: never written there
    version: Versioned | None
    #: what the node has on record for the query's rid; ``None``: unknown rid
    rid_seen: RidNote | None = None
    #: the node's promise for the key, when above the held tag
    promise: Tag | None = None
    #: the rid notes that came with the held version: the write that made
    #: it, and those it built on (newest first)
    lineage: tuple[RidNote, ...] = ()


@attrs.frozen(kw_only=True)
class Prepare:
    """Phase 1 of a cas or incr: promise ``ballot`` for ``key`` and report
    your version (a ``QueryReply``), or refuse (``Nack``)."""

    req: int
    key: Key
    ballot: Tag
    rid: bytes | None = None


@attrs.frozen(kw_only=True)
class Store:
    """Phase 2 of a write, a read's write-back, or a cas's accept: store this
    version unless the acceptor rule refuses it, durably, then acknowledge."""

    req: int
    key: Key
    tag: Tag
    value: bytes | None
    #: rid notes that travel with the version
    notes: tuple[RidNote, ...] = ()


@attrs.frozen(kw_only=True)
class Nack:
    """A store or a prepare refused by the acceptor rule: a higher tag or
    promise is held; the sender's next try goes above ``above``."""

    req: int
    above: Tag


@attrs.frozen(kw_only=True)
class StoreAck:
    req: int


@attrs.frozen(kw_only=True)
class Refused:
    """The peer cannot serve this message: recovering, storage failed, or
    stopping. Counts as a failure of that node for the phase."""

    req: int
    reason: str


@attrs.frozen(kw_only=True)
class SyncPage:
    """State transfer to a recovering node: the next page of entries with
    keys above ``after`` (``None``: from the start) of snapshot ``session``."""

    req: int
    session: int
    after: bytes | None = None


@attrs.frozen(kw_only=True)
class SyncEntry:
    key: Key
    tag: Tag
    value: bytes | None


@attrs.frozen(kw_only=True)
class SyncChunk:
    req: int
    entries: list[SyncEntry]
    #: key to ask after for the next page; ``None`` when this was the last
    next_after: bytes | None
    #: the sender has never served and holds nothing (a brand-new node)
    fresh: bool = False


PeerMessage: TypeAlias = (
    Query | QueryReply | Prepare | Store | StoreAck | Nack | Refused | SyncPage | SyncChunk
)
PeerRequest: TypeAlias = Query | Prepare | Store | SyncPage
PeerResponse: TypeAlias = QueryReply | StoreAck | Nack | Refused | SyncChunk
