"""The atomic commands of RESP: ``SET`` with ``NX``/``XX``/``GET``,
``SETNX``, ``GETSET``, ``GETDEL``, ``INCR``, ``DECR``, ``INCRBY``,
``DECRBY``, and ``DEL`` as one atomic step per key.

Two back ends:

- a model of the node (``ModelNode``): the native requests exactly as the
  wire protocol defines them, on a dict, with hooks that play another
  client changing the key between a command's read and its cas. It checks
  what RESP sends (one fresh rid per cas and incr, the loops and their
  bound) whatever the state of the real core;
- a real 3-node cluster in this process, through redis-py (RESP2 and
  RESP3), raw bytes (exact replies and error texts), ``redis-cli`` and
  ``redis-benchmark``, with concurrent clients on one key through
  different nodes.
"""

from __future__ import annotations

import csv
import io
import itertools
import re
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from types import SimpleNamespace
from typing import Any, TypeVar

import hiredis
import pytest
import redis
import trio
import trio.lowlevel

from net.address import Address
from net.messages import (
    Cas,
    CasReply,
    Delete,
    ErrorReply,
    Get,
    GetReply,
    Incr,
    IncrReply,
    Reply,
    Request,
    Set,
    WriteReply,
)
from net.resp import serve_resp
from net.resp.native import RID_BYTES
from net.server import ServerLimits
from quorum.cluster import LocalCluster, open_cluster
from register.model import Key, NodeId, Tag

T = TypeVar("T")

MAX_VALUE = 64 * 1024
MAX_FRAME = 256 * 1024
MIN_INT64 = -(2**63)
MAX_INT64 = 2**63 - 1
REDIS_CLI = shutil.which("redis-cli")
REDIS_BENCHMARK = shutil.which("redis-benchmark")
NO_TOOLS = "not installed (Debian's redis-tools; scripts/test.sh installs it when it can)"
needs_redis_cli = pytest.mark.skipif(REDIS_CLI is None, reason=f"redis-cli {NO_TOOLS}")
needs_redis_benchmark = pytest.mark.skipif(REDIS_BENCHMARK is None, reason=f"redis-benchmark {NO_TOOLS}")

NOT_AN_INTEGER = "ERR value is not an integer or out of range"
OVERFLOW = "ERR increment or decrement would overflow"


# --- a model of the node ----------------------------------------------------------------


_CANONICAL = re.compile(rb"0|-?[1-9][0-9]*")


def _counter(value: bytes | None) -> int | None:
    """What the protocol's incr takes: not found is 0, else a canonical
    signed 64-bit decimal; ``None`` for anything else."""
    if value is None:
        return 0
    if len(value) > 20 or _CANONICAL.fullmatch(value) is None:
        return None
    number = int(value)
    return number if MIN_INT64 <= number <= MAX_INT64 else None


