"""`ci changed` against real git repositories, and the JUnit report."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from importer.errors import FinalError
from pipelines.ci import Case, changed_templates, template_files, write_junit
from tests.support.git import commit, git, use_test_identity

META = """\
[template]
version = "{version}"
os_variant = "linux2022"
disk_size = "10Gi"
memory = "2Gi"

[install]
{install}
"""


@pytest.fixture(autouse=True)
def git_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    use_test_identity(monkeypatch)


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """Four templates: two share common/base.ks (which includes common/disk.ks), one has its
    own include, one installs from an ISO kept in the repository."""
    repo = tmp_path / "repo"
    ks = repo / "kickstarts"
    tree = 'location = "https://mirror.example/os/"'
    for name in ("centos", "alma"):
        write(ks / f"{name}.ks", "text\n%include common/base.ks\n")
        write(ks / f"{name}.toml", META.format(version="RHEL9", install=tree))
    write(ks / "common" / "base.ks", "rootpw --lock\n%include disk.ks\n")
    write(ks / "common" / "disk.ks", "zerombr\n")
    write(ks / "fedora.ks", "text\n%include fedora/extra.ks\n")
    write(ks / "fedora" / "extra.ks", "rootpw --lock\n")
    write(ks / "fedora.toml", META.format(version="F44", install=tree))
    write(ks / "offline.ks", "text\n")
    write(ks / "offline.toml", META.format(version="RHEL9", install='iso = "media/boot.iso"'))
    write(ks / "media" / "boot.iso", "ISO 1\n")
    write(repo / "README.md", "templates\n")
    git(repo, "init", "-q", "-b", "main")
    commit(repo, "templates")
    return repo


def changed(repo: Path, since: str = "HEAD~1") -> list[str]:
    return [p.stem for p in changed_templates(repo, since, repo / "kickstarts")]


def test_changing_a_shared_include_selects_every_template_that_includes_it(repo: Path) -> None:
    write(repo / "kickstarts" / "common" / "disk.ks", "zerombr\nclearpart --all\n")
    commit(repo, "disk layout")
    assert changed(repo) == ["alma", "centos"]


def test_changing_one_metadata_file_selects_only_its_template(repo: Path) -> None:
    toml = repo / "kickstarts" / "fedora.toml"
    toml.write_text(toml.read_text().replace('"2Gi"', '"3Gi"'))
    commit(repo, "more memory")
    assert changed(repo) == ["fedora"]


def test_changing_local_install_media_selects_its_template(repo: Path) -> None:
    write(repo / "kickstarts" / "media" / "boot.iso", "ISO 2\n")
    commit(repo, "new ISO")
    assert changed(repo) == ["offline"]


def test_a_deleted_template_is_not_built(repo: Path) -> None:
    (repo / "kickstarts" / "fedora.ks").unlink()
    (repo / "kickstarts" / "fedora.toml").unlink()
    commit(repo, "drop fedora")
    assert changed(repo) == []


def test_deleting_an_include_selects_the_templates_that_still_need_it(repo: Path) -> None:
    (repo / "kickstarts" / "fedora" / "extra.ks").unlink()
    commit(repo, "oops")
    assert changed(repo) == ["fedora"]


def test_unrelated_and_uncommitted_changes_select_nothing(repo: Path) -> None:
    write(repo / "README.md", "templates, documented\n")
    commit(repo, "docs")
    write(repo / "kickstarts" / "centos.ks", "text\n# not committed yet\n")
    assert changed(repo) == []


def test_changes_accumulate_since_the_given_commit(repo: Path) -> None:
    since = git(repo, "rev-parse", "HEAD")
    write(repo / "kickstarts" / "offline.ks", "text\nzerombr\n")
    commit(repo, "one")
    write(repo / "kickstarts" / "fedora" / "extra.ks", "rootpw --lock\nreqpart\n")
    commit(repo, "two")
    assert changed(repo, since) == ["fedora", "offline"]
    assert changed(repo, "HEAD") == []


def test_a_branch_is_compared_from_where_it_forked(repo: Path) -> None:
    git(repo, "checkout", "-q", "-b", "feature")
    write(repo / "kickstarts" / "alma.ks", "text\n%include common/base.ks\nreqpart\n")
    commit(repo, "feature: alma")
    git(repo, "checkout", "-q", "main")
    write(repo / "kickstarts" / "fedora.ks", "text\n%include fedora/extra.ks\nreqpart\n")
    commit(repo, "main: fedora")
    git(repo, "checkout", "-q", "feature")
    # main's newer fedora change is not the branch's: the branch does not even have it.
    assert changed(repo, "main") == ["alma"]


def test_a_bad_ref_is_an_invalid_argument(repo: Path) -> None:
    with pytest.raises(FinalError) as e:
        changed_templates(repo, "no-such-branch", repo / "kickstarts")
    assert e.value.reason == "InvalidArgument"
    assert "git ref 'no-such-branch'" in e.value.message


def test_a_ref_that_looks_like_an_option_is_just_a_bad_ref(repo: Path) -> None:
    with pytest.raises(FinalError, match="does not name a commit"):
        changed_templates(repo, "--output=/tmp/x", repo / "kickstarts")


def test_not_a_git_repository(tmp_path: Path) -> None:
    write(tmp_path / "kickstarts" / "a.ks", "text\n")
    with pytest.raises(FinalError, match="not in a git repository") as e:
        changed_templates(tmp_path, "HEAD~1", tmp_path / "kickstarts")
    assert e.value.reason == "InvalidArgument"


def test_templates_are_the_kickstarts_at_the_top_of_the_directory(repo: Path) -> None:
    names = [p.stem for p in template_files(repo / "kickstarts")]
    assert names == ["alma", "centos", "fedora", "offline"]
    with pytest.raises(FinalError, match="no such directory"):
        template_files(repo / "nothere")


def test_junit_report_counts_and_carries_console_output(tmp_path: Path) -> None:
    report = tmp_path / "results" / "templates.xml"
    console = "booting\x1b[0m\x00 ok\x07 \ud800 done & <fine>\n"
    write_junit(
        report,
        "templates",
        [
            Case("centos-stream-9", 612.5, output=console),
            Case("fedora-44", 30.25, failure="InvalidKickstart: f.ks:3: bad\nmore", output="x"),
            Case("alma-9", 0.0, skipped="unchanged: already published"),
        ],
    )
    root = ET.parse(report).getroot()  # well-formed despite the control characters
    suite = root.find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("3", "1", "1")
    assert suite.get("time") == "642.750"
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert cases["centos-stream-9"].findtext("system-out") == (
        "booting\\x1b[0m\\x00 ok\\x07 \\ud800 done & <fine>\n"
    )
    failure = cases["fedora-44"].find("failure")
    assert failure is not None
    assert failure.get("message") == "InvalidKickstart: f.ks:3: bad"
    assert failure.text == "InvalidKickstart: f.ks:3: bad\nmore"
    skipped = cases["alma-9"].find("skipped")
    assert skipped is not None and skipped.get("message") == "unchanged: already published"
    assert cases["alma-9"].find("failure") is None
    assert list(report.parent.iterdir()) == [report]  # no temporary file left behind


def test_a_case_cannot_both_fail_and_be_skipped() -> None:
    with pytest.raises(ValueError):
        Case("x", 1.0, failure="broke", skipped="not needed")
