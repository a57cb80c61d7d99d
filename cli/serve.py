"""Running nodes in the foreground: ``qkv serve`` and ``qkv cluster``.

SIGTERM and SIGINT stop gracefully: no new requests, those in flight
finish or fail within their deadline, storage is closed, exit 0. Start-up
failures (data dir unusable, port in use) are one line on stderr and exit 1.
"""

from __future__ import annotations

import errno
import gc
import logging
import signal
import ssl
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import click
import trio
from click.core import ParameterSource

from cli.config import load_cluster_file, load_node_file, merge_settings
from cli.options import address, node_id, parse_peer
from net.address import Address
from net.tls import TlsFiles, client_context, server_context
from quorum.cluster import open_cluster
from quorum.node import Node, NodeConfig, open_node
from quorum.peer_auth import read_secret
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
        metrics: str | None = None,
        cluster_secret_file: Path | None = None,
        tls: tuple[Path | None, Path | None, Path | None] = (None, None, None),
    ) -> NodeSettings:
        me = _node_id(node_id)
        members: dict[NodeId, Address] = {}
        for text in peers:
            peer, addr = parse_peer(text)
            if peer == me or peer in members:
                raise click.BadParameter(f"--peer {text!r}: node id {peer!r} given twice")
            members[peer] = addr
        secret = None if cluster_secret_file is None else _read_secret(Path(cluster_secret_file))
        tls_files = _tls_files(*tls)
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
                resp_listen=None if resp_listen is None else _flag_address("--resp-listen", resp_listen),
                metrics_listen=None if metrics is None else _flag_address("--metrics", metrics),
                cluster_secret=secret,
                tls=tls_files,
            )
        )


#: config file setting -> ``serve`` parameter, where the names differ
_FILE_NAMES = {"id": "node_id", "cluster": "cluster_file"}


def resolve_flags(ctx: click.Context, flags: Mapping[str, Any]) -> dict[str, Any]:
    """``serve``'s settings from its flags, its ``--config`` file and its
    ``--cluster`` file: a flag given explicitly wins over the file, the
    file over the defaults. Raises ``click.BadParameter`` (a usage error)."""
    explicit = {
        name
        for name in flags
        if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    }
    file_settings: dict[str, Any] = {}
    config_file: Path | None = flags["config_file"]
    if config_file is not None:
        params = {p.name: p for p in ctx.command.params}
        for key, value in load_node_file(config_file).items():
            name = _FILE_NAMES.get(key, key)
            try:
                file_settings[name] = params[name].type_cast_value(ctx, value)
            except click.BadParameter as exc:
                raise click.BadParameter(f"{config_file}: {key}: {exc.message}") from None
    merged = merge_settings(flags, explicit, file_settings)
    if merged["node_id"] is None:
        raise click.BadParameter("--id is required (or 'id' in the --config file)")
    if merged["data_dir"] is None:
        raise click.BadParameter("--data-dir is required (or 'data_dir' in the --config file)")
    cluster_file: Path | None = merged["cluster_file"]
    if cluster_file is not None:
        if merged["peers"]:
            raise click.BadParameter("give the members either with --peer (or 'peers') or with --cluster")
        members = load_cluster_file(Path(cluster_file))
        me = _node_id(merged["node_id"])
        if me not in members:
            raise click.BadParameter(f"--id: {me!r} is not a member of the cluster in {cluster_file}")
        merged["peers"] = tuple(f"{peer}={addr}" for peer, addr in members.items() if peer != me)
        if merged["listen"] is None:
            merged["listen"] = str(members[me])
    if merged["listen"] is None:
        raise click.BadParameter("--listen is required (or 'listen' in the --config file, or --cluster)")
    return merged


def _tls_files(cert: Path | None, key: Path | None, ca: Path | None) -> TlsFiles | None:
    given = {"--tls-cert": cert, "--tls-key": key, "--tls-ca": ca}
    if all(v is None for v in given.values()):
        return None
    missing = [flag for flag, v in given.items() if v is None]
    if missing:
        raise click.BadParameter(
            f"TLS needs --tls-cert, --tls-key and --tls-ca; missing {', '.join(missing)}"
        )
    assert cert is not None and key is not None and ca is not None
    files = TlsFiles(cert=Path(cert), key=Path(key), ca=Path(ca))
    try:
        server_context(files)
        client_context(files.ca, files.cert, files.key)
    except (OSError, ssl.SSLError) as exc:
        raise click.BadParameter(f"cannot load the TLS files: {exc}") from None
    return files


def _read_secret(path: Path) -> bytes:
    try:
        return read_secret(path.read_bytes())
    except OSError as exc:
        raise click.BadParameter(
            f"--cluster-secret-file: cannot read {str(path)!r}: {exc.strerror}"
        ) from None
    except ValueError as exc:
        raise click.BadParameter(f"--cluster-secret-file {str(path)!r}: {exc}") from None


def _flag_address(flag: str, text: str) -> Address:
    try:
        return address(text)
    except click.BadParameter as exc:
        raise click.BadParameter(f"{flag}: {exc.message}") from None


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
            name = signal.Signals(signum).name
            log.info("received %s, stopping", name, extra={"event": "signal", "signal": name})
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
                name = signal.Signals(signum).name
                log.info("received %s while stopping", name, extra={"event": "signal", "signal": name})


def run_node(settings: NodeSettings) -> int:
    async def main() -> None:
        async with open_node(settings.config) as node:
            log.info(
                "node %s ready on %s (%s)",
                node.id,
                node.address,
                node.state,
                extra={"event": "ready", "node": node.id, "address": str(node.address), "state": node.state},
            )
            if node.metrics_address is not None:
                log.info(
                    "node %s serves metrics on http://%s/metrics",
                    node.id,
                    node.metrics_address,
                    extra={
                        "event": "metrics_listening",
                        "node": node.id,
                        "address": str(node.metrics_address),
                    },
                )
            if node.resp_address is not None:
                log.info(
                    "node %s serves RESP on %s",
                    node.id,
                    node.resp_address,
                    extra={"event": "resp_listening", "node": node.id, "address": str(node.resp_address)},
                )
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
            log.info(
                "cluster of %d ready: QKV_NODES=%s (Ctrl-C stops it)",
                size,
                nodes,
                extra={"event": "ready", "nodes": nodes},
            )
            if resp_ports is not None:
                log.info("RESP on %s", ",".join(str(a) for a in cluster.resp_addresses))
            await _until_signal([cluster.node(i) for i in range(size)])

    return _run(main, f"127.0.0.1:{base_port}-{base_port + size - 1}")


#: allocations between young-generation collections in a serving process
#: (Python's default is 700). Requests allocate many short-lived objects
#: that reference counting frees anyway; at 700 the collector ran every few
#: requests and took about 5% of a loaded node's CPU (perf).
GC_YOUNG_THRESHOLD = 20_000


def _run(main: Callable[[], Awaitable[None]], listening_on: str) -> int:
    # What is loaded by now (modules, classes) lives as long as the process:
    # keep it out of every future collection.
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    try:
        trio.run(main)
    except BaseException as exc:
        message = _start_error(exc, listening_on)
        if message is None:
            raise
        click.echo(f"qkv: {message}", err=True)
        return EXIT_START_FAILED
    return 0
