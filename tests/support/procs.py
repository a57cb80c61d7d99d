"""Helpers for tests that run ``qkv`` as real processes.

* ``free_ports(n)``: ports free on loopback right now (bind port 0, read,
  close); ``consecutive_free_ports(n)``: a base port with ``n`` free ports
  in a row (for ``qkv cluster`` and ``scripts/cluster.sh``).
* ``run_qkv(*args)``: run one ``qkv`` command to completion under a timeout
  and capture ``(returncode, stdout bytes, stderr text)``.
* ``ProcCluster``: ``N`` ``qkv serve`` processes (ids ``n1..nN``, node
  indices 0-based like ``quorum.cluster.LocalCluster``), each with its own
  data dir and log file under a given directory. Used as a context manager
  it always stops every process it started, SIGTERM first, then SIGKILL.

Every wait here is bounded. ``ProcCluster.wait_serving`` runs its own trio
loop; inside a trio test use ``await cluster.wait_serving_async()``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType

import attrs
import trio

from net.address import Address
from net.client import open_client
from net.errors import PeerUnavailable, QkvError

__all__ = [
    "LOOPBACK",
    "QKV",
    "ProcCluster",
    "QkvResult",
    "consecutive_free_ports",
    "free_ports",
    "ping_states",
    "pid_alive",
    "qkv_env",
    "run_qkv",
    "run_qkv_many",
    "started_cluster",
    "stop_process",
    "wait_serving_addresses",
]

LOOPBACK = "127.0.0.1"
#: the console script of the venv running the tests
QKV = Path(sys.executable).parent / "qkv"

#: how long a node gets to exit after SIGTERM before it is killed
STOP_GRACE = 5.0


# --- ports -----------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on loopback right now (bound together,
    read, released)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


def consecutive_free_ports(n: int, *, attempts: int = 100) -> int:
    """A base port ``P`` such that ``P .. P+n-1`` are all free right now."""
    for _ in range(attempts):
        base = free_ports(1)[0]
        if base + n - 1 > 65535:
            continue
        if all(_port_free(base + k) for k in range(1, n)):
            return base
    raise RuntimeError(f"found no {n} consecutive free ports in {attempts} attempts")


# --- one-shot commands ---------------------------------------------------------------


@attrs.frozen
class QkvResult:
    returncode: int
    stdout: bytes
    stderr: str

    @property
    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def qkv_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a ``qkv`` process: ours without ``QKV_*``
    variables (so a developer's ``QKV_NODES`` cannot leak in), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QKV_")}
    env.update(extra or {})
    return env


def run_qkv(
    *args: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    timeout: float = 30.0,
    cwd: Path | None = None,
) -> QkvResult:
    """Run ``qkv ARGS...`` to completion (killed after ``timeout`` seconds,
    which then raises ``subprocess.TimeoutExpired``)."""
    done = subprocess.run(
        [str(QKV), *map(str, args)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=qkv_env(env),
        timeout=timeout,
        cwd=cwd,
        check=False,
    )
    return QkvResult(done.returncode, done.stdout, done.stderr.decode("utf-8", "replace"))


def run_qkv_many(
    commands: Mapping[str, Sequence[str | os.PathLike[str]]],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 30.0,
    workers: int = 4,
) -> dict[str, QkvResult]:
    """Run independent ``qkv`` commands concurrently (each as ``run_qkv``);
    results by name. Python start-up dominates a short command, so this is
    much faster than one after the other."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {
            name: pool.submit(run_qkv, *args, env=env, timeout=timeout) for name, args in commands.items()
        }
        return {name: future.result() for name, future in futures.items()}


# --- processes ----------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs: ``os.kill(pid, 0)`` finds it and
    it is not a zombie (exited, waiting to be reaped: where PID 1 reaps
    orphans late or never, as in some containers, a dead orphan stays a
    zombie for a while). A killed process whose leader thread is already a
    zombie but another thread is still exiting (say, blocked in fsync)
    still holds its files and locks: it counts as alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    task_dir = Path(f"/proc/{pid}/task")
    try:
        threads = list(task_dir.iterdir())
    except OSError:
        return True  # no /proc (not Linux): trust os.kill
    for thread in threads:
        try:
            stat = (thread / "stat").read_text()
        except OSError:
            continue  # that thread is gone
        # the state follows the parenthesised command name, which may hold spaces
        if stat.rpartition(")")[2].split()[0] not in ("Z", "X"):
            return True
    return False


