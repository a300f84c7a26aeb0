"""Reading a guest's console and installer log as they grow, and spotting failures in them."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

# What Anaconda, the kernel and dnf print when an install has failed for good (lorax's
# livemedia-creator watches for most of these on Anaconda's log channel).
FAILURE_PATTERNS: dict[str, re.Pattern[str]] = {
    "traceback": re.compile(r"Traceback \(most recent call last\)"),
    "kernel panic": re.compile(r"Kernel panic"),
    "out of memory": re.compile(r"Out of memory:|oom-kill:"),
    "kernel oops": re.compile(r"Call Trace:"),
    "no space": re.compile(r"[Nn]o space left on device|insufficient disk space"),
    "scriptlet error": re.compile(
        r"Error in (?:PRE|POST|PREUN|POSTUN|PRETRANS|POSTTRANS)(?:IN)? scriptlet"
        r"|Error code -?\d+ running the kickstart script"
    ),
    "repository error": re.compile(
        r"Failed to download metadata|Error setting up (?:base )?repositor|"
        r"Cannot find a valid baseurl|Failed to fetch stage2|Unable to download|"
        r"Cannot download repomd\.xml|Error downloading packages"
    ),
    "installer error": re.compile(r"The following error occurred|Pane is dead"),
}

_ESCAPES = re.compile(r"\x1b(?:\[[0-9;?]*[ -/]*[@-~]|[@-Z\\-_])")
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


@dataclass(frozen=True)
class Line:
    source: str  # "console" or "installer"
    number: int
    text: str


class LogTail:
    """The complete new lines of a file another process appends to."""

    def __init__(self, path: Path, source: str) -> None:
        self.path = path
        self.source = source
        self._offset = 0
        self._inode: int | None = None
        self._partial = b""
        self._count = 0

    def read(self, *, final: bool = False) -> list[Line]:
        """Lines added since the last call; `final` also returns an unterminated last line."""
        try:
            with open(self.path, "rb") as f:
                inode = os.fstat(f.fileno()).st_ino
                rotated = self._inode is not None and inode != self._inode
                if inode != self._inode:
                    # virtlogd rotates the file at 2 MiB: the new one starts from nothing.
                    self._inode, self._offset = inode, 0
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        if rotated and self._partial:
            data = b"\n" + data  # the old file's unfinished last line ends with it
        *complete, self._partial = (self._partial + data).split(b"\n")
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
