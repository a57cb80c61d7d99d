"""One long-lived worker thread for a store's blocking calls.

A replica hands its storage syncs (and the occasional checkpoint) to this
thread so that the event loop never waits on the disk. Calls run one at a
time, in the order they were submitted, and each one's outcome comes back
into the trio thread through ``TrioToken.run_sync_soon``.

Why not ``trio.to_thread.run_sync``: it is made for occasional calls. Per
call it copies the context, takes a capacity limiter and names the worker
thread (two system calls), and the profile of a loaded node put 11% of its
time there. A sync is made for every group commit, hundreds per second
under load, and needs none of that: the thread is the store's own, for the
store's whole life.

The thread holds the GIL only to pick up a call and report it back: an
fsync releases it, so the loop goes on running while the disk works.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import TypeVar

import outcome
import trio

__all__ = ["DiskThread"]

T = TypeVar("T")
#: (the blocking call, what receives its outcome in the trio thread)
_Job = tuple[Callable[[], object], Callable[[outcome.Outcome[object]], None]]


class DiskThread:
    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._token: trio.lowlevel.TrioToken | None = None

    def start(self) -> None:
        """Start the thread (from the trio thread that will get outcomes)."""
        self._token = trio.lowlevel.current_trio_token()
        threading.Thread(target=self._run, name=self._name, daemon=True).start()

    def stop(self) -> None:
        """Let the thread exit once the calls already submitted are done.
        Their outcomes are still delivered while the trio run lasts."""
        self._jobs.put(None)

    def submit(self, call: Callable[[], T], done: Callable[[outcome.Outcome[T]], None]) -> None:
        """Run ``call`` in the thread; ``done`` gets its outcome in the trio
        thread (never before this returns)."""
        self._jobs.put((call, done))  # type: ignore[arg-type]

    async def run(self, call: Callable[[], T]) -> T:
        """Run ``call`` in the thread and return its result (or raise its
        exception). A call that has started cannot be interrupted, so a
        cancellation takes effect once it has finished."""
        task = trio.lowlevel.current_task()
        self.submit(call, lambda result: trio.lowlevel.reschedule(task, result))
        result: T = await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        return result

    def _run(self) -> None:
        token = self._token
        assert token is not None
        while (job := self._jobs.get()) is not None:
            call, done = job
            result = outcome.capture(call)
            try:
                token.run_sync_soon(done, result)
            except trio.RunFinishedError:
                return  # nobody is left to tell
