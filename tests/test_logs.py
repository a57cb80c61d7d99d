"""Structured logs: the formatters, and the lines of real ``qkv serve``
processes (JSON and ``key=value``), one per notable event."""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path

import pytest
import trio

from cli.logs import JsonFormatter, KeyValueFormatter, parse_kv_line
from net.client import open_client
from tests.support.procs import ProcCluster

HARNESS = "=== test harness"


def record(msg: str, *args: object, exc: bool = False, **extra: object) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            exc_info = sys.exc_info()
    rec = logging.LogRecord("qkv.test", logging.WARNING, __file__, 1, msg, args, exc_info)
    rec.__dict__.update(extra)
    return rec


@pytest.mark.parametrize(
    "value", ["plain", "two words", 'quo"te', "back\\slash", "new\nline", "", "a=b", "tab\there", "é ✓"]
)
def test_key_value_lines_parse_back(value: str) -> None:
    line = KeyValueFormatter().format(record("peer %s up", "n2", event="peer_up", detail=value))
    assert "\n" not in line
    fields = parse_kv_line(line)
    assert fields["level"] == "warn" and fields["logger"] == "qkv.test"
    assert fields["msg"] == "peer n2 up" and fields["event"] == "peer_up"
    assert fields["detail"] == value
    assert fields["ts"].endswith("Z")


def test_an_exception_stays_on_the_one_line() -> None:
    for formatter in (KeyValueFormatter(), JsonFormatter()):
        line = formatter.format(record("failed", exc=True, event="internal_error"))
        assert "\n" not in line
        fields = parse_kv_line(line) if isinstance(formatter, KeyValueFormatter) else json.loads(line)
        assert "ValueError: boom\nsecond line" in fields["exc"]


def test_not_a_key_value_line_is_refused() -> None:
    with pytest.raises(ValueError):
        parse_kv_line("2026-01-01 INFO qkv.node: node n1 listening")


def events(lines: list[str]) -> list[str]:
    return [fields.get("event", "") for fields in map(json.loads, lines)]


@pytest.mark.subprocess
async def test_nodes_log_one_json_line_per_event_and_none_per_request(tmp_path: Path) -> None:
    with ProcCluster(tmp_path, 3, extra_args=["--log-format", "json"]) as cluster:
        cluster.start_all()
        await cluster.wait_serving_async()
        async with open_client([cluster.addresses[0]], timeout=5) as client:
            for i in range(100):
                await client.set(b"k%d" % i, b"v")
                await client.get(b"k%d" % i)
        assert await cluster.terminate_async(0, sig=signal.SIGTERM) == 0
        with trio.fail_after(10):
            while "peer_down" not in cluster.log(1):
                await trio.sleep(0.05)
        for i in range(3):
            lines = [line for line in cluster.log(i).splitlines() if not line.startswith(HARNESS)]
            parsed = [json.loads(line) for line in lines]  # every line is JSON
            assert all({"ts", "level", "logger", "msg"} <= p.keys() for p in parsed)
            # 200 requests went through n1, but lines are per event only
            assert len(lines) < 30, lines
        first = events([ln for ln in cluster.log(0).splitlines() if not ln.startswith(HARNESS)])
        for expected in ("start", "listening", "ready", "peer_up", "signal", "shutdown", "stopped"):
            assert expected in first, first
        assert first.index("start") < first.index("ready") < first.index("shutdown") < first.index("stopped")
        second = [json.loads(ln) for ln in cluster.log(1).splitlines() if not ln.startswith(HARNESS)]
        down = [p for p in second if p.get("event") == "peer_down"]
        assert down and down[0]["peer"] == "n1" and down[0]["level"] == "warn"


@pytest.mark.subprocess
async def test_default_log_lines_are_key_value(tmp_path: Path) -> None:
    with ProcCluster(tmp_path, 1) as cluster:
        cluster.start_all()
        await cluster.wait_serving_async()
        assert await cluster.terminate_async(0) == 0
        lines = [line for line in cluster.log(0).splitlines() if not line.startswith(HARNESS)]
        parsed = [parse_kv_line(line) for line in lines]
        assert [p.get("event") for p in parsed if p.get("event") in ("start", "ready", "stopped")] == [
            "start",
            "ready",
            "stopped",
        ]
        assert all(p["level"] in ("debug", "info", "warn", "error") for p in parsed)
