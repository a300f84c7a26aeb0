"""Who owns a destination, and which temporary files still have an owner.

An import claims its destination for its whole run, so a second import into the same place is
refused (`DestinationBusy`) instead of both writing into one file:
- a block device: an `O_EXCL` descriptor, held open (the kernel refuses a second one, and a
  mount);
- a file: `flock` on a lock file beside it, `.NAME.diskflow-lock`, removed at the end;
- a directory (the archive content type): `flock` on the directory itself.

Temporary files (the partial image beside DEST, the scratch copy a conversion reads) are made
with `O_EXCL | O_NOFOLLOW` under a random name, so a planted symlink or a second import cannot
redirect the write, and each is `flock`ed by its owner while it lives. A process killed
outright (SIGKILL, the OOM killer) leaves its files behind, but its locks die with it: the
next import removes such files. A lock, unlike a pid, also tells the owner apart after pid
reuse (every pod's importer may be pid 1).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import secrets
import stat
import time
from collections.abc import Iterator

from importer.errors import FinalError

log = logging.getLogger("diskflow.importer")

SCRATCH_PREFIX = "diskflow-scratch-"
LOCK_NAME = "diskflow-lock"  # after the destination's prefix: .NAME.diskflow-lock
PARTIAL_SUFFIX = ".partial"
_LONGEST_NAME = 200  # of a destination kept as it is in its lock and partial files' names
# A file is created a moment before its owner locks it: a sweep leaves very young files alone.
_GRACE_SECONDS = 10.0


@contextlib.contextmanager
def claim_device(path: str) -> Iterator[int]:
    """Hold `path` (a block device) exclusively; yield the read-only descriptor."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise FinalError(
                "DestinationBusy",
                f"{path} is in use (mounted, or another import is writing it)",
            ) from None
        raise
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def claim_file(path: str) -> Iterator[None]:
    """Hold the lock of the file destination `path` (which need not exist yet)."""
    directory, prefix = partial_prefix(path)
    lock_path = os.path.join(directory, prefix + LOCK_NAME)
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise FinalError(
                "InvalidDestination", f"{lock_path} is a symbolic link; remove it"
            ) from None
        if not _try_lock(fd):
            os.close(fd)
            raise FinalError("DestinationBusy", f"another import is writing {path}")
        # The previous holder removes the lock file as it lets go: a lock taken on a file
        # that is no longer at lock_path locks nothing. Take the one that is there.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(lock_path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)
        os.close(fd)


@contextlib.contextmanager
def claim_directory(path: str) -> Iterator[None]:
    """Hold the lock of the directory `path` (an archive's destination)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if not _try_lock(fd):
            raise FinalError("DestinationBusy", f"another import is extracting into {path}")
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def owned_file(directory: str, prefix: str, suffix: str = "") -> Iterator[str]:
    """A new, empty file in `directory`, locked while the block runs; yield its path.

    The file is removed when the block fails. When it succeeds the caller has renamed it, or
    it is removed all the same (a scratch file).
    """
    # The name is known before the file exists, and the cleanup is in force from then on: a
    # SIGTERM (raised as an exception) just after os.open returns still removes the file.
    path, fd = "", -1
    try:
        while True:
            path = os.path.join(directory, f"{prefix}{secrets.token_hex(6)}{suffix}")
            try:
                fd = os.open(
                    path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
                )
                break
            except FileExistsError:
                path = ""  # someone else's
        fcntl.flock(fd, fcntl.LOCK_EX)  # new and unique: nobody else holds it, no wait
        yield path
    finally:
        if path:
            # Without fd, os.open may have failed (nothing to remove) or been cut short.
            with contextlib.suppress(FileNotFoundError if fd >= 0 else OSError):
                os.unlink(path)
        if fd >= 0:
            os.close(fd)


def sweep(directory: str, prefix: str, suffix: str = "") -> list[str]:
    """Remove files in `directory` named PREFIX...SUFFIX whose owner is gone; return them."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed  # a missing or unreadable directory fails later, with its own message
    for name in names:
        if name.startswith(prefix) and name.endswith(suffix) and _orphaned(directory, name):
            try:
                os.unlink(os.path.join(directory, name))
            except OSError:
                continue  # gone already, or not ours to remove after all (a sticky /tmp)
            removed.append(name)
            log.info("removed %s, left by an import that was killed", name)
    return removed


def partial_prefix(path: str) -> tuple[str, str]:
    """(directory, prefix) of the lock and partial files of the file destination `path`."""
    directory, name = os.path.split(os.path.abspath(path))
    if len(name) > _LONGEST_NAME:  # a name near NAME_MAX would leave no room for a suffix
        name = hashlib.sha256(name.encode(errors="surrogateescape")).hexdigest()[:32]
    return directory, f".{name}."


def _orphaned(directory: str, name: str) -> bool:
    """Whether `name` is a file an import of this user made and no live import holds."""
    # O_NONBLOCK: a FIFO planted under a matching name must not hang the import.
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(os.path.join(directory, name), flags)
    except OSError:
        return False  # a symlink, or gone already: not ours to remove
    try:
        st = os.fstat(fd)
        ours = stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()
        young = time.time() - st.st_mtime < _GRACE_SECONDS
        return ours and not young and _try_lock(fd)
    finally:
        os.close(fd)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
