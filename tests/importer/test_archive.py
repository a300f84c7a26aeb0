"""`--content-type archive`: a tar (compressed any supported way) extracted into a directory,
refusing every member that could reach outside it, with the member named."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import sys
import tarfile
import tracemalloc
from pathlib import Path

import pytest

from importer import Checksum, ContentType, ImportOptions, archive, import_image
from importer.errors import Failure
from tests.conftest import MiB, run

ARCHIVE = ImportOptions(content_type=ContentType.ARCHIVE)


def make_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def member(name: str, kind: bytes = tarfile.REGTYPE, *, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.fixture
def good_tar(tmp_path: Path) -> Path:
    return make_tar(
        tmp_path / "good.tar",
        [
            (member("etc", tarfile.DIRTYPE), None),
            (member("etc/motd"), b"hello\n"),
            (member("big.bin"), os.urandom(3 * MiB)),
            (member("etc/motd.link", tarfile.SYMTYPE, link="motd"), None),
            (member("hard", tarfile.LNKTYPE, link="etc/motd"), None),
        ],
    )


@pytest.mark.parametrize(
    "compress", [None, ["gzip"], ["xz", "-0"], ["zstd", "-q", "--rm"], ["bzip2"]]
)
def test_archive_extracts_compressed_every_way(
    compress: list[str] | None, good_tar: Path, tmp_path: Path
) -> None:
    source = good_tar
    if compress:
        run(*compress, good_tar)
        source = next(p for p in tmp_path.iterdir() if p.name.startswith("good.tar."))
    dest = tmp_path / "volume"
    dest.mkdir()
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    options = ImportOptions(content_type=ContentType.ARCHIVE, checksum=Checksum("sha256", digest))
    result = import_image(str(source), str(dest), options=options)
    assert result.format == "tar"
    assert (dest / "etc" / "motd").read_text() == "hello\n"
    assert os.readlink(dest / "etc" / "motd.link") == "motd"
    assert (dest / "hard").read_text() == "hello\n"
    assert (dest / "big.bin").stat().st_size == 3 * MiB
    assert sorted(p.name for p in dest.iterdir()) == ["big.bin", "etc", "hard"]


def test_archive_over_http(good_tar: Path, nginx: str, images: object, tmp_path: Path) -> None:
    served = Path(images.dir) / "good.tar"  # type: ignore[attr-defined]
    served.write_bytes(good_tar.read_bytes())
    dest = tmp_path / "volume"
    dest.mkdir()
    import_image(f"{nginx}/good.tar", str(dest), options=ARCHIVE)
    assert (dest / "etc" / "motd").read_text() == "hello\n"


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        (member("/etc/passwd"), "absolute path"),
        (member("../escape"), "'..' component"),
        (member("a/../../escape"), "'..' component"),
        (member("link", tarfile.SYMTYPE, link="/etc/passwd"), "link to an absolute path"),
        (member("link", tarfile.SYMTYPE, link="../../etc/passwd"), "outside the destination"),
        (member("hard", tarfile.LNKTYPE, link="../outside"), "outside the destination"),
        (member("dev", tarfile.CHRTYPE), "special file"),
        (member("blk", tarfile.BLKTYPE), "special file"),
        (member("fifo", tarfile.FIFOTYPE), "special file"),
    ],
)
def test_unsafe_members_are_refused_by_name(
    bad: tarfile.TarInfo, problem: str, tmp_path: Path
) -> None:
    data = b"x" if bad.type == tarfile.REGTYPE else None
    source = make_tar(tmp_path / "bad.tar", [(member("fine.txt"), b"ok"), (bad, data)])
    dest = tmp_path / "volume"
    dest.mkdir()
    with pytest.raises(Failure) as caught:
        import_image(str(source), str(dest), options=ARCHIVE)
    assert caught.value.reason == "UnsafeArchive"
    assert repr(bad.name) in caught.value.message and problem in caught.value.message
    assert list(dest.iterdir()) == [], "nothing extracted stays behind"
    assert not (tmp_path / "escape").exists()


def test_archive_larger_than_capacity_stops(tmp_path: Path) -> None:
    source = make_tar(tmp_path / "big.tar", [(member(f"f{i}"), bytes(MiB)) for i in range(8)])
    dest = tmp_path / "volume"
    dest.mkdir()
    options = ImportOptions(content_type=ContentType.ARCHIVE, size=4 * MiB, filesystem_overhead=0)
    with pytest.raises(Failure) as caught:
        import_image(str(source), str(dest), options=options)
    assert caught.value.reason == "ImageTooLarge" and "'f4'" in caught.value.message
    assert list(dest.iterdir()) == []


def test_checksum_mismatch_leaves_nothing(good_tar: Path, tmp_path: Path) -> None:
    dest = tmp_path / "volume"
    dest.mkdir()
    options = ImportOptions(content_type=ContentType.ARCHIVE, checksum=Checksum("sha256", "0" * 64))
    with pytest.raises(Failure) as caught:
        import_image(str(good_tar), str(dest), options=options)
    assert caught.value.reason == "ChecksumMismatch"
    assert list(dest.iterdir()) == []


def test_not_a_tar_and_not_a_directory(good_tar: Path, tmp_path: Path) -> None:
    dest = tmp_path / "volume"
    dest.mkdir()
    not_tar = tmp_path / "disk.raw"
    not_tar.write_bytes(os.urandom(MiB))
    with pytest.raises(Failure) as caught:
        import_image(str(not_tar), str(dest), options=ARCHIVE)
    assert caught.value.reason == "InvalidArchive"
    with pytest.raises(Failure) as caught:
        import_image(str(good_tar), str(not_tar), options=ARCHIVE)
    assert caught.value.reason == "InvalidDestination"


def test_existing_names_are_not_overwritten(good_tar: Path, tmp_path: Path) -> None:
    dest = tmp_path / "volume"
    (dest / "etc").mkdir(parents=True)
    with pytest.raises(Failure) as caught:
        import_image(str(good_tar), str(dest), options=ARCHIVE)
    assert caught.value.reason == "InvalidDestination" and "'etc'" in caught.value.message
    assert sorted(p.name for p in dest.iterdir()) == ["etc"]


def test_archive_from_the_cli(good_tar: Path, tmp_path: Path) -> None:
    dest = tmp_path / "volume"
    dest.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "diskflow", "import", str(good_tar), str(dest),
         "--content-type", "archive", "--progress", "none"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (dest / "etc" / "motd").read_text() == "hello\n"


def test_checksum_covers_what_follows_the_end_of_the_archive(
    good_tar: Path, tmp_path: Path
) -> None:
    padded = tmp_path / "padded.tar"
    padded.write_bytes(good_tar.read_bytes() + bytes(50_000) + b"trailer")
    dest = tmp_path / "volume"
    dest.mkdir()
    digest = hashlib.sha256(padded.read_bytes()).hexdigest()
    options = ImportOptions(content_type=ContentType.ARCHIVE, checksum=Checksum("sha256", digest))
    import_image(str(padded), str(dest), options=options)
    assert (dest / "etc" / "motd").read_text() == "hello\n"


def volume(tmp_path: Path) -> Path:
    """An empty destination with nothing but a decoy next to it, to see escapes land."""
    (tmp_path / "outer").mkdir()
    (tmp_path / "outer" / "flag").write_text("untouched")
    dest = tmp_path / "outer" / "volume"
    dest.mkdir()
    return dest


def assert_refused(source: Path, dest: Path, reason: str, *texts: str) -> None:
    """The import fails with `reason`, the message holds `texts`, and nothing is left anywhere."""
    with pytest.raises(Failure) as caught:
        import_image(str(source), str(dest), options=ARCHIVE)
    assert caught.value.reason == reason, caught.value.message
    for text in texts:
        assert text in caught.value.message
    assert list(dest.iterdir()) == [], "nothing extracted stays behind"
    outer = dest.parent
    assert sorted(p.name for p in outer.iterdir()) == ["flag", "volume"]
    assert (outer / "flag").read_text() == "untouched"


def test_symlink_chain_past_path_max_is_refused(tmp_path: Path) -> None:
    # CVE-2025-4517 (CPython gh-135034): links that expand past PATH_MAX make realpath() give
    # up, so tarfile's data filter passed `escape -> <long link>/..` and wrote through it.
    dest = volume(tmp_path)
    steps = "abcdefghijklmnop"
    # Sized so that the links' expansion from the staging directory passes PATH_MAX.
    staging = len(str(dest / archive.STAGING_PREFIX)) + 8
    component = "d" * ((os.pathconf(dest, "PC_PATH_MAX") - staging - 1) // (len(steps) + 1))
    members: list[tuple[tarfile.TarInfo, bytes | None]] = []
    path = ""
    for step in steps:
        members.append((member(os.path.join(path, component), tarfile.DIRTYPE), None))
        members.append((member(os.path.join(path, step), tarfile.SYMTYPE, link=component), None))
        path = os.path.join(path, component)
    long_link = os.path.join(*steps, "l" * 254)
    up = os.path.join(*[".."] * len(steps))
    members += [
        (member(long_link, tarfile.SYMTYPE, link=up), None),
        # From the staging directory inside `dest`: two levels up is `outer`.
        (member("escape", tarfile.SYMTYPE, link=os.path.join(long_link, "..", "..")), None),
        (member("flaglink", tarfile.LNKTYPE, link="escape/flag"), None),
        (member("flaglink"), b"overwritten"),
        (member("escape/newfile"), b"new"),
    ]
    source = make_tar(tmp_path / "chain.tar", members)
    assert_refused(source, dest, "UnsafeArchive", "through the symbolic link 'a'")


@pytest.mark.parametrize(
    ("link", "target", "problem"),
    [
        ("link", "..", "pointing outside the destination"),
        ("link", "TMP/x", "link to an absolute path"),
        ("sub/link", ".", "through the symbolic link 'sub/link'"),
        ("sub/link", "../sub", "through the symbolic link 'sub/link'"),
    ],
)
def test_nothing_is_written_through_a_symlink(
    link: str, target: str, problem: str, tmp_path: Path
) -> None:
    dest = volume(tmp_path)
    target = target.replace("TMP", str(tmp_path))
    source = make_tar(
        tmp_path / "through.tar",
        [(member(link, tarfile.SYMTYPE, link=target), None), (member(f"{link}/file"), b"x")],
    )
    assert_refused(source, dest, "UnsafeArchive", problem)
    assert not (tmp_path / "x").exists()


def test_symlink_climbing_through_a_later_symlink_is_refused(tmp_path: Path) -> None:
    # Lexically `a/..` is the top, but once `a -> .` exists it is the destination's parent.
    dest = volume(tmp_path)
    source = make_tar(
        tmp_path / "later.tar",
        [
            (member("b", tarfile.SYMTYPE, link="a/.."), None),
            (member("a", tarfile.SYMTYPE, link="."), None),
        ],
    )
    assert_refused(source, dest, "UnsafeArchive", "'b'", "'..' after a name")


def entry(
    name: str, kind: bytes = tarfile.REGTYPE, link: str = ""
) -> tuple[tarfile.TarInfo, bytes | None]:
    return member(name, kind, link=link), b"data" if kind == tarfile.REGTYPE else None


HARD = tarfile.LNKTYPE


@pytest.mark.parametrize(
    ("members", "problem"),
    [
        ([entry("hard", HARD, "later"), entry("later")], "not a regular file extracted before"),
        ([entry("hard", HARD, "/etc/passwd")], "hard link to an absolute path"),
        ([entry("hard", HARD, "a/../../flag")], "pointing outside the destination"),
        (
            [entry("dir", tarfile.DIRTYPE), entry("hard", HARD, "dir")],
            "not a regular file extracted before",
        ),
        (
            [entry("f"), entry("sym", tarfile.SYMTYPE, "f"), entry("hard", HARD, "sym")],
            "not a regular file extracted before",
        ),
    ],
)
def test_hardlinks_only_to_files_extracted_earlier(
    members: list[tuple[tarfile.TarInfo, bytes | None]], problem: str, tmp_path: Path
) -> None:
    dest = volume(tmp_path)
    source = make_tar(tmp_path / "hard.tar", members)
    assert_refused(source, dest, "UnsafeArchive", "'hard'", problem)


@pytest.mark.parametrize(
    "name", [".diskflow-extract-", ".diskflow-extract-x/f", "./.diskflow-extract-y"]
)
def test_the_staging_name_is_reserved(name: str, tmp_path: Path) -> None:
    dest = volume(tmp_path)
    source = make_tar(tmp_path / "staging.tar", [(member("fine"), b"ok"), (member(name), b"x")])
    assert_refused(source, dest, "UnsafeArchive", repr(name), "staging directory")


def walk_down(top: Path, parts: list[str]) -> int:
    """A descriptor of `top`/`parts`, a component at a time (the path is beyond PATH_MAX)."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for part in parts:
        child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        os.close(fd)
        fd = child
    return fd


