"""VHD (Virtual PC, "vpc") stream decoder: dynamic disks.

What qemu-img 7.2 reads (block/vpc.c) is what is decoded, byte for byte:

- The footer copy at byte 0 ("conectix"), with its checksum (qemu 7.2 refuses a mismatch;
  older versions only warned). The dynamic header's checksum is not checked, as by qemu.
- The virtual size: the CHS geometry (cylinders x heads x sectors x 512), except when the
  creator application is one that sizes disks by the footer's current_size ("win ",
  "qem2" [qemu-img's force_size=on], "d2v ", "CTXS", "tap\\0") or the geometry is the
  largest there is (65535 x 16 x 255): then current_size, rounded down to a sector. More
  than 0xff000000 sectors is refused. (qemu 10 inverted the creator test: only "vpc " and
  "qemu" use the geometry. This follows 7.2, the qemu-img diskflow falls back to.)
- The dynamic disk header ("cxsparse") at the footer's data offset: a block size that is a
  power of two of at least 512, a block allocation table (BAT) of max_table_entries
  entries at table_offset that covers the disk, and no more than INT_MAX / 4 entries.
- Block i of the disk is unallocated (zeros) when BAT[i] is 0xFFFFFFFF; otherwise its data
  is at sector BAT[i], after the block's sector bitmap (qemu: `((block_size / (8 * 512)) +
  511) & ~511` bytes). qemu never reads the sector bitmap: a sector the bitmap marks unused
  still reads from the block.
- qemu refuses a file shorter than the end of its BAT or of any block the BAT names
  (even one past the disk's end): TruncatedImage here too.

Refused or not streamed:

- A differencing disk (footer type 4) reads its parent: BackingFileRejected. (qemu 7.2
  itself ignores the parent and reads such a disk as if it were dynamic, so `qemu-img info`
  shows no backing file: the scratch path would not refuse it.)
- A fixed disk (type 2) streams as raw and never gets here; with a footer copy at byte 0
  it is Unsupported (qemu would read the footer copy as disk data).
- A BAT larger than importer.decoders.layout.MAX_NEED (64 MiB: 16 Mi blocks): Unsupported.
"""

from __future__ import annotations

import struct
import sys
from array import array

from importer.decoders import Unsupported
from importer.decoders.layout import MAX_NEED, Layout
from importer.errors import FinalError

SECTOR = 512
FOOTER_SIZE = 512
DYN_HEADER_SIZE = 1024
UNALLOCATED = 0xFFFF_FFFF
MAX_SECTORS = 0xFF00_0000  # qemu: "Allow a maximum disk size of 2040 GiB"
MAX_GEOMETRY = 65535 * 16 * 255
TYPE_FIXED, TYPE_DYNAMIC, TYPE_DIFFERENCING = 2, 3, 4
CURRENT_SIZE_CREATORS = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")
INT_MAX = (1 << 31) - 1


def _invalid(message: str) -> FinalError:
    return FinalError("InvalidImage", f"the vhd image {message}")


def virtual_sectors(footer: bytes | bytearray) -> int:
    """The disk's size in sectors, as qemu 7.2's vpc_open computes it."""
    (current_size,) = struct.unpack_from(">Q", footer, 48)
    cylinders, heads, sectors = struct.unpack_from(">HBB", footer, 56)
    total = cylinders * heads * sectors
    creator = bytes(footer[28:32])
    if creator in CURRENT_SIZE_CREATORS or total == MAX_GEOMETRY:
        total = current_size // SECTOR
    return total


