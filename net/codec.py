"""The one converter: message classes to MessagePack bodies and back.

No other module touches msgpack. Every decoding failure becomes one
exception type per direction:

- client requests (untrusted): ``BadRequest`` / ``UnknownOp`` carrying the
  request id when it could be read; ``fatal`` errors (no usable id) close the
  connection, as the wire protocol demands;
- peer frames and client replies: ``MalformedMessage``.

Client requests are validated field by field by hand rather than through
cattrs, because the protocol is strict about types in ways Python is not
(``bool`` is an ``int``, ``str`` is not ``bin``) and each rejection should
say exactly what was wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final, TypeVar, cast

import attrs
import cattrs
import msgpack
from cattrs.preconf.msgpack import make_converter

from net.errors import BadRequest, UnknownOp
from net.messages import (
    PEER_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    Cas,
    CasReply,
    Delete,
    ErrorReply,
    Get,
    GetReply,
    Incr,
    IncrReply,
    Nack,
    PeerHello,
    PeerMessage,
    Ping,
    PingReply,
    Prepare,
    Query,
    QueryReply,
    Refused,
    Reply,
    Request,
    Set,
    Store,
    StoreAck,
    SyncChunk,
    SyncEntry,
    SyncPage,
    WriteReply,
)
from register.model import Key, NodeId, RidNote, Tag, Versioned

__all__ = [
    "Limits",
    "MalformedMessage",
    "decode_peer_frame",
    "decode_peer_message",
    "decode_reply",
    "decode_request",
    "encode_peer",
    "encode_reply",
    "encode_request",
    "structure_reply",
    "unpack_reply",
    "peer_frame_body",
    "peer_frame_header",
    "peer_frame_overhead",
    "split_peer_frame",
]

MAX_ID: Final = 2**64 - 1
#: tag counters are stored as SQLite (signed 64-bit) integers
MAX_COUNTER: Final = 2**63 - 1
MIN_RID, MAX_RID = 8, 64
MAX_KEY: Final = 1024
MIN_INT64, MAX_INT64 = -(2**63), 2**63 - 1

T = TypeVar("T")


class MalformedMessage(Exception):
    """A peer frame or a reply that does not decode to a known message."""


@attrs.frozen(kw_only=True)
class Limits:
    """Size limits that requests are validated against."""

    max_value: int = 1024 * 1024


# --- the converter ---------------------------------------------------------


def _structure_tag(raw: Any, _: type) -> Tag:
    if (
        isinstance(raw, list | tuple)
        and len(raw) == 2
        and type(raw[0]) is int
        and raw[0] >= 0
        and type(raw[1]) is str
    ):
        return Tag(raw[0], NodeId(raw[1]))
    raise ValueError(f"a tag is [counter, writer], not {raw!r}")


def _exactly(kind: type[T]) -> Callable[[Any, type], T]:
    """A structure hook that takes a value only if it already has the type:
    cattrs would otherwise convert (``bytes(5)`` is five zero bytes, and
    ``bytes(2**34)`` is 16 GiB)."""

    def structure(raw: Any, _: type) -> T:
        if type(raw) is not kind:
            raise ValueError(f"expected {kind.__name__}, not {type(raw).__name__}")
        return raw

    return structure


def _make_converter() -> cattrs.Converter:
    conv = make_converter(forbid_extra_keys=False)
    for kind in (bytes, int, str, bool):
        conv.register_structure_hook(kind, _exactly(kind))
    conv.register_unstructure_hook(Tag, lambda t: [t.counter, t.writer])
    conv.register_structure_hook(Tag, _structure_tag)
    return conv


_converter: Final = _make_converter()
_packer: Final = msgpack.Packer(use_bin_type=True, autoreset=True)


def _packb(value: Any) -> bytes:
    return cast(bytes, _packer.pack(value))


def _unpack(body: bytes) -> Any:
    return msgpack.unpackb(body, raw=False, use_list=True, strict_map_key=True)


# --- client requests ---------------------------------------------------------


def _field(
    body: dict[str, Any], name: str, check: Callable[[Any], bool], what: str, rid: int, optional: bool = False
) -> Any:
    if name not in body or (optional and body[name] is None):
        if optional:
            return None
        raise BadRequest(f"missing field {name!r}", request_id=rid)
    value = body[name]
    if not check(value):
        raise BadRequest(f"field {name!r} must be {what}", request_id=rid)
    return value


def _is_key(v: Any) -> bool:
    return type(v) is bytes and 1 <= len(v) <= MAX_KEY


def _is_rid(v: Any) -> bool:
    return type(v) is bytes and MIN_RID <= len(v) <= MAX_RID


def _required_or_nil(
    body: dict[str, Any], name: str, check: Callable[[Any], bool], what: str, rid: int
) -> Any:
    """A field that must be present, and may be nil (cas's expect and value)."""
    if name not in body:
        raise BadRequest(f"missing field {name!r} (nil stands for not found)", request_id=rid)
    value = body[name]
    if value is not None and not check(value):
        raise BadRequest(f"field {name!r} must be {what} or nil", request_id=rid)
    return value


class FatalRequest(BadRequest):
    """A body so broken that it has no usable id: answer and close."""


def decode_request(body: bytes, limits: Limits) -> Request:
    """Decode and validate one client request body."""
    try:
        raw = _unpack(body)
    except Exception as exc:  # msgpack raises many unrelated types
        raise FatalRequest(f"body is not MessagePack: {exc}") from None
    if not isinstance(raw, dict):
        raise FatalRequest(f"body must be a map, not {type(raw).__name__}")
    rid = raw.get("id")
    if type(rid) is not int or not 0 <= rid <= MAX_ID:
        raise FatalRequest("field 'id' must be an unsigned integer")
    op = raw.get("op")
    if type(op) is not str:
        raise BadRequest("field 'op' must be a string", request_id=rid)
    match op:
        case "get":
            return Get(id=rid, key=Key(_field(raw, "key", _is_key, "bin of 1 to 1024 bytes", rid)))
        case "set":
            key = _field(raw, "key", _is_key, "bin of 1 to 1024 bytes", rid)
            value = _field(
                raw,
                "value",
                lambda v: type(v) is bytes and len(v) <= limits.max_value,
                f"bin of at most {limits.max_value} bytes",
                rid,
            )
            rid_ = _field(raw, "rid", _is_rid, "bin of 8 to 64 bytes", rid, optional=True)
            return Set(id=rid, key=Key(key), value=value, rid=rid_)
        case "delete":
            key = _field(raw, "key", _is_key, "bin of 1 to 1024 bytes", rid)
            rid_ = _field(raw, "rid", _is_rid, "bin of 8 to 64 bytes", rid, optional=True)
            return Delete(id=rid, key=Key(key), rid=rid_)
        case "cas":
            key = _field(raw, "key", _is_key, "bin of 1 to 1024 bytes", rid)
            in_range = lambda v: type(v) is bytes and len(v) <= limits.max_value  # noqa: E731
            what = f"bin of at most {limits.max_value} bytes"
            expect = _required_or_nil(raw, "expect", in_range, what, rid)
            value = _required_or_nil(raw, "value", in_range, what, rid)
            rid_ = _field(raw, "rid", _is_rid, "bin of 8 to 64 bytes", rid, optional=True)
            return Cas(id=rid, key=Key(key), expect=expect, value=value, rid=rid_)
        case "incr":
            key = _field(raw, "key", _is_key, "bin of 1 to 1024 bytes", rid)
            by = _field(
                raw,
                "by",
                lambda v: type(v) is int and MIN_INT64 <= v <= MAX_INT64,
                "a signed 64-bit integer",
                rid,
            )
            rid_ = _field(raw, "rid", _is_rid, "bin of 8 to 64 bytes", rid, optional=True)
            return Incr(id=rid, key=Key(key), by=by, rid=rid_)
        case "ping":
            return Ping(id=rid)
        case "peer_hello":
            node = _field(raw, "node", lambda v: type(v) is str and v != "", "a node id", rid)
            nonce = _field(
                raw,
                "nonce",
                lambda v: type(v) is bytes and 8 <= len(v) <= 64,
                "bin of 8 to 64 bytes",
                rid,
                optional=True,
            )
            # Absent or 1: a node from before peer messages were arrays.
            protocol = raw.get("protocol", 1)
            if protocol != PEER_PROTOCOL_VERSION:
                raise BadRequest(
                    f"peer protocol {protocol!r} is not spoken here (this node speaks"
                    f" {PEER_PROTOCOL_VERSION}): run the same qkv version on every node",
                    request_id=rid,
                )
            return PeerHello(id=rid, node=NodeId(node), nonce=nonce)
        case _:
            raise UnknownOp(f"unknown op {op!r}", request_id=rid)


_REQUEST_OPS: Final[dict[type, str]] = {
    Ping: "ping",
    Get: "get",
    Set: "set",
    Delete: "delete",
    Cas: "cas",
    Incr: "incr",
    PeerHello: "peer_hello",
}


def encode_request(request: Request) -> bytes:
    raw: dict[str, Any] = _converter.unstructure(request)
    raw["op"] = _REQUEST_OPS[type(request)]
    for optional in ("rid", "nonce"):
        if raw.get(optional, 0) is None:
            del raw[optional]
    return _packb(raw)


# --- client replies --------------------------------------------------------


def _encode_ping_reply(reply: PingReply) -> dict[str, Any]:
    raw: dict[str, Any] = _converter.unstructure(reply)
    raw["ok"] = True
    raw["protocol"] = PROTOCOL_VERSION
    for extra in ("stats", "nonce", "proof"):
        if raw.get(extra) is None:
            raw.pop(extra, None)
    return raw


# The replies to gets and writes are built by hand: one is encoded for every
# client request, and cattrs' generic unstructuring cost as much as the rest
# of the reply's path. A Tag is a named tuple, packed as [counter, writer].
_REPLY_ENCODERS: Final[dict[type, Callable[[Any], dict[str, Any]]]] = {
    GetReply: lambda r: {"id": r.id, "ok": True, "found": r.found, "value": r.value, "tag": r.tag},
    WriteReply: lambda r: {"id": r.id, "ok": True, "tag": r.tag},
    CasReply: lambda r: {
        "id": r.id,
        "ok": True,
        "swapped": r.swapped,
        "found": r.found,
        "value": r.value,
        "tag": r.tag,
    },
    IncrReply: lambda r: {"id": r.id, "ok": True, "value": r.value, "tag": r.tag},
    ErrorReply: lambda r: {"id": r.id, "ok": False, "error": r.error, "message": r.message},
    PingReply: _encode_ping_reply,
}


def encode_reply(reply: Reply) -> bytes:
    return _packb(_REPLY_ENCODERS[type(reply)](reply))


def unpack_reply(body: bytes) -> dict[str, Any]:
    """A reply body as a map with a boolean ``ok``, so that a client can
    route it by ``id`` before decoding it (with ``structure_reply``)."""
    try:
        raw = _unpack(body)
    except Exception as exc:  # msgpack raises many unrelated types
        raise MalformedMessage(f"malformed reply: {exc}") from None
    if not isinstance(raw, dict) or type(raw.get("ok")) is not bool:
        raise MalformedMessage("malformed reply: not a map with a boolean 'ok'")
    return raw


def structure_reply(raw: dict[str, Any], expected: type[T]) -> T | ErrorReply:
    """A reply map as the reply class of its request (or ``ErrorReply``)."""
    try:
        return _converter.structure(raw, expected if raw["ok"] else ErrorReply)  # type: ignore[return-value]
    except Exception as exc:
        raise MalformedMessage(f"malformed reply: {exc}") from None


def decode_reply(body: bytes, expected: type[T]) -> T | ErrorReply:
    """Decode a reply to a request whose reply type is ``expected``."""
    return structure_reply(unpack_reply(body), expected)


# --- node to node ----------------------------------------------------------


def encode_peer_auth(proof: bytes) -> bytes:
    """The dialer's second frame on a cluster with a secret."""
    return _packb({"op": "peer_auth", "id": 0, "proof": proof})


def decode_peer_auth(body: bytes) -> bytes:
    """The proof of a ``peer_auth`` body; ``MalformedMessage`` otherwise."""
    try:
        raw = _unpack(body)
    except Exception as exc:  # msgpack raises many unrelated types
        raise MalformedMessage(f"malformed peer_auth: {exc}") from None
    if not isinstance(raw, dict) or raw.get("op") != "peer_auth" or type(raw.get("proof")) is not bytes:
        raise MalformedMessage("expected a peer_auth map with a bin 'proof'")
    proof: bytes = raw["proof"]
    return proof


def encode_peer(message: PeerMessage) -> bytes:
    """One peer message, packed on its own so that a batch can be assembled
    from already-encoded messages without re-encoding them."""
    return _packb(_PEER_ENCODERS[type(message)](message))


def peer_frame_overhead(count: int) -> int:
    """Bytes added by ``peer_frame_body`` around ``count`` messages."""
    return len(peer_frame_header(count))


def peer_frame_header(count: int) -> bytes:
    """What precedes ``count`` packed messages in a peer frame body."""
    return cast(bytes, _packer.pack_array_header(count))


def peer_frame_body(encoded: Sequence[bytes]) -> bytes:
    """A peer frame body: a MessagePack array of already-packed messages."""
    return peer_frame_header(len(encoded)) + b"".join(encoded)


def decode_peer_frame(body: bytes) -> list[PeerMessage]:
    return [decode_peer_message(m) for m in split_peer_frame(body)]


def split_peer_frame(body: bytes) -> list[list[Any]]:
    """A peer frame's messages, each still a raw array whose ``[1]`` is its
    ``req`` (checked): a reader can drop the replies nobody waits for any
    more (a phase's stragglers) before paying to decode them."""
    try:
        raw = _unpack(body)
    except Exception as exc:  # msgpack raises many unrelated types
        raise MalformedMessage(f"malformed peer frame: {exc!r}") from None
    if type(raw) is not list:
        raise MalformedMessage("malformed peer frame: not an array of messages")
    for m in raw:
        if type(m) is not list or len(m) < 2 or type(m[1]) is not int or m[1] < 0:
            raise MalformedMessage(f"malformed peer frame: {m!r} is not [type, req, ...]")
    return raw


def decode_peer_message(raw: list[Any]) -> PeerMessage:
    """One message of ``split_peer_frame``."""
    try:
        return _PEER_DECODERS[raw[0]](raw)
    except Exception as exc:  # whatever the bytes were, only this comes out
        raise MalformedMessage(f"malformed peer message: {exc!r}") from None


# Peer messages are positional arrays, ``[type, req, fields...]``, packed and
# checked by hand: every request sends and receives several of them, and
# cattrs' union dispatch cost more than the rest of a message's handling.
# Types are checked exactly, as for client requests: ``bool`` is not an
# ``int`` here, and an ``int`` where ``bin`` belongs is an error (not
# ``bytes(n)``, which cattrs would have made of it). The checks are inline
# rather than one helper per field: a query reply went through seven helper
# calls, on every reply of every read.


def _note(n: RidNote | None) -> list[Any] | None:
    return None if n is None else [n.rid, n.request, n.tag, n.result, n.past, n.base]


def _encode_query_reply(m: QueryReply) -> list[Any]:
    version, seen, lineage = m.version, m.rid_seen, m.lineage
    return [
        "qr",
        m.req,
        None if version is None else version.tag,
        None if version is None else version.value,
        None if seen is None else [seen.rid, seen.request, seen.tag, seen.result, seen.past, seen.base],
        m.promise,
        [[n.rid, n.request, n.tag, n.result, n.past, n.base] for n in lineage] if lineage else None,
    ]


_PEER_ENCODERS: Final[dict[type, Callable[[Any], list[Any]]]] = {
    # A Tag is a named tuple: msgpack packs it as [counter, writer] as is.
    Query: lambda m: ["q", m.req, m.key, m.rid],
    QueryReply: _encode_query_reply,
    Prepare: lambda m: ["p", m.req, m.key, m.ballot, m.rid],
    Store: lambda m: ["s", m.req, m.key, m.tag, m.value, [_note(n) for n in m.notes]],
    StoreAck: lambda m: ["sa", m.req],
    Nack: lambda m: ["nk", m.req, m.above],
    Refused: lambda m: ["no", m.req, m.reason],
    SyncPage: lambda m: ["sp", m.req, m.session, m.after],
    SyncChunk: lambda m: ["sc", m.req, [[e.key, e.tag, e.value] for e in m.entries], m.next_after, m.fresh],
}


def _fields(m: Any, count: int) -> list[Any]:
    """The message ``m`` as a list of ``count`` items with a valid ``req``."""
    if type(m) is not list or len(m) != count:
        raise ValueError(f"a {m[0]!r} message has {count - 1} fields")
    req = m[1]
    if type(req) is not int or req < 0:
        raise ValueError("req must be an unsigned integer")
    return m


def _bad_bin(v: Any) -> ValueError:
    return ValueError(f"expected bin, not {type(v).__name__}")


def _tag(v: Any) -> Tag:
    # A client may see any uint counter; a node stores counters as signed
    # 64-bit integers, so a larger one from a peer is malformed, not a
    # storage failure that would stop the replica.
    if (
        type(v) is list
        and len(v) == 2
        and type(v[0]) is int
        and 0 <= v[0] <= MAX_COUNTER
        and type(v[1]) is str
    ):
        return Tag(v[0], NodeId(v[1]))
    raise ValueError(f"a peer's tag is [counter, writer] with a counter below 2**63, not {v!r}")


def _decode_query(m: Any) -> Query:
    _, req, key, rid = _fields(m, 4)
    if type(key) is not bytes:
        raise _bad_bin(key)
    if rid is not None and type(rid) is not bytes:
        raise _bad_bin(rid)
    return Query(req=req, key=Key(key), rid=rid)


def _decode_note(n: Any) -> RidNote:
    if type(n) is not list or len(n) != 6:
        raise ValueError("a rid note is [rid, request, tag, result, past, base]")
    rid, request, tag, result, past, base = n
    if type(rid) is not bytes or type(request) is not bytes:
        raise ValueError("a rid note's rid and request are bin")
    if result is not None and (type(result) is not int or not MIN_INT64 <= result <= MAX_INT64):
        raise ValueError("a rid note's result is a signed 64-bit integer or nil")
    return RidNote(
        rid=rid,
        request=request,
        tag=_tag(tag),
        result=result,
        past=None if past is None else _tag(past),
        base=None if base is None else _tag(base),
    )


def _decode_query_reply(m: Any) -> QueryReply:
    _, req, tag, value, seen, promise, lineage = _fields(m, 7)
    if value is not None and type(value) is not bytes:
        raise _bad_bin(value)
    if tag is None:
        if value is not None:
            raise ValueError("a value without a tag")
        version = None
    else:
        version = Versioned(_tag(tag), value)
    if lineage is not None and type(lineage) is not list:
        raise ValueError("a lineage is an array of rid notes")
    if seen is None and promise is None and lineage is None:
        return QueryReply(req=req, version=version)
    return QueryReply(
        req=req,
        version=version,
        rid_seen=None if seen is None else _decode_note(seen),
        promise=None if promise is None else _tag(promise),
        lineage=() if lineage is None else tuple(map(_decode_note, lineage)),
    )


def _decode_prepare(m: Any) -> Prepare:
    _, req, key, ballot, rid = _fields(m, 5)
    if type(key) is not bytes:
        raise _bad_bin(key)
    if rid is not None and type(rid) is not bytes:
        raise _bad_bin(rid)
    return Prepare(req=req, key=Key(key), ballot=_tag(ballot), rid=rid)


def _decode_nack(m: Any) -> Nack:
    _, req, above = _fields(m, 3)
    return Nack(req=req, above=_tag(above))


def _decode_store(m: Any) -> Store:
    _, req, key, tag, value, notes = _fields(m, 6)
    if type(key) is not bytes:
        raise _bad_bin(key)
    if value is not None and type(value) is not bytes:
        raise _bad_bin(value)
    if type(notes) is not list:
        raise ValueError("notes must be an array")
    return Store(req=req, key=Key(key), tag=_tag(tag), value=value, notes=tuple(map(_decode_note, notes)))


def _decode_store_ack(m: Any) -> StoreAck:
    return StoreAck(req=_fields(m, 2)[1])


def _decode_refused(m: Any) -> Refused:
    _, req, reason = _fields(m, 3)
    if type(reason) is not str:
        raise ValueError("reason must be a string")
    return Refused(req=req, reason=reason)


def _opt_bin(v: Any) -> bytes | None:
    if v is not None and type(v) is not bytes:
        raise _bad_bin(v)
    return v


def _decode_sync_page(m: Any) -> SyncPage:
    _, req, session, after = _fields(m, 4)
    if type(session) is not int:
        raise ValueError("session must be an integer")
    return SyncPage(req=req, session=session, after=_opt_bin(after))


def _decode_sync_entry(e: Any) -> SyncEntry:
    if type(e) is not list or len(e) != 3 or type(e[0]) is not bytes:
        raise ValueError("a sync entry is [key, tag, value]")
    return SyncEntry(key=Key(e[0]), tag=_tag(e[1]), value=_opt_bin(e[2]))


def _decode_sync_chunk(m: Any) -> SyncChunk:
    _, req, entries, next_after, fresh = _fields(m, 5)
    if type(entries) is not list or type(fresh) is not bool:
        raise ValueError("entries must be an array and fresh a boolean")
    return SyncChunk(
        req=req,
        entries=[_decode_sync_entry(e) for e in entries],
        next_after=_opt_bin(next_after),
        fresh=fresh,
    )


_PEER_DECODERS: Final[dict[str, Callable[[Any], PeerMessage]]] = {
    "q": _decode_query,
    "qr": _decode_query_reply,
    "p": _decode_prepare,
    "s": _decode_store,
    "sa": _decode_store_ack,
    "nk": _decode_nack,
    "no": _decode_refused,
    "sp": _decode_sync_page,
    "sc": _decode_sync_chunk,
}
