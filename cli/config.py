"""``qkv serve --config node.toml`` and ``--cluster cluster.toml``.

A node file holds the same settings as ``serve``'s flags, named like them
with ``_`` for ``-`` (``data_dir``, ``request_timeout``, ...); ``peers`` is a
table of id to ``HOST:PORT``. A flag given on the command line (or through
its environment variable) wins over the file; the file wins over the
defaults. Relative paths in a file are relative to the file's directory.

A cluster file lists every member once, for all nodes to share::

    [nodes]
    n1 = "10.0.0.1:7001"
    n2 = "10.0.0.2:7001"
    n3 = "10.0.0.3:7001"

A node given a cluster file (``--cluster`` or ``cluster = "..."`` in its
node file) takes every other member as a peer, and listens on its own
address there unless ``listen`` says otherwise (say ``0.0.0.0:7001``).
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from cli.options import address, node_id
from net.address import Address
from register.model import NodeId

__all__ = ["NODE_KEYS", "load_cluster_file", "load_node_file", "merge_settings"]

#: setting -> (accepted TOML types, is a path)
NODE_KEYS: dict[str, tuple[tuple[type, ...], bool]] = {
    "id": ((str,), False),
    "listen": ((str,), False),
    "peers": ((dict,), False),
    "cluster": ((str,), True),
    "data_dir": ((str,), True),
    "resp_listen": ((str,), False),
    "metrics": ((str,), False),
    "cluster_secret_file": ((str,), True),
    "tls_cert": ((str,), True),
    "tls_key": ((str,), True),
    "tls_ca": ((str,), True),
    "max_frame": ((int,), False),
    "max_value": ((int,), False),
    "request_timeout": ((int, float), False),
    "storage": ((str,), False),
    "log_level": ((str,), False),
    "log_format": ((str,), False),
}


def _read_toml(path: Path, what: str) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise click.BadParameter(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise click.BadParameter(f"{what} {str(path)!r} is not valid TOML: {exc}") from None


def load_node_file(path: Path) -> dict[str, Any]:
    """The settings of a node file, checked; paths made absolute (relative
    to the file's directory), ``peers`` as ``ID=HOST:PORT`` strings."""
    raw = _read_toml(path, "config file")
    settings: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in NODE_KEYS:
            known = ", ".join(sorted(NODE_KEYS))
            raise click.BadParameter(f"{path}: unknown setting {key!r} (known: {known})")
        types, is_path = NODE_KEYS[key]
        if isinstance(value, bool) or not isinstance(value, types):
            names = " or ".join("table" if t is dict else t.__name__ for t in types)
            raise click.BadParameter(f"{path}: setting {key!r} must be a {names}")
        if is_path:
            value = str(path.parent / Path(str(value)).expanduser())
        if key == "peers":
            for peer, addr in value.items():
                if not isinstance(addr, str):
                    raise click.BadParameter(f"{path}: peers.{peer} must be a string HOST:PORT")
            value = tuple(f"{peer}={addr}" for peer, addr in value.items())
        settings[key] = value
    return settings


def load_cluster_file(path: Path) -> dict[NodeId, Address]:
    """Every member of the cluster, by id, from a cluster file."""
    raw = _read_toml(path, "cluster file")
    nodes = raw.get("nodes")
    extra = set(raw) - {"nodes"}
    if extra:
        raise click.BadParameter(f"{path}: unknown setting {sorted(extra)[0]!r} (a cluster file has [nodes])")
    if not isinstance(nodes, dict) or not nodes:
        raise click.BadParameter(f'{path}: needs a [nodes] table of id = "HOST:PORT"')
    members: dict[NodeId, Address] = {}
    for name, addr in nodes.items():
        if not isinstance(addr, str):
            raise click.BadParameter(f"{path}: nodes.{name} must be a string HOST:PORT")
        try:
            members[node_id(name)] = address(addr)
        except click.BadParameter as exc:
            raise click.BadParameter(f"{path}: nodes.{name}: {exc.message}") from None
    return members


def merge_settings(
    flags: Mapping[str, Any], explicit: set[str], file_settings: Mapping[str, Any]
) -> dict[str, Any]:
    """Flags given explicitly win, then the file, then the flags' defaults."""
    merged = dict(flags)
    for key, value in file_settings.items():
        if key not in explicit:
            merged[key] = value
    return merged
