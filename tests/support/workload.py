"""A concurrent client workload that records every operation in a history.

``Workload`` runs ``clients`` trio tasks against a cluster, each doing
random get/set/delete on a small set of keys (so that operations conflict)
with a value unique to each set, and records every operation in a
``HistoryRecorder`` as the client saw it:

* an answer: ``ok`` (for a get, with the value read);
* an error the protocol calls definite (``bad_request``, ``too_large``,
  ``unknown_op``, ``shutting_down``): ``fail``;
* anything else (``unavailable``, ``internal``, a timeout, a broken or
  refused connection): ``unknown``.

Half the clients (even numbers) are *pinned* to one node: one attempt per
operation. The others *fail over*: an attempt that ends in an unknown
outcome is retried on the next node, with the same request id (``rid``).
A retry whose query majority includes a node that recorded the rid finishes
the first attempt's write; one whose majority does not makes a second write
of the same value, and the first attempt may still land, even after the
retry answered (see docs/protocol.md). The history models that exactly:
the operation is one op over the whole ``[call, ret]``, and every earlier
attempt of a write whose outcome was unknown adds a *shadow* op, an unknown
write of the same value called at the same time, which the checker may
place anywhere after its call, or leave out.

After the faults: ``final_reads`` reads every key through every node and
records those reads too, so that the checker also judges whether any
acknowledged write was lost.

Every attempt is bounded: the client's own per-attempt timeout
(``timeout``), and a guard around the whole attempt.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import AsyncExitStack

import attrs
import trio

from net.address import Address
from net.client import Client, open_client
from net.errors import PeerUnavailable, QkvError
from tests.support.history import HistoryRecorder, Kind, Op, Outcome

__all__ = ["FINAL_CLIENT", "Workload", "WorkloadConfig"]

#: client numbers from here on are the final reads, not the workload
FINAL_CLIENT = 1000

_UNKNOWN_ERRORS = (
    PeerUnavailable,
    trio.TooSlowError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    OSError,
)


@attrs.frozen(kw_only=True)
class WorkloadConfig:
    clients: int = 6
    keys: int = 4
    #: the client's timeout of one attempt on one node (seconds)
    timeout: float = 1.5
    #: "mixed": even clients pinned to one node, odd ones fail over;
    #: "pinned" or "failover": all of them
    routing: str = "mixed"
    #: relative weights of get, set, delete
    mix: tuple[float, float, float] = (0.5, 0.4, 0.1)
    #: each client sleeps up to this long between operations
    think: float = 0.0
    #: and up to this long after one that did not succeed (a node down
    #: refuses at once: without it, clients would spin on failures)
    backoff: float = 0.1
    key_prefix: str = "k"

    def __attrs_post_init__(self) -> None:
        if self.routing not in ("mixed", "pinned", "failover"):
            raise ValueError(f"unknown routing {self.routing!r}")
        if self.clients < 1 or self.keys < 1:
            raise ValueError("at least one client and one key")


@attrs.define
class WorkloadStats:
    attempts: int = 0
    #: attempts after the first of an operation (fail-over clients)
    retries: int = 0
    shadows: int = 0
    final_reads: int = 0
    #: final reads retried after a failed attempt, and reads that never succeeded
    final_read_retries: int = 0
    final_read_failures: int = 0
    errors: Counter[str] = attrs.field(factory=Counter)


class Workload:
    def __init__(
        self,
        addresses: Sequence[Address],
        config: WorkloadConfig,
        *,
        seed: int,
        recorder: HistoryRecorder | None = None,
    ) -> None:
        self.addresses = list(addresses)
        self.config = config
        self.seed = seed
        self.recorder = recorder if recorder is not None else HistoryRecorder(time.monotonic)
        self.shadows: list[Op] = []
        self.stats = WorkloadStats()
        self.keys = [f"{config.key_prefix}{i}".encode() for i in range(config.keys)]

    # --- who talks to whom ---

    def pinned(self, client: int) -> bool:
        routing = self.config.routing
        return routing == "pinned" or (routing == "mixed" and client % 2 == 0)

    def home(self, client: int) -> int:
        """The node a client starts with (pinned clients: the only one)."""
        return client % len(self.addresses)

    @property
    def pinned_nodes(self) -> list[int]:
        """Nodes that some pinned client depends on (for "coordinator cut off")."""
        return sorted({self.home(c) for c in range(self.config.clients) if self.pinned(c)})

    def history(self) -> list[Op]:
        """Every op recorded (unfinished ones as unknown), then the shadows."""
        return [*self.recorder.ops(), *self.shadows]

    # --- running ---

    async def run(self, stop: trio.Event) -> None:
        """Run every client until ``stop`` is set; each finishes the
        operation it is in (bounded) and returns."""
        async with trio.open_nursery() as nursery:
            for c in range(self.config.clients):
                nursery.start_soon(self._client, c, stop)

    async def _client(self, c: int, stop: trio.Event) -> None:
        rng = random.Random(f"{self.seed}:client:{c}")
        n = len(self.addresses)
        home = self.home(c)
        order = [home] if self.pinned(c) else [(home + k) % n for k in range(n)]
        get_w, set_w, _ = self.config.mix
        total = sum(self.config.mix)
        async with AsyncExitStack() as stack:
            clients = {
                i: await stack.enter_async_context(
                    open_client([self.addresses[i]], timeout=self.config.timeout)
                )
                for i in order
            }
            preferred = 0
            seq = 0
            while not stop.is_set():
                key = rng.choice(self.keys)
                draw = rng.random() * total
                kind: Kind = "get" if draw < get_w else "set" if draw < get_w + set_w else "delete"
                seq += 1
                value = f"c{c}.{seq}".encode() if kind == "set" else None
                rid = rng.randbytes(16)
                preferred, ok = await self._operation(c, clients, order, preferred, kind, key, value, rid)
                pause = self.config.think if ok else max(self.config.think, self.config.backoff)
                if pause:
                    await trio.sleep(rng.uniform(0, pause))

    async def _operation(
        self,
        c: int,
        clients: dict[int, Client],
        order: list[int],
        preferred: int,
        kind: Kind,
        key: bytes,
        value: bytes | None,
        rid: bytes,
    ) -> tuple[int, bool]:
        """One operation, with fail-over for unpinned clients; returns the
        index in ``order`` to start the next operation with, and whether it
        succeeded."""
        handle = self.recorder.invoke(c, kind, key, value)
        unknown_attempts = 0
        outcome: Outcome = "unknown"
        result: bytes | None = None
        for k in range(len(order)):
            index = (preferred + k) % len(order)
            if k:
                self.stats.retries += 1
            self.stats.attempts += 1
            outcome, result = await self._attempt(clients[order[index]], kind, key, value, rid)
            if outcome == "ok":
                preferred = index
                break
            if outcome == "unknown":
                unknown_attempts += 1
        op = self.recorder.complete(handle, outcome, result if outcome == "ok" and kind == "get" else None)
        if kind != "get":
            # Every unknown attempt followed by another attempt may land on
            # its own (the last one is the op itself when it is unknown).
            extra = unknown_attempts - (1 if outcome == "unknown" else 0)
            for _ in range(extra):
                self.shadows.append(attrs.evolve(op, ret=None, outcome="unknown"))
                self.stats.shadows += 1
        return preferred, outcome == "ok"

    async def _attempt(
        self, client: Client, kind: Kind, key: bytes, value: bytes | None, rid: bytes
    ) -> tuple[Outcome, bytes | None]:
        # The client bounds connecting and the request; this guard only
        # catches a hang of the client itself.
        with trio.move_on_after(2 * self.config.timeout + 3):
            try:
                if kind == "get":
                    got = await client.get(key)
                    return "ok", got.value if got.found else None
                if kind == "set":
                    assert value is not None
                    await client.set(key, value, rid=rid)
                else:
                    await client.delete(key, rid=rid)
                return "ok", None
            except QkvError as exc:
                self.stats.errors[exc.code] += 1
                return ("fail" if exc.definite else "unknown"), None
            except _UNKNOWN_ERRORS as exc:
                self.stats.errors[type(exc).__name__] += 1
                return "unknown", None
        self.stats.errors["guard timeout"] += 1
        return "unknown", None

    async def final_reads(self, *, attempts: int = 5) -> None:
        """Read every key through every node (in the history too); retry a
        read that fails, up to ``attempts`` times."""
        for i, address in enumerate(self.addresses):
            async with open_client([address], timeout=max(self.config.timeout, 3.0)) as client:
                for key in self.keys:
                    self.stats.final_reads += 1
                    for attempt in range(attempts):
                        if attempt:
                            self.stats.final_read_retries += 1
                            await trio.sleep(0.2)
                        handle = self.recorder.invoke(FINAL_CLIENT + i, "get", key)
                        outcome, result = await self._attempt(client, "get", key, None, b"")
                        self.recorder.complete(handle, outcome, result if outcome == "ok" else None)
                        if outcome == "ok":
                            break
                    else:
                        self.stats.final_read_failures += 1
