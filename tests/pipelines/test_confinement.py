"""Kickstart inputs confined to the template tree and bounded (issue #12): %include roots,
regular files only, size limits, unechoed included lines, absolute %include, worker media."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from importer.errors import FinalError
from pipelines.bundle import media_dirs, pack
from pipelines.kickstart import (
    MAX_DEPTH,
    MAX_FILE_BYTES,
    MAX_TOTAL_BYTES,
    confined,
    default_root,
    flatten,
    included_files,
    validate,
)
from pipelines.steps import BuildRequest, validate_step
from pipelines.tasks import InvalidSettings, WorkerSettings
from pipelines.template import load_template
from tests.pipelines.test_kickstart import metadata, minimal, write

# A one-token file that is not a kickstart: what an %include must never put in a message.
TOKEN = "tok-3f9a8b7c6d5e4f3a"
SHADOW = "root:$6$salt$hash0123456789:19000:0:99999:7:::"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A checkout: its root holds `.git`, the kickstarts are a level below."""
    root = tmp_path / "repo"
    (root / ".git").mkdir(parents=True)
    return root


# --- the root -------------------------------------------------------------------------------


def test_default_root_is_the_git_repository_else_the_kickstart_s_directory(
    tmp_path: Path, repo: Path
) -> None:
    ks = write(repo / "kickstarts" / "deep" / "t.ks", minimal())
    assert default_root(ks) == repo.resolve()
    # A worktree or submodule has a .git file, not a directory: that counts too.
    (repo / "kickstarts" / ".git").write_text("gitdir: ../.git/worktrees/x\n")
    assert default_root(ks) == (repo / "kickstarts").resolve()
    loose = write(tmp_path / "loose" / "t.ks", minimal())
    assert default_root(loose) == loose.parent.resolve()


def test_default_root_follows_a_symlinked_kickstart_to_its_tree(tmp_path: Path, repo: Path) -> None:
    ks = write(repo / "kickstarts" / "t.ks", minimal())
    (tmp_path / "elsewhere").mkdir()
    link = tmp_path / "elsewhere" / "t.ks"
    link.symlink_to(ks)
    assert default_root(link) == repo.resolve()


def test_include_outside_the_repository_is_refused_by_default(tmp_path: Path, repo: Path) -> None:
    write(tmp_path / "token", f"{TOKEN}\n")
    ks = write(repo / "kickstarts" / "t.ks", minimal("%include ../../token\n"))
    with pytest.raises(FinalError) as e:
        validate(ks, "RHEL9")
    assert e.value.reason == "InvalidKickstart"
    assert e.value.message.startswith(
        f"{ks}:4: %include ../../token is outside {repo.resolve()}: only files under it"
    )
    assert TOKEN not in e.value.message
    assert included_files(ks) == []


def test_includes_anywhere_in_the_repository_are_read(repo: Path) -> None:
    ks = write(repo / "kickstarts" / "t.ks", minimal("%include ../common/base.ks\n"))
    base = write(repo / "common" / "base.ks", "zerombr\n")
    assert validate(ks, "RHEL9").files == (ks, repo / "kickstarts" / "../common/base.ks")
    assert [p.resolve() for p in included_files(ks)] == [base.resolve()]


def test_symlink_in_the_repository_pointing_out_is_refused(tmp_path: Path, repo: Path) -> None:
    write(tmp_path / "token", f"{TOKEN}\n")
    ks = write(repo / "t.ks", minimal("%include common/link.ks\n"))
    (repo / "common").mkdir()
    (repo / "common" / "link.ks").symlink_to(tmp_path / "token")
    with pytest.raises(FinalError, match=r"t\.ks:4: %include common/link\.ks is outside") as e:
        flatten(ks)
    assert TOKEN not in e.value.message
    assert included_files(ks) == []


def test_given_root_narrows_or_widens_the_default(tmp_path: Path, repo: Path) -> None:
    shared = write(tmp_path / "shared" / "base.ks", "zerombr\n")
    ks = write(repo / "t.ks", minimal("%include ../shared/base.ks\n"))
    with pytest.raises(FinalError, match="is outside"):
        flatten(ks)
    assert flatten(ks, root=tmp_path).text.endswith("zerombr\n")
    assert [p.resolve() for p in included_files(ks, root=tmp_path)] == [shared.resolve()]
    inner = write(repo / "sub" / "t.ks", minimal("%include ../t2.ks\n"))
    write(repo / "t2.ks", "zerombr\n")
    with pytest.raises(FinalError, match=r"%include \.\./t2\.ks is outside"):
        flatten(inner, root=repo / "sub")


