"""Client-observed histories of qkv operations, and a recorder for building them.

Every key of qkv is an independent multi-writer register whose state is
``bytes | None`` (``None`` meaning absent), initially ``None``:

* ``set(v)`` makes the state ``v``;
* ``delete`` makes the state ``None``;
* ``get`` returns the state (``None`` meaning not found).

A history is a list of :class:`Op`. Each op spans the real-time interval
``[call, ret]`` in which the client was waiting for it, and has an outcome:

``"ok"``
    The server acknowledged it; for a get, ``value`` is what it returned.
``"fail"``
    Definitely did not happen (e.g. the request was rejected as malformed).
``"unknown"``
    The client never learnt what happened (timeout, unavailable, connection
    broken).  Such a write may take effect at any moment after ``call``, or
    never; such a get tells us nothing.  ``ret`` is ``None``.

:class:`HistoryRecorder` builds a history from a running test: call
:meth:`HistoryRecorder.invoke` just before sending a request and
:meth:`HistoryRecorder.complete` just after learning its result.  It is meant
for a single-threaded event loop (e.g. many trio tasks), so it takes no locks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal, NewType

import attrs

Kind = Literal["get", "set", "delete"]
Outcome = Literal["ok", "fail", "unknown"]
State = bytes | None

KINDS: tuple[Kind, ...] = ("get", "set", "delete")
OUTCOMES: tuple[Outcome, ...] = ("ok", "fail", "unknown")


@attrs.frozen(kw_only=True)
class Op:
    """One client operation on one key, as the client observed it."""

    client: int
    kind: Kind
    key: bytes
    # The value written by a set; the value returned by an ok get (None = not
    # found); None otherwise.
    value: bytes | None
    call: float
    # None when the client never saw a reply (outcome "unknown").
    ret: float | None
    outcome: Outcome

    def __attrs_post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"bad kind {self.kind!r}")
        if self.outcome not in OUTCOMES:
            raise ValueError(f"bad outcome {self.outcome!r}")
        if self.kind == "set" and not isinstance(self.value, bytes):
            raise ValueError("a set must carry the bytes it writes")
        if self.kind == "delete" and self.value is not None:
            raise ValueError("a delete carries no value")
        if self.kind == "get" and self.outcome != "ok" and self.value is not None:
            raise ValueError("only an ok get has a result value")
        if self.outcome == "ok" and self.ret is None:
            raise ValueError("an ok op must have a return time")
        if self.ret is not None and self.ret < self.call:
            raise ValueError(f"op returns ({self.ret}) before it is called ({self.call})")

    @property
    def is_write(self) -> bool:
        return self.kind != "get"


OpHandle = NewType("OpHandle", int)


@attrs.define
class _Pending:
    client: int
    kind: Kind
    key: bytes
    value: bytes | None
    call: float
    done: Op | None = None


class HistoryRecorder:
    """Collects the ops of a test run in invocation order.

    Ops that are invoked but never completed (e.g. the task was cancelled
    mid-request) are reported with outcome ``"unknown"``, because the request
    may still have reached a server.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._pending: list[_Pending] = []

    def invoke(self, client: int, kind: Kind, key: bytes, value: bytes | None = None) -> OpHandle:
        """Record that ``client`` is about to send a request; returns its handle.

        ``value`` is the bytes to write for a set, and must be None otherwise.
        """
        if kind not in KINDS:
            raise ValueError(f"bad kind {kind!r}")
        if (kind == "set") != (value is not None):
            raise ValueError("value is given for a set and only for a set")
        self._pending.append(_Pending(client, kind, key, value, self._clock()))
        return OpHandle(len(self._pending) - 1)

    def complete(self, handle: OpHandle, outcome: Outcome, value: bytes | None = None) -> Op:
        """Record the result of the op ``handle``.

        ``value`` is the result of an ok get (None = not found); it must be
        None for anything else.
        """
        # Take the time first so bookkeeping is not counted inside the interval.
        now = self._clock()
        pending = self._pending[handle]
        if pending.done is not None:
            raise ValueError(f"op {handle} completed twice")
        if value is not None and (pending.kind != "get" or outcome != "ok"):
            raise ValueError("only an ok get completes with a value")
        written = pending.value if pending.kind == "set" else value
        pending.done = Op(
            client=pending.client,
            kind=pending.kind,
            key=pending.key,
            value=written,
            call=pending.call,
            ret=None if outcome == "unknown" else now,
            outcome=outcome,
        )
        return pending.done

    def ops(self) -> list[Op]:
        """All ops so far, in invocation order; unfinished ones as unknown."""
        out: list[Op] = []
        for p in self._pending:
            if p.done is not None:
                out.append(p.done)
            else:
                out.append(
                    Op(
                        client=p.client,
                        kind=p.kind,
                        key=p.key,
                        value=p.value,
                        call=p.call,
                        ret=None,
                        outcome="unknown",
                    )
                )
        return out

    def __len__(self) -> int:
        return len(self._pending)
