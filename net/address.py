"""``HOST:PORT`` addresses, parsed in one place."""

from __future__ import annotations

import attrs


@attrs.frozen(order=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_address(text: str, *, allow_port_zero: bool = False) -> Address:
    """Parse ``HOST:PORT`` (``[v6]:PORT`` for IPv6); ValueError says why not."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{text!r}: port {port_text!r} is not a number") from None
    if not (0 if allow_port_zero else 1) <= port <= 65535:
        raise ValueError(f"{text!r}: port {port} is out of range")
    return Address(host, port)


def parse_address_list(text: str) -> list[Address]:
    """Parse ``HOST:PORT,HOST:PORT,...``."""
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError("no addresses given")
    return [parse_address(p) for p in parts]
