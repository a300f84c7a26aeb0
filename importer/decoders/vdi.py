"""VDI (VirtualBox) stream decoder: static and dynamic images.

What qemu-img 7.2 reads (block/vdi.c) is what is decoded, byte for byte:

- The 512-byte header at byte 0: the pre-header's text is not read; the signature
  (0xbeda107f) and version 1.1 are required, as are a block map and data offset on sector
  boundaries, 512-byte sectors, 1 MiB blocks, a block count that covers the disk (and at
  most 0x1fffff80 blocks, qemu's VDI_BLOCKS_IN_IMAGE_MAX), a disk of at most that many MiB,
  and null link and parent UUIDs.
  The image type (static, dynamic...) does not change how it reads. A disk size that is
  not a multiple of 512 is rounded up. The "block extra" field is ignored, as qemu does.
- Block i of the disk is unallocated (0xFFFFFFFF) or discarded (0xFFFFFFFE), both read as
  zeros, or lies at offset_data + map[i] x block_size. qemu reads only the map entries that
  cover the disk: so is it here (a map longer than the disk needs is not read).

Refused: anything qemu refuses (InvalidImage, naming the field), except a non-null parent
UUID (a differencing image, which reads its parent): BackingFileRejected. Not streamed: a
block map over importer.decoders.layout.MAX_NEED (more than 16 Ti of disk).
"""

from __future__ import annotations

import struct
import sys
from array import array

from importer.decoders import Unsupported
from importer.decoders.layout import MAX_NEED, Layout
from importer.errors import FinalError

SECTOR = 512
HEADER_SIZE = 512
SIGNATURE = 0xBEDA107F
VERSION_1_1 = 0x0001_0001
BLOCK_SIZE = 1 << 20
BLOCKS_MAX = 0x1FFF_FF80  # qemu 7.2's VDI_BLOCKS_IN_IMAGE_MAX: it refuses more
DISK_SIZE_MAX = BLOCKS_MAX * BLOCK_SIZE
DISCARDED = 0xFFFF_FFFE  # entries from here up read as zeros


def _invalid(message: str) -> FinalError:
    return FinalError("InvalidImage", f"the vdi image {message}")


def open_image(head: bytes, layout: Layout) -> None:
    if len(head) < HEADER_SIZE:
        raise FinalError(
            "TruncatedImage", f"the vdi image is {len(head)} bytes, shorter than its header"
        )
    signature, version = struct.unpack_from("<II", head, 64)
    offset_bmap, offset_data = struct.unpack_from("<II", head, 340)
    (sector_size,) = struct.unpack_from("<I", head, 360)
    disk, block, _extra, blocks = struct.unpack_from("<QIII", head, 368)
    uuid_link, uuid_parent = head[424:440], head[440:456]
    # qemu's checks, in its order (vdi_open).
    if disk > DISK_SIZE_MAX:
        raise _invalid(f"has a disk size of {disk} bytes: qemu reads at most {DISK_SIZE_MAX}")
    disk = -(-disk // SECTOR) * SECTOR
    if signature != SIGNATURE:
        raise _invalid(f"has signature {signature:#010x}, not {SIGNATURE:#010x}")
    if version != VERSION_1_1:
        raise _invalid(f"has version {version >> 16}.{version & 0xFFFF}: qemu reads 1.1 only")
    if offset_bmap % SECTOR:
        raise _invalid(f"has its block map at byte {offset_bmap}, not on a sector boundary")
    if offset_data % SECTOR:
        raise _invalid(f"has its data at byte {offset_data}, not on a sector boundary")
    if sector_size != SECTOR:
        raise _invalid(f"has a sector size of {sector_size}: qemu reads 512 only")
    if block != BLOCK_SIZE:
        raise _invalid(f"has a block size of {block}: qemu reads {BLOCK_SIZE} only")
    if disk > blocks * block:
        raise _invalid(
            f"has a disk size of {disk} bytes but a block map of {blocks} blocks of {block}"
        )
    if any(uuid_link):
        raise _invalid("has a link UUID: qemu does not read linked images")
    if any(uuid_parent):
        raise FinalError(
            "BackingFileRejected",
            "the vdi image is a differencing image: its data is read through a parent image",
        )
    if blocks > BLOCKS_MAX:
        raise _invalid(f"has {blocks} blocks: qemu reads at most {BLOCKS_MAX}")
    if disk == 0:
        raise _invalid("has a virtual size of 0 bytes")
    layout.declare(disk)
    used = -(-disk // block)  # the map entries qemu reads
    if used * 4 > MAX_NEED:
        raise Unsupported(f"the vdi block map is {used * 4} bytes: more than a stream reads")

    def block_map(data: bytearray) -> None:
        entries = array("I", bytes(data))
        if sys.byteorder != "little":
            entries.byteswap()
        for index, entry in enumerate(entries):
            if entry >= DISCARDED:
                continue
            guest = index * block
            layout.copy(
                offset_data + entry * block,
                min(block, disk - guest),
                guest,
                what=f"block {index} (stored as block {entry})",
            )
        layout.mapped()

    layout.need(offset_bmap, used * 4, block_map, what="block map")
