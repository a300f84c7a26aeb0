"""Kickstart files as diskflow builds them: %include resolved, then checked by pykickstart.

A relative `%include` path is relative to the directory of the file that includes it, so a
kickstart in git means the same thing wherever it is checked out (Anaconda would look in its own
working directory, pykickstart first in the caller's). The installer only receives the one
injected file, so builds inject the *flattened* text: every such %include replaced by the
included file's lines. Validation parses exactly that text, so what was checked is what is
installed, and every problem is reported at the file and line it came from.

Every read is *confined* to a root, the template tree: the one given (`root=`, `--root DIR`,
`BuildRequest.kickstart_root`), else the one set by `confined()` (a queued build's unpacked
bundle), else `default_root()`: the kickstart's git repository (the nearest directory above it
holding a `.git`), else the kickstart's own directory. An %include that resolves outside it,
through `..` or a symlink, is refused unread, so a kickstart in a pull request cannot pull a
CI runner's or a worker's files into a build, an error message or the installer.

Only regular files are read (a FIFO, device or directory is refused without waiting on it), at
most MAX_FILE_BYTES each and MAX_TOTAL_BYTES in all (a file counts once per %include of it),
nested at most MAX_DEPTH deep. An error or warning located in an included file names the file,
the line and the problem, but not the line's words: the file may not be a kickstart at all
(a token, a password line), and the message ends up in CI logs.

An absolute path in %include names a file the installer reads itself, which a %pre script
writes (the generated-partitioning pattern: `%include /tmp/part-include`). It stays in the
flattened text, and is accepted only when a %pre section of the kickstart mentions the path;
without one it is an error, since the installer would stop on a missing file. No warning is
given for it: the %pre that creates it is checked like the rest. A URL in %include stays too,
with a warning that diskflow cannot check its content.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import os
import re
import shlex
import stat
import sys
import warnings
from collections.abc import Iterable, Iterator
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

MAX_FILE_BYTES = 1 << 20  # one kickstart file, or one file it includes
MAX_TOTAL_BYTES = 4 << 20  # all of them together, a file counted once per %include of it
MAX_DEPTH = 32  # %include within %include

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


def default_root(path: Path) -> Path:
    """The tree `path` may %include from unless told otherwise (resolved): its git repository's
    top (the nearest directory above it holding a `.git`, directory or file), else its own
    directory.

    git itself is not run: the answer must not hang on git's configuration (safe.directory)
    or on whether git is installed.
    """
    start = Path(path).resolve().parent
    for directory in (start, *start.parents):
        if os.path.lexists(directory / ".git"):
            return directory
    return start


def flatten(path: Path, root: Path | None = None) -> Flattened:
    """Inline every local %include of `path`, transitively; FinalError names file and line.

    Files are read confined to `root`, else to the `confined()` root, else to
    default_root(path): a file outside it is refused, not read.
    """
    path = Path(path)
    flattener = _Flattener(_root(path, root))
    if not path.resolve().is_relative_to(flattener.root):
        raise FinalError("InvalidKickstart", f"{path}: the kickstart is outside {flattener.root}")
    flattener.expand(path, (), None)
    flattener.check_absolute()
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
    `root` confines the files read, as in flatten(). A problem in an included file is told
    without the words of its line.
    Not thread-safe: the warnings filters and pykickstart's parser state are process-wide.
    """
    handler = _handler(version)
    flat = flatten(path, root)
    parser = _Parser(handler, followIncludes=False, errorsAreFatal=True)
    found = list(flat.notes)
    lines = flat.text.splitlines()
    # Names pykickstart itself defines: saying them gives nothing of an included file away.
    vocabulary = {*handler.commands, *getattr(parser, "_sections", {}), "%end", "%include"}

    def problem(line: int, message: str) -> str:
        message = _clean(message)
        if flat.origin(line).path == flat.files[0] or not lines:
            return message  # the file the user named: its text is theirs to see
        text = lines[min(max(line, 1), len(lines)) - 1]
        return _redact(message, text, vocabulary)

    def record(message: Warning | str, *_: object) -> None:
        found.append(Diagnostic(flat.origin(parser.line), problem(parser.line, str(message))))

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
            said = problem(line, str(e.message)) or "cannot parse this line"
            raise FinalError("InvalidKickstart", f"{flat.origin(line)}: {said}") from None
        except ValueError as e:  # shlex, for a line with unbalanced quotes
            said = problem(parser.line, str(e))
            raise FinalError("InvalidKickstart", f"{flat.origin(parser.line)}: {said}") from None
    return Validation(
        kickstart=Path(path),
        version=version,
        text=flat.text,
        files=flat.files,
        warnings=tuple(found),
    )


