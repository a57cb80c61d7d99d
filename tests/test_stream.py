"""net.stream: the outbox's coalescing, and frames over a real socket pair
(the direct non-blocking read and write path, partial writes included)."""

from __future__ import annotations

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
