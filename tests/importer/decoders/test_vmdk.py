"""The VMDK stream decoder against qemu-img: what it writes is what `qemu-img convert -O raw`
writes, byte for byte, or it refuses the image with a precise error."""

from __future__ import annotations

import os
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from importer.decoders import Unsupported
from tests.support.decoding import decoded, field, patch, qemu_img, qemu_raw, refused

KiB, MiB = 1 << 10, 1 << 20
CHUNKS = [512, 4096, 65537, MiB]
GRAIN = 64 * KiB
GD_AT_END = 0xFFFF_FFFF_FFFF_FFFF


def raw_of(image: Path, tmp_path: Path) -> bytes:
    return qemu_raw(image, tmp_path)


def pattern(size: int = 3 * MiB + 1536) -> bytes:
    """Random data, a zero grain, holes, data straddling grains, a partial last grain."""
    data = bytearray(size)
    data[: 70 * KiB] = os.urandom(70 * KiB)  # one grain and a bit (incompressible)
    data[128 * KiB : 192 * KiB] = b"text " * (64 * KiB // 5) + b"t"  # compressible
    data[MiB - 100 : MiB + 100] = b"x" * 200  # straddles two grains
    data[2 * MiB + 4096 : 2 * MiB + 4196] = os.urandom(100)
    data[-512:] = b"y" * 512  # in the partial last grain
    return bytes(data)


def vmdk(tmp_path: Path, subformat: str, data: bytes | None = None, name: str = "d") -> Path:
    raw = tmp_path / f"{name}.raw"
    raw.write_bytes(pattern() if data is None else data)
    image = tmp_path / f"{name}.{subformat}.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={subformat}", raw, image)
    return image


# A VMware-style stream: grains, then their grain tables, the grain directory, the footer and
# the end-of-stream marker, each in a marker; the header says the directory is at the end.

DESCRIPTOR = (
    b"# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n"
    b'createType="streamOptimized"\n\n# Extent description\nRW %d SPARSE "s.vmdk"\n'
)


def sector_pad(data: bytes | bytearray) -> bytes:
    return bytes(data) + bytes(-len(data) % 512)


def vmdk_header(capacity: int, granularity: int, gtes: int, gd_offset: int, flags: int) -> bytes:
    return b"KDMV" + struct.pack(
        "<IIQQQQIQQQ", 3, flags, capacity, granularity, 1, 20, gtes, 0, gd_offset, 128
    ) + b"\0\n \r\n" + struct.pack("<H", 1)  # fmt: skip


def metadata_marker(sectors: int, kind: int) -> bytes:
    return sector_pad(struct.pack("<QII", sectors, 0, kind))


