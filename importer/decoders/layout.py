"""Where an image's bytes go, told by its decoder as its tables arrive.

A decoder registers the byte ranges of the image (host offsets) it needs: a table to parse
(`need`), guest data to write as it arrives (`copy`), a compressed cluster to inflate in a
worker thread (`need(..., parallel=True)`). The image is then fed once, in order (`feed`), and
each range is served as its bytes pass by. Bytes that no range claims yet may still be claimed
by a table that has not arrived: they are held (in memory, then a spill file) until the decoder
says every range is known (`mapped`). A range registered for bytes already gone (claimed by
another range and not held, or held past the spill limit) cannot be streamed: `Unsupported`.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import heapq
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from importer.claims import SCRATCH_PREFIX, owned_file
from importer.decoders import Unsupported
from importer.errors import FinalError
from importer.target import Extents, pwrite_all
from importer.workers import WORKERS, Workers

HOLD_MEMORY = 16 << 20  # unclaimed bytes kept in memory before they go to the spill file
SPILL_LIMIT = 256 << 20  # the most unclaimed bytes held in all; more falls back to scratch
MAX_NEED = 64 << 20  # the largest table or compressed cluster a decoder may ask for


class Output(Protocol):
    """The raw disk being written (importer.target.GuestWriter)."""

    size: int

    def declare(self, size: int) -> None: ...

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...


@dataclass(eq=False)
class _Need:
    start: int
    end: int
    what: str
    then: Callable[[bytearray], None] | None = None  # None: copy to `guest`
    guest: int = 0
    parallel: bool = False
    shared_tail: int = 0  # trailing bytes another range may use too: held as if unclaimed
    got: int = 0  # bytes served, from `start`
    buffer: bytearray | None = None

    @property
    def served_to(self) -> int:
        return self.start + self.got


class Layout:
    """The dispatcher between the image's bytes, in file order, and its decoder's ranges."""

    def __init__(
        self,
        output: Output,
        *,
        name: str = "disk",
        file_size: int | None = None,
        check_size: Callable[[int], None] = lambda size: None,
        spill_dir: str | None = None,
        memory: int = HOLD_MEMORY,
        spill_limit: int = SPILL_LIMIT,
        workers: int = WORKERS,
    ) -> None:
        self.output = output
        self.name = name
        """The image's format, as errors name it."""
        self.file_size = file_size
        """The image file's size where known before its end (an uncompressed download that
        gave its length); None otherwise."""
        self._check_size = check_size
        self._pos = 0  # bytes fed so far
        self._heap: list[tuple[int, int, _Need]] = []  # (start, order, need) not yet started
        self._order = itertools.count()
        self._active: list[_Need] = []  # started, waiting for more bytes
        self._ready: collections.deque[_Need] = collections.deque()
        self._copies = Extents()  # host ranges copied: none twice
        self._last_copy: _Need | None = None
        self._mapped = False  # unclaimed bytes are dropped, not held
        self._mapping_known = False  # mapped() was called: dropped once this chunk is served
        self._checks: list[Callable[[int], None]] = []
        self._held = _Held(memory, spill_dir, spill_limit)
        # The chunk being fed: its offset, bytes, and the parts some range took.
        self._chunk_start = 0
        self._chunk: memoryview | None = None
        self._covered: list[tuple[int, int]] = []
        self._workers = Workers("decode", workers)

    # What decoders call.

    def declare(self, size: int) -> None:
        """Set the disk's virtual size, from the header: checked against the destination
        before anything is written; no `copy` or `write` before it."""
        if size <= 0:  # as the scratch path refuses it (importer.qemu.validate)
            raise FinalError(
                "InvalidImage", f"the {self.name} image's virtual size is {size}: no disk"
            )
        self._check_size(size)
        self.output.declare(size)

    def need(
        self,
        offset: int,
        length: int,
        then: Callable[[bytearray], None],
        *,
        what: str,
        parallel: bool = False,
        shared_tail: int = 0,
    ) -> None:
        """Call `then(data)` with the image's bytes [offset, offset + length) once they have
        all arrived (at once, if they already have). `what` names the range in errors.

        `parallel`: call it in a worker thread, where it may only `write` (a compressed
        cluster); otherwise in the feeding thread, in order, where it may register more.
        `shared_tail`: its last bytes may be the start of a range registered later (qcow2
        packs compressed clusters end to end, each read to the end of its last sector): they
        are held as if no range had claimed them."""
        self._check_range(offset, length, what)
        if length > MAX_NEED:
            raise FinalError(
                "InvalidImage", f"the image's {what} at {offset} is {length} bytes: too large"
            )
        need = _Need(offset, offset + length, what, then, parallel=parallel)
        need.shared_tail = min(shared_tail, length)
        self._add(need)

    def copy(self, offset: int, length: int, guest: int, *, what: str) -> None:
        """Write the image's bytes [offset, offset + length) to the disk at `guest`, as they
        arrive. No byte of the image may be copied twice; guest data must lie in the disk."""
        self._check_range(offset, length, what)
        if guest < 0 or guest + length > self.output.size:
            raise FinalError(
                "InvalidImage",
                f"the image maps {what} to disk bytes {guest}-{guest + length - 1}, beyond its "
                f"virtual size of {self.output.size} bytes",
            )
        if not self._copies.add(offset, offset + length):
            raise FinalError(
                "InvalidImage",
                f"the image maps its bytes {offset}-{offset + length - 1} ({what}) to the disk "
                "more than once",
            )
        last = self._last_copy
        if (
            last is not None
            and last.got == 0
            and last.start >= self._pos
            and last.end == offset
            and last.guest + (last.end - last.start) == guest
            and not (self._chunk is not None and last.start < self._chunk_end)
        ):
            last.end += length  # runs of clusters, contiguous on both sides, are one write
            return
        self._last_copy = _Need(offset, offset + length, what, guest=guest)
        self._add(self._last_copy)

    def write(self, guest: int, data: bytes | bytearray | memoryview) -> None:
        """Write decoded bytes (an inflated cluster) to the disk at `guest`."""
        self.output.write(guest, data)

    def mapped(self) -> None:
        """Every range the decoder will need is registered, or will be by the calls already
        queued: once they have run, bytes no range claims are dropped, and those held let go."""
        self._mapping_known = True
        if self._chunk is None:
            self._let_go()

    def _let_go(self) -> None:
        self._mapped = True
        self._held.clear()

    @property
    def spilled(self) -> int:
        """Bytes that went to the spill file."""
        return self._held.spilled

    def at_end(self, check: Callable[[int], None]) -> None:
        """Call `check(file_size)` once the whole image has been fed and every range served."""
        self._checks.append(check)

    # What the import calls.

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Serve the next bytes of the image to the ranges that need them."""
        self._workers.check()
        view = memoryview(data).cast("B")
        self._chunk_start, self._chunk, self._covered = self._pos, view, []
        try:
            active, self._active = self._active, []
            for need in active:
                self._serve(need)
            end = self._chunk_end
            while self._heap and self._heap[0][0] < end:
                self._serve(heapq.heappop(self._heap)[2])
            self._run_ready()
            if self._mapping_known and not self._mapped:
                self._let_go()
            if not self._mapped:
                self._hold_unclaimed()
        finally:
            self._pos += len(view)
            self._chunk = None

    def end(self) -> None:
        """The image ended: wait for the workers, refuse it if a range was not served, run
        the decoder's last checks."""
        self._workers.wait()
        pending = self._active + [need for _, _, need in self._heap]
        if pending:
            first = min(pending, key=lambda need: need.served_to)
            raise FinalError(
                "TruncatedImage",
                f"the {self.name} image is truncated: it ends after {self._pos} bytes, but "
                f"needs bytes {first.start}-{first.end - 1} ({first.what})",
            )
        for check in self._checks:
            check(self._pos)

    def close(self) -> None:
        """Stop the workers and remove the spill file."""
        self._workers.close()
        self._held.close()

    # The machinery.

    @property
    def _chunk_end(self) -> int:
        return self._chunk_start + (len(self._chunk) if self._chunk is not None else 0)

    def _check_range(self, offset: int, length: int, what: str) -> None:
        if offset < 0 or length < 0:
            raise FinalError(
                "InvalidImage", f"the image's {what} at {offset} ({length} bytes) is out of bounds"
            )
        if self.file_size is not None and offset + length > self.file_size:
            raise FinalError(
                "TruncatedImage",
                f"the {self.name} image is truncated: it is {self.file_size} bytes, but needs "
                f"bytes {offset}-{offset + length - 1} ({what})",
            )

    def _add(self, need: _Need) -> None:
        past = self._pos if self._chunk is None else self._chunk_end
        if need.start < past or need.end == need.start:
            self._serve(need)
            self._run_ready_if_idle()
        else:
            heapq.heappush(self._heap, (need.start, next(self._order), need))

    def _serve(self, need: _Need) -> None:
        """Give `need` what has arrived of its bytes: held ones, then the chunk's."""
        chunk_start = self._chunk_start if self._chunk is not None else self._pos
        if need.served_to < chunk_start:
            upto = min(need.end, chunk_start)
            data = self._held.read(need.served_to, upto)
            if data is None:
                raise Unsupported(
                    f"the image's {need.what} (bytes {need.start}-{need.end - 1}) came after "
                    "its tables let the bytes go: streaming it would need the image twice"
                )
            self._take(need, data)
        if self._chunk is not None and need.served_to < self._chunk_end and need.end > chunk_start:
            upto = min(need.end, self._chunk_end)
            begin = need.served_to
            self._take(need, self._chunk[begin - chunk_start : upto - chunk_start])
            self._covered.append((begin, min(upto, need.end - need.shared_tail)))
        if need.served_to == need.end:
            self._complete(need)
        else:
            self._active.append(need)

    def _take(self, need: _Need, data: memoryview | bytes) -> None:
        if need.then is None:
            # Written by the workers, several at once: one synchronous O_DIRECT write at a
            # time leaves the disk idle between them (a third slower on the disks measured).
            self._workers.submit(self.output.write, need.guest + need.got, bytes(data))
        else:
            if need.buffer is None:  # made as its bytes start to arrive, not when registered
                need.buffer = bytearray(need.end - need.start)
            need.buffer[need.got : need.got + len(data)] = data
        need.got += len(data)

    def _complete(self, need: _Need) -> None:
        if need.then is None:
            return
        if need.parallel:
            self._submit(need)
        else:
            self._ready.append(need)

    def _run_ready(self) -> None:
        # A queue, not recursion: a VMDK stream chains one range to the next tens of
        # thousands of times within one chunk.
        while self._ready:
            need = self._ready.popleft()
            assert need.then is not None
            data, need.buffer = need.buffer or bytearray(), None
            need.then(data)

    def _run_ready_if_idle(self) -> None:
        if self._chunk is None:  # registered outside `feed` (by open_image): served now
            self._run_ready()

    def _hold_unclaimed(self) -> None:
        start, view = self._chunk_start, self._chunk
        assert view is not None
        at = start
        for begin, end in sorted(self._covered):
            if begin > at:
                self._held.add(at, view[at - start : begin - start])
            at = max(at, end)
        if at < self._chunk_end:
            self._held.add(at, view[at - start :])

    def _submit(self, need: _Need) -> None:
        assert need.then is not None
        then, data = need.then, need.buffer or bytearray()
        need.buffer = None
        self._workers.submit(then, data)


