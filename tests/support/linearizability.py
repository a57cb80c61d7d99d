"""Linearizability checker for qkv histories (see :mod:`.history` for the model).

What ``check(ops)`` proves
--------------------------
``check`` returns ``ok=True`` exactly when the history is linearizable: there
is a total order of the ops that respects real time (if ``a.ret < b.call``
then ``a`` comes before ``b``) and in which every ok get returns the state
that the register semantics give for that prefix.  Specifically:

* "fail" ops are dropped: they definitely did not happen.
* "unknown" gets are dropped: they constrain nothing.
* "unknown" writes are optional and open-ended: each may be placed anywhere
  after its ``call``, or left out entirely.
* Ops whose intervals merely touch (``a.ret == b.call``) count as concurrent,
  so coarse clock resolution cannot produce false alarms.

Keys are independent registers, and linearizability is compositional, so each
key is checked on its own.

Search
------
The Wing-Gong algorithm with Lowe's memoisation, as used by Knossos and
Porcupine: keep the call/return events of the not-yet-linearized ops in a
doubly linked list sorted by time; scanning from the front, any call seen
before the first return may be linearized next (that is, only ops called
before the earliest pending return are candidates).  Linearizing an op lifts
its two events out of the list; reaching a return event whose op is still
pending means the current prefix is wrong, so backtrack.  A memo of
``(resolved-ops bitset, state)`` pairs prunes configurations already known to
fail.  An optional op whose return event is reached may instead be "skipped"
(resolved without taking effect).  The search is iterative.

Some refinements, each exact (they never change the answer), keep it fast
with many clients and many unknown writes:

* a pending get that the current state satisfies is linearized at once, with
  no alternatives tried;
* an unknown write is only applied just before a get that reads its value,
  and of several with the same effect only the latest-called one is tried;
* of several pending writes with the same effect, only the one due first is
  tried, and a write that no pending get reads is linearized at once;
* a config with fewer optional ops resolved dominates one with more, so the
  memo also prunes configs dominated by one that failed, and optional ops are
  tried after required ones.

Failure windows
---------------
On failure the checker reports a small slice of the failing key's ops, in
call order, that on its own already cannot be ordered.  A slice ``W =
ops[i:j]`` is checked together with context ops ``X``: every write outside
``W`` that could be linearized in the middle of ``W`` (earlier writes that
return after ``W`` starts; later writes called before the last get of ``W``
returns).  Context writes are treated as optional, context gets are dropped,
and when ``i > 0`` the initial state is unknown: it may be ``None`` or any
value written to the key anywhere in the history.  Each of those choices only
makes the slice easier to linearize than it is inside the full history, so a
failing slice is a genuine witness that the whole history is not
linearizable.  (Context writes that no window get reads are left out, as
they could only be overwritten unread.)

To find the window cheaply, the search reports its frontier (how far in time
it managed to linearize): a window around it is doubled until it fails
on its own, then its end is moved as early and its start as late as possible
while it still fails (binary searches, repeated until neither moves).  Since a
violation makes the search of the whole history exhaust every ordering of the
ops before it, which can take long, windows near the frontier are also tried
periodically while that search runs; a failing one settles the matter.  A
window's search may be harder than the whole history's (its initial state and
context are free), so it gets a bounded number of steps and is otherwise
deemed not to fail: that can only make the window larger, never wrong.
"""

from __future__ import annotations

import bisect
import enum
import math
from collections.abc import Generator, Iterable, Sequence

import attrs

from .history import INT64_MAX, INT64_MIN, Op, State, format_counter, parse_counter


class _Wild(enum.Enum):
    """The state of a window before any op has pinned it down."""

    WILD = enum.auto()


class _Illegal(enum.Enum):
    """What an op cannot be linearized at a state yields instead of a state."""

    ILLEGAL = enum.auto()


_SearchState = State | _Wild
_WILD = _Wild.WILD
_ILLEGAL = _Illegal.ILLEGAL

