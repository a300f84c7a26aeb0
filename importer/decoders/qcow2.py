"""qcow2 (versions 2 and 3), decoded as it streams: what `qemu-img convert -O raw` reads.

The header names the active L1 table; each L1 entry names an L2 table; each L2 entry maps one
guest cluster to a host cluster (copied as it passes by), to a compressed cluster (inflated in
a worker thread), or to nothing (unallocated or zero: left a hole). Internal snapshots are not
read: `qemu-img convert` reads the active L1 only.

Semantics follow qemu 7.2 (block/qcow2.c qcow2_do_open and qcow2_read_extensions,
block/qcow2-cluster.c qcow2_get_host_offset and qcow2_parse_compressed_l2_entry,
block/qcow2-threads.c qcow2_zlib_decompress and qcow2_zstd_decompress):

- the disk is the header's size rounded down to 512 bytes (qemu counts sectors);
- an L2 entry with bit 62 is compressed, else with bit 0 it is a zero cluster (in a v3 image;
  qemu calls it corruption in a v2 one), else bits 9-55 are its host offset, 0 meaning
  unallocated; the other bits are ignored on read;
- a compressed cluster is read as `nb_csectors * 512 - (offset % 512)` bytes, zeros past the
  end of the file, and must inflate to a whole cluster: deflate (raw, 4 KiB window) may stop
  there without its end; zstd frames must end exactly there.

What this module does not stream raises Unsupported (the import falls back to qemu-img):
encryption, extended L2 entries, unknown incompatible features, the corrupt bit, unknown
compression types. Corrupt or hostile images raise FinalError("InvalidImage").
"""

from __future__ import annotations

import struct
import sys
import threading
import zlib
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import zstandard
from isal import isal_zlib

from importer.decoders import HEAD_BYTES, Unsupported
from importer.decoders.layout import Layout
from importer.errors import FinalError

_V2_HEADER = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes
_V3_HEADER = struct.Struct(">QQQII")  # 32 more: features, refcount order, header length
_EXTENSION = struct.Struct(">II")

MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 21
MAX_L1_BYTES = 32 << 20  # QCOW_MAX_L1_SIZE
MAX_REFTABLE_BYTES = 8 << 20  # QCOW_MAX_REFTABLE_SIZE
MAX_SNAPSHOTS = 65536  # QCOW_MAX_SNAPSHOTS
SNAPSHOT_HEADER_BYTES = 40  # sizeof(QCowSnapshotHeader)
MAX_SNAPSHOT_EXTRA_DATA = 1024  # QCOW_MAX_SNAPSHOT_EXTRA_DATA
MAX_SNAPSHOTS_BYTES = 1024 * MAX_SNAPSHOTS  # QCOW_MAX_SNAPSHOTS_SIZE
MAX_BITMAPS = 65535
MAX_BITMAP_DIRECTORY = 1024 * MAX_BITMAPS
MAX_VIRTUAL_SIZE = 1 << 63  # qemu keeps lengths in int64_t

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = 0x1F
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_CRYPTO_HEADER = 0x0537BE77
EXT_BITMAPS = 0x23852875

COMPRESSION_ZLIB, COMPRESSION_ZSTD = 0, 1

OFFSET_MASK = 0x00FFFFFFFFFFFE00  # L1E_OFFSET_MASK, L2E_OFFSET_MASK
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0
SECTOR = 512
RUN_BYTES = 1 << 20  # compressed clusters inflated and written together, at most


def open_image(head: bytes, layout: Layout) -> None:
    """Parse and check the qcow2 header in `head`, declare the disk, and ask `layout` for the
    active L1 table (which asks for the L2 tables, which ask for the data)."""
    image = _Header(head, layout.file_size)
    layout.declare(image.disk_size)
    _Mapper(image, layout).start()


