"""Page-aligned buffers, reused: a decompressor fills one and the writer hands it to an
O_DIRECT write as it is, with no copy in between (that copy was a third of the writer's time)."""

from __future__ import annotations

import ctypes
import queue
import threading

from importer.errors import FinalError

CHUNK = 4 << 20
ALIGN = 4096


def aligned(size: int) -> tuple[bytearray, int]:
    """A bytearray with a page-aligned window of `size` bytes starting at the returned offset.

    A bytearray (not an mmap) because `bytearray.startswith` compares against zeroes at memcmp
    speed, without slicing a copy.
    """
    raw = bytearray(size + ALIGN)
    address = ctypes.addressof(ctypes.c_char.from_buffer(raw))
    return raw, (-address) % ALIGN


class AlignedBuffer:
    """`length` bytes of data at `raw[base:]`; `release()` returns it to its pool."""

    def __init__(self, pool: BufferPool, size: int) -> None:
        self.raw, self.base = aligned(size)
        self.view = memoryview(self.raw)[self.base : self.base + size]
        self.length = 0
        self._pool = pool

    def __len__(self) -> int:
        return self.length

    def data(self) -> memoryview:
        return self.view[: self.length]

    def release(self) -> None:
        self.length = 0
        self._pool.put(self)


class BufferPool:
    """A fixed number of buffers: memory stays bounded however fast the producer is."""

    def __init__(self, count: int, size: int = CHUNK) -> None:
        self._free: queue.Queue[AlignedBuffer] = queue.Queue()
        self._closed = threading.Event()
        self._unmade = count  # made on first need: an import that never inflates needs none
        self._size = size

    def get(self) -> AlignedBuffer:
        """A free buffer; waits for one, unless the pool is closed (the import is stopping)."""
        if self._free.empty() and self._unmade:
            self._unmade -= 1
            return AlignedBuffer(self, self._size)
        while True:
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                if self._closed.is_set():
                    raise FinalError("Cancelled", "the import was stopped") from None

    def put(self, buffer: AlignedBuffer) -> None:
        self._free.put(buffer)

    def close(self) -> None:
        self._closed.set()
