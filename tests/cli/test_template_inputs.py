"""The template commands given plain inputs as CI jobs give them: a directory that holds no
template, a change that touches none, builds that fail only for now."""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.support.installer")
pytest_plugins = ["tests.support.installer"]

from tests.support.commands import diskflow  # noqa: E402
from tests.support.git import commit, git, use_test_identity  # noqa: E402
from tests.support.installer import Installer, write_template  # noqa: E402

# libvirt at a socket that does not exist: every install fails, transiently (LibvirtUnreachable).
NOWHERE = "qemu+unix:///session?socket=/nonexistent/libvirt-sock"


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty git repository with a kickstarts directory (holding only a README) committed."""
    use_test_identity(monkeypatch)
    repo = tmp_path / "repo"
    (repo / "kickstarts").mkdir(parents=True)
    (repo / "kickstarts" / "README.md").write_text("templates go here\n")
    git(repo, "init", "-q")
    commit(repo)
    return repo


def no_templates(done: subprocess.CompletedProcess[str], directory: str) -> None:
    assert done.returncode == 1, done.stderr
    assert f"{directory} holds no templates" in done.stderr, done.stderr
    assert "[NoTemplates]" in done.stderr and done.stdout == ""


def test_validate_of_a_directory_without_templates_fails_naming_it(repo: Path) -> None:
    no_templates(diskflow("validate", "--kickstarts", "kickstarts", cwd=repo), "kickstarts")
    # A directory that is not there at all is a typo on the command line: a usage error.
    done = diskflow("validate", "--kickstarts", "kickstart", cwd=repo)
    assert done.returncode == 2 and "kickstart: no such directory" in done.stderr


def test_ci_changed_and_build_of_a_directory_without_templates_fail_naming_it(
    repo: Path,
) -> None:
    no_templates(diskflow("ci", "changed", "--since", "HEAD", cwd=repo), "kickstarts")
    done = diskflow("ci", "build", "--since", "HEAD", "--progress", "none", cwd=repo)
    no_templates(done, "kickstarts")
    for command in ("changed", "build"):  # a typo on the command line: a usage error
        done = diskflow("ci", command, "--since", "HEAD", "--kickstarts", "kickstart", cwd=repo)
        assert done.returncode == 2 and "kickstart: no such directory" in done.stderr


def test_ci_changed_counts_on_stderr_and_lists_on_stdout(
    repo: Path, minimal_installer: Installer
) -> None:
    base = commit_template(repo, minimal_installer, "alpha")
    nothing = diskflow("ci", "changed", "--since", "HEAD", cwd=repo)
    assert nothing.returncode == 0, nothing.stderr
    assert nothing.stdout == "" and nothing.stderr.strip() == "0 templates changed"
    one = diskflow("ci", "changed", "--since", base, cwd=repo)
    assert one.returncode == 0, one.stderr
    assert one.stdout.split() == ["kickstarts/alpha.ks"]
    assert one.stderr.strip() == "1 template changed"


def commit_template(repo: Path, installer: Installer, name: str, **kwargs: str) -> str:
    """Commit the template NAME; return the commit before it."""
    base = git(repo, "rev-parse", "HEAD")
    write_template(repo / "kickstarts", installer, name, **kwargs)
    commit(repo)
    return base


def ci_build(repo: Path, since: str, junit: Path) -> subprocess.CompletedProcess[str]:
    return diskflow(
        "ci", "build", "--since", since, "--junit", junit, "--connect", NOWHERE, "--accel",
        "tcg", "--network", "none", "--progress", "none", cwd=repo,
    )  # fmt: skip


def failures(junit: Path) -> dict[str, str]:
    """The failure text of each failed case of the report, by template."""
    found = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        failure = case.find("failure")
        if failure is not None:
            found[case.get("name", "")] = failure.text or ""
    return found


def test_ci_build_exits_75_when_every_failure_was_transient_and_1_when_one_was_final(
    repo: Path, minimal_installer: Installer, tmp_path: Path
) -> None:
    base = git(repo, "rev-parse", "HEAD")
    for name in ("alpha", "beta"):
        write_template(repo / "kickstarts", minimal_installer, name)
    commit(repo)
    junit = tmp_path / "junit.xml"
    done = ci_build(repo, base, junit)
    assert done.returncode == 75, done.stderr
    assert "error: 2 template(s), 2 failed" in done.stderr
    failed = failures(junit)
    assert set(failed) == {"alpha", "beta"}
    assert all("[LibvirtUnreachable]" in text for text in failed.values())

    # One more that fails for good (its kickstart does not validate): no retry mends the run.
    commit_template(repo, minimal_installer, "gamma", extra="part / --size=lots")
    done = ci_build(repo, base, junit)
    assert done.returncode == 1, done.stderr
    assert "error: 3 template(s), 3 failed" in done.stderr
    assert "[InvalidKickstart]" in failures(junit)["gamma"]
