"""The VDI stream decoder against qemu-img: what it writes is what `qemu-img convert -O raw`
writes, byte for byte, or it refuses the image precisely."""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import pytest

from importer.decoders import Unsupported
from tests.support.decoding import decoded, field, patch, qemu_img, qemu_raw, refused

KiB, MiB = 1 << 10, 1 << 20
CHUNKS = [512, 4096, 65537, MiB]


def raw_of(image: Path, tmp_path: Path) -> bytes:
    return qemu_raw(image, tmp_path, "vdi")


def pattern(size: int = 5 * MiB + 1536) -> bytes:
    """Data, a zero block, holes, data straddling blocks, a partial last block."""
    data = bytearray(size)
    data[: 70 * KiB] = os.urandom(70 * KiB)
    data[2 * MiB - 100 : 2 * MiB + 100] = b"x" * 200
    data[-512:] = b"y" * 512
    return bytes(data)


def vdi(tmp_path: Path, static: bool = False, data: bytes | None = None) -> Path:
    raw = tmp_path / "d.raw"
    raw.write_bytes(pattern() if data is None else data)
    image = tmp_path / f"d.{'static' if static else 'dynamic'}.vdi"
    options = ["-o", "static=on"] if static else []
    qemu_img("convert", "-f", "raw", "-O", "vdi", *options, raw, image)
    return image


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_qemu_made_images_decode_as_qemu_reads_them(tmp_path: Path, static: bool, chunk: int):
    image = vdi(tmp_path, static)
    expected = raw_of(image, tmp_path)
    assert expected == (tmp_path / "d.raw").read_bytes()
    assert decoded(image, tmp_path, chunk=chunk) == expected
    assert decoded(image, tmp_path, chunk=chunk, known_size=True) == expected


def test_discarded_and_unallocated_blocks_read_as_zeros(tmp_path: Path):
    image = vdi(tmp_path, static=True)
    bmap = field(image, 340)
    patch(image, bmap, struct.pack("<2I", 0xFFFF_FFFE, 0xFFFF_FFFF))
    expected = raw_of(image, tmp_path)
    assert expected[: 2 * MiB] == bytes(2 * MiB)
    assert decoded(image, tmp_path) == expected


def test_blocks_stored_out_of_order(tmp_path: Path):
    image = vdi(tmp_path, static=True)
    bmap = field(image, 340)
    patch(image, bmap, struct.pack("<2I", 1, 0))
    expected = raw_of(image, tmp_path)
    assert decoded(image, tmp_path, chunk=65537) == expected


def test_an_odd_disk_size_is_rounded_up(tmp_path: Path):
    image = vdi(tmp_path)
    size = field(image, 368, "<Q")
    patch(image, 368, struct.pack("<Q", size - 1000))
    expected = raw_of(image, tmp_path)
    assert len(expected) == size - 512
    assert decoded(image, tmp_path) == expected


def test_a_block_map_after_the_data_is_held_then_spilled(tmp_path: Path):
    image = vdi(tmp_path)
    blob = bytearray(image.read_bytes())
    bmap, data = field(image, 340), field(image, 344)
    # The map moves to the end of the file; the data moves up to where it was.
    table = blob[bmap:data]
    blob = blob[:bmap] + blob[data:]
    struct.pack_into("<II", blob, 340, len(blob), bmap)
    blob += table
    moved = tmp_path / "moved.vdi"
    moved.write_bytes(blob)
    expected = raw_of(moved, tmp_path)
    assert expected == raw_of(image, tmp_path)
    for chunk in (4096, 65537, MiB):
        got = decoded(moved, tmp_path, chunk=chunk, memory=64 * KiB, spill_dir=tmp_path)
        assert got == expected
    with pytest.raises(Unsupported, match="before the tables"):
        decoded(moved, tmp_path, chunk=4096, spill_dir=tmp_path, spill_limit=256 * KiB)


@pytest.mark.parametrize(
    ("offset", "value", "match"),
    [
        (68, struct.pack("<I", 0x00010000), "version 1.0"),
        (340, struct.pack("<I", 600), "block map at byte 600"),
        (344, struct.pack("<I", 0x100100 + 7), "not on a sector boundary"),
        (360, struct.pack("<I", 4096), "sector size of 4096"),
        (376, struct.pack("<I", 2 * MiB), "block size of 2097152"),
        (384, struct.pack("<I", 2), "block map of 2 blocks"),
        (384, struct.pack("<I", 0x4000_0000), "1073741824 blocks"),
        (368, struct.pack("<Q", 1 << 60), "qemu reads at most"),
        (368, struct.pack("<Q", 0), "virtual size of 0"),
        (424, b"\1" * 16, "link UUID"),
    ],
)
def test_hostile_headers(tmp_path: Path, offset: int, value: bytes, match: str):
    image = vdi(tmp_path)
    patch(image, offset, value)
    refused(image, tmp_path, "InvalidImage", match)
    if match != "virtual size of 0":  # qemu reads a disk of 0 bytes (diskflow refuses it)
        with pytest.raises(subprocess.CalledProcessError):
            raw_of(image, tmp_path)


def test_a_differencing_image_is_refused(tmp_path: Path):
    image = vdi(tmp_path)
    patch(image, 440, os.urandom(16))
    refused(image, tmp_path, "BackingFileRejected", "differencing image")


def test_a_block_past_the_end(tmp_path: Path):
    image = vdi(tmp_path)
    patch(image, field(image, 340), struct.pack("<I", 1000))
    refused(image, tmp_path, "TruncatedImage", "block 0")
    refused(image, tmp_path, "TruncatedImage", "block 0", known_size=True)


def test_two_blocks_stored_in_one(tmp_path: Path):
    image = vdi(tmp_path, static=True)
    patch(image, field(image, 340), struct.pack("<2I", 0, 0))
    refused(image, tmp_path, "InvalidImage", "more than once")


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("keep", [0.3, 0.7])
def test_truncated_images(tmp_path: Path, static: bool, keep: float):
    blob = vdi(tmp_path, static).read_bytes()
    cut = tmp_path / "cut.vdi"
    cut.write_bytes(blob[: int(len(blob) * keep)])
    refused(cut, tmp_path, "TruncatedImage", "ends after")


def test_an_image_shorter_than_its_header(tmp_path: Path):
    cut = tmp_path / "short.vdi"
    cut.write_bytes(vdi(tmp_path).read_bytes()[:400])
    refused(cut, tmp_path, "TruncatedImage", "shorter than its header")
