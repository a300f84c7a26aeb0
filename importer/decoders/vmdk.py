"""VMDK (hosted sparse extent, "KDMV") stream decoder: monolithicSparse and streamOptimized.

What qemu-img 7.2 reads (block/vmdk.c) is what is decoded, byte for byte:

- The header at byte 4 (version, flags, capacity, granularity, grain table size, grain
  directory offset, grain offset, compression). With the grain directory "at the end"
  (gd_offset 0xffffffffffffffff) qemu takes the whole header from the footer instead: the
  footer marker, footer header and end-of-stream marker that end the file (its last 1536
  bytes, the file's size rounded up to a sector).
- qemu reads its descriptor text at byte 512 whatever the header says: it must hold "CID"
  and "parentCID" followed by hex numbers (or qemu refuses the image), and a
  "parentFileNameHint" names a backing file (refused: BackingFileRejected). The descriptor's
  extent lines are not read when the header has a capacity.
- Grains are read through the grain directory and grain tables (never through the markers):
  entry 0 is unallocated, entry 1 is a zeroed grain when the zeroed-grain flag is set (both
  read as zeros), anything else a grain's sector. An uncompressed grain is the grain's bytes;
  a compressed one (compressAlgorithm 1) is a marker (LBA, size) and `size` bytes of zlib
  data, inflated to at most one grain (and at least the part of the grain inside the disk).
  The redundant grain directory is read by qemu but never used: ignored here.

Three layouts stream:

- monolithicSparse (uncompressed): tables first; grains are copied as they pass by.
- streamOptimized as qemu-img writes it (compressed, markers, tables filled in at the
  front): the grain tables say where each grain's marker lies; each grain is inflated in a
  worker. Its marker's LBA must agree with the table (qemu ignores it: a disagreement is
  refused here, InvalidImage, where qemu would read the grain anyway).
- streamOptimized as VMware writes it (grain directory at the end): grains are followed
  marker by marker from the grain offset and written at their marker's LBA as they stream;
  grain tables, the grain directory and the footer come after the grains, in markers. Once
  the file has ended, the footer qemu would read must be the one the stream ended with, and
  every grain table entry qemu would read must name exactly the grain the stream wrote for
  that LBA (and no grain written may be left unmapped): any disagreement is InvalidImage.

Not streamed (Unsupported, so the import falls back to scratch space and qemu-img):
compressed grains without markers; a grain directory at the end in an image that is not a
compressed stream with markers, or whose first header qemu would refuse (qemu reads only
the footer's); a header capacity of 0 with the grain directory at the end;
a capacity whose grain directory count overflows qemu's 32-bit arithmetic; a grain
directory over importer.decoders.layout.MAX_NEED (64 MiB: 16 Mi grain tables); descriptors
whose CID or parent hint qemu would parse past their end. VMDK3 ("COWD") and descriptor
files never reach this decoder (importer.formats).
"""

from __future__ import annotations

import struct
import sys
from array import array
from dataclasses import dataclass
from functools import partial

from isal import isal_zlib

from importer.decoders import Unsupported
from importer.decoders.layout import MAX_NEED, Layout
from importer.errors import FinalError

SECTOR = 512
GD_AT_END = 0xFFFF_FFFF_FFFF_FFFF
FLAG_RGD = 1 << 1
FLAG_ZERO_GRAIN = 1 << 2
FLAG_COMPRESS = 1 << 16
FLAG_MARKER = 1 << 17
COMPRESSION_DEFLATE = 1
MAX_GRANULARITY = 0x200000  # sectors: qemu's limit ("1GB for one cluster is unrealistic")
MAX_GTES = 512
MAX_L1 = 32 << 20  # qemu's "L1 size too big"
DESC_OFFSET = 0x200  # where qemu reads the descriptor's CID, whatever the header says
DESC_SIZE = 20 * SECTOR
MARKER_EOS, MARKER_GT, MARKER_GD, MARKER_FOOTER = 0, 1, 2, 3
_HEADER = struct.Struct("<IIQQQQIQQQ5xH")  # from byte 4: 75 bytes
_MARKER = struct.Struct("<QI")
_BDRV_MAX_LENGTH = ((1 << 63) - 1) // (1 << 30) * (1 << 30)  # qemu's block layer's limit


