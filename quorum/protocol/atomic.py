"""The functions of ``cas`` and ``incr`` on a register's value.

A CASPaxos round (``quorum.protocol.operation``) reads the current value
from a majority, applies one of these, and writes the result. They are
pure: the same current value always gives the same outcome, so a round that
is retried computes the same thing from the same state.

``incr`` takes only canonical signed 64-bit decimals: ``0``, or an optional
``-`` then a digit 1-9 then digits. ``05``, ``-0``, ``+5``, `` 5`` are not
canonical; accepting them would make ``incr`` rewrite a value's spelling as
a side effect, and two spellings of one number would compare unequal in a
``cas``.
"""

from __future__ import annotations

import re
from typing import Final

import attrs

__all__ = [
    "MAX_INT64",
    "MIN_INT64",
    "CasOutcome",
    "IncrOutcome",
    "NotAnInteger",
    "apply_cas",
    "apply_incr",
    "parse_counter",
]

MIN_INT64: Final = -(2**63)
MAX_INT64: Final = 2**63 - 1
_CANONICAL: Final = re.compile(rb"0|-?[1-9][0-9]*")


class NotAnInteger(Exception):
    """The value is not a canonical signed 64-bit decimal, or the result of
    the increment would leave that range."""


def parse_counter(value: bytes | None) -> int:
    """The integer a register holds for ``incr`` (not found counts as 0)."""
    if value is None:
        return 0
    # At most 20 bytes: "-9223372036854775808". Checked first so that a
    # huge value costs nothing to refuse.
    if len(value) > 20 or _CANONICAL.fullmatch(value) is None:
        raise NotAnInteger("value is not a decimal integer")
    number = int(value)
    if not MIN_INT64 <= number <= MAX_INT64:
        raise NotAnInteger("value is out of the signed 64-bit range")
    return number


@attrs.frozen
class IncrOutcome:
    number: int
    value: bytes


def apply_incr(current: bytes | None, by: int) -> IncrOutcome:
    """The new value of an ``incr`` by ``by``; raises ``NotAnInteger``."""
    number = parse_counter(current) + by
    if not MIN_INT64 <= number <= MAX_INT64:
        raise NotAnInteger("increment or decrement would overflow")
    return IncrOutcome(number, str(number).encode("ascii"))


@attrs.frozen
class CasOutcome:
    swapped: bool
    #: the register's value afterwards (None: not found)
    value: bytes | None


def apply_cas(current: bytes | None, expect: bytes | None, value: bytes | None) -> CasOutcome:
    """Compare ``current`` (None: not found) with ``expect``; swap in ``value``."""
    if current == expect:
        return CasOutcome(True, value)
    return CasOutcome(False, current)
