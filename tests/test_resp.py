"""The Redis protocol (RESP2 and RESP3) of a node: the PyPI ``redis``
client against an in-process 3-node cluster, raw bytes (bad input, slow
readers, the connection cap), the real ``redis-cli`` and
``redis-benchmark``, and the ``--resp-listen`` flags of the command line.
The parser alone is in ``test_resp_parser.py``, the atomic commands (``SET
... NX/XX/GET``, ``INCR`` and the like) in ``test_resp_atomic.py``.

redis-py's client is blocking: each scenario runs in a worker thread
(``trio.to_thread.run_sync``) while the cluster runs on the test's trio loop.
Replies read as raw bytes are parsed with hiredis's ``Reader``, a reply
parser independent of the server's code.
"""

from __future__ import annotations

import csv
import io
import itertools
import os
import pty
import random
import select
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import hiredis
import pytest
import redis
import trio

from net.address import Address
from net.resp import serve_resp
from net.server import ServerLimits
from quorum.cluster import LocalCluster, open_cluster
from register.model import Key
from tests.support.procs import QKV, consecutive_free_ports, free_ports, qkv_env, stop_process

T = TypeVar("T")

MAX_VALUE = 64 * 1024
MAX_FRAME = 256 * 1024
REDIS_CLI = shutil.which("redis-cli")
REDIS_BENCHMARK = shutil.which("redis-benchmark")
NO_TOOLS = (
    "not installed (Debian's redis-tools: scripts/test.sh installs it when it runs as root "
    "with apt-get; elsewhere install it by hand)"
)
needs_redis_cli = pytest.mark.skipif(REDIS_CLI is None, reason=f"redis-cli {NO_TOOLS}")
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "cluster.sh"
needs_redis_benchmark = pytest.mark.skipif(REDIS_BENCHMARK is None, reason=f"redis-benchmark {NO_TOOLS}")


# --- fixtures and helpers ---------------------------------------------------------------


@pytest.fixture
async def cluster() -> AsyncIterator[LocalCluster]:
    async with open_cluster(3, resp=True, request_timeout=2.0, max_value=MAX_VALUE, max_frame=MAX_FRAME) as c:
        with trio.fail_after(10):
            for _ in itertools.count():
                if all(c.node(i).state == "serving" for i in range(3)):
                    break
                await trio.sleep(0.01)
        yield c


@pytest.fixture(params=[2, 3], ids=["resp2", "resp3"])
def protocol(request: pytest.FixtureRequest) -> int:
    """The RESP version redis-py speaks (redis-py 8 defaults to 3)."""
    return int(request.param)


@contextmanager
def connect(address: Address, protocol: int = 3, **options: Any) -> Iterator[redis.Redis]:
    """A redis-py client (blocking: use it in a worker thread)."""
    client = redis.Redis(
        host=address.host,
        port=address.port,
        socket_timeout=10,
        socket_connect_timeout=5,
        protocol=protocol,
        **options,
    )
    try:
        yield client
    finally:
        client.close()


