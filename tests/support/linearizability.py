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

from .history import Op, State


class _Wild(enum.Enum):
    """The initial state of a window before any op has pinned it down."""

    WILD = enum.auto()


_SearchState = State | _Wild

_SET, _DELETE, _GET = 0, 1, 2
_KIND_CODE = {"set": _SET, "delete": _DELETE, "get": _GET}
_LINEARIZED, _FORCED, _SKIPPED = 0, 1, 2
# Search steps between chances to look for a violation near the frontier.
_SLICE = 5_000
# How many slices a window gets before it is deemed not to fail.
_WINDOW_SLICES = 4
# Failed optional-op sets remembered per required part and state.
_DOMINANCE_MASKS = 16


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
    value = "-" if op.value is None and op.kind == "delete" else repr(op.value)
    if len(value) > 40:
        value = value[:37] + "..."
    ret = "never" if op.ret is None else f"{op.ret:.6f}"
    return f"  client {op.client:<3} {op.kind:<6} {value:<40} call={op.call:.6f} ret={ret} {op.outcome}"


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


class _KeyChecker:
    """Checks windows ``ops[i:j]`` of one key's relevant ops (in call order)."""

    def __init__(self, ops: list[Op]) -> None:
        self.ops = ops
        self.calls = [op.call for op in ops]
        self.written = frozenset(op.value for op in ops if op.kind == "set" and op.value is not None)

    def context(self, i: int, j: int) -> list[Op]:
        window = self.ops[i:j]
        if not window:
            return []
        start = window[0].call
        last_get = max((_ret(op) for op in window if op.kind == "get"), default=-math.inf)
        before = [op for op in self.ops[:i] if op.is_write and _ret(op) >= start]
        after = [op for op in self.ops[j:] if op.is_write and op.call <= last_get]
        # A context write that no window get reads can always be left out
        # (it is overwritten unread, or last).  Unknown writes only ever take
        # effect right before a get that reads them (see _explore), so keep
        # at most as many per effect as the window has such gets, preferring
        # the earliest-called.
        budget: dict[State, int] = {}
        for op in window:
            if op.kind == "get":
                budget[op.value] = budget.get(op.value, 0) + 1
        context = []
        for op in sorted(before + after, key=lambda op: op.call):
            effect = op.value if op.kind == "set" else None
            if budget.get(effect, 0) == 0:
                continue
            if op.outcome == "unknown":
                budget[effect] -= 1
            context.append(op)
        return context

    def explore(self, i: int, j: int) -> Generator[float, None, tuple[bool, float]]:
        window = self.ops[i:j]
        context = self.context(i, j)
        optional = [op.outcome != "ok" for op in window] + [True] * len(context)
        initial: _SearchState = None if i == 0 else _Wild.WILD
        return _explore(window + context, optional, initial, self.written)

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
    optional: Sequence[bool],
    initial: _SearchState,
    written: frozenset[bytes],
) -> Generator[float, None, tuple[bool, float]]:
    """Search for a linearization of ``ops`` from ``initial``.

    Returns whether there is one, and the frontier: the latest time that
    some explored partial linearization got to, i.e. the latest first
    pending return.  A violation stops every ordering before the return of
    some op involved in it, so the frontier points there.  Yields the
    frontier so far every ``_SLICE`` steps, so that callers can look for a
    cheaper witness meanwhile.
    """
    required = sum(not o for o in optional)
    if required == 0:
        # Writes always succeed, so nothing can go wrong.
        return True, math.inf
    kinds = [_KIND_CODE[op.kind] for op in ops]
    values = [op.value for op in ops]
    # What each write leaves behind; None for gets, which leave the state.
    effects = [op.value if op.kind == "set" else None for op in ops]

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
    # Pending gets per value they read.
    unread: dict[State, int] = {}
    for k in range(len(ops)):
        if kinds[k] == _GET:
            unread[values[k]] = unread.get(values[k], 0) + 1
    open_ended = [o and r == math.inf for o, r in zip(optional, rets, strict=True)]
    # For the current config, computed on demand: the values read by
    # candidate gets, and per effect the open-ended candidate write called
    # last and the required candidate write due first.
    candidates: tuple[set[State], dict[State, int], dict[State, int]] | None = None

    def worth_trying(c: int) -> bool:
        """Whether linearizing candidate write ``c`` next needs trying: it
        does not when another move is at least as good in every completion."""
        nonlocal candidates
        k = op_of[c]
        if optional[k] and not open_ended[k]:
            # Applying it only matters if some get reads it; otherwise it can
            # be skipped when its return comes.
            return bool(unread.get(effects[k]))
        if candidates is None:
            reads: set[State] = set()
            last_open: dict[State, int] = {}
            first_due: dict[State, int] = {}
            scan = nxt[0]
            while is_call[scan]:
                j = op_of[scan]
                if kinds[j] == _GET:
                    reads.add(values[j])
                elif open_ended[j]:
                    last_open[effects[j]] = scan
                elif not optional[j]:
                    due = first_due.get(effects[j])
                    # Return nodes are numbered in event order.
                    if due is None or match[scan] < match[due]:
                        first_due[effects[j]] = scan
                scan = nxt[scan]
            candidates = (reads, last_open, first_due)
        reads, last_open, first_due = candidates
        effect = effects[k]
        if not optional[k]:
            # Required writes with the same effect are interchangeable, and
            # nothing constrains the order of candidates, so which of them is
            # still pending matters only through its return time: complete
            # the one due first.
            return first_due[effect] == c
        # An open-ended write never blocks anything and stays a candidate,
        # so applying it is worth trying only just before a candidate get
        # that reads it: otherwise, in any completion, it is overwritten
        # unread (so can be left out) or can be applied later.  And of those
        # with the same effect, spend the one called last (an earlier one can
        # go wherever it can), and none while a required one can go instead.
        return effect in reads and effect not in first_due and last_open[effect] == c

    state = initial
    resolved = 0
    # Each application of an open-ended write is directly followed by a get
    # reading its effect (see worth_trying), so per effect only as many of
    # them as there are such gets can ever be used, the earliest-called being
    # the most flexible; settle the rest up front as never applied.
    budget = dict(unread)
    for k in sorted((k for k in range(len(ops)) if open_ended[k]), key=lambda k: ops[k].call):
        if budget.get(effects[k], 0) > 0:
            budget[effects[k]] -= 1
        else:
            resolved |= 1 << k
            lift(call_node[k])
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
            # - a candidate get that the current state satisfies (gets leave
            #   the state alone, and nothing pending had to precede it);
            # - failing that, a required candidate write that no pending get
            #   reads, if the first pending return is a required op's: then
            #   the completion starts with a write (it cannot start with a
            #   get, nor skip anything), and a write that is never read can
            #   move to just before the first write.
            # Neither holds from WILD, where a get fixes the state.
            tame = state is not _Wild.WILD
            forced = unread_write = -1
            scan = node
            while is_call[scan]:
                if tame:
                    j = op_of[scan]
                    if kinds[j] == _GET:
                        if values[j] == state:
                            forced = scan
                            break
                    elif unread_write == -1 and not optional[j] and not unread.get(effects[j]):
                        unread_write = scan
                scan = nxt[scan]
            else:
                frontier = max(frontier, times[scan])
                if unread_write != -1 and not optional[op_of[scan]]:
                    forced = unread_write
            if forced != -1:
                k = op_of[forced]
                new = values[k] if kinds[k] == _GET else effects[k]
                if refuted(resolved | (1 << k), new):
                    node = -1
                else:
                    stack.append((forced, state, _FORCED, False))
                    if kinds[k] == _GET:
                        unread[values[k]] -= 1
                    state = new
                    resolved |= 1 << k
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
                    if kinds[k] != _GET:
                        new = effects[k]
                        legal = worth_trying(node)
                    else:
                        new = values[k]
                        legal = (new is None or new in written) if state is _Wild.WILD else state == new
                    if legal and not refuted(resolved | (1 << k), new):
                        stack.append((node, state, _LINEARIZED, second_pass))
                        if kinds[k] == _GET:
                            unread[values[k]] -= 1
                        state = new
                        resolved |= 1 << k
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
            if optional[k] and not refuted(resolved | (1 << k), state):
                stack.append((match[node], state, _SKIPPED, True))
                resolved |= 1 << k
                lift(match[node])
                fresh = True
                continue

        # A pending op must have taken effect before this return, so the
        # current config is dead: undo the latest choice and try the next
        # candidate after it.  Forced gets and skips had no alternatives, so
        # keep unwinding past them.
        while True:
            if not stack:
                return False, frontier
            refute(resolved, state)
            c, state, how, second_pass = stack.pop()
            candidates = None
            k = op_of[c]
            resolved ^= 1 << k
            unlift(c)
            if kinds[k] == _GET:
                unread[values[k]] += 1
            if how != _SKIPPED and not optional[k]:
                linearized_required -= 1
            if how == _LINEARIZED:
                node = nxt[c]
                break
