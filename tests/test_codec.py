"""The MessagePack codec (net.codec): round trips, request validation, fuzzing."""

from __future__ import annotations

import contextlib
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from net.codec import (
    FatalRequest,
    Limits,
    MalformedMessage,
    decode_peer_frame,
    decode_peer_message,
    decode_reply,
    decode_request,
    encode_peer,
    encode_reply,
    encode_request,
    peer_frame_body,
    peer_frame_overhead,
    split_peer_frame,
)
from net.errors import BadRequest, QkvError, UnknownOp
from net.messages import (
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
from register.model import NodeId, RidNote, Tag, Versioned
from tests.strategies import keys, node_ids, rids, tags, values

LIMITS = Limits()

u64 = st.integers(min_value=0, max_value=2**64 - 1)
texts = st.text(st.characters(codec="utf-8"), max_size=40)
names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=20).map(NodeId)
maybe_values = st.none() | values
maybe_tags = st.none() | tags
#: tags as nodes hold them: counters fit a signed 64-bit integer
peer_tags = st.builds(Tag, st.integers(min_value=0, max_value=2**63 - 1), node_ids)
maybe_peer_tags = st.none() | peer_tags
maybe_rids = st.none() | rids
notes = st.builds(
    RidNote,
    rid=rids,
    request=st.binary(min_size=16, max_size=16),
    tag=peer_tags,
    result=st.none() | st.integers(min_value=-(2**63), max_value=2**63 - 1),
    past=st.none() | peer_tags,
    base=st.none() | peer_tags,
)

# --- strategies for every message type ---------------------------------------

peer_messages: st.SearchStrategy[PeerMessage] = st.one_of(
    st.builds(Query, req=u64, key=keys, rid=maybe_rids),
    st.builds(
        QueryReply,
        req=u64,
        version=st.none() | st.builds(Versioned, peer_tags, maybe_values),
        rid_seen=st.none() | notes,
        promise=maybe_peer_tags,
        lineage=st.lists(notes, max_size=3).map(tuple),
    ),
    st.builds(Prepare, req=u64, key=keys, ballot=peer_tags, rid=maybe_rids),
    st.builds(
        Store,
        req=u64,
        key=keys,
        tag=peer_tags,
        value=maybe_values,
        notes=st.lists(notes, max_size=3).map(tuple),
    ),
    st.builds(StoreAck, req=u64),
    st.builds(Nack, req=u64, above=peer_tags),
    st.builds(Refused, req=u64, reason=texts),
    st.builds(SyncPage, req=u64, session=u64, after=st.none() | keys),
    st.builds(
        SyncChunk,
        req=u64,
        entries=st.lists(st.builds(SyncEntry, key=keys, tag=peer_tags, value=maybe_values), max_size=4),
        next_after=st.none() | keys,
        fresh=st.booleans(),
    ),
)

requests: st.SearchStrategy[Request] = st.one_of(
    st.builds(Ping, id=u64),
    st.builds(Get, id=u64, key=keys),
    st.builds(Set, id=u64, key=keys, value=values, rid=maybe_rids),
    st.builds(Delete, id=u64, key=keys, rid=maybe_rids),
    st.builds(Cas, id=u64, key=keys, expect=maybe_values, value=maybe_values, rid=maybe_rids),
    st.builds(
        Incr, id=u64, key=keys, by=st.integers(min_value=-(2**63), max_value=2**63 - 1), rid=maybe_rids
    ),
    st.builds(PeerHello, id=u64, node=names),
)

replies: st.SearchStrategy[Reply] = st.one_of(
    st.builds(PingReply, id=u64, node=names, state=st.sampled_from(["serving", "recovering"])),
    st.builds(GetReply, id=u64, found=st.booleans(), value=maybe_values, tag=maybe_tags),
    st.builds(WriteReply, id=u64, tag=tags),
    st.builds(
        CasReply, id=u64, swapped=st.booleans(), found=st.booleans(), value=maybe_values, tag=maybe_tags
    ),
    st.builds(IncrReply, id=u64, value=st.integers(min_value=-(2**63), max_value=2**63 - 1), tag=tags),
    st.builds(ErrorReply, id=st.none() | u64, error=texts, message=texts),
)


