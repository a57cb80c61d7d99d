"""The server commands: ``INFO`` and ``CONFIG``, what monitoring tools and
``redis-benchmark`` ask. Answered by the node itself.

Invariants:

- ``INFO``'s key count is this node's replica (live keys, tombstones left
  out): a local report, not a linearizable read;
- ``CONFIG GET`` knows a fixed set of read-only parameters; nothing can be
  set over RESP (settings are ``qkv serve`` flags).
"""

from __future__ import annotations

import fnmatch
import time

from net.resp.context import QKV_VERSION, REDIS_COMPAT_VERSION, Client
from net.resp.replies import bulk_text, encode_error, show

__all__ = ["config", "info"]


def info(client: Client, args: list[bytes]) -> bytes:
    wanted = {a.decode("utf-8", "replace").lower() for a in args[1:]}
    every = not wanted or bool(wanted & {"all", "everything", "default"})
    server = client.server
    node, config = client.node, client.node.config
    # The local replica's view: live keys (tombstones left out). A count,
    # not a linearizable read.
    keys = sum(1 for v in node.replica.state.values() if v.value is not None)
    resp = node.resp_address
    sections = {
        "server": [
            f"qkv_version:{QKV_VERSION}",
            f"redis_version:{REDIS_COMPAT_VERSION}",
            "redis_mode:standalone",
            f"node_id:{node.id}",
            f"node_state:{node.state}",
            f"cluster_size:{config.cluster_size}",
            f"keys:{keys}",
            f"tcp_port:{resp.port if resp is not None else 0}",
            f"uptime_in_seconds:{int(time.monotonic() - server.started)}",
        ],
        "clients": [
            f"connected_clients:{server.connected}",
            f"maxclients:{config.max_connections}",
        ],
        "replication": ["role:master", "connected_slaves:0"],
        "keyspace": [f"db0:keys={keys},expires=0,avg_ttl=0"] if keys else [],
    }
    text = "".join(
        f"# {title.capitalize()}\r\n" + "".join(f"{line}\r\n" for line in lines) + "\r\n"
        for title, lines in sections.items()
        if every or title in wanted
    )
    return bulk_text(text.removesuffix("\r\n"))


def _config(client: Client) -> dict[str, str]:
    config = client.node.config
    return {
        "save": "",
        "appendonly": "no",
        "databases": "1",
        "maxclients": str(config.max_connections),
        "maxmemory": "0",
        "proto-max-bulk-len": str(client.server.max_bulk),
        "timeout": "0",
    }


def config(client: Client, args: list[bytes]) -> bytes:
    sub = args[1].lower()
    if sub == b"get":
        if len(args) < 3:
            return encode_error("ERR wrong number of arguments for 'config|get' command")
        values = _config(client)
        patterns = [a.decode("utf-8", "replace").lower() for a in args[2:]]
        return client.map(
            [
                (bulk_text(name), bulk_text(value))
                for name, value in values.items()
                if any(fnmatch.fnmatchcase(name, p) for p in patterns)
            ]
        )
    if sub in (b"set", b"rewrite", b"resetstat"):
        return encode_error(
            f"ERR CONFIG {show(sub).upper()} is not supported by qkv: "
            "its settings are command-line flags of 'qkv serve'"
        )
    return encode_error(f"ERR unknown subcommand '{show(args[1])}'. Try CONFIG HELP.")
