"""The RESP command parser alone (``net.resp.parser``), with no server:
checked against hiredis (its encoder and its ``Reader``) on random command
streams cut at random points, on random bytes (bounded memory), on bad
input (refused from the headers alone), and on inline commands split as
Redis's ``sdssplitargs`` splits them.
"""

from __future__ import annotations

import hiredis
import pytest
from hypothesis import given
from hypothesis import strategies as st

from net.resp import RespParser, split_inline


def command(*args: bytes | str) -> bytes:
    return hiredis.pack_command(tuple(a.encode() if isinstance(a, str) else a for a in args))  # type: ignore[no-any-return]


def parse_all(chunks: list[bytes], **limits: int) -> tuple[list[list[bytes]], str | None]:
    parser = RespParser(**{"max_bulk": 1 << 20, "max_request": 1 << 22, **limits})
    out: list[list[bytes]] = []
    for chunk in chunks:
        parser.feed(chunk)
        commands, error = parser.commands()
        out += commands
        if error is not None:
            return out, error.message
    return out, None


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


commands_strategy = st.lists(
    st.lists(st.binary(max_size=40), min_size=1, max_size=6), min_size=1, max_size=20
)


@given(commands_strategy, st.lists(st.integers(min_value=0), max_size=30))
def test_parser_reads_what_hiredis_encodes_in_any_chunking(
    commands: list[list[bytes]], cuts: list[int]
) -> None:
    stream = b"".join(hiredis.pack_command(tuple(c)) for c in commands)
    assert parse_all(split_at(stream, cuts)) == (commands, None)


@given(commands_strategy)
def test_parser_agrees_with_hiredis_reader(commands: list[list[bytes]]) -> None:
    stream = b"".join(hiredis.pack_command(tuple(c)) for c in commands)
    reference = hiredis.Reader()
    reference.feed(stream)
    expected = []
    while (item := reference.gets()) is not False:
        expected.append(item)
    assert parse_all([stream]) == (expected, None)


words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789:_-", min_size=1, max_size=10)


@given(
    st.lists(st.tuples(st.booleans(), st.lists(words, min_size=1, max_size=4)), min_size=1, max_size=10),
    st.lists(st.integers(min_value=0), max_size=20),
)
def test_parser_mixes_inline_and_multibulk(items: list[tuple[bool, list[str]]], cuts: list[int]) -> None:
    stream = b"".join(
        command(*args) if multibulk else " ".join(args).encode() + b"\r\n" for multibulk, args in items
    )
    expected = [[a.encode() for a in args] for _, args in items]
    assert parse_all(split_at(stream, cuts)) == (expected, None)


@given(st.lists(st.binary(max_size=300), max_size=20))
def test_parser_on_random_bytes_holds_bounded_memory(chunks: list[bytes]) -> None:
    parser = RespParser(max_bulk=100, max_request=500, max_inline=200)
    for chunk in chunks:
        parser.feed(chunk)
        _, error = parser.commands()
        assert parser.buffered <= 500 + 300
        if error is not None:
            assert error.message.startswith("ERR Protocol error: ")
            parser.feed(b"*1\r\n$4\r\nPING\r\n")
            assert parser.commands() == ([], None), "a parser that failed takes nothing more"
            break


@pytest.mark.parametrize(
    ("stream", "error"),
    [
        (b"*2\r\n$3\r\nGET\r\n:1\r\n", "expected '$', got ':'"),
        (b"*x\r\n", "invalid multibulk length"),
        (b"*+1\r\n", "invalid multibulk length"),
        (b"*01\r\n", "invalid multibulk length"),
        (b"*1\r\n$-5\r\n", "invalid bulk length"),
        (b"*1\r\n$ 3\r\n", "invalid bulk length"),
        (b"*1\r\n$1001\r\n", "bulk string of 1001 bytes is over the limit of 1000 bytes"),
        (b"*100000\r\n", "100000 arguments are over the limit"),
        (b"*" + b"1" * 40, "too big mbulk count string"),
        (b"*1\r\n$" + b"1" * 40, "too big bulk count string"),
        (b"*3\r\n$900\r\n" + b"a" * 900 + b"\r\n$900\r\n", "command of more than 1500 bytes"),
        (b"x" * 3000, "too big inline request"),
        (b'GET "abc\r\n', "unbalanced quotes"),
    ],
)
def test_parser_rejects_bad_input_at_once(stream: bytes, error: str) -> None:
    # The error comes from the headers alone: no body is waited for.
    commands, message = parse_all([stream], max_bulk=1000, max_request=1500, max_inline=2000)
    assert commands == []
    assert message is not None and error in message


def test_parser_skips_what_redis_skips() -> None:
    assert parse_all([b"\r\n\n*0\r\n*-1\r\nPING\n"]) == ([[b"PING"]], None)


@pytest.mark.parametrize(
    ("line", "args"),
    [
        (b"set key value", [b"set", b"key", b"value"]),
        (b"  set\t key   value  ", [b"set", b"key", b"value"]),
        (b'set "a b" c', [b"set", b"a b", b"c"]),
        (b'echo "\\x41\\n\\t\\"q\\"\\\\"', [b"echo", b'A\n\t"q"\\']),
        (b"echo 'it\\'s' ''", [b"echo", b"it's", b""]),
        (b'echo "\\xZZ"', [b"echo", b"xZZ"]),
        (b"", []),
    ],
)
def test_split_inline_like_redis(line: bytes, args: list[bytes]) -> None:
    assert split_inline(line) == args


@pytest.mark.parametrize("line", [b'get "abc', b"get 'abc", b'get "a"b', b"get 'a'b"])
def test_split_inline_refuses_unbalanced_quotes(line: bytes) -> None:
    with pytest.raises(Exception, match="unbalanced quotes"):
        split_inline(line)