# How the search sees an op:
# - _WRITE: a blind write (set, delete), always legal, leaves ``effect``;
# - _GET: a pure read of one state (a get, or an ok cas that did not swap:
#   it read ``observed``, which differs from ``expect``);
# - _CAS: legal at one state (``expect``), leaves ``effect`` (an ok cas that
#   swapped, or a cas whose outcome is unknown: at any other state that one
#   is a no-op, the same as leaving it out, which the search does anyway);
# - _INCR: an ok incr, legal at the counter(s) ``result - by`` (both None and
#   b"0" count as 0), leaves ``effect``, the canonical result;
# - _BUMP: an incr whose outcome is unknown: legal at any counter that ``by``
#   keeps in range (elsewhere a no-op: left out, as for a cas), leaves the sum;
# - _NOTINT: an incr answered not_integer: a pure read of any state that is
#   not a counter, or that ``by`` would take out of range;
# - _NEVER: an answer no state explains (a cas that did not swap yet saw its
#   own expect; an incr whose result or start is not a 64-bit int).
_WRITE, _GET, _CAS, _INCR, _BUMP, _NOTINT, _NEVER = range(7)
_LINEARIZED, _FORCED, _SKIPPED = 0, 1, 2
# Search steps between chances to look for a violation near the frontier.
_SLICE = 5_000
# How many slices a window gets before it is deemed not to fail.
_WINDOW_SLICES = 4
# Failed optional-op sets remembered per required part and state.
_DOMINANCE_MASKS = 16


@attrs.frozen
class _Model:
    """One op as the search sees it (see the codes above)."""

    code: int
    # The states it is legal at, when they are few (_GET, _CAS, _INCR).
    reads: tuple[State, ...] = ()
    # The state it leaves (_WRITE, _CAS, _INCR).
    effect: State = None
    # _BUMP, _NOTINT.
    by: int = 0

    @property
    def changes(self) -> bool:
        return self.code in (_WRITE, _CAS, _INCR, _BUMP)

    def after(self, state: State) -> State | _Illegal:
        """The state after this op at ``state``, or _ILLEGAL."""
        code = self.code
        if code == _WRITE:
            return self.effect
        if code in (_GET, _CAS, _INCR):
            if state not in self.reads:
                return _ILLEGAL
            return state if code == _GET else self.effect
        if code == _BUMP:
            n = _bump(state, self.by)
            return _ILLEGAL if n is None else format_counter(n)
        if code == _NOTINT:
            return state if _bump(state, self.by) is None else _ILLEGAL
        return _ILLEGAL

    def reads_any_counter(self) -> bool:
        """Whether it may be legal at some counter (what a _BUMP leaves;
        conservative)."""
        if self.code in (_GET, _CAS, _INCR):
            return any(s is not None and parse_counter(s) is not None for s in self.reads)
        return self.code in (_BUMP, _NOTINT)


def _model(op: Op) -> _Model:
    if op.kind == "get":
        return _Model(_GET, (op.value,))
    if op.kind in ("set", "delete"):
        return _Model(_WRITE, effect=op.value)
    if op.kind == "cas":
        if op.outcome != "ok" or op.swapped:
            return _Model(_CAS, (op.expect,), op.value)
        if op.observed == op.expect:
            return _Model(_NEVER)
        return _Model(_GET, (op.observed,))
    assert op.kind == "incr" and op.by is not None
    if op.outcome != "ok":
        return _Model(_BUMP, by=op.by)
    if op.not_integer:
        return _Model(_NOTINT, by=op.by)
    assert op.value is not None
    result = int(op.value)
    start = result - op.by
    if not (INT64_MIN <= result <= INT64_MAX and INT64_MIN <= start <= INT64_MAX):
        return _Model(_NEVER)
    reads: tuple[State, ...] = (format_counter(start), None) if start == 0 else (format_counter(start),)
    return _Model(_INCR, reads, op.value)


def _bump(state: State, by: int) -> int | None:
    """What incr by ``by`` makes of ``state``, or None if it answers
    not_integer."""
    n = parse_counter(state)
    if n is None:
        return None
    n += by
    return n if INT64_MIN <= n <= INT64_MAX else None


@attrs.frozen
class _Start:
    """What a window may start from when it does not start at the key's
    first op: ``None``, any state that an op of the key leaves, and any
    counter at all if some incr of the key has an unknown result.  (More
    than can really be: that only makes windows easier to linearize, so a
    failing one is still a witness.)"""

    written: frozenset[bytes]
    any_counter: bool

    def possible(self, state: State) -> bool:
        if state is None or state in self.written:
            return True
        return self.any_counter and parse_counter(state) is not None

    def after(self, m: _Model) -> _SearchState | _Illegal:
        """The state after op ``m`` when the state is not known yet."""
        code = m.code
        if code == _WRITE:
            return m.effect
        if code in (_GET, _CAS, _INCR):
            for s in m.reads:
                if self.possible(s):
                    return s if code == _GET else m.effect
            return _ILLEGAL
        if code == _BUMP:
            # None is possible, so it is legal; the result is any counter.
            return _WILD
        if code == _NOTINT:
            possible = self.any_counter or any(_bump(s, m.by) is None for s in self.written)
            return _WILD if possible else _ILLEGAL
        return _ILLEGAL


