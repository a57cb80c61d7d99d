"""Client-observed histories of qkv operations, and a recorder for building them.

Every key of qkv is an independent multi-writer register whose state is
``bytes | None`` (``None`` meaning absent), initially ``None``:

* ``set(v)`` makes the state ``v``;
* ``delete`` makes the state ``None``;
* ``get`` returns the state (``None`` meaning not found);
* ``cas(expect, v)``: if the state equals ``expect`` (``None``: the key is
  absent), the state becomes ``v`` (``None``: deleted) and the answer is
  ``swapped=True``; otherwise the state is left alone and the answer is
  ``swapped=False`` with the state the cas saw;
* ``incr(by)``: the state must be ``None`` (counting as 0) or a *counter*,
  the canonical ASCII decimal of a signed 64-bit int (``0``, or an optional
  ``-``, a digit 1-9 and more digits; see :func:`parse_counter`); it becomes
  the canonical decimal of ``old + by`` and the answer is that new int.  On
  any other state, or if ``old + by`` leaves the signed 64-bit range, the
  answer is the error ``not_integer`` and the state is left alone.

A history is a list of :class:`Op`. Each op spans the real-time interval
``[call, ret]`` in which the client was waiting for it, and has an outcome:

``"ok"``
    The server answered (see the fields below for what each kind carries).
``"fail"``
    Definitely did not happen (e.g. the request was rejected as malformed).
``"unknown"``
    The client never learnt what happened (timeout, unavailable, connection
    broken).  Such a write (set, delete, cas or incr) may take effect at
    most once, at any moment after ``call``, or never, and its result is
    unknown; such a get tells us nothing.  ``ret`` is ``None``.

The fields of :class:`Op` per kind (a field not listed keeps its default:
``None``, or ``False`` for ``not_integer``):

========  =================================================================
kind      fields
========  =================================================================
get       ``value``: for an ok get, the state read (``None``: not found).
set       ``value``: the bytes written.
delete    none.
cas       ``expect``: the state required (``None``: absent); ``value``: the
          state to write if it matches (``None``: delete); for an ok cas,
          ``swapped`` (a bool), and if it is ``False``, ``observed``: the
          state the cas answered with (``None``: not found).
incr      ``by``: the int added (any signed 64-bit int, zero and negative
          included); for an ok incr, either ``value``: the answered new
          int as the register now holds it, the canonical decimal bytes
          (``b"-3"``), or ``not_integer=True``: the answer was the
          ``not_integer`` error, a definite no-op that saw a state that is
          not a counter, or one that ``by`` would take out of range.
========  =================================================================

An incr answered ``not_integer`` is recorded as outcome ``"ok"`` (with
``not_integer=True``) so that the checker can check that claim; recording
it as ``"fail"`` is sound too, just checks less.

:class:`HistoryRecorder` builds a history from a running test: call
:meth:`HistoryRecorder.invoke` (or :meth:`~HistoryRecorder.invoke_cas`,
:meth:`~HistoryRecorder.invoke_incr`) just before sending a request and
:meth:`HistoryRecorder.complete` (or :meth:`~HistoryRecorder.complete_cas`,
:meth:`~HistoryRecorder.complete_incr`) just after learning its result.  It
is meant for a single-threaded event loop (e.g. many trio tasks), so it
takes no locks.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Literal, NewType

import attrs

Kind = Literal["get", "set", "delete", "cas", "incr"]
Outcome = Literal["ok", "fail", "unknown"]
State = bytes | None

KINDS: tuple[Kind, ...] = ("get", "set", "delete", "cas", "incr")
OUTCOMES: tuple[Outcome, ...] = ("ok", "fail", "unknown")

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
_CANONICAL = re.compile(rb"0|-?[1-9][0-9]*")


def parse_counter(state: State) -> int | None:
    """The int that ``incr`` sees in ``state``: 0 for ``None``, the value of
    a canonical signed 64-bit decimal, and ``None`` for anything else."""
    if state is None:
        return 0
    if len(state) > 20 or not _CANONICAL.fullmatch(state):
        return None
    n = int(state)
    return n if INT64_MIN <= n <= INT64_MAX else None


def format_counter(n: int) -> bytes:
    """The canonical decimal of ``n``, as ``incr`` leaves it in the register."""
    return b"%d" % n


@attrs.frozen(kw_only=True)
class Op:
    """One client operation on one key, as the client observed it (see the
    module docstring for the fields of each kind)."""

    client: int
    kind: Kind
    key: bytes
    # get: the state read (ok only; None = not found); set: the bytes
    # written; cas: the state written on a match (None = delete); incr: the
    # new counter answered, as canonical decimal bytes (ok only); delete: None.
    value: bytes | None
    call: float
    # None when the client never saw a reply (outcome "unknown").
    ret: float | None
    outcome: Outcome
    # cas: the state it must find (None = absent).
    expect: bytes | None = None
    # incr: the amount added.
    by: int | None = None
    # ok cas: whether it took effect.
    swapped: bool | None = None
    # ok cas with swapped False: the state it answered with (None = absent).
    observed: bytes | None = None
    # ok incr: answered not_integer (nothing changed).
    not_integer: bool = False

    def __attrs_post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"bad kind {self.kind!r}")
        if self.outcome not in OUTCOMES:
            raise ValueError(f"bad outcome {self.outcome!r}")
        ok = self.outcome == "ok"
        if self.kind == "set" and not isinstance(self.value, bytes):
            raise ValueError("a set must carry the bytes it writes")
        if self.kind == "delete" and self.value is not None:
            raise ValueError("a delete carries no value")
        if self.kind == "get" and not ok and self.value is not None:
            raise ValueError("only an ok get has a result value")
        if self.kind != "cas" and (self.expect, self.swapped, self.observed) != (None, None, None):
            raise ValueError("expect, swapped and observed are for a cas")
        if self.kind == "cas":
            if ok != isinstance(self.swapped, bool):
                raise ValueError("an ok cas, and only an ok cas, says whether it swapped")
            if self.swapped is not False and self.observed is not None:
                raise ValueError("only a cas that did not swap carries what it observed")
        if self.kind != "incr" and (self.by is not None or self.not_integer):
            raise ValueError("by and not_integer are for an incr")
        if self.kind == "incr":
            if type(self.by) is not int or not INT64_MIN <= self.by <= INT64_MAX:
                raise ValueError("an incr must add a signed 64-bit int")
            if self.not_integer and not ok:
                raise ValueError("only an ok incr can have answered not_integer")
            answered = ok and not self.not_integer
            if answered != (self.value is not None):
                raise ValueError("an ok incr, and only one, carries its new value (or not_integer)")
            if self.value is not None and not _CANONICAL.fullmatch(self.value):
                raise ValueError(f"an incr's new value must be a canonical decimal, not {self.value!r}")
        if ok and self.ret is None:
            raise ValueError("an ok op must have a return time")
        if self.ret is not None and self.ret < self.call:
            raise ValueError(f"op returns ({self.ret}) before it is called ({self.call})")

    @property
    def is_write(self) -> bool:
        """Whether it may change the state: every kind but get (an ok cas
        that did not swap and an ok not_integer incr are writes that, as it
        turned out, did not)."""
        return self.kind != "get"

    def as_unknown(self) -> Op:
        """The same request with its outcome unknown (what it returned
        dropped): e.g. for the shadow of an earlier attempt of a retry."""
        return attrs.evolve(
            self,
            value=self.value if self.kind in ("set", "cas") else None,
            ret=None,
            outcome="unknown",
            swapped=None,
            observed=None,
            not_integer=False,
        )


OpHandle = NewType("OpHandle", int)


@attrs.define
class _Pending:
    client: int
    kind: Kind
    key: bytes
    value: bytes | None
    call: float
    expect: bytes | None = None
    by: int | None = None
    done: Op | None = None

    def op(self, ret: float | None, outcome: Outcome, result: bytes | None = None, **answer: object) -> Op:
        """The op, with ``result`` as the value of a get or an incr."""
        return Op(
            client=self.client,
            kind=self.kind,
            key=self.key,
            value=self.value if self.kind in ("set", "cas") else result,
            call=self.call,
            ret=ret,
            outcome=outcome,
            expect=self.expect,
            by=self.by,
            **answer,  # type: ignore[arg-type]
        )


class HistoryRecorder:
    """Collects the ops of a test run in invocation order.

    Ops that are invoked but never completed (e.g. the task was cancelled
    mid-request) are reported with outcome ``"unknown"``, because the request
    may still have reached a server.

    get, set and delete: :meth:`invoke` and :meth:`complete`.  cas:
    :meth:`invoke_cas`, then :meth:`complete_cas` (or :meth:`complete` with
    outcome ``"fail"`` or ``"unknown"``).  incr: :meth:`invoke_incr`, then
    :meth:`complete_incr` (or :meth:`complete`, likewise).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._pending: list[_Pending] = []

    def invoke(self, client: int, kind: Kind, key: bytes, value: bytes | None = None) -> OpHandle:
        """Record that ``client`` is about to send a get, set or delete;
        returns its handle.

        ``value`` is the bytes to write for a set, and must be None otherwise.
        """
        if kind not in ("get", "set", "delete"):
            raise ValueError(f"bad kind {kind!r} (a cas or incr has invoke_cas or invoke_incr)")
        if (kind == "set") != (value is not None):
            raise ValueError("value is given for a set and only for a set")
        return self._add(_Pending(client, kind, key, value, self._clock()))

    def invoke_cas(self, client: int, key: bytes, expect: bytes | None, value: bytes | None) -> OpHandle:
        """Record that ``client`` is about to send ``cas(key, expect, value)``
        (``None``: absent, for ``expect``; delete, for ``value``)."""
        pending = _Pending(client, "cas", key, value, self._clock(), expect=expect)
        return self._add(pending)

    def invoke_incr(self, client: int, key: bytes, by: int) -> OpHandle:
        """Record that ``client`` is about to send ``incr(key, by)``."""
        if type(by) is not int or not INT64_MIN <= by <= INT64_MAX:
            raise ValueError("an incr must add a signed 64-bit int")
        return self._add(_Pending(client, "incr", key, None, self._clock(), by=by))

    def complete(self, handle: OpHandle, outcome: Outcome, value: bytes | None = None) -> Op:
        """Record the result of the op ``handle``.

        ``value`` is the result of an ok get (None = not found); it must be
        None for anything else.  A cas or incr can be completed here with
        outcome "fail" or "unknown" only (its ok results have their own
        methods).
        """
        # Take the time first so bookkeeping is not counted inside the interval.
        now = self._clock()
        pending = self._open(handle)
        if value is not None and (pending.kind != "get" or outcome != "ok"):
            raise ValueError("only an ok get completes with a value")
        if outcome == "ok" and pending.kind in ("cas", "incr"):
            raise ValueError(f"an ok {pending.kind} completes with complete_{pending.kind}")
        pending.done = pending.op(None if outcome == "unknown" else now, outcome, value)
        return pending.done

    def complete_cas(
        self,
        handle: OpHandle,
        outcome: Outcome,
        *,
        swapped: bool | None = None,
        observed: bytes | None = None,
    ) -> Op:
        """Record the result of the cas ``handle``: for outcome "ok",
        ``swapped``, and when it is False, ``observed``: the value the reply
        carried (``None``: not found)."""
        now = self._clock()
        pending = self._open(handle, "cas")
        if (outcome == "ok") != (swapped is not None):
            raise ValueError("swapped is given for an ok cas and only for one")
        pending.done = pending.op(
            None if outcome == "unknown" else now, outcome, swapped=swapped, observed=observed
        )
        return pending.done

    def complete_incr(
        self,
        handle: OpHandle,
        outcome: Outcome,
        *,
        result: int | None = None,
        not_integer: bool = False,
    ) -> Op:
        """Record the result of the incr ``handle``: for outcome "ok", either
        ``result`` (the new value answered) or ``not_integer=True`` (the
        ``not_integer`` error: a definite no-op that the checker checks)."""
        now = self._clock()
        pending = self._open(handle, "incr")
        if (outcome == "ok") != ((result is not None) != not_integer):
            raise ValueError("an ok incr has exactly one of result and not_integer, other outcomes neither")
        pending.done = pending.op(
            None if outcome == "unknown" else now,
            outcome,
            None if result is None else format_counter(result),
            not_integer=not_integer,
        )
        return pending.done

    def ops(self) -> list[Op]:
        """All ops so far, in invocation order; unfinished ones as unknown."""
        return [p.done if p.done is not None else p.op(None, "unknown") for p in self._pending]

    def __len__(self) -> int:
        return len(self._pending)

    def _add(self, pending: _Pending) -> OpHandle:
        self._pending.append(pending)
        return OpHandle(len(self._pending) - 1)

    def _open(self, handle: OpHandle, kind: Kind | None = None) -> _Pending:
        pending = self._pending[handle]
        if pending.done is not None:
            raise ValueError(f"op {handle} completed twice")
        if kind is not None and pending.kind != kind:
            raise ValueError(f"op {handle} is a {pending.kind}, not a {kind}")
        return pending
