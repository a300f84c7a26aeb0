"""A few threads that run work in the background, a bounded amount of it at a time.

Writes go out several at once (one synchronous O_DIRECT write at a time leaves the disk idle
between them), and compressed clusters are inflated on every core (zlib, isal and zstandard
release the GIL). The first error is raised in the thread that hands out the work.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

WORKERS = 4


class Workers:
    """Run `work(*args)` in `threads` threads, at most `depth` pieces in flight (waiting
    for a slot otherwise): the first failure is raised by the next `submit` or by `wait`."""

    def __init__(self, name: str, threads: int = WORKERS, depth: int | None = None) -> None:
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix=name)
        self._slots = threading.Semaphore(depth or 2 * threads)
        self._futures: set[Future[None]] = set()
        self._failure: BaseException | None = None
        self._lock = threading.Lock()

    def submit(self, work: Callable[..., None], *args: object) -> None:
        """Run `work(*args)` in a worker, once a slot is free."""
        while not self._slots.acquire(timeout=0.1):
            self.check()
        try:
            self.check()
            future = self._pool.submit(work, *args)
        except BaseException:
            self._slots.release()
            raise
        with self._lock:
            self._futures.add(future)
        future.add_done_callback(self._done)

    def check(self) -> None:
        """Raise the first failure of the work done so far, if any."""
        if self._failure is not None:
            raise self._failure

    def wait(self) -> None:
        """Wait for all the work handed out, then raise its first failure, if any."""
        while True:
            with self._lock:
                pending = list(self._futures)
            if not pending:
                break
            for future in pending:
                with contextlib.suppress(Exception):
                    future.result()
        self.check()

    def close(self) -> None:
        """Drop the work not started yet and wait for the rest."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _done(self, future: Future[None]) -> None:
        self._slots.release()
        with self._lock:
            self._futures.discard(future)
            error = None if future.cancelled() else future.exception()
            if error is not None and self._failure is None:
                self._failure = error
