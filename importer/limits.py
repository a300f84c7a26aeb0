"""What an import may use: room on the destination, expansion of what was downloaded, time.

With `--size` the image is bounded by the volume's usable capacity. Without it, a file
destination would be bounded only by running out of space, and a decompression bomb of zeros
never runs out (zeros stay holes): 12.5 KB of bzip2 made a 16 GiB "image". So without `--size`
the image is bounded by the free space of the destination's filesystem, and by an expansion
ceiling (bytes written ÷ bytes downloaded) once past a floor of real output.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from importer.buffers import AlignedBuffer
from importer.errors import FinalError

EXPANSION_FLOOR = 1 << 30  # below this much output, no ratio is suspicious
GiB = 1 << 30


@dataclass(frozen=True)
class Bound:
    """The most bytes the raw image may take, and what to tell a user who hits it."""

    limit: int
    what: str
    """Names the bound: "the usable capacity", "the free space of /data"."""
    hint: str = ""
    """How to allow more, appended to the error."""

    def check(self, what: str, size: int, *, slack: int = 0) -> None:
        """Refuse an image whose `what` passes the bound (by more than `slack`)."""
        if size > self.limit + slack:
            raise FinalError(
                "ImageTooLarge",
                f"the image's {what} {size} bytes is larger than {self.what} ({self.limit} "
                f"bytes){self.hint}",
            )


def free_space_bound(directory: str) -> Bound:
    """The free space of the filesystem holding `directory`, as the bound of an import
    that was given no size."""
    st = os.statvfs(directory)
    return Bound(
        st.f_bavail * st.f_frsize,
        f"the free space of {directory}",
        "; give the volume's size with --size to import it anyway",
    )


def expansion_guard(
    chunks: Iterator[bytes | AlignedBuffer],
    *,
    downloaded: Callable[[], int],
    ratio: float,
    floor: int = EXPANSION_FLOOR,
) -> Iterator[bytes | AlignedBuffer]:
    """Pass `chunks` on, refusing the stream once past `floor` bytes it is more than `ratio`
    times what was downloaded so far."""
    written = 0
    for chunk in chunks:
        written += len(chunk)
        check_expansion(written, downloaded(), ratio=ratio, floor=floor)
        yield chunk


def check_expansion(
    size: int, downloaded: int, *, ratio: float, floor: int = EXPANSION_FLOOR
) -> None:
    """Refuse `size` bytes of image made from `downloaded` bytes if it expands over `ratio`:1
    (and is past `floor`)."""
    if size > floor and size > ratio * max(downloaded, 1):
        raise FinalError(
            "ExpansionLimit",
            f"the image expands more than {ratio:g}:1 ({size} bytes from {downloaded} bytes "
            "downloaded): refused as a possible decompression bomb; give the volume's size "
            "with --size, or allow it with --max-expansion 0",
        )


class Deadline:
    """An overall time limit: when it passes, `cancel` is called (from a timer thread) to stop
    whatever the import is waiting on, and `expired` tells the failure that follows apart."""

    def __init__(self, seconds: float | None, cancel: Callable[[], None]) -> None:
        self.seconds = seconds
        self._end = None if seconds is None else time.monotonic() + seconds
        self.expired = threading.Event()
        self._cancel = cancel
        self._timer: threading.Timer | None = None
        if seconds is not None:
            self._timer = threading.Timer(seconds, self._expire)
            self._timer.daemon = True
            self._timer.start()

    def remaining(self) -> float | None:
        """Seconds left, or None without a deadline."""
        return None if self._end is None else max(0.0, self._end - time.monotonic())

    def passed(self) -> bool:
        """True once the deadline has passed (whether or not the timer fired yet)."""
        return self.expired.is_set() or self.remaining() == 0

    def error(self) -> FinalError:
        return FinalError(
            "DeadlineExceeded",
            f"the import did not finish within its deadline of {self.seconds:g}s",
        )

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _expire(self) -> None:
        self.expired.set()
        self._cancel()