# --- peer messages -------------------------------------------------------------


@given(peer_messages)
def test_peer_message_round_trip(message: PeerMessage) -> None:
    body = peer_frame_body([encode_peer(message)])
    assert decode_peer_frame(body) == [message]


@given(st.lists(peer_messages, max_size=20))
def test_peer_frame_of_many_messages(messages: list[PeerMessage]) -> None:
    encoded = [encode_peer(m) for m in messages]
    body = peer_frame_body(encoded)
    assert len(body) == peer_frame_overhead(len(messages)) + sum(len(e) for e in encoded)
    assert decode_peer_frame(body) == messages


@pytest.mark.parametrize(
    "raw",
    [
        ["zz", 1],  # unknown message type
        [1],  # no type
        {"t": "sa", "req": 1},  # a map, not an array
        ["q", b"k", None],  # missing req
        ["q", 1, b"k"],  # a field short
        ["q", 1, b"k", None, None],  # a field too many
        ["sa", -1],  # negative req
        ["sa", True],  # bool req
        ["s", 1, b"k", [1], None, None],  # tag is not a pair
        ["s", 1, b"k", [-1, "n1"], None, None],  # negative counter
        ["s", 1, b"k", [True, "n1"], None, None],  # bool counter
        ["s", 1, b"k", [1, b"n1"], None, None],  # bin writer
        ["s", 1, b"k", [2**63, "n1"], None, None],  # counter beyond a signed 64-bit store
        ["qr", 1, [2**64 - 1, "n1"], b"v", None, None],  # the same in a reply
        ["qr", 1, None, b"v", None, None],  # a value without a tag
        ["qr", 1, [1, "n1"], b"v", [1, "n1"], None],  # a rid record without its fingerprint
        ["qr", 1, [1, "n1"], b"v", None, b"f" * 16],  # ... or without its tag
        ["no", 1, b"reason"],  # bin reason
        ["sc", 1, [[b"k", [1, "n1"]]], None, False],  # entry without value
        ["sc", 1, [], None, 0],  # int for bool
    ],
)
def test_peer_frame_rejects_bad_messages(raw: Any) -> None:
    with pytest.raises(MalformedMessage):
        decode_peer_frame(msgpack.packb([raw], use_bin_type=True))


def test_a_split_frame_defers_decoding_but_not_the_req() -> None:
    """A reader looks at each message's req first (and decodes only those
    it waits for); the frame and the reqs are checked at once, the rest
    when a message is decoded."""
    body = msgpack.packb([["sa", 7], ["qr", 8, "not a tag", None, None, None]], use_bin_type=True)
    raw = split_peer_frame(body)
    assert [m[1] for m in raw] == [7, 8]
    assert decode_peer_message(raw[0]) == StoreAck(req=7)
    with pytest.raises(MalformedMessage):
        decode_peer_message(raw[1])
    for bad in (["sa"], ["sa", -1], ["sa", "7"], "sa"):
        with pytest.raises(MalformedMessage):
            split_peer_frame(msgpack.packb([bad], use_bin_type=True))


@pytest.mark.parametrize("body", [msgpack.packb(["sa", 1]), msgpack.packb(5), b"", b"\xc1"])
def test_peer_frame_must_be_an_array(body: bytes) -> None:
    with pytest.raises(MalformedMessage):
        decode_peer_frame(body)


@pytest.mark.parametrize(
    "raw",
    [
        # an integer n where bin is required must not become n zero bytes
        # (with n = 2**34 that is a 16 GiB key from a 9-byte field)
        pytest.param(["q", 1, 5, None], id="query-key-int"),
        pytest.param(["s", 1, b"k", [1, "n1"], 3, None], id="store-value-int"),
        # nor an array of small ints
        pytest.param(["q", 1, [104, 105], None], id="query-key-array"),
        pytest.param(["sp", 1, 1, 2], id="syncpage-after-int"),
        pytest.param(["q", 1, "k", None], id="query-key-str"),
    ],
)
def test_peer_frame_rejects_non_bin_for_bin_fields(raw: Any) -> None:
    """Peer frames are reachable by anyone who sends ``peer_hello``; a bin
    field must be a MessagePack bin, as in client requests."""
    with pytest.raises(MalformedMessage):
        decode_peer_frame(msgpack.packb([raw], use_bin_type=True))


