"""Every supported format, compressed every supported way, lands as the same raw bytes that
`qemu-img convert -O raw` makes, with zero blocks left as holes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from importer import ImportOptions, import_image
from importer.capacity import usable_size
from importer.formats import Compression
from tests.conftest import FORMATS, Images, MiB, allocated, run

COMPRESSIONS = [None, "gz", "xz", "zst", "bz2"]
COMPRESSION_NAMES = {None: "none", "gz": "gzip", "xz": "xz", "zst": "zstd", "bz2": "bzip2"}


def assert_same_content(actual: Path, expected: Path) -> None:
    assert os.path.getsize(actual) == os.path.getsize(expected)
    subprocess.run(["cmp", actual, expected], check=True)


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_and_compression_over_http(
    fmt: str, compression: str | None, images: Images, nginx: str, tmp_path: Path
) -> None:
    dest = tmp_path / "disk.img"
    url = f"{nginx}/{images.path(fmt, compression).name}"
    result = import_image(url, str(dest), options=ImportOptions(scratch_dir=str(tmp_path)))

    assert_same_content(dest, images.reference(fmt, tmp_path))
    assert result.compression == COMPRESSION_NAMES[compression]
    assert result.format == ("vpc" if fmt.startswith("vpc") else fmt)
    assert result.bytes_downloaded == os.path.getsize(images.path(fmt, compression))
    # Every format streams but vhdx, which goes through scratch space and says why.
    assert (result.path, result.fallback is None) == (
        ("scratch", False) if fmt == "vhdx" else ("stream", True)
    )
    # Holes kept: allocation close to the 4 MiB of data, not the 40 MiB of the disk.
    assert allocated(dest) <= images.data_bytes + 2 * MiB
    leftovers = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("reference"))
    assert leftovers == ["disk.img"], "scratch and partial files are removed"


def test_local_path_source(images: Images, tmp_path: Path) -> None:
    dest = tmp_path / "disk.img"
    import_image(str(images.path("qcow2", "zst")), str(dest))
    assert_same_content(dest, images.raw)


def test_multi_member_gzip_as_pigz_writes(images: Images, tmp_path: Path) -> None:
    half = 20 * MiB
    data = images.raw.read_bytes()
    (tmp_path / "a").write_bytes(data[:half])
    (tmp_path / "b").write_bytes(data[half:])
    run("gzip", tmp_path / "a")
    run("gzip", tmp_path / "b")
    joined = tmp_path / "joined.gz"
    joined.write_bytes((tmp_path / "a.gz").read_bytes() + (tmp_path / "b.gz").read_bytes())
    dest = tmp_path / "disk.img"
    import_image(str(joined), str(dest))
    assert_same_content(dest, images.raw)


def test_multi_stream_xz(images: Images, tmp_path: Path) -> None:
    data = images.raw.read_bytes()
    for name, part in (("a", data[: 7 * MiB]), ("b", data[7 * MiB :])):
        (tmp_path / name).write_bytes(part)
        run("xz", "-0", tmp_path / name)
    joined = tmp_path / "joined.xz"
    joined.write_bytes((tmp_path / "a.xz").read_bytes() + (tmp_path / "b.xz").read_bytes())
    dest = tmp_path / "disk.img"
    import_image(str(joined), str(dest))
    assert_same_content(dest, images.raw)


def test_iso_streams_as_raw(tmp_path: Path) -> None:
    iso = tmp_path / "cd.iso"
    with open(iso, "wb") as f:
        f.truncate(2 * MiB)
        f.seek(0x8001)
        f.write(b"CD001\x01")
    run("xz", "-k", "-0", iso)
    dest = tmp_path / "out.img"
    result = import_image(str(iso) + ".xz", str(dest))
    assert result.format == "iso"
    assert dest.read_bytes() == iso.read_bytes()


def test_suffix_is_only_a_hint(images: Images, tmp_path: Path) -> None:
    misnamed = tmp_path / "disk.raw"  # really zstd-compressed qcow2
    misnamed.write_bytes(images.path("qcow2", "zst").read_bytes())
    dest = tmp_path / "disk.img"
    result = import_image(str(misnamed), str(dest))
    assert (result.format, result.compression) == ("qcow2", Compression.ZSTD)
    assert_same_content(dest, images.raw)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_file_grows_to_usable_capacity(fmt: str, images: Images, tmp_path: Path) -> None:
    dest = tmp_path / "disk.img"
    size = 100 * MiB
    result = import_image(
        str(images.path(fmt, "gz")),
        str(dest),
        options=ImportOptions(size=size),
    )
    usable = usable_size(size)
    assert result.size == usable == os.path.getsize(dest)
    with open(dest, "rb") as f:
        assert f.read(40 * MiB) == images.raw.read_bytes()
        assert f.read() == bytes(usable - 40 * MiB)


def test_never_shrinks(images: Images, tmp_path: Path) -> None:
    dest = tmp_path / "disk.img"
    # 43 MiB less 5.5% is 40 MiB: exactly the image, which must not be cut.
    result = import_image(str(images.raw), str(dest), options=ImportOptions(size=43 * MiB))
    assert result.size == 40 * MiB


def test_preallocate_allocates_every_block(images: Images, tmp_path: Path) -> None:
    dest = tmp_path / "disk.img"
    import_image(str(images.path("raw", "zst")), str(dest), options=ImportOptions(preallocate=True))
    assert allocated(dest) >= 40 * MiB
    assert_same_content(dest, images.raw)
