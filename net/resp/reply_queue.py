"""The reply queue of one RESP connection: replies in command order, one
writer.

RESP has no request ids, so replies must go out in the order the commands
came in, while the commands themselves may finish in any order (their
quorum work runs concurrently). The reader reserves a slot per command, in
order; whoever answers fills it; the writer task sends every filled slot at
the head of the queue in one write (``net.stream.send_now``).

Invariants:

- a slot is sent only once every slot reserved before it has been sent;
- a slot's ``on_sent`` runs after its bytes were handed to the stream
  (the session releases the command's in-flight slot there);
- ``wait_room`` blocks the reader while more than ``high_water`` bytes of
  replies are filled but not sent, so a client that reads slowly holds at
  most that much (plus one batch) in this queue;
- the writer returns only once ``close_after_flush`` was called and every
  slot was sent; a send that makes no progress for ``send_timeout`` raises
  ``trio.TooSlowError``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Final

import trio

from net.stream import send_now, wait_to_coalesce

__all__ = ["HIGH_WATER", "ReplyQueue", "Slot"]

#: bytes of filled, unsent replies past which the reader stops reading
HIGH_WATER: Final = 4 * 1024 * 1024


class Slot:
    """The place of one command's reply in the queue."""

    __slots__ = ("data", "on_sent")

    def __init__(self, on_sent: Callable[[], None] | None) -> None:
        self.data: bytes | None = None
        self.on_sent = on_sent


class ReplyQueue:
    """Replies in command order, sent by one writer task (``run``)."""

    def __init__(
        self, stream: trio.abc.SendStream, *, send_timeout: float, high_water: int = HIGH_WATER
    ) -> None:
        self._stream = stream
        self._send_timeout = send_timeout
        self._high_water = high_water
        self._slots: deque[Slot] = deque()
        self._filled_bytes = 0
        self._wakeup = trio.Event()
        self._drained = trio.Event()
        self._closing = False

    def reserve(self, on_sent: Callable[[], None] | None = None) -> Slot:
        slot = Slot(on_sent)
        self._slots.append(slot)
        return slot

    def fill(self, slot: Slot, data: bytes) -> None:
        slot.data = data
        self._filled_bytes += len(data)
        if self._slots[0] is slot:
            self._wakeup.set()

    def put(self, data: bytes, on_sent: Callable[[], None] | None = None) -> None:
        self.fill(self.reserve(on_sent), data)

    def close_after_flush(self) -> None:
        self._closing = True
        self._wakeup.set()

    async def wait_room(self) -> None:
        """Block while more than ``high_water`` bytes of replies wait."""
        while self._filled_bytes > self._high_water:
            if self._drained.is_set():
                self._drained = trio.Event()
            await self._drained.wait()

    async def run(self) -> None:
        """The writer. Returns once closing and every slot is sent; trio's
        broken/closed stream errors and ``TooSlowError`` propagate."""
        slots = self._slots
        while True:
            if slots and slots[0].data is not None:
                batch: list[Slot] = []
                while slots and slots[0].data is not None:
                    batch.append(slots.popleft())
                data = b"".join([s.data for s in batch if s.data is not None])
                self._filled_bytes -= len(data)
                self._drained.set()
                await send_now(self._stream, data, self._send_timeout)
                for s in batch:
                    if s.on_sent is not None:
                        s.on_sent()
                continue
            if not slots and self._closing:
                return
            self._wakeup = trio.Event()
            await self._wakeup.wait()
            await wait_to_coalesce()
