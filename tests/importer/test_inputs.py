"""Plain inputs that must mean what users mean: a URL of a scheme diskflow does not read, a
`--size` for a plain file, a scratch directory that cannot be used. Each is refused (or taken)
before a byte is fetched from a real server, with a message naming what was wrong."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest

from importer import ImportOptions, import_image
from importer.capacity import DEFAULT_OVERHEAD, usable_size
from importer.errors import Failure
from tests.conftest import Images, MiB
from tests.support.commands import diskflow_import
from tests.support.faultserver import FaultServer

# The test disk, raw: 40 MiB.
DISK = 40 * MiB


def token() -> str:
    return uuid.uuid4().hex


def failure(source: str, dest: Path, **options: object) -> Failure:
    with pytest.raises(Failure) as caught:
        import_image(source, str(dest), options=ImportOptions(**options))  # type: ignore[arg-type]
    return caught.value


# --- 1. URLs of a scheme diskflow does not read -----------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["htp://host/x.img", "ftp://user:hunter2@host/x.img", "HTTPX://host/x.img", "git+ssh://h/x"],
)
def test_an_unknown_scheme_is_an_invalid_url_not_a_missing_file(url: str, tmp_path: Path) -> None:
    failed = failure(url, tmp_path / "disk.img")
    assert failed.reason == "InvalidURL"
    scheme = url.split("://")[0].lower()
    assert f"does not read {scheme}:// URLs" in failed.message
    assert "http://, https://, s3:// or file://" in failed.message
    assert "hunter2" not in failed.message and "host" not in failed.message
    assert list(tmp_path.iterdir()) == []


def test_the_cli_says_so_and_exits_1(tmp_path: Path) -> None:
    done = diskflow_import(
        "ftp://mirror.example/x.img", tmp_path / "disk.img", "--progress", "none"
    )
    assert done.returncode == 1
    assert "does not read ftp:// URLs" in done.stderr and "[InvalidURL]" in done.stderr
    assert "does not exist" not in done.stderr


def test_a_file_url_is_the_local_file(images: Images, tmp_path: Path) -> None:
    spaced = tmp_path / "my disk.raw"
    spaced.write_bytes(images.raw.read_bytes())
    for url in (f"file://{quote(str(spaced))}", f"file://localhost{quote(str(spaced))}"):
        dest = tmp_path / "disk.img"
        result = import_image(url, str(dest))
        assert result.source == str(spaced)
        assert dest.read_bytes() == images.raw.read_bytes()
    assert failure("file://fileserver/share/x.img", tmp_path / "d.img").reason == "InvalidURL"
    # Without "://" a name is a path, whatever it looks like.
    assert failure("htp:x.img", tmp_path / "d.img").reason == "NotFound"


# --- 4. --size of a plain file, and the filesystem overhead of a volume -----------------------


def test_a_plain_file_may_use_all_of_size(
    faults: FaultServer, images: Images, tmp_path: Path
) -> None:
    dest = tmp_path / "disk.img"
    done = diskflow_import(
        faults.url(token(), "disk.raw"), dest, "--size", "40Mi", "--progress", "none"
    )
    assert done.returncode == 0, done.stderr
    assert dest.read_bytes() == images.raw.read_bytes()
    # Not a whole MiB: still all of it (no volume, no rounding).
    dest = tmp_path / "blank.img"
    done = diskflow_import("blank:", dest, "--size", str(DISK + 512), "--progress", "none")
    assert done.returncode == 0, done.stderr
    assert dest.stat().st_size == DISK + 512


def test_the_overhead_of_a_volume_is_named_with_the_option_that_sets_it(
    faults: FaultServer, tmp_path: Path
) -> None:
    dest = tmp_path / "disk.img"
    done = diskflow_import(
        faults.url(token(), "disk.raw"), dest, "--size", "40Mi", "--progress", "none",
        "--filesystem-overhead", str(DEFAULT_OVERHEAD),
    )  # fmt: skip
    assert done.returncode == 1
    usable = usable_size(DISK, DEFAULT_OVERHEAD)
    assert f"larger than the usable capacity ({usable} bytes)" in done.stderr
    assert f"filesystem overhead of {DEFAULT_OVERHEAD:g} (CDI's default)" in done.stderr
    assert "--filesystem-overhead" in done.stderr and "[ImageTooLarge]" in done.stderr
    assert not dest.exists()


def test_another_overhead_is_named_as_it_is(images: Images, tmp_path: Path) -> None:
    failed = failure(str(images.raw), tmp_path / "disk.img", size=DISK, filesystem_overhead=0.1)
    assert failed.reason == "ImageTooLarge"
    assert "overhead of 0.1," in failed.message and "CDI's default" not in failed.message


def test_the_library_keeps_cdis_volume_semantics(images: Images, tmp_path: Path) -> None:
    # ImportOptions describes an importer's volume unless told otherwise (pods pass it anyway).
    assert ImportOptions().filesystem_overhead == DEFAULT_OVERHEAD
    failed = failure(str(images.raw), tmp_path / "disk.img", size=DISK)
    assert failed.reason == "ImageTooLarge" and "CDI's default" in failed.message
    result = import_image(
        str(images.raw), str(tmp_path / "disk.img"),
        options=ImportOptions(size=DISK, filesystem_overhead=None),
    )  # fmt: skip
    assert result.size == DISK


# --- 5. A scratch directory that cannot be used, and a destination that cannot be written ------


def assert_nothing_fetched(faults: FaultServer, name: str) -> None:
    assert faults.requests[name] == [], "a byte was asked for before the refusal"


@pytest.mark.parametrize(
    ("scratch", "said"),
    [
        ("nonexistent", "does not exist"),
        ("file", "is not a directory"),
        ("file/below", "Not a directory"),
    ],
)
def test_a_bad_scratch_directory_is_refused_before_the_download(
    scratch: str, said: str, faults: FaultServer, tmp_path: Path
) -> None:
    (tmp_path / "file").write_text("")
    directory = tmp_path / scratch
    name = token()
    # vhdx: an image that goes through scratch space, after the whole download.
    done = diskflow_import(
        faults.url(name, "disk.vhdx"), tmp_path / "disk.img", "--scratch-dir", directory,
        "--progress", "none",
    )  # fmt: skip
    assert done.returncode == 1
    assert f"the scratch directory {directory} (--scratch-dir)" in done.stderr
    assert said in done.stderr and "[InvalidArgument]" in done.stderr
    assert_nothing_fetched(faults, name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_read_only_scratch_directory_is_refused_before_the_download(
    small_fs: Path, faults: FaultServer, tmp_path: Path
) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    name = token()
    failed = failure(faults.url(name, "disk.raw"), tmp_path / "disk.img", scratch_dir=str(small_fs))
    assert failed.reason == "InvalidDestination"
    assert f"{small_fs}, where an image's scratch copy goes, is on a read-only" in failed.message
    assert_nothing_fetched(faults, name)
    # No scratch space at all: the directory is not used, so not checked.
    result = import_image(
        faults.url(name, "disk.raw"), str(tmp_path / "disk.img"),
        options=ImportOptions(scratch_dir=str(small_fs), scratch=False),
    )  # fmt: skip
    assert result.size == DISK


def test_a_usable_scratch_directory_is_left_as_it_was(
    faults: FaultServer, images: Images, tmp_path: Path
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    result = import_image(
        faults.url(token(), "disk.vhdx"), str(tmp_path / "disk.img"),
        options=ImportOptions(scratch_dir=str(scratch)),
    )  # fmt: skip
    assert result.path == "scratch"
    assert (tmp_path / "disk.img").read_bytes() == images.raw.read_bytes()
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize(
    ("dest", "said"),
    [("missing/disk.img", "does not exist"), ("", "is neither a regular file nor a block device")],
)
def test_a_bad_destination_is_refused_before_the_download(
    dest: str, said: str, faults: FaultServer, tmp_path: Path
) -> None:
    name = token()
    failed = failure(faults.url(name, "disk.raw"), tmp_path / dest)
    assert failed.reason == "InvalidDestination" and said in failed.message
    assert_nothing_fetched(faults, name)


def test_a_read_only_destination_is_refused_before_the_download(
    small_fs: Path, faults: FaultServer
) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    name = token()
    failed = failure(faults.url(name, "disk.raw"), small_fs / "disk.img")
    assert failed.reason == "InvalidDestination" and "read-only" in failed.message
    assert_nothing_fetched(faults, name)