def open_image(head: bytes, layout: Layout) -> None:
    if len(head) < FOOTER_SIZE:
        raise FinalError(
            "TruncatedImage", f"the vhd image is {len(head)} bytes, shorter than its footer"
        )
    if head[:8] != b"conectix":
        raise _invalid("has no footer copy (conectix) at byte 0")
    (stored,) = struct.unpack_from(">I", head, 64)
    computed = ~(sum(head[:64]) + sum(head[68:FOOTER_SIZE])) & 0xFFFF_FFFF
    if stored != computed:
        raise _invalid(f"footer has checksum {stored:#010x}, but its bytes sum to {computed:#010x}")
    (disk_type,) = struct.unpack_from(">I", head, 60)
    if disk_type == TYPE_DIFFERENCING:
        raise FinalError(
            "BackingFileRejected",
            "the vhd image is a differencing disk: its data is read through a parent image",
        )
    if disk_type == TYPE_FIXED:
        raise Unsupported("the vhd image is a fixed disk with a footer copy at its start")
    sectors = virtual_sectors(head)
    if sectors > MAX_SECTORS:
        raise _invalid(f"is {sectors} sectors: qemu reads at most {MAX_SECTORS}")
    if sectors == 0:
        raise _invalid("has a virtual size of 0 bytes")
    disk = sectors * SECTOR
    layout.declare(disk)
    (data_offset,) = struct.unpack_from(">Q", head, 16)
    _Dynamic(layout, disk).start(head, data_offset)


class _Dynamic:
    def __init__(self, layout: Layout, disk: int) -> None:
        self.layout = layout
        self.disk = disk
        self.block = 0
        self.bitmap = 0
        self.bat_offset = 0

    def start(self, head: bytes, data_offset: int) -> None:
        _read(head, self.layout, data_offset, DYN_HEADER_SIZE, self.header, "dynamic header")

    def header(self, data: bytearray) -> None:
        if data[:8] != b"cxsparse":
            raise _invalid("dynamic disk header has no cxsparse magic")
        table_offset, _, entries, block = struct.unpack_from(">QIII", data, 16)
        if block < SECTOR or block & (block - 1):
            raise _invalid(f"has a block size of {block} bytes: not a power of two >= 512")
        if self.disk // block > 0xFFFF_FFFF:
            raise _invalid(f"has more than 2^32 blocks of {block} bytes")
        if entries * block < self.disk:
            raise _invalid(
                f"block allocation table has {entries} entries of {block} bytes: less than "
                f"the disk's {self.disk} bytes"
            )
        if entries > INT_MAX // 4:
            raise _invalid(f"block allocation table has {entries} entries: too many for qemu")
        if entries * 4 > MAX_NEED:
            raise Unsupported(
                f"the vhd block allocation table is {entries * 4} bytes: more than a stream reads"
            )
        self.block = block
        self.bitmap = ((block // (8 * SECTOR)) + 511) & ~511
        self.bat_offset = table_offset
        self.layout.need(table_offset, entries * 4, self.table, what="block allocation table")

    def table(self, data: bytearray) -> None:
        bat = array("I", bytes(data))
        if sys.byteorder == "little":
            bat.byteswap()
        block, bitmap = self.block, self.bitmap
        # qemu refuses a file shorter than its BAT and every block the BAT names.
        end = -(-(self.bat_offset + len(data)) // SECTOR) * SECTOR
        for index, sector in enumerate(bat):
            if sector == UNALLOCATED:
                continue
            end = max(end, sector * SECTOR + bitmap + block)
            guest = index * block
            if guest < self.disk:
                self.layout.copy(
                    sector * SECTOR + bitmap,
                    min(block, self.disk - guest),
                    guest,
                    what=f"block {index} (at sector {sector})",
                )
        self.layout.mapped()

        def long_enough(size: int) -> None:
            if end > size:
                raise FinalError(
                    "TruncatedImage",
                    f"the vhd image is {size} bytes, but its block allocation table and the "
                    f"blocks it names end at byte {end}",
                )

        if self.layout.file_size is not None:
            long_enough(self.layout.file_size)
        self.layout.at_end(long_enough)


def _read(head: bytes, layout: Layout, offset: int, length: int, then, what: str) -> None:
    """`then(bytes)` now if they are in `head`, else once they arrive."""
    if offset + length <= len(head):
        then(bytearray(head[offset : offset + length]))
    else:
        layout.need(offset, length, then, what=what)
