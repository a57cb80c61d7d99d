"""A nursery whose single error comes out as itself.

trio wraps every error leaving a nursery in an ``ExceptionGroup``. For the
context managers of this project (``open_client``, ``open_node``, ...) the
nursery only runs background helpers, and a caller should see the error of
its own block, or of the one helper that failed, as a plain exception it
can catch with ``except``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

__all__ = ["open_service_nursery"]


@asynccontextmanager
async def open_service_nursery() -> AsyncIterator[trio.Nursery]:
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
