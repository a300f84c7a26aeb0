"""The destination of an import: a file (`disk.img` on a Filesystem volume) or a block device.

Data is written with O_DIRECT where the filesystem allows it, so a large import neither fills
the page cache (counted against a pod's memory limit) nor pays for a second copy. Zero blocks
are never written to a file: they stay holes. On a block device they are zeroed with
BLKZEROOUT, punched, or written, in that order of preference.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from importer.buffers import ALIGN, CHUNK, AlignedBuffer, BufferPool, aligned
from importer.errors import FinalError
from importer.limits import Bound
from importer.workers import WORKERS, Workers

GRANULE = 64 << 10  # zero detection unit: a hole smaller than this is not worth a syscall
HEAD = 1 << 20  # on a block device the first MiB is written last, so a failed import
#                 never leaves a recognisable partition table or image header behind.
_BLKZEROOUT = 0x127F
_BLKGETSIZE64 = 0x80081272
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_ZEROS = bytes(GRANULE)
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


@dataclass(frozen=True)
class Target:
    path: str
    is_block: bool
    device_size: int | None  # bytes, for a block device


def inspect_target(path: str) -> Target:
    """Say what `path` is; the error names the problem when it cannot be a destination."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise FinalError("InvalidDestination", f"directory {parent} does not exist") from None
        return Target(path, False, None)
    except OSError as exc:  # a name too long, a loop of links, a directory not searchable
        raise FinalError("InvalidDestination", f"{path}: {exc.strerror}") from None
    if stat.S_ISBLK(mode):
        return Target(path, True, None)  # sized once claimed: see device_size
    if stat.S_ISREG(mode):
        return Target(path, False, None)
    raise FinalError("InvalidDestination", f"{path} is neither a regular file nor a block device")


def device_size(fd: int) -> int:
    """The size in bytes of the block device open at `fd`."""
    return struct.unpack("Q", fcntl.ioctl(fd, _BLKGETSIZE64, b"\0" * 8))[0]


def open_direct(path: str, flags: int) -> int | None:
    """Open `path` with O_DIRECT, or None where the filesystem refuses it (tmpfs)."""
    try:
        return os.open(path, flags | os.O_DIRECT)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return None
        raise


class SparseWriter:
    """Write a stream of bytes from offset 0 of a file or block device, sparsely.

    A file must be new (it is truncated): skipped zero blocks read back as zeroes.
    """

    def __init__(
        self,
        path: str,
        *,
        block: bool,
        bound: Bound | None,
        chunk: int = CHUNK,
        preallocate: bool = False,
        scratch: bool = False,
    ) -> None:
        self.path = path
        self._block = block
        self._bound = bound
        self._preallocate = preallocate
        # A file exists already (importer.claims made it, under a name of its own).
        self._fd = os.open(path, os.O_WRONLY | (0 if block else os.O_TRUNC | os.O_NOFOLLOW))
        # A scratch file is read straight back by qemu-img: plain buffered appends, through the
        # page cache, with no copy into the staging buffer and no hole detection.
        self._scratch = scratch
        self._direct_fd = None if scratch else open_direct(path, os.O_WRONLY)
        self._chunk = chunk
        # Buffers filled from unaligned chunks, written in the background like aligned ones.
        self._staging = BufferPool(count=WORKERS + 2, size=chunk)
        self._current: AlignedBuffer | None = None
        self._writes = Workers("write", depth=WORKERS)
        self._offset = 0  # file offset of the next buffer to write
        self._head: bytes | None = None
        if block:
            # Zeroed now and written last: an import that dies half-way leaves no old
            # partition table or image header on top of the new data.
            zero_range(
                self._fd, 0, min(HEAD, bound.limit if bound else HEAD), block=True, write_only=False
            )

    @property
    def size(self) -> int:
        return self._offset + (0 if self._current is None else len(self._current))

    def tighten(self, bound: Bound) -> None:
        """Hold the rest of the stream to `bound` too, where it is the tighter one."""
        if self._bound is None or bound.limit < self._bound.limit:
            self._bound = bound

    def write(self, data: bytes | AlignedBuffer) -> None:
        """Append `data`; an AlignedBuffer is released once written."""
        if self._bound is not None and self.size + len(data) > self._bound.limit:
            raise FinalError(
                "ImageTooLarge",
                f"the image is larger than {self._bound.what} ({self._bound.limit} bytes): more "
                f"than {self.size + len(data)} bytes arrived; stopped writing{self._bound.hint}",
            )
        view = data.data() if isinstance(data, AlignedBuffer) else memoryview(data)
        if (
            isinstance(data, AlignedBuffer)
            and len(view) == self._chunk
            and self._current is None
            and not self._scratch
        ):  # whole aligned chunks (all but a stream's last) go out as they are
            self._flush(data)
            return
        try:
            if self._scratch:
                pwrite_all(self._fd, view, self._offset)
                self._offset += len(view)
            else:
                self._copy(view)
        finally:
            if isinstance(data, AlignedBuffer):
                data.release()

    def _copy(self, source: memoryview) -> None:
        while source:
            if self._current is None:
                self._current = self._staging.get()
            current = self._current
            n = min(len(source), self._chunk - current.length)
            current.view[current.length : current.length + n] = source[:n]
            current.length += n
            source = source[n:]
            if current.length == self._chunk:
                self._current = None
                self._flush(current)

    def write_all(self, chunks: Iterable[bytes | AlignedBuffer]) -> int:
        """Write every chunk, then `finish()`; return the stream's length."""
        for chunk in chunks:
            self.write(chunk)
        return self.finish()

    def finish(self) -> int:
        """Write what is buffered and set the file's length; return the stream's length."""
        if self._current is not None:
            current, self._current = self._current, None
            self._flush(current)
        self._writes.wait()
        if not self._block:
            os.ftruncate(self._fd, self._offset)
        return self._offset

    def commit(self) -> None:
        """Make the data durable (and, on a block device, write the held-back head)."""
        if self._head is not None:
            pwrite_all(self._fd, self._head, 0)
        os.fdatasync(self._fd)

    def close(self) -> None:
        self._writes.close()
        if self._current is not None:
            self._current.release()
            self._current = None
        if self._direct_fd is not None:
            os.close(self._direct_fd)
            self._direct_fd = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _flush(self, buffer: AlignedBuffer) -> None:
        """Write `buffer` at the current offset, in the background; it is released then."""
        start, length = self._offset, len(buffer)
        self._offset += length
        if self._block and start < HEAD:
            keep = min(HEAD, start + length) - start
            self._head = (self._head or b"") + bytes(buffer.view[:keep])
        try:
            self._writes.submit(self._write_out, buffer, start)
        except BaseException:
            buffer.release()
            raise

    def _write_out(self, buffer: AlignedBuffer, start: int) -> None:
        try:
            for begin, end, zero in zero_runs(buffer.raw, buffer.base, len(buffer)):
                self._put(buffer.view, start, begin, end, zero=zero)
        finally:
            buffer.release()

    def _put(self, view: memoryview, base: int, begin: int, end: int, *, zero: bool) -> None:
        offset = base + begin
        if self._block and offset < HEAD:
            skip = min(HEAD - offset, end - begin)
            begin, offset = begin + skip, offset + skip
            if begin >= end:
                return
        if zero:
            if self._block:  # a file is new: its holes already read as zeroes
                zero_range(self._fd, offset, end - begin, block=True, write_only=self._preallocate)
            return
        data = view[begin:end]
        direct = self._direct_fd is not None and len(data) % ALIGN == 0 and offset % ALIGN == 0
        pwrite_all(self._direct_fd if direct else self._fd, data, offset)


