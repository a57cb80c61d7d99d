"""Peer links prove the cluster secret (HMAC over fresh nonces, both ways);
a connection without it can use only the client operations."""

from __future__ import annotations

import struct
from typing import Any

import attrs
import msgpack
import trio

from net.address import Address
from net.messages import PEER_PROTOCOL_VERSION
from quorum.cluster import LocalCluster, open_cluster
from quorum.peer_auth import acceptor_proof, dialer_proof, new_nonce, proof_ok, read_secret
from register.model import Key
from tests.rawwire import RawConnection

SECRET = b"correct horse battery staple 42"


def frame(body: Any) -> bytes:
    packed = msgpack.packb(body, use_bin_type=True)
    return struct.pack(">I", len(packed)) + packed


async def wait_all_serving(cluster: LocalCluster, nodes: list[int] | None = None) -> None:
    with trio.fail_after(10):
        while not all(cluster.node(i).state == "serving" for i in nodes or range(cluster.size)):
            await trio.sleep(0.01)


def test_proofs_bind_role_nonces_and_ids() -> None:
    nd, na = new_nonce(), new_nonce()
    a = acceptor_proof(SECRET, nd, na, "n1", "n2")
    d = dialer_proof(SECRET, nd, na, "n1", "n2")
    assert a != d  # a proof cannot be reflected to the other side
    assert proof_ok(a, acceptor_proof(SECRET, nd, na, "n1", "n2"))
    assert not proof_ok(a, acceptor_proof(SECRET, nd, na, "n1", "n3"))
    assert not proof_ok(a, acceptor_proof(SECRET, new_nonce(), na, "n1", "n2"))
    assert not proof_ok(a, acceptor_proof(b"another secret of 16+ bytes", nd, na, "n1", "n2"))
    assert not proof_ok(a, None)
    assert read_secret(b"  " + SECRET + b"\n") == SECRET


async def test_a_cluster_with_a_secret_serves() -> None:
    async with open_cluster(3, cluster_secret=SECRET) as cluster:
        await wait_all_serving(cluster)
        async with cluster.client([1]) as client:
            await client.set(b"k", b"v")
            assert (await client.get(b"k")).value == b"v"
        assert all(link.connected for link in cluster.node(0).links.values())


async def test_a_node_with_the_wrong_secret_gets_no_link() -> None:
    async with open_cluster(3, cluster_secret=SECRET, start=False) as cluster:
        cluster.configs[2] = attrs.evolve(
            cluster.configs[2], cluster_secret=b"not the secret, but long enough"
        )
        for i in range(3):
            await cluster.start(i)
        with trio.fail_after(10):
            while not (cluster.node(0).links["n2"].connected and cluster.node(1).links["n1"].connected):
                await trio.sleep(0.01)
        await trio.sleep(0.5)  # time for several reconnection attempts
        assert cluster.node(0).links["n2"].connected
        assert not cluster.node(0).links["n3"].connected
        assert not cluster.node(2).links["n1"].connected
        assert not cluster.node(2).links["n2"].connected
        assert cluster.node(0).peer_service.auth_failures > 0


async def test_a_connection_without_the_secret_gets_an_error_and_changes_nothing() -> None:
    async with open_cluster(3, cluster_secret=SECRET) as cluster:
        await wait_all_serving(cluster)
        address: Address = cluster.addresses[0]
        store = [["s", 1, b"stolen", [10**9, "n2"], b"x", []]]

        # peer_hello with no nonce: refused before any peer message
        conn = await RawConnection.open(address)
        await conn.send(
            frame({"op": "peer_hello", "id": 0, "protocol": PEER_PROTOCOL_VERSION, "node": "n2"})
            + frame(store)
        )
        reply = await conn.receive()
        assert reply is not None and reply["ok"] is False and reply["error"] == "bad_request", reply
        assert "authentication" in reply["message"]
        assert await conn.closed_by_node()
        await conn.aclose()

        # a nonce but a wrong proof, then a store: an error, and closed
        conn = await RawConnection.open(address)
        nonce = new_nonce()
        hello = await conn.request(
            {"op": "peer_hello", "id": 0, "protocol": PEER_PROTOCOL_VERSION, "node": "n2", "nonce": nonce}
        )
        assert hello["ok"] is True and len(hello["nonce"]) == 16
        # the node proves the secret to the dialer (which cannot check it)
        assert hello["proof"] == acceptor_proof(SECRET, nonce, hello["nonce"], "n2", "n1")
        await conn.send(frame({"op": "peer_auth", "id": 0, "proof": b"\x00" * 32}) + frame(store))
        refusal = await conn.receive()
        assert refusal is not None and refusal["ok"] is False and refusal["error"] == "bad_request"
        assert await conn.closed_by_node()
        await conn.aclose()

        # a peer frame with no hello at all
        conn = await RawConnection.open(address)
        await conn.send(frame(store))
        first = await conn.receive()
        assert first is not None and first["ok"] is False and first["error"] == "bad_request"
        assert await conn.closed_by_node()
        await conn.aclose()

        await trio.sleep(0.1)
        for i in range(3):
            assert cluster.node(i).replica.get(Key(b"stolen")) is None
        # client operations still work on such a connection
        conn = await RawConnection.open(address)
        assert (await conn.request({"op": "ping", "id": 5}))["ok"] is True
        await conn.aclose()


async def test_the_right_proof_opens_a_peer_session() -> None:
    """The handshake as documented in docs/protocol.md, by hand."""
    async with open_cluster(3, cluster_secret=SECRET) as cluster:
        await wait_all_serving(cluster)
        conn = await RawConnection.open(cluster.addresses[0])
        nonce = new_nonce()
        hello = await conn.request(
            {"op": "peer_hello", "id": 0, "protocol": PEER_PROTOCOL_VERSION, "node": "n2", "nonce": nonce}
        )
        proof = dialer_proof(SECRET, nonce, hello["nonce"], "n2", "n1")
        query = [["q", 7, b"absent", None]]
        await conn.send(frame({"op": "peer_auth", "id": 0, "proof": proof}) + frame(query))
        with trio.fail_after(5):
            while len(conn._buf) < 4:
                conn._buf += await conn.stream.receive_some(65536)
        (length,) = struct.unpack_from(">I", conn._buf)
        while len(conn._buf) < 4 + length:
            conn._buf += await conn.stream.receive_some(65536)
        replies = msgpack.unpackb(bytes(conn._buf[4 : 4 + length]), raw=False)
        assert replies[0][:2] == ["qr", 7]
        await conn.aclose()


async def test_a_framing_error_on_a_peer_connection_closes_only_that_connection() -> None:
    """An empty frame right after peer_hello (during authentication, or in a
    session of a cluster without a secret) used to end the whole node."""
    for secret in (SECRET, None):
        async with open_cluster(3, cluster_secret=secret) as cluster:
            await wait_all_serving(cluster)
            hello = {
                "op": "peer_hello",
                "id": 0,
                "protocol": PEER_PROTOCOL_VERSION,
                "node": "n2",
                "nonce": new_nonce(),
            }
            conn = await RawConnection.open(cluster.addresses[0])
            await conn.send(frame(hello) + b"\x00\x00\x00\x00")
            with trio.fail_after(5):
                while await conn.receive() is not None:
                    pass
            await conn.aclose()
            conn = await RawConnection.open(cluster.addresses[0])
            assert (await conn.request({"op": "ping", "id": 1}))["ok"] is True
            await conn.aclose()
            assert cluster.running(0)
