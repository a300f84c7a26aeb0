"""Magic-byte detection of compression and disk image formats.

File names and URL suffixes are never trusted: only the bytes decide.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable
from enum import StrEnum

from importer.reasons import Reason

# Enough decompressed bytes to see every signature below (the ISO 9660 one is at 32 KiB).
SNIFF_BYTES = 64 * 1024


class Compression(StrEnum):
    NONE = "none"
    GZIP = "gzip"
    XZ = "xz"
    ZSTD = "zstd"
    BZIP2 = "bzip2"


class DiskFormat(StrEnum):
    RAW = "raw"
    ISO = "iso"
    QCOW2 = "qcow2"
    VMDK = "vmdk"
    VDI = "vdi"
    VPC = "vpc"
    VHDX = "vhdx"
    HTML = "html"

    @property
    def streams(self) -> bool:
        """True when the bytes are the disk itself and can be written in one pass."""
        return self in (DiskFormat.RAW, DiskFormat.ISO)


_COMPRESSION_MAGIC = [
    (b"\x1f\x8b", Compression.GZIP),
    (b"\xfd7zXZ\x00", Compression.XZ),
    (b"\x28\xb5\x2f\xfd", Compression.ZSTD),
]


def detect_compression(head: bytes) -> Compression:
    """Name the compression of a stream from its first bytes (at least 8 where available)."""
    for magic, kind in _COMPRESSION_MAGIC:
        if head.startswith(magic):
            return kind
    # "BZh" then the block size digit, then the block magic (pi in BCD) or end-of-stream.
    if len(head) >= 4 and head[:3] == b"BZh" and head[3:4] in b"123456789":
        return Compression.BZIP2
    return Compression.NONE


# (offset, magic, format). A text vmdk descriptor counts as vmdk so that it is refused with a
# precise message (it names its extents as other files).
_FORMAT_MAGIC = [
    (0, b"QFI\xfb", DiskFormat.QCOW2),
    (0, b"KDMV", DiskFormat.VMDK),
    (0, b"# Disk DescriptorFile", DiskFormat.VMDK),
    (64, b"\x7f\x10\xda\xbe", DiskFormat.VDI),
    (0, b"vhdxfile", DiskFormat.VHDX),
    (0, b"conectix", DiskFormat.VPC),
    (0x8001, b"CD001", DiskFormat.ISO),
]


def detect_format(head: bytes) -> DiskFormat:
    """Name the disk format of decompressed bytes from their first SNIFF_BYTES."""
    for offset, magic, fmt in _FORMAT_MAGIC:
        if head.startswith(magic, offset):
            return fmt
    return DiskFormat.HTML if _looks_like_html(head) else DiskFormat.RAW


_UNSUPPORTED_MAGIC = [
    (b"QED\x00", "qed"),
    (b"LUKS\xba\xbe", "LUKS (encrypted)"),
    (b"WithoutFreeSpace", "parallels"),
    (b"WithouFreSpacExt", "parallels"),
    (b"Bochs Virtual HD Image", "bochs"),
    (b"#!/bin/sh\n#V2.0 Format", "cloop"),
    (b"QFI\xfb\x00\x00\x00\x01", "qcow (version 1)"),
]


def unsupported_format(head: bytes) -> str | None:
    """Name a disk format that qemu-img knows but diskflow refuses to import, if `head` is one."""
    for magic, name in _UNSUPPORTED_MAGIC:
        if head.startswith(magic):
            return name
    return None


def outside_reference(fmt: DiskFormat, head: bytes) -> tuple[Reason, str] | None:
    """(reason, message) if the image header says it reads other files, before qemu-img
    ever opens it; qemu-img's own view is checked again after `qemu-img info`."""
    if head.startswith(b"# Disk DescriptorFile"):
        return Reason.BACKING_FILE_REJECTED, (
            "the image is a vmdk descriptor that refers to other files; import a monolithic vmdk"
        )
    if fmt is DiskFormat.VMDK and len(head) >= 36:
        capacity = int.from_bytes(head[12:20], "little")
        descriptor = int.from_bytes(head[28:36], "little")
        # qemu reads the embedded descriptor's extent list (any host path) when capacity is 0.
        if capacity == 0 and descriptor:
            return Reason.BACKING_FILE_REJECTED, (
                "the vmdk header has no capacity and defers to its embedded descriptor, which "
                "may name other files; import a monolithic vmdk"
            )
    # qemu reads a differencing VHD as a dynamic one: the parent's data as holes.
    if fmt is DiskFormat.VPC and int.from_bytes(head[60:64], "big") == _VHD_DIFFERENCING:
        return Reason.BACKING_FILE_REJECTED, (
            "the VHD is a differencing disk: its data is in a parent image"
        )
    if fmt is DiskFormat.QCOW2 and len(head) >= 80:
        version = int.from_bytes(head[4:8], "big")
        if int.from_bytes(head[8:16], "big"):
            return Reason.BACKING_FILE_REJECTED, "the qcow2 image names a backing file"
        incompatible = int.from_bytes(head[72:80], "big") if version >= 3 else 0
        if incompatible & _QCOW2_EXTERNAL_DATA_FILE:
            return Reason.DATA_FILE_REJECTED, "the qcow2 image uses an external data file"
    return None


