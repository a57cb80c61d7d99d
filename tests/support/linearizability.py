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

Three refinements, each exact (they never change the answer), keep it fast
with many clients and many unknown writes:

* a pending get that the current state satisfies is linearized at once, with
  no alternatives tried;
* an optional write is only applied just before a get that reads its value;
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
linearizable.

To find the window cheaply, the full search reports its frontier (the longest
prefix it managed to linearize); a window around it is doubled until it fails
on its own, then its end is moved as early and its start as late as possible
while it still fails (binary searches, repeated until neither moves).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Sequence

import attrs

from .history import Op, State


class _Wild(enum.Enum):
    """The initial state of a window before any op has pinned it down."""

    WILD = enum.auto()


_SearchState = State | _Wild

_SET, _DELETE, _GET = 0, 1, 2
_KIND_CODE = {"set": _SET, "delete": _DELETE, "get": _GET}
_LINEARIZED, _FORCED, _SKIPPED = 0, 1, 2


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
    ok, frontier = checker.search(0, n)
    if ok:
        return Result(ok=True)

    # Every prefix ending at or before the frontier linearizes, so the
    # violation is near it; windows away from the start of the history are
    # far cheaper to refute than long prefixes.
    width = 8
    while True:
        start, end = max(0, frontier - width), min(n, frontier + width + 1)
        if (start, end) == (0, n) or checker.fails(start, end):
            break
        width *= 2
    # Shrink the end, then the start, until neither moves.  Each binary search
    # keeps a bound that has been verified to fail, so the window reported is
    # always a real witness even where failing is not monotonic.
    while True:
        lo, hi = start + 1, end
        while lo < hi:
            mid = (lo + hi) // 2
            if checker.fails(start, mid):
                hi = mid
            else:
                lo = mid + 1
        new_end = hi
        lo, hi = start, new_end - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if checker.fails(mid, new_end):
                lo = mid
            else:
                hi = mid - 1
        if (lo, new_end) == (start, end):
            break
        start, end = lo, new_end
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
    def __init__(self, ops: list[Op]) -> None:
        self.ops = ops
        self.written = frozenset(op.value for op in ops if op.kind == "set" and op.value is not None)

    def context(self, i: int, j: int) -> list[Op]:
        window = self.ops[i:j]
        if not window:
            return []
        start = window[0].call
        last_get = max((_ret(op) for op in window if op.kind == "get"), default=-math.inf)
        before = [op for op in self.ops[:i] if op.is_write and _ret(op) >= start]
        after = [op for op in self.ops[j:] if op.is_write and op.call <= last_get]
        return before + after

    def search(self, i: int, j: int) -> tuple[bool, int]:
        window = self.ops[i:j]
        context = self.context(i, j)
        optional = [op.outcome != "ok" for op in window] + [True] * len(context)
        initial: _SearchState = None if i == 0 else _Wild.WILD
        return _search(window + context, optional, initial, self.written)

    def fails(self, i: int, j: int) -> bool:
        return not self.search(i, j)[0]


