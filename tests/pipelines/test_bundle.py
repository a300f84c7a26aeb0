"""A queued build's bundle: packed on the submitter, unpacked and read confined on a worker."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from importer.errors import FinalError
from pipelines.bundle import Bundle, pack, unpacked
from pipelines.kickstart import flatten, validate
from pipelines.steps import BuildRequest, validate_step
from pipelines.template import load_template
from tests.pipelines.test_kickstart import metadata, minimal, write

# Read by an escaping %include, it would fail validation with this text in the message.
SECRET = "worker-secret-content-4711"


@pytest.fixture
def tmpdir_(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh $TMPDIR, two levels below tmp_path, so escapes can be seen landing or reading."""
    tmp = tmp_path / "worker" / "tmp"
    tmp.mkdir(parents=True)
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() caches $TMPDIR
    return tmp


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A submitter's checkout: a template that includes a file from a sibling directory."""
    root = tmp_path / "repo"
    (root / ".git").mkdir(parents=True)  # the tree its %includes are confined to
    write(root / "kickstarts" / "web.ks", minimal("%include ../common/base.ks\n"))
    write(root / "kickstarts" / "web.toml", metadata('iso = "media/install.iso"'))
    write(root / "kickstarts" / "media" / "install.iso", "not really an iso\n")
    write(root / "common" / "base.ks", "zerombr\n%include parts/disk.ks\n")
    write(root / "common" / "parts" / "disk.ks", "clearpart --all\nreqpart\n")
    return root


def bundle_of(files: dict[str, str], kickstart: str = "t.ks", origin: str = "/src/repo") -> Bundle:
    return Bundle(origin=origin, kickstart=kickstart, files=files)


def test_packed_template_validates_unpacked(repo: Path, tmpdir_: Path) -> None:
    kickstart = repo / "kickstarts" / "web.ks"
    expected = validate(kickstart, "RHEL9")
    bundle = pack(kickstart)
    assert bundle.origin == str(repo)
    assert bundle.kickstart == "kickstarts/web.ks"
    assert set(bundle.files) == {
        "kickstarts/web.ks",
        "kickstarts/web.toml",
        "common/base.ks",
        "common/parts/disk.ks",
    }
    with unpacked(bundle) as path:
        assert path.is_relative_to(tmpdir_)
        template = load_template(path, bundle.media_base)
        assert template.install.iso == repo / "kickstarts" / "media" / "install.iso"
        checked = validate(template.kickstart, template.version)
        assert checked.text == expected.text
        assert all(f.is_relative_to(path.parents[1]) for f in checked.files)
        assert len(checked.files) == 3
    assert list(tmpdir_.iterdir()) == []  # the scratch directory is gone


