"""Build progress as events: one shape for the terminal, JSON lines and Celery task state.

An event is a stage ("validate", "install", "finalize", "publish"), a kind ("start",
"console", "installer", "info", "warning", "done") and a message, plus optional fields.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from importer.progress import Snapshot

Emit = Callable[..., None]  # emit(stage, kind, message, **fields)


def discard(stage: str, kind: str, message: str, **fields: Any) -> None:
    """An Emit that drops everything (library callers that do not want progress)."""


def event(stage: str, kind: str, message: str, **fields: Any) -> dict[str, Any]:
    """The event as a JSON-ready dict with a timestamp."""
    return {"time": round(time.time(), 3), "stage": stage, "kind": kind, "message": message} | {
        k: v for k, v in fields.items() if v is not None
    }


def json_lines(stream: TextIO = sys.stdout) -> Emit:
    """Write each event as one JSON line (for CI logs and machines)."""

    def emit(stage: str, kind: str, message: str, **fields: Any) -> None:
        stream.write(json.dumps(event(stage, kind, message, **fields)) + "\n")
        stream.flush()

    return emit


def log_lines(stream: TextIO = sys.stderr) -> Emit:
    """Write each event as a readable log line (for a terminal)."""

    def emit(stage: str, kind: str, message: str, **fields: Any) -> None:
        marker = {"warning": "!", "console": "|", "installer": ":"}.get(kind, "-")
        stream.write(f"{time.strftime('%H:%M:%S')} {stage:<8} {marker} {message}\n")
        stream.flush()

    return emit


class EventReporter:
    """Byte progress of an importer `Progress` (an upload, say) as "progress" events."""

    def __init__(self, emit: Emit, stage: str) -> None:
        self._emit = emit
        self._stage = stage

    def show(self, snapshot: Snapshot) -> None:
        if snapshot.stage == "pending":
            return
        percent = snapshot.percent
        self._emit(
            self._stage, "progress",
            f"{snapshot.stage} {snapshot.bytes_done >> 20} MiB"
            + (f" ({percent:.0f}%)" if percent is not None else "")
            + f" at {snapshot.throughput / 2**20:.0f} MiB/s",
            bytes_done=snapshot.bytes_done, bytes_total=snapshot.bytes_total,
            percent=None if percent is None else round(percent, 1),
        )  # fmt: skip

    def close(self) -> None:
        pass
