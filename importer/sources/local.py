"""A local file (or anything `open()` reads: a FIFO, /dev/stdin) as a source."""

from __future__ import annotations

import os

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
        st = os.fstat(self._file.fileno())
        self.size = st.st_size if os.path.stat.S_ISREG(st.st_mode) else None

    def read(self, n: int) -> bytes:
        try:
            return self._file.read(n)
        except OSError as exc:
            raise FinalError(
                "ReadError", f"reading {self.description} failed: {exc.strerror}"
            ) from None

    def close(self) -> None:
        self._file.close()