@attrs.frozen(kw_only=True)
class Result:
    ok: bool
    key: bytes | None = None
    # The failing slice of ``key``'s ops (call order); empty when ok.
    window: list[Op] = attrs.field(factory=list)
    # Writes outside the window that may interleave with it (optional).
    context: list[Op] = attrs.field(factory=list)
    # True if the window starts at the key's first op, so the initial state
    # is known to be absent; otherwise any written value could precede it.
    from_start: bool = True

    def describe(self) -> str:
        if self.ok:
            return "history is linearizable"
        start = (
            "absent (window starts at the key's first op)"
            if self.from_start
            else "unknown (None or any value written to the key)"
        )
        n = len(self.window)
        lines = [
            f"not linearizable: key {self.key!r}: these {n} ops cannot be ordered",
            f"initial state: {start}",
            *(_format_op(op) for op in self.window),
        ]
        if self.context:
            lines.append("context (writes that may or may not take effect in between):")
            lines.extend(_format_op(op) for op in self.context)
        return "\n".join(lines)


def _format_op(op: Op) -> str:
    if op.kind == "cas":
        value = f"{_shown(op.expect)} -> {_shown(op.value)}"
        if op.swapped is not None:
            value += " swapped" if op.swapped else f" no swap, saw {_shown(op.observed)}"
    elif op.kind == "incr":
        value = f"{op.by:+d}"
        if op.not_integer:
            value += " not_integer"
        elif op.value is not None:
            value += f" -> {op.value.decode()}"
    else:
        value = "-" if op.value is None and op.kind == "delete" else repr(op.value)
    if len(value) > 40:
        value = value[:37] + "..."
    ret = "never" if op.ret is None else f"{op.ret:.6f}"
    return f"  client {op.client:<3} {op.kind:<6} {value:<40} call={op.call:.6f} ret={ret} {op.outcome}"


def _shown(state: State) -> str:
    text = "absent" if state is None else repr(state)
    return text if len(text) <= 18 else text[:15] + "..."


def check(ops: Iterable[Op]) -> Result:
    """Check a whole multi-key history; report the first failing key."""
    by_key: dict[bytes, list[Op]] = {}
    for op in ops:
        by_key.setdefault(op.key, []).append(op)
    for key in sorted(by_key):
        result = check_key(by_key[key])
        if not result.ok:
            return result
    return Result(ok=True)


def check_key(ops: Sequence[Op]) -> Result:
    """Check the ops of a single key (all ops must share one key)."""
    if len({op.key for op in ops}) > 1:
        raise ValueError("check_key needs ops of a single key")
    relevant = sorted((op for op in ops if _relevant(op)), key=lambda op: (op.call, _ret(op)))
    checker = _KeyChecker(relevant)
    n = len(relevant)
    search = checker.explore(0, n)
    last_frontier, stuck = -math.inf, 0
    while True:
        try:
            frontier = next(search)
        except StopIteration as stop:
            ok, frontier = stop.value
            if ok:
                return Result(ok=True)
            found = checker.failing_window_near(checker.index_at(frontier), max_width=n, whole_fails=True)
            break
        if frontier != last_frontier:
            last_frontier, stuck = frontier, 0
            continue
        # The search is stuck.  A violation makes it exhaust every ordering
        # of the ops before it, but a window around the frontier usually
        # refutes it far cheaper.
        # Look after 1, 2, 4, ... stuck slices, ever wider, so that looking
        # costs little when the history is merely hard.
        stuck += 1
        if stuck & (stuck - 1) == 0:
            found = checker.failing_window_near(
                checker.index_at(frontier), max_width=32 * stuck, whole_fails=False
            )
            if found is not None:
                break
    assert found is not None
    start, end = checker.shrink(*found)
    return Result(
        ok=False,
        key=relevant[0].key,
        window=relevant[start:end],
        context=sorted(checker.context(start, end), key=lambda op: op.call),
        from_start=start == 0,
    )


def _relevant(op: Op) -> bool:
    if op.outcome == "fail":
        return False
    return op.outcome == "ok" or op.is_write


def _ret(op: Op) -> float:
    # Unknown writes may take effect arbitrarily late.
    if op.outcome != "ok" or op.ret is None:
        return math.inf
    return op.ret


