"""CI support: which templates a git change affects, and a JUnit report of their builds.

Templates are the `*.ks` files directly in the kickstarts directory, each with its `.toml`;
shared fragments live in subdirectories. A template is affected by a change to its kickstart,
its metadata, any file it %includes (transitively), or a local iso, kernel or initrd its
metadata names.

The change is what HEAD's history adds since it forked from SINCE: `git diff SINCE...HEAD`,
from the merge base. For Jenkins' GIT_PREVIOUS_SUCCESSFUL_COMMIT (an ancestor of HEAD) that is
everything since the last good build; for a branch compared with `origin/main` it is the
branch's own changes, not main's newer ones (which the branch's checkout does not even have).
Uncommitted changes do not count: what is built and published is always a commit.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import tomllib
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from importer.errors import FinalError
from importer.outcome import EXIT_FINAL, EXIT_OK, EXIT_TRANSIENT
from pipelines.kickstart import included_files
from pipelines.template import metadata_path

MEDIA_KEYS = ("iso", "kernel", "initrd")

# Characters XML 1.0 cannot carry at all, not even as character references.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


@dataclass(frozen=True)
class Case:
    """One test case of a JUnit report: a template's build."""

    name: str
    seconds: float
    failure: str | None = None
    skipped: str | None = None
    output: str = ""
    transient: bool = False
    """The failure may pass if the build is run again (a TransientError)."""

    def __post_init__(self) -> None:
        if self.failure is not None and self.skipped is not None:
            raise ValueError(f"case {self.name!r}: a case fails or is skipped, not both")


def template_files(kickstarts_dir: Path) -> list[Path]:
    """The templates in a kickstarts directory: its `*.ks` files, sorted."""
    kickstarts_dir = Path(kickstarts_dir)
    if not kickstarts_dir.is_dir():
        raise FinalError("InvalidArgument", f"{kickstarts_dir}: no such directory")
    return sorted(p for p in kickstarts_dir.glob("*.ks") if p.is_file())


def no_templates(kickstarts_dir: Path) -> FinalError:
    """The failure of a kickstarts directory without a template: checking or building nothing
    is no success, the directory is most likely the wrong one."""
    return FinalError(
        "NoTemplates",
        f"{kickstarts_dir} holds no templates (no NAME.ks file directly in it): is --kickstarts "
        "the right directory?",
    )


def changed_templates(repo: Path, since: str, kickstarts_dir: Path) -> list[Path]:
    """The templates (paths under `kickstarts_dir`) that `git diff SINCE...HEAD` affects.

    Raises FinalError("InvalidArgument") when `repo` is not in a git repository or `since`
    names no commit, FinalError("NoTemplates") when the directory holds no template, and
    FinalError("GitFailed") when git itself fails.
    """
    top = _toplevel(Path(repo))
    base = _merge_base(top, _commit(top, since), since)
    diff = _git(top, "diff", "--name-only", "-z", "--no-renames", base, "HEAD", "--")
    changed = {(top / os.fsdecode(name)).resolve() for name in diff.split(b"\0") if name}
    templates = template_files(kickstarts_dir)
    if not templates:
        raise no_templates(kickstarts_dir)
    return [t for t in templates if changed & _dependencies(t)]


def exit_code(cases: list[Case]) -> int:
    """0 when no case failed; 75 (EX_TEMPFAIL, as `build`) when every failure was transient,
    so that CI can tell a retry apart from a fix; 1 when any failed for good."""
    failed = [case for case in cases if case.failure is not None]
    if not failed:
        return EXIT_OK
    return EXIT_TRANSIENT if all(case.transient for case in failed) else EXIT_FINAL


