"""Git repositories made by tests (for `diskflow ci` and change detection)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest


def use_test_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Commits work without any global git configuration, and ignore the machine's."""
    for role in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{role}_NAME", "diskflow tests")
        monkeypatch.setenv(f"GIT_{role}_EMAIL", "tests@diskflow.invalid")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", "/dev/null")
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")


def git(repo: Path, *args: str) -> str:
    """Run `git ARGS...` in `repo`; its output, stripped."""
    return subprocess.run(
        ["git", *args], cwd=repo, check=True, capture_output=True, text=True
    ).stdout.strip()


def commit(repo: Path, message: str = "change") -> str:
    """Commit everything in `repo`; the new commit's hash."""
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")