# --- client requests -----------------------------------------------------------


@given(requests)
def test_request_round_trip(request: Request) -> None:
    assert decode_request(encode_request(request), LIMITS) == request


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(pack(5), id="int"),
        pytest.param(pack([1, 2]), id="array"),
        pytest.param(pack("ping"), id="str"),
        pytest.param(pack(None), id="nil"),
        pytest.param(b"", id="empty"),
        pytest.param(b"\xc1", id="not-msgpack"),
        pytest.param(pack({"op": "ping"}) + b"\x00", id="trailing-bytes"),
        pytest.param(pack({"op": "ping"}), id="missing-id"),
        pytest.param(pack({"op": "ping", "id": -1}), id="negative-id"),
        pytest.param(pack({"op": "ping", "id": "1"}), id="str-id"),
        pytest.param(pack({"op": "ping", "id": True}), id="bool-id"),
        pytest.param(pack({"op": "ping", "id": 1.0}), id="float-id"),
        pytest.param(pack({"op": "ping", "id": None}), id="nil-id"),
        pytest.param(pack({1: "x", "id": 1, "op": "ping"}), id="int-map-key"),
    ],
)
def test_fatal_requests(body: bytes) -> None:
    with pytest.raises(FatalRequest) as info:
        decode_request(body, LIMITS)
    assert info.value.request_id is None
    assert info.value.code == "bad_request"


@pytest.mark.parametrize(
    ("raw", "limits"),
    [
        pytest.param({"op": "get", "id": 9, "key": "k"}, LIMITS, id="str-key"),
        pytest.param({"op": "get", "id": 9, "key": b""}, LIMITS, id="empty-key"),
        pytest.param({"op": "get", "id": 9, "key": b"a" * 1025}, LIMITS, id="1025-byte-key"),
        pytest.param({"op": "get", "id": 9}, LIMITS, id="get-without-key"),
        pytest.param({"op": "set", "id": 9, "key": b"k"}, LIMITS, id="set-without-value"),
        pytest.param({"op": "set", "id": 9, "key": b"k", "value": None}, LIMITS, id="set-nil-value"),
        pytest.param({"op": "set", "id": 9, "key": b"k", "value": "v"}, LIMITS, id="set-str-value"),
        pytest.param(
            {"op": "set", "id": 9, "key": b"k", "value": b"v" * (LIMITS.max_value + 1)},
            LIMITS,
            id="value-over-default-limit",
        ),
        pytest.param(
            {"op": "set", "id": 9, "key": b"k", "value": b"12345678901"},
            Limits(max_value=10),
            id="value-over-limit",
        ),
        pytest.param({"op": "set", "id": 9, "key": b"k", "value": b"v", "rid": b"r" * 7}, LIMITS, id="rid-7"),
        pytest.param(
            {"op": "set", "id": 9, "key": b"k", "value": b"v", "rid": b"r" * 65}, LIMITS, id="rid-65"
        ),
        pytest.param({"op": "delete", "id": 9, "key": b"k", "rid": b"r" * 7}, LIMITS, id="delete-rid-7"),
        pytest.param({"op": "delete", "id": 9, "key": b"k", "rid": "r" * 8}, LIMITS, id="delete-str-rid"),
        pytest.param({"op": "peer_hello", "id": 9}, LIMITS, id="hello-without-node"),
        pytest.param({"op": "peer_hello", "id": 9, "node": ""}, LIMITS, id="hello-empty-node"),
        pytest.param({"id": 9}, LIMITS, id="missing-op"),
        pytest.param({"op": 1, "id": 9}, LIMITS, id="int-op"),
    ],
)
def test_bad_requests_carry_the_id(raw: dict[str, Any], limits: Limits) -> None:
    with pytest.raises(BadRequest) as info:
        decode_request(pack(raw), limits)
    assert not isinstance(info.value, FatalRequest), "the id was readable: answer, keep the connection"
    assert info.value.request_id == 9
    assert info.value.code == "bad_request"


