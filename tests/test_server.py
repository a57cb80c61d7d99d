"""The client protocol against a running node: wire vectors, bad input
and abuse. Bad input on one connection never harms another."""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

from net.address import Address
from net.messages import PEER_PROTOCOL_VERSION
from quorum.cluster import LocalCluster, open_cluster
from tests.rawwire import RawConnection

VECTORS = json.loads((Path(__file__).parent / "data" / "wire-vectors.json").read_text())


@pytest.fixture
async def cluster() -> AsyncIterator[LocalCluster]:
    async with open_cluster(3, request_timeout=1.0, max_connections=20, max_inflight=8) as c:
        with trio.fail_after(10):
            while any(c.node(i).state != "serving" for i in range(3)):
                await trio.sleep(0.01)
        yield c


Connect = Callable[[Address], Awaitable[RawConnection]]


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """Open raw connections that are all closed when the test ends."""
    opened: list[RawConnection] = []

    async def open_(address: Address) -> RawConnection:
        conn = await RawConnection.open(address)
        opened.append(conn)
        return conn

    yield open_
    for conn in opened:
        await conn.aclose()


async def ping_ok(address: Address) -> None:
    conn = await RawConnection.open(address)
    try:
        reply = await conn.request({"op": "ping", "id": 77})
        assert reply.get("ok") is True, reply
        stats = reply.pop("stats")  # qkv's extra for ``qkv status`` (docs/protocol.md)
        assert isinstance(stats, dict) and {"keys", "max_counter", "requests", "peers"} <= stats.keys()
        assert reply == {"id": 77, "ok": True, "node": reply["node"], "protocol": 1, "state": "serving"}
    finally:
        await conn.aclose()


#: version 1's frames and those added with atomic updates (2026-12-02)
INVALID = VECTORS["invalid"] + VECTORS["atomic"]["invalid"]
VALID_REQUESTS = [v for v in VECTORS["valid"] + VECTORS["atomic"]["valid"] if "op" in v["decoded"]]


@pytest.mark.parametrize("vector", INVALID, ids=[v["name"] for v in INVALID])
async def test_invalid_vector_gets_its_error(
    cluster: LocalCluster, vector: dict[str, Any], connect: Connect
) -> None:
    address = cluster.addresses[0]
    bystander = await connect(address)
    conn = await connect(address)
    await conn.send(bytes.fromhex(vector["frame"]))
    reply = await conn.receive()
    assert reply is not None
    assert reply["ok"] is False
    assert reply["error"] == vector["error"]
    assert reply["id"] == vector["id"]
    assert isinstance(reply["message"], str) and reply["message"]
    if vector["connection_closed"]:
        assert await conn.closed_by_node()
    else:
        assert (await conn.request({"op": "ping", "id": 1}))["ok"] is True
    # Other clients never notice.
    assert (await bystander.request({"op": "ping", "id": 2}))["ok"] is True
    await ping_ok(address)


@pytest.mark.parametrize("vector", VALID_REQUESTS, ids=[v["name"] for v in VALID_REQUESTS])
async def test_valid_request_vector_is_served(
    cluster: LocalCluster, vector: dict[str, Any], connect: Connect
) -> None:
    conn = await connect(cluster.addresses[1])
    await conn.send(bytes.fromhex(vector["frame"]))
    reply = await conn.receive()
    assert reply is not None and reply["ok"] is True, reply
    assert reply["id"] == vector["decoded"]["id"]
    expected_keys = {
        "ping": {"node", "protocol"},
        "get": {"found", "value", "tag"},
        "set": {"tag"},
        "delete": {"tag"},
        "cas": {"swapped", "found", "value", "tag"},
        "incr": {"value", "tag"},
    }[vector["decoded"]["op"]]
    assert expected_keys <= reply.keys()


async def test_pipelined_requests_are_all_answered_by_id(cluster: LocalCluster, connect: Connect) -> None:
    conn = await connect(cluster.addresses[0])
    frames = b""
    for i in range(100):
        body = msgpack.packb(
            {"op": "set" if i % 2 else "get", "id": i, "key": b"k%d" % (i % 7), "value": b"v%d" % i},
            use_bin_type=True,
        )
        frames += struct.pack(">I", len(body)) + body
    await conn.send(frames)
    ids = set()
    for _ in range(100):
        reply = await conn.receive()
        assert reply is not None and reply["ok"] is True
        ids.add(reply["id"])
    assert ids == set(range(100))


