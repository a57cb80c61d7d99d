"""Structured logs: one line per event, as ``key=value`` pairs or as JSON.

Every line has ``ts`` (UTC, ISO 8601 with milliseconds), ``level``,
``logger`` and ``msg`` (the human sentence), then the event's own fields:
the code passes them as ``extra={"event": "peer_up", "peer": "n2", ...}``.
An exception is one field (``exc``) of the same line, its newlines escaped,
so that a line is always one event.

``key=value``: values with spaces, quotes, ``=`` or control characters (or
empty ones) are double-quoted with backslash escapes (``\\"``, ``\\\\``,
``\\n``, ``\\t``, ``\\r``); ``parse_kv_line`` reads a line back.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import sys
from typing import Any

__all__ = ["JsonFormatter", "KeyValueFormatter", "parse_kv_line", "setup_logging"]

#: attributes every ``LogRecord`` has; anything else came from ``extra``
_STANDARD = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
    | {"message", "asctime", "taskName"}
)

_LEVELS = {"WARNING": "warn", "CRITICAL": "critical"}


def _fields(record: logging.LogRecord, formatter: logging.Formatter) -> dict[str, Any]:
    stamp = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
    fields: dict[str, Any] = {
        "ts": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": _LEVELS.get(record.levelname, record.levelname.lower()),
        "logger": record.name,
        "msg": record.getMessage(),
    }
    for key, value in vars(record).items():
        if key not in _STANDARD and not key.startswith("_"):
            fields[key] = value
    if record.exc_info:
        fields["exc"] = formatter.formatException(record.exc_info)
    return fields


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(record, self), default=str, ensure_ascii=False)


_PLAIN = re.compile(r"^[^\s\"=\\]+$")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _kv_value(value: Any) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "null"
    else:
        text = str(value)
    if _PLAIN.match(text) and text.isprintable():
        return text
    escaped = "".join(_ESCAPES.get(c, c if c.isprintable() else f"\\x{ord(c):02x}") for c in text)
    return f'"{escaped}"'


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{key}={_kv_value(value)}" for key, value in _fields(record, self).items())


_PAIR = re.compile(r'([A-Za-z_][A-Za-z0-9_.]*)=("(?:[^"\\]|\\.)*"|[^\s"]*)(?:\s+|$)')
_UNESCAPE = {'"': '"', "\\": "\\", "n": "\n", "r": "\r", "t": "\t"}


def parse_kv_line(line: str) -> dict[str, str]:
    """A ``key=value`` log line as a dict; ``ValueError`` if it is not one."""
    fields: dict[str, str] = {}
    pos = 0
    line = line.rstrip("\n")
    while pos < len(line):
        match = _PAIR.match(line, pos)
        if match is None:
            raise ValueError(f"not a key=value line at column {pos}: {line!r}")
        key, raw = match.group(1), match.group(2)
        if raw.startswith('"'):
            raw = re.sub(
                r"\\(x[0-9a-f]{2}|.)",
                lambda m: chr(int(m.group(1)[1:], 16)) if len(m.group(1)) == 3 else _UNESCAPE[m.group(1)],
                raw[1:-1],
            )
        fields[key] = raw
        pos = match.end()
    return fields


def setup_logging(level: str, log_format: str = "kv") -> None:
    """Log to stderr at ``level`` and above, as ``kv`` or ``json`` lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else KeyValueFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
