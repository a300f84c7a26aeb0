"""How a command shows what it does: --progress picks the form, --log-level / -v / -q how much.

Every command gets `--log-level`, `-v`/`--verbose` and `-q`/`--quiet` (`level_options`, added
by `diskflow.flags.conventional`), and routes Python logging (its own retries, a library's
warning) into the same events as its progress (`importer.events`), so that JSON output is
JSON only and a quiet command is quiet.
"""

from __future__ import annotations

import logging
import os
import sys
from enum import StrEnum
from typing import Any

import typer
from typer.core import TyperOption

from importer.events import Event, Level, Output, Type

# Their INFO lines ("Found credentials in environment variables") are debugging aids, and their
# DEBUG lines can carry request headers: shown only with DISKFLOW_DEBUG. (`sh`, which logs
# every command it runs, is quieted by importer.qemu, which uses it.)
QUIET_LIBRARIES = ("botocore", "boto3", "s3transfer", "urllib3")

# The level options' values as their callbacks saw them: every command line sets all three
# (a callback sees a default too), and a process runs one command.
_given: dict[str, Any] = {}


class ProgressMode(StrEnum):
    AUTO = "auto"
    BAR = "bar"
    LOG = "log"
    JSON = "json"
    NONE = "none"


PROGRESS_HELP = (
    "auto: bars (import) or log lines (builds) on a terminal, JSON lines otherwise; bar, log, "
    "json, or none (no progress; warnings, errors and the result only)."
)


def _remember(ctx: Any, param: Any, value: Any) -> Any:
    _given[param.name] = value
    return value


def _level_name(ctx: Any, param: Any, value: str | None) -> Level | None:
    if value is None:
        return _remember(ctx, param, None)
    try:
        return _remember(ctx, param, Level(value.lower()))
    except ValueError:
        choices = ", ".join(level.value for level in Level)
        raise typer.BadParameter(f"{value!r} is not a log level ({choices})") from None


def level_options() -> list[TyperOption]:
    """--log-level, -v and -q, made afresh for each command (click keeps state in them)."""
    choices = "|".join(level.value for level in Level)
    return [
        TyperOption(
            param_decls=["--log-level", "log_level"], default=None, expose_value=False,
            callback=_level_name, metavar=f"[{choices}]",
            help="The least level of event shown (default: info; warning with --progress none).",
        ),
        TyperOption(
            param_decls=["-v", "--verbose", "verbose"], is_flag=True, default=False,
            expose_value=False, callback=_remember, help="Show debug events: --log-level debug.",
        ),
        TyperOption(
            param_decls=["-q", "--quiet", "quiet"], is_flag=True, default=False,
            expose_value=False, callback=_remember,
            help="Show only warnings, errors and the result: --log-level warning.",
        ),
    ]  # fmt: skip


def requested_level(mode: ProgressMode | None = None) -> Level:
    """The level the command line asked for: --log-level, else -v or -q, else info (warning
    with --progress none, which asks for quiet). -v with -q is a usage error."""
    given = _given
    if given.get("verbose") and given.get("quiet"):
        raise typer.BadParameter("-v and -q ask for opposite things: give one", param_hint="'-v'")
    if given.get("log_level") is not None:
        return given["log_level"]
    if given.get("verbose"):
        return Level.DEBUG
    if given.get("quiet") or mode is ProgressMode.NONE:
        return Level.WARNING
    return Level.INFO


def resolve(mode: ProgressMode, *, terminal: ProgressMode) -> ProgressMode:
    """`mode` with auto decided: `terminal` when stderr is a terminal, else JSON lines."""
    if mode is ProgressMode.AUTO:
        return terminal if sys.stderr.isatty() else ProgressMode.JSON
    return mode


def start(mode: ProgressMode) -> Output:
    """The Output for a resolved `mode` at the requested level, with Python logging routed
    into it (the root logger's handlers replaced: one command per process)."""
    output = Output(
        json_lines=mode is ProgressMode.JSON,
        level=requested_level(mode),
        progress=mode in (ProgressMode.JSON, ProgressMode.LOG),
    )
    route_logging(output)
    return output


def route_logging(output: Output) -> None:
    """Python logging's records as `log` events of `output`, at its level."""
    root = logging.getLogger()
    root.handlers[:] = [_LogEvents(output)]
    logging.captureWarnings(True)  # a library's warnings.warn() too
    root.setLevel(output.level.logging_level)
    quiet = logging.DEBUG if os.environ.get("DISKFLOW_DEBUG") else logging.WARNING
    for library in QUIET_LIBRARIES:
        logging.getLogger(library).setLevel(quiet)


class _LogEvents(logging.Handler):
    def __init__(self, output: Output) -> None:
        super().__init__()
        self._output = output

    def emit(self, record: logging.LogRecord) -> None:
        try:
            made = getattr(record, "event", None)  # a build step's event, logged by its worker
            if isinstance(made, Event):
                self._output(made)
                return
            fields: dict[str, Any] = {"logger": record.name}
            if record.exc_info:  # only logged with DISKFLOW_DEBUG (failures.guarded)
                fields["traceback"] = logging.Formatter().formatException(record.exc_info)
            level = Level.of_record(record.levelno)
            self._output(Event(Type.LOG, record.getMessage(), level, fields, record.created))
        except Exception:
            self.handleError(record)