def test_a_given_root_cannot_widen_a_confined_block(tmp_path: Path, repo: Path) -> None:
    ks = write(repo / "t.ks", minimal())
    with confined(repo), pytest.raises(FinalError) as e:
        flatten(ks, root=tmp_path)
    assert e.value.message == (
        f"the root {tmp_path} is outside {repo.resolve()}, the files' own tree"
    )
    with confined(tmp_path):
        assert flatten(ks, root=repo).files == (ks,)


# --- what is read, and how much ---------------------------------------------------------


@pytest.mark.timeout(10)
def test_a_fifo_is_refused_without_waiting_for_a_writer(repo: Path) -> None:
    os.mkfifo(repo / "pipe.ks")
    ks = write(repo / "t.ks", minimal("%include pipe.ks\n"))
    with pytest.raises(FinalError) as e:
        validate(ks, "RHEL9")
    assert e.value.message == (
        f"{ks}:4: %include {repo / 'pipe.ks'}: is a FIFO, not a regular file: it is not read"
    )
    # The lenient walk lists it (a change to it still matters) without opening it.
    assert included_files(ks) == [repo / "pipe.ks"]
    # pack() leaves it out: the worker then says what is wrong with it.
    assert set(pack(ks).files) == {"t.ks"}


@pytest.mark.timeout(10)
def test_a_fifo_as_the_kickstart_or_its_metadata_is_refused(repo: Path) -> None:
    os.mkfifo(repo / "t.ks")
    with pytest.raises(FinalError, match=r"t\.ks: is a FIFO, not a regular file"):
        flatten(repo / "t.ks")
    ks = write(repo / "u.ks", minimal())
    os.mkfifo(repo / "u.toml")
    with pytest.raises(FinalError, match=r"u\.toml: is a FIFO, not a regular file") as e:
        load_template(ks)
    assert e.value.reason == "InvalidTemplate"


def test_a_directory_is_refused(repo: Path) -> None:
    (repo / "common").mkdir()
    ks = write(repo / "t.ks", minimal("%include common\n"))
    with pytest.raises(FinalError, match=r"t\.ks:4: %include \S+/common: is a directory, not a"):
        flatten(ks)


@pytest.mark.timeout(10)
def test_a_device_is_refused_unread(tmp_path: Path) -> None:
    # Only a root that holds /dev lets a relative %include reach it at all.
    ks = write(tmp_path / "t.ks", minimal(f"%include {os.path.relpath('/dev/zero', tmp_path)}\n"))
    with pytest.raises(FinalError, match=r"/dev/zero: is a character device, not a regular file"):
        validate(ks, "RHEL9", root=Path("/"))
    assert included_files(ks, root=Path("/")) == [tmp_path / os.path.relpath("/dev/zero", tmp_path)]


def test_a_file_over_the_limit_is_refused_with_its_size(repo: Path) -> None:
    big = repo / "big.ks"
    big.write_text("#" * MAX_FILE_BYTES + "\n")
    ks = write(repo / "t.ks", minimal("%include big.ks\n%include nested.ks\n"))
    write(repo / "nested.ks", "zerombr\n")
    with pytest.raises(FinalError) as e:
        flatten(ks)
    assert e.value.message == (
        f"{ks}:4: %include {big}: is {MAX_FILE_BYTES + 1} bytes, over the limit of 1 MiB for "
        "one file"
    )
    # Just at the limit is fine.
    big.write_text("#" * (MAX_FILE_BYTES - 1) + "\n")
    assert len(flatten(ks).text) == MAX_FILE_BYTES + len(minimal()) + len("zerombr\n")
    # Over it, the lenient walk lists the file but does not follow it.
    big.write_text("%include nested.ks\n" + "#" * MAX_FILE_BYTES)
    assert included_files(repo / "t.ks") == [big, repo / "nested.ks"]
    ks.write_text(minimal("%include big.ks\n"))
    assert included_files(ks) == [big]


