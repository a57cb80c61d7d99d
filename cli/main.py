"""``qkv``: run nodes and clusters, and read and write keys.

Exit status of the client commands (the command-line contract):
0 done, 1 key not found (``get``), not swapped (``cas``, ``set
--if-absent``) or not an integer (``incr``), 2 usage error, 3 unavailable
(no node could complete the request). Every message is one line on stderr.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import trio

from cli.options import address_list, setup_logging
from net.client import MAX_INT64, MIN_INT64, CasResult, Client, open_client
from net.errors import NotInteger, QkvError, Unavailable

Command = TypeVar("Command", bound=Callable[..., Any])

EXIT_NOT_FOUND = 1
#: ``cas`` or ``set --if-absent`` did not swap; ``incr`` found no integer
EXIT_NOT_DONE = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3

DEFAULT_NODES = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003"


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"qkv: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qkv")
def cli() -> None:
    """qkv: a replicated key-value store in which every key is a
    linearizable register, stored on every node of the cluster."""


# --- client commands -----------------------------------------------------------

nodes_option = click.option(
    "--nodes",
    envvar="QKV_NODES",
    default=DEFAULT_NODES,
    show_default=True,
    help="Nodes to try in turn, HOST:PORT,... (default: $QKV_NODES, then the local cluster).",
)
tls_options = [
    click.option(
        "--tls-ca",
        envvar="QKV_TLS_CA",
        type=click.Path(path_type=Path, dir_okay=False),
        default=None,
        help="Speak TLS, trusting the nodes' certificates signed by this CA (PEM; default $QKV_TLS_CA).",
    ),
    click.option(
        "--tls-cert",
        envvar="QKV_TLS_CERT",
        type=click.Path(path_type=Path, dir_okay=False),
        default=None,
        help="A client certificate (PEM) to present, if the nodes want one (default $QKV_TLS_CERT).",
    ),
    click.option(
        "--tls-key",
        envvar="QKV_TLS_KEY",
        type=click.Path(path_type=Path, dir_okay=False),
        default=None,
        help="The client certificate's key (PEM; default $QKV_TLS_KEY).",
    ),
]


def with_tls_options(f: Command) -> Command:
    """Add the TLS options of the client commands."""
    for option in reversed(tls_options):
        f = option(f)
    return f


def _client_tls(tls_ca: Path | None, tls_cert: Path | None, tls_key: Path | None) -> ssl.SSLContext | None:
    if tls_ca is None:
        if tls_cert is not None or tls_key is not None:
            raise click.BadParameter("--tls-cert and --tls-key need --tls-ca")
        return None
    from net.tls import client_context

    try:
        return client_context(tls_ca, tls_cert, tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise click.BadParameter(f"cannot load the TLS files: {exc}") from None


timeout_option = click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=5.0,
    show_default=True,
    help="Seconds to wait for each node before trying the next.",
)


def _key(text: str) -> bytes:
    # Arguments arrive as str; fsencode gives back the exact bytes typed,
    # even ones that are not valid UTF-8.
    return os.fsencode(text)


ClientAction = Callable[[Client, bytes], Awaitable[int]]


def _run_client(
    nodes: str, timeout: float, tls: ssl.SSLContext | None, key: str, action: ClientAction
) -> int:
    """Run ``action(client, key bytes)`` and return its exit status; the
    errors of every client command become one line and their exit status."""
    addresses = address_list(nodes)
    key_bytes = _key(key)
    if not 1 <= len(key_bytes) <= 1024:
        fail("KEY must be 1 to 1024 bytes", EXIT_USAGE)

    async def run() -> int:
        async with open_client(addresses, timeout=timeout, ssl_context=tls) as client:
            return await action(client, key_bytes)

    try:
        return trio.run(run)
    except Unavailable as exc:
        fail(exc.message, EXIT_UNAVAILABLE)
    except QkvError as exc:
        fail(f"{exc.code}: {exc.message}", EXIT_USAGE if exc.definite else EXIT_UNAVAILABLE)


def _print_value(value: bytes | None) -> None:
    """A value on stdout as stored: the bytes, no newline added."""
    sys.stdout.buffer.write(value or b"")
    sys.stdout.buffer.flush()


def _not_swapped(key: str, result: CasResult, what: str) -> int:
    """Exit 1 of ``cas`` and ``set --if-absent``: the current value (if
    any) on stdout, as ``get`` prints it, and one line on stderr."""
    if result.found:
        _print_value(result.value)
        click.echo(f"qkv: {what}: key {key!r} holds another value (printed on stdout)", err=True)
    else:
        click.echo(f"qkv: {what}: key {key!r} not found", err=True)
    return EXIT_NOT_DONE


@cli.command()
@click.argument("key")
@nodes_option
@timeout_option
@with_tls_options
def get(key: str, nodes: str, timeout: float, **tls: Path | None) -> None:
    """Print the value of KEY to stdout, as stored (exit 1 if not found)."""

    async def action(client: Client, key_bytes: bytes) -> int:
        result = await client.get(key_bytes)
        if not result.found:
            click.echo(f"qkv: key {key!r} not found", err=True)
            return EXIT_NOT_FOUND
        _print_value(result.value)
        return 0

    sys.exit(_run_client(nodes, timeout, _client_tls(**tls), key, action))


@cli.command(name="set")
@click.argument("key")
@click.argument("value")
@click.option(
    "--if-absent",
    is_flag=True,
    help="Write only if KEY is not found (never written, or deleted); exit 1 if it has a value.",
)
@nodes_option
@timeout_option
@with_tls_options
def set_(key: str, value: str, if_absent: bool, nodes: str, timeout: float, **tls: Path | None) -> None:
    """Set KEY to VALUE, acknowledged once a majority stored it durably.

    With --if-absent it is 'qkv cas KEY --expect-absent --value VALUE':
    exit 0 written; exit 1 if KEY already had a value, which is printed
    on stdout as 'get' prints it."""

    async def action(client: Client, key_bytes: bytes) -> int:
        if not if_absent:
            await client.set(key_bytes, _key(value))
            return 0
        result = await client.cas(key_bytes, None, _key(value))
        return 0 if result.swapped else _not_swapped(key, result, "not written")

    sys.exit(_run_client(nodes, timeout, _client_tls(**tls), key, action))


@cli.command()
@click.argument("key")
@nodes_option
@timeout_option
@with_tls_options
def delete(key: str, nodes: str, timeout: float, **tls: Path | None) -> None:
    """Delete KEY (it then reads as not found)."""

    async def action(client: Client, key_bytes: bytes) -> int:
        await client.delete(key_bytes)
        return 0

    sys.exit(_run_client(nodes, timeout, _client_tls(**tls), key, action))


@cli.command()
@click.argument("key")
@click.option("--expect", metavar="OLD", default=None, help="Swap only if KEY holds exactly OLD.")
@click.option(
    "--expect-absent", is_flag=True, help="Swap only if KEY is not found (never written, or deleted)."
)
@click.option("--value", metavar="NEW", default=None, help="What KEY then holds.")
@click.option("--delete", "delete_", is_flag=True, help="Delete KEY instead of giving it a value.")
@nodes_option
@timeout_option
@with_tls_options
def cas(
    key: str,
    expect: str | None,
    expect_absent: bool,
    value: str | None,
    delete_: bool,
    nodes: str,
    timeout: float,
    **tls: Path | None,
) -> None:
    """Compare-and-set: if KEY holds what --expect or --expect-absent says,
    give it --value NEW or --delete it, in one atomic step.

    Exit 0 swapped; exit 1 not swapped: nothing changed, the current value
    (if any) is printed on stdout as 'get' prints it, and stderr says so.
    Retried on another node with the same request id, like 'set'.

    \b
    qkv cas lock --expect-absent --value me     # take it if free
    qkv cas lock --expect me --delete           # release it if still mine
    qkv cas cfg --expect v1 --value v2"""
    if (expect is None) == (not expect_absent):
        raise click.UsageError("give exactly one of --expect OLD and --expect-absent")
    if (value is None) == (not delete_):
        raise click.UsageError("give exactly one of --value NEW and --delete")
    expected = None if expect is None else _key(expect)
    new = None if value is None else _key(value)

    async def action(client: Client, key_bytes: bytes) -> int:
        result = await client.cas(key_bytes, expected, new)
        return 0 if result.swapped else _not_swapped(key, result, "not swapped")

    sys.exit(_run_client(nodes, timeout, _client_tls(**tls), key, action))


class NegativeNumbersCommand(click.Command):
    """A command whose arguments may be negative integers (``qkv incr k -5``).

    Click takes any word starting with '-' for an option; this command
    lets one that is a negative integer through as an argument (with
    ``ignore_unknown_options``) and still refuses every other unknown
    option, so a misspelt option never becomes a KEY."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("context_settings", {})["ignore_unknown_options"] = True
        super().__init__(*args, **kwargs)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        takes_value: set[str] = set()
        known: set[str] = set()
        for param in self.get_params(ctx):
            if isinstance(param, click.Option):
                known.update(param.opts, param.secondary_opts)
                if not (param.is_flag or param.count):
                    takes_value.update(param.opts)
        waiting_value = False
        for arg in args:
            if arg == "--":
                break
            if waiting_value:
                waiting_value = False
            elif arg.startswith("-") and len(arg) > 1 and not NEGATIVE_INTEGER.fullmatch(arg):
                name = arg.partition("=")[0]
                if name not in known:
                    raise click.NoSuchOption(name, ctx=ctx)
                waiting_value = name in takes_value and "=" not in arg
        return super().parse_args(ctx, args)


