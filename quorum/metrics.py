"""A node's Prometheus metrics (prometheus-client), one registry per node
so that nodes in one process (tests, ``qkv cluster``) keep theirs apart.

Storage commits are observed as they happen (histograms, once per group
commit); everything the node already counts (requests and their latencies
in ``quorum.stats``, quorum phases, peer links, connections, keys) is read
when scraped, by a collector, so a request costs nothing here between
scrapes. ``render`` gives the text exposition format;
``net.metrics_http`` serves it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from quorum.node import Node

__all__ = ["NodeMetrics"]

# The ``*_created`` timestamps of every counter and histogram are noise here.
disable_created_metrics()  # type: ignore[no-untyped-call]

COMMIT_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
STATES = ("serving", "recovering", "isolated", "stopping")


class NodeMetrics:
    def __init__(self, node: Node) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.commit_latency = Histogram(
            "qkv_storage_commit_duration_seconds",
            "Duration of one storage commit (one group commit): from writing its batch"
            " to the end of the fsync that covers it.",
            buckets=COMMIT_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "qkv_storage_commit_batch_updates",
            "Updates written by one storage commit.",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_NodeCollector(node))

    def observe_commit(self, seconds: float, updates: int) -> None:
        self.commit_latency.observe(seconds)
        self.batch_size.observe(updates)

    def render(self) -> bytes:
        """The metrics in the Prometheus text exposition format."""
        return generate_latest(self.registry)


class _NodeCollector(Collector):
    def __init__(self, node: Node) -> None:
        self._node = node

    def collect(self) -> Iterable[Metric]:
        node = self._node
        stats = node.stats
        requests = CounterMetricFamily(
            "qkv_requests",
            "Client requests answered, by op and outcome (ok or the error code).",
            labels=["op", "outcome"],
        )
        for (op, outcome), count in sorted(stats.counts.items()):
            requests.add_metric([op, outcome], count)
        yield requests
        latency = HistogramMetricFamily(
            "qkv_request_duration_seconds",
            "Time from a client request's arrival to its answer, by op.",
            labels=["op"],
        )
        for op, latencies in sorted(stats.latencies.items()):
            buckets = [(_le(bound), count) for bound, count in latencies.cumulative()]
            latency.add_metric([op], buckets, latencies.total)
        yield latency
        coordinator = node.coordinator
        yield _counter("qkv_quorum_fast_reads", "Gets answered after one round trip.", coordinator.fast_reads)
        yield _counter(
            "qkv_quorum_write_backs",
            "Gets that wrote the version read back to a majority before answering.",
            coordinator.write_backs,
        )
        links = GaugeMetricFamily(
            "qkv_peer_link_up", "1 while the outbound link to a peer is connected.", labels=["peer"]
        )
        for peer, link in sorted(node.links.items()):
            links.add_metric([str(peer)], 1.0 if link.connected else 0.0)
        yield links
        yield _gauge(
            "qkv_peer_links_up",
            "Outbound peer links connected.",
            sum(1 for link in node.links.values() if link.connected),
        )
        yield _gauge(
            "qkv_cluster_size", "Members of the cluster, this node included.", node.config.cluster_size
        )
        state = GaugeMetricFamily("qkv_node_state", "1 for the node's current state.", labels=["state"])
        current = node.state
        for name in STATES:
            state.add_metric([name], 1.0 if name == current else 0.0)
        yield state
        yield _gauge("qkv_requests_in_flight", "Client requests being coordinated.", node.requests_in_flight)
        server = node.server_stats
        yield _gauge("qkv_client_connections", "Client connections open.", server.client_connections)
        yield _gauge("qkv_peer_connections", "Inbound peer connections open.", server.peer_connections)
        yield _counter("qkv_connections_accepted", "Connections accepted.", server.accepted)
        replica = node.replica
        yield _gauge("qkv_keys", "Registers held, tombstones included.", len(replica.state))
        yield _gauge("qkv_max_counter", "The highest tag counter held.", replica.max_counter)
        yield _counter("qkv_storage_commits", "Storage commits made.", replica.commits)
        yield _counter("qkv_storage_committed_updates", "Updates made durable.", replica.committed_updates)


def _le(bound: float) -> str:
    """A bucket bound as Prometheus writes it (``+Inf``, ``0.005``, ``1.0``)."""
    text: str = floatToGoString(bound)  # type: ignore[no-untyped-call]
    return text


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)