def test_the_flattened_total_is_bounded_counting_each_include(repo: Path) -> None:
    part = repo / "part.ks"
    part.write_text("#" * (MAX_FILE_BYTES - 1) + "\n")  # within the limit for one file
    includes = "%include part.ks\n" * (MAX_TOTAL_BYTES // MAX_FILE_BYTES)
    ks = write(repo / "t.ks", minimal(includes))
    with pytest.raises(FinalError) as e:
        flatten(ks)
    assert e.value.message == (
        f"{ks}:7: %include {part}: the kickstart and its includes come to more than 4 MiB "
        "(the limit; a file counts once per %include of it)"
    )


def test_includes_fanning_out_are_stopped_by_the_total(repo: Path) -> None:
    # Each level multiplies the one below: counted per %include, this stops early.
    write(repo / "l3.ks", "# " + "x" * 4000 + "\n")
    write(repo / "l2.ks", "%include l3.ks\n" * 1000)
    write(repo / "l1.ks", "%include l2.ks\n" * 1000)
    ks = write(repo / "t.ks", minimal("%include l1.ks\n"))
    with pytest.raises(FinalError, match="come to more than 4 MiB"):
        flatten(ks)


def test_includes_nest_at_most_max_depth(repo: Path) -> None:
    for level in range(MAX_DEPTH + 1):
        write(repo / f"l{level}.ks", f"%include l{level + 1}.ks\n")
    write(repo / f"l{MAX_DEPTH + 1}.ks", "zerombr\n")
    with pytest.raises(FinalError) as e:
        flatten(repo / "l0.ks")
    assert e.value.message == (
        f"{repo / f'l{MAX_DEPTH}.ks'}:1: %include {repo / f'l{MAX_DEPTH + 1}.ks'}: "
        f"%include nested more than {MAX_DEPTH} deep"
    )
    assert flatten(repo / "l1.ks").text == "zerombr\n"
    assert len(included_files(repo / "l0.ks")) == MAX_DEPTH + 1


def test_crlf_files_flatten_as_before(repo: Path) -> None:
    (repo / "t.ks").write_bytes(b"text\r\n%include a.ks\r\nrootpw --lock\r\n")
    (repo / "a.ks").write_bytes(b"\xef\xbb\xbfzerombr\r")
    assert flatten(repo / "t.ks").text == "text\nzerombr\nrootpw --lock\n"


# --- no included line in a message --------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (TOKEN, "Unknown command: …"),
        (SHADOW, "Unknown command: …"),
        (f"rootpw {TOKEN} extra", "Unexpected arguments to rootpw command: ['…']"),
        (f"network --bootproto=dhcp --{TOKEN}=1", "unrecognized arguments: …"),
        (f"%{TOKEN}", "Unknown kickstart section: …"),
    ],
)
def test_an_error_in_an_included_file_does_not_repeat_its_line(
    repo: Path, line: str, problem: str
) -> None:
    secret = write(repo / "secrets" / "token", f"{line}\n")
    ks = write(repo / "t.ks", minimal("%include secrets/token\n"))
    with pytest.raises(FinalError) as e:
        validate(ks, "RHEL9")
    assert e.value.reason == "InvalidKickstart"
    assert e.value.message == f"{secret}:1: {problem} (the line's words are not shown)"
    assert TOKEN not in str(e.value) and "salt" not in str(e.value)


def test_the_named_kickstart_s_own_line_is_still_shown(repo: Path) -> None:
    ks = write(repo / "t.ks", minimal(f"{TOKEN}\n"))
    with pytest.raises(FinalError, match=f"t.ks:4: Unknown command: {TOKEN}$"):
        validate(ks, "RHEL9")


def test_a_warning_in_an_included_file_does_not_repeat_its_line(repo: Path) -> None:
    included = write(repo / "tz.ks", "timezone Etc/UTC --isUtc\nautostep\n")
    ks = write(repo / "t.ks", minimal("%include tz.ks\n"))
    by_line = {w.location.line: w.message for w in validate(ks, "RHEL9").warnings}
    assert set(by_line) == {1, 2}
    assert by_line[1].startswith("The option … will be deprecated")
    assert "--isUtc" not in by_line[1] and "Etc/UTC" not in by_line[1]
    # pykickstart's own names are not the file's to hide.
    assert "The autostep command has been deprecated" in by_line[2]
    assert all(w.location.path == included for w in validate(ks, "RHEL9").warnings)


# --- absolute %include ------------------------------------------------------------------