NEGATIVE_INTEGER = re.compile(r"-[0-9]+")


@cli.command(cls=NegativeNumbersCommand)
@click.argument("key")
@click.argument("by", type=click.IntRange(MIN_INT64, MAX_INT64), default=1, required=False)
@nodes_option
@timeout_option
@with_tls_options
def incr(key: str, by: int, nodes: str, timeout: float, **tls: Path | None) -> None:
    """Add BY (default 1; may be negative or zero) to the integer KEY holds,
    and print the new value in decimal.

    A key not found counts as 0. Exit 1 (not_integer), with nothing
    changed, if KEY holds anything but a canonical signed 64-bit decimal
    (0, or an optional '-' then 1-9 then digits) or the sum would leave
    that range. Retried on another node with the same request id, so a
    retry never adds twice.

    \b
    qkv incr visits          # 1, 2, 3, ...
    qkv incr stock -5"""

    async def action(client: Client, key_bytes: bytes) -> int:
        try:
            result = await client.incr(key_bytes, by)
        except NotInteger as exc:
            click.echo(f"qkv: not_integer: key {key!r}: {exc.message}", err=True)
            return EXIT_NOT_DONE
        click.echo(str(result.value))
        return 0

    sys.exit(_run_client(nodes, timeout, _client_tls(**tls), key, action))


