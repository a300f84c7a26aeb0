"""Kickstart files as diskflow builds them: %include resolved, then checked by pykickstart.

A relative `%include` path is relative to the directory of the file that includes it, so a
kickstart in git means the same thing wherever it is checked out (Anaconda would look in its own
working directory, pykickstart first in the caller's). The installer only receives the one
injected file, so builds inject the *flattened* text: every such %include replaced by the
included file's lines. Validation parses exactly that text, so what was checked is what is
installed, and every problem is reported at the file and line it came from.

An absolute path or a URL in %include names a file the installer reads itself (typically one a
%pre script writes to /tmp); it stays in the flattened text, with a warning that diskflow cannot
check it.

A kickstart from somewhere else (a queued build's bundle, unpacked into a scratch directory)
is read *confined* to a root: a local %include that resolves outside it is refused rather
than read, so a kickstart cannot make a worker read its own files into a build or an error.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import shlex
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from pykickstart.base import BaseHandler
from pykickstart.errors import KickstartError, KickstartVersionError, KickstartWarning
from pykickstart.parser import KickstartParser, PutBackIterator
from pykickstart.version import makeVersion, versionMap

from importer.errors import FinalError

# pykickstart puts its own line numbers (counted in the flattened text) into some messages;
# diskflow reports the original file and line instead.
_LINE_PHRASE = re.compile(r"\s+(?:on|at) line \d+")

# The root set by `confined()`, for flatten/validate calls that pass none themselves.
_ROOT: ContextVar[Path | None] = ContextVar("diskflow_kickstart_root", default=None)


@contextmanager
def confined(root: Path) -> Iterator[None]:
    """Within the block, flatten() and validate() read no file outside `root`.

    For callers that do not pass `root` themselves: the validate step reads an unpacked
    bundle through code that knows nothing of bundles. A context variable, so it holds for
    this thread (or task) only.
    """
    token = _ROOT.set(Path(root).resolve())
    try:
        yield
    finally:
        _ROOT.reset(token)


@dataclass(frozen=True)
class Location:
    """A line of a kickstart file (1-based)."""

    path: Path
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass(frozen=True)
class Diagnostic:
    """A problem found at a place in a kickstart file."""

    location: Location
    message: str

    def __str__(self) -> str:
        return f"{self.location}: {self.message}"


@dataclass(frozen=True)
class Flattened:
    """A kickstart with its local %include files inlined."""

    text: str
    origins: tuple[Location, ...]  # origins[i]: where line i + 1 of `text` came from
    files: tuple[Path, ...]  # the kickstart, then the files it includes, in order of first use
    notes: tuple[Diagnostic, ...]  # %include lines left for the installer

    def origin(self, line: int) -> Location:
        """Where a line of the flattened text (1-based, as pykickstart counts) came from."""
        if not self.origins:
            return Location(self.files[0], 1)
        return self.origins[min(max(line, 1), len(self.origins)) - 1]


@dataclass(frozen=True)
class Validation:
    """A kickstart that pykickstart accepted for `version`."""

    kickstart: Path
    version: str
    text: str  # the flattened kickstart: what a build injects
    files: tuple[Path, ...]  # the kickstart and every file it includes
    warnings: tuple[Diagnostic, ...]

    @property
    def digest(self) -> str:
        """sha256 (hex) of the flattened text, for the content-addressed build id."""
        return kickstart_digest(self.text)


def flatten(path: Path, root: Path | None = None) -> Flattened:
    """Inline every local %include of `path`, transitively; FinalError names file and line.

    With a `root` (or inside `confined(root)`), a file outside it is refused, not read.
    """
    if root is None:
        root = _ROOT.get()
    flattener = _Flattener(Path(root).resolve() if root is not None else None)
    path = Path(path)
    if flattener.root is not None and not path.resolve().is_relative_to(flattener.root):
        raise FinalError("InvalidKickstart", f"{path}: the kickstart is outside {flattener.root}")
    flattener.expand(path, (), None)
    return Flattened(
        text="".join(flattener.lines),
        origins=tuple(flattener.origins),
        files=tuple(flattener.files),
        notes=tuple(flattener.notes),
    )


def validate(path: Path, version: str, root: Path | None = None) -> Validation:
    """Flatten and parse `path` with pykickstart's `version` syntax; raise FinalError if invalid.

    Raises FinalError("InvalidTemplate") for a version pykickstart does not know, and
    FinalError("InvalidKickstart", "FILE:LINE: problem") for anything wrong in the kickstart or
    the files it includes. pykickstart's warnings come back in `Validation.warnings`.
    `root` confines the files read, as in flatten().
    Not thread-safe: the warnings filters and pykickstart's parser state are process-wide.
    """
    handler = _handler(version)
    flat = flatten(path, root)
    parser = _Parser(handler, followIncludes=False, errorsAreFatal=True)
    found = list(flat.notes)

    def record(message: Warning | str, *_: object) -> None:
        found.append(Diagnostic(flat.origin(parser.line), _clean(str(message))))

    with warnings.catch_warnings():
        # Only the kickstart's own problems are for users; pykickstart's deprecation notices
        # about its Python API would just be noise on a terminal or in a build log.
        warnings.simplefilter("ignore")
        warnings.simplefilter("always", KickstartWarning)
        warnings.showwarning = record
        try:
            parser.readKickstartFromString(flat.text)
        except KickstartError as e:
            line = e.lineno if e.lineno else parser.line
            problem = _clean(str(e.message)) or "cannot parse this line"
            raise FinalError("InvalidKickstart", f"{flat.origin(line)}: {problem}") from None
        except ValueError as e:  # shlex, for a line with unbalanced quotes
            raise FinalError("InvalidKickstart", f"{flat.origin(parser.line)}: {e}") from None
    return Validation(
        kickstart=Path(path),
        version=version,
        text=flat.text,
        files=flat.files,
        warnings=tuple(found),
    )


def included_files(path: Path) -> list[Path]:
    """Every local file `path` %includes, transitively, in order of first use.

    Lenient, for change detection: a missing or unreadable file is listed but not followed, and
    malformed %include lines are skipped, so a change that breaks a template still selects it.
    """
    path = Path(path)
    seen = {path.resolve()}
    found: list[Path] = []

    def walk(current: Path) -> None:
        try:
            text = current.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError):
            return
        for line in text.splitlines():
            try:
                target = _include_target(line)
            except ValueError:
                continue
            included = _local_include(current, target) if target else None
            if included is None or included.resolve() in seen:
                continue
            seen.add(included.resolve())
            found.append(included)
            walk(included)

    walk(path)
    return found


def kickstart_digest(flat_text: str) -> str:
    """sha256 (hex) of a flattened kickstart: the exact bytes a build injects."""
    return hashlib.sha256(flat_text.encode()).hexdigest()


class _Flattener:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root  # resolved; None: not confined
        self.lines: list[str] = []
        self.origins: list[Location] = []
        self.files: list[Path] = []
        self.notes: list[Diagnostic] = []

    def expand(self, path: Path, stack: tuple[Path, ...], at: Location | None) -> None:
        real = path.resolve()
        if real in stack:
            chain = " -> ".join(str(p) for p in (*stack[stack.index(real) :], real))
            raise FinalError("InvalidKickstart", f"{at}: %include cycle: {chain}")
        text = _read(path, at)
        if real not in {p.resolve() for p in self.files}:
            self.files.append(path)
        for number, line in enumerate(text.splitlines(keepends=True), start=1):
            here = Location(path, number)
            try:
                target = _include_target(line)
            except ValueError as e:
                raise FinalError("InvalidKickstart", f"{here}: {e}") from None
            included = _local_include(path, target, self.root, here) if target else None
            if included is not None:
                self.expand(included, (*stack, real), here)
                continue
            if target:
                self.notes.append(
                    Diagnostic(
                        here,
                        f"%include {target} is left for the installer to read; "
                        "diskflow cannot check its content",
                    )
                )
            # A file's last line may lack a line break; the next file must not continue it.
            self.lines.append(line if line.splitlines() != [line] else line + "\n")
            self.origins.append(here)


def _read(path: Path, at: Location | None) -> str:
    where = f"{at}: %include {path}" if at else str(path)
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise FinalError("InvalidKickstart", f"{where}: not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise FinalError("InvalidKickstart", f"{where}: cannot read: {e.strerror}") from None


def _include_target(line: str) -> str | None:
    """The file an `%include` line names, None for other lines; ValueError if malformed."""
    # The same test pykickstart's parser applies, in commands and inside sections alike.
    words = line.split()
    if not words or words[0] != "%include":
        return None
    args = shlex.split(line, comments=True)
    if len(args) < 2 or not args[1]:
        raise ValueError("%include needs a file name")
    return args[1]


def _local_include(
    including: Path, target: str, root: Path | None = None, at: Location | None = None
) -> Path | None:
    """The file in the repository an %include names, None if the installer must read it.

    With a (resolved) `root`, a file outside it is refused: FinalError names the line `at`.
    """
    if "://" in target or os.path.isabs(target):
        return None
    included = including.parent / target
    if root is not None and not included.resolve().is_relative_to(root):
        where = f"{at}: " if at else ""
        raise FinalError(
            "InvalidKickstart",
            f"{where}%include {target} is outside {root}: only files under it can be included",
        )
    return included


def _handler(version: str) -> BaseHandler:
    saved = sys.path[:]
    try:
        return makeVersion(version)
    except KickstartVersionError:
        close = difflib.get_close_matches(version.upper(), versionMap, n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(close)}?" if close else "versions look like RHEL9 or F44"
        raise FinalError(
            "InvalidTemplate", f"pykickstart does not know kickstart version {version!r}; {hint}"
        ) from None
    finally:
        # makeVersion appends pykickstart's handlers directory to sys.path on every call.
        sys.path[:] = saved


def _clean(message: str) -> str:
    return " ".join(_LINE_PHRASE.sub("", message).split())


class _Lines(PutBackIterator):
    """Counts the lines the parser has taken, so that a warning can name its line."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__(lines)
        self.number = 0

    def put(self, s: str) -> None:
        super().put(s)
        self.number -= 1

    def next(self) -> str:
        line = super().next()
        self.number += 1
        return line


class _Parser(KickstartParser):
    """pykickstart's parser, knowing which line it is on (errors carry a line, warnings don't)."""

    _lines: _Lines | None = None

    @property
    def line(self) -> int:
        return self._lines.number if self._lines else 0

    def readKickstartFromString(self, s: str, reset: bool = True) -> None:
        if reset:
            self._reset()
        self._lines = _Lines([*s.splitlines(keepends=True), ""])
        self._stateMachine(self._lines)
