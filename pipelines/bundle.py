"""A template's files as data, so a build queued on one machine can run on another.

A worker pod has no checkout of the git repository the kickstart lives in, so a queued
build carries the kickstart, its metadata and every file it %includes, keyed by their paths
relative to a common root. The worker writes them into a scratch directory and works from
there; error messages are mapped back to the submitter's paths.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from importer.errors import FinalError, ImportFailure
from pipelines.kickstart import included_files
from pipelines.template import metadata_path


@dataclass(frozen=True)
class Bundle:
    origin: str  # the directory the relative paths below are relative to, on the submitter
    kickstart: str
    files: dict[str, str] = field(default_factory=dict)

    @property
    def media_base(self) -> Path:
        """Where the metadata's relative iso/kernel/initrd paths point on the submitter."""
        return Path(self.origin, self.kickstart).parent


def pack(kickstart: Path) -> Bundle:
    """The kickstart, its metadata and its %includes, read now."""
    kickstart = kickstart.resolve()
    paths = [kickstart, metadata_path(kickstart), *included_files(kickstart)]
    existing = [p.resolve() for p in paths if p.is_file()]
    root = Path(os.path.commonpath([p.parent for p in existing]))
    return Bundle(
        origin=str(root),
        kickstart=str(kickstart.relative_to(root)),
        files={str(p.relative_to(root)): p.read_text() for p in existing},
    )


@contextmanager
def unpacked(bundle: Bundle) -> Iterator[Path]:
    """The bundle written into a scratch directory; yields the kickstart's path there.

    Failures raised inside name the submitter's paths, not the scratch directory.
    """
    scratch = Path(tempfile.mkdtemp(prefix="diskflow-bundle-"))
    try:
        for name, text in bundle.files.items():
            target = (scratch / name).resolve()
            if not target.is_relative_to(scratch):
                raise FinalError("InvalidTemplate", f"bundle path {name!r} leaves its root")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        try:
            yield scratch / bundle.kickstart
        except ImportFailure as e:
            e.message = e.message.replace(str(scratch), bundle.origin)
            e.args = (e.reason, e.message)
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
