"""The `archive` content type (CDI's `contentType: archive`): a tar stream extracted into a
directory, refusing anything that could reach outside it.

tarfile only parses the headers, one at a time; every file, directory and link is made here,
relative to a directory file descriptor (openat-style) and with O_NOFOLLOW, so that a symbolic
link the archive made is never followed, however the links are chained. Members land in a
hidden staging directory inside the destination and are moved into place only after the whole
archive was read and its checksum verified; a failed import removes them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from typing import IO, NoReturn, TypeVar

from importer.buffers import AlignedBuffer
from importer.errors import FinalError
from importer.reasons import Reason
from importer.streams import Chunk, ChunkReader
from importer.target import fsync_directory, syncfs

T = TypeVar("T")
log = logging.getLogger("diskflow.importer")

STAGING_PREFIX = ".diskflow-extract-"
COPY_CHUNK = 1 << 20
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_USABLE_DIR = 0o700  # the owner must be able to list, enter and write a directory to fill it
_PARENT_MODE = 0o755  # directories the archive implies without a member of their own, as tar


def is_tar(head: bytes) -> bool:
    """True if `head` starts with a POSIX (ustar) or GNU tar header."""
    return head[257:262] == b"ustar"


def extract(
    chunks: Iterator[Chunk],
    directory: str,
    *,
    limit: int | None,
    verify: Callable[[], None],
    max_members: int,
) -> int:
    """Extract the tar stream into `directory`; return the bytes of file data extracted.

    The caller holds `directory` (importer.claims): a staging directory found in it was left
    by an import killed outright, and is removed first."""
    _remove_stale_staging(directory)
    staging = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=directory)
    try:
        root = os.open(staging, _DIR)
        try:
            extraction = _Extraction(root, limit=limit, max_members=max_members)
            extraction.run(ChunkReader(chunks))
        finally:
            os.close(root)
        for rest in chunks:  # what follows tar's end marker still counts for the checksum
            if isinstance(rest, AlignedBuffer):
                rest.release()
        syncfs(staging)  # every extracted file durable, in one call, before any is in place
        verify()
        _move_into_place(staging, directory)
    except BaseException:
        # Best effort: the import's own error (or SIGTERM) is what must reach the caller.
        with contextlib.suppress(OSError):
            _remove_tree(staging)
        raise
    _apply_late_modes(directory, extraction.late_modes)
    fsync_directory(directory)  # the renames into place
    return extraction.total


def _remove_stale_staging(directory: str) -> None:
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if name.startswith(STAGING_PREFIX) and not os.path.islink(path) and os.path.isdir(path):
            _remove_tree(path)
            log.info("removed %s, left by an import that was killed", path)


class _Extraction:
    """The members of one archive, made one by one under the directory descriptor `root`."""

    def __init__(self, root: int, *, limit: int | None, max_members: int) -> None:
        self.root = root
        self.limit = limit
        self.max_members = max_members
        self.total = 0
        self.count = 0
        # Directories whose mode would stop their own filling: set once everything is in place.
        self.late_modes: dict[str, int] = {}

    def run(self, reader: IO[bytes]) -> None:
        """Read the archive to its end marker, making each member as it comes."""
        try:
            with tarfile.open(fileobj=reader, mode="r|") as archive:
                while (member := archive.next()) is not None:
                    # tarfile keeps every header it read: memory would grow with the count.
                    archive.members = []
                    self._add(archive, member)
        except tarfile.TarError as exc:
            raise FinalError("InvalidArchive", f"the tar archive is corrupt: {exc}") from None

    def _add(self, archive: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        self.count += 1
        if self.count > self.max_members:
            raise FinalError(
                "ResourceLimit",
                f"the archive holds more than {self.max_members} members, the limit; allow more "
                "with --archive-max-members (ImportOptions.archive_max_members)",
            )
        parts = _parts(member.name)
        if member.isdir():
            self._directory(member, parts)
        elif not parts:
            _refuse(member.name, "is not a directory but names the destination itself")
        elif member.isreg():
            self._file(archive, member, parts)
        elif member.issym():
            self._symlink(member, parts)
        elif member.islnk():
            self._hardlink(member, parts)
        else:
            _refuse(member.name, "is a device node, FIFO or other special file")

    def _directory(self, member: tarfile.TarInfo, parts: list[str]) -> None:
        if not parts:  # "./": the destination itself, whose mode is not the archive's to set
            return
        path, mode = "/".join(parts), member.mode & 0o777
        usable = mode & _USABLE_DIR == _USABLE_DIR
        with _parent(self.root, parts, member.name) as parent:
            fd = _make_dir(parent, parts[-1])
            try:
                os.fchmod(fd, mode if usable else _USABLE_DIR)
            finally:
                os.close(fd)
        if usable:
            self.late_modes.pop(path, None)
        else:
            self.late_modes[path] = mode

    def _file(self, archive: tarfile.TarFile, member: tarfile.TarInfo, parts: list[str]) -> None:
        self.total += member.size
        if self.limit is not None and self.total > self.limit:
            raise FinalError(
                "ImageTooLarge",
                f"the archive holds more than the usable capacity of {self.limit} bytes "
                f"(stopped at member {member.name!r})",
            )
        source = archive.extractfile(member)
        assert source is not None  # a regular file always has a data stream
        with _parent(self.root, parts, member.name) as parent:
            fd = _create(
                lambda: os.open(parts[-1], _NEW_FILE, 0o600, dir_fd=parent),
                parent,
                parts[-1],
                member.name,
            )
            try:
                _copy(source, fd)
                os.fchmod(fd, member.mode & 0o777)  # after creating: the umask plays no part
                _set_mtime(lambda times: os.utime(fd, times), member.mtime)
            finally:
                os.close(fd)

    def _symlink(self, member: tarfile.TarInfo, parts: list[str]) -> None:
        _check_symlink_target(member.name, parts, member.linkname)
        with _parent(self.root, parts, member.name) as parent:
            _create(
                lambda: os.symlink(member.linkname, parts[-1], dir_fd=parent),
                parent,
                parts[-1],
                member.name,
            )
            _set_mtime(
                lambda times: os.utime(parts[-1], times, dir_fd=parent, follow_symlinks=False),
                member.mtime,
            )

    def _hardlink(self, member: tarfile.TarInfo, parts: list[str]) -> None:
        target = _hardlink_target(member.name, member.linkname)
        # Staging started empty: a regular file in it is one this archive made before.
        if not _is_regular_file(self.root, target):
            _refuse(
                member.name,
                f"is a hard link to {member.linkname!r}, which is not a regular file "
                "extracted before it",
            )
        if target == parts:  # a link to itself: already there
            return
        with (
            _parent(self.root, target, member.name) as source,
            _parent(self.root, parts, member.name) as parent,
        ):
            _create(
                lambda: os.link(
                    target[-1],
                    parts[-1],
                    src_dir_fd=source,
                    dst_dir_fd=parent,
                    follow_symlinks=False,
                ),
                parent,
                parts[-1],
                member.name,
            )


def _refuse(name: str, problem: str, reason: Reason = Reason.UNSAFE_ARCHIVE) -> NoReturn:
    raise FinalError(reason, f"archive member {name!r} {problem}")


def _parts(name: str) -> list[str]:
    """The path components of a member's name; refuses names that could leave the staging
    directory or be mistaken for it."""
    if name.startswith("/"):
        _refuse(name, "has an absolute path")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        _refuse(name, "has a '..' component")
    if parts and parts[0].startswith(STAGING_PREFIX):
        _refuse(name, f"starts with {STAGING_PREFIX!r}, the name of diskflow's staging directory")
    return parts


def _check_symlink_target(name: str, parts: list[str], target: str) -> None:
    """Refuse a symbolic link that is absolute or climbs out of the destination.

    '..' is resolved lexically from the link's directory, which is a real directory (nothing
    is ever made through a link). A '..' after a name is refused: the name may be another link
    (`a -> .`, then `b -> a/..`), and a lexical resolution would miss where that leads.
    """
    if not target:
        _refuse(name, "is a symbolic link with an empty target", Reason.INVALID_ARCHIVE)
    if target.startswith("/"):
        _refuse(name, f"is a symbolic link to an absolute path ({target!r})")
    depth = len(parts) - 1  # directories between the destination and the link
    named = False
    for part in target.split("/"):
        if part == "..":
            if named:
                _refuse(name, f"is a symbolic link to {target!r}, with a '..' after a name")
            depth -= 1
            if depth < 0:
                _refuse(name, f"is a symbolic link pointing outside the destination ({target!r})")
        elif part not in ("", "."):
            named = True


def _hardlink_target(name: str, target: str) -> list[str]:
    """A hard link's target (named from the archive's top), '..' resolved lexically."""
    if target.startswith("/"):
        _refuse(name, f"is a hard link to an absolute path ({target!r})")
    resolved: list[str] = []
    for part in target.split("/"):
        if part == "..":
            if not resolved:
                _refuse(name, f"is a hard link pointing outside the destination ({target!r})")
            resolved.pop()
        elif part not in ("", "."):
            resolved.append(part)
    return resolved


@contextlib.contextmanager
def _parent(root: int, parts: list[str], name: str) -> Iterator[int]:
    """A descriptor of the directory holding `parts[-1]`, open for the `with` block."""
    if len(parts) == 1:  # most members of a flat archive: no descriptor to open
        yield root
        return
    fd = _open_dirs(root, parts[:-1], name)
    try:
        yield fd
    finally:
        os.close(fd)


def _open_dirs(root: int, parts: list[str], name: str) -> int:
    """A new descriptor of `root`/`parts`, making the missing directories as tar does; never
    through a symbolic link."""
    fd = os.dup(root)
    try:
        for depth, part in enumerate(parts):
            try:
                child = _open_or_make_dir(fd, part)
            except NotADirectoryError:  # what O_DIRECTORY | O_NOFOLLOW says of a link, too
                _not_a_directory(fd, part, name, "/".join(parts[: depth + 1]))
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _is_regular_file(root: int, parts: list[str]) -> bool:
    """Whether `root`/`parts` is a regular file, reached through directories only."""
    if not parts:
        return False
    fd = os.dup(root)
    try:
        for part in parts[:-1]:
            child = os.open(part, _DIR, dir_fd=fd)
            os.close(fd)
            fd = child
        return stat.S_ISREG(os.stat(parts[-1], dir_fd=fd, follow_symlinks=False).st_mode)
    except OSError:  # missing, or a symbolic link on the way (O_NOFOLLOW)
        return False
    finally:
        os.close(fd)


def _open_or_make_dir(parent: int, part: str) -> int:
    try:
        return os.open(part, _DIR, dir_fd=parent)
    except FileNotFoundError:
        pass
    os.mkdir(part, _USABLE_DIR, dir_fd=parent)
    fd = os.open(part, _DIR, dir_fd=parent)
    os.fchmod(fd, _PARENT_MODE)
    return fd


def _not_a_directory(parent: int, part: str, name: str, path: str) -> NoReturn:
    if stat.S_ISLNK(os.stat(part, dir_fd=parent, follow_symlinks=False).st_mode):
        _refuse(name, f"would be written through the symbolic link {path!r}")
    _refuse(name, f"needs {path!r} to be a directory, but it is a file", Reason.INVALID_ARCHIVE)


def _make_dir(parent: int, leaf: str) -> int:
    """A descriptor of the directory `leaf`, made unless an earlier member made it."""
    try:
        return os.open(leaf, _DIR, dir_fd=parent)  # archives repeat directories often
    except FileNotFoundError:
        pass
    except NotADirectoryError:  # a file or link: the later member replaces it, as in tar
        os.unlink(leaf, dir_fd=parent)
    os.mkdir(leaf, _USABLE_DIR, dir_fd=parent)
    return os.open(leaf, _DIR, dir_fd=parent)


def _create(make: Callable[[], T], parent: int, leaf: str, name: str) -> T:
    """`make()`, first removing what an earlier member of the same name made (tar's rule: the
    later member wins), except a directory."""
    try:
        return make()
    except FileExistsError:
        if _is_dir(parent, leaf):
            _refuse(
                name, "would replace a directory an earlier member made", Reason.INVALID_ARCHIVE
            )
        os.unlink(leaf, dir_fd=parent)
        return make()


def _is_dir(parent: int, leaf: str) -> bool:
    return stat.S_ISDIR(os.stat(leaf, dir_fd=parent, follow_symlinks=False).st_mode)


def _copy(source: IO[bytes], fd: int) -> None:
    while data := source.read(COPY_CHUNK):
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]


def _set_mtime(apply: Callable[[tuple[float, float]], None], mtime: float) -> None:
    # A timestamp the system cannot represent is not worth failing the import for.
    with contextlib.suppress(OverflowError, ValueError):
        apply((mtime, mtime))


def _move_into_place(staging: str, directory: str) -> None:
    for name in os.listdir(staging):
        if os.path.lexists(os.path.join(directory, name)):
            raise FinalError("InvalidDestination", f"{directory} already holds {name!r}")
    for name in os.listdir(staging):
        os.replace(os.path.join(staging, name), os.path.join(directory, name))
    os.rmdir(staging)


def _apply_late_modes(directory: str, modes: dict[str, int]) -> None:
    """Give directories the restrictive modes the archive asked for, deepest first (a parent
    that cannot be entered would hide its children)."""
    # The destination itself may be a symbolic link (the user's to make); nothing below it.
    root = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for path, mode in sorted(modes.items(), key=lambda item: -item[0].count("/")):
            fd = _open_dirs(root, path.split("/"), path)
            try:
                os.fchmod(fd, mode)
            finally:
                os.close(fd)
    finally:
        os.close(root)


def _remove_tree(path: str) -> None:
    """Remove the directory `path` and everything in it, without recursion and holding one
    directory descriptor at a time: any depth the archive made can be removed."""
    fd = os.open(path, _DIR)
    try:
        # Per level entered: that directory's name, and its subdirectories still to remove.
        levels = [(os.path.basename(path), _unlink_all_but_dirs(fd))]
        while levels:
            name, subdirs = levels[-1]
            if subdirs:
                child = subdirs.pop()
                fd = _step(fd, os.open(child, _DIR, dir_fd=fd))
                levels.append((child, _unlink_all_but_dirs(fd)))
            else:
                levels.pop()
                # ".." is the real parent: every step down was O_NOFOLLOW.
                fd = _step(fd, os.open("..", _DIR, dir_fd=fd))
                os.rmdir(name, dir_fd=fd)
    finally:
        os.close(fd)


def _step(old: int, new: int) -> int:
    os.close(old)
    return new


def _unlink_all_but_dirs(fd: int) -> list[str]:
    """Remove every entry of the directory `fd` but its subdirectories; return their names."""
    subdirs = []
    with os.scandir(fd) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                subdirs.append(entry.name)
            else:
                os.unlink(entry.name, dir_fd=fd)
    return subdirs
