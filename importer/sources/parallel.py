"""Parallel ranged download: N connections fetch consecutive parts of the object, and the
parts are handed on strictly in order, so hashing and decompression stay sequential.

It starts as one stream and fans out only if that stream is slow: on a fast link parallel
parts only cost CPU, and some servers answer every ranged GET with a whole-object read
(docs/benchmarks.md). The stream's speed is the time spent waiting for the network, not the
time the pipeline behind it took, so a slow decompressor does not look like a slow link.

Memory stays bounded: no worker fetches further ahead of the reader than `window` parts.
Each part is one ranged GET pinned to the version first read (If-Range / If-Match), retried
as a whole on failure.
"""

from __future__ import annotations

import logging
import threading
import time

from importer.errors import FinalError
from importer.sources.resumable import ResumableSource

log = logging.getLogger("diskflow.importer")

PART_SIZE = 2 << 20
PROBE_BYTES = 8 << 20  # read as one stream before deciding
FAST_ENOUGH = 100 << 20  # bytes/s of one stream past which more connections rarely pay


class ParallelSource:
    """Read a range-capable source through `connections` parallel ranged GETs."""

    def __init__(
        self,
        source: ResumableSource,
        *,
        connections: int,
        part_size: int = PART_SIZE,
        probe_bytes: int = PROBE_BYTES,
        fast_enough: float = FAST_ENOUGH,
    ) -> None:
        assert source.size is not None and source.ranges
        self.description = source.description
        self.size = source.size
        self._source = source
        self._connections = connections
        self._part_size = part_size
        self._probe_bytes = probe_bytes
        self._fast_enough = fast_enough
        self._mode = "probe"  # then "stream" (one stream to the end) or "parts"
        self._streamed = 0
        self._waited = 0.0  # seconds spent inside the stream's reads
        self._base = 0  # where the parts start
        self._parts = 0
        self._window = connections + 1
        self._lock = threading.Condition()
        self._fetched: dict[int, bytes] = {}
        self._next_to_fetch = 0
        self._next_to_read = 0
        self._error: BaseException | None = None
        self._closed = False
        self._pending = memoryview(b"")
        self._workers: list[threading.Thread] = []
        if probe_bytes <= 0:
            self._fan_out()

    def read(self, n: int) -> bytes | memoryview:
        if self._mode != "parts":
            return self._read_stream(n)
        if not self._pending:
            if self._next_to_read >= self._parts:
                return b""
            with self._lock:
                while (
                    self._next_to_read not in self._fetched
                    and self._error is None
                    and not self._closed
                ):
                    self._lock.wait()
                if self._error is not None:
                    raise self._error
                if self._closed:
                    raise FinalError(
                        "Cancelled", f"the transfer from {self.description} was stopped"
                    )
                self._pending = memoryview(self._fetched.pop(self._next_to_read))
                self._next_to_read += 1
                self._lock.notify_all()
        data, self._pending = self._pending[:n], self._pending[n:]
        return data  # a view of the part: no copy

    def _read_stream(self, n: int) -> bytes:
        started = time.monotonic()
        data = self._source.read(n)
        self._waited += time.monotonic() - started
        self._streamed += len(data)
        if self._mode == "probe" and self._streamed >= self._probe_bytes:
            rate = self._streamed / max(self._waited, 1e-6)
            if rate < self._fast_enough and self.size - self._streamed > 2 * self._part_size:
                log.info(
                    "one stream brings %.0f MB/s; fetching the rest over %d connections",
                    rate / 1e6,
                    self._connections,
                )
                self._fan_out()
            else:
                self._mode = "stream"
        return data

    def _fan_out(self) -> None:
        self._source.stop_streaming()
        self._base = self._streamed
        self._parts = -(-(self.size - self._base) // self._part_size)
        self._mode = "parts"
        self._workers = [
            threading.Thread(target=self._work, name=f"fetch-{i}", daemon=True)
            for i in range(min(self._connections, self._parts))
        ]
        for worker in self._workers:
            worker.start()

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
            start = self._base + part * self._part_size
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
