"""A concurrent client workload that records every operation in a history.

``Workload`` runs ``clients`` trio tasks against a cluster, each doing
random operations on a small set of keys (so that operations conflict), and
records every operation in a ``HistoryRecorder`` as the client saw it. The
operations are chosen by ``WorkloadConfig.workload`` (Jepsen's names):

``register`` (the default)
    get, set and delete, every set with a value unique to it
    (``c<client>.<n>``), so that a read names the write it saw.
``cas-register``
    get, set and cas on small values (``0`` .. ``4``): cas expects one of
    them, or the key absent, and writes one of them. Values repeat, so
    reads do not name writes: the checker has to search harder, and a cas
    that swaps says something a blind write cannot.
``counter``
    incr by small positive and negative steps, and by 0, and gets; nothing
    else writes those keys, so ``check_counters`` can also check every
    final value against the increments: the acknowledged ones plus some
    subset of those whose outcome is unknown.
``mixed``
    every op (get, set, delete, cas, incr) on the same keys, with values
    that are sometimes counters (``-2`` .. ``6``), sometimes not (a unique
    ``c<client>.<n>``, ``x``, ``007``, ``-0``, the empty value), so that
    incr meets non-integers and answers ``not_integer``.

Outcomes:

* an answer: ``ok`` (a get with the value read; a cas with ``swapped`` and,
  when it did not swap, the state it saw; an incr with its new value, or
  ``not_integer``, which is an answer too: a definite no-op that the checker
  checks);
* an error the protocol calls definite (``bad_request``, ``too_large``,
  ``unknown_op``, ``shutting_down``): ``fail``;
* anything else (``unavailable``, ``internal``, a timeout, a broken or
  refused connection): ``unknown``. Never ``fail``: an unknown write may
  have landed on a minority and become visible later.

Half the clients (even numbers) are *pinned* to one node: one attempt per
operation. The others *fail over*: an attempt that ends in an unknown
outcome is retried on the next node, with the same request id (``rid``).
A retry whose majority includes a node that recorded the rid finishes, or
answers, the first attempt (for a cas that swapped, ``swapped: true``; for
an incr, the first attempt's new value, without adding again); one whose
majority does not is applied as a new request, and the first attempt may
still land (see docs/protocol.md, "Request ids"). The history models that
exactly: the operation is one op over the whole ``[call, ret]``, and every
earlier attempt of a write whose outcome was unknown adds a *shadow* op, the
same request with its outcome unknown, called at the same time, which the
checker may place anywhere after its call, or leave out (and which
``check_counters`` counts among the unknown increments).

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
from net.errors import NotInteger, PeerUnavailable, QkvError
from tests.support.history import HistoryRecorder, Kind, Op, OpHandle, Outcome, parse_counter

__all__ = [
    "FINAL_CLIENT",
    "WORKLOADS",
    "CounterVerdict",
    "Intent",
    "Workload",
    "WorkloadConfig",
    "check_counters",
]

#: client numbers from here on are the final reads, not the workload
FINAL_CLIENT = 1000

#: the workloads ``WorkloadConfig.workload`` names
WORKLOADS: tuple[str, ...] = ("register", "cas-register", "counter", "mixed")

#: relative weights of the kinds of each workload but ``register`` (whose
#: get, set and delete weights are ``WorkloadConfig.mix``)
ATOMIC_MIXES: dict[str, dict[Kind, float]] = {
    "cas-register": {"get": 0.35, "set": 0.15, "cas": 0.5},
    "counter": {"get": 0.3, "incr": 0.7},
    "mixed": {"get": 0.25, "set": 0.15, "delete": 0.05, "cas": 0.25, "incr": 0.3},
}

#: cas-register's values
SMALL_VALUES: tuple[bytes, ...] = tuple(b"%d" % i for i in range(5))
#: counter's steps: positive, negative and zero
COUNTER_STEPS: tuple[int, ...] = (-3, -2, -1, 0, 1, 1, 2, 3, 5)
#: mixed: the counters it writes and expects, the steps it adds, and values
#: that are not counters (non-canonical decimals among them)
MIXED_NUMBERS: tuple[bytes, ...] = tuple(b"%d" % i for i in range(-2, 7))
MIXED_STEPS: tuple[int, ...] = (-2, -1, 0, 1, 1, 2, 3)
MIXED_NOT_NUMBERS: tuple[bytes, ...] = (b"x", b"007", b"-0", b"")

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
    #: which operations (see the module docstring): one of ``WORKLOADS``
    workload: str = "register"
    #: relative weights of get, set, delete (the register workload)
    mix: tuple[float, float, float] = (0.5, 0.4, 0.1)
    #: each client sleeps up to this long between operations
    think: float = 0.0
    #: and up to this long after one that did not succeed (a node down
    #: refuses at once: without it, clients would spin on failures)
    backoff: float = 0.1
    key_prefix: str = "k"
    #: keep every attempt in ``Workload.trace`` (which node, which rid, when,
    #: what came back): for explaining a violation
    trace: bool = False

    def __attrs_post_init__(self) -> None:
        if self.routing not in ("mixed", "pinned", "failover"):
            raise ValueError(f"unknown routing {self.routing!r}")
        if self.workload not in WORKLOADS:
            raise ValueError(f"unknown workload {self.workload!r}; known: {', '.join(WORKLOADS)}")
        if self.clients < 1 or self.keys < 1:
            raise ValueError("at least one client and one key")


@attrs.frozen(kw_only=True)
class Intent:
    """One operation a client is about to make."""

    kind: Kind
    key: bytes
    #: set: the bytes written; cas: the state written on a match (None: delete)
    value: bytes | None = None
    #: cas: the state required (None: absent)
    expect: bytes | None = None
    #: incr: the amount added
    by: int = 0


@attrs.frozen(kw_only=True)
class Answer:
    """What an attempt that was answered said."""

    #: get: the state read (None: not found)
    value: bytes | None = None
    #: cas
    swapped: bool | None = None
    observed: bytes | None = None
    #: incr: the new value, or not_integer
    result: int | None = None
    not_integer: bool = False


@attrs.frozen(kw_only=True)
class Attempt:
    """One attempt of one operation on one node (``WorkloadConfig.trace``)."""

    client: int
    #: the operation's index in the recorder (its ``OpHandle``)
    op: int
    node: int
    rid: bytes
    start: float
    end: float
    outcome: Outcome
    answer: Answer | None
    error: str = ""


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
    #: ok answers of cas and incr, by what they said: "swapped",
    #: "not swapped", "incremented", "not_integer"
    answers: Counter[str] = attrs.field(factory=Counter)


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
        self.trace: list[Attempt] = []
        self._last_error = ""
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

    # --- what to do ---

    def intent(self, rng: random.Random, c: int, seq: int) -> Intent:
        """The next operation of client ``c`` (its ``seq``-th)."""
        key = rng.choice(self.keys)
        workload = self.config.workload
        if workload == "register":
            # the draws of the original get/set/delete workload, in its
            # order, so that its seeds keep giving the same operations
            get_w, set_w, _ = self.config.mix
            draw = rng.random() * sum(self.config.mix)
            kind: Kind = "get" if draw < get_w else "set" if draw < get_w + set_w else "delete"
            return Intent(kind=kind, key=key, value=f"c{c}.{seq}".encode() if kind == "set" else None)
        mix = ATOMIC_MIXES[workload]
        kind = rng.choices(list(mix), weights=list(mix.values()))[0]
        if kind in ("get", "delete"):
            return Intent(kind=kind, key=key)
        if workload == "cas-register":
            if kind == "set":
                return Intent(kind="set", key=key, value=rng.choice(SMALL_VALUES))
            expect = None if rng.random() < 0.2 else rng.choice(SMALL_VALUES)
            return Intent(kind="cas", key=key, expect=expect, value=rng.choice(SMALL_VALUES))
        if workload == "counter":
            return Intent(kind="incr", key=key, by=rng.choice(COUNTER_STEPS))
        # mixed
        if kind == "incr":
            return Intent(kind="incr", key=key, by=rng.choice(MIXED_STEPS))
        if kind == "set":
            return Intent(kind="set", key=key, value=self._mixed_value(rng, c, seq))
        draw = rng.random()
        expect = (
            None
            if draw < 0.15
            else rng.choice(MIXED_NUMBERS)
            if draw < 0.85
            else rng.choice(MIXED_NOT_NUMBERS)
        )
        value = None if rng.random() < 0.1 else self._mixed_value(rng, c, seq)
        return Intent(kind="cas", key=key, expect=expect, value=value)

    @staticmethod
    def _mixed_value(rng: random.Random, c: int, seq: int) -> bytes:
        draw = rng.random()
        if draw < 0.55:
            return rng.choice(MIXED_NUMBERS)
        if draw < 0.8:
            return f"c{c}.{seq}".encode()
        return rng.choice(MIXED_NOT_NUMBERS)

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
                seq += 1
                intent = self.intent(rng, c, seq)
                rid = rng.randbytes(16)
                preferred, ok = await self._operation(c, clients, order, preferred, intent, rid)
                pause = self.config.think if ok else max(self.config.think, self.config.backoff)
                if pause:
                    await trio.sleep(rng.uniform(0, pause))

    def _invoke(self, c: int, intent: Intent) -> OpHandle:
        if intent.kind == "cas":
            return self.recorder.invoke_cas(c, intent.key, intent.expect, intent.value)
        if intent.kind == "incr":
            return self.recorder.invoke_incr(c, intent.key, intent.by)
        return self.recorder.invoke(c, intent.kind, intent.key, intent.value)

    def _complete(self, handle: OpHandle, intent: Intent, outcome: Outcome, answer: Answer | None) -> Op:
        if outcome != "ok" or answer is None:
            return self.recorder.complete(handle, outcome)
        if intent.kind == "cas":
            assert answer.swapped is not None
            self.stats.answers["swapped" if answer.swapped else "not swapped"] += 1
            return self.recorder.complete_cas(handle, "ok", swapped=answer.swapped, observed=answer.observed)
        if intent.kind == "incr":
            self.stats.answers["not_integer" if answer.not_integer else "incremented"] += 1
            return self.recorder.complete_incr(
                handle, "ok", result=answer.result, not_integer=answer.not_integer
            )
        return self.recorder.complete(handle, "ok", answer.value if intent.kind == "get" else None)

    async def _operation(
        self,
        c: int,
        clients: dict[int, Client],
        order: list[int],
        preferred: int,
        intent: Intent,
        rid: bytes,
    ) -> tuple[int, bool]:
        """One operation, with fail-over for unpinned clients; returns the
        index in ``order`` to start the next operation with, and whether it
        succeeded."""
        handle = self._invoke(c, intent)
        unknown_attempts = 0
        outcome: Outcome = "unknown"
        answer: Answer | None = None
        for k in range(len(order)):
            index = (preferred + k) % len(order)
            if k:
                self.stats.retries += 1
            self.stats.attempts += 1
            start = time.monotonic()
            outcome, answer = await self._attempt(clients[order[index]], intent, rid)
            if self.config.trace:
                self.trace.append(
                    Attempt(
                        client=c,
                        op=handle,
                        node=order[index],
                        rid=rid,
                        start=start,
                        end=time.monotonic(),
                        outcome=outcome,
                        answer=answer,
                        error="" if outcome == "ok" else self._last_error,
                    )
                )
            if outcome == "ok":
                preferred = index
                break
            if outcome == "unknown":
                unknown_attempts += 1
            else:
                break  # definite: it did not happen, and neither will a retry
        op = self._complete(handle, intent, outcome, answer)
        if intent.kind != "get":
            # Every unknown attempt followed by another attempt may land on
            # its own (the last one is the op itself when it is unknown).
            extra = unknown_attempts - (1 if outcome == "unknown" else 0)
            for _ in range(extra):
                self.shadows.append(op.as_unknown())
                self.stats.shadows += 1
        return preferred, outcome == "ok"

    async def _attempt(self, client: Client, intent: Intent, rid: bytes) -> tuple[Outcome, Answer | None]:
        # The client bounds connecting and the request; this guard only
        # catches a hang of the client itself.
        key = intent.key
        with trio.move_on_after(2 * self.config.timeout + 3):
            try:
                match intent.kind:
                    case "get":
                        got = await client.get(key)
                        return "ok", Answer(value=got.value if got.found else None)
                    case "set":
                        assert intent.value is not None
                        await client.set(key, intent.value, rid=rid)
                    case "delete":
                        await client.delete(key, rid=rid)
                    case "cas":
                        done = await client.cas(key, intent.expect, intent.value, rid=rid)
                        observed = None if done.swapped or not done.found else done.value
                        return "ok", Answer(swapped=done.swapped, observed=observed)
                    case "incr":
                        try:
                            added = await client.incr(key, intent.by, rid=rid)
                        except NotInteger:
                            return "ok", Answer(not_integer=True)
                        return "ok", Answer(result=added.value)
                return "ok", Answer()
            except QkvError as exc:
                self._error(exc.code, str(exc))
                return ("fail" if exc.definite else "unknown"), None
            except _UNKNOWN_ERRORS as exc:
                self._error(type(exc).__name__, str(exc))
                return "unknown", None
        self._error("guard timeout", "")
        return "unknown", None

    def _error(self, name: str, message: str) -> None:
        self.stats.errors[name] += 1
        self._last_error = f"{name}: {message}"[:300]

    async def final_reads(self, *, attempts: int = 5) -> None:
        """Read every key through every node (in the history too); retry a
        read that fails, up to ``attempts`` times."""
        get = Intent(kind="get", key=b"")
        for i, address in enumerate(self.addresses):
            async with open_client([address], timeout=max(self.config.timeout, 3.0)) as client:
                for key in self.keys:
                    self.stats.final_reads += 1
                    for attempt in range(attempts):
                        if attempt:
                            self.stats.final_read_retries += 1
                            await trio.sleep(0.2)
                        handle = self.recorder.invoke(FINAL_CLIENT + i, "get", key)
                        outcome, answer = await self._attempt(client, attrs.evolve(get, key=key), b"")
                        self.recorder.complete(
                            handle, outcome, answer.value if outcome == "ok" and answer else None
                        )
                        if outcome == "ok":
                            break
                    else:
                        self.stats.final_read_failures += 1


# --- the counter check ------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class CounterVerdict:
    """A counter key's final value against its increments."""

    key: bytes
    #: the value every final read returned (None: they disagreed, none was
    #: answered, or it is not a counter)
    final: int | None
    #: acknowledged increments: how many, and their sum
    acknowledged: int
    acknowledged_sum: int
    #: the steps of the increments of unknown outcome (shadows included)
    unknown: tuple[int, ...]
    ok: bool
    #: why not, or which unknown increments explain the value
    reason: str

    def describe(self) -> str:
        verdict = "ok" if self.ok else "WRONG"
        return (
            f"{self.key.decode('utf-8', 'replace')}: final {self.final}, {self.acknowledged} acknowledged "
            f"(sum {self.acknowledged_sum:+d}), {len(self.unknown)} unknown: {verdict}: {self.reason}"
        )


