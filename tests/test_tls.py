"""TLS: clients and peers over TLS, mutual TLS between peers, and the
connections that must be refused (plain text, a certificate from another
CA, a peer without a client certificate). Certificates come from trustme."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import attrs
import msgpack
import pytest
import trio
import trustme

from net.client import open_client
from net.errors import PeerUnavailable, Unavailable
from net.messages import PEER_PROTOCOL_VERSION
from net.tls import TlsFiles, client_context
from quorum.cluster import LocalCluster, open_cluster
from tests.support.procs import run_qkv


def node_files(ca: trustme.CA, root: Path, name: str) -> TlsFiles:
    """A node certificate for 127.0.0.1 signed by ``ca``, as PEM files."""
    root.mkdir(parents=True, exist_ok=True)
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = TlsFiles(cert=root / f"{name}.pem", key=root / f"{name}.key", ca=root / f"{name}-ca.pem")
    cert.private_key_and_cert_chain_pem.write_to_path(str(files.cert))
    cert.private_key_pem.write_to_path(str(files.key))
    ca.cert_pem.write_to_path(str(files.ca))
    return files


async def wait_all_serving(cluster: LocalCluster, nodes: list[int] | None = None) -> None:
    with trio.fail_after(10):
        while not all(cluster.node(i).state == "serving" for i in nodes or range(cluster.size)):
            await trio.sleep(0.01)


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


async def test_clients_and_peers_speak_tls(tmp_path: Path, ca: trustme.CA) -> None:
    files = node_files(ca, tmp_path, "node")
    async with open_cluster(3, tls=files) as cluster:
        await wait_all_serving(cluster)  # peers linked over mutual TLS
        context = client_context(files.ca)
        async with open_client([cluster.addresses[0]], ssl_context=context) as client:
            await client.set(b"k", b"over tls")
        async with open_client([cluster.addresses[2]], ssl_context=context) as client:
            assert (await client.get(b"k")).value == b"over tls"


async def test_plain_text_and_wrong_ca_clients_are_refused(tmp_path: Path, ca: trustme.CA) -> None:
    files = node_files(ca, tmp_path, "node")
    stranger = node_files(trustme.CA(), tmp_path, "stranger")
    async with open_cluster(3, tls=files) as cluster:
        await wait_all_serving(cluster)
        address = cluster.addresses[0]
        # plain text: the node waits for a TLS hello, gets garbage, closes
        with pytest.raises(Unavailable):
            async with open_client([address], timeout=2) as client:
                await client.set(b"k", b"v")
        # a client that trusts another CA refuses the node's certificate
        with pytest.raises(Unavailable, match="TLS"):
            async with open_client([address], timeout=2, ssl_context=client_context(stranger.ca)) as client:
                await client.get(b"k")
        # a client certificate from another CA is refused by the node
        wrong_cert = client_context(files.ca, stranger.cert, stranger.key)
        with pytest.raises((Unavailable, PeerUnavailable)):
            async with open_client([address], timeout=2, ssl_context=wrong_cert) as client:
                await client.get(b"k")
        assert cluster.node(0).replica.get(b"k") is None  # type: ignore[arg-type]


async def test_a_peer_needs_a_certificate_from_the_cluster_ca(tmp_path: Path, ca: trustme.CA) -> None:
    files = node_files(ca, tmp_path, "node")
    other = trustme.CA()
    # n3 trusts the cluster CA, but its own certificate comes from another CA
    wrong = attrs.evolve(node_files(other, tmp_path, "n3"), ca=files.ca)
    async with open_cluster(3, tls=files, start=False) as cluster:
        cluster.configs[2] = attrs.evolve(cluster.configs[2], tls=wrong)
        for i in range(3):
            await cluster.start(i)
        with trio.fail_after(10):
            while not cluster.node(0).links["n2"].connected:
                await trio.sleep(0.01)
        await trio.sleep(0.5)
        assert not cluster.node(0).links["n3"].connected  # n1 rejects n3's server certificate
        assert not cluster.node(2).links["n1"].connected  # n1 rejects n3's client certificate

        # a TLS client without a certificate may not open a peer session
        stream = await trio.open_tcp_stream("127.0.0.1", cluster.addresses[0].port)
        tls = trio.SSLStream(stream, client_context(files.ca), server_hostname="127.0.0.1")
        async with tls:
            body = msgpack.packb(
                {"op": "peer_hello", "id": 0, "protocol": PEER_PROTOCOL_VERSION, "node": "n2"},
                use_bin_type=True,
            )
            await tls.send_all(struct.pack(">I", len(body)) + body)
            data = b""
            with trio.fail_after(5):
                while len(data) < 4 or len(data) < 4 + struct.unpack_from(">I", data)[0]:
                    chunk = await tls.receive_some(65536)
                    assert chunk, "closed without an answer"
                    data += chunk
            reply = msgpack.unpackb(data[4:], raw=False)
            assert reply["ok"] is False and reply["error"] == "bad_request"
            assert "certificate" in reply["message"]


@pytest.mark.subprocess
async def test_the_command_line_speaks_tls(tmp_path: Path, ca: trustme.CA) -> None:
    files = node_files(ca, tmp_path, "node")
    async with open_cluster(3, tls=files) as cluster:
        await wait_all_serving(cluster)
        async with open_client([cluster.addresses[0]], ssl_context=client_context(files.ca)) as client:
            await client.set(b"k", b"over tls")
        # the command line, with --tls-ca (and refused without it)
        nodes = ",".join(str(a) for a in cluster.addresses)
        status = await trio.to_thread.run_sync(
            lambda: run_qkv("status", "--json", "--nodes", nodes, "--tls-ca", str(files.ca))
        )
        assert status.returncode == 0, status
        assert json.loads(status.stdout)["majority_serving"] is True
        got = await trio.to_thread.run_sync(
            lambda: run_qkv("get", "k", "--nodes", nodes, "--tls-ca", str(files.ca))
        )
        assert (got.returncode, got.stdout) == (0, b"over tls"), got
        plain = await trio.to_thread.run_sync(lambda: run_qkv("status", "--nodes", nodes))
        assert plain.returncode == 3, plain


@pytest.mark.subprocess
def test_tls_files_are_checked_at_start(tmp_path: Path, ca: trustme.CA) -> None:
    files = node_files(ca, tmp_path, "node")
    base = ["serve", "--id", "n1", "--listen", "127.0.0.1:1", "--data-dir", str(tmp_path / "d")]
    half = run_qkv(*base, "--tls-cert", str(files.cert))
    assert half.returncode == 2 and "--tls-key" in half.stderr, half
    broken = run_qkv(
        *base, "--tls-cert", str(files.ca), "--tls-key", str(files.ca), "--tls-ca", str(files.ca)
    )
    assert broken.returncode == 2 and "TLS" in broken.stderr, broken
    assert not (tmp_path / "d").exists()
