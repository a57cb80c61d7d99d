"""Length-prefixed framing (net.framing), sans I/O: chunking, limits, memory."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from net.framing import HEADER_SIZE, EmptyFrame, FrameDecoder, FrameError, FrameTooLarge, encode_frame

MAX_BODY = 5000
bodies = st.lists(st.binary(min_size=1, max_size=MAX_BODY), max_size=8)


def header(length: int) -> bytes:
    return struct.pack(">I", length)


def cut(stream: bytes, points: list[int]) -> list[bytes]:
    """``stream`` split at ``points`` (in any order, duplicates allowed)."""
    bounds = [0, *sorted(points), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


# --- encode_frame ----------------------------------------------------------


@given(st.binary(min_size=1, max_size=300))
def test_encode_frame_layout(body: bytes) -> None:
    frame = encode_frame(body)
    assert frame[:HEADER_SIZE] == len(body).to_bytes(4, "big")
    assert frame[HEADER_SIZE:] == body


def test_encode_frame_refuses_empty_body() -> None:
    with pytest.raises(ValueError):
        encode_frame(b"")


# --- reassembly --------------------------------------------------------------


@given(bodies, st.data())
def test_any_chunking_yields_the_bodies(items: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(encode_frame(b) for b in items)
    points = data.draw(st.lists(st.integers(0, len(stream)), max_size=40), label="cut points")
    chunks = cut(stream, points)
    decoder = FrameDecoder(max_frame=MAX_BODY)
    got: list[bytes] = []
    fed = 0
    for chunk in chunks:
        decoder.feed(chunk)
        fed += len(chunk)
        got += decoder.frames()
        # what is left is exactly the unconsumed bytes: a strict prefix of one frame
        consumed = sum(HEADER_SIZE + len(b) for b in got)
        assert decoder.buffered == fed - consumed
        assert decoder.buffered < HEADER_SIZE + MAX_BODY
    assert got == items
    assert decoder.buffered == 0
    assert decoder.next_frame() is None


def test_one_byte_at_a_time() -> None:
    items = [b"a", b"bc" * 100, b"\x00" * 3]
    stream = b"".join(encode_frame(b) for b in items)
    decoder = FrameDecoder(max_frame=1000)
    got: list[bytes] = []
    for i in range(len(stream)):
        decoder.feed(stream[i : i + 1])
        got += decoder.frames()
    assert got == items


def test_body_at_exactly_the_limit_is_accepted() -> None:
    decoder = FrameDecoder(max_frame=10)
    decoder.feed(encode_frame(b"x" * 10))
    assert decoder.frames() == [b"x" * 10]


# --- limits --------------------------------------------------------------------


@given(st.integers(min_value=1, max_value=2**24), st.integers(min_value=1, max_value=2**32 - 1), st.data())
def test_too_large_raised_as_soon_as_header_is_in(limit: int, length: int, data: st.DataObject) -> None:
    decoder = FrameDecoder(max_frame=limit)
    head = header(length)
    # any valid frames before the oversized one are handed out first
    before = data.draw(st.lists(st.binary(min_size=1, max_size=min(limit, 50)), max_size=3), label="before")
    prefix = b"".join(encode_frame(b) for b in before)
    decoder.feed(prefix)
    assert decoder.frames() == before
    for i in range(HEADER_SIZE - 1):
        decoder.feed(head[i : i + 1])
        assert decoder.next_frame() is None
    decoder.feed(head[-1:])  # the last header byte; no body byte sent
    if length <= limit:
        assert decoder.next_frame() is None  # waits for the body
    else:
        with pytest.raises(FrameTooLarge) as info:
            decoder.next_frame()
        assert info.value.length == length
        assert info.value.limit == limit
        assert isinstance(info.value, FrameError)


def test_too_large_wire_example() -> None:
    """2 MiB + 1 announced against a 2 MiB limit, no body."""
    decoder = FrameDecoder(max_frame=2 * 1024 * 1024)
    decoder.feed(bytes.fromhex("00200001"))
    with pytest.raises(FrameTooLarge):
        decoder.frames()


@pytest.mark.parametrize("prefix", [b"", encode_frame(b"ok")])
def test_zero_length_is_an_error(prefix: bytes) -> None:
    decoder = FrameDecoder(max_frame=100)
    decoder.feed(prefix)
    if prefix:
        assert decoder.next_frame() == b"ok"
    decoder.feed(header(0))
    with pytest.raises(EmptyFrame):
        decoder.next_frame()


def test_zero_length_detected_without_a_body() -> None:
    decoder = FrameDecoder(max_frame=100)
    decoder.feed(b"\x00\x00\x00")
    assert decoder.next_frame() is None
    decoder.feed(b"\x00")
    with pytest.raises(EmptyFrame):
        decoder.frames()


# --- memory bound ----------------------------------------------------------------


@given(bodies, st.integers(min_value=1, max_value=3000), st.integers(min_value=1, max_value=20))
def test_buffer_stays_bounded(items: list[bytes], chunk_size: int, rounds: int) -> None:
    """A long stream read in fixed chunks: once the whole frames are taken,
    the decoder holds at most one partial frame, and its backing buffer (the
    real memory, consumed prefix included) at most twice that plus a chunk."""
    stream = b"".join(encode_frame(b) for b in items) * rounds
    decoder = FrameDecoder(max_frame=MAX_BODY)
    got: list[bytes] = []
    one_frame = HEADER_SIZE + MAX_BODY
    for i in range(0, len(stream), chunk_size):
        decoder.feed(stream[i : i + chunk_size])
        assert decoder.buffered < one_frame + chunk_size
        got += decoder.frames()
        assert decoder.buffered < one_frame
        assert len(decoder._buf) <= 2 * one_frame + chunk_size
    assert got == items * rounds


def test_frames_before_a_bad_header_are_returned_first() -> None:
    """A read that brings a good frame and then a bad header must still
    hand out the good frame (its request gets answered) before failing."""
    decoder = FrameDecoder(max_frame=100)
    decoder.feed(encode_frame(b"good") + b"\x00\x00\x00\x00")
    assert decoder.frames() == [b"good"]
    with pytest.raises(EmptyFrame):
        decoder.frames()