def subset_sum_witness(steps: Sequence[int], target: int) -> list[int] | None:
    """Some sub-multiset of ``steps`` summing to ``target`` (its indices), or
    None if there is none. Exact: a dynamic programme over every reachable
    sum, as bits of an int (``2 * sum(|steps|)`` bits at most), with a
    backward pass for the witness."""
    offset = sum(-s for s in steps if s < 0)
    layers = [1 << offset]  # layers[i]: sums reachable with steps[:i]
    for s in steps:
        reach = layers[-1]
        layers.append(reach | (reach << s if s >= 0 else reach >> -s))
    index = target + offset
    if index < 0 or not layers[-1] >> index & 1:
        return None
    chosen: list[int] = []
    for i in range(len(steps), 0, -1):
        if not layers[i - 1] >> index & 1:
            chosen.append(i - 1)
            index -= steps[i - 1]
    return sorted(chosen)


def check_counters(history: Sequence[Op]) -> list[CounterVerdict]:
    """For every key that only incr writes: the value of its final reads
    must be the sum of its acknowledged increments plus the sum of some
    subset of those of unknown outcome (each taking effect at most once).

    Final reads are those of clients ``FINAL_CLIENT`` and up; they must all
    be answered alike. Keys written by anything but incr are left out (the
    linearizability checker judges them)."""
    by_key: dict[bytes, list[Op]] = {}
    for op in history:
        by_key.setdefault(op.key, []).append(op)
    verdicts = []
    for key in sorted(by_key):
        ops = by_key[key]
        if any(op.kind == "incr" for op in ops) and not any(
            op.kind in ("set", "delete", "cas") for op in ops
        ):
            verdicts.append(_counter_verdict(key, ops))
    return verdicts


