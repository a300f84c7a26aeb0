"""A local file (or anything `open()` reads: a FIFO, /dev/stdin) as a source."""

from __future__ import annotations

import os
import select
import stat
import threading

from importer.errors import FinalError


class LocalSource:
    """Read an image from the local filesystem."""

    def __init__(self, path: str) -> None:
        self.description = path
        try:
            self._file = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
        except FileNotFoundError:
            raise FinalError("NotFound", f"source file {path} does not exist") from None
        except IsADirectoryError:
            raise FinalError("InvalidSource", f"source {path} is a directory") from None
        except PermissionError:
            raise FinalError("Forbidden", f"source file {path} is not readable") from None
        except OSError as exc:  # a name too long, a loop of links, ...
            raise FinalError(
                "InvalidSource", f"source {path} cannot be opened: {exc.strerror}"
            ) from None
        st = os.fstat(self._file.fileno())
        regular = stat.S_ISREG(st.st_mode)
        self.size = st.st_size if regular else None
        # A pipe or FIFO can block a read for ever, and closing it from another thread does
        # not wake that read: such reads wait on the pipe and on a wake-up pipe of their own.
        self._wake = None if regular else os.pipe()
        self._lock = threading.Lock()
        self._reading = False
        self._closed = False

    def read(self, n: int) -> bytes:
        with self._lock:
            if self._closed:
                raise FinalError("Cancelled", f"reading {self.description} was stopped")
            self._reading = True
        try:
            if self._wake is not None:
                ready, _, _ = select.select([self._file, self._wake[0]], [], [])
                if self._wake[0] in ready:
                    raise FinalError("Cancelled", f"reading {self.description} was stopped")
            return self._file.read(n)
        except OSError as exc:
            raise FinalError(
                "ReadError", f"reading {self.description} failed: {exc.strerror}"
            ) from None
        finally:
            with self._lock:
                self._reading = False
                if self._closed:
                    self._release()

    def close(self) -> None:
        """Stop reading; safe to call from another thread while `read` waits (the reader
        then lets go of the file)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._reading and self._wake is not None:
                os.write(self._wake[1], b"x")
            elif not self._reading:
                self._release()

    def _release(self) -> None:
        self._file.close()
        if self._wake is not None:
            for fd in self._wake:
                os.close(fd)
            self._wake = None
