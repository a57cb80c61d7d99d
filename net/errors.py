"""Errors as types, one per wire error code.

``QkvError`` subclasses map one to one onto the ``error`` codes of the wire
protocol; ``definite`` says whether the request is known not to have been
applied (the client may then report failure) or has an unknown outcome (it
may have taken effect, now or later). ``PeerUnavailable`` never reaches the
wire: it is what a broken or closed peer connection becomes at the
connection boundary.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "BadRequest",
    "Internal",
    "NotInteger",
    "PeerUnavailable",
    "QkvError",
    "ShuttingDown",
    "TooLarge",
    "Unavailable",
    "UnknownOp",
    "error_for_code",
]


class QkvError(Exception):
    """An error answer of the client protocol."""

    code: ClassVar[str] = "internal"
    #: True when the request certainly did not take effect
    definite: ClassVar[bool] = False

    def __init__(self, message: str, *, request_id: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id


class BadRequest(QkvError):
    code = "bad_request"
    definite = True


class TooLarge(QkvError):
    code = "too_large"
    definite = True


class UnknownOp(QkvError):
    code = "unknown_op"
    definite = True


class Unavailable(QkvError):
    code = "unavailable"


class ShuttingDown(QkvError):
    code = "shutting_down"
    definite = True


class Internal(QkvError):
    code = "internal"


class NotInteger(QkvError):
    """``incr`` on a value that is not a canonical signed 64-bit decimal, or
    whose result would leave that range; nothing was changed."""

    code = "not_integer"
    definite = True


_BY_CODE: dict[str, type[QkvError]] = {
    cls.code: cls
    for cls in (BadRequest, TooLarge, UnknownOp, Unavailable, ShuttingDown, Internal, NotInteger)
}


def error_for_code(code: str, message: str, request_id: int | None = None) -> QkvError:
    """The exception for an error reply; unknown codes (a newer node) are
    taken as ``internal``, i.e. of unknown outcome."""
    cls = _BY_CODE.get(code)
    if cls is None:
        return Internal(f"{code}: {message}", request_id=request_id)
    return cls(message, request_id=request_id)


class PeerUnavailable(Exception):
    """A peer could not be reached, or its connection broke or closed."""
