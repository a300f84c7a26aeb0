"""`--content-type archive`: a tar (compressed any supported way) extracted into a directory,
refusing every member that could reach outside it, with the member named."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from importer import Checksum, ContentType, ImportOptions, import_image
from importer.errors import ImportFailure
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
    with pytest.raises(ImportFailure) as caught:
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
    with pytest.raises(ImportFailure) as caught:
        import_image(str(source), str(dest), options=options)
    assert caught.value.reason == "ImageTooLarge" and "'f4'" in caught.value.message
    assert list(dest.iterdir()) == []


def test_checksum_mismatch_leaves_nothing(good_tar: Path, tmp_path: Path) -> None:
    dest = tmp_path / "volume"
    dest.mkdir()
    options = ImportOptions(content_type=ContentType.ARCHIVE, checksum=Checksum("sha256", "0" * 64))
    with pytest.raises(ImportFailure) as caught:
        import_image(str(good_tar), str(dest), options=options)
    assert caught.value.reason == "ChecksumMismatch"
    assert list(dest.iterdir()) == []


def test_not_a_tar_and_not_a_directory(good_tar: Path, tmp_path: Path) -> None:
    dest = tmp_path / "volume"
    dest.mkdir()
    not_tar = tmp_path / "disk.raw"
    not_tar.write_bytes(os.urandom(MiB))
    with pytest.raises(ImportFailure) as caught:
        import_image(str(not_tar), str(dest), options=ARCHIVE)
    assert caught.value.reason == "InvalidArchive"
    with pytest.raises(ImportFailure) as caught:
        import_image(str(good_tar), str(not_tar), options=ARCHIVE)
    assert caught.value.reason == "InvalidDestination"


def test_existing_names_are_not_overwritten(good_tar: Path, tmp_path: Path) -> None:
    dest = tmp_path / "volume"
    (dest / "etc").mkdir(parents=True)
    with pytest.raises(ImportFailure) as caught:
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