def test_validate_step_runs_from_the_bundle(
    repo: Path, tmpdir_: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISKFLOW_MEDIA_DIRS", f"/nonexistent:{repo / 'kickstarts' / 'media'}")
    kickstart = repo / "kickstarts" / "web.ks"
    request = BuildRequest(kickstart=str(kickstart)).packed()
    state = validate_step(request)
    assert state.kickstart == validate(kickstart, "RHEL9").text
    assert state.build_id == validate_step(BuildRequest(kickstart=str(kickstart))).build_id


def test_tmpdir_behind_a_symlink(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = tmp_path / "real-tmp"
    real.mkdir()
    link = tmp_path / "tmp-link"
    link.symlink_to(real)
    monkeypatch.setenv("TMPDIR", str(link))
    monkeypatch.setattr(tempfile, "tempdir", None)
    bundle = pack(repo / "kickstarts" / "web.ks")
    with unpacked(bundle) as path:
        assert path.is_relative_to(real)
        validate(load_template(path, bundle.media_base).kickstart, "RHEL9")
    assert list(real.iterdir()) == []


@pytest.mark.parametrize("name", ["../escaped.ks", "a/../../escaped.ks", "/etc/hostname"])
def test_file_name_that_leaves_the_root_is_refused(name: str, tmpdir_: Path) -> None:
    bundle = bundle_of({"t.ks": minimal(), name: "written\n"})
    with pytest.raises(FinalError) as e, unpacked(bundle):
        pytest.fail("unpacked a bundle with an escaping name")
    assert e.value.reason == "InvalidTemplate"
    assert f"file name {name!r} leaves its root" in e.value.message
    assert "/src/repo" in e.value.message
    assert not (tmpdir_ / "escaped.ks").exists()
    assert not (tmpdir_.parent / "escaped.ks").exists()


@pytest.mark.parametrize("name", ["", ".", "a/..", "./"])
def test_file_name_that_names_no_file_is_refused(name: str, tmpdir_: Path) -> None:
    bundle = bundle_of({"t.ks": minimal(), name: "text\n"})
    with pytest.raises(FinalError) as e, unpacked(bundle):
        pytest.fail("unpacked a bundle with an empty name")
    assert e.value.reason == "InvalidTemplate"
    assert f"{name!r} is not a file name" in e.value.message
    assert list(tmpdir_.iterdir()) == []


def test_file_and_directory_of_the_same_name_is_refused(tmpdir_: Path) -> None:
    bundle = bundle_of({"t.ks": minimal(), "a/b.ks": "x\n", "a": "y\n"})
    with pytest.raises(FinalError) as e, unpacked(bundle):
        pytest.fail("unpacked")
    assert e.value.reason == "InvalidTemplate"
    assert "cannot write file 'a'" in e.value.message
    assert str(tmpdir_) not in e.value.message


@pytest.mark.parametrize("kickstart", ["../../../etc/hostname", "/etc/hostname", "..", ""])
def test_kickstart_name_that_leaves_the_root_is_refused(kickstart: str, tmpdir_: Path) -> None:
    outside = write(tmpdir_.parent / "hostname", SECRET)
    bundle = bundle_of({"t.ks": minimal()}, kickstart=kickstart)
    with pytest.raises(FinalError) as e, unpacked(bundle):
        pytest.fail("unpacked a bundle whose kickstart is outside it")
    assert e.value.reason == "InvalidTemplate"
    assert repr(kickstart) in e.value.message
    assert "leaves its root" in e.value.message or "is not a file name" in e.value.message
    assert outside.read_text() == SECRET


def test_kickstart_must_be_one_of_the_files(tmpdir_: Path) -> None:
    bundle = bundle_of({"t.ks": minimal(), "sub/x.ks": "zerombr\n"}, kickstart="other.ks")
    with pytest.raises(FinalError) as e, unpacked(bundle):
        pytest.fail("unpacked")
    assert e.value.reason == "InvalidTemplate"
    assert "its kickstart 'other.ks' is not among its files" in e.value.message
    # A directory the files make is no kickstart either.
    directory = bundle_of(bundle.files, kickstart="sub")
    with pytest.raises(FinalError, match="'sub' is not among its files"), unpacked(directory):
        pytest.fail("unpacked")


@pytest.mark.parametrize(
    "include", ["../outside.ks", "sub/../../outside.ks", "../tmp/../outside.ks"]
)
def test_include_that_leaves_the_bundle_is_refused_unread(include: str, tmpdir_: Path) -> None:
    # The scratch directory is $TMPDIR/diskflow-bundle-*: "../outside.ks" is in $TMPDIR.
    write(tmpdir_ / "outside.ks", f"{SECRET}\n")
    bundle = bundle_of({"t.ks": minimal(f"%include {include}\n"), "sub/x.ks": "zerombr\n"})
    with pytest.raises(FinalError) as e, unpacked(bundle) as path:
        validate(path, "RHEL9")
    assert e.value.reason == "InvalidKickstart"
    assert e.value.message.startswith(f"/src/repo/t.ks:4: %include {include} is outside /src/repo")
    assert SECRET not in e.value.message
    assert str(tmpdir_) not in e.value.message


def test_nested_include_that_leaves_the_bundle_is_refused(tmpdir_: Path) -> None:
    write(tmpdir_ / "outside.ks", f"{SECRET}\n")
    files = {
        "t.ks": minimal("%include sub/x.ks\n"),
        "sub/x.ks": "zerombr\n%include ../../outside.ks\n",
    }
    with pytest.raises(FinalError) as e, unpacked(bundle_of(files)) as path:
        flatten(path)
    assert e.value.message.startswith("/src/repo/sub/x.ks:2: %include ../../outside.ks is outside")
    assert SECRET not in e.value.message


def test_validate_step_refuses_an_escaping_include(
    repo: Path, tmpdir_: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISKFLOW_MEDIA_DIRS", str(repo))  # the media are fine: the include isn't
    # The root travels from unpacked() to the validate step's kickstart.validate unasked.
    write(tmpdir_ / "outside.ks", f"{SECRET}\n")
    request = BuildRequest(kickstart=str(repo / "kickstarts" / "web.ks")).packed()
    files = dict(request.bundle.files)
    files["common/base.ks"] += "%include ../../outside.ks\n"
    request = BuildRequest(
        kickstart=request.kickstart,
        bundle=Bundle(request.bundle.origin, request.bundle.kickstart, files),
    )
    with pytest.raises(FinalError) as e:
        validate_step(request)
    assert e.value.reason == "InvalidKickstart"
    assert e.value.message.startswith(
        f"{repo}/kickstarts/../common/base.ks:3: %include ../../outside.ks is outside {repo}:"
    )
    assert SECRET not in e.value.message
    assert str(tmpdir_) not in e.value.message


def test_confinement_ends_with_the_block(tmp_path: Path, tmpdir_: Path) -> None:
    with unpacked(bundle_of({"t.ks": minimal()})):
        pass
    (tmp_path / ".git").mkdir()  # tmp_path is the repository: ../shared.ks is in it
    ks = write(tmp_path / "repo" / "t.ks", minimal("%include ../shared.ks\n"))
    write(tmp_path / "shared.ks", "zerombr\n")
    assert flatten(ks).text.endswith("zerombr\n")


def test_errors_inside_name_the_submitters_paths(tmpdir_: Path) -> None:
    files = {
        "kickstarts/t.ks": minimal("%include ../common/a.ks\n"),
        "common/a.ks": "zerombr\nbogus\n",
    }
    bundle = bundle_of(files, kickstart="kickstarts/t.ks", origin="/home/me/repo")
    with pytest.raises(FinalError) as e, unpacked(bundle) as path:
        validate(path, "RHEL9")
    assert e.value.message.startswith("/home/me/repo/kickstarts/../common/a.ks:2: ")
    assert e.value.args == ("InvalidKickstart", e.value.message)
    assert str(tmpdir_) not in str(e.value)
    # The metadata is missing: load_template's error names the submitter's files too.
    with pytest.raises(FinalError) as e, unpacked(bundle) as path:
        load_template(path)
    assert e.value.message == (
        "/home/me/repo/kickstarts/t.ks: its metadata file "
        "/home/me/repo/kickstarts/t.toml is missing"
    )


def test_warnings_of_a_bundled_kickstart_name_the_submitters_files(
    repo: Path, tmpdir_: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISKFLOW_MEDIA_DIRS", str(repo))
    kickstart = repo / "kickstarts" / "web.ks"
    kickstart.write_text(kickstart.read_text() + "autostep\n")
    events: list[tuple[str, str]] = []
    validate_step(
        BuildRequest(kickstart=str(kickstart)).packed(),
        lambda stage, kind, message, **fields: events.append((kind, message)),
    )
    warnings = [message for kind, message in events if kind == "warning"]
    assert warnings and all(m.startswith(f"{repo}/kickstarts/web.ks:") for m in warnings)
    assert not any(str(tmpdir_) in m for m in warnings)
