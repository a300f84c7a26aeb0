"""What diskflow says while it works, in one schema for every command.

Progress, stage changes, guest console lines, warnings, retries, library log records and the
final result are all `Event`s: a type, a time, a level, a message and fields. `Output` writes
them as JSON lines (one object per line, for CI logs, pods and log shippers) or as readable
lines (for a terminal), leaving out those below its level. The JSON shape:

    {"time": "2026-12-01T05:55:41.123Z", "level": "info", "type": "progress",
     "message": "download 12 MiB of 256 MiB (5%) at 40 MiB/s",
     "fields": {"stage": "download", "bytes_done": 12582912, ...}}
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import IO, Any


class Level(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @property
    def rank(self) -> int:
        return list(Level).index(self)

    @property
    def logging_level(self) -> int:
        """The level as Python's logging numbers it."""
        return logging.getLevelName(self.name)  # type: ignore[no-any-return]

    @classmethod
    def of_record(cls, levelno: int) -> Level:
        """The level of a logging record's number (CRITICAL is an error)."""
        for level in reversed(cls):
            if levelno >= level.logging_level:
                return level
        return cls.DEBUG


class Type(StrEnum):
    """What an event is about: the types a consumer can switch on."""

    LOG = "log"  # a message: a warning, a retry, a library's log record
    PROGRESS = "progress"  # bytes done of a stage
    START = "start"  # a stage began
    DONE = "done"  # a stage ended well
    CONSOLE = "console"  # a line of a guest's serial console
    INSTALLER = "installer"  # a line of an installer's own log
    RESULT = "result"  # the command's outcome: always the last event, never filtered out


@dataclass(frozen=True)
class Event:
    type: Type
    message: str
    level: Level = Level.INFO
    fields: Mapping[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)  # seconds since the epoch

    def to_json(self) -> dict[str, Any]:
        """The event as a JSON-ready dict; fields that are None are left out."""
        return {
            "time": rfc3339(self.time),
            "level": self.level.value,
            "type": self.type.value,
            "message": self.message,
            "fields": {k: v for k, v in self.fields.items() if v is not None},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Event:
        """The event `to_json` made (relayed by a Celery worker, say)."""
        when = datetime.datetime.fromisoformat(data["time"].replace("Z", "+00:00"))
        return cls(Type(data["type"]), data["message"], Level(data["level"]),
                   dict(data.get("fields") or {}), when.timestamp())  # fmt: skip

    def line(self) -> str:
        """The event as a readable line: local time, stage, a mark for its kind, message."""
        clock = time.strftime("%H:%M:%S", time.localtime(self.time))
        stage = self.fields.get("stage") or ""
        return f"{clock} {stage:<8} {_mark(self)} {self.message}"


def rfc3339(seconds: float) -> str:
    """`seconds` since the epoch as RFC 3339 UTC with milliseconds: 2026-12-01T05:55:41.123Z."""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


_MARKS = {Level.DEBUG: ".", Level.WARNING: "!", Level.ERROR: "x"}
_TYPE_MARKS = {Type.CONSOLE: "|", Type.INSTALLER: ":"}


def _mark(event: Event) -> str:
    return _MARKS.get(event.level) or _TYPE_MARKS.get(event.type, "-")


Send = Callable[[Event], None]


def result(message: str, fields: Mapping[str, Any]) -> Event:
    """The command's outcome: `fields` hold `ok` (false: an error, with its `reason`) and what
    a program needs of it; `message` is what a person reads."""
    return Event(Type.RESULT, message, Level.INFO if fields.get("ok") else Level.ERROR, fields)


class Output:
    """Writes events from any thread: JSON lines on stdout, or readable lines on stderr with
    the result's message on stdout. Leaves out events below `level` and, unless `progress`,
    progress; never the result. A failed result also says `error: MESSAGE [Reason]` on stderr,
    for the person reading a CI log of JSON lines."""

    def __init__(
        self, *, json_lines: bool, level: Level = Level.INFO, progress: bool = True
    ) -> None:
        self.json_lines = json_lines
        self.level = level
        self.progress = progress
        self._lock = threading.Lock()

    def wants(self, level: Level) -> bool:
        """Whether an event of `level` would be written."""
        return level.rank >= self.level.rank

    def __call__(self, event: Event) -> None:
        if event.type is Type.RESULT:
            failed = event.level is Level.ERROR
            if self.json_lines:
                self._write(sys.stdout, json.dumps(event.to_json()))
            elif not failed and event.message:
                self._write(sys.stdout, event.message)
            if failed:
                self._write(sys.stderr, f"error: {event.message} [{event.fields.get('reason')}]")
            return
        if not self.wants(event.level) or (event.type is Type.PROGRESS and not self.progress):
            return
        if self.json_lines:
            self._write(sys.stdout, json.dumps(event.to_json()))
        else:
            self._write(sys.stderr, event.line())

    def _write(self, stream: IO[str], text: str) -> None:
        # The stream is looked up by each call, not kept: a live progress bar swaps sys.stderr
        # for a proxy that prints above the bar.
        with self._lock:
            stream.write(text + "\n")
            stream.flush()