DEEP = ["level"] * 1000  # 6,000 characters: past PATH_MAX, and deeper than Python's recursion


def test_a_thousand_levels_deep(tmp_path: Path) -> None:
    dest = volume(tmp_path)
    source = make_tar(tmp_path / "deep.tar", [(member("/".join([*DEEP, "bottom"])), b"deep")])
    import_image(str(source), str(dest), options=ARCHIVE)
    fd = walk_down(dest, DEEP)
    try:
        with open(os.open("bottom", os.O_RDONLY, dir_fd=fd), "rb") as bottom:
            assert bottom.read() == b"deep"
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o755, "made as tar makes a parent"
    finally:
        os.close(fd)
    archive._remove_tree(str(dest / "level"))  # pytest's rmtree would recurse
    assert list(dest.iterdir()) == []


def test_a_failure_after_deep_members_removes_them(tmp_path: Path) -> None:
    dest = volume(tmp_path)
    deep = [(member("/".join([*DEEP[:i], "f"])), b"x") for i in range(0, 1000, 100)]
    bad = (member("dev", tarfile.CHRTYPE), None)
    source = make_tar(tmp_path / "deep.tar", [*deep, (member("/".join(DEEP)), None), bad])
    assert_refused(source, dest, "UnsafeArchive", "'dev'")


