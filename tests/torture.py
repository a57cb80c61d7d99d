"""Long fault-injection runs ("torture"): a subprocess cluster whose every
node-to-node link runs through a proxy, concurrent clients, and a nemesis
injecting every kind of fault for minutes; the whole history is checked for
linearizability at the end (and, with ``--workload counter``, every counter
against its increments).

    .venv/bin/python -m tests.torture --nodes 5 --duration 600 --seed 7 \\
        --report torture-report.txt
    scripts/torture.sh --nodes 3 --duration 120            # the same, via the venv
    scripts/torture.sh --nodes 5 --duration 150 --workload mixed

``--workload`` chooses the operations (``tests.support.workload``):
``register`` (get, set, delete; the default), ``cas-register``, ``counter``
or ``mixed`` (every op, values sometimes numbers).

Writes the report as text to ``--report`` and as JSON beside it (same name,
``.json``), and prints it. Exit status: 0 linearizable and healthy; 1 the
history is not linearizable (the checker's explanation is printed); 2 it is
linearizable but something else went wrong (a key unreadable after healing,
a wiped node that never caught up, a counter that does not add up); 3 the
run itself failed, or the checker gave no verdict within ``--check-timeout``.

Node data dirs and logs go to ``--workdir`` (default: a temporary directory,
removed unless ``--keep`` or a violation). On a violation the history is
saved there as ``history.jsonl`` (one op per line) for a closer look.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

import trio

from tests.support.history import Op
from tests.support.nemesis import ALL_PROC_KINDS, NemesisReport, run_subprocess, save_history
from tests.support.workload import WORKLOADS, WorkloadConfig

EXIT_OK, EXIT_VIOLATION, EXIT_UNHEALTHY, EXIT_ERROR = 0, 1, 2, 3


def _range(text: str) -> tuple[float, float]:
    low, _, high = text.partition(",")
    values = (float(low), float(high or low))
    if values[0] < 0 or values[1] < values[0]:
        raise argparse.ArgumentTypeError(f"{text!r} is not LOW,HIGH with 0 <= LOW <= HIGH")
    return values


def _kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in ALL_PROC_KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"unknown fault kinds {unknown}; known: {', '.join(ALL_PROC_KINDS)}")
    return kinds


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tests.torture",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--nodes", type=int, choices=(3, 5), default=3, help="cluster size (default 3)")
    p.add_argument(
        "--duration",
        type=float,
        default=300.0,
        help="seconds of faults (default 300; at least long enough to inject every kind once)",
    )
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--keys", type=int, default=5, help="keys they share (default 5)")
    p.add_argument(
        "--seed",
        type=int,
        default=int(time.time()) % 100000,
        help="seed of the fault schedule and the workload (default: from the clock)",
    )
    p.add_argument(
        "--kinds",
        type=_kinds,
        default=list(ALL_PROC_KINDS),
        help="comma-separated fault kinds (default: all: " + ", ".join(ALL_PROC_KINDS) + ")",
    )
    p.add_argument(
        "--workload",
        choices=WORKLOADS,
        default="register",
        help="the operations: get/set/delete (register, the default), cas-register, counter or mixed",
    )
    p.add_argument("--hold", type=_range, default=(0.5, 4.0), help="LOW,HIGH seconds a fault lasts")
    p.add_argument("--gap", type=_range, default=(0.2, 1.5), help="LOW,HIGH seconds between steps")
    p.add_argument(
        "--overlap",
        type=float,
        default=0.3,
        help="probability that a second fault overlaps a step's first (default 0.3)",
    )
    p.add_argument(
        "--routing",
        choices=("mixed", "pinned", "failover"),
        default="mixed",
        help="clients pinned to one node, failing over, or half and half (default)",
    )
    p.add_argument("--timeout", type=float, default=1.5, help="client timeout per attempt (s)")
    p.add_argument("--request-timeout", type=float, default=1.0, help="the nodes' --request-timeout (s)")
    p.add_argument("--think", type=float, default=0.0, help="max pause between a client's ops (s)")
    p.add_argument(
        "--check-timeout",
        type=float,
        default=1800.0,
        help="seconds the checker may take (in a process of its own) before the run gives up (default 1800)",
    )
    p.add_argument(
        "--report",
        type=Path,
        default=Path("torture-report.txt"),
        help="text report path; the JSON goes beside it with .json (default torture-report.txt)",
    )
    p.add_argument("--workdir", type=Path, default=None, help="node data dirs and logs (default: temporary)")
    p.add_argument("--keep", action="store_true", help="keep the workdir")
    p.add_argument("--quiet", action="store_true", help="do not print each fault as it is injected")
    return p


def _json_path(report: Path) -> Path:
    return report.with_suffix(".json") if report.suffix != ".json" else report.with_suffix(".json.json")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    qkv = Path(sys.executable).parent / "qkv"
    if not qkv.exists():
        print(
            f"torture: {qkv} not found: run with the project's venv (scripts/test.sh installs it)",
            file=sys.stderr,
        )
        return EXIT_ERROR
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="qkv-torture-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    def progress(message: str) -> None:
        if not args.quiet:
            print(f"[{time.monotonic() - started:7.1f}s] {message}", flush=True)

    config = WorkloadConfig(
        clients=args.clients,
        keys=args.keys,
        timeout=args.timeout,
        routing=args.routing,
        think=args.think,
        workload=args.workload,
    )
    load_before = os.getloadavg()
    print(
        f"torture: {args.nodes} nodes, seed {args.seed}, {args.duration:g} s of faults, "
        f"{args.clients} clients, {args.keys} keys, workload {args.workload}; workdir {workdir}",
        flush=True,
    )
    histories: list[list[Op]] = []
    reports: list[NemesisReport] = []
    interrupted: list[str] = []

    async def run() -> None:
        # SIGTERM/SIGHUP cancel the run, so that every node is stopped.
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:

                async def watch() -> None:
                    async for signum in signals:
                        interrupted.append(signal.Signals(signum).name)
                        nursery.cancel_scope.cancel()

                nursery.start_soon(watch)
                reports.append(
                    await run_subprocess(
                        workdir / "cluster",
                        nodes=args.nodes,
                        seed=args.seed,
                        duration=args.duration,
                        workload=config,
                        kinds=args.kinds,
                        request_timeout=args.request_timeout,
                        hold=args.hold,
                        gap=args.gap,
                        overlap=args.overlap,
                        cover=True,
                        progress=progress,
                        keep_history=histories,
                        check_timeout=args.check_timeout,
                    )
                )
                nursery.cancel_scope.cancel()

    try:
        trio.run(run)
    except (Exception, KeyboardInterrupt):
        traceback.print_exc()
        print(f"torture: the run failed; node logs are in {workdir}", file=sys.stderr)
        return EXIT_ERROR
    if not reports:
        print(f"torture: stopped by {', '.join(interrupted)}; node logs are in {workdir}", file=sys.stderr)
        return EXIT_ERROR
    report = reports[0]
    text = report.text()
    text += (
        f"\n  machine: {os.cpu_count()} cpus, load average {load_before[0]:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after"
    )
    data = report.to_json()
    data["machine"] = {"cpus": os.cpu_count(), "load_before": load_before, "load_after": os.getloadavg()}
    data["arguments"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(text + "\n")
    _json_path(args.report).write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(text)
    print(f"torture: report written to {args.report} and {_json_path(args.report)}")
    if report.linearizable is None:
        if histories:
            save_history(workdir / "history.jsonl", histories[0])
        print(f"torture: {report.violation}; history and node logs in {workdir}", file=sys.stderr)
        return EXIT_ERROR
    if report.linearizable is False:
        if histories:
            save_history(workdir / "history.jsonl", histories[0])
        print(
            f"torture: NOT LINEARIZABLE (seed {args.seed}); history and node logs in {workdir}",
            file=sys.stderr,
        )
        return EXIT_VIOLATION
    if not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    if not report.ok:
        problems = list(report.anomalies)
        if report.final_read_failures:
            problems.append(f"{report.final_read_failures} final reads never answered")
        if report.log_errors:
            problems.append(f"{report.log_errors} errors in the node logs")
        if report.counter_failures:
            problems.append(f"{report.counter_failures} counters do not add up")
        print("torture: linearizable, but: " + "; ".join(problems), file=sys.stderr)
        return EXIT_UNHEALTHY
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