async def test_too_large_is_refused_without_reading_the_body(cluster: LocalCluster, connect: Connect) -> None:
    conn = await connect(cluster.addresses[0])
    # Announce 100 MiB and send only a little: the node must answer at once.
    await conn.send((100 * 1024 * 1024).to_bytes(4, "big") + b"x" * 10)
    reply = await conn.receive()
    assert reply is not None and reply["error"] == "too_large" and reply["id"] is None
    assert await conn.closed_by_node()


async def test_connection_cap_refuses_extra_connections(cluster: LocalCluster, connect: Connect) -> None:
    address = cluster.addresses[2]
    held = [await connect(address) for _ in range(20)]
    for c in held:
        assert (await c.request({"op": "ping", "id": 1}))["ok"]
    extra = await connect(address)
    reply = await extra.receive()
    assert (
        reply is not None and reply["error"] == "unavailable" and "too many connections" in reply["message"]
    )
    for c in held:
        await c.aclose()
    with trio.fail_after(5):
        while True:
            try:
                await ping_ok(address)
                break
            except AssertionError:
                await trio.sleep(0.05)


async def test_client_that_never_reads_cannot_stall_others(cluster: LocalCluster, connect: Connect) -> None:
    """A client pipelining without reading fills only its own buffers: the
    node stops reading from it (max_inflight) and keeps serving others."""
    address = cluster.addresses[0]
    flood = await connect(address)
    body = msgpack.packb({"op": "get", "id": 1, "key": b"k"}, use_bin_type=True)
    frame = struct.pack(">I", len(body)) + body
    sent = 0
    # Send until the node stops reading (our send blocks) or 20 MiB are out.
    with trio.move_on_after(2):
        while sent < 20 * 1024 * 1024:
            await flood.send(frame * 1000)
            sent += len(frame) * 1000
    for _ in range(5):
        await ping_ok(address)
    async with cluster.client([0]) as client:
        await client.set(b"still", b"works")
        assert (await client.get(b"still")).value == b"works"
    await flood.aclose()


async def test_peer_hello_later_in_a_connection_is_refused(cluster: LocalCluster, connect: Connect) -> None:
    conn = await connect(cluster.addresses[0])
    assert (await conn.request({"op": "ping", "id": 1}))["ok"]
    reply = await conn.request({"op": "peer_hello", "id": 2, "protocol": PEER_PROTOCOL_VERSION, "node": "n2"})
    assert reply["ok"] is False and reply["error"] == "bad_request"
    assert (await conn.request({"op": "ping", "id": 3}))["ok"]


async def test_peer_hello_from_a_stranger_is_refused(cluster: LocalCluster, connect: Connect) -> None:
    conn = await connect(cluster.addresses[0])
    reply = await conn.request(
        {"op": "peer_hello", "id": 5, "protocol": PEER_PROTOCOL_VERSION, "node": "intruder"}
    )
    assert reply["ok"] is False and reply["error"] == "bad_request" and reply["id"] == 5
    assert await conn.closed_by_node()


@pytest.mark.parametrize("protocol", [None, 1, 2, 4, "3"])
async def test_peer_hello_of_another_peer_protocol_is_refused(
    cluster: LocalCluster, connect: Connect, protocol: object
) -> None:
    """A node of another version (peer messages were maps in version 1) is
    told so at the handshake, instead of failing on every later frame."""
    conn = await connect(cluster.addresses[0])
    hello: dict[str, object] = {"op": "peer_hello", "id": 4, "node": "n2"}
    if protocol is not None:
        hello["protocol"] = protocol
    reply = await conn.request(hello)
    assert reply["ok"] is False and reply["error"] == "bad_request" and reply["id"] == 4
    assert "peer protocol" in reply["message"]
    await ping_ok(cluster.addresses[0])


async def test_garbage_from_a_fake_peer_closes_only_that_connection(
    cluster: LocalCluster, connect: Connect
) -> None:
    conn = await connect(cluster.addresses[0])
    hello = await conn.request({"op": "peer_hello", "id": 0, "protocol": PEER_PROTOCOL_VERSION, "node": "n2"})
    assert hello["ok"] is True
    junk = msgpack.packb([["q", "not an int", b"k", None]], use_bin_type=True)
    await conn.send(struct.pack(">I", len(junk)) + junk)
    assert await conn.closed_by_node()
    await ping_ok(cluster.addresses[0])
