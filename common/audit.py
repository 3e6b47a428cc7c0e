"""Append-only audit logs: identities and decisions, never data.

One JSON object per line, each with a UTC timestamp and an event name. Every event has a fixed
set of allowed fields and every value must be a scalar or a short list of ids or names, so a
tensor, an array, a metric dict or a long text cannot be written by mistake. Files are created
0600 and each record is flushed to disk before :meth:`AuditLog.record` returns. The coordinator's
events are in :mod:`fedmeta.server.audit`, a site's in :mod:`fedmeta.sitecore.audit`.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Mapping
from pathlib import Path

MAX_STR = 200
MAX_LIST = 1000

Scalar = str | int | float | bool | None
Value = Scalar | list[str] | list[int]
Events = Mapping[str, frozenset[str]]


class AuditError(ValueError):
    """An audit record was refused (unknown event, field, or a non-scalar value)."""


def check_value(event: str, key: str, value: object) -> Value:
    """``value`` if an audit log may hold it, else :class:`AuditError`."""
    if value is None or isinstance(value, bool | int | float):
        return value  # type: ignore[return-value]
    if isinstance(value, str):
        if len(value) > MAX_STR:
            raise AuditError(f"audit {event}.{key}: string longer than {MAX_STR} characters")
        return value
    if isinstance(value, list | tuple):
        if len(value) > MAX_LIST or not all(isinstance(v, str | int) and not isinstance(v, bool)
                                            for v in value):
            raise AuditError(f"audit {event}.{key}: only short lists of ids or names are allowed")
        return list(value)
    raise AuditError(
        f"audit {event}.{key}: value of type {type(value).__name__} refused (identities only)"
    )


class AuditLog:
    """Appends validated ``events`` to a JSONL file (opened in append mode for each record)."""

    events: Events = {}

    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, event: str, **fields: object) -> dict[str, Value]:
        """Append one event; returns the record written."""
        allowed = self.events.get(event)
        if allowed is None:
            raise AuditError(f"unknown audit event {event!r}; known: {sorted(self.events)}")
        unknown = set(fields) - allowed
        if unknown:
            raise AuditError(f"audit {event}: fields {sorted(unknown)} not allowed; allowed {sorted(allowed)}")
        rec: dict[str, Value] = {
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            "event": event,
        }
        for k, v in fields.items():
            rec[k] = check_value(event, k, v)
        line = json.dumps(rec, sort_keys=False) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        return rec


def read_log(path: Path) -> list[dict[str, Value]]:
    """All records of an audit log, oldest first."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