class _Header:
    """The header's fields, checked as qemu checks them when it opens the image."""

    def __init__(self, head: bytes, file_size: int | None) -> None:
        if len(head) < _V2_HEADER.size:
            raise FinalError(
                "TruncatedImage",
                f"the qcow2 image is truncated: it ends after {len(head)} bytes, inside its header",
            )
        (
            magic,
            version,
            backing_file_offset,
            _backing_file_size,
            cluster_bits,
            size,
            crypt_method,
            l1_size,
            l1_offset,
            reftable_offset,
            reftable_clusters,
            nb_snapshots,
            snapshots_offset,
        ) = _V2_HEADER.unpack_from(head)
        if magic != b"QFI\xfb":
            raise FinalError("InvalidImage", "the image does not start with the qcow2 magic")
        if version not in (2, 3):
            raise Unsupported(f"qcow2 version {version} is not streamed (only 2 and 3 are)")
        self.version = version
        # Where head is the whole file, the file's size is known even if the download's is not.
        self.file_size = (
            file_size if file_size is not None or len(head) >= HEAD_BYTES else len(head)
        )
        self._head = head
        if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
            raise FinalError(
                "InvalidImage",
                f"the qcow2 header's cluster_bits is {cluster_bits}: not between "
                f"{MIN_CLUSTER_BITS} and {MAX_CLUSTER_BITS} (512 bytes to 2 MiB)",
            )
        self.cluster_bits = cluster_bits
        self.cluster_size = cluster = 1 << cluster_bits
        if version == 2:
            incompatible = compatible = autoclear = 0
            refcount_order, header_length = 4, 72
        else:
            if len(head) < _V2_HEADER.size + _V3_HEADER.size:
                raise FinalError(
                    "TruncatedImage",
                    f"the qcow2 image is truncated: it ends after {len(head)} bytes, inside its "
                    "version 3 header",
                )
            incompatible, compatible, autoclear, refcount_order, header_length = (
                _V3_HEADER.unpack_from(head, _V2_HEADER.size)
            )
            if header_length < 104:
                raise FinalError(
                    "InvalidImage",
                    f"the qcow2 header's header_length is {header_length}: less than 104",
                )
        del compatible  # lazy refcounts and the like change nothing for a reader
        if header_length > cluster:
            raise FinalError(
                "InvalidImage",
                f"the qcow2 header's header_length {header_length} exceeds the cluster size "
                f"{cluster}",
            )
        if backing_file_offset:
            raise FinalError("BackingFileRejected", "the qcow2 image names a backing file")

        # Features, in qemu's order: compression type, unknown bits, then the rest.
        compression = self._byte(104) if header_length > 104 else COMPRESSION_ZLIB
        if compression not in (COMPRESSION_ZLIB, COMPRESSION_ZSTD):
            raise Unsupported(f"the qcow2 image uses compression type {compression}")
        if (compression != COMPRESSION_ZLIB) != bool(incompatible & INCOMPAT_COMPRESSION):
            raise FinalError(
                "InvalidImage",
                f"the qcow2 header's compression type is {compression} but its incompatible "
                f"feature bit 3 (compression type) is {'not ' if compression else ''}set",
            )
        self.compression = compression
        if incompatible & ~INCOMPAT_KNOWN:
            raise Unsupported(
                f"the qcow2 image uses incompatible features {incompatible & ~INCOMPAT_KNOWN:#x} "
                "unknown to diskflow"
            )
        if incompatible & INCOMPAT_CORRUPT:
            raise Unsupported("the qcow2 image is marked corrupt: left to qemu-img to judge")
        if incompatible & INCOMPAT_DATA_FILE:
            raise FinalError("DataFileRejected", "the qcow2 image uses an external data file")
        if incompatible & INCOMPAT_EXTL2:
            raise Unsupported("the qcow2 image uses extended L2 entries (subclusters)")
        if refcount_order > 6:
            raise FinalError(
                "InvalidImage",
                f"the qcow2 header's refcount_order is {refcount_order}: refcounts wider than "
                "64 bits",
            )
        if crypt_method:
            raise Unsupported(f"the qcow2 image is encrypted (crypt_method {crypt_method})")

        self.l2_bits = cluster_bits - 3
        # Tables, as qcow2_validate_table checks them.
        if reftable_clusters == 0:
            raise FinalError("InvalidImage", "the qcow2 image has no refcount table")
        self._table(
            "refcount table", reftable_offset, reftable_clusters, cluster, MAX_REFTABLE_BYTES
        )
        self._table(
            "snapshot table",
            snapshots_offset,
            nb_snapshots,
            SNAPSHOT_HEADER_BYTES,
            SNAPSHOT_HEADER_BYTES * MAX_SNAPSHOTS,
        )
        self._table("L1 table", l1_offset, l1_size, 8, MAX_L1_BYTES)
        if size >= MAX_VIRTUAL_SIZE:
            raise FinalError(
                "InvalidImage", f"the qcow2 header's virtual size {size} is beyond 2^63 bytes"
            )
        l1_span = 1 << (cluster_bits + self.l2_bits)  # guest bytes one L2 table maps
        needed = -(-size // l1_span)
        if needed > l1_size:
            raise FinalError(
                "InvalidImage",
                f"the qcow2 L1 table has {l1_size} entries; the virtual size of {size} bytes "
                f"needs {needed}",
            )
        self.disk_size = size // SECTOR * SECTOR  # qemu's length is in whole sectors
        self.l1_offset = l1_offset
        self.nb_snapshots, self.snapshots_offset = nb_snapshots, snapshots_offset
        self.l1_span = l1_span
        self.l1_entries = -(-self.disk_size // l1_span)  # those the disk reads through
        self._extensions(header_length, autoclear)

    def _byte(self, offset: int) -> int:
        return self._head[offset] if offset < len(self._head) else 0

    def _table(self, what: str, offset: int, entries: int, entry: int, limit: int) -> None:
        if entries > limit // entry:
            raise FinalError(
                "InvalidImage",
                f"the qcow2 {what} has {entries} entries of {entry} bytes: more than {limit} bytes",
            )
        if offset % self.cluster_size:
            raise FinalError(
                "InvalidImage",
                f"the qcow2 {what} offset {offset:#x} is not aligned to the {self.cluster_size}-"
                "byte cluster size",
            )
        if offset + entries * entry > (1 << 63) - 1:
            raise FinalError(
                "InvalidImage", f"the qcow2 {what} at offset {offset:#x} ends past 2^63 bytes"
            )

    def _extensions(self, start: int, autoclear: int) -> None:
        """Walk the header extensions as qemu does, refusing what qemu refuses."""
        end = self.cluster_size
        offset = start
        while offset < end:
            magic, length = _EXTENSION.unpack(self._bytes(offset, 8))
            offset += 8
            if offset > end or length > end - offset:
                raise FinalError(
                    "InvalidImage",
                    f"the qcow2 header extension {magic:#x} at {offset - 8} is {length} bytes: "
                    f"past the end of the first cluster ({end} bytes)",
                )
            if magic == EXT_END:
                break
            if magic == EXT_BACKING_FORMAT and length >= 16:
                raise FinalError(
                    "InvalidImage",
                    f"the qcow2 backing format extension is {length} bytes long (at most 15)",
                )
            if magic == EXT_CRYPTO_HEADER:
                raise FinalError(
                    "InvalidImage",
                    "the qcow2 image has an encryption header extension but is not encrypted",
                )
            if magic == EXT_BITMAPS:
                self._bitmaps(offset, length, autoclear)
            offset += (length + 7) & ~7
        if autoclear & AUTOCLEAR_DATA_FILE_RAW:
            raise FinalError(
                "InvalidImage",
                "the qcow2 header sets autoclear bit 1 (raw external data) without a data file",
            )

    def _bitmaps(self, offset: int, length: int, autoclear: int) -> None:
        """Persistent dirty bitmaps do not change the disk: their extension is checked as
        qemu checks it, and they are not read."""
        if length != 24:
            raise FinalError(
                "InvalidImage", f"the qcow2 bitmaps extension is {length} bytes, not 24"
            )
        if not autoclear & AUTOCLEAR_BITMAPS:
            return  # qemu warns and drops them
        count, reserved, directory_size, directory_offset = struct.unpack(
            ">IIQQ", self._bytes(offset, 24)
        )
        problem = None
        if reserved:
            problem = "its reserved field is not zero"
        elif count > MAX_BITMAPS:
            problem = f"it counts {count} bitmaps, more than {MAX_BITMAPS}"
        elif count == 0:
            problem = "it counts no bitmaps"
        elif directory_offset % self.cluster_size:
            problem = f"its directory offset {directory_offset:#x} is not cluster-aligned"
        elif directory_size > MAX_BITMAP_DIRECTORY:
            problem = f"its directory size {directory_size} exceeds {MAX_BITMAP_DIRECTORY}"
        if problem:
            raise FinalError("InvalidImage", f"the qcow2 bitmaps extension is invalid: {problem}")

    def _bytes(self, offset: int, length: int) -> bytes:
        """Header bytes; past the end of a file shorter than `head`, zeros (as qemu reads)."""
        data = self._head[offset : offset + length]
        if len(data) < length:
            if len(self._head) >= HEAD_BYTES:  # cannot happen: a cluster is at most 2 MiB
                raise FinalError("InvalidImage", "the qcow2 header extends past its first bytes")
            data = bytes(data) + bytes(length - len(data))
        return data


class _Mapper:
    """Registers the L1 table, then each L2 table, then each data cluster, with `layout`."""

    def __init__(self, image: _Header, layout: Layout) -> None:
        self.image = image
        self.layout = layout
        self.pending = 1  # L1 and L2 tables not yet parsed
        self.l2_tables: set[int] = set()  # their offsets: none may be used twice
        self.inflate = _inflate_zstd if image.compression == COMPRESSION_ZSTD else _inflate_zlib

    def start(self) -> None:
        image = self.image
        if image.nb_snapshots:
            self._snapshot(0, image.snapshots_offset)
        if image.l1_entries == 0:
            self.layout.mapped()
            return
        self.layout.need(
            image.l1_offset, image.l1_entries * 8, self._l1, what="qcow2 active L1 table"
        )

    def _snapshot(self, index: int, offset: int) -> None:
        """Walk the snapshot table as qemu does when it opens the image (qcow2_read_snapshots):
        its snapshots are not read, but an entry qemu refuses makes the image refused."""
        image = self.image

        def check(header: bytearray) -> None:
            id_size, name_size = struct.unpack_from(">HH", header, 12)
            (extra,) = struct.unpack_from(">I", header, 36)
            if extra > MAX_SNAPSHOT_EXTRA_DATA:
                raise FinalError(
                    "InvalidImage",
                    f"the qcow2 snapshot table entry {index} has {extra} bytes of extra data "
                    f"(at most {MAX_SNAPSHOT_EXTRA_DATA})",
                )
            end = offset + SNAPSHOT_HEADER_BYTES + extra + id_size + name_size
            if end - image.snapshots_offset > MAX_SNAPSHOTS_BYTES:
                raise FinalError(
                    "InvalidImage",
                    f"the qcow2 snapshot table is larger than {MAX_SNAPSHOTS_BYTES} bytes "
                    f"(entry {index} ends at {end:#x})",
                )
            if index + 1 < image.nb_snapshots:
                self._snapshot(index + 1, -(-end // 8) * 8)

        self.layout.need(
            offset, SNAPSHOT_HEADER_BYTES, check, what=f"qcow2 snapshot table entry {index}"
        )

    def _parsed(self) -> None:
        self.pending -= 1
        if self.pending == 0:
            self.layout.mapped()

    def _l1(self, data: bytearray) -> None:
        image = self.image
        entries = _entries(data)
        cluster_mask = image.cluster_size - 1
        for index, entry in enumerate(entries):
            l2_offset = entry & OFFSET_MASK
            if not l2_offset:
                continue
            if l2_offset & cluster_mask:
                raise FinalError(
                    "InvalidImage",
                    f"the qcow2 L1 entry {index} points to an L2 table at {l2_offset:#x}, not "
                    "cluster-aligned",
                )
            if l2_offset in self.l2_tables:
                raise FinalError(
                    "InvalidImage",
                    f"the qcow2 L1 table uses the L2 table at {l2_offset:#x} twice (entry {index})",
                )
            self.l2_tables.add(l2_offset)
            self.pending += 1
        tables = sorted(
            (entry & OFFSET_MASK, index)
            for index, entry in enumerate(entries)
            if entry & OFFSET_MASK
        )
        # All at once: a range's buffer is made only as its bytes arrive.
        for offset, index in tables:
            self._register_l2(offset, index)
        self._parsed()

    def _register_l2(self, l2_offset: int, index: int) -> None:
        image = self.image
        guest = index * image.l1_span
        count = min(1 << image.l2_bits, -(-(image.disk_size - guest) // image.cluster_size))
        self.layout.need(
            l2_offset,
            count * 8,
            self._l2_parser(guest),
            what=f"qcow2 L2 table for disk offset {guest} (L1 entry {index})",
        )

    def _l2_parser(self, base: int) -> Callable[[bytearray], None]:
        def parse(data: bytearray) -> None:
            self._l2(base, data)
            self._parsed()

        return parse

    def _l2(self, base: int, data: bytearray) -> None:
        image, layout = self.image, self.layout
        cluster = image.cluster_size
        cluster_mask = cluster - 1
        disk = image.disk_size
        whole = disk - cluster  # past it, the disk ends inside the cluster
        # A run of clusters contiguous on both sides, copied as one.
        run_host = run_guest = run_length = 0
        guest = base - cluster
        entries = _entries(data)
        compressed = array("I")  # their indexes
        for index, entry in enumerate(entries):
            guest += cluster
            if not entry:
                continue
            if entry & OFLAG_COMPRESSED:
                compressed.append(index)
                continue
            host = entry & OFFSET_MASK
            if entry & OFLAG_ZERO:
                if image.version < 3:
                    raise FinalError(
                        "InvalidImage",
                        f"the qcow2 version 2 image has a zero cluster entry ({entry:#x}) for "
                        f"disk offset {guest}",
                    )
                if host & cluster_mask:
                    raise FinalError(
                        "InvalidImage",
                        f"the qcow2 zero cluster for disk offset {guest} is preallocated at "
                        f"{host:#x}, not cluster-aligned",
                    )
                continue  # reads as zeros, wherever it is preallocated
            if not host:
                continue  # unallocated (flag bits only)
            if host & cluster_mask:
                raise FinalError(
                    "InvalidImage",
                    f"the qcow2 data cluster for disk offset {guest} is at {host:#x}, not "
                    "cluster-aligned",
                )
            length = cluster if guest < whole else disk - guest
            if run_length and host == run_host + run_length and guest == run_guest + run_length:
                run_length += length
                continue
            if run_length:
                layout.copy(run_host, run_length, run_guest, what=_data(run_guest))
            run_host, run_guest, run_length = host, guest, length
        if run_length:
            layout.copy(run_host, run_length, run_guest, what=_data(run_guest))
        for run in self._compressed_runs(base, entries, compressed):
            self._compressed(run)

    def _compressed_runs(
        self, base: int, entries: array[int], indexes: array[int]
    ) -> Iterator[list[_Compressed]]:
        """An L2 table's compressed clusters, in file order, in runs: clusters next to each
        other in the file and on the disk are inflated by one worker and written in one write
        (qemu-img -c packs them so; 64 KiB writes one by one left the disk waiting)."""
        image = self.image
        cluster, disk, file_size = image.cluster_size, image.disk_size, image.file_size
        shift = 62 - (image.cluster_bits - 8)  # csize_shift
        offset_mask = (1 << shift) - 1
        sectors_mask = (1 << (image.cluster_bits - 8)) - 1
        run: list[_Compressed] = []
        for index in sorted(indexes, key=lambda index: entries[index] & offset_mask):
            entry = entries[index]
            guest = base + index * cluster
            offset = entry & offset_mask
            # Read to the end of its last sector, at most two clusters on.
            end = (offset & ~(SECTOR - 1)) + (((entry >> shift) & sectors_mask) + 1) * SECTOR
            what = f"qcow2 compressed cluster for disk offset {guest}"
            if file_size is not None and end > file_size and offset >= file_size:
                raise FinalError(
                    "TruncatedImage",
                    f"the qcow2 image is truncated: it is {file_size} bytes, but its {what} lies "
                    f"at {offset:#x}",
                )
            this = _Compressed(offset, end, guest, min(cluster, disk - guest), what)
            if run and not (
                this.guest == run[-1].guest + cluster
                and run[-1].offset <= this.offset <= run[-1].end <= this.end
                and len(run) * cluster < RUN_BYTES
            ):
                yield run
                run = []
            run.append(this)
        if run:
            yield run

    def _compressed(self, run: list[_Compressed]) -> None:
        """Inflate a run of compressed clusters into the disk.

        Compressed clusters are packed end to end, each read up to the end of its last
        sector: that sector is shared with the next cluster. qemu-img may put clusters before
        the L2 table that maps them (megabytes before it, with compression running ahead), in
        a sector the cluster before them claimed: the Layout holds that last sector as if
        unclaimed (`shared_tail`) until every table is known."""
        first, last = run[0], run[-1]
        file_size = self.image.file_size
        # qemu reads zeros past the end of the file.
        end = last.end if file_size is None else min(last.end, file_size)
        self.layout.need(
            first.offset,
            end - first.offset,
            self._inflater(run),
            what=first.what if len(run) == 1 else f"{first.what} and the {len(run) - 1} after",
            parallel=True,
            shared_tail=end - max(last.offset, last.end - SECTOR),
        )

    def _inflater(self, run: list[_Compressed]) -> Callable[[bytearray], None]:
        cluster = self.image.cluster_size
        inflate = self.inflate
        write = self.layout.write
        start = run[0].offset

        def inflate_into_disk(data: bytearray) -> None:
            view = memoryview(data)
            out = []
            for part in run:
                piece = bytearray(view[part.offset - start : part.end - start])
                piece += bytes(part.end - part.offset - len(piece))  # past the file's end
                inflated = inflate(piece, cluster)
                if inflated is None:
                    raise FinalError(
                        "InvalidImage",
                        f"the image's {part.what} ({part.end - part.offset} bytes at "
                        f"{part.offset:#x}) does not decompress to a {cluster}-byte cluster",
                    )
                out.append(memoryview(inflated)[: part.length])
            write(run[0].guest, b"".join(out) if len(out) > 1 else out[0])

        return inflate_into_disk


@dataclass(frozen=True)
class _Compressed:
    """A compressed cluster: its bytes [offset, end) in the file, where it goes on the disk."""

    offset: int
    end: int
    guest: int
    length: int
    what: str


def _entries(data: bytearray) -> array[int]:
    """Big-endian 64-bit table entries."""
    entries = array("Q")
    entries.frombytes(data)
    if sys.byteorder == "little":
        entries.byteswap()
    return entries


def _data(guest: int) -> str:
    return f"qcow2 data clusters for disk offset {guest}"


def _inflate_zlib(data: bytearray, cluster: int) -> bytes | None:
    """qcow2_zlib_decompress: raw deflate (4 KiB window) that fills the cluster; the stream
    may go on past it, and its end need not be there."""
    try:
        out = isal_zlib.decompressobj(-12).decompress(data, cluster)
        if len(out) == cluster:
            return out
    except isal_zlib.error:
        pass
    # isal refuses some streams zlib takes (distances beyond 4 KiB within the cluster): qemu
    # uses zlib, so zlib has the last word.
    try:
        out = zlib.decompressobj(-12).decompress(data, cluster)
    except zlib.error:
        return None
    return out if len(out) == cluster else None


_zstd = threading.local()


def _inflate_zstd(data: bytearray, cluster: int) -> bytes | None:
    """qcow2_zstd_decompress: zstd frames that fill the cluster, the last ending there."""
    decompressor = getattr(_zstd, "decompressor", None)
    if decompressor is None:
        decompressor = _zstd.decompressor = zstandard.ZstdDecompressor()
    try:
        content_size = zstandard.get_frame_parameters(data).content_size
    except zstandard.ZstdError:
        return None
    if content_size == cluster:
        # What qemu writes: one frame that says its size. One ZSTD_decompressStream call into
        # a cluster-sized buffer, as qemu's first; qemu then stops, its buffer full.
        try:
            out = decompressor.decompress(data)
        except zstandard.ZstdError:
            return None
        return out if len(out) == cluster else None
    return _zstd_frames(decompressor, bytes(data), cluster)


_ZSTD_STEP = 256  # compressed bytes fed at a time: bounds what a hostile frame inflates to


def _zstd_frames(
    decompressor: zstandard.ZstdDecompressor, data: bytes, cluster: int
) -> bytes | None:
    """Frame after frame, as qemu's loop, never holding much more than a cluster."""
    out = bytearray()
    rest = data
    while len(out) < cluster:
        if not rest:
            return None  # no progress: qemu fails
        frame = decompressor.decompressobj()
        fed = 0
        while not frame.eof:
            if fed >= len(rest):
                return None  # the frame is cut short
            try:
                out += frame.decompress(rest[fed : fed + _ZSTD_STEP])
            except zstandard.ZstdError:
                return None
            fed += _ZSTD_STEP
            if len(out) > cluster:
                return None  # the frame goes on past the cluster
        rest = frame.unused_data + rest[fed:]
    return bytes(out)
