"""The one interface every source implements."""

from __future__ import annotations

from typing import Protocol


class Source(Protocol):
    """A byte stream of the image as stored (compressed or not)."""

    description: str
    """Where the bytes come from, safe to log (no credentials, no signed query strings)."""

    size: int | None
    """Length in bytes of the stream, when the source knows it."""

    def read(self, n: int) -> bytes:
        """Return up to `n` next bytes; b"" only at the end of the stream."""
        ...

    def close(self) -> None:
        """Release connections and file handles."""
        ...