@cli.command()
@nodes_option
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=2.0,
    show_default=True,
    help="Seconds to wait for each node.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--quiet", is_flag=True, help="Print nothing; only set the exit status.")
@with_tls_options
def status(nodes: str, timeout: float, as_json: bool, quiet: bool, **tls: Path | None) -> None:
    """Ask every node how it is; exit 3 unless a majority is serving."""
    from cli.status import cluster_status

    report = cluster_status(address_list(nodes), timeout, _client_tls(**tls))
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    elif not quiet:
        click.echo(report.table())
    sys.exit(0 if report.majority_serving else EXIT_UNAVAILABLE)


# --- servers ------------------------------------------------------------------------

size_options = [
    click.option(
        "--max-frame",
        type=click.IntRange(min=1024),
        default=2 * 1024 * 1024,
        show_default=True,
        help="Largest frame body accepted, in bytes.",
    ),
    click.option(
        "--max-value",
        type=click.IntRange(min=0),
        default=1024 * 1024,
        show_default=True,
        help="Largest value accepted, in bytes.",
    ),
    click.option(
        "--request-timeout",
        type=click.FloatRange(min=0.05),
        default=2.0,
        show_default=True,
        help="Seconds a request may take before it is answered 'unavailable'.",
    ),
    click.option(
        "--storage",
        type=click.Choice(["sqlite", "memory"]),
        default="sqlite",
        show_default=True,
        help="Storage engine. 'memory' keeps nothing across a restart: for tests and benchmarks only.",
    ),
    click.option(
        "--log-level",
        type=click.Choice(["debug", "info", "warning", "error"]),
        default="info",
        show_default=True,
        help="Least severe log level written to stderr.",
    ),
    click.option(
        "--log-format",
        type=click.Choice(["kv", "json"]),
        default="kv",
        show_default=True,
        help="Log lines as key=value pairs or as JSON objects, one per event.",
    ),
]


