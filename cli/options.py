"""Parsing of command-line values shared by the commands."""

from __future__ import annotations

import re

import click

from net.address import Address, parse_address, parse_address_list
from register.model import NodeId

NODE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def node_id(text: str) -> NodeId:
    if not NODE_ID.match(text):
        raise click.BadParameter(f"{text!r}: a node id is 1 to 64 letters, digits, '-' or '_'")
    return NodeId(text)


def address(text: str) -> Address:
    try:
        return parse_address(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def address_list(text: str) -> list[Address]:
    try:
        return parse_address_list(text)
    except ValueError as exc:
        raise click.BadParameter(f"--nodes: {exc}") from None


def parse_peer(text: str) -> tuple[NodeId, Address]:
    name, sep, addr = text.partition("=")
    if not sep:
        raise click.BadParameter(f"--peer {text!r}: expected ID=HOST:PORT")
    return node_id(name), address(addr)


def setup_logging(level: str, log_format: str = "kv") -> None:
    """Structured logs on stderr (see ``cli.logs``)."""
    from cli.logs import setup_logging as setup

    setup(level, log_format)