def included_files(path: Path, root: Path | None = None) -> list[Path]:
    """Every local file `path` %includes, transitively, in order of first use.

    Lenient, for change detection and packing: a missing, unreadable, non-regular or too large
    file is listed but not followed, and malformed %include lines are skipped, so a change that
    breaks a template still selects it. Confined as flatten() is: a file outside the root is
    neither listed nor read, and at most MAX_TOTAL_BYTES are read in all.
    """
    path = Path(path)
    top = _root(path, root)
    seen = {path.resolve()}
    found: list[Path] = []
    budget = MAX_TOTAL_BYTES

    def walk(current: Path, depth: int) -> None:
        nonlocal budget
        real = current.resolve()
        if depth > MAX_DEPTH or not real.is_relative_to(top):
            return
        try:
            data = _read_regular(real, str(current), min(MAX_FILE_BYTES, budget))
            text = _decode(data, str(current))
        except FinalError:
            return
        budget -= len(data)
        for line in text.splitlines():
            try:
                target = _include_target(line)
            except ValueError:
                continue
            if not target or "://" in target or os.path.isabs(target):
                continue
            included = current.parent / target
            if included.resolve() in seen or not included.resolve().is_relative_to(top):
                continue
            seen.add(included.resolve())
            found.append(included)
            walk(included, depth + 1)

    walk(path, 0)
    return found


def read_text(path: Path, limit: int = MAX_FILE_BYTES, reason: str = "InvalidKickstart") -> str:
    """The text of the regular file `path`, as flatten() reads it: at most `limit` bytes of
    UTF-8; FinalError(reason) naming the file otherwise. Not confined: callers check that."""
    path = Path(path)
    return _decode(_read_regular(path.resolve(), str(path), limit, reason), str(path), reason)


def kickstart_digest(flat_text: str) -> str:
    """sha256 (hex) of a flattened kickstart: the exact bytes a build injects."""
    return hashlib.sha256(flat_text.encode()).hexdigest()


def _root(path: Path, root: Path | None) -> Path:
    """The (resolved) root that reads for kickstart `path` are confined to."""
    context = _ROOT.get()
    if root is None:
        return context if context is not None else default_root(path)
    chosen = Path(root).resolve()
    if context is not None and not chosen.is_relative_to(context):
        # A root given inside confined() (one from a queued request, say) narrows it, never
        # widens it.
        raise FinalError(
            "InvalidKickstart", f"the root {root} is outside {context}, the files' own tree"
        )
    return chosen


class _Flattener:
    def __init__(self, root: Path) -> None:
        self.root = root  # resolved
        self.lines: list[str] = []
        self.origins: list[Location] = []
        self.files: list[Path] = []
        self.notes: list[Diagnostic] = []
        self.total = 0  # bytes read, a file counted once per %include of it
        self.absolute: list[tuple[Location, str]] = []  # %include lines of installer paths

    def expand(self, path: Path, stack: tuple[Path, ...], at: Location | None) -> None:
        real = path.resolve()
        if real in stack:
            chain = " -> ".join(str(p) for p in (*stack[stack.index(real) :], real))
            raise FinalError("InvalidKickstart", f"{at}: %include cycle: {chain}")
        where = f"{at}: %include {path}" if at else str(path)
        if len(stack) > MAX_DEPTH:
            raise FinalError(
                "InvalidKickstart", f"{where}: %include nested more than {MAX_DEPTH} deep"
            )
        data = _read_regular(real, where, MAX_FILE_BYTES)
        # Counted per %include, not per file: a file included twice is in the text twice, and
        # includes that fan out at every level would otherwise multiply the work unchecked.
        self.total += len(data)
        if self.total > MAX_TOTAL_BYTES:
            raise FinalError(
                "InvalidKickstart",
                f"{where}: the kickstart and its includes come to more than "
                f"{_size(MAX_TOTAL_BYTES)} (the limit; a file counts once per %include of it)",
            )
        text = _decode(data, where)
        if real not in {p.resolve() for p in self.files}:
            self.files.append(path)
        for number, line in enumerate(text.splitlines(keepends=True), start=1):
            here = Location(path, number)
            try:
                target = _include_target(line)
            except ValueError as e:
                raise FinalError("InvalidKickstart", f"{here}: {e}") from None
            if target and "://" in target:
                self.notes.append(
                    Diagnostic(
                        here,
                        f"%include {target} is left for the installer to read; "
                        "diskflow cannot check its content",
                    )
                )
            elif target and os.path.isabs(target):
                self.absolute.append((here, target))  # checked once every %pre is known
            elif target:
                self.expand(self.local(path, target, here), (*stack, real), here)
                continue
            # A file's last line may lack a line break; the next file must not continue it.
            self.lines.append(line if line.splitlines() != [line] else line + "\n")
            self.origins.append(here)

    def local(self, including: Path, target: str, at: Location) -> Path:
        """The file a relative %include names; FinalError if it resolves outside the root."""
        included = including.parent / target
        if not included.resolve().is_relative_to(self.root):
            raise FinalError(
                "InvalidKickstart",
                f"{at}: %include {target} is outside {self.root}: only files under it can be "
                "included",
            )
        return included

    def check_absolute(self) -> None:
        """Refuse an absolute %include that no %pre section of the kickstart writes."""
        if not self.absolute:
            return
        scripts = _pre_scripts(self.lines)
        for here, target in self.absolute:
            if not re.search(rf"(?<![\w./-]){re.escape(target)}(?![\w./-])", scripts):
                raise FinalError(
                    "InvalidKickstart",
                    f"{here}: %include {target}: the installer reads an absolute path itself, "
                    f"so a %pre section of the kickstart must create it, and none mentions "
                    f"{target}",
                )