def test_value_at_the_limit_is_accepted() -> None:
    raw = {"op": "set", "id": 1, "key": b"k", "value": b"v" * 10}
    assert decode_request(pack(raw), Limits(max_value=10)) == Set(id=1, key=b"k", value=b"v" * 10)


@pytest.mark.parametrize(("size"), [8, 64])
def test_rid_bounds_are_inclusive(size: int) -> None:
    raw = {"op": "delete", "id": 1, "key": b"k", "rid": b"r" * size}
    assert decode_request(pack(raw), LIMITS) == Delete(id=1, key=b"k", rid=b"r" * size)


def test_unknown_op() -> None:
    with pytest.raises(UnknownOp) as info:
        decode_request(pack({"op": "frobnicate", "id": 14}), LIMITS)
    assert info.value.request_id == 14
    assert info.value.code == "unknown_op"


def test_unknown_extra_keys_are_ignored() -> None:
    raw = {"op": "get", "id": 7, "key": b"k", "future": [1, 2, 3], "more": {"a": None}}
    assert decode_request(pack(raw), LIMITS) == Get(id=7, key=b"k")


def test_nil_rid_is_no_rid() -> None:
    raw = {"op": "set", "id": 7, "key": b"k", "value": b"v", "rid": None}
    assert decode_request(pack(raw), LIMITS) == Set(id=7, key=b"k", value=b"v", rid=None)


def test_absent_rid_is_not_encoded() -> None:
    raw = msgpack.unpackb(encode_request(Delete(id=1, key=b"k")), raw=False)
    assert raw == {"op": "delete", "id": 1, "key": b"k"}


# --- client replies --------------------------------------------------------------


@given(replies)
def test_reply_round_trip(reply: Reply) -> None:
    expected: type = type(reply)
    if isinstance(reply, ErrorReply):
        expected = GetReply  # an error answers any request
    assert decode_reply(encode_reply(reply), expected) == reply


def test_reply_ok_flag_and_protocol() -> None:
    raw = msgpack.unpackb(encode_reply(PingReply(id=1, node=NodeId("n1"))), raw=False)
    assert raw["ok"] is True
    assert raw["protocol"] == 1
    raw = msgpack.unpackb(encode_reply(ErrorReply(id=None, error="internal", message="m")), raw=False)
    assert raw == {"id": None, "ok": False, "error": "internal", "message": "m"}


@pytest.mark.parametrize(
    "body",
    [
        pack([1]),
        pack({"id": 1}),  # no ok
        pack({"id": 1, "ok": 1, "tag": [1, "n1"]}),  # ok is not a bool
        pack({"id": 1, "ok": True}),  # WriteReply without a tag
        b"\xc1",
    ],
)
def test_malformed_replies(body: bytes) -> None:
    with pytest.raises(MalformedMessage):
        decode_reply(body, WriteReply)


# --- fuzzing -------------------------------------------------------------------

#: MessagePack values; ints kept small enough that a bin field coerced from an
#: int (see test_peer_frame_rejects_non_bin_for_bin_fields) cannot allocate much
msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**16)
    | st.floats(allow_nan=False)
    | texts
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)
request_fields = st.sampled_from(["id", "op", "key", "value", "rid", "node"])
request_like = st.dictionaries(
    request_fields,
    msgpack_values | st.sampled_from(["get", "set", "delete", "ping", "peer_hello"]) | u64,
    max_size=6,
).map(pack)
#: arrays shaped like peer messages: a known type, then plausible fields
peer_like = st.lists(
    st.tuples(
        st.sampled_from(["q", "qr", "s", "sa", "no", "sp", "sc"]), st.lists(msgpack_values | u64, max_size=6)
    ).map(lambda t: [t[0], *t[1]]),
    max_size=3,
).map(pack)


@given(st.binary(max_size=200) | request_like)
def test_decode_request_fuzz(body: bytes) -> None:
    with contextlib.suppress(QkvError):  # anything else fails the test
        decode_request(body, LIMITS)


@given(st.binary(max_size=200) | peer_like)
def test_decode_peer_frame_fuzz(body: bytes) -> None:
    with contextlib.suppress(MalformedMessage):  # anything else fails the test
        decode_peer_frame(body)
