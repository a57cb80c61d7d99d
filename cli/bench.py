"""``qkv bench``: load over the native protocol, with latency percentiles.

Closed loop by default: ``clients`` connections, each with ``pipeline``
requests in flight, each sent as soon as the previous one is answered.
With ``--rate`` the load is open loop: requests are due at fixed intervals
and latency counts from the time a request was *due*, not sent, so a
stalled server cannot hide its stall by slowing the load down (coordinated
omission).

Three workloads (``--workload``):

``mixed`` (the default)
    gets and sets of ``key...`` keys, ``--read-ratio`` of them gets.
``incr``
    ``incr`` by 1 of ``counter...`` keys: a counter per key.
``cas``
    read-free compare-and-set loops on ``cas...`` keys: each cas expects
    the value the last reply about that key showed (absent at first) and
    writes a new distinct value; one that did not swap needs no get, as
    its reply carries the current value for the next attempt. Few keys
    (``--keys 10``) make the loops contend, and the report shows how
    many did not swap; many keys (the default 5000) measure cas alone.

Each workload has keys of its own, so that, say, an ``incr`` run after a
``mixed`` one does not meet values that are not integers.
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import click
import trio

from cli.histogram import Histogram
from net.address import Address
from net.client import Connection, open_connection
from net.errors import PeerUnavailable, QkvError
from net.messages import Cas, CasReply, Get, GetReply, Incr, IncrReply, Set, WriteReply
from register.model import Key

#: the workloads and the prefix of each one's keys
KINDS = {"mixed": "key", "incr": "counter", "cas": "cas"}


@attrs.frozen(kw_only=True)
class Workload:
    #: one of ``KINDS``
    kind: str = "mixed"
    clients: int = 16
    pipeline: int = 4
    duration: float = 10.0
    requests: int | None = None
    keys: int = 5000
    distribution: str = "uniform"
    value_size: int = 100
    read_ratio: float = 0.5
    rate: float | None = None
    warmup: float = 1.0


class KeyChooser:
    def __init__(self, count: int, distribution: str, rng: random.Random, prefix: str = "key") -> None:
        self.keys = [Key(f"{prefix}{i:08d}".encode()) for i in range(count)]
        self.rng = rng
        self.cdf: list[float] | None = None
        if distribution == "zipfian":
            weights = list(itertools.accumulate(1 / (i + 1) ** 0.99 for i in range(count)))
            self.cdf = [w / weights[-1] for w in weights]

    def next(self) -> Key:
        if self.cdf is None:
            return self.keys[self.rng.randrange(len(self.keys))]
        return self.keys[bisect.bisect_left(self.cdf, self.rng.random())]


@attrs.define
class Stats:
    histogram: Histogram = attrs.field(factory=Histogram)
    reads: int = 0
    #: sets, incrs or cas requests answered
    writes: int = 0
    #: of the cas requests, those that swapped
    swapped: int = 0
    errors: Counter[str] = attrs.field(factory=Counter)


#: seconds between two RSS samples of a local cluster's servers
RSS_SAMPLE_INTERVAL = 60.0


async def run_load(
    nodes: list[Address],
    work: Workload,
    progress: bool,
    sample_rss: Callable[[], list[int | None]] | None = None,
) -> dict[str, Any]:
    """Load ``nodes`` as ``work`` says. ``sample_rss`` (a local cluster's
    servers) is read when the measured window opens, every
    ``RSS_SAMPLE_INTERVAL`` seconds in it, and when it closes."""
    rng = random.Random(1)
    stats = Stats()
    recording = False
    chooser = KeyChooser(work.keys, work.distribution, rng, KINDS[work.kind])
    value = os.urandom(work.value_size)
    #: cas: what the last reply showed each key to hold
    known: dict[Key, bytes | None] = {}
    serial = itertools.count()

    def fresh_value() -> bytes:
        # Distinct values, so that a cas never mistakes a newer write for
        # the one it expects: at least the 8 bytes of a counter.
        return value[: max(0, work.value_size - 8)] + next(serial).to_bytes(8, "big")

    async def send(conn: Connection, key: Key) -> bool:
        """One request of the workload; True if it was a get."""
        if work.kind == "incr":
            await conn.request(Incr(id=0, key=key, by=1), IncrReply)
            return False
        if work.kind == "cas":
            reply = await conn.request(
                Cas(id=0, key=key, expect=known.get(key), value=fresh_value()), CasReply
            )
            known[key] = reply.value
            if recording and reply.swapped:
                stats.swapped += 1
            return False
        if rng.random() < work.read_ratio:
            await conn.request(Get(id=0, key=key), GetReply)
            return True
        await conn.request(Set(id=0, key=key, value=value), WriteReply)
        return False

    done = trio.Event()
    issued = 0
    started = 0.0
    tickets_send, tickets_receive = trio.open_memory_channel[float](max(1, int(work.rate or 1)) * 60)

    async def one(conn: Connection, due: float) -> None:
        nonlocal issued
        issued += 1
        key = chooser.next()
        try:
            read = await send(conn, key)
        except QkvError as exc:
            if recording:
                stats.errors[exc.code] += 1
                _count_done()
            return
        except PeerUnavailable:
            # The connection is gone (a node stopped): count it, and let
            # this worker end rather than spin on a dead connection.
            if recording:
                stats.errors["connection_lost"] += 1
                _count_done()
            raise
        if recording:
            stats.histogram.record(int((time.perf_counter() - due) * 1e6))
            if read:
                stats.reads += 1
            else:
                stats.writes += 1
        _count_done()

    def _count_done() -> None:
        # --requests counts every measured request, failed ones included,
        # so a run against a broken cluster still ends.
        if work.requests is not None and stats.reads + stats.writes + stats.errors.total() >= work.requests:
            done.set()

    workers = work.clients * work.pipeline
    lost_workers = 0

    async def worker(conn: Connection) -> None:
        nonlocal lost_workers
        try:
            if work.rate is None:
                while True:
                    await one(conn, time.perf_counter())
            else:
                async for due in tickets_receive:
                    await trio.sleep_until(trio.current_time() + max(0.0, due - time.perf_counter()))
                    await one(conn, due)
        except PeerUnavailable:
            # Counted by one() when measuring: this worker's connection is gone.
            lost_workers += 1
            if lost_workers == workers:
                done.set()  # every connection is gone: nothing more will happen

    async def dispatcher() -> None:
        assert work.rate is not None
        interval = 1 / work.rate
        due = time.perf_counter()
        while True:
            due += interval
            await trio.sleep(max(0.0, due - time.perf_counter()))
            await tickets_send.send(due)

    rss_samples: list[tuple[float, list[int | None]]] = []

    async def sample_memory() -> None:
        assert sample_rss is not None
        while True:
            rss_samples.append((round(time.perf_counter() - started, 1), sample_rss()))
            await trio.sleep(RSS_SAMPLE_INTERVAL)

    async def show_progress() -> None:
        last = 0
        while True:
            await trio.sleep(1)
            count = stats.reads + stats.writes
            elapsed = time.perf_counter() - started if recording else 0.0
            p99 = stats.histogram.percentile(99) / 1000
            phase = "measuring" if recording else "warming up"
            sys.stderr.write(
                f"\r{phase}: {elapsed:5.1f}/{work.duration:g} s  {count - last:8,d} ops/s  "
                f"p99 {p99:7.2f} ms  errors {sum(stats.errors.values())}   "
            )
            sys.stderr.flush()
            last = count

    async with trio.open_nursery() as held:
        connections: list[Connection] = []
        for i in range(work.clients):
            address = nodes[i % len(nodes)]
            connections.append(await held.start(_hold_connection, address))
        # The load runs in a nursery of its own, cancelled before the
        # connections close: no request may start on a closing connection.
        async with trio.open_nursery() as nursery:
            for conn in connections:
                for _ in range(work.pipeline):
                    nursery.start_soon(worker, conn)
            if work.rate is not None:
                nursery.start_soon(dispatcher)
            if progress:
                nursery.start_soon(show_progress)
            await trio.sleep(work.warmup)
            recording = True
            started = time.perf_counter()
            if sample_rss is not None:
                nursery.start_soon(sample_memory)
            if work.requests is None:
                with trio.move_on_after(work.duration):
                    await done.wait()
            else:
                await done.wait()
            elapsed = time.perf_counter() - started
            recording = False
            if sample_rss is not None:
                rss_samples.append((round(elapsed, 1), sample_rss()))
            nursery.cancel_scope.cancel()
        held.cancel_scope.cancel()
    if progress:
        sys.stderr.write("\n")
    if lost_workers == workers:
        raise PeerUnavailable("every connection to the cluster was lost")
    h = stats.histogram
    ops = stats.reads + stats.writes
    report: dict[str, Any] = {
        "workload": work.kind,
        "ops": ops,
        "reads": stats.reads,
        "writes": stats.writes,
        "seconds": round(elapsed, 3),
        "ops_per_s": round(ops / elapsed, 1) if elapsed else 0.0,
        "latency_ms": {
            name: h.percentile(p) / 1000
            for name, p in (("p50", 50), ("p90", 90), ("p99", 99), ("p99.9", 99.9))
        }
        | {"max": h.max / 1000},
        "errors": dict(stats.errors),
        "issued": issued,
    }
    if work.kind == "cas":
        report |= {"swapped": stats.swapped, "not_swapped": stats.writes - stats.swapped}
    if sample_rss:
        report["rss_kib"] = [{"at_s": at, "servers": kib} for at, kib in rss_samples]
    return report


async def _hold_connection(address: Address, *, task_status: trio.TaskStatus[Connection]) -> None:
    async with open_connection(address) as conn:
        task_status.started(conn)
        await trio.sleep_forever()


# --- a local cluster of qkv processes ------------------------------------------------


def _free_ports(count: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


@contextmanager
def local_cluster(
    size: int, storage: str, data_dir: Path | None
) -> Iterator[tuple[list[Address], list[int]]]:
    """Start ``size`` ``qkv serve`` processes on free loopback ports (data
    and logs in a temporary directory unless ``data_dir`` is given; it is
    removed after a run that went well, kept for its logs otherwise)."""
    ports = _free_ports(size)
    temporary = data_dir is None
    root = Path(tempfile.mkdtemp(prefix="qkv-bench-")) if data_dir is None else data_dir
    qkv = Path(sys.executable).parent / "qkv"
    command = [str(qkv)] if qkv.exists() else [sys.executable, "-m", "cli"]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i, port in enumerate(ports):
            peers = [f"--peer=n{j + 1}=127.0.0.1:{p}" for j, p in enumerate(ports) if j != i]
            log = open(root / f"n{i + 1}.log", "ab")  # noqa: SIM115 - closed with the process
            procs.append(
                subprocess.Popen(
                    [
                        *command,
                        "serve",
                        f"--id=n{i + 1}",
                        f"--listen=127.0.0.1:{port}",
                        *peers,
                        f"--data-dir={root / f'n{i + 1}'}",
                        f"--storage={storage}",
                        "--log-level=warning",
                    ],
                    stdout=log,
                    stderr=log,
                    stdin=subprocess.DEVNULL,
                )
            )
            log.close()
        addresses = [Address("127.0.0.1", p) for p in ports]
        trio.run(_wait_serving, addresses)
        yield addresses, [p.pid for p in procs]
    except BaseException:
        if temporary:
            print(f"qkv bench: server logs kept in {root}", file=sys.stderr)
        temporary = False
        raise
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if temporary:
            shutil.rmtree(root, ignore_errors=True)


async def _wait_serving(addresses: list[Address]) -> None:
    from cli.status import ping_all

    with trio.fail_after(30):
        while True:
            states = await ping_all(addresses, 1.0)
            if all(s.state == "serving" for s in states):
                return
            await trio.sleep(0.1)


class BenchError(Exception):
    """The cluster could not be loaded (a node unreachable or gone)."""


def run_bench(
    nodes: list[Address] | None, local: int | None, storage: str, work: Workload, as_json: bool
) -> dict[str, Any]:
    try:
        return _run_bench(nodes, local, storage, work, as_json)
    except* PeerUnavailable as group:
        raise BenchError(str(group.exceptions[0])) from None


def _run_bench(
    nodes: list[Address] | None, local: int | None, storage: str, work: Workload, as_json: bool
) -> dict[str, Any]:
    progress = sys.stderr.isatty() and not as_json
    if local is None:
        assert nodes is not None
        report = trio.run(run_load, nodes, work, progress)
        report["cluster"] = {"nodes": [str(a) for a in nodes]}
        return report
    with local_cluster(local, storage, None) as (addresses, pids):
        report = trio.run(run_load, addresses, work, progress, lambda: [_rss_kib(pid) for pid in pids])
    report["cluster"] = {"local": local, "storage": storage}
    return report


def format_report(report: dict[str, Any], work: Workload) -> str:
    lat = report["latency_ms"]
    mode = (
        f"open loop at {work.rate:g}/s"
        if work.rate
        else f"{work.clients} clients x {work.pipeline} in flight"
    )
    keys = f"{work.keys} keys ({work.distribution})"
    if work.kind == "incr":
        what, counts = "incr by 1", f"{report['writes']:,} incrs"
    elif work.kind == "cas":
        what = f"read-free cas loops, {max(work.value_size, 8)} B values"
        tried = report["writes"]
        conflicts = f" ({report['not_swapped'] / tried:.1%})" if tried else ""
        counts = (
            f"{tried:,} cas: {report['swapped']:,} swapped, {report['not_swapped']:,} not swapped{conflicts}"
        )
    else:
        what = f"{work.value_size} B values, {work.read_ratio:.0%} reads"
        counts = f"{report['reads']:,} gets, {report['writes']:,} sets"
    lines = [
        f"workload: {mode}, {keys}, {what}",
        f"throughput: {report['ops_per_s']:,.0f} ops/s ({report['ops']:,} ops in {report['seconds']} s: "
        f"{counts})",
        "latency ms: " + "  ".join(f"{k} {v:.2f}" for k, v in lat.items()),
        f"errors: {report['errors'] or 'none'}",
    ]
    samples = report.get("rss_kib")
    if samples:
        # The window's first and last samples, and any in between.
        lines.append("server RSS KiB (from the start of the measured window):")
        lines.extend(f"  {sample['at_s']:7.1f} s  {sample['servers']}" for sample in samples)
    return "\n".join(lines)


def emit(report: dict[str, Any], work: Workload, as_json: bool) -> None:
    click.echo(json.dumps(report) if as_json else format_report(report, work))
