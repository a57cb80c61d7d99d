"""The command table: every command RESP knows, with the arity, flags and
key positions ``COMMAND`` reports, and the function that runs it; the
dispatch of a parsed command (``prepare``); and ``COMMAND`` itself, which
describes this table.

Invariants:

- a command is run only once its name is in the table and its number of
  arguments fits its arity (``n``: exactly n, ``-n``: at least n, the name
  included, as Redis counts); otherwise it is answered at once, with
  Redis's error text, and does nothing;
- what ``COMMAND`` reports is this table, so a client library that reads
  it learns exactly the commands that work.
"""

from __future__ import annotations

from typing import Final

import attrs

from net.resp import connection, counters, keys, server_info, strings
from net.resp.context import Client, Handler, Job
from net.resp.replies import (
    EMPTY_ARRAY,
    bulk_text,
    encode_array,
    encode_error,
    encode_integer,
    show,
    wrong_arity,
)

__all__ = ["COMMANDS", "Command", "prepare"]


@attrs.frozen
class Command:
    #: as Redis counts: n exactly, -n at least n (the name included)
    arity: int
    flags: tuple[str, ...]
    #: first key, last key, step, for COMMAND
    first_key: int
    last_key: int
    step: int
    run: Handler


def command(client: Client, args: list[bytes]) -> bytes:
    if len(args) == 1:
        return encode_array([_entry(n) for n in COMMANDS])
    sub = args[1].lower()
    if sub == b"count" and len(args) == 2:
        return encode_integer(len(COMMANDS))
    if sub == b"list":
        return encode_array([bulk_text(n) for n in COMMANDS])
    if sub == b"info":
        names = [a.decode("utf-8", "replace").lower() for a in args[2:]] or list(COMMANDS)
        return encode_array([_entry(n) if n in COMMANDS else client.nil() for n in names])
    # COMMAND DOCS is left unknown on purpose: an interactive redis-cli
    # then uses its own help for every command (and asks COMMAND for
    # the table), as with Redis 6; empty docs would leave it none.
    return encode_error(f"ERR unknown subcommand '{show(args[1])}'. Try COMMAND HELP.")


_READ: Final = ("readonly", "fast")
_WRITE: Final = ("write", "denyoom")
_WRITE_FAST: Final = ("write", "denyoom", "fast")

COMMANDS: Final[dict[str, Command]] = {
    "get": Command(2, _READ, 1, 1, 1, strings.get),
    "set": Command(-3, _WRITE, 1, 1, 1, strings.set_),
    "del": Command(-2, ("write",), 1, -1, 1, keys.del_),
    "exists": Command(-2, _READ, 1, -1, 1, keys.exists),
    "mget": Command(-2, _READ, 1, -1, 1, strings.mget),
    "mset": Command(-3, _WRITE, 1, -1, 2, strings.mset),
    "setnx": Command(3, _WRITE_FAST, 1, 1, 1, strings.setnx),
    "getset": Command(3, _WRITE_FAST, 1, 1, 1, strings.getset),
    "getdel": Command(2, ("write", "fast"), 1, 1, 1, strings.getdel),
    "incr": Command(2, _WRITE_FAST, 1, 1, 1, counters.incr),
    "decr": Command(2, _WRITE_FAST, 1, 1, 1, counters.decr),
    "incrby": Command(3, _WRITE_FAST, 1, 1, 1, counters.incrby),
    "decrby": Command(3, _WRITE_FAST, 1, 1, 1, counters.decrby),
    "ping": Command(-1, ("fast", "stale"), 0, 0, 0, connection.ping),
    "echo": Command(2, ("fast", "stale"), 0, 0, 0, connection.echo),
    "quit": Command(-1, ("fast", "stale"), 0, 0, 0, connection.quit_),
    "select": Command(2, ("loading", "stale", "fast"), 0, 0, 0, connection.select),
    "client": Command(-2, ("stale",), 0, 0, 0, connection.client_),
    "hello": Command(-1, ("noscript", "loading", "stale", "fast"), 0, 0, 0, connection.hello),
    "auth": Command(-2, ("noscript", "loading", "stale", "fast"), 0, 0, 0, connection.auth),
    "info": Command(-1, ("loading", "stale"), 0, 0, 0, server_info.info),
    "command": Command(-1, ("loading", "stale"), 0, 0, 0, command),
    "config": Command(-2, ("admin", "noscript", "loading", "stale"), 0, 0, 0, server_info.config),
}
_BY_NAME: Final = {name.encode(): spec for name, spec in COMMANDS.items()}


def _entry(name: str) -> bytes:
    spec = COMMANDS[name]
    return encode_array(
        [
            bulk_text(name),
            encode_integer(spec.arity),
            encode_array([b"+%b\r\n" % f.encode() for f in spec.flags]),
            encode_integer(spec.first_key),
            encode_integer(spec.last_key),
            encode_integer(spec.step),
            EMPTY_ARRAY,
            EMPTY_ARRAY,
            EMPTY_ARRAY,
            EMPTY_ARRAY,
        ]
    )


def prepare(client: Client, args: list[bytes]) -> bytes | Job:
    """Check a parsed command and run its function: its reply, or the job
    that will make it."""
    name = args[0].lower()
    spec = _BY_NAME.get(name)
    if spec is None:
        shown = " ".join(f"'{show(a)}'" for a in args[1:])[:128]
        return encode_error(f"ERR unknown command '{show(args[0])}', with args beginning with: {shown}")
    arity = spec.arity
    if (arity > 0 and len(args) != arity) or len(args) < -arity:
        return wrong_arity(name)
    return spec.run(client, args)
