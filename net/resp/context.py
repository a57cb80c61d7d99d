"""What a RESP command works with: the node behind the server (``RespNode``,
the part of ``quorum.node.Node`` RESP uses), the server's shared state
(``Server``), one connection's state (``Client``), and what a command hands
back when it needs quorum work (``Job``, or ``CommandError`` to end one).

Invariants:

- a command handler is a plain function ``(client, args) -> bytes | Job``:
  it checks its arguments and answers at once (bytes), or returns a
  ``Job`` naming every key it touches; the session runs the job as a task
  after the earlier commands of the connection on those keys (per-key
  order), and fills the command's reply slot with what it returns;
- the node is reached only through ``RespNode.handle``, the path of the
  native protocol: no command reads or writes a replica itself (``INFO``
  counts the local replica's keys, a report rather than a read);
- ``Client.ops`` bounds the quorum operations in flight on one connection,
  whatever commands they belong to.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Final, Protocol, TypeAlias

import attrs
import trio

from net.address import Address
from net.messages import Reply, Request
from net.resp.replies import encode_map, nil
from net.server import ServerLimits
from register.model import Key, Versioned

__all__ = [
    "MAX_KEY",
    "QKV_VERSION",
    "REDIS_COMPAT_VERSION",
    "Client",
    "CommandError",
    "Handler",
    "Job",
    "RespNode",
    "Server",
]

#: the Redis version whose behaviour qkv answers like (HELLO, INFO)
REDIS_COMPAT_VERSION: Final = "7.0.0"
MAX_KEY: Final = 1024

try:
    QKV_VERSION = importlib.metadata.version("qkv")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - not installed
    QKV_VERSION = "unknown"


# --- what the server needs from a node ------------------------------------------


class _ConfigView(Protocol):
    @property
    def cluster_size(self) -> int: ...

    @property
    def max_value(self) -> int: ...

    @property
    def max_connections(self) -> int: ...

    @property
    def request_timeout(self) -> float: ...


class _ReplicaView(Protocol):
    @property
    def state(self) -> Mapping[Key, Versioned]: ...


class RespNode(Protocol):
    """What ``serve_resp`` uses of a ``quorum.node.Node``."""

    @property
    def id(self) -> str: ...

    @property
    def state(self) -> str: ...

    @property
    def config(self) -> _ConfigView: ...

    @property
    def replica(self) -> _ReplicaView: ...

    @property
    def resp_address(self) -> Address | None: ...

    async def handle(self, request: Request) -> Reply:
        """Run one request; never raises ``QkvError``."""


# --- the server and its connections ---------------------------------------------


class Server:
    """A RESP server's shared state: the node, the limits, the connection
    slots (``max_connections``), the connection ids."""

    def __init__(self, node: RespNode, limits: ServerLimits) -> None:
        self.node = node
        self.limits = limits
        self.slots = trio.Semaphore(limits.max_connections)
        self.ids = itertools.count(1)
        self.started = time.monotonic()
        self.max_bulk = max(limits.max_value, MAX_KEY)
        # A SET of the longest key and value, with its headers, must fit.
        self.max_request = max(limits.max_frame, limits.max_value + MAX_KEY) + 4096

    @property
    def connected(self) -> int:
        return self.limits.max_connections - self.slots.value


class Client:
    """One RESP connection as its commands see it."""

    def __init__(self, server: Server, conn_id: int, stream: trio.SocketStream) -> None:
        self.server = server
        self.node = server.node
        self.id = conn_id
        self.stream = stream
        self.name = b""
        #: RESP version of the replies: 2 until HELLO 3
        self.proto = 2
        #: set by QUIT: no command after this one runs
        self.closing = False
        #: the quorum operations in flight on this connection
        self.ops = trio.Semaphore(server.limits.max_inflight)

    def nil(self) -> bytes:
        return nil(self.proto)

    def map(self, pairs: list[tuple[bytes, bytes]]) -> bytes:
        return encode_map(pairs, self.proto)


@attrs.define
class Job:
    """A command that needs quorum work: run as a task, in key order."""

    keys: list[Key]
    run: Callable[[], Awaitable[bytes]]


class CommandError(Exception):
    """An error reply, raised to end a command's job (for instance the
    error of one key of a multi-key command)."""

    def __init__(self, reply: bytes) -> None:
        super().__init__()
        self.reply = reply


#: a command: its arguments checked and answered, or a job to run
Handler: TypeAlias = Callable[[Client, list[bytes]], bytes | Job]
