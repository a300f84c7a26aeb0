"""Reading a guest's console and installer log as they grow, and spotting failures in them."""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

# What Anaconda, the kernel and dnf print when an install has failed for good (lorax's
# livemedia-creator watches for most of these on Anaconda's log channel). Only fatal
# messages: a guest under TCG often prints kernel warnings, hung-task and RCU-stall reports
# (each with a "Call Trace:"), and dnf/librepo print a line for every mirror they give up on
# before trying the next one; none of these ends an install.
FAILURE_PATTERNS: dict[str, re.Pattern[str]] = {
    "traceback": re.compile(r"Traceback \(most recent call last\)"),
    "kernel panic": re.compile(r"Kernel panic"),
    "out of memory": re.compile(r"Out of memory:|oom-kill:"),
    # A page fault or NULL dereference in the kernel, BUG(), and die()'s header: "Oops: 0002
    # [#1] SMP" (older kernels: "general protection fault: 0000 [#1] SMP" and the like).
    # Not "BUG: soft lockup", "INFO: task ... blocked", "rcu: INFO: ... stall" or "WARNING:".
    "kernel oops": re.compile(
        r"BUG: unable to handle|BUG: kernel NULL pointer dereference|kernel BUG at "
        r"|^(?:<\d+>)?(?:\[\s*\d+\.\d+\]\s*)?Oops: |: [0-9a-f]{4} \[#\d+\]"
    ),
    "no space": re.compile(r"[Nn]o space left on device|insufficient disk space"),
    "scriptlet error": re.compile(
        r"Error in (?:PRE|POST|PREUN|POSTUN|PRETRANS|POSTTRANS)(?:IN)? scriptlet"
        r"|Error code -?\d+ running the kickstart script"
    ),
    # dnf's errors once every mirror has failed ("Failed to download metadata for repo 'x'",
    # dnf5: "... for repository 'x'"; "Error downloading packages"), Anaconda's, and yum's.
    "repository error": re.compile(
        r"Failed to download metadata|Error setting up (?:base )?repositor|"
        r"Cannot find a valid baseurl|Failed to fetch stage2|Error downloading packages"
    ),
    "installer error": re.compile(r"The following error occurred|Pane is dead"),
}

# virtlogd keeps `max_backups` (default 3) rotated console files; look a little further.
MAX_BACKUPS = 10

_ESCAPES = re.compile(r"\x1b(?:\[[0-9;?]*[ -/]*[@-~]|[@-Z\\-_])")
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


@dataclass(frozen=True)
class Line:
    source: str  # "console" or "installer"
    number: int
    text: str


class LogTail:
    """The complete new lines of a file another process appends to, across virtlogd's rotation.

    virtlogd renames a full console file (2 MiB) to `<name>.0`, shifting older ones to `.1`,
    `.2`, and starts a new `<name>`. What reached the old file after the previous read is in
    the renamed file, so when the inode at `path` changes, `read` first finishes the old file
    (found among the numbered backups by its inode), then any whole files rotated after it,
    then reads the new one from its start.

    No file stays open between calls: each `read` opens what it needs and closes it before
    returning, so a caller that stops early (a failure, a timeout) leaks nothing and needs
    no `close()`. Only the inode and offset of the last file read are kept.
    """

    def __init__(self, path: Path, source: str) -> None:
        self.path = path
        self.source = source
        self._offset = 0
        self._inode: int | None = None
        self._partial = b""
        self._count = 0

    def read(self, *, final: bool = False) -> list[Line]:
        """Lines added since the last call; `final` also returns an unterminated last line."""
        with contextlib.ExitStack() as stack:
            files = self._unread(stack)
            data = self._partial
            for inode, f in files:
                if inode != self._inode:
                    # A rotated file's unfinished last line ends with it.
                    if data and not data.endswith(b"\n"):
                        data += b"\n"
                    self._inode, self._offset = inode, 0
                f.seek(self._offset)
                chunk = f.read()
                self._offset += len(chunk)
                data += chunk
        *complete, self._partial = data.split(b"\n")
        if final and self._partial:
            complete.append(self._partial)
            self._partial = b""
        lines = []
        for raw in complete:
            self._count += 1
            text = clean(raw.decode(errors="replace"))
            if text:
                lines.append(Line(self.source, self._count, text))
        return lines

    def _unread(self, stack: contextlib.ExitStack) -> list[tuple[int, BinaryIO]]:
        """The files with unread data, oldest first: the one read last time, while it still
        has data, then any rotated after it, then the current file (if there is one)."""
        current = _open(self.path, stack)
        if current and current[0] == self._inode:
            if os.fstat(current[1].fileno()).st_size < self._offset:
                # Truncated, or a new file that got the old one's inode number: start over.
                self._inode = None
            return [current]
        if self._inode is None:
            return [current] if current else []
        # Rotated (or being rotated: virtlogd renames before it creates the new file).
        backups: list[tuple[int, BinaryIO]] = []
        for number in range(MAX_BACKUPS):
            backup = _open(self.path.with_name(f"{self.path.name}.{number}"), stack)
            if backup is None:
                break
            backups.append(backup)
        inodes = [inode for inode, _ in backups]
        if self._inode not in inodes:
            # Rotated out of the backups too (several MiB between two reads): that part is
            # gone; carry on with the current file.
            return [current] if current else []
        newer = backups[: inodes.index(self._inode) + 1][::-1]
        seen = {current[0]} if current else set()
        files = []
        for inode, f in newer:  # a rotation during this scan can list a file twice
            if inode not in seen:
                seen.add(inode)
                files.append((inode, f))
        return files + ([current] if current else [])


def _open(path: Path, stack: contextlib.ExitStack) -> tuple[int, BinaryIO] | None:
    try:
        f = stack.enter_context(open(path, "rb"))  # noqa: SIM115 - the stack closes it
    except FileNotFoundError:
        return None
    return os.fstat(f.fileno()).st_ino, f


def clean(text: str) -> str:
    """A console line without terminal escapes, carriage-return redraws or control bytes."""
    text = _ESCAPES.sub("", text).rstrip("\r\n")
    text = text.rsplit("\r", 1)[-1]  # a progress redraw: the last state is what was shown
    return _CONTROLS.sub("", text).rstrip()


def failure_in(line: Line) -> str | None:
    """The name of the failure pattern `line` matches, if any."""
    for name, pattern in FAILURE_PATTERNS.items():
        if pattern.search(line.text):
            return name
    return None
