"""How every command fails: the outcome of an error, the line it prints, its exit status.

Its own module so that the commands defined outside diskflow.cli use it without importing the
app that registers them."""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import TypeVar

import typer

from importer.errors import Failure, TransientError
from importer.outcome import EXIT_FINAL, Outcome
from importer.reasons import Reason

T = TypeVar("T")


def guarded(
    job: Callable[[], T],
    finish: Callable[[Outcome], None],
    *,
    completed: Callable[[], bool] = lambda: False,
    stage: Callable[[], str | None] = lambda: None,
) -> T:
    """Run `job`; on failure hand `finish` the outcome and exit 1 (final) or 75.

    A SIGTERM unwinds the job like an error, unless `completed()` says the job has already
    reached the point where it stands (then it finishes and reports success)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    if not os.environ.get("DISKFLOW_DEBUG"):
        # Their INFO lines ("Found credentials in environment variables") are debugging aids.
        for library in ("botocore", "boto3", "s3transfer"):
            logging.getLogger(library).setLevel(logging.WARNING)

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


def print_failure(outcome: Outcome) -> None:
    """The line every command prints when it fails: `error: MESSAGE [Reason]`."""
    typer.echo(f"error: {outcome.message} [{outcome.reason}]", err=True)