def _invalid(message: str) -> FinalError:
    return FinalError("InvalidImage", f"the vmdk image {message}")


@dataclass(frozen=True)
class Header:
    version: int
    flags: int
    capacity: int  # sectors
    granularity: int  # sectors per grain
    desc_offset: int
    desc_size: int
    num_gtes: int  # entries per grain table
    rgd_offset: int
    gd_offset: int  # sectors
    grain_offset: int  # sectors
    compression: int

    @classmethod
    def parse(cls, data: bytes | bytearray, offset: int) -> Header:
        """The header after the magic at `offset` of `data`."""
        return cls(*_HEADER.unpack_from(data, offset))

    @property
    def compressed(self) -> bool:
        return self.compression == COMPRESSION_DEFLATE

    @property
    def grain_bytes(self) -> int:
        return self.granularity * SECTOR

    @property
    def l1_entry_sectors(self) -> int:
        return self.num_gtes * self.granularity

    @property
    def l1_size(self) -> int:
        return -(-self.capacity // self.l1_entry_sectors)

    def check_tables(self, where: str) -> None:
        """qemu reads the redundant grain directory too (and never uses it): an offset its
        block layer refuses (past BDRV_MAX_LENGTH, or negative in 64 bits) fails the open."""
        if not (self.flags & FLAG_RGD and self.rgd_offset):
            return
        offset = (self.rgd_offset << 9) % (1 << 64)
        if offset >= 1 << 63 or offset + self.l1_size * 4 > _BDRV_MAX_LENGTH:
            raise _invalid(
                f"{where} puts its redundant grain directory at sector {self.rgd_offset}, "
                "where qemu cannot read it"
            )

    def check(self, where: str) -> None:
        """qemu's checks of a header (vmdk_open_vmdk4, vmdk_add_extent), in its order."""
        if self.version > 3:
            raise _invalid(f"{where} has version {self.version}: qemu reads versions up to 3")
        if self.num_gtes > MAX_GTES:
            raise _invalid(
                f"{where} has {self.num_gtes} entries per grain table: qemu reads at most "
                f"{MAX_GTES}"
            )
        if (self.num_gtes * self.granularity) & 0xFFFF_FFFF == 0:
            raise _invalid(
                f"{where} has {self.num_gtes} grain table entries of {self.granularity} "
                "sectors: a grain directory entry must cover something"
            )
        if self.granularity > MAX_GRANULARITY:
            raise _invalid(
                f"{where} has grains of {self.granularity} sectors: qemu reads at most "
                f"{MAX_GRANULARITY}"
            )
        # qemu computes the directory's size in 32 bits (capacity + entry - 1 in 64).
        l1_qemu = (((self.capacity + self.l1_entry_sectors - 1) % (1 << 64))
                   // self.l1_entry_sectors) & 0xFFFF_FFFF  # fmt: skip
        if l1_qemu > MAX_L1:
            raise _invalid(
                f"{where} needs a grain directory of {l1_qemu} entries: qemu reads at most {MAX_L1}"
            )
        if l1_qemu != self.l1_size:
            raise Unsupported(
                f"the vmdk {where}'s capacity of {self.capacity} sectors overflows qemu's "
                "grain directory arithmetic"
            )


def open_image(head: bytes, layout: Layout) -> None:
    if head[:4] != b"KDMV":
        raise _invalid("has no KDMV magic")
    if len(head) < 4 + _HEADER.size:
        raise FinalError(
            "TruncatedImage", f"the vmdk image is {len(head)} bytes, shorter than its header"
        )
    header = Header.parse(head, 4)
    _check_descriptor(head)
    if header.capacity == 0:
        if header.gd_offset == GD_AT_END:
            raise Unsupported("the vmdk header has no capacity: only its footer would tell")
        raise _invalid("header has a capacity of 0 sectors: the disk has no size")
    at_end = header.gd_offset == GD_AT_END
    try:
        header.check("header")
    except FinalError as exc:
        if not at_end:
            raise
        # qemu reads only the footer's header: it may be fine. Its capacity and grain sizes
        # are what the grains stream by, so a stream without them is not streamed.
        raise Unsupported(f"{exc.message}, and qemu would read the footer's instead") from None
    if at_end and not (header.compressed and header.flags & FLAG_MARKER):
        raise Unsupported(
            "the vmdk image has its grain directory at the end but is not a compressed "
            "stream with grain markers"
        )
    if header.compressed and not header.flags & FLAG_MARKER:
        raise Unsupported("the vmdk image has compressed grains without grain markers")
    if header.grain_offset == 0 and at_end:
        raise _invalid("header has a grain offset of 0: its grains would overlap the header")
    if not at_end:
        header.check_tables("header")
    if header.l1_size * 4 > MAX_NEED:
        raise Unsupported(
            f"the vmdk grain directory is {header.l1_size * 4} bytes: more than a stream reads"
        )
    layout.declare(header.capacity * SECTOR)

    def file_long_enough(size: int) -> None:
        # qemu: "File truncated, expecting at least ... bytes"
        if -(-size // SECTOR) < header.grain_offset:
            raise FinalError(
                "TruncatedImage",
                f"the vmdk image is {size} bytes, but its header puts its grains at sector "
                f"{header.grain_offset}",
            )

    layout.at_end(file_long_enough)
    if at_end:
        _Stream(layout, header).start()
    else:
        _Tables(layout, header).start()


def _check_descriptor(head: bytes) -> None:
    """What qemu's vmdk_parent_open and vmdk_read_cid make of the text at byte 512."""
    raw = bytes(head[DESC_OFFSET : DESC_OFFSET + DESC_SIZE]).ljust(DESC_SIZE, b"\0")
    text = raw.split(b"\0", 1)[0]
    at = text.find(b"parentFileNameHint")
    if at >= 0:
        name_at = at + len(b"parentFileNameHint") + 2  # past '="'
        if name_at > len(text):
            raise Unsupported("the vmdk descriptor's parentFileNameHint is cut off")
        end = text.find(b'"', name_at)
        if end < 0:
            raise _invalid("descriptor's parentFileNameHint has no closing quote")
        if end - name_at > 4095:
            raise _invalid("descriptor's parentFileNameHint is longer than qemu reads")
        name = text[name_at:end]
        if name:
            raise FinalError(
                "BackingFileRejected",
                f"the vmdk image names a backing file ({name.decode(errors='replace')!r})",
            )
    text = raw[: DESC_SIZE - 1].split(b"\0", 1)[0]
    for key in (b"CID", b"parentCID"):
        at = text.find(key)
        if at < 0:
            raise _invalid(
                f"descriptor (at byte {DESC_OFFSET}) has no {key.decode()}: qemu refuses it"
            )
        value_at = at + len(key) + 1
        if value_at > len(text):
            raise Unsupported(f"the vmdk descriptor's {key.decode()} is cut off")
        if not _scans_hex(text[value_at:]):
            raise _invalid(
                f"descriptor's {key.decode()} is not followed by a hex number: qemu refuses it"
            )


def _scans_hex(text: bytes) -> bool:
    """Whether sscanf("%x") would read a number at the start of `text`."""
    text = text.lstrip(b" \t\n\v\f\r")
    if text[:1] in (b"+", b"-"):
        text = text[1:]
    return text[:1] != b"" and text[:1] in b"0123456789abcdefABCDEF"


def _entries(data: bytes | bytearray) -> array:
    table = array("I", bytes(data))
    if sys.byteorder != "little":
        table.byteswap()
    return table


def _inflate(layout: Layout, header: Header, guest: int, length: int, where: str, data) -> None:
    """Inflate one grain (in a worker) and write the part of it inside the disk."""
    grain = header.grain_bytes
    try:
        inflater = isal_zlib.decompressobj()
        out = inflater.decompress(data, grain + 1)
        ended = inflater.eof
    except Exception as exc:  # isal's IsalError: corrupt deflate data or a bad checksum
        raise _invalid(f"grain {where} does not inflate: {exc}") from None
    if not ended:
        raise _invalid(
            f"grain {where} does not inflate to a whole zlib stream of at most {grain} bytes"
        )
    if len(out) < length:
        raise _invalid(
            f"grain {where} inflates to {len(out)} bytes, less than the {length} of the disk "
            "it covers"
        )
    layout.write(guest, memoryview(out)[:length])


def _check_grain_size(header: Header, size: int, where: str) -> None:
    # qemu reads two grains from the marker on and inflates `size` bytes after it.
    if size == 0 or size > 2 * header.grain_bytes - _MARKER.size:
        raise _invalid(
            f"grain marker {where} gives a compressed size of {size} bytes: a grain of "
            f"{header.grain_bytes} bytes holds 1 to {2 * header.grain_bytes - _MARKER.size}"
        )


class _Tables:
    """Tables first (monolithicSparse, qemu-img's streamOptimized): the grain directory, then
    each grain table, then the grains they map, read as qemu reads them."""

    def __init__(self, layout: Layout, header: Header) -> None:
        self.layout = layout
        self.header = header
        self.pending = 0  # grain tables registered and not parsed yet
        self.disk = header.capacity * SECTOR
        self.gd_end = 0
        # Compressed grains whose marker had passed when their table came (held bytes): their
        # data must still be held when the marker is parsed, so `mapped` waits for them.
        self.behind = 0

    def start(self) -> None:
        h = self.header
        self.gd_end = h.gd_offset * SECTOR + h.l1_size * 4
        self.layout.need(
            h.gd_offset * SECTOR, h.l1_size * 4, self.directory, what="grain directory"
        )

    def directory(self, data: bytearray) -> None:
        h = self.header
        for index, sector in enumerate(_entries(data)):
            if sector:
                self.pending += 1
                self.layout.need(
                    sector * SECTOR,
                    h.num_gtes * 4,
                    partial(self.table, index, sector * SECTOR + h.num_gtes * 4),
                    what=f"grain table {index} (at sector {sector})",
                )
        self.map_if_done()

    def table(self, index: int, end: int, data: bytearray) -> None:
        h = self.header
        first = index * h.l1_entry_sectors
        zero_grain = bool(h.flags & FLAG_ZERO_GRAIN)
        # Every byte before this has arrived; the chunk being fed began before it.
        horizon = max(self.gd_end, end)
        for slot, sector in enumerate(_entries(data)):
            lba = first + slot * h.granularity
            if lba >= h.capacity:
                break
            if sector == 0 or (zero_grain and sector == 1):
                continue
            guest = lba * SECTOR
            length = min(h.grain_bytes, self.disk - guest)
            what = f"grain for disk sector {lba} (at sector {sector})"
            if h.compressed:
                behind = sector * SECTOR < horizon
                self.behind += behind
                self.layout.need(
                    sector * SECTOR,
                    _MARKER.size,
                    partial(self.marker, lba, sector, behind),
                    what=what,
                )
            else:
                self.layout.copy(sector * SECTOR, length, guest, what=what)
        self.pending -= 1
        self.map_if_done()

    def map_if_done(self) -> None:
        if not self.pending and not self.behind:
            self.layout.mapped()

    def marker(self, lba: int, sector: int, behind: bool, data: bytearray) -> None:
        h = self.header
        marked, size = _MARKER.unpack(data)
        where = f"at sector {sector}"
        if marked != lba:
            raise _invalid(
                f"grain marker {where} is for disk sector {marked}, but its grain table maps "
                f"it to disk sector {lba}"
            )
        _check_grain_size(h, size, where)
        guest = lba * SECTOR
        self.layout.need(
            sector * SECTOR + _MARKER.size,
            size,
            partial(_inflate, self.layout, h, guest, min(h.grain_bytes, self.disk - guest), where),
            what=f"compressed grain {where}",
            parallel=True,
        )
        if behind:
            self.behind -= 1
            self.map_if_done()


class _Stream:
    """A stream (grain directory at the end): markers followed from the grain offset on;
    grains written by their marker's LBA; the tables qemu reads checked against them at the
    end."""

    def __init__(self, layout: Layout, header: Header) -> None:
        self.layout = layout
        self.header = header
        self.disk = header.capacity * SECTOR
        # The sector of each grain's marker (0: none), by grain directory entry and slot.
        self.grains: dict[int, array] = {}
        self.tables: dict[int, tuple[int, bytearray]] = {}  # sector -> (marker type, table)
        self.footer: tuple[int, bytearray] | None = None  # (marker offset, footer sector)
        self.eos: int | None = None  # offset of the end-of-stream marker

    def start(self) -> None:
        self.next_marker(self.header.grain_offset * SECTOR)
        self.layout.mapped()  # every range is registered before its bytes arrive
        self.layout.at_end(self.check)

    def next_marker(self, offset: int) -> None:
        self.layout.need(
            offset, _MARKER.size, partial(self.marker, offset), what=f"marker at byte {offset}"
        )

    def marker(self, offset: int, data: bytearray) -> None:
        h = self.header
        value, size = _MARKER.unpack(data)
        if size == 0:
            self.layout.need(
                offset + _MARKER.size,
                4,
                partial(self.metadata, offset, value),
                what=f"marker at byte {offset}",
            )
            return
        where = f"at byte {offset}"
        _check_grain_size(h, size, where)
        if value % h.granularity or value >= h.capacity:
            raise _invalid(
                f"grain marker {where} is for disk sector {value}, which is not the start of "
                f"a grain of a disk of {h.capacity} sectors"
            )
        index, slot = divmod(value // h.granularity, h.num_gtes)
        span = self.grains.get(index)
        if span is None:
            span = self.grains[index] = array("I", bytes(4 * h.num_gtes))
        if span[slot]:
            raise _invalid(
                f"stream has two grains for disk sector {value} (at sectors {span[slot]} and "
                f"{offset // SECTOR})"
            )
        if offset // SECTOR > 0xFFFF_FFFF:
            raise _invalid(f"grain marker {where} lies beyond what a grain table can point to")
        span[slot] = offset // SECTOR
        guest = value * SECTOR
        self.layout.need(
            offset + _MARKER.size,
            size,
            partial(_inflate, self.layout, h, guest, min(h.grain_bytes, self.disk - guest), where),
            what=f"compressed grain {where}",
            parallel=True,
        )
        self.next_marker(-(-(offset + _MARKER.size + size) // SECTOR) * SECTOR)

    def metadata(self, offset: int, sectors: int, data: bytearray) -> None:
        h = self.header
        (kind,) = struct.unpack("<I", data)
        if kind == MARKER_EOS:
            if sectors:
                raise _invalid(f"end-of-stream marker at byte {offset} has a value of {sectors}")
            self.eos = offset
            return
        body = offset + SECTOR
        if kind in (MARKER_GT, MARKER_GD):
            length = h.num_gtes * 4 if kind == MARKER_GT else h.l1_size * 4
            name = "grain table" if kind == MARKER_GT else "grain directory"
            if sectors * SECTOR < length:
                raise _invalid(
                    f"{name} marker at byte {offset} holds {sectors} sectors: the {name} "
                    f"is {length} bytes"
                )
            self.layout.need(
                body, length, partial(self.table, body // SECTOR, kind), what=f"{name} at {body}"
            )
        elif kind == MARKER_FOOTER:
            if sectors < 1:
                raise _invalid(f"footer marker at byte {offset} holds no sector")
            self.layout.need(body, SECTOR, partial(self.got_footer, offset), what="footer")
        self.next_marker(body + sectors * SECTOR)

    def table(self, sector: int, kind: int, data: bytearray) -> None:
        self.tables[sector] = (kind, data)

    def got_footer(self, offset: int, data: bytearray) -> None:
        self.footer = (offset, data)

    def check(self, size: int) -> None:
        """What qemu reads at the end of the file must be what the stream said."""
        h = self.header
        expected = -(-size // SECTOR) * SECTOR - 3 * SECTOR  # where qemu reads the footer
        if self.footer is None or self.footer[0] != expected or self.eos != expected + 2 * SECTOR:
            found = "none" if self.footer is None else f"byte {self.footer[0]}"
            raise _invalid(
                f"stream's footer marker ({found}, end-of-stream marker at byte {self.eos}) is "
                f"not where qemu reads it: byte {expected}, 1024 bytes before the end of stream"
            )
        footer = self.footer[1]
        if footer[:4] != b"KDMV":
            raise _invalid(f"footer at byte {expected + SECTOR} has no KDMV magic")
        last = Header.parse(footer, 4)
        last.check("footer")
        last.check_tables("footer")
        if -(-size // SECTOR) < last.grain_offset:  # qemu checks the footer's, not the header's
            raise FinalError(
                "TruncatedImage",
                f"the vmdk image is {size} bytes, but its footer puts its grains at sector "
                f"{last.grain_offset}",
            )
        for field in ("capacity", "granularity", "num_gtes"):
            if getattr(last, field) != getattr(h, field):
                raise _invalid(
                    f"footer's {field} ({getattr(last, field)}) differs from its header's "
                    f"({getattr(h, field)})"
                )
        if not (last.compressed and last.flags & FLAG_MARKER):
            raise _invalid("footer says its grains are not compressed with markers")
        directory = self.tables.get(last.gd_offset)
        if directory is None or directory[0] != MARKER_GD:
            raise _invalid(
                f"footer puts the grain directory at sector {last.gd_offset}, where the "
                "stream has none"
            )
        zero_grain = bool(last.flags & FLAG_ZERO_GRAIN)
        for index, table_sector in enumerate(_entries(directory[1])):
            first = index * h.l1_entry_sectors
            inside = min(h.num_gtes, -(-(h.capacity - first) // h.granularity))
            span = self.grains.get(index)
            wrote = span[:inside] if span is not None else array("I", bytes(4 * inside))
            if not table_sector:
                read = array("I", bytes(4 * inside))
            else:
                table = self.tables.get(table_sector)
                if table is None or table[0] != MARKER_GT:
                    raise _invalid(
                        f"grain directory entry {index} points to sector {table_sector}, where "
                        "the stream has no grain table"
                    )
                read = _entries(table[1])[:inside]
                if zero_grain and 1 in read:
                    read = array("I", (0 if sector == 1 else sector for sector in read))
            if read != wrote:
                slot = next(i for i in range(inside) if read[i] != wrote[i])
                lba = first + slot * h.granularity
                if not read[slot]:
                    raise _invalid(
                        f"stream has a grain for disk sector {lba} (at sector {wrote[slot]}) "
                        "that its tables leave unmapped"
                    )
                raise _invalid(
                    f"grain table entry for disk sector {lba} points to sector {read[slot]}, "
                    f"but the stream's grain for it is at "
                    f"{wrote[slot] or 'no sector: there is none'}"
                )