def vmware_stream(
    data: bytes,
    *,
    granularity: int = 128,
    gtes: int = 512,
    lba_of=lambda lba: lba,
    after_eos: bytes = b"",
    footer_capacity: int | None = None,
) -> bytes:
    capacity = len(data) // 512
    flags = 0x30001  # newline detection, compressed, markers
    out = bytearray(sector_pad(vmdk_header(capacity, granularity, gtes, GD_AT_END, flags)))
    out += sector_pad(DESCRIPTOR % capacity).ljust(20 * 512, b"\0")
    out = out.ljust(128 * 512, b"\0")
    grain = granularity * 512
    per_table = gtes * granularity
    directory = []
    for first in range(0, capacity, per_table):
        table = [0] * gtes
        for slot in range(gtes):
            lba = first + slot * granularity
            chunk = data[lba * 512 : lba * 512 + grain]
            if lba >= capacity or not chunk.strip(b"\0"):
                continue
            table[slot] = len(out) // 512
            packed = zlib.compress(chunk)
            out += sector_pad(struct.pack("<QI", lba_of(lba), len(packed)) + packed)
        if any(table):
            body = sector_pad(struct.pack(f"<{gtes}I", *table))
            out += metadata_marker(len(body) // 512, 1)
            directory.append(len(out) // 512)
            out += body
        else:
            directory.append(0)
    body = sector_pad(struct.pack(f"<{len(directory)}I", *directory))
    out += metadata_marker(len(body) // 512, 2)
    gd_offset = len(out) // 512
    out += body
    out += metadata_marker(1, 3)
    last = footer_capacity if footer_capacity is not None else capacity
    out += sector_pad(vmdk_header(last, granularity, gtes, gd_offset, flags))
    out += metadata_marker(0, 0)
    return bytes(out + after_eos)


# Round trips.


@pytest.mark.parametrize(
    "subformat",
    [
        "streamOptimized",
        "monolithicSparse",
        "streamOptimized,zeroed_grain=on",
        "monolithicSparse,zeroed_grain=on",
    ],
)
@pytest.mark.parametrize("chunk", CHUNKS)
def test_qemu_made_images_decode_as_qemu_reads_them(tmp_path: Path, subformat: str, chunk: int):
    image = vmdk(tmp_path, subformat)
    assert decoded(image, tmp_path, chunk=chunk) == raw_of(image, tmp_path)


@pytest.mark.parametrize("subformat", ["streamOptimized", "monolithicSparse"])
def test_a_known_file_size_changes_nothing(tmp_path: Path, subformat: str):
    image = vmdk(tmp_path, subformat)
    assert decoded(image, tmp_path, known_size=True) == raw_of(image, tmp_path)


@pytest.mark.parametrize("subformat", ["streamOptimized", "monolithicSparse"])
def test_an_empty_disk(tmp_path: Path, subformat: str):
    image = vmdk(tmp_path, subformat, bytes(2 * MiB))
    assert decoded(image, tmp_path) == bytes(2 * MiB) == raw_of(image, tmp_path)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize(("granularity", "gtes"), [(128, 512), (16, 128), (8, 7)])
def test_vmware_streams_with_the_directory_at_the_end(
    tmp_path: Path, chunk: int, granularity: int, gtes: int
):
    data = pattern()
    image = tmp_path / "vmware.vmdk"
    image.write_bytes(vmware_stream(data, granularity=granularity, gtes=gtes))
    assert raw_of(image, tmp_path) == data  # qemu reads the stream as built
    assert decoded(image, tmp_path, chunk=chunk) == data
    assert decoded(image, tmp_path, chunk=chunk, known_size=True) == data


def test_a_zeroed_grain_entry_reads_as_zeros(tmp_path: Path):
    image = vmdk(tmp_path, "monolithicSparse")
    gd = field(image, 56, "<Q") * 512
    gt = field(image, gd, "<I") * 512
    patch(image, 8, struct.pack("<I", field(image, 8, "<I") | 4))  # zeroed-grain flag
    patch(image, gt, struct.pack("<I", 1))  # grain 0: zeroed
    expected = raw_of(image, tmp_path)
    assert expected[:GRAIN] == bytes(GRAIN)
    assert decoded(image, tmp_path) == expected


@pytest.mark.parametrize("subformat", ["streamOptimized", "monolithicSparse"])
def test_tables_after_the_grains_are_held_then_spilled(tmp_path: Path, subformat: str):
    """An image rewritten with its grain directory and tables at the end: the grains arrive
    before anything maps them."""
    image = vmdk(tmp_path, subformat)
    blob = bytearray(image.read_bytes())
    gd = struct.unpack_from("<Q", blob, 56)[0] * 512
    gtes = struct.unpack_from("<I", blob, 44)[0]
    entries = -(-struct.unpack_from("<Q", blob, 12)[0] // (128 * gtes))
    directory = list(struct.unpack_from(f"<{entries}I", blob, gd))
    end = len(blob) // 512
    tables = bytearray()
    for i, sector in enumerate(directory):
        if sector:
            tables += blob[sector * 512 : sector * 512 + gtes * 4]
            directory[i] = end + 1 + (len(tables) - gtes * 4) // 512
    blob += sector_pad(struct.pack(f"<{entries}I", *directory)) + sector_pad(tables)
    struct.pack_into("<Q", blob, 56, end)
    moved = tmp_path / "moved.vmdk"
    moved.write_bytes(blob)
    expected = raw_of(moved, tmp_path)
    assert expected == raw_of(image, tmp_path)
    for chunk in (4096, 65537, MiB):
        got = decoded(moved, tmp_path, chunk=chunk, memory=64 * KiB, spill_dir=tmp_path)
        assert got == expected
    with pytest.raises(Unsupported, match="scratch directory"):
        decoded(moved, tmp_path, chunk=4096, memory=64 * KiB)
    with pytest.raises(Unsupported, match="before the tables"):
        decoded(moved, tmp_path, chunk=4096, spill_dir=tmp_path, spill_limit=128 * KiB)


# Disagreements between the grains and the tables qemu reads.


def test_a_grain_marker_lba_that_disagrees_with_the_grain_table(tmp_path: Path):
    image = vmdk(tmp_path, "streamOptimized")
    first = field(image, 64, "<Q") * 512  # qemu-img's first grain, for sector 0
    patch(image, first, struct.pack("<Q", 128))
    refused(image, tmp_path, "InvalidImage", "grain marker at sector 128 is for disk sector 128")


def test_a_stream_grain_at_the_wrong_lba(tmp_path: Path):
    image = tmp_path / "wrong.vmdk"
    image.write_bytes(vmware_stream(pattern(), lba_of=lambda lba: lba + 128 * (lba == 0)))
    refused(image, tmp_path, "InvalidImage", "two grains for disk sector 128")
    image.write_bytes(vmware_stream(pattern(), lba_of=lambda lba: 1024 if lba == 0 else lba))
    refused(image, tmp_path, "InvalidImage", "grain table entry for disk sector 0 points to")


def test_a_stream_grain_its_tables_leave_unmapped(tmp_path: Path):
    blob = bytearray(vmware_stream(pattern()))
    gd_offset = struct.unpack_from("<Q", blob, len(blob) - 1024 + 4 + 52)[0]
    table = struct.unpack_from("<I", blob, gd_offset * 512)[0] * 512
    struct.pack_into("<I", blob, table, 0)  # grain 0: the table says unallocated
    image = tmp_path / "unmapped.vmdk"
    image.write_bytes(blob)
    assert raw_of(image, tmp_path)[:GRAIN] == bytes(GRAIN)  # qemu reads zeros there
    refused(image, tmp_path, "InvalidImage", "grain for disk sector 0 .* leave unmapped")


def test_a_stream_whose_footer_is_not_where_qemu_reads_it(tmp_path: Path):
    image = tmp_path / "after.vmdk"
    image.write_bytes(vmware_stream(pattern(), after_eos=bytes(512)))
    refused(image, tmp_path, "InvalidImage", "not where qemu reads it")


def test_a_stream_whose_footer_disagrees_with_its_header(tmp_path: Path):
    image = tmp_path / "footer.vmdk"
    data = pattern()
    image.write_bytes(vmware_stream(data, footer_capacity=len(data) // 512 - 128))
    refused(image, tmp_path, "InvalidImage", r"footer's capacity \(\d+\) differs")


# Hostile or broken headers.


@pytest.mark.parametrize(
    ("offset", "value", "match"),
    [
        (4, struct.pack("<I", 4), "version 4: qemu reads versions up to 3"),
        (44, struct.pack("<I", 1024), "1024 entries per grain table"),
        (20, struct.pack("<Q", 0), "a grain directory entry must cover something"),
        (20, struct.pack("<Q", 0x400000), "grains of 4194304 sectors"),
        (12, struct.pack("<Q", 0), "capacity of 0"),
        (12, struct.pack("<Q", 1 << 42), "grain directory of 67108864 entries"),
    ],
)
def test_hostile_headers(tmp_path: Path, offset: int, value: bytes, match: str):
    image = vmdk(tmp_path, "monolithicSparse")
    patch(image, 28, struct.pack("<Q", 0))  # no descriptor offset: a capacity of 0 is ours
    patch(image, offset, value)
    refused(image, tmp_path, "InvalidImage", match)
    if match != "capacity of 0":  # qemu reads a disk of 0 bytes (diskflow refuses it)
        with pytest.raises(subprocess.CalledProcessError):
            raw_of(image, tmp_path)


def test_a_descriptor_naming_a_parent_is_refused(tmp_path: Path):
    image = vmdk(tmp_path, "streamOptimized")
    text = image.read_bytes()[512 : 512 + 10240]
    hint = b'parentFileNameHint="/etc/base.vmdk"\n'
    patch(image, 512 + text.index(b"\0"), hint)
    refused(image, tmp_path, "BackingFileRejected", "names a backing file")


def test_a_descriptor_without_a_cid_is_refused_as_qemu_does(tmp_path: Path):
    image = vmdk(tmp_path, "monolithicSparse")
    text = image.read_bytes()[512 : 512 + 10240]
    patch(image, 512, text.replace(b"CID=", b"XYZ="))
    with pytest.raises(subprocess.CalledProcessError):
        raw_of(image, tmp_path)
    refused(image, tmp_path, "InvalidImage", "has no CID")


def test_a_compressed_grain_larger_than_two_grains(tmp_path: Path):
    image = vmdk(tmp_path, "streamOptimized")
    first = field(image, 64, "<Q") * 512
    patch(image, first + 8, struct.pack("<I", 2 * GRAIN))
    refused(image, tmp_path, "InvalidImage", "compressed size of 131072 bytes")


def test_a_grain_that_does_not_inflate(tmp_path: Path):
    image = vmdk(tmp_path, "streamOptimized")
    first = field(image, 64, "<Q") * 512
    patch(image, first + 12, b"\xff" * 16)
    refused(image, tmp_path, "InvalidImage", "does not inflate")


def test_a_grain_table_entry_past_the_end(tmp_path: Path):
    image = vmdk(tmp_path, "monolithicSparse")
    gd = field(image, 56, "<Q") * 512
    gt = field(image, gd, "<I") * 512
    patch(image, gt, struct.pack("<I", 1 << 24))
    refused(image, tmp_path, "TruncatedImage", "grain for disk sector 0")
    refused(image, tmp_path, "TruncatedImage", "grain for disk sector 0", known_size=True)


def test_two_grain_table_entries_for_one_grain(tmp_path: Path):
    image = vmdk(tmp_path, "monolithicSparse")
    gd = field(image, 56, "<Q") * 512
    gt = field(image, gd, "<I") * 512
    patch(image, gt + 4, struct.pack("<I", field(image, gt, "<I")))
    refused(image, tmp_path, "InvalidImage", "more than once")


# Truncated files.


@pytest.mark.parametrize("subformat", ["streamOptimized", "monolithicSparse"])
@pytest.mark.parametrize("keep", [0.3, 0.6])
def test_truncated_images(tmp_path: Path, subformat: str, keep: float):
    image = vmdk(tmp_path, subformat)
    blob = image.read_bytes()
    cut = tmp_path / "cut.vmdk"
    cut.write_bytes(blob[: int(len(blob) * keep) // 512 * 512])
    refused(cut, tmp_path, "TruncatedImage", "ends after")


def test_a_truncated_stream(tmp_path: Path):
    blob = vmware_stream(pattern())
    cut = tmp_path / "cut.vmdk"
    for size in (len(blob) // 2, len(blob) - 512):
        cut.write_bytes(blob[:size])
        refused(cut, tmp_path, "TruncatedImage", "ends after")


def test_a_stream_header_qemu_ignores_is_not_streamed(tmp_path: Path):
    """With the directory at the end, qemu reads only the footer's header: a first header it
    would refuse is left to qemu."""
    data = pattern()
    blob = bytearray(vmware_stream(data))
    struct.pack_into("<I", blob, 44, 1024)  # 1024 entries per grain table, in the first header
    image = tmp_path / "header.vmdk"
    image.write_bytes(blob)
    assert raw_of(image, tmp_path) == data
    with pytest.raises(Unsupported, match="qemu would read the footer's"):
        decoded(image, tmp_path)


def test_an_image_shorter_than_its_header(tmp_path: Path):
    cut = tmp_path / "short.vmdk"
    cut.write_bytes(vmdk(tmp_path, "monolithicSparse").read_bytes()[:60])
    refused(cut, tmp_path, "TruncatedImage", "shorter than its header")


def test_a_grain_directory_larger_than_a_stream_reads(tmp_path: Path):
    image = vmdk(tmp_path, "monolithicSparse")
    patch(image, 20, struct.pack("<Q", 8))  # 4 KiB grains,
    patch(image, 44, struct.pack("<I", 1))  # one per grain table: 4 KiB per directory entry
    patch(image, 12, struct.pack("<Q", 1 << 28))  # of a 128 GiB disk: 32 Mi entries
    with pytest.raises(Unsupported, match="grain directory is 134217728 bytes"):
        decoded(image, tmp_path)


def test_a_redundant_directory_qemu_cannot_read(tmp_path: Path):
    """qemu reads the redundant grain directory (and never uses it): past the block layer's
    limit, the open fails."""
    image = vmdk(tmp_path, "monolithicSparse")
    patch(image, 48, struct.pack("<Q", (1 << 63) - 1))
    with pytest.raises(subprocess.CalledProcessError):
        raw_of(image, tmp_path)
    refused(image, tmp_path, "InvalidImage", "redundant grain directory")
    beyond = vmdk(tmp_path, "monolithicSparse", name="beyond")
    patch(beyond, 48, struct.pack("<Q", beyond.stat().st_size // 512 + 100))
    assert decoded(beyond, tmp_path) == raw_of(beyond, tmp_path)  # past the end: zeros, unused