def stop_process(
    proc: subprocess.Popen[bytes], *, sig: int = signal.SIGTERM, grace: float = STOP_GRACE
) -> int:
    """Send ``sig``, wait up to ``grace`` seconds, then SIGKILL; always reaps.
    Returns the exit status (negative: killed by that signal)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            return proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
    return proc.wait(timeout=30)


async def ping_states(addresses: Sequence[Address], *, per_node: float = 1.0) -> list[str]:
    """Each node's state as its ping answers it (``"unreachable"`` if it
    does not within ``per_node`` seconds)."""
    states = ["unreachable"] * len(addresses)

    async def ask(i: int) -> None:
        try:
            with trio.fail_after(per_node + 0.5):
                async with open_client([addresses[i]], timeout=per_node) as client:
                    states[i] = (await client.ping(addresses[i])).state
        except (PeerUnavailable, QkvError, trio.TooSlowError, OSError):
            states[i] = "unreachable"

    async with trio.open_nursery() as nursery:
        for i in range(len(addresses)):
            nursery.start_soon(ask, i)
    return states


class ProcCluster:
    """``size`` ``qkv serve`` processes on loopback (nodes are 0-based
    indices; their ids are ``n1..nN``).

    Ports are picked when the object is made (pick them right before
    starting); data dirs are ``root/<id>/data``, logs ``root/<id>.log``
    (appended to across restarts). ``extra_args`` go to every ``serve``.
    """

    def __init__(
        self, root: Path, size: int = 3, *, extra_args: Sequence[str] = (), ports: Sequence[int] | None = None
    ) -> None:
        self.root = Path(root)
        self.size = size
        self.ids = [f"n{i + 1}" for i in range(size)]
        self.ports = list(ports) if ports is not None else free_ports(size)
        if len(self.ports) != size:
            raise ValueError("one port per node")
        self.extra_args = list(extra_args)
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * size
        self.root.mkdir(parents=True, exist_ok=True)

    # --- layout ---

    @property
    def addresses(self) -> list[Address]:
        return [Address(LOOPBACK, p) for p in self.ports]

    def address(self, i: int) -> str:
        return str(self.addresses[i])

    @property
    def nodes_arg(self) -> str:
        """The ``--nodes`` value naming every node."""
        return ",".join(str(a) for a in self.addresses)

    def data_dir(self, i: int) -> Path:
        return self.root / self.ids[i] / "data"

    def log_path(self, i: int) -> Path:
        return self.root / f"{self.ids[i]}.log"

    def log(self, i: int) -> str:
        path = self.log_path(i)
        return path.read_text("utf-8", "replace") if path.exists() else ""

    def logs_tail(self, lines: int = 15) -> str:
        out = []
        for i in range(self.size):
            tail = self.log(i).splitlines()[-lines:]
            out.append(f"--- {self.ids[i]} ({self.log_path(i)}) ---\n" + "\n".join(tail))
        return "\n".join(out)

    def serve_args(self, i: int) -> list[str]:
        args = [str(QKV), "serve", "--id", self.ids[i], "--listen", self.address(i)]
        for j in range(self.size):
            if j != i:
                args += ["--peer", f"{self.ids[j]}={self.address(j)}"]
        return [*args, "--data-dir", str(self.data_dir(i)), *self.extra_args]

    # --- processes ---

    def proc(self, i: int) -> subprocess.Popen[bytes]:
        proc = self.procs[i]
        if proc is None:
            raise RuntimeError(f"{self.ids[i]} was never started")
        return proc

    def pid(self, i: int) -> int:
        return self.proc(i).pid

    def running(self, i: int) -> bool:
        proc = self.procs[i]
        return proc is not None and proc.poll() is None

    def start(self, i: int) -> subprocess.Popen[bytes]:
        if self.running(i):
            raise RuntimeError(f"{self.ids[i]} is already running")
        with self.log_path(i).open("ab") as log:
            log.write(f"=== test harness: starting {self.ids[i]} ===\n".encode())
            log.flush()
            proc = subprocess.Popen(
                self.serve_args(i),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=qkv_env(),
                # own process group: a Ctrl-C meant for pytest does not reach
                # the nodes; the harness stops them itself
                start_new_session=True,
            )
        self.procs[i] = proc
        return proc

    def start_all(self) -> None:
        for i in range(self.size):
            self.start(i)

    def kill9(self, i: int) -> int:
        """SIGKILL node ``i`` and reap it; returns its (negative) status."""
        proc = self.proc(i)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        return proc.wait(timeout=30)

    def kill9_all(self) -> None:
        """SIGKILL every running node at once (all signals first, then reap)."""
        running = [p for p in self.procs if p is not None and p.poll() is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        for proc in running:
            proc.wait(timeout=30)

    def send_signal(self, i: int, sig: int = signal.SIGTERM) -> None:
        self.proc(i).send_signal(sig)

    def terminate(self, i: int, *, sig: int = signal.SIGTERM, within: float = 10.0) -> int:
        """Send ``sig`` (SIGTERM) and wait for the exit status. If the node
        has not exited within ``within`` seconds it is killed and
        ``AssertionError`` raised."""
        proc = self.proc(i)
        if proc.poll() is None:
            proc.send_signal(sig)
        return self.wait_exit(i, within=within)

    def wait_exit(self, i: int, *, within: float = 10.0) -> int:
        """Wait for node ``i`` to exit (no signal sent); if it has not within
        ``within`` seconds it is killed and ``AssertionError`` raised."""
        proc = self.proc(i)
        try:
            return proc.wait(timeout=within)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
            raise AssertionError(
                f"{self.ids[i]} did not exit within {within} s\n{self.logs_tail()}"
            ) from None

    async def terminate_async(self, i: int, *, sig: int = signal.SIGTERM, within: float = 10.0) -> int:
        """``terminate`` without blocking the trio loop."""
        proc = self.proc(i)
        if proc.poll() is None:
            proc.send_signal(sig)
        return await self.wait_exit_async(i, within=within)

    async def wait_exit_async(self, i: int, *, within: float = 10.0) -> int:
        """``wait_exit`` without blocking the trio loop (the wait runs in a
        thread). Sends no signal: a node signalled twice may be stopped by
        the second one."""
        proc = self.proc(i)
        try:
            return await trio.to_thread.run_sync(functools.partial(proc.wait, timeout=within))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
            raise AssertionError(
                f"{self.ids[i]} did not exit within {within} s\n{self.logs_tail()}"
            ) from None

    def restart(self, i: int) -> subprocess.Popen[bytes]:
        """Stop node ``i`` if running (SIGTERM, then SIGKILL), start it again
        on its own data dir."""
        proc = self.procs[i]
        if proc is not None:
            stop_process(proc)
        self.procs[i] = None
        return self.start(i)

    def close(self) -> None:
        """Stop every process: SIGTERM to all, up to ``STOP_GRACE`` seconds,
        then SIGKILL; all reaped."""
        live = [p for p in self.procs if p is not None and p.poll() is None]
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for proc in live:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        for maybe in self.procs:
            if maybe is not None:
                with contextlib.suppress(ProcessLookupError):
                    if maybe.poll() is None:
                        maybe.kill()
                maybe.wait(timeout=30)

    def __enter__(self) -> ProcCluster:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- readiness ---

    async def wait_serving_async(self, within: float = 20.0, nodes: Iterable[int] | None = None) -> None:
        """Wait until every node in ``nodes`` (default: all) answers a ping
        with state ``serving``; ``AssertionError`` with the logs if not in
        ``within`` seconds or if one of them exits."""
        chosen = list(range(self.size) if nodes is None else nodes)
        for i in chosen:
            self.proc(i)
        await wait_serving_addresses(
            [self.addresses[i] for i in chosen],
            within,
            procs={self.ids[i]: self.proc(i) for i in chosen},
            describe=self.logs_tail,
        )

    async def wait_coordinating_async(self, within: float = 20.0, nodes: Iterable[int] | None = None) -> None:
        """Wait until every node in ``nodes`` (default: all) completes a get
        as coordinator. A node restarted on a ready data dir pings
        ``serving`` at once, but answers ``unavailable`` until its peer links
        (which reconnect with backoff) reach a majority."""
        chosen = list(range(self.size) if nodes is None else nodes)
        last: dict[str, str] = {}

        async def probe(i: int) -> None:
            async with open_client([self.addresses[i]], timeout=2.0) as client:
                while True:
                    try:
                        await client.get(b"\x00qkv-test-probe")
                        return
                    except (QkvError, PeerUnavailable) as exc:
                        last[self.ids[i]] = f"{type(exc).__name__}: {exc}"
                    proc = self.proc(i)
                    if proc.poll() is not None:
                        raise AssertionError(
                            f"{self.ids[i]} exited with status {proc.returncode}\n{self.logs_tail()}"
                        )
                    await trio.sleep(0.05)

        with trio.move_on_after(within):
            async with trio.open_nursery() as nursery:
                for i in chosen:
                    nursery.start_soon(probe, i)
            return
        raise AssertionError(
            f"not all of {[self.ids[i] for i in chosen]} coordinate after {within} s: "
            f"{last}\n{self.logs_tail()}"
        )

    def wait_serving(self, within: float = 20.0, nodes: Iterable[int] | None = None) -> None:
        """``wait_serving_async`` from synchronous code (not inside trio)."""
        trio.run(self.wait_serving_async, within, nodes)


async def wait_serving_addresses(
    addresses: Sequence[Address],
    within: float = 20.0,
    *,
    procs: Mapping[str, subprocess.Popen[bytes]] | None = None,
    describe: Callable[[], str] | None = None,
) -> None:
    """Wait until every address answers a ping with state ``serving``.
    ``AssertionError`` (with ``describe()``, e.g. the logs) after ``within``
    seconds, or as soon as one of ``procs`` has exited."""
    states: list[str] = []
    with trio.move_on_after(within):
        while True:
            for name, proc in (procs or {}).items():
                if proc.poll() is not None:
                    raise AssertionError(
                        f"{name} exited with status {proc.returncode} before serving\n"
                        + (describe() if describe else "")
                    )
            states = await ping_states(addresses)
            if all(s == "serving" for s in states):
                return
            await trio.sleep(0.05)
    raise AssertionError(
        f"{[str(a) for a in addresses]} not all serving after {within} s (states {states})\n"
        + (describe() if describe else "")
    )


@contextlib.contextmanager
def started_cluster(
    root: Path, size: int = 3, *, extra_args: Sequence[str] = (), within: float = 20.0
) -> Iterator[ProcCluster]:
    """A ``ProcCluster`` started and serving (sync code only); always stopped."""
    with ProcCluster(root, size, extra_args=extra_args) as cluster:
        cluster.start_all()
        cluster.wait_serving(within)
        yield cluster
