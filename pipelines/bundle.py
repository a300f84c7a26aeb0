"""A template's files as data, so a build queued on one machine can run on another.

A worker pod has no checkout of the git repository the kickstart lives in, so a queued
build carries the kickstart, its metadata and every file it %includes, keyed by their paths
relative to a common root. The worker writes them into a scratch directory and works from
there; error messages are mapped back to the submitter's paths.

A bundle is data from elsewhere: every name in it must land inside the scratch directory,
and the kickstart is read confined to it (`kickstart.confined`), so no %include can make the
worker read its own files. Installer media (iso, kernel, initrd) are not in the bundle: the
worker reads them where the metadata says, and only under the directories its
DISKFLOW_MEDIA_DIRS names (none by default, so a queued build with local media is refused
until the worker is given some).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from importer.errors import Failure, FinalError
from pipelines.kickstart import confined, included_files, read_text
from pipelines.template import MEDIA_DIRS_ENV, metadata_path


@dataclass(frozen=True)
class Bundle:
    origin: str  # the directory the relative paths below are relative to, on the submitter
    kickstart: str
    files: dict[str, str] = field(default_factory=dict)

    @property
    def media_base(self) -> Path:
        """Where the metadata's relative iso/kernel/initrd paths point on the submitter."""
        return Path(self.origin, self.kickstart).parent


def pack(kickstart: Path, root: Path | None = None) -> Bundle:
    """The kickstart, its metadata and its %includes, read now.

    `root` confines the %includes as in kickstart.flatten (default: the kickstart's git
    repository, else its directory); every file is read bounded, as the worker would.
    """
    kickstart = kickstart.resolve()
    paths = [kickstart, metadata_path(kickstart), *included_files(kickstart, root)]
    existing = [p.resolve() for p in paths if p.is_file()]
    common = Path(os.path.commonpath([p.parent for p in existing]))
    return Bundle(
        origin=str(common),
        kickstart=str(kickstart.relative_to(common)),
        files={
            str(p.relative_to(common)): read_text(p, reason="InvalidTemplate") for p in existing
        },
    )


def media_dirs(environ: Mapping[str, str] = os.environ) -> tuple[Path, ...]:
    """The directories a worker reads a queued build's installer media from (DISKFLOW_MEDIA_DIRS,
    colon-separated absolute paths; empty entries are skipped); none unless configured.

    FinalError("InvalidArgument") names the variable and the entry that is not absolute.
    """
    text = environ.get(MEDIA_DIRS_ENV, "")
    dirs = tuple(Path(entry) for entry in text.split(":") if entry)
    for entry in dirs:
        if not entry.is_absolute():
            # A relative one would mean whatever the worker's working directory is.
            raise FinalError(
                "InvalidArgument",
                f"{MEDIA_DIRS_ENV}={text!r}: {str(entry)!r} is not an absolute directory",
            )
    return dirs


@contextmanager
def unpacked(bundle: Bundle) -> Iterator[Path]:
    """The bundle written into a scratch directory; yields the kickstart's path there.

    Kickstarts flattened or validated inside read no file outside the scratch directory.
    Failures raised inside name the submitter's paths, not the scratch directory.
    """
    # Resolved: $TMPDIR may be behind a symlink, and names are checked against real paths.
    scratch = Path(tempfile.mkdtemp(prefix="diskflow-bundle-")).resolve()
    try:
        written: set[Path] = set()
        for name, text in bundle.files.items():
            target = _inside(scratch, name, bundle.origin)
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text)
            except (OSError, TypeError, UnicodeError) as e:  # "a" and "a/b"; not text
                why = e.strerror if isinstance(e, OSError) else "not text"
                raise FinalError(
                    "InvalidTemplate",
                    f"bundle from {bundle.origin}: cannot write file {name!r}: {why}",
                ) from None
            written.add(target)
        kickstart = _inside(scratch, bundle.kickstart, bundle.origin)
        if kickstart not in written:
            raise FinalError(
                "InvalidTemplate",
                f"bundle from {bundle.origin}: its kickstart {bundle.kickstart!r} is not "
                "among its files",
            )
        try:
            with confined(scratch):
                yield kickstart
        except Failure as e:
            e.message = e.message.replace(str(scratch), bundle.origin)
            e.args = (e.reason, e.message)
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _inside(scratch: Path, name: str, origin: str) -> Path:
    """Where a bundle's file `name` goes in `scratch` (resolved); FinalError if not a file there."""
    try:
        target = (scratch / name).resolve() if isinstance(name, str) and name else scratch
    except ValueError:  # a NUL in it
        target = scratch
    if target == scratch:  # "", ".", "a/..", not a string
        raise FinalError("InvalidTemplate", f"bundle from {origin}: {name!r} is not a file name")
    if not target.is_relative_to(scratch):
        raise FinalError(
            "InvalidTemplate", f"bundle from {origin}: file name {name!r} leaves its root"
        )
    return target
