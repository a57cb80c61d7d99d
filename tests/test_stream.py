"""net.stream: the outbox's coalescing (the flusher for plain sockets, the
idle wait for other streams), and frames over a real socket pair (the
direct non-blocking read and write path, partial writes included)."""

from __future__ import annotations

import os

import pytest
import trio
import trio.testing

from net.framing import FrameDecoder
from net.stream import FramedReader, Outbox

MAX_FRAME = 8 * 1024 * 1024


class RecordingStream(trio.abc.SendStream):
    """A send stream that keeps each ``send_all`` as one write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def bodies_of(writes: list[bytes]) -> list[bytes]:
    decoder = FrameDecoder(MAX_FRAME)
    for write in writes:
        decoder.feed(write)
    return decoder.frames()


async def test_messages_queued_by_a_chain_of_woken_tasks_share_one_write() -> None:
    """The writer waits until no task has work left, not one scheduler pass:
    a message put by a task that another producer woke still makes the same
    write (the point of the idle wait: one send, one wake-up of the peer)."""
    stream = RecordingStream()
    outbox = Outbox(stream, max_frame=MAX_FRAME, batch=False, send_timeout=5)
    events = [trio.Event() for _ in range(4)]

    async def link(i: int) -> None:
        await events[i].wait()
        outbox.put(b"m%d" % i)
        if i + 1 < len(events):
            events[i + 1].set()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outbox.run)
            for i in range(len(events)):
                nursery.start_soon(link, i)
            await trio.testing.wait_all_tasks_blocked()
            events[0].set()
            while len(bodies_of(stream.writes)) < len(events):
                await trio.sleep(0.01)
            outbox.close_after_flush()
    assert len(stream.writes) == 1, stream.writes
    assert bodies_of(stream.writes) == [b"m0", b"m1", b"m2", b"m3"]


async def test_frames_over_a_socket_pair_arrive_whole_and_in_order() -> None:
    """Messages far larger than the socket buffer take the partial-write
    path; small ones the direct one; the reader reassembles them all."""
    left, right = trio.socket.socketpair()
    sender, receiver = trio.SocketStream(left), trio.SocketStream(right)
    outbox = Outbox(sender, max_frame=MAX_FRAME, batch=False, send_timeout=5)
    reader = FramedReader(receiver, MAX_FRAME)
    sent = [bytes([i % 256]) * size for i, size in enumerate([1, 5000, 6 * 1024 * 1024, 3, 70_000] * 3)]
    received: list[bytes] = []

    async def read_all() -> None:
        while len(received) < len(sent):
            frames = await reader.receive()
            assert frames, "end of stream before every frame came"
            received.extend(frames)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outbox.run)
            nursery.start_soon(read_all)
            for body in sent:
                await outbox.wait_room()
                outbox.put(body)
                await trio.lowlevel.checkpoint()
            outbox.close_after_flush()
    await sender.aclose()
    await receiver.aclose()
    assert [len(b) for b in received] == [len(b) for b in sent]
    assert received == sent


async def test_a_reader_sees_the_end_of_the_stream() -> None:
    left, right = trio.socket.socketpair()
    sender, receiver = trio.SocketStream(left), trio.SocketStream(right)
    outbox = Outbox(sender, max_frame=MAX_FRAME, batch=False, send_timeout=5)
    outbox.put(b"last")
    outbox.close_after_flush()
    with trio.fail_after(5):
        await outbox.run()
        await sender.aclose()
        reader = FramedReader(receiver, MAX_FRAME)
        assert await reader.receive() == [b"last"]
        assert await reader.receive() == []
    await receiver.aclose()


def socket_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    left, right = trio.socket.socketpair()
    return trio.SocketStream(left), trio.SocketStream(right)


async def test_what_one_pass_queues_on_a_socket_leaves_in_one_write_at_its_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The flusher writes when the loop is about to wait for I/O: messages
    put by the tasks of one scheduler pass share one write, with no writer
    task involved (it never runs here)."""
    sender, receiver = socket_pair()
    writes: list[int] = []
    real_write = os.write

    def counting_write(fd: int, data: bytes) -> int:
        if fd == sender.socket.fileno():
            writes.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", counting_write)
    outbox = Outbox(sender, max_frame=MAX_FRAME, batch=False, send_timeout=5)
    start = trio.Event()

    async def producer(i: int) -> None:
        await start.wait()
        outbox.put(b"m%d" % i)

    async with trio.open_nursery() as nursery:
        for i in range(4):
            nursery.start_soon(producer, i)
        await trio.testing.wait_all_tasks_blocked()
        start.set()  # all four run in the same pass
    with trio.fail_after(5):
        data = await receiver.receive_some(65536)
    # one write with all four (in the order trio ran the producers)
    assert len(writes) == 1
    assert sorted(bodies_of([data])) == [b"m0", b"m1", b"m2", b"m3"]
    assert outbox.queued_bytes == 0
    await sender.aclose()
    await receiver.aclose()


async def test_a_producer_waiting_for_room_wakes_when_the_flusher_drains() -> None:
    """A flush that empties an outbox over its high-water mark wakes the
    producer waiting for room, even though the loop had nothing else to do
    and was about to sleep (the flusher makes it look again)."""
    sender, receiver = socket_pair()
    outbox = Outbox(sender, max_frame=MAX_FRAME, batch=False, send_timeout=5, high_water=10)
    outbox.put(b"x" * 100)  # over the mark; flushed at the end of this pass
    # Without the flusher's poke the loop would sleep until this deadline,
    # and the checkpoint after the wait would then raise TooSlowError.
    with trio.fail_after(2):
        await outbox.wait_room()
        await trio.lowlevel.checkpoint()
    assert outbox.queued_bytes == 0
    assert bodies_of([await receiver.receive_some(65536)]) == [b"x" * 100]
    await sender.aclose()
    await receiver.aclose()


async def test_a_failed_direct_write_ends_the_writer_with_broken_resource() -> None:
    """The flusher never raises (it runs inside trio's loop): the error of a
    direct write surfaces in the outbox's writer task instead."""
    sender, receiver = socket_pair()
    await receiver.aclose()
    outbox = Outbox(sender, max_frame=MAX_FRAME, batch=False, send_timeout=5)
    outbox.put(b"into the void")
    with pytest.raises(trio.BrokenResourceError), trio.fail_after(5):
        await outbox.run()  # this task is the writer
    await sender.aclose()
