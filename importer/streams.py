"""Composable stages of the data path: each a generator of byte chunks, optionally run in
its own thread so that fetching, hashing, inflating and writing overlap on several cores
(hashlib, zlib/isal, lzma, bz2 and zstandard release the GIL on large buffers)."""

from __future__ import annotations

import bz2
import io
import lzma
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from typing import Any, TypeVar

import zstandard
from isal import igzip, isal_zlib

from importer.buffers import CHUNK, AlignedBuffer, BufferPool
from importer.errors import Failure, FinalError
from importer.formats import Compression

T = TypeVar("T")
Chunk = bytes | AlignedBuffer

# Smaller reads from the network: progress and resume points move every MiB.
FETCH_CHUNK = 1 << 20
# Memory a decompressor may use for its window by default: xz -9 needs 64 MiB, zstd's
# default cap is 128 MiB.
DECOMPRESSION_MEMORY = 128 << 20


@dataclass
class _End:
    error: BaseException | None


QUEUE_DEPTH = 4


def threaded(
    items: Iterable[T], *, name: str, cancel: Callable[[], None], depth: int = QUEUE_DEPTH
) -> Iterator[T]:
    """Produce `items` in a thread, at most `depth` items ahead of the consumer.

    Errors in the producer are raised in the consumer. A consumer that stops early calls
    `cancel` (which must unblock whatever the producers wait on, such as a network read)
    and waits for the producer to end.
    """
    handoff: queue.Queue[Any] = queue.Queue(depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_End(None))
        except BaseException as exc:  # handed to the consumer, which raises it
            put(_End(exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # stop the stages upstream of this one

    worker = threading.Thread(target=produce, name=name, daemon=True)
    worker.start()
    try:
        while True:
            item = handoff.get()
            if isinstance(item, _End):
                if item.error is not None:
                    raise item.error
                return
            yield item
    finally:
        stop.set()
        if worker.is_alive():
            cancel()
        worker.join()


def peek(chunks: Iterator[Chunk], n: int) -> tuple[bytes, Iterator[Chunk]]:
    """Return (a copy of) at least the first `n` bytes (fewer only at the end), and the
    whole stream."""
    seen: list[Chunk] = []
    size = 0
    for chunk in chunks:
        seen.append(chunk)
        size += len(chunk)
        if size >= n:
            break
    head = b"".join(c.data() if isinstance(c, AlignedBuffer) else c for c in seen)
    return head, chain(seen, chunks)


def read_chunks(
    read: Callable[[int], bytes], *, on_bytes: Callable[[int], None]
) -> Iterator[bytes]:
    """Yield `read(FETCH_CHUNK)` results until the end of the stream."""
    while data := read(FETCH_CHUNK):
        on_bytes(len(data))
        yield data


def hashed(chunks: Iterable[bytes], digest: Any) -> Iterator[bytes]:
    """Pass chunks through, feeding each to `digest` (a hashlib object)."""
    for chunk in chunks:
        digest.update(chunk)
        yield chunk


def decompressed(
    chunks: Iterable[bytes],
    kind: Compression,
    pool: BufferPool,
    *,
    memory: int = DECOMPRESSION_MEMORY,
) -> Iterator[Chunk]:
    """Inflate a compressed stream (all members/frames/streams of it) in bounded chunks;
    gzip and zstd straight into aligned buffers from `pool`. An xz or zstd stream whose
    window needs more than `memory` bytes is refused."""
    try:
        if kind is Compression.GZIP:
            yield from _fill(igzip.IGzipFile(fileobj=ChunkReader(chunks)), pool)
        elif kind is Compression.ZSTD:
            dctx = zstandard.ZstdDecompressor(max_window_size=memory)
            reader = dctx.stream_reader(ChunkReader(chunks), read_across_frames=True)
            yield from _fill(reader, pool)
        elif kind is Compression.XZ:
            yield from _multistream(chunks, lambda: lzma.LZMADecompressor(memlimit=memory))
        elif kind is Compression.BZIP2:
            yield from _multistream(chunks, bz2.BZ2Decompressor)
        else:
            yield from chunks
    except Failure:
        raise
    except (
        OSError,
        EOFError,
        isal_zlib.error,
        lzma.LZMAError,
        zstandard.ZstdError,
        ValueError,
    ) as exc:
        if _over_memory(exc):
            raise FinalError(
                "ResourceLimit",
                f"the {kind} stream needs a window larger than the decompression memory limit "
                f"of {memory >> 20} MiB (it was compressed with a very large window); allow "
                "more with --decompression-memory (e.g. 512Mi), or recompress it",
            ) from None
        raise FinalError("CorruptCompressedData", f"the {kind} stream is corrupt: {exc}") from None


def _over_memory(exc: BaseException) -> bool:
    # Neither library has an error class of its own for this: their messages tell.
    text = str(exc)
    return "Memory usage limit" in text or "too much memory" in text


def _fill(reader: Any, pool: BufferPool) -> Iterator[AlignedBuffer]:
    # Full buffers, so that every write but the last is aligned for O_DIRECT.
    with reader:
        while True:
            buffer = pool.get()
            size = 0
            while size < len(buffer.view) and (got := reader.readinto(buffer.view[size:])):
                size += got
            if not size:
                buffer.release()
                return
            buffer.length = size
            yield buffer


def _multistream(chunks: Iterable[bytes], new: Callable[[], Any]) -> Iterator[bytes]:
    # lzma and bz2 decompressors stop at the end of one stream; files often hold several.
    decompressor, fed = new(), False
    for data in chunks:
        while True:
            if decompressor.eof:
                data = decompressor.unused_data + data
                decompressor, fed = new(), False
                if not data.strip(b"\0"):
                    break  # nothing, or the zero padding allowed between and after streams
            if not fed:
                data = data.lstrip(b"\0")  # xz allows zero padding between streams
            fed = fed or bool(data)
            out = decompressor.decompress(data, CHUNK)
            data = b""
            if out:
                yield out
            if not decompressor.eof and decompressor.needs_input:
                break
    if fed and not decompressor.eof:
        raise EOFError("the stream ends before its end-of-stream marker")


class ChunkReader(io.RawIOBase):
    """A read-only file over an iterator of chunks, for decompressors and tarfile."""

    def __init__(self, chunks: Iterable[Chunk]) -> None:
        self._chunks = iter(chunks)
        self._current = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self._current:
            chunk = next(self._chunks, b"")
            if isinstance(chunk, AlignedBuffer):
                data = bytes(chunk.data())  # a copy: the pool wants its buffer back
                chunk.release()
                chunk = data
            self._current = memoryview(chunk)
        n = min(len(buffer), len(self._current))
        buffer[:n] = self._current[:n]
        self._current = self._current[n:]
        return n
