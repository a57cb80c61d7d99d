"""``qkv status`` in process: the stats in a ping reply, the table, and the
rate window of ``quorum.stats``."""

from __future__ import annotations

import math

import pytest
import trio

from cli.status import ClusterStatus, ping_all
from quorum.cluster import LocalCluster, open_cluster
from quorum.stats import RequestStats


def test_request_stats_counts_and_rates_over_the_window() -> None:
    stats = RequestStats(now=100.0, window=10)
    for i in range(20):
        stats.record("get", "ok", 100.0 + i * 0.5, 0.002)  # 2 per second for 10 s
    stats.record("set", "unavailable", 109.5, 2.0)
    assert stats.requests == 21 and stats.errors == 1
    assert stats.counts[("get", "ok")] == 20
    gets = stats.latencies["get"]
    assert gets.count == 20 and gets.total == pytest.approx(0.04)
    assert dict(gets.cumulative())[0.001] == 0 and dict(gets.cumulative())[0.0025] == 20
    assert stats.latencies["set"].cumulative()[-1] == (math.inf, 1)
    assert dict(stats.latencies["set"].cumulative())[1.0] == 0
    requests, errors = stats.rates(110.0)
    assert (requests, errors) == (1.9, 0.1)  # seconds 101..110: 18 gets and the set
    # 30 s later, nothing recent: rates fall to zero, totals stay
    assert stats.rates(140.0) == (0.0, 0.0)
    assert stats.requests == 21


async def wait_all_serving(cluster: LocalCluster) -> None:
    with trio.fail_after(10):
        while not all(cluster.node(i).state == "serving" for i in range(cluster.size)):
            await trio.sleep(0.01)


async def test_status_sees_keys_counters_requests_and_lost_nodes() -> None:
    async with open_cluster(3, request_timeout=0.5) as cluster:
        await wait_all_serving(cluster)
        async with cluster.client([0]) as client:
            for i in range(5):
                await client.set(b"k%d" % i, b"v")
            await client.get(b"k0")
        status = ClusterStatus(await ping_all(cluster.addresses, 1.0))
        assert status.majority_serving and status.majority_reachable
        first = status.nodes[0]
        assert first.stats is not None
        assert first.stats.keys == 5 and first.stats.max_counter >= 5
        assert first.stats.requests == 6 and first.stats.errors == 0
        assert first.stats.request_rate > 0
        assert first.stats.peers == {"n2": "up", "n3": "up"}
        report = status.as_dict()
        assert report["reachable"] == 3 and report["needed"] == 2

        await cluster.stop(2)
        one_down = ClusterStatus(await ping_all(cluster.addresses, 1.0))
        assert one_down.majority_serving
        assert [n.up for n in one_down.nodes] == [True, True, False]
        assert "DOWN" in one_down.table() and "majority serving: yes" in one_down.table()

        await cluster.stop(1)
        two_down = ClusterStatus(await ping_all(cluster.addresses, 1.0))
        assert not two_down.majority_serving and not two_down.majority_reachable
        assert two_down.nodes[0].state == "isolated"
        assert "majority serving: NO" in two_down.table()