class _Readers:
    """A multiset of ops, asked which of them may be legal at a state."""

    def __init__(self) -> None:
        self.exact: dict[State, int] = {}
        self.bumps: list[int] = []
        self.notints: list[int] = []
        # Those that may be legal at some counter.
        self.counters = 0

    def add(self, m: _Model, sign: int) -> None:
        if m.code in (_GET, _CAS, _INCR):
            for s in m.reads:
                self.exact[s] = self.exact.get(s, 0) + sign
        elif m.code in (_BUMP, _NOTINT):
            by_list = self.bumps if m.code == _BUMP else self.notints
            if sign > 0:
                by_list.append(m.by)
            else:
                by_list.remove(m.by)
        if m.reads_any_counter():
            self.counters += sign

    def count(self, state: State) -> int:
        """How many of them may be legal at ``state``."""
        n = self.exact.get(state, 0)
        n += sum(1 for by in self.bumps if _bump(state, by) is not None)
        return n + sum(1 for by in self.notints if _bump(state, by) is None)

    def reads(self, m: _Model) -> bool:
        """Whether one of them other than ``m`` (which is counted in) may be
        legal at some state that ``m`` leaves."""
        if m.code == _BUMP:
            return self.counters > 1
        own = m.reads.count(m.effect) if m.code in (_CAS, _INCR) else 0
        return self.count(m.effect) > own


class _KeyChecker:
    """Checks windows ``ops[i:j]`` of one key's relevant ops (in call order)."""

    def __init__(self, ops: list[Op]) -> None:
        self.ops = ops
        self.calls = [op.call for op in ops]
        self.models = [_model(op) for op in ops]
        written = frozenset(
            m.effect for m in self.models if m.code in (_WRITE, _CAS, _INCR) and m.effect is not None
        )
        self.start = _Start(written, any(m.code == _BUMP for m in self.models))

    def context(self, i: int, j: int) -> list[Op]:
        return [self.ops[k] for k in self._context(i, j)]

    def _context(self, i: int, j: int) -> list[int]:
        """The ops outside ``ops[i:j]`` that may change the state in the
        middle of it: earlier ones that return after it starts, later ones
        called before its last required read (any ok op but a blind write)
        returns.  Optional ops of the window that would come after that read
        can be left out, as nothing that must happen reads what they leave."""
        window = self.ops[i:j]
        if not window:
            return []
        models = self.models
        start = window[0].call
        reads = [op for op, m in zip(window, models[i:j], strict=True) if m.code != _WRITE]
        last_read = max((_ret(op) for op in reads if op.outcome == "ok"), default=-math.inf)
        before = [k for k in range(i) if models[k].changes and _ret(self.ops[k]) >= start]
        after = [k for k in range(j, len(self.ops)) if models[k].changes and self.ops[k].call <= last_read]
        # An op that leaves a state no other op here may be legal at can
        # always be left out: the next op after it, if any, is a blind write.
        # Leaving one out can only make others unread, so repeat.  Unknown
        # blind writes only ever take effect right before an op that reads
        # them (see _explore), so keep at most as many per effect as there
        # are such ops, preferring the earliest-called.
        pool = _Readers()
        for m in models[i:j]:
            pool.add(m, 1)
        changing = [k for k in before + after if models[k].code != _WRITE]
        for k in changing:
            pool.add(models[k], 1)
        while True:
            unread = [k for k in changing if not pool.reads(models[k])]
            if not unread:
                break
            for k in unread:
                pool.add(models[k], -1)
            dropped = set(unread)
            changing = [k for k in changing if k not in dropped]
        kept = set(changing)
        budget: dict[State, int] = {}
        for k in before + after:
            m = models[k]
            if m.code != _WRITE:
                continue
            if m.effect not in budget:
                budget[m.effect] = pool.count(m.effect)
            if budget[m.effect] == 0:
                continue
            if self.ops[k].outcome == "unknown":
                budget[m.effect] -= 1
            kept.add(k)
        return sorted(kept)

    def explore(self, i: int, j: int) -> Generator[float, None, tuple[bool, float]]:
        window = self.ops[i:j]
        context = self._context(i, j)
        ops = window + [self.ops[k] for k in context]
        models = self.models[i:j] + [self.models[k] for k in context]
        optional = [op.outcome != "ok" for op in window] + [True] * len(context)
        initial: _SearchState = None if i == 0 else _WILD
        return _explore(ops, models, optional, initial, self.start)

    def index_at(self, time: float) -> int:
        """The last op called at or before ``time`` (or the first op)."""
        return max(0, bisect.bisect_right(self.calls, time) - 1)

    def search(self, i: int, j: int) -> tuple[bool | None, int]:
        """Whether window ``ops[i:j]`` linearizes, and where its search got
        stuck (as an index, see ``index_at``).

        A window can be much harder than the whole history (its initial
        state and context are free), so the search gives up (None) after
        ``_WINDOW_SLICES`` slices; failing windows are not missed for long,
        as the caller then tries wider ones, down to the whole history.
        """
        if i >= j:
            return True, j
        search = self.explore(i, j)
        for _ in range(_WINDOW_SLICES):
            try:
                next(search)
            except StopIteration as stop:
                ok, frontier = stop.value
                return ok, self.index_at(frontier)
        return None, i

    def fails(self, i: int, j: int) -> bool:
        return self.search(i, j)[0] is False

    def failing_window_near(
        self, frontier: int, *, max_width: int, whole_fails: bool
    ) -> tuple[int, int] | None:
        """A failing window around ``frontier``, grown by doubling up to
        ``max_width`` each side, or None.

        Once some window fails, zoom in on where its own search got stuck:
        that is where the violation is, and windows starting close to it are
        refuted much faster than ones that must first be exhausted up to it.
        """
        lo, hi, known = 0, len(self.ops), whole_fails
        width = 8
        while True:
            start, end = max(lo, frontier - width), min(hi, frontier + width + 1)
            if (start, end) == (lo, hi):
                # Not searched here: either it is known to fail or it is the
                # whole history, whose search the caller is running.
                return (lo, hi) if known else None
            ok, stuck = self.search(start, end)
            if ok is False:
                lo, hi, known = start, end, True
                frontier, width = min(max(stuck, lo), hi - 1), 8
                continue
            if not known and width >= max_width:
                return None
            width *= 2

    def shrink(self, start: int, end: int) -> tuple[int, int]:
        """Move the end of a failing window as early, and then its start as
        late, as possible, until neither moves.

        Each binary search keeps a bound verified to fail, so the result is
        always a real witness even where failing is not monotonic.
        """
        while True:
            lo, hi = start + 1, end
            while lo < hi:
                mid = (lo + hi) // 2
                if self.fails(start, mid):
                    hi = mid
                else:
                    lo = mid + 1
            end = hi
            lo, hi = start, end - 1
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if self.fails(mid, end):
                    lo = mid
                else:
                    hi = mid - 1
            if lo == start:
                return start, end
            start = lo


