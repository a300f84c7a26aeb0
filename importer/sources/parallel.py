"""Parallel ranged download: N connections fetch consecutive parts of the object, and the
parts are handed on strictly in order, so hashing and decompression stay sequential.

Memory stays bounded: no worker fetches further ahead of the reader than `window` parts.
Each part is one ranged GET pinned to the version first read (If-Range / If-Match), retried
as a whole on failure.
"""

from __future__ import annotations

import threading

from importer.sources.resumable import ResumableSource

PART_SIZE = 2 << 20


class ParallelSource:
    """Read a range-capable source through `connections` parallel ranged GETs."""

    def __init__(
        self, source: ResumableSource, *, connections: int, part_size: int = PART_SIZE
    ) -> None:
        assert source.size is not None and source.ranges
        self.description = source.description
        self.size = source.size
        self._source = source
        self._part_size = part_size
        self._parts = -(-source.size // part_size)
        self._window = connections + 1
        self._lock = threading.Condition()
        self._fetched: dict[int, bytes] = {}
        self._next_to_fetch = 0
        self._next_to_read = 0
        self._error: BaseException | None = None
        self._closed = False
        self._pending = memoryview(b"")
        source.stop_streaming()
        self._workers = [
            threading.Thread(target=self._work, name=f"fetch-{i}", daemon=True)
            for i in range(min(connections, self._parts))
        ]
        for worker in self._workers:
            worker.start()

    def read(self, n: int) -> memoryview:
        if not self._pending:
            if self._next_to_read >= self._parts:
                return b""
            with self._lock:
                while self._next_to_read not in self._fetched and self._error is None:
                    self._lock.wait()
                if self._error is not None:
                    raise self._error
                self._pending = memoryview(self._fetched.pop(self._next_to_read))
                self._next_to_read += 1
                self._lock.notify_all()
        data, self._pending = self._pending[:n], self._pending[n:]
        return data  # a view of the part: no copy

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._source.close()  # wakes workers blocked in a read or a retry's sleep
        for worker in self._workers:
            worker.join()

    def _work(self) -> None:
        while True:
            with self._lock:
                while (
                    not self._closed
                    and self._error is None
                    and self._next_to_fetch < self._parts
                    and self._next_to_fetch >= self._next_to_read + self._window
                ):
                    self._lock.wait()
                if self._closed or self._error is not None or self._next_to_fetch >= self._parts:
                    return
                part = self._next_to_fetch
                self._next_to_fetch += 1
            start = part * self._part_size
            try:
                data = self._source.read_range(start, min(self.size, start + self._part_size))
            except BaseException as exc:  # handed to the reader, which raises it
                with self._lock:
                    self._error = self._error or exc
                    self._lock.notify_all()
                return
            with self._lock:
                self._fetched[part] = data
                self._lock.notify_all()