class _Held:
    """Bytes of the image no range has claimed yet, by offset (added in increasing order):
    in memory up to `memory` bytes, then appended to a spill file, up to `limit` in all."""

    def __init__(self, memory: int, spill_dir: str | None, limit: int) -> None:
        self._memory, self._dir, self._limit = memory, spill_dir, limit
        self._starts: list[int] = []
        self._pieces: list[bytearray | tuple[int, int]] = []  # bytes, or (spill offset, length)
        self._in_memory = 0
        self._total = 0
        self._spill: contextlib.ExitStack | None = None
        self._fd = -1
        self.spilled = 0

    def add(self, offset: int, data: memoryview) -> None:
        self._total += len(data)
        if self._total > self._limit:
            raise Unsupported(
                f"the image puts more than {_mib(self._limit)} of data before the tables "
                "that map it: more than a stream holds"
            )
        last = self._pieces[-1] if self._pieces else None
        if isinstance(last, bytearray) and self._starts[-1] + len(last) == offset:
            last += data
        else:
            self._starts.append(offset)
            self._pieces.append(bytearray(data))
        self._in_memory += len(data)
        if self._in_memory > self._memory:
            self._spill_all()

    def read(self, start: int, end: int) -> bytes | None:
        """The held bytes [start, end), or None if any of them is not held."""
        i = bisect.bisect_right(self._starts, start) - 1
        parts: list[bytes] = []
        at = start
        while at < end and 0 <= i < len(self._starts):
            piece_start = self._starts[i]
            piece = self._pieces[i]
            length = piece[1] if isinstance(piece, tuple) else len(piece)
            if not piece_start <= at < piece_start + length:
                return None
            upto = min(end, piece_start + length)
            if isinstance(piece, tuple):
                parts.append(os.pread(self._fd, upto - at, piece[0] + at - piece_start))
            else:
                parts.append(bytes(piece[at - piece_start : upto - piece_start]))
            at = upto
            i += 1
        return b"".join(parts) if at >= end else None

    def clear(self) -> None:
        self._starts, self._pieces, self._in_memory = [], [], 0

    def close(self) -> None:
        self.clear()
        if self._spill is not None:
            os.close(self._fd)
            self._spill.close()
            self._spill = None

    def _spill_all(self) -> None:
        if self._dir is None:
            raise Unsupported(
                f"the image puts more than {_mib(self._memory)} of data before the tables "
                "that map it, and there is no scratch directory to hold it"
            )
        if self._spill is None:
            self._spill = contextlib.ExitStack()
            path = self._spill.enter_context(owned_file(self._dir, SCRATCH_PREFIX, ".spill"))
            self._fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        for i, piece in enumerate(self._pieces):
            if isinstance(piece, bytearray):
                try:
                    pwrite_all(self._fd, piece, self.spilled)
                except OSError as exc:
                    raise Unsupported(
                        f"the spill file in {self._dir} could not hold the data that arrived "
                        f"before its tables: {exc.strerror}"
                    ) from None
                self._pieces[i] = (self.spilled, len(piece))
                self.spilled += len(piece)
        self._in_memory = 0


def _mib(size: int) -> str:
    return f"{size / (1 << 20):g} MiB"