def test_absolute_include_without_a_pre_that_writes_it_is_an_error(repo: Path) -> None:
    ks = write(repo / "t.ks", minimal("%include /tmp/part-include\n"))
    with pytest.raises(FinalError) as e:
        flatten(ks)
    assert e.value.reason == "InvalidKickstart"
    assert e.value.message == (
        f"{ks}:4: %include /tmp/part-include: the installer reads an absolute path itself, so "
        "a %pre section of the kickstart must create it, and none mentions /tmp/part-include"
    )


@pytest.mark.parametrize(
    "sections",
    [
        # Too late: %pre-install runs after the kickstart's commands were read.
        "%pre-install\necho 'part /' > /tmp/part-include\n%end\n",
        # A longer path is another file.
        "%pre\necho 'part /' > /tmp/part-include2\n%end\n",
        # Outside any %pre.
        "%post\necho 'part /' > /tmp/part-include\n%end\n",
        # An %include in the %pre does not write the file.
        "%pre\n%include /tmp/part-include\n%end\n",
    ],
)
def test_absolute_include_needs_a_pre_section_that_mentions_it(repo: Path, sections: str) -> None:
    ks = write(repo / "t.ks", minimal("%include /tmp/part-include\n" + sections))
    with pytest.raises(FinalError, match=r"t\.ks:4: %include /tmp/part-include: .* %pre"):
        flatten(ks)


def test_absolute_include_from_an_included_file_may_be_written_by_any_pre(repo: Path) -> None:
    write(repo / "common" / "disk.ks", "%include /tmp/part-include\n")
    pre = "%pre --interpreter=/bin/bash\nprintf 'part / --grow\\n' >/tmp/part-include\n%end\n"
    ks = write(repo / "t.ks", minimal("%include common/disk.ks\n" + pre))
    result = validate(ks, "RHEL9")
    assert "%include /tmp/part-include\n" in result.text
    assert result.warnings == ()


# --- installer media on a worker -----------------------------------------------------------


def template(repo: Path, install: str) -> Path:
    write(repo / "t.toml", metadata(install))
    return write(repo / "t.ks", minimal())


def test_media_roots_refuse_media_outside_them(tmp_path: Path, repo: Path) -> None:
    media = repo / "media"
    write(media / "vmlinuz", "k\n")
    write(media / "initrd.img", "i\n")
    write(tmp_path / "elsewhere" / "initrd.img", "i\n")
    ks = template(repo, 'kernel = "media/vmlinuz"\ninitrd = "../elsewhere/initrd.img"')
    assert load_template(ks).install.initrd == repo / "../elsewhere/initrd.img"  # local: anywhere
    with pytest.raises(FinalError) as e:
        load_template(ks, media_roots=[media, tmp_path / "other"])
    assert e.value.reason == "InvalidTemplate"
    assert e.value.message == (
        f"{repo / 't.toml'}: [install] initrd: {repo / '../elsewhere/initrd.img'} is outside the "
        f"directories this worker reads installer media from (DISKFLOW_MEDIA_DIRS: {media}, "
        f"{tmp_path / 'other'})"
    )
    assert load_template(ks, media_roots=[media, tmp_path / "elsewhere"]).install.kernel == (
        media / "vmlinuz"
    )


def test_no_media_roots_configured_refuses_every_media_file(repo: Path) -> None:
    ks = template(repo, 'iso = "/etc/hostname"')
    with pytest.raises(FinalError) as e:
        load_template(ks, media_roots=())
    assert e.value.message == (
        f"{repo / 't.toml'}: [install] iso: /etc/hostname is outside the directories this "
        "worker reads installer media from (DISKFLOW_MEDIA_DIRS: none are configured)"
    )
    # A tree URL needs no media directory.
    ks = template(repo, 'location = "https://mirror.example.com/os/"')
    assert load_template(ks, media_roots=()).install.location == "https://mirror.example.com/os/"


def test_media_symlink_out_of_the_roots_is_refused(tmp_path: Path, repo: Path) -> None:
    write(tmp_path / "secret.iso", "x\n")
    (repo / "media").mkdir()
    (repo / "media" / "install.iso").symlink_to(tmp_path / "secret.iso")
    ks = template(repo, 'iso = "media/install.iso"')
    with pytest.raises(FinalError, match=r"\[install\] iso: .* is outside the directories"):
        load_template(ks, media_roots=[repo / "media"])


