"""The dynamic VHD stream decoder against qemu-img: what it writes is what
`qemu-img convert -O raw` writes, byte for byte, or it refuses the image precisely."""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import pytest

from importer.decoders import Unsupported
from tests.support.decoding import decoded, qemu_img, qemu_raw, refused

KiB, MiB = 1 << 10, 1 << 20
CHUNKS = [512, 4096, 65537, MiB]


def raw_of(image: Path, tmp_path: Path) -> bytes:
    return qemu_raw(image, tmp_path, "vpc")


def patch(path: Path, offset: int, data: bytes) -> None:
    """Write `data` at `offset`; keep the footer copy's checksum right when it is in it."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
        if offset < 512:
            f.seek(0)
            footer = bytearray(f.read(512))
            footer[64:68] = bytes(4)
            f.seek(64)
            f.write(struct.pack(">I", ~sum(footer) & 0xFFFF_FFFF))


def pattern(size: int = 5 * MiB + 1536) -> bytes:
    """Data, a zero block, holes, data straddling blocks, a partial last block."""
    data = bytearray(size)
    data[: 70 * KiB] = os.urandom(70 * KiB)
    data[2 * MiB - 100 : 2 * MiB + 100] = b"x" * 200  # straddles two 2 MiB blocks
    data[-512:] = b"y" * 512
    return bytes(data)


def vhd(tmp_path: Path, options: str = "subformat=dynamic", data: bytes | None = None) -> Path:
    raw = tmp_path / "d.raw"
    raw.write_bytes(pattern() if data is None else data)
    image = tmp_path / f"d.{options.replace('=', '-').replace(',', '.')}.vhd"
    qemu_img("convert", "-f", "raw", "-O", "vpc", "-o", options, raw, image)
    return image


def footer(size: int, creator: bytes = b"qem2", chs: tuple = (65535, 16, 255), kind=3) -> bytes:
    head = b"conectix" + struct.pack(">IIQI", 2, 0x10000, 512, 0) + creator
    head += struct.pack(">HH4sQQHBBI", 5, 0, b"Wi2k", size, size, *chs, kind)
    body = head + b"\0" * 4 + os.urandom(16) + b"\0"
    checksum = ~sum(body) & 0xFFFF_FFFF
    return (head + struct.pack(">I", checksum) + body[len(head) + 4 :]).ljust(512, b"\0")


def build(
    data: bytes,
    block: int,
    *,
    bat_last: bool = False,
    bitmap_byte: int = 0xFF,
    creator: bytes = b"qem2",
    chs: tuple = (65535, 16, 255),
    size: int | None = None,
) -> bytes:
    """A dynamic VHD of `data` with blocks of `block` bytes (zero blocks unallocated); its
    BAT after the blocks with `bat_last`."""
    size = len(data) if size is None else size
    blocks = -(-len(data) // block)
    bitmap = ((block // 4096) + 511) & ~511
    bat_bytes = -(-blocks * 4 // 512) * 512
    start = 1536 + (0 if bat_last else bat_bytes)
    bat = [0xFFFF_FFFF] * blocks
    body = bytearray()
    for i in range(blocks):
        chunk = data[i * block : (i + 1) * block].ljust(block, b"\0")
        if chunk.strip(b"\0"):
            bat[i] = (start + len(body)) // 512
            body += bytes([bitmap_byte]) * bitmap + chunk
    table = struct.pack(f">{blocks}I", *bat).ljust(bat_bytes, b"\xff")
    bat_offset = start + len(body) if bat_last else 1536
    dyn = b"cxsparse" + struct.pack(">QQIII", 2**64 - 1, bat_offset, 0x10000, blocks, block)
    dyn = dyn.ljust(1024, b"\0")
    foot = footer(size, creator, chs)
    out = foot + dyn + (b"" if bat_last else table) + body + (table if bat_last else b"")
    return out + foot


def write(tmp_path: Path, name: str, blob: bytes) -> Path:
    image = tmp_path / name
    image.write_bytes(blob)
    return image


# Round trips.


@pytest.mark.parametrize("options", ["subformat=dynamic", "subformat=dynamic,force_size=on"])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_qemu_made_images_decode_as_qemu_reads_them(tmp_path: Path, options: str, chunk: int):
    image = vhd(tmp_path, options)
    expected = raw_of(image, tmp_path)
    assert decoded(image, tmp_path, chunk=chunk) == expected
    assert decoded(image, tmp_path, chunk=chunk, known_size=True) == expected


def test_geometry_sizes_the_disk_unless_forced(tmp_path: Path):
    size = len(pattern())
    assert len(raw_of(vhd(tmp_path), tmp_path)) > size  # qemu rounds up to a CHS geometry
    assert len(raw_of(vhd(tmp_path, "subformat=dynamic,force_size=on"), tmp_path)) == size


@pytest.mark.parametrize(
    ("creator", "chs"),
    [
        (b"qemu", (3, 16, 63)),  # geometry: 3 * 16 * 63 sectors
        (b"vpc ", (3, 16, 63)),
        (b"wa\0\0", (3, 16, 63)),  # qemu 7.2: an unknown creator reads by geometry
        (b"tap\0", (3, 16, 63)),  # current size
        (b"tap ", (3, 16, 63)),  # not "tap\0": geometry
        (b"win ", (3, 16, 63)),
        (b"d2v ", (3, 16, 63)),
        (b"CTXS", (3, 16, 63)),
        (b"qemu", (65535, 16, 255)),  # the largest geometry: current size
    ],
)
def test_the_virtual_size_follows_qemus_rules(tmp_path: Path, creator: bytes, chs: tuple):
    data = pattern(3 * MiB)
    image = write(tmp_path, "g.vhd", build(data, 2 * MiB, creator=creator, chs=chs))
    expected = raw_of(image, tmp_path)
    assert len(expected) in (3 * 16 * 63 * 512, len(data))
    assert decoded(image, tmp_path) == expected


def test_a_geometry_larger_than_the_bat(tmp_path: Path):
    image = write(
        tmp_path, "g.vhd", build(pattern(3 * MiB), 2 * MiB, creator=b"vpc ", chs=(100, 16, 63))
    )
    with pytest.raises(subprocess.CalledProcessError):
        raw_of(image, tmp_path)  # "Page table too small"
    refused(image, tmp_path, "InvalidImage", "less than the disk's 51609600 bytes")


@pytest.mark.parametrize("block", [512, 4 * KiB, 512 * KiB, 2 * MiB, 8 * MiB])
@pytest.mark.parametrize("chunk", [4096, 65537])
def test_other_block_sizes(tmp_path: Path, block: int, chunk: int):
    data = pattern()
    image = write(tmp_path, "b.vhd", build(data, block))
    assert raw_of(image, tmp_path) == data
    assert decoded(image, tmp_path, chunk=chunk) == data


def test_the_sector_bitmap_is_not_read(tmp_path: Path):
    data = pattern()
    image = write(tmp_path, "bitmap.vhd", build(data, 2 * MiB, bitmap_byte=0))
    assert raw_of(image, tmp_path) == data  # qemu reads the data the bitmap says is unused
    assert decoded(image, tmp_path) == data


def test_a_bat_after_the_blocks_is_held_then_spilled(tmp_path: Path):
    data = pattern()
    image = write(tmp_path, "late.vhd", build(data, 512 * KiB, bat_last=True))
    assert raw_of(image, tmp_path) == data
    for chunk in (4096, 65537, MiB):
        assert decoded(image, tmp_path, chunk=chunk, memory=64 * KiB, spill_dir=tmp_path) == data
    with pytest.raises(Unsupported, match="scratch directory"):
        decoded(image, tmp_path, chunk=4096, memory=64 * KiB)


# Refused.


def test_a_differencing_disk_is_refused(tmp_path: Path):
    image = vhd(tmp_path)
    patch(image, 60, struct.pack(">I", 4))
    refused(image, tmp_path, "BackingFileRejected", "differencing disk")


def test_a_fixed_disk_with_a_footer_copy_is_not_streamed(tmp_path: Path):
    image = vhd(tmp_path)
    patch(image, 60, struct.pack(">I", 2))
    with pytest.raises(Unsupported, match="fixed disk"):
        decoded(image, tmp_path)


@pytest.mark.parametrize(
    ("offset", "value", "match"),
    [
        (512, b"cxsparsX", "no cxsparse magic"),
        (512 + 32, struct.pack(">I", 3 * MiB), "block size of 3145728 bytes"),
        (512 + 32, struct.pack(">I", 256), "block size of 256 bytes"),
        (512 + 28, struct.pack(">I", 1), "block allocation table has 1 entries"),
        (512 + 28, struct.pack(">I", 1 << 30), "too many for qemu"),
        (48, struct.pack(">Q", 1 << 60), "qemu reads at most"),
        (48, struct.pack(">Q", 0), "virtual size of 0"),
    ],
)
def test_hostile_headers(tmp_path: Path, offset: int, value: bytes, match: str):
    image = vhd(tmp_path, "subformat=dynamic,force_size=on")
    patch(image, offset, value)
    refused(image, tmp_path, "InvalidImage", match)
    if match != "virtual size of 0":  # qemu reads a disk of 0 bytes (diskflow refuses it)
        with pytest.raises(subprocess.CalledProcessError):
            raw_of(image, tmp_path)


def test_a_bat_entry_past_the_end(tmp_path: Path):
    image = vhd(tmp_path, "subformat=dynamic,force_size=on")
    patch(image, 1536, struct.pack(">I", 1 << 24))
    refused(image, tmp_path, "TruncatedImage", "block 0")
    refused(image, tmp_path, "TruncatedImage", "block 0", known_size=True)


def test_a_bat_entry_past_the_disk_and_the_file(tmp_path: Path):
    """qemu refuses an image whose BAT names a block past the end of the file, even one
    outside the disk."""
    data = pattern(3 * MiB)
    blob = bytearray(build(data, 2 * MiB))
    struct.pack_into(">I", blob, 512 + 28, 8)  # 8 entries for a 2-block disk
    struct.pack_into(
        ">8I", blob, 1536, *struct.unpack_from(">2I", blob, 1536), *[0xFFFFFFFF] * 5, 1 << 20
    )
    image = write(tmp_path, "far.vhd", bytes(blob))
    with pytest.raises(subprocess.CalledProcessError):
        raw_of(image, tmp_path)
    refused(image, tmp_path, "TruncatedImage", "blocks it names end at byte")


def test_two_bat_entries_for_one_block(tmp_path: Path):
    image = vhd(tmp_path, "subformat=dynamic,force_size=on")
    with open(image, "rb") as f:
        f.seek(1536)
        first = f.read(4)
    patch(image, 1540, first)
    refused(image, tmp_path, "InvalidImage", "more than once")


@pytest.mark.parametrize("keep", [0.3, 0.7])
def test_truncated_images(tmp_path: Path, keep: float):
    blob = vhd(tmp_path, "subformat=dynamic,force_size=on").read_bytes()
    cut = write(tmp_path, "cut.vhd", blob[: int(len(blob) * keep)])
    refused(cut, tmp_path, "TruncatedImage", "ends after")


def test_a_footer_checksum_mismatch_is_refused_as_qemu_does(tmp_path: Path):
    image = vhd(tmp_path)
    with open(image, "r+b") as f:
        f.seek(36)
        f.write(b"Mac ")  # the creator OS, without fixing the checksum
    with pytest.raises(subprocess.CalledProcessError):
        raw_of(image, tmp_path)
    refused(image, tmp_path, "InvalidImage", "footer has checksum")


def test_an_image_shorter_than_its_footer(tmp_path: Path):
    cut = write(tmp_path, "short.vhd", vhd(tmp_path).read_bytes()[:300])
    refused(cut, tmp_path, "TruncatedImage", "shorter than its footer")