class ModelNode:
    """What ``serve_resp`` needs of a node, answering the native requests
    as the wire protocol defines them, one at a time, on a dict.

    ``before_cas(request)`` runs before a cas is evaluated: a test plays
    another client there. ``cas_error``, when set, is the reply of every
    cas. A rid used again with other arguments is ``bad_request``, as the
    protocol says."""

    id = "m1"
    state = "serving"
    resp_address: Address | None = None

    def __init__(self, request_timeout: float = 0.5) -> None:
        self.config = SimpleNamespace(
            cluster_size=1, max_value=MAX_VALUE, max_connections=64, request_timeout=request_timeout
        )
        self.replica = SimpleNamespace(state={})
        self.data: dict[bytes, bytes] = {}
        self.requests: list[Request] = []
        self.rids: dict[bytes, Request] = {}
        self.before_cas: Callable[[Cas], object] | None = None
        self.cas_error: ErrorReply | None = None
        self.counter = itertools.count(1)

    def tag(self) -> Tag:
        return Tag(next(self.counter), NodeId(self.id))

    async def handle(self, request: Request) -> Reply:
        await trio.lowlevel.checkpoint()
        self.requests.append(request)
        rid = getattr(request, "rid", None)
        if rid is not None and self.rids.setdefault(rid, request) != request:
            return ErrorReply(id=request.id, error="bad_request", message="rid used for another request")
        match request:
            case Get(key=key):
                value = self.data.get(key)
                return GetReply(id=request.id, found=value is not None, value=value, tag=None)
            case Set(key=key, value=value):
                self.data[key] = value
                return WriteReply(id=request.id, tag=self.tag())
            case Delete(key=key):
                self.data.pop(key, None)
                return WriteReply(id=request.id, tag=self.tag())
            case Cas(key=key, expect=expect, value=value):
                if self.cas_error is not None:
                    return self.cas_error
                if self.before_cas is not None:
                    self.before_cas(request)
                current = self.data.get(key)
                if current != expect:
                    return CasReply(
                        id=request.id, swapped=False, found=current is not None, value=current, tag=None
                    )
                if value is None:
                    self.data.pop(key, None)
                else:
                    self.data[key] = value
                return CasReply(
                    id=request.id, swapped=True, found=value is not None, value=value, tag=self.tag()
                )
            case Incr(key=key, by=by):
                old = _counter(self.data.get(key))
                if old is None or not MIN_INT64 <= old + by <= MAX_INT64:
                    return ErrorReply(id=request.id, error="not_integer", message="not an integer")
                self.data[key] = str(old + by).encode()
                return IncrReply(id=request.id, value=old + by, tag=self.tag())
        return ErrorReply(id=request.id, error="bad_request", message="not a client request")

    def sent(self, kind: type[Any]) -> list[Any]:
        return [r for r in self.requests if isinstance(r, kind)]


@asynccontextmanager
async def model_server(node: ModelNode) -> AsyncIterator[Address]:
    """A RESP server on a free loopback port in front of ``node``."""
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        limits = ServerLimits(max_frame=MAX_FRAME, max_value=MAX_VALUE)
        await nursery.start(serve_resp, listeners, node, limits)
        yield Address("127.0.0.1", listeners[0].socket.getsockname()[1])
        nursery.cancel_scope.cancel()


@pytest.fixture
async def model() -> AsyncIterator[tuple[ModelNode, Address]]:
    node = ModelNode()
    async with model_server(node) as address:
        yield node, address


# --- a real cluster ---------------------------------------------------------------------


@asynccontextmanager
async def atomic_cluster() -> AsyncIterator[LocalCluster]:
    """3 nodes serving RESP, once they all serve."""
    async with open_cluster(3, resp=True, request_timeout=2.0, max_value=MAX_VALUE, max_frame=MAX_FRAME) as c:
        with trio.fail_after(10):
            while not all(c.node(i).state == "serving" for i in range(3)):
                await trio.sleep(0.01)
        yield c


@pytest.fixture
async def cluster() -> AsyncIterator[LocalCluster]:
    async with atomic_cluster() as c:
        yield c


@pytest.fixture(params=["model", "cluster"])
async def addresses(request: pytest.FixtureRequest) -> AsyncIterator[list[Address]]:
    """Where to send commands: the model's one server, or the 3 nodes."""
    if request.param == "model":
        async with model_server(ModelNode()) as address:
            yield [address]
    else:
        async with atomic_cluster() as c:
            yield list(c.resp_addresses)