def _search(
    ops: Sequence[Op],
    optional: Sequence[bool],
    initial: _SearchState,
    written: frozenset[bytes],
) -> tuple[bool, int]:
    """Whether ``ops`` linearize from ``initial`` (see the module docstring).

    Also returns the frontier: the largest index ``p`` such that some
    explored partial linearization resolved every required op in
    ``ops[:p]``.  It is meaningful only when ``ops`` are in call order.
    """
    required = sum(not o for o in optional)
    if required == 0:
        # Writes always succeed, so nothing can go wrong.
        return True, len(ops)
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
    # Keyed by (required and state part); values are optional-op bitsets.
    optional_mask = sum(1 << k for k, o in enumerate(optional) if o)
    failed: dict[tuple[int, _SearchState], list[int]] = {}

    def refuted(resolved: int, state: _SearchState) -> bool:
        masks = failed.get((resolved & ~optional_mask, state))
        if masks is None:
            return False
        extra = ~(resolved & optional_mask)
        return any(not m & extra for m in masks)

    # Values read by the candidate gets of the current config, and the first
    # pending return; computed on demand, once per config.
    candidate_reads: tuple[set[State], int] | None = None

    def observable(c: int) -> bool:
        # Applying optional write c now is worth trying only if a get could
        # be linearized right after it and read what it wrote: otherwise, in
        # any completion, c is either overwritten before being read (so can
        # be left out) or can be applied later, just before such a get.
        nonlocal candidate_reads
        effect = effects[op_of[c]]
        own_return = match[c]
        if candidate_reads is None:
            reads: set[State] = set()
            scan = nxt[0]
            while is_call[scan]:
                if kinds[op_of[scan]] == _GET:
                    reads.add(values[op_of[scan]])
                scan = nxt[scan]
            candidate_reads = (reads, scan)
        if own_return != candidate_reads[1]:
            return effect in candidate_reads[0]
        # Resolving c also unblocks the calls up to the next return.
        scan = nxt[0]
        while scan != -1 and (is_call[scan] or scan == own_return):
            if is_call[scan] and kinds[op_of[scan]] == _GET and values[op_of[scan]] == effect:
                return True
            scan = nxt[scan]
        return False

    state = initial
    resolved = 0
    linearized_required = 0
    frontier = 0
    # (call node, state before, how the op was resolved, scan pass)
    stack: list[tuple[int, _SearchState, int, bool]] = []
    # Candidates are scanned in two passes: required ops first, then
    # optional ones, so that leaving optional writes out is explored first
    # and the memo can then cut off most of the branches that apply them.
    node, second_pass = -1, False
    fresh = True
    while True:
        if fresh:
            fresh = False
            candidate_reads = None
            head = nxt[0]
            while head != -1 and is_call[head] and optional[op_of[head]]:
                head = nxt[head]
            frontier = max(frontier, op_of[head] if head != -1 and is_call[head] else len(ops))
            node, second_pass = nxt[0], False
            # A candidate get that the current state satisfies can go first
            # in some valid completion if any exists (gets leave the state
            # alone, and nothing pending had to precede it), so take it with
            # no alternatives.  Not so from WILD, where a get fixes the state.
            if state is not _Wild.WILD:
                scan = node
                while is_call[scan] and not (kinds[op_of[scan]] == _GET and values[op_of[scan]] == state):
                    scan = nxt[scan]
                if is_call[scan]:
                    k = op_of[scan]
                    if refuted(resolved | (1 << k), state):
                        node = -1
                    else:
                        stack.append((scan, state, _FORCED, False))
                        resolved |= 1 << k
                        linearized_required += 1
                        if linearized_required == required:
                            return True, len(ops)
                        lift(scan)
                        fresh = True
                        continue

        if node != -1:
            k = op_of[node]
            if is_call[node]:
                if optional[k] == second_pass:
                    if kinds[k] != _GET:
                        new: _SearchState = effects[k]
                        legal = not optional[k] or observable(node)
                    else:
                        new = values[k]
                        legal = (new is None or new in written) if state is _Wild.WILD else state == new
                    if legal and not refuted(resolved | (1 << k), new):
                        stack.append((node, state, _LINEARIZED, second_pass))
                        state = new
                        resolved |= 1 << k
                        if not optional[k]:
                            linearized_required += 1
                            if linearized_required == required:
                                return True, len(ops)
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
            failed.setdefault((resolved & ~optional_mask, state), []).append(resolved & optional_mask)
            c, state, how, second_pass = stack.pop()
            candidate_reads = None
            k = op_of[c]
            resolved ^= 1 << k
            unlift(c)
            if how != _SKIPPED and not optional[k]:
                linearized_required -= 1
            if how == _LINEARIZED:
                node = nxt[c]
                break
