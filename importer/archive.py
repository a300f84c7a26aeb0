"""The `archive` content type (CDI's `contentType: archive`): a tar stream extracted into a
directory, refusing anything that could reach outside it.

Members land in a hidden staging directory inside the destination and are moved into place
only after the whole archive was read and its checksum verified; a failed import removes them.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator

from importer.buffers import AlignedBuffer
from importer.errors import FinalError
from importer.streams import Chunk, ChunkReader
from importer.target import syncfs

_REFUSALS = {
    tarfile.AbsolutePathError: "has an absolute path",
    tarfile.OutsideDestinationError: "would land outside the destination",
    tarfile.SpecialFileError: "is a device node, FIFO or other special file",
    tarfile.AbsoluteLinkError: "is a link to an absolute path",
    tarfile.LinkOutsideDestinationError: "is a link pointing outside the destination",
}


def is_tar(head: bytes) -> bool:
    """True if `head` starts with a POSIX (ustar) or GNU tar header."""
    return head[257:262] == b"ustar"


def extract(
    chunks: Iterator[Chunk], directory: str, *, limit: int | None, verify: Callable[[], None]
) -> int:
    """Extract the tar stream into `directory`; return the bytes of file data extracted."""
    staging = tempfile.mkdtemp(prefix=".diskflow-extract-", dir=directory)
    total = 0

    def check(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo:
        nonlocal total
        # Stricter than tarfile's data filter, which would quietly strip a leading "/".
        if member.name.startswith("/"):
            raise FinalError(
                "UnsafeArchive", f"archive member {member.name!r} has an absolute path"
            )
        if ".." in member.name.split("/"):
            raise FinalError(
                "UnsafeArchive", f"archive member {member.name!r} has a '..' component"
            )
        try:
            member = tarfile.data_filter(member, path)
        except tarfile.FilterError as exc:
            reason = next(
                (text for kind, text in _REFUSALS.items() if isinstance(exc, kind)), str(exc)
            )
            raise FinalError("UnsafeArchive", f"archive member {member.name!r} {reason}") from None
        total += member.size
        if limit is not None and total > limit:
            raise FinalError(
                "ImageTooLarge",
                f"the archive holds more than the usable capacity of {limit} bytes "
                f"(stopped at member {member.name!r})",
            )
        return member

    try:
        try:
            with tarfile.open(fileobj=ChunkReader(chunks), mode="r|") as archive:
                archive.extractall(staging, filter=check)
        except tarfile.TarError as exc:
            raise FinalError("InvalidArchive", f"the tar archive is corrupt: {exc}") from None
        for rest in chunks:  # what follows tar's end marker still counts for the checksum
            if isinstance(rest, AlignedBuffer):
                rest.release()
        verify()
        _move_into_place(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return total


def _move_into_place(staging: str, directory: str) -> None:
    for name in os.listdir(staging):
        if os.path.lexists(os.path.join(directory, name)):
            raise FinalError("InvalidDestination", f"{directory} already holds {name!r}")
    for name in os.listdir(staging):
        os.replace(os.path.join(staging, name), os.path.join(directory, name))
    os.rmdir(staging)
    syncfs(directory)  # every extracted file durable, in one call