async def in_thread(scenario: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(scenario)


class RawResp:
    """A RESP connection at the byte level; replies parsed by hiredis."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.reader = hiredis.Reader()

    @classmethod
    async def open(cls, address: Address) -> RawResp:
        return cls(await trio.open_tcp_stream(address.host, address.port))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def reply(self, within: float = 5.0) -> Any:
        """The next reply (a ``hiredis.ReplyError`` for an error reply)."""
        with trio.fail_after(within):
            while (reply := self.reader.gets()) is False:
                data = await self.stream.receive_some(65536)
                assert data, "connection closed instead of answering"
                self.reader.feed(data)
        return reply

    async def rest(self, within: float = 5.0) -> list[Any]:
        """Every reply until the server closes the connection."""
        replies: list[Any] = []
        with trio.fail_after(within):
            while True:
                while (reply := self.reader.gets()) is not False:
                    replies.append(reply)
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""
                if not data:
                    assert not self.reader.has_data(), "the server closed in the middle of a reply"
                    return replies
                self.reader.feed(data)

    async def aclose(self) -> None:
        await self.stream.aclose()


async def bystander_ok(address: Address) -> None:
    """Another client is served normally."""
    conn = await RawResp.open(address)
    try:
        await conn.send(b"*2\r\n$4\r\nECHO\r\n$2\r\nok\r\n*1\r\n$4\r\nPING\r\n")
        assert await conn.reply() == b"ok"
        assert await conn.reply() == b"PONG"
    finally:
        await conn.aclose()


def text(reply: Any) -> Any:
    """redis-py decodes some replies and not others."""
    return reply.decode() if isinstance(reply, bytes) else reply


def ok(reply: Any) -> bool:
    """+OK, as redis-py hands it back (True for some commands)."""
    return reply is True or text(reply) == "OK"


def command(*args: bytes | str) -> bytes:
    return hiredis.pack_command(tuple(a.encode() if isinstance(a, str) else a for a in args))  # type: ignore[no-any-return]


# --- redis-py against a 3-node cluster ---------------------------------------------------


async def test_set_and_get_through_different_nodes(cluster: LocalCluster, protocol: int) -> None:
    a, b, c = cluster.resp_addresses

    def scenario() -> None:
        with connect(a, protocol) as r0, connect(b, protocol) as r1, connect(c, protocol) as r2:
            assert r0.set("greeting", "hello") is True
            assert r1.get("greeting") == b"hello"
            assert r2.set("greeting", "bonjour") is True
            assert r0.get("greeting") == b"bonjour"
            assert r1.get("never-written") is None

    await in_thread(scenario)
    # The native protocol sees the same register.
    async with cluster.client([2]) as client:
        assert (await client.get(b"greeting")).value == b"bonjour"


async def test_del_counts_the_keys_that_existed_and_exists_counts_repeats(
    cluster: LocalCluster, protocol: int
) -> None:
    a, b, _ = cluster.resp_addresses

    def scenario() -> None:
        with connect(a, protocol) as r0, connect(b, protocol) as r1:
            r0.set("k1", "1")
            r0.set("k2", "2")
            assert r1.exists("k1", "k2", "k3") == 2
            assert r1.exists("k1", "k1", "k3") == 2  # as Redis: a key named twice counts twice
            assert r1.delete("k1", "k2", "k3", "k1") == 2
            assert r0.exists("k1", "k2") == 0
            assert r0.get("k1") is None
            assert r0.delete("k1") == 0

    await in_thread(scenario)


async def test_mset_and_mget(cluster: LocalCluster, protocol: int) -> None:
    a, b, _ = cluster.resp_addresses

    def scenario() -> None:
        with connect(a, protocol) as r0, connect(b, protocol) as r1:
            assert r0.mset({"m1": "one", "m2": "two", "m3": "three"}) is True
            assert r1.mget("m1", "missing", "m3", "m1") == [b"one", None, b"three", b"one"]
            # A key named twice: the last value wins, as in Redis.
            assert ok(r0.execute_command("MSET", "m4", "first", "m4", "last"))
            assert r1.get("m4") == b"last"

    await in_thread(scenario)


async def test_binary_safe_keys_and_values(cluster: LocalCluster, protocol: int) -> None:
    a, b, _ = cluster.resp_addresses
    values = {
        b"all-bytes": bytes(range(256)),
        b"crlf": b"\r\n*1\r\n$4\r\nPING\r\n",
        b"empty": b"",
        b"nul\x00key\xff": b"\x00" * 1000,
        b"big": os.urandom(MAX_VALUE),
    }

    def scenario() -> None:
        with connect(a, protocol) as r0, connect(b, protocol) as r1:
            for key, value in values.items():
                assert r0.set(key, value) is True
            for key, value in values.items():
                assert r1.get(key) == value
            assert r1.mget(list(values)) == list(values.values())

    await in_thread(scenario)
    async with cluster.client([2]) as client:
        assert (await client.get(b"all-bytes")).value == bytes(range(256))


async def test_pipelined_batches_answer_in_order(cluster: LocalCluster, protocol: int) -> None:
    a, b, _ = cluster.resp_addresses

    def scenario() -> None:
        with connect(a, protocol) as r0, connect(b, protocol) as r1:
            pipe = r0.pipeline(transaction=False)
            for i in range(300):
                pipe.set(f"p{i}", f"v{i}")
                pipe.get(f"p{i}")  # the same key: sees the write sent before it
                pipe.echo(f"e{i}")
            replies = pipe.execute()
            assert replies == [x for i in range(300) for x in (True, f"v{i}".encode(), f"e{i}".encode())]
            assert r1.mget([f"p{i}" for i in range(300)]) == [f"v{i}".encode() for i in range(300)]

            # One key, over and over, in one pipeline: each GET sees the SET just before it.
            pipe = r1.pipeline(transaction=False)
            for i in range(50):
                pipe.set("counter", str(i))
                pipe.get("counter")
                pipe.exists("counter")
            replies = pipe.execute()
            assert replies[1::3] == [str(i).encode() for i in range(50)]
            assert replies[2::3] == [1] * 50
            pipe = r1.pipeline(transaction=False)
            pipe.delete("counter").get("counter").set("counter", "back").get("counter")
            assert pipe.execute() == [1, None, True, b"back"]

    await in_thread(scenario)


async def test_connection_and_server_commands(cluster: LocalCluster, protocol: int) -> None:
    a = cluster.resp_addresses[0]

    def scenario() -> None:
        with connect(a, protocol, client_name="tester") as r:
            assert r.ping() is True
            assert r.echo(b"\x00\r\n") == b"\x00\r\n"
            assert text(r.client_getname()) == "tester"
            assert r.client_setname("other") is True
            assert text(r.client_getname()) == "other"
            assert ok(r.execute_command("CLIENT", "SETINFO", "LIB-NAME", "x"))
            assert isinstance(r.client_id(), int)
            assert ok(r.execute_command("SELECT", "0"))
            with pytest.raises(redis.ResponseError, match="DB index is out of range"):
                r.execute_command("SELECT", "1")
            hello = r.execute_command("HELLO", str(protocol))
            if protocol == 2:
                hello = dict(zip(hello[::2], hello[1::2], strict=True))
            assert hello[b"proto"] == protocol and hello[b"server"] == b"qkv"
            with pytest.raises(redis.ResponseError, match="NOPROTO"):
                r.execute_command("HELLO", "4")
            assert r.command_count() == len(r.command()) > 10
            with pytest.raises(redis.ResponseError, match="unknown subcommand 'DOCS'"):
                r.execute_command("COMMAND", "DOCS")
            table = r.command()
            assert table["get"]["arity"] == 2 and table["mset"]["step_count"] == 2
            assert r.config_get("save") == {"save": ""}
            assert r.config_get("appendonly") == {"appendonly": "no"}
            assert r.config_get("nonexistent") == {}
            with pytest.raises(redis.ResponseError, match="not supported"):
                r.config_set("maxmemory", "1")

    await in_thread(scenario)


async def test_info_tells_version_node_cluster_and_keys(cluster: LocalCluster, protocol: int) -> None:
    a = cluster.resp_addresses[0]

    def scenario() -> dict[str, Any]:
        with connect(a, protocol) as r:
            r.mset({"i1": "x", "i2": "y", "i3": "z"})
            r.delete("i3")
            info: dict[str, Any] = r.info()
            assert r.info("server")["node_id"] == "n1"
            assert "connected_clients" in r.info("clients")
            assert "node_id" not in r.info("clients")
            return info

    info = await in_thread(scenario)
    assert info["qkv_version"] and info["redis_version"] == "7.0.0"
    assert info["node_id"] == "n1"
    assert info["cluster_size"] == 3
    # The local replica's view: the writes went through n1, which is
    # always in its own majority on a healthy loopback cluster.
    assert info["keys"] == 2
    assert info["db0"]["keys"] == 2


async def test_errors_for_unsupported_commands_and_options_keep_the_connection(
    cluster: LocalCluster, protocol: int
) -> None:
    a = cluster.resp_addresses[0]

    def scenario() -> None:
        with connect(a, protocol) as r:
            me = r.client_id()
            unknown = "unknown command 'HSET', with args beginning with: 'h' 'f' 'v'"
            with pytest.raises(redis.ResponseError, match=unknown):
                r.execute_command("HSET", "h", "f", "v")
            with pytest.raises(redis.ResponseError, match="unknown command"):
                r.execute_command("EXPIRE", "k", "10")
            for name, option in [
                ("EX", ["EX", "10"]),
                ("PX", ["PX", "10"]),
                ("EXAT", ["EXAT", "1"]),
                ("PXAT", ["PXAT", "1"]),
                ("KEEPTTL", ["KEEPTTL"]),
                ("EX", ["NX", "EX", "1"]),
            ]:
                unsupported = f"SET option '{name}' is not supported by qkv [(]no TTLs yet[)]"
                with pytest.raises(redis.ResponseError, match=unsupported):
                    r.execute_command("SET", "k", "v", *option)
            for options in (["BOGUS"], ["NX", "XX"], ["XX", "GET", "NX"]):
                with pytest.raises(redis.ResponseError, match="syntax error"):
                    r.execute_command("SET", "k", "v", *options)
            with pytest.raises(redis.ResponseError, match="wrong number of arguments for 'get' command"):
                r.execute_command("GET")
            with pytest.raises(redis.ResponseError, match="wrong number of arguments for 'mset' command"):
                r.execute_command("MSET", "a", "1", "b")
            with pytest.raises(redis.ResponseError, match="keys are 1 to 1024 bytes"):
                r.set("", "v")
            with pytest.raises(redis.ResponseError, match="keys are 1 to 1024 bytes"):
                r.get("k" * 1025)
            with pytest.raises(redis.ResponseError, match="keys are 1 to 1024 bytes"):
                r.mset({"ok": "1", "": "2"})
            # Five values of MAX_VALUE bytes are over MAX_FRAME (set in two
            # commands: one MSET of them all would be over it as well).
            r.mset({f"big{i}": "x" * MAX_VALUE for i in range(3)})
            r.mset({f"big{i}": "x" * MAX_VALUE for i in range(3, 5)})
            with pytest.raises(redis.ResponseError, match="MGET reply over the limit"):
                r.mget([f"big{i}" for i in range(5)])
            assert r.mget([f"big{i}" for i in range(3)]) == [b"x" * MAX_VALUE] * 3
            assert r.get("ok") is None, "a rejected MSET writes nothing"
            # Still the same connection, still working.
            assert r.client_id() == me
            assert r.set("k", "v") is True and r.get("k") == b"v"
            # A value over the limit: the error, then the connection closes
            # (redis-py connects again for the next command).
            with pytest.raises(redis.ResponseError, match=f"over the limit of {MAX_VALUE} bytes"):
                r.set("k", b"x" * (8 * 1024 * 1024))
            assert r.get("k") == b"v"

    await in_thread(scenario)


# --- raw bytes ---------------------------------------------------------------------------


async def test_inline_commands_as_typed_in_telnet(cluster: LocalCluster) -> None:
    conn = await RawResp.open(cluster.resp_addresses[0])
    try:
        await conn.send(b"PING\r\nping 'hi there'\r\nset greeting \"hello world\"\r\nGET greeting\n\r\n")
        assert await conn.reply() == b"PONG"
        assert await conn.reply() == b"hi there"
        assert await conn.reply() == b"OK"
        assert await conn.reply() == b"hello world"
        # Inline and multibulk mix on one connection.
        await conn.send(command("SET", "bin", b"\x00\xff") + b"get bin\r\n" + b"echo '\\x41' \"\\x41\"\r\n")
        assert await conn.reply() == b"OK"
        assert await conn.reply() == b"\x00\xff"
        reply = await conn.reply()
        assert isinstance(reply, hiredis.ReplyError) and "wrong number of arguments" in str(reply)
        # As Redis without a password (redis-py takes this for a failed log-in).
        await conn.send(b"auth secret\r\n")
        reply = await conn.reply()
        assert isinstance(reply, hiredis.ReplyError) and "without any password configured" in str(reply)
        await conn.send(b"quit\r\nPING\r\n")
        assert await conn.rest() == [b"OK"], "QUIT answers OK and closes; nothing after it runs"
    finally:
        await conn.aclose()


async def test_hello_switches_the_reply_format(cluster: LocalCluster) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", cluster.resp_addresses[0].port)
    expected = b"".join(
        [
            b"$-1\r\n",  # GET of a missing key in RESP2
            b"*2\r\n$4\r\nsave\r\n$0\r\n\r\n",  # CONFIG GET: a flat array
            b"%7\r\n$6\r\nserver\r\n$3\r\nqkv\r\n$7\r\nversion\r\n$5\r\n7.0.0\r\n$5\r\nproto\r\n:3\r\n",
            b"$2\r\nid\r\n",  # HELLO 3: a map (the id follows)
        ]
    )
    try:
        await stream.send_all(
            b"".join(
                [
                    command("GET", "nope"),
                    command("CONFIG", "GET", "save"),
                    command("HELLO", "3"),
                    command("GET", "nope"),
                    command("MGET", "a", "nope"),
                    command("CONFIG", "GET", "save"),
                    command("HELLO", "2"),
                    command("GET", "nope"),
                ]
            )
        )
        data = b""
        tail = b"_\r\n*2\r\n_\r\n_\r\n%1\r\n$4\r\nsave\r\n$0\r\n\r\n"
        with trio.fail_after(5):
            while not data.endswith(b"$-1\r\n") or tail not in data:
                data += await stream.receive_some(65536)
        assert data.startswith(expected)
        assert tail in data
        assert data.endswith(b"*14\r\n" + data.split(b"*14\r\n")[1]) and data.endswith(b"$-1\r\n")
    finally:
        await stream.aclose()


async def test_quit_after_pipelined_commands_answers_them_first(cluster: LocalCluster) -> None:
    conn = await RawResp.open(cluster.resp_addresses[1])
    try:
        await conn.send(
            command("SET", "q", "1") + command("GET", "q") + command("QUIT") + command("SET", "q", "2")
        )
        assert await conn.rest() == [b"OK", b"1", b"OK"]
    finally:
        await conn.aclose()
    async with cluster.client([0]) as client:
        assert (await client.get(b"q")).value == b"1"


BAD_INPUT = [
    pytest.param(b"*2\r\n$3\r\nGET\r\n:1\r\n", "expected '$'", id="not-a-bulk"),
    pytest.param(b"*x\r\n", "invalid multibulk length", id="bad-count"),
    pytest.param(b"*1\r\n$-5\r\n", "invalid bulk length", id="negative-bulk"),
    pytest.param(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$999999999\r\n", "over the limit", id="huge-bulk"),
    pytest.param(
        b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n" + b"$%d\r\n" % (MAX_VALUE + 1), "over the limit", id="value-too-big"
    ),
    pytest.param(b"*4294967295\r\n", "arguments are over the limit", id="huge-array"),
    pytest.param(b"*1\r\n*4294967295\r\n", "expected '$'", id="nested-array"),
    pytest.param(b"*1\r\n" + b"$" + b"9" * 100, "too big bulk count string", id="endless-header"),
    pytest.param(b"A" * (70 * 1024), "too big inline request", id="endless-inline"),
    pytest.param(b'GET "abc\r\n', "unbalanced quotes", id="unbalanced-quotes"),
    pytest.param(b"*1\r\n$4\r\nPING\r\n*2\r\n$3\r\nGET\r\n%1\r\n", "expected '$'", id="after-a-good-command"),
]


@pytest.mark.parametrize(("data", "error"), BAD_INPUT)
async def test_bad_input_gets_an_error_and_a_closed_connection(
    cluster: LocalCluster, data: bytes, error: str
) -> None:
    address = cluster.resp_addresses[0]
    bystander = await RawResp.open(address)
    conn = await RawResp.open(address)
    try:
        await conn.send(data)
        # No more bytes are sent: the error comes from what was announced.
        replies = await conn.rest()
        if data.startswith(b"*1\r\n$4\r\nPING"):
            assert replies[0] == b"PONG", "commands before the bad one are answered"
            replies = replies[1:]
        assert len(replies) == 1 and isinstance(replies[0], hiredis.ReplyError)
        assert str(replies[0]).startswith("ERR Protocol error: ") and error in str(replies[0])
        await bystander.send(command("PING"))
        assert await bystander.reply() == b"PONG"
        await bystander_ok(address)
    finally:
        await conn.aclose()
        await bystander.aclose()


async def test_a_command_over_the_size_limit_is_refused_before_it_is_read(cluster: LocalCluster) -> None:
    conn = await RawResp.open(cluster.resp_addresses[0])
    try:
        # An MSET of ten values of MAX_VALUE bytes: every bulk is allowed, the
        # whole command is not (over --max-frame). The fifth value's header
        # already says so: its body is never sent.
        head = b"*21\r\n$4\r\nMSET\r\n"
        pairs = b"".join(b"$2\r\nk%d\r\n$%d\r\n%b\r\n" % (i, MAX_VALUE, b"x" * MAX_VALUE) for i in range(4))
        await conn.send(head + pairs + b"$2\r\nk4\r\n$%d\r\n" % MAX_VALUE)
        replies = await conn.rest()
        assert len(replies) == 1 and "command of more than" in str(replies[0])
    finally:
        await conn.aclose()
    await bystander_ok(cluster.resp_addresses[0])


async def test_fuzzed_input_leaves_the_node_serving(cluster: LocalCluster) -> None:
    """Random damage to valid command streams, and random bytes: each on a
    connection of its own, eight at a time. Whatever comes back is a
    well-formed reply stream, and the node serves other clients all along."""
    address = cluster.resp_addresses[0]
    rng = random.Random(20240601)
    valid = [
        command("SET", "f", "v"),
        command("GET", "f"),
        command("MGET", "f", "g"),
        command("DEL", "g"),
        command("PING"),
        command("ECHO", b"\r\n"),
        b"PING\r\n",
        b'set f "a b"\r\n',
        command("EXISTS", "f"),
    ]
    pieces = [b"*", b"$", b"\r\n", b"-1", b"99999999999", b"\x00", b'"', b"*3\r\n"]

    def sample() -> bytes:
        data = bytearray(b"".join(rng.choice(valid) for _ in range(rng.randint(1, 6))))
        for _ in range(rng.randint(0, 4)):
            match rng.randrange(4):
                case 0 if data:
                    data[rng.randrange(len(data))] = rng.randrange(256)
                case 1 if data:
                    del data[rng.randrange(len(data)) :][: rng.randint(1, 8)]
                case 2:
                    at = rng.randint(0, len(data))
                    data[at:at] = rng.choice(pieces)
                case _:
                    data += rng.randbytes(rng.randint(1, 40))
        if rng.random() < 0.1:
            data = bytearray(rng.randbytes(rng.randint(1, 2000)))
        return bytes(data)

    async def one(data: bytes) -> None:
        conn = await RawResp.open(address)
        try:
            await conn.send(data)
            await conn.stream.send_eof()  # the server answers what is complete, then closes
            await conn.rest(within=10)
        finally:
            await conn.aclose()

    limiter = trio.CapacityLimiter(8)

    async def limited(data: bytes) -> None:
        async with limiter:
            await one(data)

    async with trio.open_nursery() as nursery:
        for _ in range(300):
            nursery.start_soon(limited, sample())
        for _ in range(5):
            await bystander_ok(address)
            await trio.sleep(0.05)
    await bystander_ok(address)
    async with cluster.client([1]) as client:
        await client.set(b"after-fuzz", b"fine")
        assert (await client.get(b"after-fuzz")).value == b"fine"


async def start_resp(nursery: trio.Nursery, cluster: LocalCluster, limits: ServerLimits) -> Address:
    """A RESP server of its own, with these limits, in front of node n1."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await nursery.start(serve_resp, listeners, cluster.node(0), limits)
    return Address("127.0.0.1", listeners[0].socket.getsockname()[1])


async def test_a_client_that_never_reads_is_disconnected_and_harms_no_one(cluster: LocalCluster) -> None:
    async with cluster.client([0]) as client:
        await client.set(b"big", os.urandom(MAX_VALUE))
    limits = ServerLimits(max_frame=MAX_FRAME, max_value=MAX_VALUE, max_inflight=4, write_timeout=1.0)
    async with trio.open_nursery() as nursery:
        address = await start_resp(nursery, cluster, limits)
        hog = await RawResp.open(address)
        request = command("GET", "big")
        flood = request * (64 * 1024 * 1024 // len(request))  # 64 MiB of requests, 3 million GETs
        sent_all = False
        ended = trio.Event()

        async def send_and_never_read() -> None:
            nonlocal sent_all
            try:
                await hog.send(flood)
                sent_all = True
            except (trio.BrokenResourceError, OSError):
                pass
            ended.set()

        nursery.start_soon(send_and_never_read)
        await trio.sleep(0.3)
        # While the hog is stuck, others are served.
        await bystander_ok(address)
        await bystander_ok(cluster.resp_addresses[0])
        # The node stops reading the hog (its sends stall), then drops it
        # once its replies have not moved for write_timeout.
        with trio.fail_after(15):
            await ended.wait()
        assert not sent_all, "the node read every request of a client that read no reply"
        await hog.aclose()
        await bystander_ok(address)
        nursery.cancel_scope.cancel()


async def test_connections_over_the_cap_are_refused(cluster: LocalCluster) -> None:
    limits = ServerLimits(max_frame=MAX_FRAME, max_value=MAX_VALUE, max_connections=2)
    async with trio.open_nursery() as nursery:
        address = await start_resp(nursery, cluster, limits)
        first, second = await RawResp.open(address), await RawResp.open(address)
        for conn in (first, second):
            await conn.send(command("PING"))
            assert await conn.reply() == b"PONG"
        third = await RawResp.open(address)
        replies = await third.rest()
        assert [str(r) for r in replies] == ["ERR max number of clients reached"]
        await third.aclose()
        await first.aclose()
        with trio.fail_after(5):
            while True:  # the slot is given back once the server sees the close
                fourth = await RawResp.open(address)
                await fourth.send(command("PING"))
                reply = await fourth.reply()
                await fourth.aclose()
                if reply == b"PONG":
                    break
                await trio.sleep(0.05)
        await second.aclose()
        nursery.cancel_scope.cancel()


# --- the real redis-cli and redis-benchmark ------------------------------------------------


async def run_tool(*args: str, within: float = 60.0) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(within):
        return await trio.run_process(
            list(args), capture_stdout=True, capture_stderr=True, check=False, stdin=subprocess.DEVNULL
        )


@needs_redis_cli
async def test_redis_cli_sets_and_gets_through_different_nodes(cluster: LocalCluster) -> None:
    assert REDIS_CLI is not None
    ports = [str(a.port) for a in cluster.resp_addresses]

    async def cli(i: int, *args: str) -> str:
        done = await run_tool(REDIS_CLI, "-h", "127.0.0.1", "-p", ports[i], *args)
        assert done.returncode == 0 and done.stderr == b"", done
        return done.stdout.decode()

    assert await cli(0, "SET", "cli-key", "cli value") == "OK\n"
    assert await cli(1, "GET", "cli-key") == "cli value\n"
    assert await cli(2, "EXISTS", "cli-key", "nope") == "1\n"
    assert await cli(2, "MSET", "c1", "1", "c2", "2") == "OK\n"
    assert await cli(0, "MGET", "c1", "c2", "c3") == "1\n2\n\n"
    assert await cli(1, "DEL", "cli-key", "c1") == "2\n"
    assert await cli(0, "GET", "cli-key") == "\n"
    assert await cli(0, "PING") == "PONG\n"
    assert "node_id:n3" in await cli(2, "INFO", "server")
    assert "unknown command" in await cli(0, "LPUSH", "l", "x")
    # What an interactive redis-cli asks first, to learn the command table.
    table = await cli(0, "COMMAND")
    assert "mget" in table


class Terminal:
    """A program on a pseudo-terminal of its own (blocking: use in a thread)."""

    def __init__(self, *argv: str) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
        os.close(slave)
        self.out = b""

    def expect(self, text: bytes, within: float = 10.0) -> None:
        """Read until ``text`` has been printed since the last call."""
        deadline = time.monotonic() + within
        start = len(self.out)
        while text not in self.out[start:]:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{text!r} not printed; got {self.out[start:]!r}"
            ready, _, _ = select.select([self.master], [], [], min(remaining, 0.5))
            if ready:
                data = os.read(self.master, 65536)
                self.out += data
                if b"\x1b[6n" in data:  # linenoise asks where the cursor is
                    os.write(self.master, b"\x1b[1;1R")

    def type(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\r")

    def close(self) -> None:
        stop_process(self.proc, sig=signal.SIGKILL, grace=5)
        os.close(self.master)


@needs_redis_cli
async def test_interactive_redis_cli_starts_clean(cluster: LocalCluster) -> None:
    """At start an interactive redis-cli asks COMMAND DOCS (qkv says it does
    not know it, so redis-cli uses its own help); then a session works."""
    assert REDIS_CLI is not None
    port = cluster.resp_addresses[0].port
    prompt = f"127.0.0.1:{port}> ".encode()

    def session() -> bytes:
        term = Terminal(REDIS_CLI, "-p", str(port))
        try:
            term.expect(prompt)
            # Type only at a prompt: linenoise reads its cursor answer first.
            for line, answer in [
                ("set greeting hello", b"OK"),
                ("get greeting", b'"hello"'),
                ("mget greeting nope", b'1) "hello"\r\n2) (nil)'),
                ("help get", b"Get the value of a key"),
            ]:
                term.type(line)
                term.expect(answer)
                term.expect(prompt)
            term.type("quit")
            term.proc.wait(timeout=10)
            return term.out
        finally:
            term.close()

    out = await in_thread(session)
    assert b"rror" not in out and b"arning" not in out, out


@needs_redis_benchmark
async def test_redis_benchmark_runs_clean_and_its_writes_read_back(cluster: LocalCluster) -> None:
    assert REDIS_BENCHMARK is not None
    port = str(cluster.resp_addresses[0].port)
    done = await run_tool(
        REDIS_BENCHMARK,
        "-h",
        "127.0.0.1",
        "-p",
        port,
        "-t",
        "set,get",
        "-n",
        "10000",
        "-c",
        "16",
        "-P",
        "8",
        "-r",
        "1000",
        "-d",
        "8",
        "--csv",
        within=100,
    )
    out, err = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, (out, err)
    assert "WARNING" not in out + err and "Error" not in out + err, (out, err)
    rows = {row[0]: row for row in csv.reader(io.StringIO(out)) if row and row[0] in ("SET", "GET")}
    assert set(rows) == {"SET", "GET"}, out
    for row in rows.values():
        assert float(row[1]) > 0
    print(
        f"redis-benchmark -c 16 -P 8 against an in-process 3-node cluster: "
        f"SET {float(rows['SET'][1]):.0f}/s, GET {float(rows['GET'][1]):.0f}/s"
    )
    # Its writes, read back through the native protocol from another node:
    # one payload of 8 random characters, the same for every SET of a run.
    values = set()
    async with cluster.client([1]) as client:
        for i in range(1000):
            result = await client.get(Key(b"key:%012d" % i))
            if result.found:
                values.add(result.value)
    assert len(values) == 1 and len(values.pop() or b"") == 8


# --- the command line ------------------------------------------------------------------


def wait_for_resp(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> redis.Redis:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, "the node exited"
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5, socket_connect_timeout=1)
        try:
            if client.ping():
                return client
        except redis.ConnectionError:
            client.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.mark.subprocess
async def test_qkv_serve_resp_listen(tmp_path: Path) -> None:
    native, resp = free_ports(2)

    def scenario() -> None:
        with subprocess.Popen(
            [
                str(QKV),
                "serve",
                "--id",
                "n1",
                "--listen",
                f"127.0.0.1:{native}",
                "--data-dir",
                str(tmp_path / "n1"),
                "--resp-listen",
                f"127.0.0.1:{resp}",
                "--log-level",
                "warning",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=qkv_env(),
        ) as proc:
            try:
                client = wait_for_resp(resp, proc)
                with client:
                    assert client.set("through-serve", b"\x01\x02") is True
                    assert client.get("through-serve") == b"\x01\x02"
                    assert client.info("server")["node_id"] == "n1"
            finally:
                assert stop_process(proc, sig=signal.SIGTERM) == 0

    await in_thread(scenario)


@pytest.mark.subprocess
async def test_qkv_cluster_resp_base_port(tmp_path: Path) -> None:
    base = consecutive_free_ports(4)
    resp_base = base + 2

    def scenario() -> None:
        with subprocess.Popen(
            [
                str(QKV),
                "cluster",
                "--size",
                "2",
                "--base-port",
                str(base),
                "--resp-base-port",
                str(resp_base),
                "--storage",
                "memory",
                "--data-dir",
                str(tmp_path),
                "--log-level",
                "warning",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=qkv_env(),
        ) as proc:
            try:
                with wait_for_resp(resp_base, proc) as first, wait_for_resp(resp_base + 1, proc) as second:
                    assert first.set("k", "v") is True
                    assert second.get("k") == b"v"
            finally:
                assert stop_process(proc, sig=signal.SIGTERM) == 0

    await in_thread(scenario)


@pytest.mark.subprocess
@needs_redis_cli
async def test_cluster_script_resp_base_port(tmp_path: Path) -> None:
    base, resp_base = free_ports(2)
    env = qkv_env(
        {
            "QKV_CLUSTER_DIR": str(tmp_path),
            "QKV_BASE_PORT": str(base),
            "QKV_RESP_BASE_PORT": str(resp_base),
            "QKV_BIN": str(QKV),
        }
    )
    assert REDIS_CLI is not None
    try:
        with trio.fail_after(60):
            started = await trio.run_process(
                ["bash", str(SCRIPT), "start", "1"],
                env=env,
                check=False,
                capture_stdout=True,
                capture_stderr=True,
            )
        assert started.returncode == 0, started
        assert f"RESP on 127.0.0.1 ports {resp_base}" in started.stdout.decode()
        done = await run_tool(REDIS_CLI, "-p", str(resp_base), "SET", "script", "ok")
        assert done.stdout == b"OK\n", done
    finally:
        with trio.fail_after(60):
            await trio.run_process(
                ["bash", str(SCRIPT), "stop"], env=env, check=False, capture_stdout=True, capture_stderr=True
            )
