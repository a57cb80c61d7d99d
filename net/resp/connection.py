"""The connection commands: ``PING``, ``ECHO``, ``QUIT``, ``SELECT``,
``AUTH``, ``CLIENT``, ``HELLO``: what client libraries send when they
connect. They are answered by the node itself, with no quorum work.

Invariants:

- they change only the connection's own state (its name, its RESP
  version, whether it is closing), never the node's;
- ``HELLO`` switches the reply format for the replies after its own (its
  own reply is already in the new format, as in Redis);
- there is one database (``SELECT 0``) and no password: ``AUTH`` answers
  as a Redis without one, ``HELLO ... AUTH`` is refused.
"""

from __future__ import annotations

from net.resp import parser
from net.resp.context import REDIS_COMPAT_VERSION, Client
from net.resp.replies import (
    EMPTY_ARRAY,
    OK,
    PONG,
    bulk_text,
    encode_bulk,
    encode_error,
    encode_integer,
    show,
    wrong_arity,
)

__all__ = ["auth", "client_", "echo", "hello", "ping", "quit_", "select"]


def ping(client: Client, args: list[bytes]) -> bytes:
    if len(args) > 2:
        return wrong_arity(args[0])
    return PONG if len(args) == 1 else encode_bulk(args[1])


def echo(client: Client, args: list[bytes]) -> bytes:
    return encode_bulk(args[1])


def quit_(client: Client, args: list[bytes]) -> bytes:
    client.closing = True
    return OK


def select(client: Client, args: list[bytes]) -> bytes:
    if parser.INTEGER.fullmatch(args[1]) is None:
        return encode_error("ERR value is not an integer or out of range")
    if int(args[1]) != 0:
        return encode_error("ERR DB index is out of range")
    return OK


def auth(client: Client, args: list[bytes]) -> bytes:
    if len(args) > 3:
        return encode_error("ERR syntax error")
    return encode_error(
        "ERR AUTH <password> called without any password configured for the default "
        "user. Are you sure your configuration is correct?"
    )


def _set_name(client: Client, name: bytes) -> bytes | None:
    if any(c < 0x21 or c > 0x7E for c in name):
        return encode_error("ERR Client names cannot contain spaces, newlines or special characters.")
    client.name = name
    return None


def client_(client: Client, args: list[bytes]) -> bytes:
    sub = args[1].lower()
    if sub == b"setname" and len(args) == 3:
        return _set_name(client, args[2]) or OK
    if sub == b"getname" and len(args) == 2:
        return encode_bulk(client.name) if client.name else client.nil()
    if sub == b"setinfo" and len(args) == 4:
        if args[2].lower() not in (b"lib-name", b"lib-ver"):
            return encode_error(f"ERR Unrecognized option '{show(args[2])}'")
        return OK
    if sub == b"id" and len(args) == 2:
        return encode_integer(client.id)
    if sub == b"info" and len(args) == 2:
        return bulk_text(_client_info(client) + "\n")
    if sub in (b"setname", b"getname", b"setinfo", b"id", b"info"):
        return encode_error(f"ERR wrong number of arguments for 'client|{show(sub)}' command")
    return encode_error(f"ERR unknown subcommand '{show(args[1])}'. Try CLIENT HELP.")


def _client_info(client: Client) -> str:
    try:
        host, port = client.stream.socket.getpeername()[:2]
        peer = f"{host}:{port}"
    except OSError:
        peer = "?"
    return f"id={client.id} addr={peer} name={show(client.name)} db=0 resp=2"


def hello(client: Client, args: list[bytes]) -> bytes:
    proto = client.proto
    if len(args) >= 2:
        if parser.INTEGER.fullmatch(args[1]) is None:
            return encode_error("ERR Protocol version is not an integer or out of range")
        proto = int(args[1])
        if proto not in (2, 3):
            return encode_error("NOPROTO unsupported protocol version")
    i = 2
    name: bytes | None = None
    while i < len(args):
        option = args[i].lower()
        if option == b"auth" and i + 2 < len(args):
            return encode_error("ERR AUTH is not supported: qkv has no users or passwords")
        if option == b"setname" and i + 1 < len(args):
            name = args[i + 1]
            i += 2
            continue
        return encode_error(f"ERR Syntax error in HELLO option '{show(args[i])}'")
    if name is not None and (error := _set_name(client, name)) is not None:
        return error
    client.proto = proto
    return client.map(
        [
            (bulk_text("server"), bulk_text("qkv")),
            (bulk_text("version"), bulk_text(REDIS_COMPAT_VERSION)),
            (bulk_text("proto"), encode_integer(proto)),
            (bulk_text("id"), encode_integer(client.id)),
            (bulk_text("mode"), bulk_text("standalone")),
            (bulk_text("role"), bulk_text("master")),
            (bulk_text("modules"), EMPTY_ARRAY),
        ]
    )