def with_size_options(f: Command) -> Command:
    """Add the options shared by ``serve`` and ``cluster``."""
    for option in reversed(size_options):
        f = option(f)
    return f


@cli.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    metavar="FILE",
    help="TOML file with these settings (named like the flags, '_' for '-'); flags win over it.",
)
@click.option(
    "--cluster",
    "cluster_file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    metavar="FILE",
    help='TOML file listing every member ([nodes] ID = "HOST:PORT"), instead of --peer.',
)
@click.option("--id", "node_id", default=None, help="This node's id (letters, digits, - and _). Required.")
@click.option(
    "--listen",
    default=None,
    help="HOST:PORT where clients and peers connect (default with --cluster: this node's address there).",
)
@click.option(
    "--peer",
    "peers",
    multiple=True,
    metavar="ID=HOST:PORT",
    help="Another member of the cluster; repeat once per member.",
)
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Directory for everything the node must not lose (created if missing). Required.",
)
@click.option(
    "--resp-listen",
    default=None,
    metavar="HOST:PORT",
    help="Also serve the Redis protocol (RESP) here; see docs/resp.md.",
)
@click.option(
    "--cluster-secret-file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    metavar="FILE",
    help="File holding the shared cluster secret (16+ bytes) that peers must prove; see docs/operations.md.",
)
@click.option(
    "--tls-cert",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    metavar="FILE",
    help="This node's certificate chain (PEM); with --tls-key and --tls-ca, TLS for every connection.",
)
@click.option(
    "--tls-key",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    metavar="FILE",
    help="This node's private key (PEM).",
)
@click.option(
    "--tls-ca",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    metavar="FILE",
    help="The CA (PEM) that signs every node's certificate; peers must present one (mutual TLS).",
)
@click.option(
    "--metrics",
    default=None,
    metavar="HOST:PORT",
    help="Serve Prometheus metrics over HTTP here (GET /metrics); see docs/operations.md.",
)
@with_size_options
@click.pass_context
def serve(ctx: click.Context, /, **flags: Any) -> None:
    """Run one node in the foreground until SIGTERM or Ctrl-C."""
    from cli.serve import NodeSettings, resolve_flags, run_node

    settings = resolve_flags(ctx, flags)
    setup_logging(settings["log_level"], settings["log_format"])
    node = NodeSettings.from_flags(
        node_id=settings["node_id"],
        listen=settings["listen"],
        peers=settings["peers"],
        data_dir=None if settings["storage"] == "memory" else settings["data_dir"],
        max_frame=settings["max_frame"],
        max_value=settings["max_value"],
        request_timeout=settings["request_timeout"],
        resp_listen=settings["resp_listen"],
        metrics=settings["metrics"],
        cluster_secret_file=settings["cluster_secret_file"],
        tls=(settings["tls_cert"], settings["tls_key"], settings["tls_ca"]),
    )
    sys.exit(run_node(node))


@cli.command()
@click.option(
    "--size", type=click.IntRange(min=1, max=15), default=3, show_default=True, help="Number of nodes."
)
@click.option(
    "--base-port",
    type=click.IntRange(min=1, max=65535 - 15),
    default=7001,
    show_default=True,
    help="Node i listens on 127.0.0.1:BASE_PORT+i-1.",
)
@click.option(
    "--data-dir", type=click.Path(path_type=Path), required=True, help="Each node stores in DATA_DIR/n<i>."
)
@click.option(
    "--resp-base-port",
    type=click.IntRange(min=1, max=65535 - 15),
    default=None,
    help="Node i also serves the Redis protocol on 127.0.0.1:RESP_BASE_PORT+i-1.",
)
@with_size_options
def cluster(
    size: int,
    base_port: int,
    data_dir: Path,
    resp_base_port: int | None,
    max_frame: int,
    max_value: int,
    request_timeout: float,
    storage: str,
    log_level: str,
    log_format: str,
) -> None:
    """Run a local cluster of SIZE nodes in this process until Ctrl-C."""
    from cli.serve import run_local_cluster

    setup_logging(log_level, log_format)
    sys.exit(
        run_local_cluster(
            size,
            base_port,
            None if storage == "memory" else data_dir,
            resp_base_port=resp_base_port,
            max_frame=max_frame,
            max_value=max_value,
            request_timeout=request_timeout,
        )
    )


