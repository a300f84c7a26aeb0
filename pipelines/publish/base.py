"""What every artifact store offers, and the reader that makes an upload its own checksum pass."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from importer.errors import FinalError
from importer.progress import Progress
from pipelines.manifest import ImportSource

CHUNK = 1 << 20


@dataclass(frozen=True)
class Stored:
    """What a store holds after an upload: the sha256 of the bytes sent, and their count."""

    sha256: str
    size: int


class Store(Protocol):
    """An artifact store: objects under `/`-separated keys, each written whole or not at all."""

    description: str
    """Where the store is, safe to log (no credentials)."""

    def put_file(
        self, key: str, path: Path, *, sha256: str | None = None, progress: Progress | None = None
    ) -> Stored:
        """Upload `path`, hashing it in the same read pass, and verify what the store holds.
        With `sha256`, a file whose bytes do not match fails before the upload completes."""
        ...

    def put_bytes(self, key: str, data: bytes, *, content_type: str) -> None:
        """Store a small object, verified like `put_file`."""
        ...

    def get_bytes(self, key: str) -> bytes | None:
        """The object's content, or None if there is no such object."""
        ...

    def size(self, key: str) -> int | None:
        """The object's length, or None if there is no such object."""
        ...

    def url(self, key: str) -> str:
        """Where the object is, in the store's own terms (s3://, https://, file://)."""
        ...

    def import_source(self, key: str) -> ImportSource | None:
        """How a cluster imports the object, or None where no URL can reach it."""
        ...


class HashingReader:
    """Reads `size` bytes of a file exactly once, front to back, hashing them as they pass.

    Deliberately not seekable: a consumer that cannot seek cannot re-read bytes into the hash
    (boto3's transfer manager then reads parts sequentially into memory). With `part_size`,
    each part's sha256 is kept too, for S3's composite checksum. At the end the file must end
    where it did at the start, and match `expected` if given; else the last read raises, so
    the upload fails before it completes.
    """

    def __init__(
        self,
        file: BinaryIO,
        *,
        size: int,
        expected: str | None = None,
        part_size: int | None = None,
        progress: Progress | None = None,
    ) -> None:
        self._file = file
        self._size = size
        self._expected = expected
        self._part_size = part_size
        self._progress = progress
        self._offset = 0
        self._whole = hashlib.sha256()
        self._part = hashlib.sha256()
        self.parts: list[bytes] = []
        """Digests of the parts read so far (with `part_size`)."""
        self.sha256: str | None = None
        """The hex digest, once every byte has been read."""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def read(self, n: int = -1) -> bytes:
        left = self._size - self._offset
        n = left if n is None or n < 0 else min(n, left)
        if not n:
            self._finish()
            return b""
        data = self._file.read(n)
        if len(data) != n:
            raise FinalError(
                "ImageChanged",
                f"{self._name} ended at byte {self._offset + len(data)} of {self._size}: "
                "it changed during the upload",
            )
        self._hash(data)
        self._offset += n
        if self._progress is not None:
            self._progress.advance(n)
        if self._offset == self._size:
            self._finish()
        return data

    def _hash(self, data: bytes) -> None:
        self._whole.update(data)
        if self._part_size is None:
            return
        view = memoryview(data)
        offset = self._offset
        while view:
            take = min(len(view), self._part_size - offset % self._part_size)
            self._part.update(view[:take])
            view, offset = view[take:], offset + take
            if offset % self._part_size == 0:
                self._end_part()

    def _end_part(self) -> None:
        self.parts.append(self._part.digest())
        self._part = hashlib.sha256()

    def _finish(self) -> None:
        if self.sha256 is not None:
            return
        if self._file.read(1):
            raise FinalError(
                "ImageChanged", f"{self._name} grew past {self._size} bytes during the upload"
            )
        if self._part_size is not None and self._size % self._part_size:
            self._end_part()
        digest = self._whole.hexdigest()
        if self._expected is not None and not hmac.compare_digest(digest, self._expected):
            raise FinalError(
                "ChecksumMismatch",
                f"sha256 of {self._name} is {digest}, expected {self._expected}: it changed "
                "after its checksum was taken",
            )
        self.sha256 = digest

    @property
    def _name(self) -> str:
        return str(getattr(self._file, "name", "the image"))
