"""Reading a command's JSON lines: each checked against the one event schema."""

from __future__ import annotations

import json
import re
from typing import Any

RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
LEVELS = {"debug", "info", "warning", "error"}
TYPES = {"log", "progress", "start", "done", "console", "installer", "result"}


def events(stdout: str) -> list[dict[str, Any]]:
    """The events of `stdout`, each flattened to type, level, message, time and its fields,
    after checking it is one JSON object of the schema and the result, if any, comes last."""
    flat: list[dict[str, Any]] = []
    for line in stdout.splitlines():
        event = json.loads(line)
        assert set(event) == {"time", "level", "type", "message", "fields"}, line
        assert RFC3339_UTC.fullmatch(event["time"]), line
        assert event["level"] in LEVELS and event["type"] in TYPES, line
        assert isinstance(event["message"], str) and isinstance(event["fields"], dict), line
        assert not {"time", "level", "type", "message"} & set(event["fields"]), line
        flat.append({k: v for k, v in event.items() if k != "fields"} | event["fields"])
    results = [i for i, event in enumerate(flat) if event["type"] == "result"]
    assert results in ([], [len(flat) - 1]), "one result, the last event"
    return flat


def result(stdout: str) -> dict[str, Any]:
    """The result event of `stdout` (flattened as `events` does)."""
    last = events(stdout)[-1]
    assert last["type"] == "result", last
    return last