@cli.command()
@click.option(
    "--nodes",
    envvar="QKV_NODES",
    default=None,
    help="Cluster to load, HOST:PORT,... (default: $QKV_NODES; or use --local).",
)
@click.option(
    "--local",
    type=click.IntRange(min=1, max=9),
    default=None,
    help="Start a cluster of this many qkv processes on free loopback ports and load it.",
)
@click.option(
    "--storage",
    type=click.Choice(["sqlite", "memory"]),
    default="sqlite",
    show_default=True,
    help="Storage engine of the --local cluster.",
)
@click.option(
    "--clients",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Connections, spread over the nodes.",
)
@click.option(
    "--pipeline",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Requests in flight per connection.",
)
@click.option(
    "--duration",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Measured seconds (after the warm-up).",
)
@click.option(
    "--requests",
    type=click.IntRange(min=1),
    default=None,
    help="Stop after this many measured requests instead of --duration.",
)
@click.option(
    "--workload",
    "kind",
    type=click.Choice(["mixed", "incr", "cas"]),
    default="mixed",
    show_default=True,
    help="mixed: gets and sets (see --read-ratio); incr: incr by 1; cas: read-free cas loops, "
    "each expecting what the last reply showed (few --keys: contended).",
)
@click.option("--keys", type=click.IntRange(min=1), default=5000, show_default=True, help="Key space.")
@click.option(
    "--distribution",
    type=click.Choice(["uniform", "zipfian"]),
    default="uniform",
    show_default=True,
    help="How keys are drawn.",
)
@click.option(
    "--value-size",
    type=click.IntRange(min=0),
    default=100,
    show_default=True,
    help="Bytes per value of a set or cas (a cas value has at least 8).",
)
@click.option(
    "--read-ratio",
    type=click.FloatRange(0, 1),
    default=0.5,
    show_default=True,
    help="Share of gets among requests (the mixed workload).",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=1),
    default=None,
    help="Open loop: requests per second in all (latency counted from the due time).",
)
@click.option(
    "--warmup",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Unmeasured seconds before measuring.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def bench(
    nodes: str | None,
    local: int | None,
    storage: str,
    clients: int,
    pipeline: int,
    duration: float,
    requests: int | None,
    kind: str,
    keys: int,
    distribution: str,
    value_size: int,
    read_ratio: float,
    rate: float | None,
    warmup: float,
    as_json: bool,
) -> None:
    """Measure throughput and latency percentiles of a cluster.

    \b
    --workload mixed: gets and sets, --read-ratio of them gets.
    --workload incr:  incr by 1 of a counter per key.
    --workload cas:   compare-and-set loops without reads: each cas expects
                      the value the last reply showed for its key (absent at
                      first) and writes a new one; the report counts those
                      that did not swap. Few --keys (say 10) make the loops
                      contend; the default 5000 measures cas alone.
    Each workload has keys of its own."""
    from cli.bench import BenchError, Workload, emit, run_bench

    if (nodes is None) == (local is None):
        raise click.UsageError("give either --nodes (or QKV_NODES) or --local N")
    work = Workload(
        kind=kind,
        clients=clients,
        pipeline=pipeline,
        duration=duration,
        requests=requests,
        keys=keys,
        distribution=distribution,
        value_size=value_size,
        read_ratio=read_ratio,
        rate=rate,
        warmup=warmup,
    )
    try:
        report = run_bench(None if nodes is None else address_list(nodes), local, storage, work, as_json)
    except BenchError as exc:
        fail(str(exc), EXIT_UNAVAILABLE)
    emit(report, work, as_json)


def main() -> None:
    """Entry point: usage errors are one line on stderr and exit 2."""
    try:
        code = cli.main(prog_name="qkv", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx else str(exc), err=True)
        sys.exit(EXIT_USAGE)
    except click.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx else "qkv"
        fail(f"{exc.format_message()} (see '{command} --help')", EXIT_USAGE)
    except click.ClickException as exc:
        fail(exc.format_message(), EXIT_USAGE)
    except click.exceptions.Abort:
        sys.exit(130)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
