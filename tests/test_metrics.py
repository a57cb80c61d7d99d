"""The ``--metrics`` endpoint: scraped over HTTP, parsed with
prometheus-client's own parser, counters that move with requests."""

from __future__ import annotations

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from net.address import Address
from net.errors import Unavailable
from quorum.cluster import LocalCluster, open_cluster

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def http_get(address: Address, path: str = "/metrics", method: str = "GET") -> tuple[str, str, bytes]:
    """(status line, content type, body) of one HTTP/1.0 request."""
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream(address.host, address.port)
        async with stream:
            await stream.send_all(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    kind = next(line.split(":", 1)[1].strip() for line in lines if line.lower().startswith("content-type"))
    return lines[0], kind, body


async def scrape(address: Address) -> Samples:
    status, kind, body = await http_get(address)
    assert status == "HTTP/1.0 200 OK" and kind.startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def wait_all_serving(cluster: LocalCluster) -> None:
    with trio.fail_after(10):
        while not all(cluster.node(i).state == "serving" for i in range(cluster.size)):
            await trio.sleep(0.01)


async def test_metrics_are_scraped_parsed_and_move_with_requests() -> None:
    async with open_cluster(3, metrics_listen=Address("127.0.0.1", 0), request_timeout=0.5) as cluster:
        await wait_all_serving(cluster)
        endpoint = cluster.node(0).metrics_address
        assert endpoint is not None and endpoint.port != 0
        before = await scrape(endpoint)
        assert value(before, "qkv_peer_link_up", peer="n2") == 1.0
        assert value(before, "qkv_node_state", state="serving") == 1.0
        assert value(before, "qkv_requests_total", op="set", outcome="ok") == 0.0

        async with cluster.client([0]) as client:
            for i in range(10):
                await client.set(b"k%d" % i, b"v")
            for i in range(5):
                await client.get(b"k%d" % i)
        after = await scrape(endpoint)
        assert value(after, "qkv_requests_total", op="set", outcome="ok") == 10.0
        assert value(after, "qkv_requests_total", op="get", outcome="ok") == 5.0
        assert value(after, "qkv_request_duration_seconds_count", op="set") == 10.0
        assert value(after, "qkv_request_duration_seconds_bucket", op="set", le="+Inf") == 10.0
        assert value(after, "qkv_quorum_fast_reads_total") + value(after, "qkv_quorum_write_backs_total") == 5
        assert value(after, "qkv_storage_commit_duration_seconds_count") > value(
            before, "qkv_storage_commit_duration_seconds_count"
        )
        assert value(after, "qkv_storage_commit_batch_updates_sum") >= 10
        assert value(after, "qkv_keys") == 10.0 and value(after, "qkv_max_counter") >= 10
        # the server ends a session once it has read the client's close: soon, not at once
        with trio.fail_after(5):
            while value(await scrape(endpoint), "qkv_client_connections") != 0.0:
                await trio.sleep(0.02)
        assert value(after, "qkv_requests_in_flight") == 0.0

        await cluster.stop(1)
        with trio.fail_after(5):
            while value(await scrape(endpoint), "qkv_peer_link_up", peer="n2") != 0.0:
                await trio.sleep(0.02)
        # a request that cannot finish: its error is counted by outcome
        await cluster.stop(2)
        async with cluster.client([0], timeout=5) as client:
            with pytest.raises(Unavailable):
                await client.get(b"k0")
        failed = await scrape(endpoint)
        assert value(failed, "qkv_requests_total", op="get", outcome="unavailable") == 1.0


async def test_metrics_endpoint_refuses_other_paths_and_methods() -> None:
    async with open_cluster(1, metrics_listen=Address("127.0.0.1", 0)) as cluster:
        endpoint = cluster.node(0).metrics_address
        assert endpoint is not None
        assert (await http_get(endpoint, "/nothing"))[0] == "HTTP/1.0 404 Not Found"
        assert (await http_get(endpoint, "/metrics", "POST"))[0] == "HTTP/1.0 405 Method Not Allowed"
