"""How every command fails: the outcome of an error, the line it prints, its exit status.

Its own module so that the commands defined outside diskflow.cli use it without importing the
app that registers them."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from typing import TypeVar

import typer

from diskflow.output import ProgressMode, start
from importer.errors import Failure, TransientError
from importer.events import Output
from importer.outcome import EXIT_FINAL, Outcome
from importer.reasons import Reason

T = TypeVar("T")


def guarded(
    job: Callable[[], T],
    output: Output | None = None,
    *,
    finish: Callable[[Outcome], None] | None = None,
    completed: Callable[[], bool] = lambda: False,
    stage: Callable[[], str | None] = lambda: None,
) -> T:
    """Run `job`; on failure hand `finish` the outcome (default: `output`'s result event) and
    exit 1 (final) or 75. Without an `output`, readable lines at the requested level
    (diskflow.output.start); either way Python logging is routed into it.

    A SIGTERM unwinds the job like an error, unless `completed()` says the job has already
    reached the point where it stands (then it finishes and reports success)."""
    shown = output or start(ProgressMode.LOG)
    finish = finish or (lambda outcome: shown(outcome.event()))

    # Kubernetes stops a pod with SIGTERM: unwind like an error, so that partial and scratch
    # files (and a build's domain) are removed and the termination log says what happened.
    def terminated(signum: int, frame: object) -> None:
        if completed():
            logging.getLogger("diskflow").warning("SIGTERM after the import completed: ignored")
            return
        raise TransientError("Terminated", "stopped by SIGTERM; it can be run again")

    signal.signal(signal.SIGTERM, terminated)
    try:
        return job()
    except Failure as failure:
        outcome = Outcome(ok=False, reason=failure.reason, message=failure.message,
                          final=failure.final, stage=stage())  # fmt: skip
        finish(outcome)
        raise typer.Exit(outcome.exit_code) from None
    except OSError as exc:
        # Disk full, permission denied on the destination, ...: the message names the file.
        finish(Outcome.failure(Reason.IO_ERROR, str(exc), stage()))
        raise typer.Exit(EXIT_FINAL) from None
    except Exception as exc:
        # A bug of ours: say so without repeating a message that might quote an input.
        if os.environ.get("DISKFLOW_DEBUG"):
            logging.getLogger("diskflow").exception("internal error")
        message = f"internal error ({type(exc).__name__}); set DISKFLOW_DEBUG=1 for a traceback"
        finish(Outcome.failure(Reason.INTERNAL_ERROR, message, stage()))
        raise typer.Exit(EXIT_FINAL) from None
