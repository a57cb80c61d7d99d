"""Running nodes in the foreground: ``qkv serve`` and ``qkv cluster``.

SIGTERM and SIGINT stop gracefully: no new requests, those in flight
finish or fail within their deadline, storage is closed, exit 0. Start-up
failures (data dir unusable, port in use) are one line on stderr and exit 1.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable
import logging
import signal
from pathlib import Path

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
        return cls(config=NodeConfig(
            node_id=me, listen=address(listen), peers=members, data_dir=data_dir,
            max_frame=max_frame, max_value=max_value, request_timeout=request_timeout,
        ))


def _node_id(text: str) -> NodeId:
    try:
        return node_id(text)
    except click.BadParameter as exc:
        raise click.BadParameter(f"--id: {exc.message}") from None


def _start_error(exc: BaseException) -> str | None:
    """A one-line explanation of a start-up failure, or None if it is a bug."""
    if isinstance(exc, StorageError):
        return f"cannot use the data dir: {exc}"
    if isinstance(exc, OSError):
        if exc.errno == errno.EADDRINUSE:
            return f"cannot listen: address already in use ({exc.strerror})"
        return f"cannot start: {exc.strerror or exc}"
    if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        return _start_error(exc.exceptions[0])
    return None


async def _until_signal(nodes: list[Node]) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s, stopping", signal.Signals(signum).name)
            async with trio.open_nursery() as nursery:
                for node in nodes:
                    nursery.start_soon(node.shutdown)
            return


def run_node(settings: NodeSettings) -> int:
    async def main() -> None:
        async with open_node(settings.config) as node:
            log.info("node %s ready on %s (%s)", node.id, node.address, node.state)
            await _until_signal([node])

    return _run(main)


def run_local_cluster(size: int, base_port: int, data_dir: Path | None, **overrides: float) -> int:
    async def main() -> None:
        ports = [base_port + i for i in range(size)]
        async with open_cluster(size, data_dir=data_dir, ports=ports, **overrides) as cluster:
            nodes = ",".join(str(a) for a in cluster.addresses)
            log.info("cluster of %d ready: QKV_NODES=%s (Ctrl-C stops it)", size, nodes)
            await _until_signal([cluster.node(i) for i in range(size)])

    return _run(main)


def _run(main: Callable[[], Awaitable[None]]) -> int:
    try:
        trio.run(main)
    except BaseException as exc:  # noqa: BLE001 - turned into one line below
        message = _start_error(exc)
        if message is None:
            raise
        click.echo(f"qkv: {message}", err=True)
        return EXIT_START_FAILED
    return 0
