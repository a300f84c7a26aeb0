"""What HTTP and S3 sources share: one response stream, reopened at the current offset after
a failure, with bounded retries and backoff, and a `close()` that stops it from any thread.

A subclass says how to open the stream at an offset (`_open`) and what to hide in error
texts (`_secrets`); everything about failures and resuming lives here once.

Failures are counted per connection, across `read()` calls: a connection that ends in an
error counts as a failed attempt unless it made real progress first (PROGRESS_FLOOR bytes,
or a whole rate window at the minimum rate), which starts the count again. Every reconnect,
a resume after progress included, waits out the backoff first, so a server that drops each
connection after a byte is not hammered, and a trickle under the minimum rate fails instead
of running forever.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import urllib3
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from importer.errors import FinalError, TransientError
from importer.reasons import Reason
from importer.redaction import describe
from importer.sources.network import transfer_problem

if TYPE_CHECKING:  # http.py defines it, and builds on this module
    from importer.sources.http import HttpOptions

log = logging.getLogger("diskflow.importer")
T = TypeVar("T")
# What a broken transfer raises while its body is read, whatever the client library.
STREAM_ERRORS: tuple[type[BaseException], ...] = (urllib3.exceptions.HTTPError, OSError)
# A connection that brings less than this before it fails made no real progress: a few round
# trips' worth on any working link, and far more than a flapping server hands out (a byte or
# a TCP segment per connection). Its failure counts towards `retries` like any other.
PROGRESS_FLOOR = 64 << 10


class RateMeter:
    """Fails a connection that averages under `min_rate` bytes/s over a `window` of seconds
    spent waiting for the network. Only time inside reads counts: a slow consumer (disk,
    decompression) behind the import is not a slow server."""

    def __init__(self, min_rate: int, window: float, description: str) -> None:
        self._min_rate = min_rate
        self._window = window
        self._description = description
        self._waited = 0.0
        self._got = 0
        self.passed = False
        """Whether a whole window of this connection met the minimum rate."""

    def read(self, stream: urllib3.BaseHTTPResponse, n: int) -> bytes:
        """What one read of `stream` brings (up to `n` bytes), timed."""
        started = time.monotonic()
        data = stream.read1(n)
        self._waited += time.monotonic() - started
        self._got += len(data)
        return data

    def check(self) -> None:
        """Raise TooSlow if the window just completed was under the minimum rate."""
        if not self._min_rate or self._waited < self._window:
            return
        rate = self._got / self._waited
        if rate < self._min_rate:
            raise TransientError(
                Reason.TOO_SLOW,
                f"{self._description} sent {self._got} bytes in {self._waited:.1f} s "
                f"({rate:.0f} bytes/s), under the minimum of {self._min_rate} bytes/s over "
                f"{self._window:g} s; lower it with --min-rate (0 turns the check off) or "
                "lengthen --min-rate-window",
            )
        self.passed = True
        self._waited, self._got = 0.0, 0


class ResumableSource:
    """A resumable byte stream; subclasses implement `_open(offset)`."""

    description: str
    size: int | None
    ranges: bool = False
    """Whether `read_range` works (the server serves byte ranges of a pinned version)."""

    def __init__(self, options: HttpOptions, *, stream_errors: tuple = STREAM_ERRORS) -> None:
        self._options = options  # retries, backoff, timeouts and minimum rate: HTTP's and S3's
        backoff = options.backoff
        self._backoff_wait = wait_exponential(multiplier=backoff, max=30) + wait_random(0, backoff)
        self._stream_errors = stream_errors
        self._closed = threading.Event()
        self._response: urllib3.BaseHTTPResponse | None = None
        self._offset = 0
        self._failures = 0  # failed attempts in a row, across reads
        self._delay = 0.0  # to wait before the next connection: the last one failed
        self._meter: RateMeter | None = None  # of the current connection
        self._attempt_bytes = 0  # brought by the current connection
        self._secrets: set[str] = set()  # never printed: query strings, passwords, keys
        self._ranged: set[urllib3.BaseHTTPResponse] = set()  # parts being read, for close()
        self.size = None

    def _open(self, offset: int) -> urllib3.BaseHTTPResponse:
        """The body from byte `offset` on; raise FinalError or TransientError."""
        raise NotImplementedError

    def _fetch_range(self, start: int, end: int) -> bytes:
        """Bytes [start, end) of the version first read, in one request (not retried)."""
        raise NotImplementedError

    def read_range(self, start: int, end: int) -> bytes:
        """Bytes [start, end) of the version first read, each attempt backed off and timed
        like the stream's; a part is fetched whole or not at all, so any failure counts."""
        return self._retrying(self._fetch_range, start, end)

    def stop_streaming(self) -> None:
        """Let go of the sequential stream: the reader moved on to `read_range`."""
        self._drop_response()

    def _new_meter(self) -> RateMeter:
        options = self._options
        return RateMeter(options.min_rate, options.min_rate_window, self.description)

    def _read_exactly(self, response: urllib3.BaseHTTPResponse, count: int, start: int) -> bytes:
        self._ranged.add(response)
        meter = self._new_meter()
        parts: list[bytes] = []
        got = 0
        try:
            if self._closed.is_set():  # closed before close() could see this response
                raise self._cancelled()
            while got < count and (data := meter.read(response, count - got)):
                parts.append(data)
                got += len(data)
                meter.check()
        except self._stream_errors as exc:
            raise TransientError(
                "ConnectionLost",
                f"ranged read of {self.description} at byte {start} failed: "
                f"{self._describe_break(exc)}",
            ) from None
        except Exception:
            # close() tore the response down under this read: urllib3 then fails in odd ways
            # (an AttributeError on its released connection).
            if self._closed.is_set():
                raise self._cancelled() from None
            raise
        finally:
            self._ranged.discard(response)
            response.close()
        if got != count:
            raise TransientError(
                "Truncated", f"{self.description}: {got} of {count} bytes at byte {start}"
            )
        return b"".join(parts)

    def _check_range(self, response: Any, value: str | None, start: int, end: int | None) -> None:
        """Raise (closing `response`) unless its Content-Range `value` is bytes [start, end)
        (end None: to the end) of the object first seen, `size` bytes long."""
        try:
            self._check_content_range(value, start, end)
        except TransientError:
            response.close()
            raise

    def _check_content_range(self, value: str | None, start: int, end: int | None) -> None:
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", (value or "").strip())
        if match and match.group(3) != "*" and self.size not in (None, int(match.group(3))):
            raise TransientError(
                "SourceChanged",
                f"{self.description} changed during the download (its size went from "
                f"{self.size} to {match.group(3)} bytes); start the import again",
            )
        if match and _covers(match, start, self.size if end is None else end, self.size):
            return
        wanted = f"{start}-{'' if end is None else end - 1}"
        raise TransientError(
            "BadContentRange",
            f"{self.description} answered a request for bytes {wanted} with Content-Range "
            f"{describe(Exception(repr(value)), self._secrets)}",
        )

    def _start(self) -> None:
        """Open the stream at byte 0 (retried like any read)."""
        self._ensure_open()

    # --- the stream -------------------------------------------------------------------

    def read(self, n: int) -> bytes:
        while True:
            if self.size is not None and self._offset >= self.size:
                return b""
            self._ensure_open()
            try:
                return self._read_once(n)
            except TransientError as failure:
                self._failed(failure)

    def close(self) -> None:
        """Stop the transfer; safe to call from another thread while `read` blocks."""
        self._closed.set()  # also cuts a retry's backoff sleep short
        for response in [self._response, *list(self._ranged)]:
            if response is not None:
                _shutdown(response)

    def _cancelled(self) -> FinalError:
        return FinalError("Cancelled", f"the transfer from {self.description} was stopped")

    def _ensure_open(self) -> None:
        """Connect at the current offset, after the backoff if the last connection failed."""
        while self._response is None:
            if self._delay:
                self._closed.wait(self._delay)
            if self._closed.is_set():
                raise self._cancelled()
            self._delay = 0.0
            self._meter, self._attempt_bytes = self._new_meter(), 0
            try:
                self._response = self._open(self._offset)
            except TransientError as failure:
                self._failed(failure)

    def _read_once(self, n: int) -> bytes:
        assert self._response is not None and self._meter is not None
        if self._closed.is_set():
            raise self._cancelled()
        parts: list[bytes] = []
        got = 0
        failure: TransientError | None = None
        try:
            # read1 hands over what has arrived, so bytes received before a failure count
            # and the resume starts after them.
            while got < n and (data := self._meter.read(self._response, n - got)):
                parts.append(data)
                got += len(data)
                self._meter.check()
        except TransientError as slow:
            failure = slow
        except Exception as exc:
            if self._closed.is_set():  # close() tore the response down under this read
                raise self._cancelled() from None
            if not isinstance(exc, self._stream_errors):
                raise
            failure = TransientError(
                "ConnectionLost",
                f"transfer from {self.description} failed at byte {self._offset + got}: "
                f"{self._describe_break(exc)}",
            )
        self._offset += got
        self._attempt_bytes += got
        if failure is None and not parts and self.size is not None and self._offset < self.size:
            failure = TransientError(
                "Truncated", f"{self.description} ended at byte {self._offset} of {self.size}"
            )
        if failure is not None:
            self._drop_response()
            if not parts:
                raise failure
            self._failed(failure)  # the bytes in hand are passed on; the next read resumes
        return b"".join(parts) if len(parts) != 1 else parts[0]

    def _drop_response(self) -> None:
        if self._response is not None:
            self._response.close()
            self._response = None

    def _describe(self, exc: BaseException) -> str:
        """The exception's text with every known secret, and any query string, removed."""
        return describe(exc, self._secrets)

    def _describe_break(self, exc: BaseException) -> str:
        """What broke a transfer under way, in words where the error tells."""
        stall = self._options.stall_timeout
        return transfer_problem(exc, stall_timeout=stall) or self._describe(exc)

    # --- retries ----------------------------------------------------------------------

    def _failed(self, failure: TransientError) -> None:
        """Count a failed connection and set the backoff before the next one; raise the
        failure when it cannot be retried or the retries are used up."""
        if self._closed.is_set():
            raise self._cancelled()
        if not _retryable(failure):
            raise failure
        progressed = self._attempt_bytes >= PROGRESS_FLOOR and failure.reason != Reason.TOO_SLOW
        if progressed or (self._meter is not None and self._meter.passed):
            self._failures = 0  # a resume after progress is free, but still backed off
        else:
            self._failures += 1
            if self._failures > self._options.retries:
                raise failure
        attempt = max(self._failures, 1)
        # Tenacity's wait strategies read only the attempt number: this one is ours.
        state = RetryCallState(None, None, (), {})
        state.attempt_number = attempt
        self._delay = max(self._backoff_wait(state), getattr(failure, "retry_after", 0.0))
        log.warning("attempt %d failed (%s); retrying in %.1fs", attempt, failure, self._delay)

    def _retrying(self, fn: Callable[..., T], *args: Any) -> T:
        retrying = Retrying(
            stop=stop_after_attempt(self._options.retries + 1),
            wait=self._wait,
            retry=retry_if_exception(lambda exc: _retryable(exc) and not self._closed.is_set()),
            sleep=self._closed.wait,
            before_sleep=self._log_retry,
            reraise=True,
        )
        return retrying(fn, *args)

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        return max(self._backoff_wait(state), getattr(exc, "retry_after", 0.0))

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "attempt %d failed (%s); retrying in %.1fs",
            state.attempt_number,
            exc,
            state.next_action.sleep if state.next_action else 0,
        )


def _covers(match: re.Match[str], start: int, end: int | None, size: int | None) -> bool:
    """Whether a parsed Content-Range is bytes [start, end) of an object of `size` bytes
    (None: unknown, then also "*" will do)."""
    first, last, total = match.groups()
    return (
        int(first) == start
        and (end is None or int(last) == end - 1)
        and (size is None or total != "*")
    )


def _retryable(exc: BaseException) -> bool:
    # A changed object cannot be resumed; a new import (a new pod) starts it over.
    return isinstance(exc, TransientError) and exc.reason != "SourceChanged"


def _shutdown(response: urllib3.BaseHTTPResponse) -> None:
    # Closing a socket does not wake a thread blocked in recv() on it; shutting it down does.
    sock = getattr(getattr(response, "_connection", None), "sock", None)
    with contextlib.suppress(OSError):
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
    response.close()
