"""Local directory store: a directory, perhaps an NFS mount or one a web server serves.

Every object is written to a temporary name beside its final one, fsynced, renamed into
place and its directory fsynced, so a reader sees the whole file or none, even after a
crash. The copy pass is the checksum pass. Files get the mode a plain `cp` would give them
(0666 less the umask), not mkstemp's 0600: a web server serving the directory must read them.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote, urlsplit

from importer.errors import FinalError
from importer.progress import Progress
from pipelines.publish.base import CHUNK, HashingReader, ImportSource, Stored


class LocalStore:
    """Objects as files under `root`; `public_url` is the HTTP base that serves `root`."""

    def __init__(self, root: str | Path, *, public_url: str | None = None) -> None:
        self._root = Path(root).absolute()
        if not self._root.is_dir():
            raise FinalError("NotFound", f"{self._root} is not a directory")
        if public_url and urlsplit(public_url).scheme not in ("http", "https"):
            raise FinalError("InvalidURL", f"the public URL {public_url} must be http(s)")
        self._public = public_url.rstrip("/") + "/" if public_url else None
        self.description = str(self._root)

    def put_file(
        self, key: str, path: Path, *, sha256: str | None = None, progress: Progress | None = None
    ) -> Stored:
        """Copy `path` into place atomically, hashing it in the copy pass."""
        size = path.stat().st_size
        with path.open("rb") as source:
            reader = HashingReader(source, size=size, expected=sha256, progress=progress)
            with self._writing(key) as out:
                while data := reader.read(CHUNK):
                    out.write(data)
        assert reader.sha256 is not None  # the loop read to the end
        return Stored(reader.sha256, size)

    def put_bytes(self, key: str, data: bytes, *, content_type: str) -> None:
        with self._writing(key) as out:
            out.write(data)

    def get_bytes(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def size(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return None

    def url(self, key: str) -> str:
        return self._path(key).as_uri()

    def import_source(self, key: str) -> ImportSource | None:
        return ImportSource("http", self._public + quote(key)) if self._public else None

    def _path(self, key: str) -> Path:
        return self._root / key

    @contextlib.contextmanager
    def _writing(self, key: str) -> Iterator[BinaryIO]:
        """A file open for writing that becomes `key` only if the block finishes."""
        final = self._path(key)
        _make_dirs(final.parent)
        fd, temp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                yield out
                out.flush()
                os.fchmod(out.fileno(), 0o666 & ~_umask())
                os.fsync(out.fileno())
            os.replace(temp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
        _fsync_dir(final.parent)


def _umask() -> int:
    """The process's umask, read without setting it (os.umask would race other threads)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _UMASK_AT_IMPORT


def _read_umask_once() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Where /proc is missing: the umask as it was when this module was imported (import is
# normally done before any threads start).
_UMASK_AT_IMPORT = _read_umask_once()


def _make_dirs(path: Path) -> None:
    """mkdir -p, making each new directory's entry durable too."""
    if path.is_dir():
        return
    _make_dirs(path.parent)
    with contextlib.suppress(FileExistsError):  # a concurrent publisher made it
        path.mkdir()
        _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
