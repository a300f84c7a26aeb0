"""What HTTP and S3 sources share: one response stream, reopened at the current offset after
a failure, with bounded retries and backoff, and a `close()` that stops it from any thread.

A subclass says how to open the stream at an offset (`_open`) and what to hide in error
texts (`_secrets`); everything about failures and resuming lives here once.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any, TypeVar

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
from importer.redaction import describe

log = logging.getLogger("diskflow.importer")
T = TypeVar("T")
# What a broken transfer raises while its body is read, whatever the client library.
STREAM_ERRORS: tuple[type[BaseException], ...] = (urllib3.exceptions.HTTPError, OSError)


class ResumableSource:
    """A resumable byte stream; subclasses implement `_open(offset)`."""

    description: str
    size: int | None
    ranges: bool = False
    """Whether `read_range` works (the server serves byte ranges of a pinned version)."""

    def __init__(
        self, *, retries: int, backoff: float, stream_errors: tuple = STREAM_ERRORS
    ) -> None:
        self._retries = retries
        self._backoff = backoff
        self._stream_errors = stream_errors
        self._closed = threading.Event()
        self._response: urllib3.BaseHTTPResponse | None = None
        self._offset = 0
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
        """Bytes [start, end) of the version first read, retried like `read`."""
        return self._retrying(self._fetch_range, start, end)

    def stop_streaming(self) -> None:
        """Let go of the sequential stream: the reader moved on to `read_range`."""
        self._drop_response()

    def _read_exactly(self, response: urllib3.BaseHTTPResponse, count: int, start: int) -> bytes:
        self._ranged.add(response)
        try:
            if self._closed.is_set():  # closed before close() could see this response
                raise self._cancelled()
            data = response.read(count)
        except self._stream_errors as exc:
            raise TransientError(
                "ConnectionLost",
                f"ranged read of {self.description} at byte {start} failed: {self._describe(exc)}",
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
        if len(data) != count:
            raise TransientError(
                "Truncated", f"{self.description}: {len(data)} of {count} bytes at byte {start}"
            )
        return data

    def _start(self) -> None:
        """Open the stream at byte 0 (retried like any read)."""
        self._response = self._retrying(self._open, 0)

    # --- the stream -------------------------------------------------------------------

    def read(self, n: int) -> bytes:
        return self._retrying(self._read_once, n)

    def close(self) -> None:
        """Stop the transfer; safe to call from another thread while `read` blocks."""
        self._closed.set()  # also cuts a retry's backoff sleep short
        for response in [self._response, *list(self._ranged)]:
            if response is not None:
                _shutdown(response)

    def _cancelled(self) -> FinalError:
        return FinalError("Cancelled", f"the transfer from {self.description} was stopped")

    def _read_once(self, n: int) -> bytes:
        if self._closed.is_set():
            raise self._cancelled()
        if self._response is None:
            self._response = self._open(self._offset)
        parts: list[bytes] = []
        got = 0
        try:
            # read1 hands over what has arrived, so bytes received before a failure count
            # and the resume starts after them.
            while got < n and (data := self._response.read1(n - got)):
                parts.append(data)
                got += len(data)
        except Exception as exc:
            if self._closed.is_set():  # close() tore the response down under this read
                raise self._cancelled() from None
            if not isinstance(exc, self._stream_errors):
                raise
            self._drop_response()
            failure = TransientError(
                "ConnectionLost",
                f"transfer from {self.description} failed at byte {self._offset + got}: "
                f"{self._describe(exc)}",
            )
            if not parts:
                raise failure from None
            log.warning("%s; resuming", failure)
        if not parts and self.size is not None and self._offset < self.size:
            self._drop_response()
            raise TransientError(
                "Truncated", f"{self.description} ended at byte {self._offset} of {self.size}"
            )
        self._offset += got
        return b"".join(parts) if len(parts) != 1 else parts[0]

    def _drop_response(self) -> None:
        if self._response is not None:
            self._response.close()
            self._response = None

    def _describe(self, exc: BaseException) -> str:
        """The exception's text with every known secret, and any query string, removed."""
        return describe(exc, self._secrets)

    # --- retries ----------------------------------------------------------------------

    def _retrying(self, fn: Callable[..., T], *args: Any) -> T:
        retrying = Retrying(
            stop=stop_after_attempt(self._retries + 1),
            wait=self._wait,
            retry=retry_if_exception(lambda exc: _retryable(exc) and not self._closed.is_set()),
            sleep=self._closed.wait,
            before_sleep=self._log_retry,
            reraise=True,
        )
        return retrying(fn, *args)

    def _wait(self, state: RetryCallState) -> float:
        backoff = (
            wait_exponential(multiplier=self._backoff, max=30) + wait_random(0, self._backoff)
        )(state)
        exc = state.outcome.exception() if state.outcome else None
        return max(backoff, getattr(exc, "retry_after", 0.0))

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "attempt %d failed (%s); retrying in %.1fs",
            state.attempt_number,
            exc,
            state.next_action.sleep if state.next_action else 0,
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