_QCOW2_EXTERNAL_DATA_FILE = 1 << 2
_VHD_DIFFERENCING = 4


def _looks_like_html(head: bytes) -> bool:
    start = head[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return start.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body"))


VHD_FOOTER_SIZE = 512
_VHD_FIXED = 2


def fixed_vhd_disk_size(footer: bytes) -> int | None:
    """Return the disk size if `footer` is a fixed VHD footer, else None.

    A fixed VHD is the raw disk followed by a 512-byte footer, so it streams as raw and the
    footer is cut off at the end.
    """
    if len(footer) != VHD_FOOTER_SIZE or not footer.startswith(b"conectix"):
        return None
    (current_size,) = struct.unpack_from(">Q", footer, 48)
    (disk_type,) = struct.unpack_from(">I", footer, 60)
    return current_size if disk_type == _VHD_FIXED else None


def header_virtual_size(fmt: DiskFormat, read: Callable[[int, int], bytes | None]) -> int | None:
    """The virtual size an image's header declares, read through `read(offset, length)`
    (None while those bytes have not arrived); None when it cannot be told (yet).

    Lets an image too large for the volume be refused as soon as its header has arrived,
    before the rest of it is downloaded. qemu-img's view is checked again after the download.
    """
    if fmt is DiskFormat.QCOW2:
        return _field(read, 24, ">Q")
    if fmt is DiskFormat.VMDK:
        sectors = _field(read, 12, "<Q")
        return None if sectors is None else sectors * 512
    if fmt is DiskFormat.VDI:
        return _field(read, 368, "<Q")
    if fmt is DiskFormat.VPC:
        # The copy of the footer at the start. qemu takes the size from the geometry for
        # images made by some creators: the smaller of the two never refuses a fitting image.
        footer = read(0, 64)
        if footer is None:
            return None
        (current,) = struct.unpack_from(">Q", footer, 48)
        cylinders, heads, sectors = struct.unpack_from(">HBB", footer, 56)
        return min(current, cylinders * heads * sectors * 512)
    if fmt is DiskFormat.VHDX:
        return _vhdx_virtual_size(read)
    return None


def _field(read: Callable[[int, int], bytes | None], offset: int, layout: str) -> int | None:
    data = read(offset, struct.calcsize(layout))
    return None if data is None else struct.unpack(layout, data)[0]


_VHDX_REGION_TABLE = 192 << 10
_VHDX_METADATA_REGION = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E").bytes_le
_VHDX_VIRTUAL_DISK_SIZE = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8").bytes_le


def _vhdx_virtual_size(read: Callable[[int, int], bytes | None]) -> int | None:
    # Region table → metadata region → metadata table → the Virtual Disk Size item.
    header = read(_VHDX_REGION_TABLE, 16)
    if header is None or header[:4] != b"regi":
        return None
    (count,) = struct.unpack_from("<I", header, 8)
    region = _vhdx_entry(read, _VHDX_REGION_TABLE + 16, count, _VHDX_METADATA_REGION, "<Q")
    if region is None:
        return None
    table = read(region, 32)
    if table is None or table[:8] != b"metadata":
        return None
    (count,) = struct.unpack_from("<H", table, 10)
    item = _vhdx_entry(read, region + 32, count, _VHDX_VIRTUAL_DISK_SIZE, "<I")
    return None if item is None else _field(read, region + item, "<Q")


def _vhdx_entry(
    read: Callable[[int, int], bytes | None], offset: int, count: int, guid: bytes, layout: str
) -> int | None:
    """The field (`layout`) after `guid` in a VHDX table of `count` 32-byte entries."""
    count = min(count, 2047)  # the format's own limit: a lying header costs no more
    entries = read(offset, 32 * count)
    if entries is None:
        return None
    for i in range(count):
        if entries[32 * i : 32 * i + 16] == guid:
            return struct.unpack_from(layout, entries, 32 * i + 16)[0]
    return None
