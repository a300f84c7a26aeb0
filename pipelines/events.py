"""Build progress as events (importer.events): the terminal, JSON lines and Celery task state.

A build step says what happens with `emit(stage, kind, message, **fields)`: a stage
("validate", "install", "finalize", "boot-test", "publish"), a kind and a message, plus
optional fields. The kind is an event type ("start", "console", "installer", "progress",
"done") or, for a message, its level ("info", "warning", "error"); the stage is a field.
"""

from __future__ import annotations

import time as clock
from collections.abc import Callable
from typing import Any

from importer.events import Event, Level, Send, Type

Emit = Callable[..., None]  # emit(stage, kind, message, **fields)


def discard(stage: str, kind: str, message: str, **fields: Any) -> None:
    """An Emit that drops everything (library callers that do not want progress)."""


def event(
    stage: str, kind: str, message: str, *, time: float | None = None, **fields: Any
) -> Event:
    """The event a step's `emit` call describes; `time`: when it happened, if not now."""
    is_message = kind in tuple(Level)
    return Event(
        Type.LOG if is_message else Type(kind),
        message,
        Level(kind) if is_message else Level.INFO,
        {"stage": stage, **fields},
        clock.time() if time is None else time,
    )


def to(send: Send) -> Emit:
    """An Emit that sends each event to `send` (an importer.events.Output, say)."""

    def emit(stage: str, kind: str, message: str, **fields: Any) -> None:
        send(event(stage, kind, message, **fields))

    return emit


def relay(emit: Emit) -> Send:
    """The Send that hands an event made elsewhere (a worker's, a progress reporter's) to
    `emit`, its time kept."""

    def send(made: Event) -> None:
        fields = dict(made.fields)
        stage = fields.pop("stage", "")
        kind = made.level.value if made.type is Type.LOG else made.type.value
        emit(stage, kind, made.message, time=made.time, **fields)

    return send
