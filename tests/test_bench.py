"""``qkv bench``: its latency histogram (``cli/histogram.py``), the load
generator run in process against a 3-node cluster (``cli.bench.run_load``),
and the command as users run it (``--local``, ``--json``, usage errors).

No assertion here is on throughput: counts, shapes and orderings only, and
upper bounds that hold by construction.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from fractions import Fraction
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

import cli.bench
import net.client
from cli.bench import Workload, run_load
from cli.histogram import SUB, Histogram
from net.errors import PeerUnavailable
from net.messages import Cas, Incr
from quorum.cluster import LocalCluster, open_cluster
from tests.support.procs import QkvResult, free_ports, run_qkv_many

#: the message of ``PeerUnavailable`` raised by the teardown race (see above)

#: percentiles as people write them (decimal), as ``run_load`` asks for them
PERCENTILES = [0, 0.1, 1, 10, 25, 50, 75, 90, 95, 99, 99.5, 99.9, 99.99, 100]

#: latency names of a report, in increasing order
LATENCY_NAMES = ["p50", "p90", "p99", "p99.9", "max"]


# --- the histogram ------------------------------------------------------------------


def histogram(values: Iterable[int]) -> Histogram:
    h = Histogram()
    for v in values:
        h.record(v)
    return h


def nearest_rank(values: list[int], p: float) -> int:
    """The exact nearest-rank percentile: the smallest recorded value at or
    below which at least ``p`` percent of the values fall."""
    ordered = sorted(values)
    rank = max(1, math.ceil(len(ordered) * Fraction(str(p)) / 100))
    return ordered[rank - 1]


#: microseconds: small exact ones, any up to 1000 s, and values next to powers of two
micros = st.one_of(
    st.integers(0, 200),
    st.integers(0, 10**9),
    st.builds(lambda k, d: max(0, (1 << k) + d), st.integers(0, 30), st.integers(-2, 2)),
)
value_lists = st.lists(micros, min_size=1, max_size=300)


@given(values=value_lists, p=st.sampled_from(PERCENTILES))
def test_percentile_is_the_nearest_rank_within_the_resolution(values: list[int], p: float) -> None:
    h = histogram(values)
    exact = nearest_rank(values, p)
    got = h.percentile(p)
    # "at or below which p percent fall": never below the exact value; and
    # at most one sub-bucket (1/SUB of the value, exact below SUB) above it
    assert exact <= got <= exact + exact // SUB, (exact, got)
    assert got <= max(values)
    assert (h.total, h.max) == (len(values), max(values))


@given(values=value_lists)
def test_percentile_100_is_the_max(values: list[int]) -> None:
    h = histogram(values)
    assert h.percentile(100) == max(values)


def test_every_bucket_holds_values_within_its_resolution() -> None:
    """Each value alone below a far larger one reads back as its bucket's
    top: at or above it, within 1/SUB."""
    edges = {(1 << k) + d for k in range(41) for d in (-1, 0, 1)}
    for v in sorted(set(range(1 << 13)) | edges):
        h = histogram([v, 1 << 50])
        got = h.percentile(50)
        assert v <= got <= v + v // SUB, (v, got)


@given(a=st.lists(micros, max_size=100), b=st.lists(micros, max_size=100))
def test_merge_equals_one_histogram_fed_both(a: list[int], b: list[int]) -> None:
    merged = histogram(a)
    right = histogram(b)
    merged.merge(right)
    both = histogram(a + b)
    assert (merged.counts, merged.total, merged.max) == (both.counts, both.total, both.max)
    assert [merged.percentile(p) for p in PERCENTILES] == [both.percentile(p) for p in PERCENTILES]
    assert (right.total, right.max) == (len(b), max(b, default=0))  # the other one is left alone


def test_empty_histogram_reads_zero() -> None:
    h = Histogram()
    assert [h.percentile(p) for p in PERCENTILES] == [0] * len(PERCENTILES)
    assert (h.total, h.max) == (0, 0)
    h.merge(Histogram())
    assert (h.total, h.max, h.percentile(50)) == (0, 0, 0)


@given(values=st.lists(st.integers(-(10**9), 10**9), min_size=1, max_size=100))
def test_negative_values_are_recorded_as_zero(values: list[int]) -> None:
    h = histogram(values)
    clamped = histogram(max(0, v) for v in values)
    assert (h.counts, h.total, h.max) == (clamped.counts, clamped.total, clamped.max)
    assert [h.percentile(p) for p in PERCENTILES] == [clamped.percentile(p) for p in PERCENTILES]


def test_p99_9_of_41000_records_is_the_40959th() -> None:
    values = [0] * 40_959 + [10**6] * 41
    assert nearest_rank(values, 99.9) == 0
    assert histogram(values).percentile(99.9) == 0


def test_only_negative_values_read_zero() -> None:
    h = histogram([-1, -5, -(10**9)])
    assert (h.total, h.max) == (3, 0)
    assert [h.percentile(p) for p in PERCENTILES] == [0] * len(PERCENTILES)


# --- run_load in process ------------------------------------------------------------


@pytest.fixture
async def cluster() -> AsyncIterator[LocalCluster]:
    async with open_cluster(3, request_timeout=2.0) as c:
        with trio.fail_after(10):
            while not all(c.running(i) and c.node(i).state == "serving" for i in range(c.size)):
                await trio.sleep(0.01)
        yield c


def small(**changes: Any) -> Workload:
    """A light load: 2 connections x 2 in flight, 50 keys, no warm-up."""
    fields: dict[str, Any] = {
        "clients": 2,
        "pipeline": 2,
        "keys": 50,
        "value_size": 16,
        "warmup": 0.0,
        "duration": 60.0,  # a count that is ignored runs into the 30 s bound of load()
    }
    return Workload(**(fields | changes))


async def load(cluster: LocalCluster, work: Workload, **kwargs: Any) -> dict[str, Any]:
    with trio.fail_after(30):
        return await run_load(cluster.addresses, work, False, **kwargs)


def assert_sane(report: dict[str, Any]) -> None:
    """Counts add up, latencies are ordered, nothing failed."""
    assert report["ops"] > 0, report
    assert report["reads"] + report["writes"] == report["ops"], report
    assert report["issued"] >= report["ops"], report
    assert report["errors"] == {}, report
    latency = report["latency_ms"]
    assert list(latency) == LATENCY_NAMES
    values = [latency[name] for name in LATENCY_NAMES]
    assert values == sorted(values), latency
    assert values[0] >= 0 and values[-1] > 0, latency
    assert report["seconds"] > 0


async def test_closed_loop_stops_after_the_requested_count(cluster: LocalCluster) -> None:
    work = small(requests=60)
    report = await load(cluster, work)
    assert_sane(report)
    # at least the count; beyond it only requests already in flight (the
    # 60 s duration would have tripped the 30 s bound)
    assert 60 <= report["ops"] <= 60 + 2 * work.clients * work.pipeline, report
    assert report["reads"] > 0 and report["writes"] > 0, report  # half and half, drawn
    assert "rss_kib" not in report
    assert json.loads(json.dumps(report)) == report  # what --json prints


@pytest.mark.parametrize("read_ratio", [0.0, 1.0])
async def test_read_ratio_zero_or_one_gives_only_sets_or_only_gets(
    cluster: LocalCluster, read_ratio: float
) -> None:
    report = await load(cluster, small(requests=30, read_ratio=read_ratio))
    assert_sane(report)
    if read_ratio == 1.0:
        assert (report["reads"], report["writes"]) == (report["ops"], 0), report
    else:
        assert (report["reads"], report["writes"]) == (0, report["ops"]), report


async def test_closed_loop_runs_for_the_duration(cluster: LocalCluster) -> None:
    report = await load(cluster, small(duration=0.3, warmup=0.1, distribution="zipfian"))
    assert_sane(report)
    assert report["seconds"] >= 0.3


async def test_open_loop_issues_requests_at_no_more_than_the_rate(cluster: LocalCluster) -> None:
    rate = 40.0
    work = small(rate=rate, duration=0.8, warmup=0.1)
    started = time.perf_counter()
    report = await load(cluster, work)
    elapsed = time.perf_counter() - started
    assert_sane(report)
    # request k falls due k/rate s after the load starts: never more than that
    assert report["issued"] <= rate * elapsed + 1, (report, elapsed)


async def test_rss_is_sampled_at_the_window_start_and_end(cluster: LocalCluster) -> None:
    warmup = 0.2
    calls: list[float] = []

    def sample() -> list[int | None]:
        calls.append(trio.current_time())
        return [len(calls), None, 7]

    began = trio.current_time()
    report = await load(cluster, small(duration=0.3, warmup=warmup), sample_rss=sample)
    assert_sane(report)
    assert len(calls) >= 2
    assert calls[0] - began >= warmup  # not while warming up
    samples = report["rss_kib"]
    assert [s["servers"] for s in samples] == [[i + 1, None, 7] for i in range(len(calls))]
    at = [s["at_s"] for s in samples]
    assert at[0] == 0.0 and at == sorted(at)
    assert abs(at[-1] - report["seconds"]) <= 0.1, (at, report["seconds"])


async def test_rss_is_sampled_in_between_and_at_the_end_of_a_counted_run(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli.bench, "RSS_SAMPLE_INTERVAL", 0.05)
    calls = 0

    def sample() -> list[int | None]:
        nonlocal calls
        calls += 1
        return [1, 2, 3]

    report = await load(cluster, small(duration=1.0), sample_rss=sample)
    assert_sane(report)
    samples = report["rss_kib"]
    assert len(samples) == calls >= 3, samples
    at = [s["at_s"] for s in samples]
    assert at[0] == 0.0 and at == sorted(at) and at[-1] > 0, at

    counted = await load(cluster, small(requests=20), sample_rss=sample)
    assert len(counted["rss_kib"]) >= 2  # start and end, whatever the window's length


async def test_a_node_lost_mid_run_is_counted_not_a_crash(cluster: LocalCluster) -> None:
    async def stop_a_node() -> None:
        await trio.sleep(0.3)
        await cluster.stop(2)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_a_node)
            report = await run_load(cluster.addresses, small(clients=3, duration=1.0), False)
    assert report["ops"] > 0 and report["errors"], report


async def test_a_count_of_requests_ends_even_if_every_request_fails(cluster: LocalCluster) -> None:
    """Failed requests count towards --requests: a run against a cluster
    without a majority ends (with errors) instead of waiting forever."""
    await cluster.stop(1)
    await cluster.stop(2)
    report = await load(cluster, small(requests=5, clients=1, pipeline=1))
    assert report["ops"] == 0 and sum(report["errors"].values()) >= 5, report


async def test_a_run_that_loses_every_connection_says_so(cluster: LocalCluster) -> None:
    """Not a report of nothing with "errors: none": the run fails."""

    async def stop_all() -> None:
        await trio.sleep(0.2)
        for i in range(cluster.size):
            await cluster.stop(i)

    with (
        trio.fail_after(30),
        pytest.RaisesGroup(PeerUnavailable, allow_unwrapped=True, flatten_subgroups=True),
    ):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_all)
            await run_load(cluster.addresses, small(clients=2, duration=5.0), False)


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[type]:
    """The type of every request the load sends."""
    types: list[type] = []
    request = net.client.Connection.request

    async def recording(self: net.client.Connection, message: Any, expected: type[Any]) -> Any:
        types.append(type(message))
        return await request(self, message, expected)

    monkeypatch.setattr(net.client.Connection, "request", recording)
    return types


async def test_the_mixed_workload_says_so(cluster: LocalCluster) -> None:
    report = await load(cluster, small(requests=10))
    assert report["workload"] == "mixed"
    assert "swapped" not in report and "not_swapped" not in report


async def test_incr_workload_counts_every_incr(cluster: LocalCluster, sent: list[type]) -> None:
    work = small(kind="incr", requests=40, keys=5)
    report = await load(cluster, work)
    assert_sane(report)
    assert report["workload"] == "incr"
    assert (report["reads"], report["writes"]) == (0, report["ops"]), report
    assert set(sent) == {Incr}
    # every answered incr added 1 (and so did any still in flight at the end)
    async with cluster.client() as client:
        total = 0
        for i in range(work.keys):
            got = await client.get(f"counter{i:08d}".encode())
            total += int(got.value or b"0")
    assert report["writes"] <= total <= report["issued"], (total, report)


@pytest.mark.parametrize("keys", [2, 5000], ids=["contended", "uncontended"])
async def test_cas_workload_loops_without_reads(cluster: LocalCluster, sent: list[type], keys: int) -> None:
    report = await load(cluster, small(kind="cas", requests=60, keys=keys))
    assert_sane(report)
    assert report["workload"] == "cas"
    assert (report["reads"], report["writes"]) == (0, report["ops"]), report
    assert report["swapped"] + report["not_swapped"] == report["writes"], report
    assert report["swapped"] > 0, report
    assert set(sent) == {Cas}  # read-free: no get, ever
    text = cli.bench.format_report(report, small(kind="cas", keys=keys))
    assert "read-free cas loops, 16 B values" in text.splitlines()[0], text


# --- the command --------------------------------------------------------------------

BENCH = ["bench", "--local", "3", "--storage", "memory", "--duration", "1", "--warmup", "0.2"]
BENCH += ["--clients", "2", "--pipeline", "2"]


@pytest.fixture(scope="module")
def runs() -> Iterator[dict[str, QkvResult]]:
    """The commands, run at once (each starts its own cluster or fails fast)."""
    nobody = free_ports(1)[0]  # nothing listens there
    yield run_qkv_many(
        {
            "json": [*BENCH, "--json"],
            "text": BENCH,
            "incr": [*BENCH, "--workload", "incr"],
            "cas": [*BENCH, "--workload", "cas", "--keys", "10"],
            "neither": ["bench"],
            "both": ["bench", "--local", "3", "--nodes", f"127.0.0.1:{nobody}"],
            "unreachable": ["bench", "--nodes", f"127.0.0.1:{nobody}", "--duration", "0.5", "--warmup", "0"],
        },
        timeout=60,
    )


def assert_done(result: QkvResult) -> list[str]:
    assert result.returncode == 0, result
    assert result.stderr == "", result.stderr  # no progress line unless on a terminal
    return result.stdout.decode().splitlines()


@pytest.mark.subprocess
def test_bench_local_json(runs: dict[str, QkvResult]) -> None:
    lines = assert_done(runs["json"])
    assert len(lines) == 1, lines
    report = json.loads(lines[0])
    assert_sane(report)
    assert report["cluster"] == {"local": 3, "storage": "memory"}
    samples = report["rss_kib"]
    assert len(samples) >= 2, samples
    for sample in samples:
        servers = sample["servers"]
        assert len(servers) == 3 and all(type(kib) is int and kib > 0 for kib in servers), samples
    at = [s["at_s"] for s in samples]
    assert at[0] == 0.0 and at == sorted(at), at


@pytest.mark.subprocess
def test_bench_local_text(runs: dict[str, QkvResult]) -> None:
    lines = assert_done(runs["text"])
    assert lines[0].startswith("workload: 2 clients x 2 in flight, 5000 keys (uniform)"), lines
    throughput = [line for line in lines if line.startswith("throughput:")]
    assert len(throughput) == 1 and re.search(r" ops/s \([\d,]+ ops in [\d.]+ s: ", throughput[0]), lines
    latency = [line for line in lines if line.startswith("latency ms:")]
    assert len(latency) == 1, lines
    pairs = re.findall(r"(\S+) (\d+\.\d\d)", latency[0].removeprefix("latency ms:"))
    assert [name for name, _ in pairs] == LATENCY_NAMES, latency
    values = [float(v) for _, v in pairs]
    assert values == sorted(values), latency
    assert "errors: none" in lines
    header = lines.index("server RSS KiB (from the start of the measured window):")
    rss = lines[header + 1 :]
    assert len(rss) >= 2, lines
    assert all(re.fullmatch(r" +\d+\.\d s  \[[1-9]\d*, [1-9]\d*, [1-9]\d*\]", line) for line in rss), rss


@pytest.mark.subprocess
@pytest.mark.parametrize("name", ["neither", "both"])
def test_bench_needs_exactly_one_of_nodes_and_local(runs: dict[str, QkvResult], name: str) -> None:
    result = runs[name]
    assert result.returncode == 2, result
    assert result.stdout == b""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("qkv: ") and "--local" in lines[0] and "--nodes" in lines[0], lines


@pytest.mark.subprocess
def test_bench_against_an_unreachable_node_says_so_in_one_line(runs: dict[str, QkvResult]) -> None:
    result = runs["unreachable"]
    assert (result.returncode, len(result.stderr.splitlines())) == (3, 1), result
    assert "Traceback" not in result.stderr


def latency_line(lines: list[str]) -> None:
    latency = [line for line in lines if line.startswith("latency ms:")]
    assert len(latency) == 1, lines
    pairs = re.findall(r"(\S+) (\d+\.\d\d)", latency[0].removeprefix("latency ms:"))
    assert [name for name, _ in pairs] == LATENCY_NAMES, latency


@pytest.mark.subprocess
def test_bench_incr_workload(runs: dict[str, QkvResult]) -> None:
    lines = assert_done(runs["incr"])
    assert lines[0] == "workload: 2 clients x 2 in flight, 5000 keys (uniform), incr by 1", lines
    throughput = next(line for line in lines if line.startswith("throughput:"))
    assert re.search(r" ops/s \([\d,]+ ops in [\d.]+ s: [\d,]+ incrs\)$", throughput), throughput
    latency_line(lines)
    assert "errors: none" in lines


@pytest.mark.subprocess
def test_bench_cas_workload(runs: dict[str, QkvResult]) -> None:
    lines = assert_done(runs["cas"])
    assert lines[0] == (
        "workload: 2 clients x 2 in flight, 10 keys (uniform), read-free cas loops, 100 B values"
    ), lines
    throughput = next(line for line in lines if line.startswith("throughput:"))
    counts = re.search(
        r" ops/s \(([\d,]+) ops in [\d.]+ s: "
        r"([\d,]+) cas: ([\d,]+) swapped, ([\d,]+) not swapped \(\d+\.\d%\)\)$",
        throughput,
    )
    assert counts, throughput
    ops, tried, swapped, missed = (int(g.replace(",", "")) for g in counts.groups())
    assert ops == tried == swapped + missed and swapped > 0, throughput
    latency_line(lines)
    assert "errors: none" in lines