def _explore(
    ops: Sequence[Op],
    models: Sequence[_Model],
    optional: Sequence[bool],
    initial: _SearchState,
    start: _Start,
) -> Generator[float, None, tuple[bool, float]]:
    """Search for a linearization of ``ops`` (seen as ``models``) from
    ``initial``; from WILD, ``start`` says what the state may be.

    Returns whether there is one, and the frontier: the latest time that
    some explored partial linearization got to, i.e. the latest first
    pending return.  A violation stops every ordering before the return of
    some op involved in it, so the frontier points there.  Yields the
    frontier so far every ``_SLICE`` steps, so that callers can look for a
    cheaper witness meanwhile.
    """
    required = sum(not o for o in optional)
    if required == 0:
        # Optional ops may all be left out, so nothing can go wrong.
        return True, math.inf
    kinds = [m.code for m in models]
    # The states each op may be legal at, when they are few.
    reads = [m.reads for m in models]
    # What a get reads; what a write, cas or incr with a known result leaves.
    values = [m.reads[0] if m.code == _GET else None for m in models]
    effects = [m.effect for m in models]
    bys = [m.by for m in models]
    # Ops with equal signatures are legal at the same states and leave the
    # same ones; a blind write's is its effect.
    sigs: list[object] = [
        m.effect if m.code == _WRITE else (m.code, m.reads, m.effect, m.by) if m.changes else None
        for m in models
    ]

    # Calls sort before returns at equal times: touching intervals overlap.
    events = sorted(
        [(op.call, 0, k) for k, op in enumerate(ops)] + [(_ret(op), 1, k) for k, op in enumerate(ops)]
    )
    # Node 0 is the list head; node e + 1 is events[e]; -1 terminates.
    size = len(events) + 1
    nxt = [*range(1, size), -1]
    prv = [-1, *range(size - 1)]
    is_call = [False] * size
    times = [-math.inf] + [t for t, _, _ in events]
    op_of = [0] * size
    match = [0] * size
    call_node = [0] * len(ops)
    for e, (_, ret_flag, k) in enumerate(events):
        node = e + 1
        op_of[node] = k
        if ret_flag:
            match[node] = call_node[k]
            match[call_node[k]] = node
        else:
            is_call[node] = True
            call_node[k] = node

    def lift(c: int) -> None:
        r = match[c]
        nxt[prv[c]] = nxt[c]
        prv[nxt[c]] = prv[c]
        nxt[prv[r]] = nxt[r]
        if nxt[r] != -1:
            prv[nxt[r]] = prv[r]

    def unlift(c: int) -> None:
        # Exact inverse of lift, valid because lifts are undone in LIFO order.
        r = match[c]
        nxt[prv[r]] = r
        if nxt[r] != -1:
            prv[nxt[r]] = r
        nxt[prv[c]] = c
        prv[nxt[c]] = c

    # Lowe's memo, strengthened: a config with fewer optional ops resolved
    # can do anything one with more resolved can (it may still skip them),
    # so a failed config also refutes every config it dominates this way.
    # Failed configs are kept exactly, and also keyed by their required and
    # state part, with a bounded number of optional-op bitsets each (pruning
    # less is always safe; scanning long lists would cost more than it saves).
    optional_mask = sum(1 << k for k, o in enumerate(optional) if o)
    failed: set[tuple[int, _SearchState]] = set()
    failed_optional: dict[tuple[int, _SearchState], list[int]] = {}

    def refuted(resolved: int, state: _SearchState) -> bool:
        if (resolved, state) in failed:
            return True
        masks = failed_optional.get((resolved & ~optional_mask, state))
        if masks is None:
            return False
        extra = ~(resolved & optional_mask)
        return any(not m & extra for m in masks)

    def refute(resolved: int, state: _SearchState) -> None:
        failed.add((resolved, state))
        if optional_mask:
            masks = failed_optional.setdefault((resolved & ~optional_mask, state), [])
            if len(masks) < _DOMINANCE_MASKS:
                masks.append(resolved & optional_mask)

    rets = [_ret(op) for op in ops]
    # Pending ops per state they may be legal at, for the few-states ones;
    # and how many pending _BUMP and _NOTINT ops, which may be legal at
    # many states.
    unread: dict[State, int] = {}
    for k in range(len(ops)):
        for v in reads[k]:
            unread[v] = unread.get(v, 0) + 1
    wild = [kinds.count(_BUMP), kinds.count(_NOTINT)]
    has_wild = any(wild)
    notint_bys = [bys[k] for k in range(len(ops)) if kinds[k] == _NOTINT]
    low_by, high_by = min(notint_bys, default=0), max(notint_bys, default=0)
    # Whether open-ended incrs commute: no order of them can leave the
    # signed 64-bit range from any counter that can arise here (one that an
    # op reads or leaves, plus what they add).
    largest = max(
        (abs(n) for m in models for v in (*m.reads, m.effect) if (n := parse_counter(v)) is not None),
        default=0,
    )
    commute = largest + sum(abs(bys[k]) for k in range(len(ops)) if kinds[k] == _BUMP) <= INT64_MAX

    def wild_reads(v: State) -> bool:
        """Whether some pending _BUMP or _NOTINT may be legal at ``v``
        (conservative: True is always safe)."""
        n = parse_counter(v)
        if n is None:
            return wild[1] > 0
        return wild[0] > 0 or (wild[1] > 0 and not INT64_MIN <= n + low_by <= n + high_by <= INT64_MAX)

    def take(k: int) -> None:
        """Op ``k`` is resolved: it no longer reads anything."""
        for v in reads[k]:
            unread[v] -= 1
        if kinds[k] == _BUMP:
            wild[0] -= 1
        elif kinds[k] == _NOTINT:
            wild[1] -= 1

    def give(k: int) -> None:
        for v in reads[k]:
            unread[v] += 1
        if kinds[k] == _BUMP:
            wild[0] += 1
        elif kinds[k] == _NOTINT:
            wild[1] += 1

    open_ended = [o and r == math.inf for o, r in zip(optional, rets, strict=True)]
    # For the current config, computed on demand: how many candidates may be
    # legal at each state (few-states ones), how many candidate _BUMPs, the
    # candidate _NOTINTs, and per signature the open-ended candidate called
    # last and the required candidate due first.
    _Candidates = tuple[dict[State, int], list[int], list[int], dict[object, int], dict[object, int]]
    candidates: _Candidates | None = None

    def worth_trying(c: int, new: _SearchState) -> bool:
        """Whether linearizing candidate ``c`` next, which leaves ``new``,
        needs trying: it does not when another move is at least as good in
        every completion."""
        nonlocal candidates
        k = op_of[c]
        if optional[k] and not open_ended[k]:
            # Applying it only matters if some op is then legal at what it
            # leaves; otherwise the next op is a blind write, or there is
            # none, and it can be skipped when its return comes instead.
            if new is _WILD:
                return True
            return bool(unread.get(new)) or (has_wild and wild_reads(new))
        if candidates is None:
            exact: dict[State, int] = {}
            bumps: list[int] = []
            notints: list[int] = []
            last_open: dict[object, int] = {}
            first_due: dict[object, int] = {}
            scan = nxt[0]
            while is_call[scan]:
                j = op_of[scan]
                for v in reads[j]:
                    exact[v] = exact.get(v, 0) + 1
                kind = kinds[j]
                if kind == _BUMP:
                    bumps.append(bys[j])
                elif kind == _NOTINT:
                    notints.append(j)
                if sigs[j] is not None or kind == _WRITE:
                    if open_ended[j]:
                        last_open[sigs[j]] = scan
                    elif not optional[j]:
                        due = first_due.get(sigs[j])
                        # Return nodes are numbered in event order.
                        if due is None or match[scan] < match[due]:
                            first_due[sigs[j]] = scan
                scan = nxt[scan]
            candidates = (exact, bumps, notints, last_open, first_due)
        exact, bumps, notints, last_open, first_due = candidates
        sig = sigs[k]
        if not optional[k]:
            # Required ops with the same signature are interchangeable, and
            # nothing constrains the order of candidates, so which of them
            # is still pending matters only through its return time:
            # complete the one due first.
            return first_due[sig] == c
        # An open-ended op never blocks anything and stays a candidate, so
        # applying it is worth trying only just before another candidate
        # that is then legal: otherwise, in any completion, what it leaves
        # is overwritten unread (so it can be left out) or it can be applied
        # later.  And of those with the same signature, spend the one
        # called last (an earlier one can go wherever it can), and none
        # while a required one can go instead.
        if sig in first_due or last_open[sig] != c:
            return False
        if new is _WILD:
            return True
        if any(_bump(new, bys[j]) is None for j in notints):
            return True
        n = parse_counter(new)
        if n is None or not bumps or (kinds[k] == _BUMP and len(bumps) == 1):
            return exact.get(new, 0) > reads[k].count(new)
        if not commute:
            return True
        # Other open-ended incrs may follow before that candidate, in
        # increasing order of ``by`` (see below): it must then be legal at
        # a counter they can reach.
        low = high = n
        mine = bys[k] if kinds[k] == _BUMP else None
        skip_own = mine is not None
        for by in bumps:
            if skip_own and by == mine:
                skip_own = False
            elif mine is None or by >= mine:
                if by < 0:
                    low += by
                else:
                    high += by
        for target, count in exact.items():
            if count > reads[k].count(target):
                m = parse_counter(target)
                if m is not None and low <= m <= high and (target is not None or m == n):
                    return True
        return False

    state = initial
    resolved = 0
    # Each application of an open-ended blind write is directly followed by
    # an op legal at its effect (see worth_trying), so per effect only as
    # many of them as there are such ops can ever be used, the
    # earliest-called being the most flexible; settle the rest up front as
    # never applied.
    budget: dict[State, int] = {}
    blind_open = [k for k in range(len(ops)) if open_ended[k] and kinds[k] == _WRITE]
    for k in sorted(blind_open, key=lambda k: ops[k].call):
        effect = effects[k]
        if effect not in budget:
            budget[effect] = unread.get(effect, 0)
            for j in range(len(ops)) if has_wild else ():
                if kinds[j] in (_BUMP, _NOTINT) and models[j].after(effect) is not _ILLEGAL:
                    budget[effect] += 1
        if budget[effect] > 0:
            budget[effect] -= 1
        else:
            resolved |= 1 << k
            lift(call_node[k])
            open_ended[k] = False

    # The memo's key for the resolved ops is canonical for open-ended ones:
    # those with one signature that are called are interchangeable (any of
    # them can go wherever another can), and a used one was called, so
    # having used j of them is keyed as having used the j called first,
    # whichever were.  Ops of different signatures, or that are not
    # open-ended, have their own bit.  So configs that differ only in which
    # of several equal unknown writes or incrs they spent share memo entries.
    pools: dict[object, list[int]] = {}
    for k in sorted((k for k in range(len(ops)) if open_ended[k]), key=lambda k: ops[k].call):
        pools.setdefault(sigs[k], []).append(k)
    pool_of: list[list[int] | None] = [pools[sigs[k]] if open_ended[k] else None for k in range(len(ops))]
    used: dict[object, int] = dict.fromkeys(pools, 0)

    def bit(k: int) -> int:
        """The memo bit that resolving op ``k`` next sets."""
        pool = pool_of[k]
        return 1 << k if pool is None else 1 << pool[used[sigs[k]]]

    def settle(k: int) -> int:
        """Resolve op ``k`` in the memo key; returns its bit."""
        b = bit(k)
        if pool_of[k] is not None:
            used[sigs[k]] += 1
        return b

    def unsettle(k: int) -> int:
        if pool_of[k] is None:
            return 1 << k
        used[sigs[k]] -= 1
        return bit(k)

    linearized_required = 0
    frontier = -math.inf
    steps = 0
    # (call node, state before, how the op was resolved, scan pass)
    stack: list[tuple[int, _SearchState, int, bool]] = []
    # Candidates are scanned in two passes: required ops first, then
    # optional ones, so that leaving optional writes out is explored first
    # and the memo can then cut off most of the branches that apply them.
    node, second_pass = -1, False
    new: _SearchState = None
    fresh = True
    while True:
        if fresh:
            fresh = False
            candidates = None
            steps += 1
            if steps % _SLICE == 0:
                yield frontier
            node, second_pass = nxt[0], False
            # Moves that can go first in some valid completion if any exists,
            # so are taken with no alternatives tried:
            # - a candidate pure read (a get, a cas that did not swap, an
            #   incr that answered not_integer) that the current state
            #   satisfies (it leaves the state alone, and nothing pending had
            #   to precede it);
            # - failing that, a required candidate blind write that no
            #   pending op may be legal after, if the first pending return is
            #   a required op's and no candidate cas or incr is legal now:
            #   then the completion starts with a blind write (it cannot
            #   start with a read, a cas or an incr, nor skip anything), and
            #   a write that is never read can move to just before it.
            # Neither holds from WILD, where a get fixes the state.
            tame = state is not _WILD
            forced = unread_write = -1
            blocked = False
            scan = node
            while is_call[scan]:
                if tame:
                    j = op_of[scan]
                    kind = kinds[j]
                    if kind == _GET:
                        if values[j] == state:
                            forced = scan
                            break
                    elif kind == _WRITE:
                        if (
                            unread_write == -1
                            and not optional[j]
                            and not unread.get(effects[j])
                            and not (has_wild and wild_reads(effects[j]))
                        ):
                            unread_write = scan
                    elif kind == _NOTINT:
                        if _bump(state, bys[j]) is None:  # type: ignore[arg-type]
                            forced = scan
                            break
                    elif not blocked and models[j].after(state) is not _ILLEGAL:
                        blocked = True
                scan = nxt[scan]
            else:
                frontier = max(frontier, times[scan])
                if unread_write != -1 and not blocked and not optional[op_of[scan]]:
                    forced = unread_write
            if forced != -1:
                k = op_of[forced]
                kind = kinds[k]
                new = values[k] if kind == _GET else effects[k] if kind == _WRITE else state
                if refuted(resolved | bit(k), new):
                    node = -1
                else:
                    stack.append((forced, state, _FORCED, False))
                    take(k)
                    state = new
                    resolved |= settle(k)
                    linearized_required += 1
                    if linearized_required == required:
                        return True, math.inf
                    lift(forced)
                    fresh = True
                    continue

        if node != -1:
            k = op_of[node]
            if is_call[node]:
                if optional[k] == second_pass:
                    kind = kinds[k]
                    if kind == _GET:
                        new = values[k]
                        legal = start.possible(new) if state is _WILD else state == new
                    elif kind == _WRITE:
                        new = effects[k]
                        legal = worth_trying(node, new)
                    else:
                        after = start.after(models[k]) if state is _WILD else models[k].after(state)
                        legal = after is not _ILLEGAL
                        if legal:
                            new = after  # type: ignore[assignment]
                            legal = kind == _NOTINT or worth_trying(node, new)
                    if optional[k] and new == state:
                        # Changes nothing: leaving it pending is as good.
                        legal = False
                    elif kind == _BUMP and commute and stack:
                        # Consecutive open-ended incrs commute, so take them
                        # in increasing order of ``by``.
                        last, _, how, _ = stack[-1]
                        j = op_of[last]
                        if how == _LINEARIZED and kinds[j] == _BUMP and bys[j] > bys[k]:
                            legal = False
                    if legal and not refuted(resolved | bit(k), new):
                        stack.append((node, state, _LINEARIZED, second_pass))
                        take(k)
                        state = new
                        resolved |= settle(k)
                        if not optional[k]:
                            linearized_required += 1
                            if linearized_required == required:
                                return True, math.inf
                        lift(node)
                        fresh = True
                        continue
                node = nxt[node]
                continue
            if not second_pass:
                node, second_pass = nxt[0], True
                continue
            if optional[k] and not refuted(resolved | bit(k), state):
                stack.append((match[node], state, _SKIPPED, True))
                take(k)
                resolved |= settle(k)
                lift(match[node])
                fresh = True
                continue

        # A pending op must have taken effect before this return, so the
        # current config is dead: undo the latest choice and try the next
        # candidate after it.  Forced moves and skips had no alternatives,
        # so keep unwinding past them.
        while True:
            if not stack:
                return False, frontier
            refute(resolved, state)
            c, state, how, second_pass = stack.pop()
            candidates = None
            k = op_of[c]
            resolved ^= unsettle(k)
            unlift(c)
            give(k)
            if how != _SKIPPED and not optional[k]:
                linearized_required -= 1
            if how == _LINEARIZED:
                node = nxt[c]
                break