def write_junit(path: Path, suite: str, cases: list[Case]) -> None:
    """Write a JUnit XML report (as Jenkins' `junit` step reads it) of one test suite."""
    failures = sum(c.failure is not None for c in cases)
    skipped = sum(c.skipped is not None for c in cases)
    counts = {
        "tests": str(len(cases)),
        "failures": str(failures),
        "errors": "0",
        "skipped": str(skipped),
        "time": f"{sum(c.seconds for c in cases):.3f}",
    }
    root = ET.Element("testsuites", {"name": _xml(suite), **counts})
    testsuite = ET.SubElement(root, "testsuite", {"name": _xml(suite), **counts})
    for case in cases:
        element = ET.SubElement(
            testsuite,
            "testcase",
            {"classname": _xml(suite), "name": _xml(case.name), "time": f"{case.seconds:.3f}"},
        )
        if case.failure is not None:
            summary = case.failure.strip().splitlines()[0] if case.failure.strip() else ""
            failure = ET.SubElement(element, "failure", {"message": _xml(summary)})
            failure.text = _xml(case.failure)
        elif case.skipped is not None:
            ET.SubElement(element, "skipped", {"message": _xml(case.skipped)})
        if case.output:
            ET.SubElement(element, "system-out").text = _xml(case.output)
    tree = ET.ElementTree(root)
    ET.indent(tree)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written whole or not at all: Jenkins must not pick up half a report.
    with tempfile.NamedTemporaryFile("wb", dir=path.parent, delete=False) as tmp:
        tree.write(tmp, encoding="utf-8", xml_declaration=True)
    os.replace(tmp.name, path)


def _dependencies(template: Path) -> set[Path]:
    meta = metadata_path(template)
    files = [template, meta, *included_files(template), *_media_files(meta)]
    return {f.resolve() for f in files}


def _media_files(meta: Path) -> list[Path]:
    """Local installer media the metadata names; nothing if it cannot be read (a broken
    metadata file is the build's to report, and its own change already selects the template)."""
    try:
        install = tomllib.loads(meta.read_text()).get("install")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return []
    if not isinstance(install, dict):
        return []
    return [meta.parent / v for k in MEDIA_KEYS if isinstance(v := install.get(k), str)]


def _toplevel(repo: Path) -> Path:
    if not repo.is_dir():
        raise FinalError("InvalidArgument", f"{repo}: no such directory")
    result = _run(repo, "rev-parse", "--show-toplevel")
    if result.returncode != 0:
        raise FinalError("InvalidArgument", f"{repo} is not in a git repository: {_stderr(result)}")
    return Path(os.fsdecode(result.stdout.strip()))


def _commit(top: Path, ref: str) -> str:
    result = _run(top, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref}^{{commit}}")
    if result.returncode == 0:
        return result.stdout.decode().strip()
    hint = ""
    if _git(top, "rev-parse", "--is-shallow-repository").strip() == b"true":
        hint = " (the clone is shallow: fetch the full history, e.g. git fetch --unshallow)"
    raise FinalError("InvalidArgument", f"git ref {ref!r} does not name a commit in {top}{hint}")


def _merge_base(top: Path, commit: str, ref: str) -> str:
    result = _run(top, "merge-base", commit, "HEAD")
    if result.returncode == 1 and not result.stderr:
        raise FinalError("InvalidArgument", f"git ref {ref!r} shares no history with HEAD")
    if result.returncode != 0:
        raise FinalError("GitFailed", f"git merge-base {ref} HEAD failed: {_stderr(result)}")
    return result.stdout.decode().strip()


def _git(top: Path, *args: str) -> bytes:
    result = _run(top, *args)
    if result.returncode != 0:
        raise FinalError("GitFailed", f"git {' '.join(args)} failed: {_stderr(result)}")
    return result.stdout


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, check=False)
    except FileNotFoundError:
        raise FinalError("GitFailed", "git is not installed") from None


def _stderr(result: subprocess.CompletedProcess[bytes]) -> str:
    lines = result.stderr.decode(errors="replace").strip().splitlines()
    return lines[0] if lines else f"exit status {result.returncode}"


def _xml(text: str) -> str:
    """`text` without the characters XML 1.0 forbids (console logs have escape codes, NULs,
    undecodable bytes); each becomes a visible \\xNN or \\uNNNN."""
    return _NOT_XML.sub(
        lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", text
    )
