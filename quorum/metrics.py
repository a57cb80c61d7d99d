"""A node's Prometheus metrics (prometheus-client), one registry per node
so that nodes in one process (tests, ``qkv cluster``) keep theirs apart.

Requests and storage commits are observed as they happen (counters and
histograms); everything the node already counts (quorum phases, peer
links, connections, keys) is read when scraped, by a collector, so it costs
nothing between scrapes. ``render`` gives the text exposition format;
``net.metrics_http`` serves it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from quorum.node import Node

__all__ = ["NodeMetrics"]

# The ``*_created`` timestamps of every counter and histogram are noise here.
disable_created_metrics()  # type: ignore[no-untyped-call]

#: seconds: from a fast read on loopback (~0.3 ms) to the request deadline
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
COMMIT_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
STATES = ("serving", "recovering", "isolated", "stopping")


class NodeMetrics:
    def __init__(self, node: Node) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            "qkv_requests",
            "Client requests answered, by op and outcome (ok or the error code).",
            ["op", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "qkv_request_duration_seconds",
            "Time from a client request's arrival to its answer, by op.",
            ["op"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.commit_latency = Histogram(
            "qkv_storage_commit_duration_seconds",
            "Duration of one storage commit (one group commit).",
            buckets=COMMIT_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "qkv_storage_commit_batch_updates",
            "Updates written by one storage commit.",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self._request_counters: dict[tuple[str, str], Counter] = {}
        self._latency_histograms: dict[str, Histogram] = {}
        for op in ("get", "set", "delete"):
            self.latency.labels(op)  # present (at zero) before the first request
        self.registry.register(_NodeCollector(node))

    def observe_request(self, op: str, outcome: str, seconds: float) -> None:
        # labels() validates and locks on every call: look each child up once.
        key = (op, outcome)
        counter = self._request_counters.get(key)
        if counter is None:
            counter = self._request_counters[key] = self.requests.labels(op, outcome)
        counter.inc()
        histogram = self._latency_histograms.get(op)
        if histogram is None:
            histogram = self._latency_histograms[op] = self.latency.labels(op)
        histogram.observe(seconds)

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


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)