def _pre_scripts(lines: Iterable[str]) -> str:
    """The bodies of the %pre sections among flattened kickstart lines, %include lines left out
    (an %include inside a %pre does not create its file)."""
    body: list[str] = []
    inside = False
    for line in lines:
        first = line.split()[0] if line.split() else ""
        if inside and first == "%end":
            inside = False
        elif inside and first != "%include":
            body.append(line)
        elif not inside and first == "%pre":
            inside = True
    return "".join(body)


def _read_regular(real: Path, where: str, limit: int, reason: str = "InvalidKickstart") -> bytes:
    """The bytes of `real` (a resolved path) if it is a regular file of at most `limit` bytes;
    FinalError(reason) starting with `where` otherwise."""
    try:
        # A FIFO or device is refused before it is opened at all (opening one may block or
        # act)...
        _check_regular(os.stat(real), where, limit, reason)
        # ...and what is opened is checked again, as it may have been swapped meanwhile:
        # non-blocking, so that even a FIFO slipped in cannot hang the open, and never
        # through a symlink put in place of the (resolved, checked) name.
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC
        fd = os.open(real, flags)
    except OSError as e:
        raise FinalError(reason, f"{where}: cannot read: {e.strerror}") from None
    try:
        _check_regular(os.fstat(fd), where, limit, reason)
        data = bytearray()
        while len(data) <= limit:  # one byte more than allowed tells a file grown since
            chunk = os.read(fd, limit + 1 - len(data))
            if not chunk:
                break
            data += chunk
    except OSError as e:
        raise FinalError(reason, f"{where}: cannot read: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise _too_large(where, f"more than {limit}", limit, reason)
    return bytes(data)


def _check_regular(info: os.stat_result, where: str, limit: int, reason: str) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise FinalError(
            reason, f"{where}: is {_kind(info.st_mode)}, not a regular file: it is not read"
        )
    if info.st_size > limit:
        raise _too_large(where, str(info.st_size), limit, reason)


def _too_large(where: str, size: str, limit: int, reason: str) -> FinalError:
    return FinalError(
        reason, f"{where}: is {size} bytes, over the limit of {_size(limit)} for one file"
    )


def _kind(mode: int) -> str:
    kinds = {
        stat.S_ISDIR: "a directory",
        stat.S_ISFIFO: "a FIFO",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
        stat.S_ISSOCK: "a socket",
    }
    return next((name for test, name in kinds.items() if test(mode)), "a special file")


def _size(limit: int) -> str:
    return f"{limit >> 20} MiB" if limit >= 1 << 20 and limit % (1 << 20) == 0 else f"{limit} bytes"


def _decode(data: bytes, where: str, reason: str = "InvalidKickstart") -> str:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise FinalError(reason, f"{where}: not UTF-8 text ({e.reason})") from None
    # Universal newlines, as the text-mode reads before did: the same file, the same digest.
    return text.replace("\r\n", "\n").replace("\r", "\n")


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


# Where a line's words end, besides whitespace: pykickstart quotes option values on their own.
_WORD_BREAK = re.compile(r"[\s=,;:'\"()\[\]{}<>]+")


def _redact(message: str, line: str, vocabulary: set[str]) -> str:
    """`message` without the words of `line` (pykickstart's own names stay), or, if some of
    them cannot be taken out cleanly, a message that says nothing of the line."""
    words = {*line.split(), *_WORD_BREAK.split(line)}
    with contextlib.suppress(ValueError):
        words.update(shlex.split(line))  # values as pykickstart sees them, unquoted
    words = {w for w in words if w and w not in vocabulary}
    shown = message
    for word in sorted(words, key=len, reverse=True):
        shown = re.sub(rf"(?<![\w-]){re.escape(word)}(?![\w-])", "…", shown)
    # A word pykickstart quoted inside another one (changed case, a prefix): say nothing.
    if any(len(w) >= 3 and w.lower() in shown.lower() for w in words):
        return "pykickstart cannot accept this line (its text is not shown: an included file's)"
    return shown if shown == message else f"{shown} (the line's words are not shown)"


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