def _counter_verdict(key: bytes, ops: Sequence[Op]) -> CounterVerdict:
    incrs = [op for op in ops if op.kind == "incr" and op.client < FINAL_CLIENT]
    acked = [op for op in incrs if op.outcome == "ok" and not op.not_integer]
    refused = [op for op in incrs if op.not_integer]
    unknown = tuple(op.by for op in incrs if op.outcome == "unknown" and op.by)
    acked_sum = sum(op.by or 0 for op in acked)
    finals = {op.value for op in ops if op.client >= FINAL_CLIENT and op.kind == "get" and op.outcome == "ok"}

    def verdict(final: int | None, ok: bool, reason: str) -> CounterVerdict:
        return CounterVerdict(
            key=key,
            final=final,
            acknowledged=len(acked),
            acknowledged_sum=acked_sum,
            unknown=unknown,
            ok=ok,
            reason=reason,
        )

    if len(finals) != 1:
        return verdict(
            None, False, f"final reads disagree: {sorted(finals, key=repr)}" if finals else "no final read"
        )
    (state,) = finals
    final = parse_counter(state)
    if final is None:
        return verdict(None, False, f"the final value {state!r} is not a counter")
    if refused:
        return verdict(final, False, f"{len(refused)} incr answered not_integer on a key only incr writes")
    witness = subset_sum_witness(unknown, final - acked_sum)
    if witness is None:
        return verdict(
            final,
            False,
            f"no subset of the unknown increments adds up to {final - acked_sum:+d} "
            f"(final {final} - acknowledged {acked_sum:+d})",
        )
    return verdict(final, True, f"{len(witness)} of the unknown increments took effect")
