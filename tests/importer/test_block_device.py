"""Imports into a real block device (a loop device): old contents must not show through, and
a failed import must not leave a device that looks like it holds an image."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from importer import Checksum, ImportOptions, import_image
from importer.errors import Failure
from importer.target import HEAD
from tests.conftest import DEVICE_SIZE, Images, MiB, read_device


@pytest.mark.parametrize(
    ("fmt", "compression"), [("raw", "gz"), ("raw", None), ("qcow2", "xz"), ("vpc-fixed", "zst")]
)
def test_image_lands_on_the_device(
    fmt: str, compression: str | None, device: str, images: Images, tmp_path: Path
) -> None:
    result = import_image(
        str(images.path(fmt, compression)), device, options=ImportOptions(scratch_dir=str(tmp_path))
    )
    expected = images.reference(fmt, tmp_path).read_bytes()
    assert result.size == len(expected)
    # Zero ranges of the image are zeroes on the device, not the old 0xff.
    assert read_device(device, len(expected)) == expected


def test_size_larger_than_device_is_refused(device: str, images: Images) -> None:
    with pytest.raises(Failure) as caught:
        import_image(str(images.raw), device, options=ImportOptions(size=DEVICE_SIZE * 2))
    assert caught.value.reason == "InvalidArgument" and str(DEVICE_SIZE) in caught.value.message


def test_image_larger_than_device_is_refused(device: str, tmp_path: Path) -> None:
    big = tmp_path / "big.raw"
    with open(big, "wb") as f:
        f.truncate(DEVICE_SIZE + MiB)
    with pytest.raises(Failure) as caught:
        import_image(str(big), device)
    assert caught.value.reason == "ImageTooLarge"


def test_failed_raw_import_leaves_no_recognisable_head(device: str, images: Images) -> None:
    wrong = Checksum.parse("sha256:" + "1" * 64)
    with pytest.raises(Failure) as caught:
        import_image(str(images.path("raw", "gz")), device, options=ImportOptions(checksum=wrong))
    assert caught.value.reason == "ChecksumMismatch"
    assert read_device(device, HEAD) == bytes(HEAD)


@pytest.mark.parametrize(
    ("options", "reason", "words"),
    [
        ([], "InvalidImage", "does not decompress"),  # streamed: the decoder finds it
        (["-o", "extended_l2=on"], "ConversionFailed", "qemu-img convert failed"),  # scratch
    ],
    ids=["stream", "scratch"],
)
def test_a_failed_import_leaves_no_recognisable_head(
    options: list[str], reason: str, words: str, device: str, tmp_path: Path
) -> None:
    # A compressed qcow2 whose cluster data is garbage: its tables are fine, its data is not.
    raw, image = tmp_path / "text.raw", tmp_path / "broken.qcow2"
    raw.write_bytes(b"diskflow " * (MiB // 8))
    subprocess.run(
        ["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", *options, raw, image],
        check=True,
    )
    data = bytearray(image.read_bytes())
    data[5 * 65536 :] = b"\xff" * (len(data) - 5 * 65536)  # past the metadata clusters
    image.write_bytes(bytes(data))
    with pytest.raises(Failure) as caught:
        import_image(str(image), device, options=ImportOptions(scratch_dir=str(tmp_path)))
    assert caught.value.reason == reason, caught.value.message
    assert words in caught.value.message
    assert read_device(device, HEAD) == bytes(HEAD)


@pytest.mark.parametrize(("fmt", "head"), [("qcow2", bytes(HEAD)), ("vhdx", b"\xff" * HEAD)])
def test_checksum_mismatch_leaves_no_recognisable_head(
    fmt: str, head: bytes, device: str, images: Images, tmp_path: Path
) -> None:
    # A streamed image is on the device when its checksum is known to be wrong, as raw is:
    # its head is zeroed. One that goes through scratch space never reached the device.
    wrong = Checksum.parse("sha256:" + "1" * 64)
    with pytest.raises(Failure) as caught:
        import_image(
            str(images.path(fmt, "gz")),
            device,
            options=ImportOptions(checksum=wrong, scratch_dir=str(tmp_path)),
        )
    assert caught.value.reason == "ChecksumMismatch"
    assert read_device(device, HEAD) == head


def test_streamed_formats_land_on_the_device(device: str, images: Images, tmp_path: Path) -> None:
    for fmt in ("qcow2", "vmdk", "vdi", "vpc"):
        result = import_image(str(images.path(fmt, "zst")), device)
        assert result.path == "stream"
        assert read_device(device, 40 * MiB) == images.raw.read_bytes(), fmt


def test_preallocate_writes_zeroes(device: str, images: Images) -> None:
    import_image(str(images.path("raw", "zst")), device, options=ImportOptions(preallocate=True))
    assert read_device(device, 40 * MiB) == images.raw.read_bytes()
    assert os.path.exists(device)


def test_device_in_use_is_refused(device: str, images: Images) -> None:
    claim = os.open(device, os.O_RDONLY | os.O_EXCL)  # as a mounted filesystem would
    try:
        with pytest.raises(Failure) as caught:
            import_image(str(images.raw), device)
        assert caught.value.reason == "DestinationBusy"
    finally:
        os.close(claim)
