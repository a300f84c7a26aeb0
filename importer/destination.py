"""The destination's life in an import: claimed for the whole run, written under a name of its
own, made durable, and published by a rename (a file) or by its first MiB (a device).

Failures to write say which directory and what was being written: "no room left in /data for
the image", not a bare "[Errno 28] No space left on device".
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import replace

from importer.claims import (
    PARTIAL_SUFFIX,
    SCRATCH_PREFIX,
    claim_device,
    claim_directory,
    claim_file,
    owned_file,
    partial_prefix,
    sweep,
)
from importer.errors import FinalError
from importer.formats import VHD_FOOTER_SIZE, fixed_vhd_disk_size
from importer.progress import Progress
from importer.target import Target, device_size, fsync_directory, inspect_target, open_direct


@contextlib.contextmanager
def claimed(destination: str, *, directory: bool) -> Iterator[Target]:
    """The destination (a directory, for an archive), held for the whole import so that no
    second import writes it."""
    if directory:
        if not os.path.isdir(destination):
            raise FinalError(
                "InvalidDestination",
                f"an archive is extracted into a directory; {destination} is not one",
            )
        with claim_directory(destination):
            yield Target(destination, False, None)
        return
    target = inspect_target(destination)
    if target.is_block:
        with claim_device(destination) as fd:
            yield replace(target, device_size=device_size(fd))
        return
    with contextlib.ExitStack() as held:
        with writing_into(parent(destination), "the image's lock file"):
            held.enter_context(claim_file(destination))
        sweep(*partial_prefix(destination), PARTIAL_SUFFIX)  # left by imports killed outright
        yield target


@contextlib.contextmanager
def published(target: Target, commit: Callable[[], None], *, needs: str = "") -> Iterator[str]:
    """The path to write: a new file of a unique name beside a file destination, renamed
    over it on success (removed on failure); a block device is written in place. A failure
    to write it for lack of space or permission names the directory (and what it `needs`).

    `commit` is called just before the rename: from there on the import stands."""
    if target.is_block:
        yield target.path
        return
    with (
        writing_into(parent(target.path), "the image", needs=needs),
        owned_file(*partial_prefix(target.path), PARTIAL_SUFFIX) as partial,
    ):
        yield partial
        commit()
        os.replace(partial, target.path)
        fsync_directory(parent(target.path))


def check_scratch_dir(directory: str) -> None:
    """Refuse a scratch directory that is missing, not a directory or not writable before a
    byte is fetched, not once an image downloaded whole needs it."""
    what = f"the scratch directory {directory} (--scratch-dir)"
    try:
        mode = os.stat(directory).st_mode
    except FileNotFoundError:
        raise FinalError("InvalidArgument", f"{what} does not exist") from None
    except OSError as exc:  # a name too long, a loop of links, a directory not searchable
        raise FinalError("InvalidArgument", f"{what}: {exc.strerror}") from None
    if not stat.S_ISDIR(mode):
        raise FinalError("InvalidArgument", f"{what} is not a directory")
    # Made and removed again: a file of our own is the one sure test that the directory takes
    # new files, whatever refuses them (a read-only mount, permissions, an SELinux label).
    with writing_into(directory, "an image's scratch copy"), owned_file(directory, SCRATCH_PREFIX):
        pass


def finish_file(
    path: str, size: int, *, capacity: int | None, preallocate: bool, progress: Progress
) -> int:
    """Grow a raw file to the usable capacity (never shrink), allocate it if asked, sync it;
    return its final size."""
    final = max(size, capacity or 0)
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    try:
        if final != os.fstat(fd).st_size:
            progress.stage("resize", final)
            os.ftruncate(fd, final)
            progress.set_done(final)
        if preallocate:
            os.posix_fallocate(fd, 0, final)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    return final


def cut_fixed_vhd_footer(path: str, size: int, *, block: bool) -> int | None:
    """The disk size if the raw stream was a fixed VHD (disk + 512-byte footer), whose footer
    is then cut off a file, or zeroed on a device."""
    if size <= VHD_FOOTER_SIZE:
        return None
    with open(path, "rb") as image:
        image.seek(size - VHD_FOOTER_SIZE)
        footer = image.read(VHD_FOOTER_SIZE)
    disk_size = fixed_vhd_disk_size(footer)
    if disk_size != size - VHD_FOOTER_SIZE:
        return None
    fd = os.open(path, os.O_WRONLY)
    try:
        if block:
            os.pwrite(fd, bytes(VHD_FOOTER_SIZE), disk_size)
        else:
            os.ftruncate(fd, disk_size)
    finally:
        os.close(fd)
    return disk_size


def supports_direct(path: str) -> bool:
    """Whether `path` can be opened with O_DIRECT (tmpfs cannot)."""
    fd = open_direct(path, os.O_RDONLY)
    if fd is None:
        return False
    os.close(fd)
    return True


def sync(path: str) -> None:
    """fdatasync `path`."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def parent(path: str) -> str:
    """The directory that holds `path`."""
    return os.path.dirname(os.path.abspath(path))


_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_BAD_DIRECTORY = {
    errno.EROFS: "is on a read-only filesystem",
    errno.ENAMETOOLONG: "makes a file name too long",
    errno.EACCES: "is not writable (permission denied)",
    errno.EPERM: "is not writable (operation not permitted)",
}


@contextlib.contextmanager
def writing_into(directory: str, what: str, *, needs: str = "", hint: str = "") -> Iterator[None]:
    """Turn a failure to write `what` into `directory` for lack of space (`NoSpace`, saying
    what it `needs` where that is known) or permission (`InvalidDestination`) into an error
    naming both."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _NO_SPACE:
            raise FinalError(
                "NoSpace", f"{directory} has no room left for {what}{needs}; free some space{hint}"
            ) from None
        if exc.errno in _BAD_DIRECTORY:
            raise FinalError(
                "InvalidDestination", f"{directory}, where {what} goes, {_BAD_DIRECTORY[exc.errno]}"
            ) from None
        raise