class GuestWriter:
    """Write a raw disk's bytes at their offsets, in any order and from any thread (the
    stream decoders' output): zero blocks stay holes (a device's are zeroed), aligned blocks
    go out with O_DIRECT, no byte may be written twice, and a device's first MiB is written
    last. A file must be new: it is truncated."""

    def __init__(self, path: str, *, block: bool, preallocate: bool = False) -> None:
        self.path = path
        self.size = 0
        """The disk's size: nothing is written until `declare` sets it."""
        self._block = block
        self._preallocate = preallocate
        self._fd = os.open(path, os.O_WRONLY | (0 if block else os.O_TRUNC | os.O_NOFOLLOW))
        self._direct_fd = open_direct(path, os.O_WRONLY)
        self._written = Extents()
        self._lock = threading.Lock()
        self._staging = threading.local()  # an aligned buffer per writing thread
        self._head = bytearray(HEAD) if block else None

    def declare(self, size: int) -> None:
        """Set the disk's size (checked against the destination by the caller first)."""
        self.size = size
        if self._block:  # zeroed now and written last, as by SparseWriter
            zero_range(self._fd, 0, min(HEAD, size), block=True, write_only=False)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write `data` at disk offset `offset`: once, inside the declared size."""
        view = memoryview(data).cast("B")
        end = offset + len(view)
        if offset < 0 or end > self.size:
            raise FinalError(
                "InvalidImage",
                f"the image has data for disk bytes {offset}-{end - 1}, beyond its virtual "
                f"size of {self.size} bytes",
            )
        with self._lock:
            if not self._written.add(offset, end):
                raise FinalError(
                    "InvalidImage", f"the image has data for disk bytes {offset}-{end - 1} twice"
                )
        if self._head is not None and offset < HEAD:
            keep = min(HEAD, end) - offset
            self._head[offset : offset + keep] = view[:keep]
            view, offset = view[keep:], offset + keep
        raw, base, window = self._buffer()
        while view:
            # Staged at the file offset's place in a page, so that the whole pages inside
            # can go out with O_DIRECT (VHD data lies 512 bytes past a page in its file).
            skew = offset % ALIGN
            n = min(len(view), len(window) - skew)
            window[skew : skew + n] = view[:n]
            for begin, stop, zero in zero_runs(raw, base + skew, n):
                self._put(window[skew + begin : skew + stop], offset + begin, zero=zero)
            view, offset = view[n:], offset + n

    def finish(self) -> int:
        """Make what was not written read as zeroes; return the disk's size."""
        if self._block:
            for start, end in self._written.gaps(min(HEAD, self.size), self.size):
                zero_range(self._fd, start, end - start, block=True, write_only=self._preallocate)
        else:
            os.ftruncate(self._fd, self.size)
        return self.size

    def commit(self) -> None:
        """Make the data durable (and, on a block device, write the held-back head)."""
        if self._head is not None:
            pwrite_all(self._fd, self._head[: min(HEAD, self.size)], 0)
        os.fdatasync(self._fd)

    def close(self) -> None:
        for fd in (self._direct_fd, self._fd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self._direct_fd, self._fd = None, -1

    def _buffer(self) -> tuple[bytearray, int, memoryview]:
        staging = getattr(self._staging, "buffer", None)
        if staging is None:
            raw, base = aligned(_STAGING)
            staging = self._staging.buffer = (raw, base, memoryview(raw)[base : base + _STAGING])
        return staging

    def _put(self, data: memoryview, offset: int, *, zero: bool) -> None:
        if zero:
            if self._block:
                zero_range(self._fd, offset, len(data), block=True, write_only=self._preallocate)
            return
        if self._direct_fd is None:
            pwrite_all(self._fd, data, offset)
            return
        # Partial pages at either end through the page cache, the whole pages between direct.
        head = min(len(data), -offset % ALIGN)
        middle = (len(data) - head) // ALIGN * ALIGN
        for fd, start, end in (
            (self._fd, 0, head),
            (self._direct_fd, head, head + middle),
            (self._fd, head + middle, len(data)),
        ):
            if end > start:
                pwrite_all(fd, data[start:end], offset + start)


_STAGING = 1 << 20


class Extents:
    """Disjoint ranges [start, end), kept sorted and merged where they touch."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def add(self, start: int, end: int) -> bool:
        """Add [start, end); False (and nothing added) if it overlaps a range already in."""
        i = bisect.bisect_right(self._starts, start)
        if (i and self._ends[i - 1] > start) or (i < len(self._starts) and self._starts[i] < end):
            return False
        if i and self._ends[i - 1] == start:
            self._ends[i - 1] = end
            if i < len(self._starts) and self._starts[i] == end:  # closes a gap: merge
                self._ends[i - 1] = self._ends.pop(i)
                self._starts.pop(i)
        elif i < len(self._starts) and self._starts[i] == end:
            self._starts[i] = start
        else:
            self._starts.insert(i, start)
            self._ends.insert(i, end)
        return True

    def gaps(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """The parts of [start, end) no range covers."""
        at = start
        for s, e in zip(self._starts, self._ends, strict=True):
            if s > at:
                yield at, min(s, end)
            at = max(at, e)
            if at >= end:
                return
        if at < end:
            yield at, end


def zero_runs(raw: bytearray, base: int, length: int) -> Iterator[tuple[int, int, bool]]:
    """(begin, end, zero) runs of `raw[base : base + length]`, told zero or not by GRANULE."""
    run_start, run_zero = 0, None
    for offset in range(0, length, GRANULE):
        end = min(offset + GRANULE, length)
        zero = raw.startswith(_ZEROS[: end - offset], base + offset)
        if zero is not run_zero and run_zero is not None:
            yield run_start, offset, run_zero
            run_start = offset
        run_zero = zero
    if run_zero is not None:
        yield run_start, length, run_zero


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """pwrite until every byte is written (a short write is legal, if rare)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def zero_range(fd: int, offset: int, length: int, *, block: bool, write_only: bool) -> None:
    """Make a range read as zeroes: BLKZEROOUT, then punching a hole, then writing zeroes.

    `write_only` skips the shortcuts, for preallocation where the blocks must be allocated.
    """
    if length <= 0:
        return
    if not write_only:
        aligned = offset % 512 == 0 and length % 512 == 0
        if block and aligned:
            try:
                fcntl.ioctl(fd, _BLKZEROOUT, struct.pack("QQ", offset, length))
                return
            except OSError:
                pass
        mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
        if _libc.fallocate(fd, mode, ctypes.c_int64(offset), ctypes.c_int64(length)) == 0:
            return
    end = offset + length
    while offset < end:
        size = min(GRANULE, end - offset)
        pwrite_all(fd, _ZEROS[:size], offset)
        offset += size


def syncfs(directory: str) -> None:
    """Make everything written to the filesystem holding `directory` durable, in one call."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        if _libc.syncfs(fd) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"syncfs of {directory}: {os.strerror(error)}")
    finally:
        os.close(fd)


def fsync_directory(path: str) -> None:
    """Make renames in the directory `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def wipe_head(path: str) -> None:
    """Zero the first MiB of a block device, so a failed import does not look like an image."""
    fd = os.open(path, os.O_WRONLY)
    try:
        zero_range(fd, 0, HEAD, block=True, write_only=False)
        os.fdatasync(fd)
    finally:
        os.close(fd)