@pytest.fixture(params=[2, 3], ids=["resp2", "resp3"])
def protocol(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@contextmanager
def connect(address: Address, protocol: int = 3) -> Iterator[redis.Redis]:
    """A redis-py client (blocking: use it in a worker thread)."""
    client = redis.Redis(
        host=address.host, port=address.port, socket_timeout=20, socket_connect_timeout=5, protocol=protocol
    )
    try:
        yield client
    finally:
        client.close()


async def in_thread(scenario: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(scenario)


def command(*args: bytes | str) -> bytes:
    return hiredis.pack_command(tuple(a.encode() if isinstance(a, str) else a for a in args))  # type: ignore[no-any-return]


class Raw:
    """RESP connections at the byte level, replies parsed by hiredis (an
    error reply becomes its full text, code included)."""

    def __init__(self, streams: list[trio.SocketStream]) -> None:
        self.streams = streams
        self.readers = [hiredis.Reader() for _ in streams]

    @classmethod
    async def open(cls, addresses: list[Address]) -> Raw:
        return cls([await trio.open_tcp_stream(a.host, a.port) for a in addresses])

    async def ask(self, args: tuple[bytes | str, ...], via: int = 0) -> Any:
        stream, reader = self.streams[via], self.readers[via]
        await stream.send_all(command(*args))
        with trio.fail_after(20):
            while (reply := reader.gets()) is False:
                data = await stream.receive_some(65536)
                assert data, "connection closed instead of answering"
                reader.feed(data)
        return str(reply) if isinstance(reply, hiredis.ReplyError) else reply

    async def aclose(self) -> None:
        for stream in self.streams:
            await stream.aclose()


# --- the replies, exactly --------------------------------------------------------------

SEMANTICS: list[tuple[tuple[str, ...], Any]] = [
    # SET NX / XX / GET, alone and together
    (("SET", "s", "v1", "NX"), b"OK"),
    (("SET", "s", "v2", "NX"), None),
    (("GET", "s"), b"v1"),
    (("SET", "s", "v3", "XX"), b"OK"),
    (("SET", "absent", "x", "XX"), None),
    (("GET", "absent"), None),
    (("SET", "s", "v4", "GET"), b"v3"),
    (("SET", "new", "n1", "GET"), None),
    (("GET", "new"), b"n1"),
    (("SET", "s", "v5", "XX", "GET"), b"v4"),
    (("SET", "absent", "x", "XX", "GET"), None),
    (("EXISTS", "absent"), 0),
    # NX GET (Redis 7): the old value, and nothing set when there was one
    (("SET", "s", "no", "NX", "GET"), b"v5"),
    (("GET", "s"), b"v5"),
    (("SET", "nxget", "first", "GET", "NX"), None),
    (("GET", "nxget"), b"first"),
    (("set", "s", "v6", "nx", "NX"), None),
    # refused: nothing is written
    (("SET", "s", "x", "NX", "XX"), "ERR syntax error"),
    (("SET", "s", "x", "XX", "NX"), "ERR syntax error"),
    (("SET", "s", "x", "GET", "BOGUS"), "ERR syntax error"),
    (("SET", "s", "x", "NX", "EX", "10"), "ERR SET option 'EX' is not supported by qkv (no TTLs yet)"),
    (("SET", "s", "x", "keepttl", "GET"), "ERR SET option 'KEEPTTL' is not supported by qkv (no TTLs yet)"),
    (("SET", "s", "x", "PXAT", "1"), "ERR SET option 'PXAT' is not supported by qkv (no TTLs yet)"),
    (("GET", "s"), b"v5"),
    # SETNX, GETSET, GETDEL
    (("SETNX", "n", "1"), 1),
    (("SETNX", "n", "2"), 0),
    (("GET", "n"), b"1"),
    (("GETSET", "n", "2"), b"1"),
    (("GETSET", "gs", "a"), None),
    (("GET", "gs"), b"a"),
    (("GETDEL", "gs"), b"a"),
    (("GETDEL", "gs"), None),
    (("EXISTS", "gs"), 0),
    # the empty value is a value, not absence
    (("SET", "e", ""), b"OK"),
    (("SET", "e", "x", "NX"), None),
    (("GETDEL", "e"), b""),
    (("SET", "e", "", "NX", "GET"), None),
    (("GET", "e"), b""),
    # DEL: one atomic step per key, a key named twice counted once
    (("DEL", "n", "n", "e", "nope"), 2),
    (("DEL", "n"), 0),
    (("GET", "n"), None),
    # counters
    (("INCR", "c"), 1),
    (("INCR", "c"), 2),
    (("DECR", "c"), 1),
    (("INCRBY", "c", "10"), 11),
    (("DECRBY", "c", "20"), -9),
    (("INCRBY", "c", "0"), -9),
    (("DECRBY", "c", "-1"), -8),
    (("GET", "c"), b"-8"),
    (("DECR", "d"), -1),
    (("SET", "c41", "41"), b"OK"),
    (("INCR", "c41"), 42),
    (("GET", "c41"), b"42"),
    # both ends of int64
    (("SET", "max", str(MAX_INT64)), b"OK"),
    (("INCR", "max"), OVERFLOW),
    (("INCRBY", "max", "0"), MAX_INT64),
    (("DECR", "max"), MAX_INT64 - 1),
    (("INCRBY", "max", "2"), OVERFLOW),
    (("GET", "max"), str(MAX_INT64 - 1).encode()),
    (("SET", "min", str(MIN_INT64)), b"OK"),
    (("DECR", "min"), OVERFLOW),
    (("INCRBY", "min", "-1"), OVERFLOW),
    (("DECRBY", "min", "1"), OVERFLOW),
    (("INCRBY", "min", str(MAX_INT64)), -1),
    (("INCRBY", "lo", str(MIN_INT64)), MIN_INT64),
    (("DECRBY", "hi", str(-MAX_INT64)), MAX_INT64),
    (("DECRBY", "hi", str(MIN_INT64)), "ERR decrement would overflow"),
    (("DECRBY", "zero", str(MIN_INT64)), "ERR decrement would overflow"),
    (("GET", "zero"), None),
    # amounts that are not signed 64-bit decimals
    *[
        (("INCRBY", "x", amount), NOT_AN_INTEGER)
        for amount in (
            str(MAX_INT64 + 1),
            str(MIN_INT64 - 1),
            "abc",
            "1.5",
            " 1",
            "+1",
            "01",
            "-0",
            "",
            "1e3",
        )
    ],
    (("DECRBY", "x", "ten"), NOT_AN_INTEGER),
    (("EXISTS", "x"), 0),
    # arity, as Redis says it
    (("INCR",), "ERR wrong number of arguments for 'incr' command"),
    (("DECR", "a", "b"), "ERR wrong number of arguments for 'decr' command"),
    (("INCRBY", "k"), "ERR wrong number of arguments for 'incrby' command"),
    (("DECRBY", "k", "1", "2"), "ERR wrong number of arguments for 'decrby' command"),
    (("SETNX", "k"), "ERR wrong number of arguments for 'setnx' command"),
    (("GETSET", "k"), "ERR wrong number of arguments for 'getset' command"),
    (("GETDEL",), "ERR wrong number of arguments for 'getdel' command"),
    (("SETNX", "", "v"), "ERR qkv keys are 1 to 1024 bytes, not 0"),
    (("INCR", "k" * 1025), "ERR qkv keys are 1 to 1024 bytes, not 1025"),
]

NOT_INTEGERS = ["abc", "", " 1", "1 ", "01", "-0", "+1", "1.0", "1e3", "9" * 20, str(MAX_INT64 + 1), "\x00"]


async def test_atomic_commands_reply_as_redis(addresses: list[Address]) -> None:
    """Every command of the table, one after the other, each through the
    next node: the replies and error texts, exactly."""
    raw = await Raw.open(addresses)
    try:
        got = [await raw.ask(args, via=i % len(addresses)) for i, (args, _) in enumerate(SEMANTICS)]
    finally:
        await raw.aclose()
    assert got == [expected for _, expected in SEMANTICS]


async def test_incr_refuses_values_that_are_not_integers_and_changes_nothing(
    addresses: list[Address],
) -> None:
    raw = await Raw.open(addresses)
    try:
        for i, bad in enumerate(NOT_INTEGERS):
            key = f"bad{i}"
            assert await raw.ask(("SET", key, bad)) == b"OK"
            for args in [("INCR", key), ("DECR", key), ("INCRBY", key, "5"), ("DECRBY", key, "-5")]:
                assert await raw.ask(args, via=i % len(addresses)) == NOT_AN_INTEGER, (bad, args)
            assert await raw.ask(("GET", key), via=(i + 1) % len(addresses)) == bad.encode()
    finally:
        await raw.aclose()


# --- against the model: what RESP sends -------------------------------------------------


async def test_each_cas_and_incr_has_a_fresh_rid_and_plain_writes_none(
    model: tuple[ModelNode, Address],
) -> None:
    node, address = model
    raw = await Raw.open([address])
    try:
        for args, _ in SEMANTICS:
            await raw.ask(args)
    finally:
        await raw.aclose()
    atomic = node.sent(Cas) + node.sent(Incr)
    assert len(atomic) > 30
    rids = [r.rid for r in atomic]
    assert all(isinstance(rid, bytes) and len(rid) == RID_BYTES for rid in rids)
    assert len(set(rids)) == len(rids), "a rid belongs to one request"
    assert all(r.rid is None for r in node.sent(Set) + node.sent(Delete))


async def test_set_nx_and_setnx_send_one_cas_and_no_read(model: tuple[ModelNode, Address]) -> None:
    node, address = model
    raw = await Raw.open([address])
    try:
        assert await raw.ask(("SET", "k", "a", "NX")) == b"OK"
        assert await raw.ask(("SETNX", "k", "b")) == 0
        assert await raw.ask(("SET", "k", "c", "NX", "GET")) == b"a"
    finally:
        await raw.aclose()
    assert [type(r) for r in node.requests] == [Cas, Cas, Cas]
    assert [r.expect for r in node.sent(Cas)] == [None, None, None]


async def test_a_value_changed_under_the_command_is_retried_and_the_old_value_is_the_replaced_one(
    model: tuple[ModelNode, Address],
) -> None:
    """Another client writes the key between GETSET's read and each of its
    first three cas: GETSET answers the value its cas replaced."""
    node, address = model
    node.data[b"k"] = b"start"
    others = iter([b"other1", b"other2", b"other3"])

    def another_client(request: Cas) -> None:
        if request.value == b"mine" and (value := next(others, None)) is not None:
            node.data[b"k"] = value

    node.before_cas = another_client
    raw = await Raw.open([address])
    try:
        assert await raw.ask(("GETSET", "k", "mine")) == b"other3"
        assert node.data[b"k"] == b"mine"
        cas = node.sent(Cas)
        assert [c.expect for c in cas] == [b"start", b"other1", b"other2", b"other3"]
        # SET XX: the key deleted by another client before the cas is not set.
        node.before_cas = lambda request: node.data.pop(b"k", None)
        assert await raw.ask(("SET", "k", "again", "XX")) is None
        assert b"k" not in node.data
        # DEL and GETDEL: the key deleted under them was not deleted by them.
        for args, expected in [(("DEL", "k"), 0), (("GETDEL", "k"), None)]:
            node.data[b"k"] = b"v"
            assert await raw.ask(args) == expected
            assert b"k" not in node.data
    finally:
        await raw.aclose()


async def test_a_key_that_never_stops_changing_gives_tryagain_and_nothing_written(
    model: tuple[ModelNode, Address],
) -> None:
    """Another client changes the key before every cas: after the request
    deadline (0.5 s here) of attempts, TRYAGAIN, and nothing written."""
    node, address = model
    values = (b"other%d" % i for i in itertools.count())

    def another_client(request: Cas) -> None:
        node.data[b"k"] = next(values)

    node.before_cas = another_client
    node.data[b"k"] = b"start"
    raw = await Raw.open([address])
    try:
        started = time.monotonic()
        reply = await raw.ask(("SET", "k", "mine", "XX"))
        assert reply.startswith("TRYAGAIN ") and reply.endswith("nothing was done")
        assert 0.5 <= time.monotonic() - started < 10
        assert len(node.sent(Cas)) > 1
        assert node.data[b"k"].startswith(b"other")
        # The connection goes on.
        node.before_cas = None
        current = node.data[b"k"]
        assert await raw.ask(("SET", "k", "mine", "XX", "GET")) == current
        assert node.data[b"k"] == b"mine"
    finally:
        await raw.aclose()


async def test_an_unknown_outcome_is_said_and_not_retried(model: tuple[ModelNode, Address]) -> None:
    node, address = model
    node.cas_error = ErrorReply(id=0, error="unavailable", message="no majority answered within 2.0 s")
    raw = await Raw.open([address])
    try:
        assert await raw.ask(("GETSET", "k", "v")) == (
            "UNAVAILABLE no majority answered within 2.0 s (the write may or may not have taken effect)"
        )
        assert len(node.sent(Cas)) == 1
    finally:
        await raw.aclose()


async def test_command_table_knows_the_atomic_commands(model: tuple[ModelNode, Address]) -> None:
    _, address = model

    def scenario() -> dict[str, Any]:
        with connect(address) as r:
            table: dict[str, Any] = r.command()
            assert r.command_count() == len(table)
            return table

    table = await in_thread(scenario)
    for name, arity in [
        ("setnx", 3),
        ("getset", 3),
        ("getdel", 2),
        ("incr", 2),
        ("decr", 2),
        ("incrby", 3),
        ("decrby", 3),
    ]:
        assert table[name]["arity"] == arity
        assert "write" in table[name]["flags"]
        assert (table[name]["first_key_pos"], table[name]["last_key_pos"]) == (1, 1)


# --- redis-py and redis-cli against the cluster -----------------------------------------


async def test_redis_py_atomic_commands_through_different_nodes(cluster: LocalCluster, protocol: int) -> None:
    a, b, c = cluster.resp_addresses

    def scenario() -> None:
        with connect(a, protocol) as r0, connect(b, protocol) as r1, connect(c, protocol) as r2:
            assert r0.set("k", "v1", nx=True) is True
            assert r1.set("k", "v2", nx=True) is None
            assert r2.get("k") == b"v1"
            assert r2.set("k", "v3", xx=True) is True
            assert r0.set("nope", "x", xx=True) is None
            assert r1.set("k", "v4", get=True) == b"v3"
            assert r2.set("k", "v5", xx=True, get=True) == b"v4"
            assert r0.set("k", "v6", nx=True, get=True) == b"v5"
            assert r1.get("k") == b"v5"
            assert r2.setnx("n", "1") is True
            assert r0.setnx("n", "2") is False
            assert r1.getset("n", "3") == b"1"
            assert r2.getdel("n") == b"3"
            assert r0.getdel("n") is None
            assert r1.execute_command("INCR", "c") == 1
            assert r2.execute_command("DECR", "c") == 0
            assert r0.incrby("c", 10) == 10  # redis-py sends INCRBY for incr/incrby
            assert r1.decrby("c", 3) == 7
            assert r2.incr("c") == 8
            assert r0.get("c") == b"8"
            r1.set("max", str(MAX_INT64))
            with pytest.raises(redis.ResponseError) as info:
                r2.incr("max")
            assert str(info.value) == OVERFLOW.removeprefix("ERR ")
            with pytest.raises(redis.ResponseError) as info:
                r0.incr("k")
            assert str(info.value) == NOT_AN_INTEGER.removeprefix("ERR ")
            with pytest.raises(redis.ResponseError) as info:
                r1.decrby("c", MIN_INT64)
            assert str(info.value) == "decrement would overflow"
            assert r2.delete("k", "c", "max", "nope") == 3

    await in_thread(scenario)
    async with cluster.client([1]) as client:
        assert (await client.get(b"k")).found is False


async def test_pipelined_atomic_commands_on_one_key_take_effect_in_order(cluster: LocalCluster) -> None:
    def scenario() -> list[Any]:
        with connect(cluster.resp_addresses[0]) as r:
            pipe = r.pipeline(transaction=False)
            for _ in range(20):
                pipe.execute_command("INCR", "p")
            pipe.getset("p", "x")
            pipe.set("p", "y", get=True)
            pipe.getdel("p")
            pipe.setnx("p", "z")
            pipe.get("p")
            return pipe.execute()

    assert await in_thread(scenario) == [*range(1, 21), b"20", b"x", b"y", True, b"z"]


async def run_tool(*args: str, within: float = 60.0) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(within):
        return await trio.run_process(
            list(args), capture_stdout=True, capture_stderr=True, check=False, stdin=subprocess.DEVNULL
        )


@needs_redis_cli
async def test_redis_cli_atomic_commands_through_different_nodes(cluster: LocalCluster) -> None:
    assert REDIS_CLI is not None
    ports = [str(a.port) for a in cluster.resp_addresses]
    calls = itertools.count()

    async def cli(*args: str) -> str:
        done = await run_tool(REDIS_CLI, "-h", "127.0.0.1", "-p", ports[next(calls) % 3], *args)
        assert done.returncode == 0 and done.stderr == b"", done
        return done.stdout.decode()

    assert await cli("SET", "k", "v", "NX") == "OK\n"
    assert await cli("SET", "k", "w", "NX") == "\n"
    assert await cli("SET", "k", "w", "XX", "GET") == "v\n"
    assert await cli("SET", "k", "x", "GET") == "w\n"
    assert await cli("SET", "nope", "x", "XX") == "\n"
    assert await cli("SETNX", "k", "y") == "0\n"
    assert await cli("GETSET", "k", "z") == "x\n"
    assert await cli("GETDEL", "k") == "z\n"
    assert await cli("GETDEL", "k") == "\n"
    assert await cli("SETNX", "k", "10") == "1\n"
    assert await cli("INCR", "k") == "11\n"
    assert await cli("DECR", "k") == "10\n"
    assert await cli("INCRBY", "k", "-20") == "-10\n"
    assert await cli("DECRBY", "k", "5") == "-15\n"
    assert await cli("GET", "k") == "-15\n"
    assert await cli("SET", "k", str(MIN_INT64)) == "OK\n"
    assert await cli("DECR", "k") == f"{OVERFLOW}\n\n"
    assert await cli("SET", "k", "one") == "OK\n"
    assert await cli("INCR", "k") == f"{NOT_AN_INTEGER}\n\n"
    assert await cli("DECRBY", "k", str(MIN_INT64)) == "ERR decrement would overflow\n\n"
    assert await cli("SET", "k", "v", "NX", "XX") == "ERR syntax error\n\n"
    assert await cli("DEL", "k", "k", "nope") == "1\n"
    table = await cli("COMMAND")
    assert all(name in table for name in ("setnx", "getset", "getdel", "incrby", "decrby"))


# --- many clients at once -------------------------------------------------------------


@needs_redis_benchmark
@pytest.mark.parametrize("keys", [1, 100], ids=["one-key", "100-keys"])
async def test_redis_benchmark_incr_runs_clean_and_the_counters_add_up(
    cluster: LocalCluster, keys: int
) -> None:
    assert REDIS_BENCHMARK is not None
    requests = 2000
    spread = ["-r", str(keys)] if keys > 1 else []
    port = str(cluster.resp_addresses[0].port)
    done = await run_tool(
        REDIS_BENCHMARK,
        *("-h", "127.0.0.1", "-p", port, "-t", "incr", "-n", str(requests), "-c", "20", "--csv", *spread),
        within=100,
    )
    out, err = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, (out, err)
    assert "WARNING" not in out + err and "rror" not in out + err, (out, err)
    rows = [row for row in csv.reader(io.StringIO(out)) if row and row[0] == "INCR"]
    assert len(rows) == 1 and float(rows[0][1]) > 0, out
    print(f"redis-benchmark -t incr -c 20 ({keys} keys), 3-node cluster: {float(rows[0][1]):.0f}/s")
    # Read back through the native protocol, from another node.
    names = [b"counter:__rand_int__"] if keys == 1 else [b"counter:%012d" % i for i in range(keys)]
    total = 0
    async with cluster.client([1]) as client:
        for name in names:
            value = (await client.get(Key(name))).value
            total += int(value or b"0")
    assert total == requests


async def from_many(cluster: LocalCluster, clients: int, work: Callable[[redis.Redis, int], T]) -> list[T]:
    """``work(client, i)`` run by ``clients`` redis-py clients at once, client
    ``i`` connected to node ``i % 3``; their results."""
    results: list[T] = []

    async def run(i: int) -> None:
        def scenario() -> T:
            with connect(cluster.resp_addresses[i % 3], protocol=2) as r:
                return work(r, i)

        results.append(await in_thread(scenario))

    async with trio.open_nursery() as nursery:
        for i in range(clients):
            nursery.start_soon(run, i)
    return results


async def through(cluster: LocalCluster, node: int, work: Callable[[redis.Redis], T]) -> T:
    def scenario() -> T:
        with connect(cluster.resp_addresses[node]) as r:
            return work(r)

    return await in_thread(scenario)


def setter(key: str, value: bytes) -> Callable[[redis.Redis], Any]:
    return lambda r: r.set(key, value)


async def test_concurrent_incr_from_many_clients_through_different_nodes_adds_up(
    cluster: LocalCluster,
) -> None:
    """Twelve redis-py clients, four per node, 40 INCR each on one key:
    every INCR answers a different value, and together they are exactly
    1..480 (each INCR took effect once, at one instant)."""
    clients, each = 12, 40
    results = await from_many(
        cluster, clients, lambda r, i: [r.execute_command("INCR", "hot") for _ in range(each)]
    )
    answers = sorted(v for result in results for v in result)
    assert answers == list(range(1, clients * each + 1))
    for result in results:
        assert result == sorted(result), "one client's INCRs take effect in the order it sent them"
    async with cluster.client([2]) as client:
        assert (await client.get(b"hot")).value == str(clients * each).encode()


async def test_concurrent_getset_setnx_getdel_del_are_atomic(cluster: LocalCluster) -> None:
    """Nine clients through the three nodes at once, on one key each time:
    GETSET hands every value it replaced to exactly one caller; of many
    SETNX exactly one wins; of many GETDEL, or DEL, of one value exactly
    one gets it."""
    clients, each = 9, 10

    # GETSET: the old values returned, plus the value left at the end, are
    # the first value and every value written, each exactly once.
    await through(cluster, 0, lambda r: r.set("gs", "initial"))
    results = await from_many(
        cluster, clients, lambda r, i: [r.getset("gs", f"{i}:{j}") for j in range(each)]
    )
    last = await through(cluster, 1, lambda r: r.get("gs"))
    written = Counter([b"initial"] + [f"{i}:{j}".encode() for i in range(clients) for j in range(each)])
    assert Counter([*(old for result in results for old in result), last]) == written

    # SETNX: one winner, whose value the key holds.
    winners = [
        i for i, won in await from_many(cluster, clients, lambda r, i: (i, r.setnx("nx", f"w{i}"))) if won
    ]
    assert len(winners) == 1
    assert await through(cluster, 2, lambda r: r.get("nx")) == f"w{winners[0]}".encode()

    # GETDEL and DEL of one value, six rounds: exactly one caller gets it.
    for round_ in range(6):
        value = f"round{round_}".encode()
        await through(cluster, round_ % 3, setter("gd", value))
        if round_ % 2:
            counts = await from_many(cluster, clients, lambda r, i: r.delete("gd"))
            assert sorted(counts) == [0] * (clients - 1) + [1]
        else:
            got = await from_many(cluster, clients, lambda r, i: r.getdel("gd"))
            assert Counter(got) == Counter({None: clients - 1, value: 1})
        assert await through(cluster, (round_ + 1) % 3, lambda r: r.exists("gd")) == 0
