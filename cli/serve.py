"""Running nodes in the foreground: ``qkv serve`` and ``qkv cluster``.

SIGTERM and SIGINT stop gracefully: no new requests, those in flight
finish or fail within their deadline, storage is closed, exit 0. Start-up
failures (data dir unusable, port in use) are one line on stderr and exit 1.
"""

from __future__ import annotations

import errno
import logging
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import click
import trio

from cli.options import address, node_id, parse_peer
from net.address import Address
from quorum.cluster import open_cluster
from quorum.node import Node, NodeConfig, open_node
from register.model import NodeId
from register.store import StorageError

log = logging.getLogger("qkv.serve")

EXIT_START_FAILED = 1


@attrs.frozen(kw_only=True)
class NodeSettings:
    config: NodeConfig

    @classmethod
    def from_flags(
        cls,
        *,
        node_id: str,
        listen: str,
        peers: tuple[str, ...],
        data_dir: Path | None,
        max_frame: int,
        max_value: int,
        request_timeout: float,
        resp_listen: str | None = None,
    ) -> NodeSettings:
        me = _node_id(node_id)
        members: dict[NodeId, Address] = {}
        for text in peers:
            peer, addr = parse_peer(text)
            if peer == me or peer in members:
                raise click.BadParameter(f"--peer {text!r}: node id {peer!r} given twice")
            members[peer] = addr
        if max_value + 1024 > max_frame:
            raise click.BadParameter("--max-frame must exceed --max-value by at least 1024 bytes")
        return cls(
            config=NodeConfig(
                node_id=me,
                listen=address(listen),
                peers=members,
                data_dir=data_dir,
                max_frame=max_frame,
                max_value=max_value,
                request_timeout=request_timeout,
                resp_listen=None if resp_listen is None else _resp_address(resp_listen),
            )
        )


def _resp_address(text: str) -> Address:
    try:
        return address(text)
    except click.BadParameter as exc:
        raise click.BadParameter(f"--resp-listen: {exc.message}") from None


def _node_id(text: str) -> NodeId:
    try:
        return node_id(text)
    except click.BadParameter as exc:
        raise click.BadParameter(f"--id: {exc.message}") from None


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _start_error(exc: BaseException, listening_on: str) -> str | None:
    """A one-line explanation of a start-up failure, or None if it is a bug."""
    leaves = _leaves(exc)
    if not all(isinstance(leaf, StorageError | OSError) for leaf in leaves):
        return None
    first = leaves[0]
    if isinstance(first, StorageError):
        return f"cannot use the data dir: {first}"
    assert isinstance(first, OSError)
    if any(isinstance(leaf, OSError) and leaf.errno == errno.EADDRINUSE for leaf in leaves):
        return f"cannot listen on {listening_on}: address already in use"
    return f"cannot start: {first.strerror or first}"


async def _until_signal(nodes: list[Node]) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s, stopping", signal.Signals(signum).name)
            break

        async def stop_all(scope: trio.CancelScope) -> None:
            async with trio.open_nursery() as nursery:
                for node in nodes:
                    nursery.start_soon(node.shutdown)
            scope.cancel()

        # Keep taking signals while stopping: one left pending would be
        # raised again when the receiver closes, and kill the process after
        # a clean stop.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_all, nursery.cancel_scope)
            async for signum in signals:
                log.info("received %s while stopping", signal.Signals(signum).name)


def run_node(settings: NodeSettings) -> int:
    async def main() -> None:
        async with open_node(settings.config) as node:
            log.info("node %s ready on %s (%s)", node.id, node.address, node.state)
            if node.resp_address is not None:
                log.info("node %s serves RESP on %s", node.id, node.resp_address)
            await _until_signal([node])

    return _run(main, str(settings.config.listen))


def run_local_cluster(
    size: int, base_port: int, data_dir: Path | None, *, resp_base_port: int | None = None, **overrides: Any
) -> int:
    async def main() -> None:
        ports = [base_port + i for i in range(size)]
        resp_ports = None if resp_base_port is None else [resp_base_port + i for i in range(size)]
        async with open_cluster(
            size, data_dir=data_dir, ports=ports, resp_ports=resp_ports, **overrides
        ) as cluster:
            nodes = ",".join(str(a) for a in cluster.addresses)
            log.info("cluster of %d ready: QKV_NODES=%s (Ctrl-C stops it)", size, nodes)
            if resp_ports is not None:
                log.info("RESP on %s", ",".join(str(a) for a in cluster.resp_addresses))
            await _until_signal([cluster.node(i) for i in range(size)])

    return _run(main, f"127.0.0.1:{base_port}-{base_port + size - 1}")


def _run(main: Callable[[], Awaitable[None]], listening_on: str) -> int:
    try:
        trio.run(main)
    except BaseException as exc:
        message = _start_error(exc, listening_on)
        if message is None:
            raise
        click.echo(f"qkv: {message}", err=True)
        return EXIT_START_FAILED
    return 0