def test_boot_media_are_confined_too(tmp_path: Path, repo: Path) -> None:
    write(repo / "media" / "vmlinuz", "k\n")
    write(tmp_path / "initrd.img", "i\n")
    ks = template(repo, 'location = "https://mirror.example.com/os/"')
    meta = repo / "t.toml"
    boot = '[boot]\nkernel = "media/vmlinuz"\ninitrd = "../initrd.img"\n'
    meta.write_text(meta.read_text() + boot)
    with pytest.raises(FinalError, match=r"t\.toml: \[boot\] initrd: .* is outside the direct"):
        load_template(ks, media_roots=[repo / "media"])


@pytest.mark.timeout(10)
def test_media_must_be_regular_files(repo: Path) -> None:
    (repo / "media").mkdir()
    os.mkfifo(repo / "media" / "install.iso")
    ks = template(repo, 'iso = "media/install.iso"')
    with pytest.raises(FinalError) as e:
        load_template(ks, media_roots=[repo])
    assert e.value.message == (
        f"{repo / 't.toml'}: [install] iso: {repo / 'media/install.iso'} is not a regular file"
    )
    ks = template(repo, 'iso = "media"')
    with pytest.raises(FinalError, match=r"\[install\] iso: \S+/media is not a regular file"):
        load_template(ks)


def test_media_dirs_setting() -> None:
    assert media_dirs({}) == ()
    assert media_dirs({"DISKFLOW_MEDIA_DIRS": ""}) == ()
    assert media_dirs({"DISKFLOW_MEDIA_DIRS": "/srv/iso::/mnt/media/"}) == (
        Path("/srv/iso"),
        Path("/mnt/media"),
    )
    with pytest.raises(FinalError) as e:
        media_dirs({"DISKFLOW_MEDIA_DIRS": "/srv/iso:media"})
    assert e.value.message == (
        "DISKFLOW_MEDIA_DIRS='/srv/iso:media': 'media' is not an absolute directory"
    )


def test_a_worker_with_a_bad_media_dirs_setting_does_not_start() -> None:
    assert WorkerSettings.from_environment({}).media_dirs == ()
    settings = WorkerSettings.from_environment({"DISKFLOW_MEDIA_DIRS": "/srv/iso"})
    assert settings.media_dirs == ("/srv/iso",)
    with pytest.raises(InvalidSettings, match="DISKFLOW_MEDIA_DIRS='iso': 'iso' is not an abs"):
        WorkerSettings.from_environment({"DISKFLOW_MEDIA_DIRS": "iso"})


def test_queued_build_with_local_media_needs_the_worker_s_media_dirs(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(repo / "media" / "install.iso", "not really an iso\n")
    ks = template(repo, 'iso = "media/install.iso"')
    request = BuildRequest(kickstart=str(ks)).packed()
    monkeypatch.delenv("DISKFLOW_MEDIA_DIRS", raising=False)
    with pytest.raises(FinalError) as e:
        validate_step(request)
    assert e.value.reason == "InvalidTemplate"
    assert e.value.message.startswith(f"{repo / 't.toml'}: [install] iso: ")
    assert "DISKFLOW_MEDIA_DIRS: none are configured" in e.value.message
    monkeypatch.setenv("DISKFLOW_MEDIA_DIRS", str(repo / "media"))
    assert validate_step(request).template.install.iso == repo / "media" / "install.iso"
    # Built here, from the user's own checkout, the media are not confined.
    monkeypatch.delenv("DISKFLOW_MEDIA_DIRS")
    assert validate_step(BuildRequest(kickstart=str(ks))).template.install.iso is not None


def test_validate_step_confines_includes_to_the_request_s_root(tmp_path: Path) -> None:
    write(tmp_path / "templates" / "install.iso", "not really an iso\n")
    ks = template(tmp_path / "templates", 'iso = "install.iso"')
    ks.write_text(minimal("%include ../common/base.ks\n"))
    write(tmp_path / "common" / "base.ks", "zerombr\n")
    # No repository: by default only the kickstart's own directory.
    with pytest.raises(FinalError, match=r"%include \.\./common/base\.ks is outside"):
        validate_step(BuildRequest(kickstart=str(ks)))
    state = validate_step(BuildRequest(kickstart=str(ks), kickstart_root=str(tmp_path)))
    assert state.kickstart.endswith("zerombr\n")