class Stop(BaseException):
    """Like the exception SIGTERM raises: not an Exception."""


def test_an_interrupted_extraction_removes_everything(good_tar: Path, tmp_path: Path) -> None:
    dest = volume(tmp_path)

    def interrupted() -> None:
        raise Stop

    chunks = iter([good_tar.read_bytes()])
    with pytest.raises(Stop):
        archive.extract(chunks, str(dest), limit=None, verify=interrupted, max_members=10)
    assert list(dest.iterdir()) == []


def headers(count: int) -> bytes:
    """A tar of `count` headers of the same directory."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = member("d/", tarfile.DIRTYPE)
        for _ in range(count):
            tar.addfile(info)
    return out.getvalue()


def test_member_count_is_capped(tmp_path: Path) -> None:
    dest = volume(tmp_path)
    source = tmp_path / "many.tar"
    source.write_bytes(headers(101))
    options = ImportOptions(content_type=ContentType.ARCHIVE, archive_max_members=100)
    with pytest.raises(Failure) as caught:
        import_image(str(source), str(dest), options=options)
    assert caught.value.reason == "ResourceLimit"
    for text in ("100 members", "ImportOptions.archive_max_members", "--archive-max-members"):
        assert text in caught.value.message
    assert list(dest.iterdir()) == []
    options = ImportOptions(content_type=ContentType.ARCHIVE, archive_max_members=101)
    import_image(str(source), str(dest), options=options)
    assert [p.name for p in dest.iterdir()] == ["d"]


def test_memory_does_not_grow_with_the_member_count(tmp_path: Path) -> None:
    def peak(count: int) -> int:
        data = headers(count)
        dest = tmp_path / f"volume-{count}"
        dest.mkdir()
        tracemalloc.start()
        try:
            chunks = (data[i : i + MiB] for i in range(0, len(data), MiB))
            archive.extract(chunks, str(dest), limit=None, verify=lambda: None, max_members=count)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak(2_000), peak(40_000)
    # Every TarInfo kept would cost ~1 KiB: 38 MiB more for the larger archive.
    assert large < small + 2 * MiB, (small, large)


def test_modes_and_file_times_are_kept_whatever_the_umask(tmp_path: Path) -> None:
    dest = volume(tmp_path)

    def with_mode(info: tarfile.TarInfo, mode: int) -> tarfile.TarInfo:
        info.mode, info.mtime = mode, 1_000_000_000
        return info

    source = make_tar(
        tmp_path / "modes.tar",
        [
            (with_mode(member("shared"), 0o664), b"group writes"),
            (with_mode(member("setuid"), 0o4755), b"no setuid"),
            (with_mode(member("readonly"), 0o400), b"read only"),
            (with_mode(member("locked", tarfile.DIRTYPE), 0o555), None),
            (with_mode(member("locked/inside"), 0o640), b"written before locking"),
            (with_mode(member("open", tarfile.DIRTYPE), 0o1777), None),
        ],
    )
    old = os.umask(0o077)
    try:
        import_image(str(source), str(dest), options=ARCHIVE)
    finally:
        os.umask(old)
    modes = {
        p.name: stat.S_IMODE(p.lstat().st_mode) for p in [*dest.iterdir(), dest / "locked/inside"]
    }
    assert modes == {
        "shared": 0o664,
        "setuid": 0o755,
        "readonly": 0o400,
        "locked": 0o555,
        "inside": 0o640,
        "open": 0o777,
    }
    assert (dest / "locked" / "inside").read_text() == "written before locking"
    assert (dest / "shared").stat().st_mtime == 1_000_000_000


def test_later_members_replace_earlier_ones_as_in_tar(tmp_path: Path) -> None:
    dest = volume(tmp_path)
    source = make_tar(
        tmp_path / "again.tar",
        [
            (member("f"), b"first"),
            (member("keep"), b"kept"),
            (member("old", tarfile.LNKTYPE, link="f"), None),
            (member("f"), b"second"),
            (member("sym", tarfile.SYMTYPE, link="keep"), None),
            (member("sym"), b"now a file"),
            (member("d", tarfile.DIRTYPE), None),
            (member("d", tarfile.DIRTYPE), None),
        ],
    )
    import_image(str(source), str(dest), options=ARCHIVE)
    assert (dest / "f").read_text() == "second"
    assert (dest / "old").read_text() == "first", "the link kept the first file"
    assert (dest / "sym").read_text() == "now a file" and not (dest / "sym").is_symlink()
    assert (dest / "keep").read_text() == "kept"
    source = make_tar(
        tmp_path / "dir.tar", [(member("d", tarfile.DIRTYPE), None), (member("d"), b"")]
    )
    dest = tmp_path / "other"
    dest.mkdir()
    with pytest.raises(Failure) as caught:
        import_image(str(source), str(dest), options=ARCHIVE)
    assert caught.value.reason == "InvalidArchive" and "replace a directory" in caught.value.message


def test_a_file_in_the_way_of_a_path(tmp_path: Path) -> None:
    dest = volume(tmp_path)
    source = make_tar(tmp_path / "in-the-way.tar", [entry("f"), entry("f/x")])
    assert_refused(source, dest, "InvalidArchive", "'f/x'", "needs 'f' to be a directory")


def test_names_as_tar_c_dot_makes_them(tmp_path: Path) -> None:
    dest = volume(tmp_path)
    source = make_tar(
        tmp_path / "dot.tar",
        [entry("./", tarfile.DIRTYPE), entry("./etc/", tarfile.DIRTYPE), entry(".//etc/./motd")],
    )
    import_image(str(source), str(dest), options=ARCHIVE)
    assert (dest / "etc" / "motd").read_text() == "data"
    assert [p.name for p in dest.iterdir()] == ["etc"]


def test_member_cap_from_the_cli(tmp_path: Path) -> None:
    dest = volume(tmp_path)
    source = tmp_path / "many.tar"
    source.write_bytes(headers(11))
    done = subprocess.run(
        [sys.executable, "-m", "diskflow", "import", str(source), str(dest),
         "--content-type", "archive", "--archive-max-members", "10", "--progress", "none"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert "more than 10 members" in done.stderr and "[ResourceLimit]" in done.stderr
    assert list(dest.iterdir()) == []


def test_a_destination_reached_through_a_symlink_gets_restrictive_modes(tmp_path: Path) -> None:
    """The late modes were applied through an O_NOFOLLOW open of DEST: a DEST that is a
    symlink failed after the members were already in place, and every retry failed too."""
    locked = member("locked", tarfile.DIRTYPE)
    locked.mode = 0o500
    source = make_tar(tmp_path / "a.tar", [(locked, None), (member("locked/f"), b"x")])
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    import_image(str(source), str(tmp_path / "link"), options=ARCHIVE)
    assert stat.S_IMODE((real / "locked").stat().st_mode) == 0o500
    assert (real / "locked" / "f").read_bytes() == b"x"


def test_a_staging_directory_left_by_a_killed_import_is_removed(tmp_path: Path) -> None:
    dest = tmp_path / "volume"
    (dest / ".diskflow-extract-left" / "deep" / "er").mkdir(parents=True)
    (dest / ".diskflow-extract-left" / "deep" / "er" / "big").write_bytes(b"x" * MiB)
    source = make_tar(tmp_path / "a.tar", [(member("f"), b"data")])
    import_image(str(source), str(dest), options=ARCHIVE)
    assert sorted(p.name for p in dest.iterdir()) == ["f"]
