"""A generated corpus of small disk images, and the differential oracle the decoders answer to.

Every case is made on demand (and cached) from seeded raw disks by the real qemu-img and
qemu-io, by rewriters here that lay an image out in another order (qcow2 clusters moved and
permuted, L2 tables after their data; VDI and VHD blocks permuted, their maps fixed), and by
cutting (`truncated`) or editing (`corrupted`) those. A case is named `FORMAT/VARIANT` or
`FORMAT/BASE/MUTATION`; the name is its pytest id and its file name.

The oracle (`judge`): the import's own pre-checks (`detect_format`, `unsupported_format`,
`outside_reference`, the header's virtual size against a bound), then `qemu-img convert -O raw`
under the import's limits, then diskflow's decoder (`tests.support.decoding.decode`) in a
worker process under an address-space limit and a timeout, at two chunk sizes. diskflow must
make a disk byte-identical to qemu-img's, or refuse the image with a FinalError of a specific
reason, or raise Unsupported (the import then falls back to qemu-img); anything else is a bug.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import importlib.util
import multiprocessing
import os
import random
import re
import shutil
import struct
import subprocess
import tempfile
import threading
import time
import traceback
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# The formats the stream decoders handle (importer.formats.DiskFormat values).
FORMATS = ("qcow2", "vmdk", "vpc", "vdi")
DECODER_MODULES = {
    "qcow2": "importer.decoders.qcow2",
    "vmdk": "importer.decoders.vmdk",
    "vpc": "importer.decoders.vhd",
    "vdi": "importer.decoders.vdi",
}
# The virtual size the harness's "destination" takes: a larger one is ImageTooLarge, as an
# import to a volume of this size would refuse it (before qemu-img or a decoder runs).
BOUND = 64 * GiB
# Reasons a refusal may give: specific ones, each naming what is wrong with the image.
REFUSALS = frozenset(
    {
        "InvalidImage",
        "TruncatedImage",
        "ImageTooLarge",
        "BackingFileRejected",
        "DataFileRejected",
        "UnsupportedFormat",
        "CorruptCompressedData",
    }
)


def decoder_missing(fmt: str) -> str | None:
    """Why `fmt`'s cases cannot run yet (its decoder module is not there), or None."""
    module = DECODER_MODULES[fmt]
    try:
        found = importlib.util.find_spec(module)
    except ModuleNotFoundError:
        found = None
    return None if found else f"{module} does not exist yet"


def run(*args: str | os.PathLike[str]) -> str:
    return subprocess.run(
        [str(a) for a in args], check=True, capture_output=True, text=True, timeout=60
    ).stdout


# --- The seeded raw disks ------------------------------------------------------------------


def raw_disk(path: Path, size: int, seed: int) -> None:
    """A sparse raw disk of `size` bytes: random data at its start (across cluster borders),
    text at odd offsets, a compressible run across the 1 and 2 MiB borders, written zeros
    (holes again in every image format), and random bytes in its very last sector."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)

        def put(offset: int, data: bytes) -> None:
            if offset < size:
                f.seek(offset)
                f.write(data[: size - offset])

        put(0, rng.randbytes(70_000))
        put(300_001, b"diskflow differential corpus " * 37)
        put(MiB - 5000, bytes(rng.choice(b"ab\0") for _ in range(12_000)))
        put(MiB + 4097, rng.randbytes(9000))
        put(2 * MiB - 100_000, (b"%08d" % seed) * 25_000)
        put(size - 700, rng.randbytes(700))


# --- Formats: where things are --------------------------------------------------------------


def u(data: bytes, offset: int, fmt: str) -> int:
    return struct.unpack_from(fmt, data, offset)[0]


def put(data: bytearray, offset: int, fmt: str, value: int) -> None:
    width = struct.calcsize(fmt)
    value &= (1 << (8 * width)) - 1
    if fmt[-1] in "bhilq":  # signed layouts take the two's complement
        value -= (1 << (8 * width)) if value >> (8 * width - 1) else 0
    struct.pack_into(fmt, data, offset, value)


@dataclass
class Field:
    """A field of an image's metadata: its name, offset and struct layout."""

    name: str
    offset: int
    fmt: str  # ">Q", "<I"...


@dataclass
class Anatomy:
    """Where an image's parts lie: named byte regions (header, tables, first data) and the
    fields worth mutating."""

    regions: dict[str, tuple[int, int]] = field(default_factory=dict)
    fields: list[Field] = field(default_factory=list)


L2_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00


@dataclass
class Qcow2:
    data: bytes

    def __post_init__(self) -> None:
        d = self.data
        self.version = u(d, 4, ">I")
        self.cluster_bits = u(d, 20, ">I")
        self.cs = 1 << self.cluster_bits
        self.size = u(d, 24, ">Q")
        self.l1_size = u(d, 36, ">I")
        self.l1_offset = u(d, 40, ">Q")
        self.rt_offset = u(d, 48, ">Q")
        self.rt_clusters = u(d, 56, ">I")
        self.nb_snapshots = u(d, 60, ">I")
        self.snapshots_offset = u(d, 64, ">Q")
        self.incompatible = u(d, 72, ">Q") if self.version >= 3 else 0
        self.refcount_order = u(d, 96, ">I") if self.version >= 3 else 4
        self.header_length = u(d, 100, ">I") if self.version >= 3 else 72
        self.extended_l2 = bool(self.incompatible & 16)

    def l1(self) -> list[int]:
        return [u(self.data, self.l1_offset + 8 * i, ">Q") for i in range(self.l1_size)]

    def l2_tables(self) -> list[tuple[int, int]]:
        """(L1 index, L2 offset) of every L2 table."""
        return [(i, e & L2_OFFSET_MASK) for i, e in enumerate(self.l1()) if e & L2_OFFSET_MASK]

    def l2(self, offset: int) -> list[int]:
        n = self.cs // (16 if self.extended_l2 else 8)
        step = 16 if self.extended_l2 else 8
        return [u(self.data, offset + step * i, ">Q") for i in range(n)]

    def compressed(self, entry: int) -> tuple[int, int]:
        """(host offset, bytes) of a compressed cluster's entry."""
        x = 62 - (self.cluster_bits - 8)
        offset = entry & ((1 << x) - 1)
        sectors = ((entry >> x) & ((1 << (self.cluster_bits - 8)) - 1)) + 1
        return offset, sectors * 512 - (offset & 511)

    def entries(self) -> Iterator[tuple[int, int, int]]:
        """(guest cluster, entry, offset of the entry in the file) of each nonzero L2 entry."""
        per_l2 = self.cs // (16 if self.extended_l2 else 8)
        for index, table in self.l2_tables():
            for j, entry in enumerate(self.l2(table)):
                if entry:
                    step = 16 if self.extended_l2 else 8
                    yield index * per_l2 + j, entry, table + step * j

    def anatomy(self) -> Anatomy:
        a = Anatomy()
        a.regions["header"] = (0, self.header_length)
        a.regions["l1"] = (self.l1_offset, self.l1_offset + 8 * self.l1_size)
        tables = self.l2_tables()
        if tables:
            a.regions["l2"] = (tables[0][1], tables[0][1] + self.cs)
        a.regions["refcounts"] = (self.rt_offset, self.rt_offset + self.rt_clusters * self.cs)
        for _, entry, _ in self.entries():
            if entry & (1 << 62):
                off, n = self.compressed(entry)
                a.regions.setdefault("compressed", (off, off + n))
                a.regions.setdefault("data", (off, off + n))
            elif entry & L2_OFFSET_MASK and not entry & 1:
                off = entry & L2_OFFSET_MASK
                a.regions.setdefault("data", (off, off + self.cs))
        names = [
            ("magic", 0, ">I"),
            ("version", 4, ">I"),
            ("backing_file_offset", 8, ">Q"),
            ("backing_file_size", 16, ">I"),
            ("cluster_bits", 20, ">I"),
            ("size", 24, ">Q"),
            ("crypt_method", 32, ">I"),
            ("l1_size", 36, ">I"),
            ("l1_table_offset", 40, ">Q"),
            ("refcount_table_offset", 48, ">Q"),
            ("refcount_table_clusters", 56, ">I"),
            ("nb_snapshots", 60, ">I"),
            ("snapshots_offset", 64, ">Q"),
        ]
        if self.version >= 3:
            names += [
                ("incompatible_features", 72, ">Q"),
                ("compatible_features", 80, ">Q"),
                ("autoclear_features", 88, ">Q"),
                ("refcount_order", 96, ">I"),
                ("header_length", 100, ">I"),
            ]
            if self.header_length > 104:
                names.append(("compression_type", 104, ">B"))
        a.fields = [Field(n, o, f) for n, o, f in names]
        # Header extensions: type and length of each.
        at = self.header_length
        for _ in range(8):
            if at + 8 > min(len(self.data), self.cs):
                break
            kind, length = u(self.data, at, ">I"), u(self.data, at + 4, ">I")
            a.fields += [Field(f"ext@{at}.type", at, ">I"), Field(f"ext@{at}.length", at + 4, ">I")]
            if kind == 0:
                break
            at += 8 + (length + 7) // 8 * 8
        for i in range(min(self.l1_size, 4)):
            a.fields.append(Field(f"l1[{i}]", self.l1_offset + 8 * i, ">Q"))
        for n, (guest, _, at) in enumerate(self.entries()):
            if n >= 12:
                break
            a.fields.append(Field(f"l2[{guest}]", at, ">Q"))
        if self.rt_offset + 8 <= len(self.data):
            a.fields.append(Field("refcount_table[0]", self.rt_offset, ">Q"))
        if self.nb_snapshots and self.snapshots_offset + 40 <= len(self.data):
            s = self.snapshots_offset
            a.fields += [
                Field("snapshot[0].l1_table_offset", s, ">Q"),
                Field("snapshot[0].l1_size", s + 8, ">I"),
                Field("snapshot[0].id_str_size", s + 12, ">H"),
                Field("snapshot[0].extra_data_size", s + 36, ">I"),
            ]
        return a


@dataclass
class Vmdk:
    data: bytes

    def __post_init__(self) -> None:
        d = self.data
        self.version = u(d, 4, "<I")
        self.flags = u(d, 8, "<I")
        self.capacity = u(d, 12, "<Q")
        self.grain = u(d, 20, "<Q")
        self.desc_offset = u(d, 28, "<Q")
        self.desc_size = u(d, 36, "<Q")
        self.gtes = u(d, 44, "<I")
        self.rgd_offset = u(d, 48, "<Q")
        self.gd_offset = u(d, 56, "<Q")
        self.overhead = u(d, 64, "<Q")
        self.compress = u(d, 77, "<H")
        self.footer_at = None
        if self.gd_offset == 0xFFFF_FFFF_FFFF_FFFF and len(d) >= 1536:
            # The footer: a marker, then a copy of the header whose gdOffset is right.
            self.footer_at = len(d) - 1024
            self.gd_offset = u(d, self.footer_at + 56, "<Q")

    @property
    def gd_entries(self) -> int:
        span = self.grain * self.gtes
        return -(-self.capacity // span) if span else 0

    def gd(self) -> list[int]:
        at = self.gd_offset * 512
        n = min(self.gd_entries, max(0, (len(self.data) - at) // 4))
        return [u(self.data, at + 4 * i, "<I") for i in range(n)]

    def grains(self) -> Iterator[tuple[int, int, int]]:
        """(guest grain, grain sector, offset of the GT entry) of every allocated grain."""
        for i, gt in enumerate(self.gd()):
            if not gt:
                continue
            for j in range(self.gtes):
                at = gt * 512 + 4 * j
                if at + 4 > len(self.data):
                    break
                sector = u(self.data, at, "<I")
                if sector > 1:
                    yield i * self.gtes + j, sector, at

    def anatomy(self) -> Anatomy:
        a = Anatomy()
        a.regions["header"] = (0, 512)
        if self.desc_offset:
            a.regions["descriptor"] = (self.desc_offset * 512, (self.desc_offset + 1) * 512)
        a.regions["gd"] = (self.gd_offset * 512, self.gd_offset * 512 + 4 * self.gd_entries)
        if self.footer_at is not None:
            a.regions["footer"] = (len(self.data) - 1536, len(self.data) - 512)
        gts = [gt for gt in self.gd() if gt]
        if gts:
            a.regions["gt"] = (gts[0] * 512, gts[0] * 512 + 4 * self.gtes)
        first = next(iter(self.grains()), None)
        if first:
            a.regions["data"] = (first[1] * 512, first[1] * 512 + self.grain * 512)
        a.fields = [
            Field(n, o, f)
            for n, o, f in [
                ("magic", 0, "<I"),
                ("version", 4, "<I"),
                ("flags", 8, "<I"),
                ("capacity", 12, "<Q"),
                ("grain_size", 20, "<Q"),
                ("descriptor_offset", 28, "<Q"),
                ("descriptor_size", 36, "<Q"),
                ("num_gtes_per_gt", 44, "<I"),
                ("rgd_offset", 48, "<Q"),
                ("gd_offset", 56, "<Q"),
                ("overhead", 64, "<Q"),
                ("compress_algorithm", 77, "<H"),
            ]
        ]
        if self.footer_at is not None:
            a.fields += [
                Field("footer.capacity", self.footer_at + 12, "<Q"),
                Field("footer.gd_offset", self.footer_at + 56, "<Q"),
            ]
        gd = self.gd()
        for i in range(min(len(gd), 3)):
            a.fields.append(Field(f"gd[{i}]", self.gd_offset * 512 + 4 * i, "<I"))
        for n, (guest, _, at) in enumerate(self.grains()):
            if n >= 8:
                break
            a.fields.append(Field(f"gt[{guest}]", at, "<I"))
        if self.flags & (1 << 16):  # compressed grains: their markers
            for n, (guest, sector, _) in enumerate(self.grains()):
                if n >= 4:
                    break
                a.fields += [
                    Field(f"grain[{guest}].lba", sector * 512, "<Q"),
                    Field(f"grain[{guest}].size", sector * 512 + 8, "<I"),
                ]
        return a


VHD_UNUSED = 0xFFFF_FFFF


@dataclass
class Vhd:
    data: bytes

    def __post_init__(self) -> None:
        d = self.data
        self.current_size = u(d, 48, ">Q")
        self.disk_type = u(d, 60, ">I")
        self.dyn = u(d, 16, ">Q")
        self.bat_offset = u(d, self.dyn + 16, ">Q")
        self.entries = u(d, self.dyn + 28, ">I")
        self.block = u(d, self.dyn + 32, ">I")

    def bat(self) -> list[int]:
        n = min(self.entries, max(0, (len(self.data) - self.bat_offset) // 4))
        return [u(self.data, self.bat_offset + 4 * i, ">I") for i in range(n)]

    @property
    def bitmap(self) -> int:
        return -(-(self.block // 512 // 8) // 512) * 512

    def anatomy(self) -> Anatomy:
        a = Anatomy()
        a.regions["header"] = (0, 512)
        a.regions["dynamic_header"] = (self.dyn, self.dyn + 1024)
        a.regions["bat"] = (self.bat_offset, self.bat_offset + 4 * self.entries)
        used = [(i, e) for i, e in enumerate(self.bat()) if e != VHD_UNUSED]
        if used:
            at = used[0][1] * 512
            a.regions["data"] = (at, at + self.bitmap + self.block)
        a.regions["footer"] = (len(self.data) - 512, len(self.data))
        dyn = self.dyn
        a.fields = [
            Field(n, o, f)
            for n, o, f in [
                ("features", 8, ">I"),
                ("version", 12, ">I"),
                ("data_offset", 16, ">Q"),
                ("creator_app", 28, ">I"),
                ("original_size", 40, ">Q"),
                ("current_size", 48, ">Q"),
                ("cylinders", 56, ">H"),
                ("heads", 58, ">B"),
                ("sectors_per_track", 59, ">B"),
                ("disk_type", 60, ">I"),
                ("dyn.cookie", dyn, ">Q"),
                ("dyn.data_offset", dyn + 8, ">Q"),
                ("dyn.table_offset", dyn + 16, ">Q"),
                ("dyn.version", dyn + 24, ">I"),
                ("dyn.max_table_entries", dyn + 28, ">I"),
                ("dyn.block_size", dyn + 32, ">I"),
            ]
        ]
        for n, (i, _) in enumerate(used):
            if n >= 6:
                break
            a.fields.append(Field(f"bat[{i}]", self.bat_offset + 4 * i, ">I"))
        return a


def vhd_checksum(data: bytes | bytearray, at: int, length: int, field_at: int) -> int:
    total = sum(data[at : at + length]) - sum(data[field_at : field_at + 4])
    return ~total & 0xFFFF_FFFF


def vhd_fix_checksums(data: bytearray) -> bytearray:
    """Set the checksums of both footer copies and the dynamic header to match their bytes."""
    for at in (0, len(data) - 512):
        if data[at : at + 8] == b"conectix":
            put(data, at + 64, ">I", vhd_checksum(data, at, 512, at + 64))
    dyn = u(data, 16, ">Q")
    if dyn + 1024 <= len(data) and data[dyn : dyn + 8] == b"cxsparse":
        put(data, dyn + 36, ">I", vhd_checksum(data, dyn, 1024, dyn + 36))
    return data


VDI_UNALLOCATED, VDI_DISCARDED = 0xFFFF_FFFF, 0xFFFF_FFFE


@dataclass
class Vdi:
    data: bytes

    def __post_init__(self) -> None:
        d = self.data
        self.image_type = u(d, 76, "<I")
        self.bmap_offset = u(d, 340, "<I")
        self.data_offset = u(d, 344, "<I")
        self.disk_size = u(d, 368, "<Q")
        self.block = u(d, 376, "<I")
        self.blocks = u(d, 384, "<I")
        self.allocated = u(d, 388, "<I")

    def bmap(self) -> list[int]:
        n = min(self.blocks, max(0, (len(self.data) - self.bmap_offset) // 4))
        return [u(self.data, self.bmap_offset + 4 * i, "<I") for i in range(n)]

    def anatomy(self) -> Anatomy:
        a = Anatomy()
        a.regions["header"] = (0, 512)
        a.regions["bmap"] = (self.bmap_offset, self.bmap_offset + 4 * self.blocks)
        used = [(i, e) for i, e in enumerate(self.bmap()) if e < VDI_DISCARDED]
        if used:
            at = self.data_offset + used[0][1] * self.block
            a.regions["data"] = (at, at + self.block)
        a.fields = [
            Field(n, o, f)
            for n, o, f in [
                ("signature", 64, "<I"),
                ("version", 68, "<I"),
                ("header_size", 72, "<I"),
                ("image_type", 76, "<I"),
                ("image_flags", 80, "<I"),
                ("offset_bmap", 340, "<I"),
                ("offset_data", 344, "<I"),
                ("cylinders", 348, "<I"),
                ("heads", 352, "<I"),
                ("sectors", 356, "<I"),
                ("sector_size", 360, "<I"),
                ("disk_size", 368, "<Q"),
                ("block_size", 376, "<I"),
                ("block_extra", 380, "<I"),
                ("blocks_in_image", 384, "<I"),
                ("blocks_allocated", 388, "<I"),
                ("uuid_link", 424, "<Q"),
                ("uuid_parent", 440, "<Q"),
            ]
        ]
        for n, (i, _) in enumerate(used):
            if n >= 6:
                break
            a.fields.append(Field(f"bmap[{i}]", self.bmap_offset + 4 * i, "<I"))
        return a


def anatomy(fmt: str, data: bytes) -> Anatomy:
    """Where `data`'s parts lie, or an empty anatomy if it cannot be parsed."""
    parser = {"qcow2": Qcow2, "vmdk": Vmdk, "vpc": Vhd, "vdi": Vdi}[fmt]
    try:
        return parser(data).anatomy()  # type: ignore[attr-defined]
    except (struct.error, IndexError, ValueError, OverflowError):
        return Anatomy()


# --- Rewriters: the same disk laid out in another order -------------------------------------


def qcow2_repack(data: bytes, order: str, seed: int) -> bytes:
    """`data` (a qcow2 without extended L2 entries) rewritten with its clusters in another
    order, every table fixed and refcounts right (`qemu-img check` passes); snapshots dropped.

    order: "l2-after-data" (header, L1, refcounts, data in guest order, then the L2 tables),
    "data-reversed" (tables first, data in reverse guest order), "permuted" (everything after
    the header in a random order, the L1 table included), "l1-last" (data permuted, L2
    tables, then the L1 table at the very end)."""
    q = Qcow2(data)
    cs, rng = q.cs, random.Random(seed)
    x = 62 - (q.cluster_bits - 8)
    per_l2 = cs // 8
    # What each guest cluster holds: ("data", bytes) / ("zero",) / ("comp", blob).
    content: dict[int, tuple] = {}
    for guest, entry, _ in q.entries():
        if entry & (1 << 62):
            off, n = q.compressed(entry)
            # Whole sectors, no more than the entry can count.
            sectors = min(-(-n // 512), 1 << (q.cluster_bits - 8))
            content[guest] = ("comp", data[off : off + sectors * 512].ljust(sectors * 512, b"\0"))
        elif entry & 1 and q.version >= 3:
            content[guest] = ("zero",)
        elif entry & L2_OFFSET_MASK:
            off = entry & L2_OFFSET_MASK
            content[guest] = ("data", data[off : off + cs].ljust(cs, b"\0"))
    l2_indices = sorted({g // per_l2 for g in content})
    l1_clusters = -(-q.l1_size * 8 // cs)
    # Objects: (kind, key, clusters).
    objects: list[tuple[str, object, int]] = []
    data_objs = [
        ("data" if v[0] == "data" else "comp", g, -(-len(v[1]) // cs) if v[0] == "comp" else 1)
        for g, v in sorted(content.items())
        if v[0] != "zero"
    ]
    l2_objs = [("l2", i, 1) for i in l2_indices]
    l1_obj = [("l1", None, l1_clusters)]
    refbits = 1 << q.refcount_order
    per_rb = cs * 8 // refbits
    n_meta = 0
    while True:  # refcount blocks and table enough for every cluster, themselves included
        total = 1 + sum(o[2] for o in data_objs + l2_objs + l1_obj) + n_meta
        rbs = -(-total // per_rb)
        rt = -(-rbs * 8 // cs)
        if rbs + rt == n_meta:
            break
        n_meta = rbs + rt
    rt_obj, rb_objs = [("rt", None, rt)], [("rb", i, 1) for i in range(rbs)]
    if order == "l2-after-data":
        objects = l1_obj + rt_obj + rb_objs + data_objs + l2_objs
    elif order == "data-reversed":
        objects = l1_obj + l2_objs + rt_obj + rb_objs + data_objs[::-1]
    elif order == "permuted":
        objects = l1_obj + l2_objs + rt_obj + rb_objs + data_objs
        rng.shuffle(objects)
    elif order == "l1-last":
        rng.shuffle(data_objs)
        objects = rt_obj + rb_objs + data_objs + l2_objs[::-1] + l1_obj
    else:
        raise ValueError(order)
    at, where = cs, {}
    for kind, key, n in objects:
        where[kind, key] = at
        at += n * cs
    out = bytearray(at)
    out[:cs] = data[:cs]
    put(out, 36, ">I", q.l1_size)
    put(out, 40, ">Q", where["l1", None])
    put(out, 48, ">Q", where["rt", None])
    put(out, 56, ">I", rt)
    put(out, 60, ">I", 0)
    put(out, 64, ">Q", 0)
    if q.version >= 3:
        put(out, 72, ">Q", q.incompatible & ~1)  # clean
        put(out, 88, ">Q", 0)
    for i in l2_indices:
        l2_at = where["l2", i]
        put(out, where["l1", None] + 8 * i, ">Q", l2_at | 1 << 63)
        for j in range(per_l2):
            v = content.get(i * per_l2 + j)
            if v is None:
                continue
            if v[0] == "zero":
                entry = 1
            elif v[0] == "data":
                host = where["data", i * per_l2 + j]
                out[host : host + cs] = v[1]
                entry = host | 1 << 63
            else:
                host = where["comp", i * per_l2 + j]
                out[host : host + len(v[1])] = v[1]
                entry = 1 << 62 | (len(v[1]) // 512 - 1) << x | host
            put(out, l2_at + 8 * j, ">Q", entry)
    for i in range(rbs):
        put(out, where["rt", None] + 8 * i, ">Q", where["rb", i])
    width = refbits // 8 if refbits >= 8 else 0
    for cluster in range(at // cs):
        rb = where["rb", cluster // per_rb]
        k = cluster % per_rb
        if width:
            out[rb + k * width : rb + (k + 1) * width] = (1).to_bytes(width, "big")
        else:  # sub-byte refcounts: entry k at bit k * refbits of the block, lowest first
            bit = k * refbits
            out[rb + bit // 8] |= 1 << (bit % 8)
    return bytes(out)


def vdi_permute(data: bytes, seed: int, *, discard: int = 0) -> bytes:
    """`data` (a dynamic VDI) with its blocks stored in a random order, the map fixed; the
    first `discard` allocated blocks marked discarded (read as zeros) but left in place."""
    v = Vdi(data)
    rng = random.Random(seed)
    bmap = v.bmap()
    used = [i for i, e in enumerate(bmap) if e < VDI_DISCARDED]
    slots = list(range(len(used)))
    rng.shuffle(slots)
    out = bytearray(data[: v.data_offset + len(used) * v.block])
    for i, slot in zip(used, slots, strict=True):
        src = v.data_offset + bmap[i] * v.block
        dst = v.data_offset + slot * v.block
        out[dst : dst + v.block] = data[src : src + v.block].ljust(v.block, b"\0")
        put(out, v.bmap_offset + 4 * i, "<I", slot)
    for i in used[:discard]:
        put(out, v.bmap_offset + 4 * i, "<I", VDI_DISCARDED)
    put(out, 388, "<I", len(used) - min(discard, len(used)))
    return bytes(out)


def vhd_build(raw: bytes, template: bytes, *, block: int, order: str, seed: int) -> bytes:
    """A dynamic VHD of disk `raw` with blocks of `block` bytes, made from `template`'s footer
    and dynamic header (a qemu-img made VHD of the same size): only blocks holding data are
    stored (bitmap all ones). order: "bat-first" (blocks in guest order), "permuted" (blocks
    in a random order), "bat-last" (the BAT after the blocks, which are permuted)."""
    rng = random.Random(seed)
    t = Vhd(template)
    size = t.current_size
    n = -(-size // block)
    bitmap = -(-(block // 512 // 8) // 512) * 512
    blocks = [
        i for i in range(n) if any(raw[i * block : (i + 1) * block])
    ]  # guest blocks with data
    if order != "bat-first":
        rng.shuffle(blocks)
    bat_bytes = -(-4 * n // 512) * 512
    head = 512 + 1024
    bat_at = head if order != "bat-last" else None
    at = head + (bat_bytes if bat_at is not None else 0)
    out = bytearray(template[:512]) + bytearray(template[t.dyn : t.dyn + 1024])
    out += b"\0" * (at - len(out))
    bat = [VHD_UNUSED] * n
    for i in blocks:
        bat[i] = at // 512
        out += b"\xff" * bitmap + raw[i * block : (i + 1) * block].ljust(block, b"\0")
        at = len(out)
    if bat_at is None:
        bat_at = len(out)
        out += b"\0" * bat_bytes
    for i, e in enumerate(bat):
        put(out, bat_at + 4 * i, ">I", e)
    for i in range(n, bat_bytes // 4):
        put(out, bat_at + 4 * i, ">I", VHD_UNUSED)
    put(out, 16, ">Q", 512)
    put(out, 512 + 16, ">Q", bat_at)
    put(out, 512 + 28, ">I", n)
    put(out, 512 + 32, ">I", block)
    out += out[:512]
    return bytes(vhd_fix_checksums(out))


def vmdk_vmware_stream(raw: bytes, *, grain_sectors: int = 128, shuffle_tables: int = 0) -> bytes:
    """A streamOptimized VMDK of disk `raw` laid out as VMware writes one (the grain directory
    "at the end"): header, descriptor, then each grain as a marker and zlib data, each grain
    table after its grains in a marker, then the grain directory, the footer and the end of
    stream. `shuffle_tables`: a seed to write the grains in a random order instead."""
    grain = grain_sectors * 512
    gtes = 512
    capacity = -(-len(raw) // 512)
    n_grains = -(-capacity // grain_sectors)
    n_gts = -(-n_grains // gtes)
    descriptor = (
        "# Disk DescriptorFile\nversion=1\nCID=1234abcd\nparentCID=ffffffff\n"
        'createType="streamOptimized"\n\n# Extent description\n'
        f'RDONLY {capacity} SPARSE "disk.vmdk"\n\n# The Disk Data Base\n#DDB\n\n'
        'ddb.adapterType = "lsilogic"\nddb.virtualHWVersion = "4"\n'
    ).encode()
    desc_sectors = 20
    overhead = 128  # sectors before the first grain

    def header(gd_offset: int) -> bytearray:
        h = bytearray(512)
        struct.pack_into(
            "<4sIIQQQQIQQQ",
            h,
            0,
            b"KDMV",
            3,
            0x30001,
            capacity,
            grain_sectors,
            1,
            desc_sectors,
            gtes,
            0,
            gd_offset,
            overhead,
        )
        h[73:77] = b"\n \r\n"
        struct.pack_into("<H", h, 77, 1)
        return h

    def marker(sectors: int, kind: int) -> bytes:
        return struct.pack("<QII", sectors, 0, kind).ljust(512, b"\0")

    out = header(0xFFFF_FFFF_FFFF_FFFF)
    out += descriptor.ljust(desc_sectors * 512, b"\0")
    out += b"\0" * (overhead * 512 - len(out))
    order = [g for g in range(n_grains) if any(raw[g * grain : (g + 1) * grain])]
    if shuffle_tables:
        random.Random(shuffle_tables).shuffle(order)
    tables = [[0] * gtes for _ in range(n_gts)]
    gd = [0] * n_gts
    written_gts: set[int] = set()

    def write_gt(t: int) -> None:
        nonlocal out
        out += marker(4, 1)
        gd[t] = len(out) // 512
        out += b"".join(struct.pack("<I", e) for e in tables[t])
        written_gts.add(t)

    for i, g in enumerate(order):
        data = zlib.compress(raw[g * grain : (g + 1) * grain].ljust(grain, b"\0"))
        tables[g // gtes][g % gtes] = len(out) // 512
        blob = struct.pack("<QI", g * grain_sectors, len(data)) + data
        out += blob.ljust(-(-len(blob) // 512) * 512, b"\0")
        nxt = order[i + 1] if i + 1 < len(order) else None
        if not shuffle_tables and (nxt is None or nxt // gtes != g // gtes):
            write_gt(g // gtes)
    for t in range(n_gts):
        if t not in written_gts and any(tables[t]):
            write_gt(t)
    out += marker(-(-4 * n_gts // 512), 2)
    gd_at = len(out) // 512
    out += b"".join(struct.pack("<I", e) for e in gd).ljust(-(-4 * n_gts // 512) * 512, b"\0")
    out += marker(1, 3)
    out += header(gd_at)
    out += marker(0, 0)
    return bytes(out)


# --- Mutations ------------------------------------------------------------------------------


def truncate_at(fmt: str, data: bytes, where: str) -> bytes | None:
    """`data` cut inside its `where` (a region of its anatomy: "header", "l1", "data"...),
    at "half" of the file or before its "last-byte"; None if it has no such region."""
    if where == "last-byte":
        return data[:-1]
    if where == "half":
        return data[: len(data) // 2]
    region = anatomy(fmt, data).regions.get(where)
    if region is None or region[0] >= len(data):
        return None
    start, end = region
    return data[: start + max(1, (min(end, len(data)) - start) // 2)]


@dataclass(frozen=True)
class Edit:
    """A corruption: set `field` (a name in the image's anatomy) to `value`, which may be a
    function of the parsed image; or run `apply` on the bytes."""

    field: str | None = None
    value: int | Callable[[object], int] = 0
    apply: Callable[[bytearray], None] | None = None
    fix_checksums: bool = True


def corrupt(fmt: str, data: bytes, edits: list[Edit]) -> bytes | None:
    out = bytearray(data)
    parsed = {"qcow2": Qcow2, "vmdk": Vmdk, "vpc": Vhd, "vdi": Vdi}[fmt](data)
    fields = {f.name: f for f in parsed.anatomy().fields}
    for edit in edits:
        if edit.apply is not None:
            edit.apply(out)
            continue
        assert edit.field is not None
        if edit.field not in fields:
            return None
        f = fields[edit.field]
        value = edit.value(parsed) if callable(edit.value) else edit.value
        put(out, f.offset, f.fmt, value)
    if fmt == "vpc" and all(e.fix_checksums for e in edits):
        vhd_fix_checksums(out)
    return bytes(out)


# --- The cases ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    fmt: str  # a DiskFormat value: qcow2, vmdk, vpc, vdi
    kind: str  # valid, rewritten, shuffled, rejected, truncated, corrupted
    make: Callable[[Corpus, Path], bool | None] = field(repr=False, compare=False)
    """Writes the image; returns False if it cannot be made from its base (no such region)."""
    features: frozenset[str] = frozenset()
    """What the image uses that a decoder may document as a fallback (Unsupported)."""
    expect: str | None = None
    """For rejected cases: the reason the import's pre-checks or the decoder must give."""
    qemu_lenient_ok: str | None = None
    """Why diskflow may succeed here although qemu-img fails (investigated), if it may."""

    @property
    def well_formed(self) -> bool:
        return self.kind in ("valid", "rewritten", "shuffled")


class Corpus:
    """The cases' images, made on demand in `directory` and kept."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cases = {c.name: c for c in cases()}
        self._lock = threading.Lock()

    def file(self, name: str) -> Path:
        return self.dir / (name.replace("/", "__") + ".img")

    def path(self, name: str) -> Path | None:
        """The image of case `name` (made now if it is not yet), or None if it cannot be."""
        path = self.file(name)
        missing = self.dir / (path.name + ".none")
        if path.exists():
            return path
        if missing.exists():
            return None
        work = self.dir / (path.name + ".part")
        with contextlib.suppress(FileNotFoundError):
            work.unlink()
        if self.cases[name].make(self, work) is False:
            missing.touch()
            return None
        work.rename(path)
        return path

    def bytes(self, name: str) -> bytes:
        path = self.path(name)
        assert path is not None, name
        return path.read_bytes()

    def raw(self, size: int, seed: int) -> Path:
        path = self.dir / f"seed-{size}-{seed}.raw"
        if not path.exists():
            raw_disk(path.with_suffix(".part"), size, seed)
            path.with_suffix(".part").rename(path)
        return path

    def scratch(self, suffix: str) -> Path:
        fd, path = tempfile.mkstemp(dir=self.dir, suffix=suffix)
        os.close(fd)
        return Path(path)


SIZE = 3 * MiB + 1536  # the seeded disks: not a multiple of any cluster, block or grain size


def _convert(
    fmt: str, options: str, *, size: int = SIZE, seed: int = 1, extra: tuple[str, ...] = ()
) -> Callable[[Corpus, Path], None]:
    """qemu-img convert of a seeded raw disk to `fmt` with `-o options`."""

    def make(c: Corpus, out: Path) -> None:
        args = ["-o", options] if options else []
        run("qemu-img", "convert", "-f", "raw", "-O", fmt, *args, *extra, c.raw(size, seed), out)

    return make


def _qemu_io(
    base: Callable[[Corpus, Path], None], fmt: str, *commands: str
) -> Callable[[Corpus, Path], None]:
    def make(c: Corpus, out: Path) -> None:
        base(c, out)
        args = [a for cmd in commands for a in ("-c", cmd)]
        run("qemu-io", "-f", fmt, *args, out)

    return make


def _create_written(
    fmt: str, options: str, commands: list[str], *, size: int = SIZE
) -> Callable[[Corpus, Path], None]:
    """An empty image written by qemu-io: clusters allocated in the order written."""

    def make(c: Corpus, out: Path) -> None:
        run("qemu-img", "create", "-f", fmt, "-o", options, out, str(size))
        run("qemu-io", "-f", fmt, *[a for cmd in commands for a in ("-c", cmd)], out)

    return make


def _from(base: str, transform: Callable[[bytes], bytes | None]) -> Callable[[Corpus, Path], bool]:
    def make(c: Corpus, out: Path) -> bool:
        data = transform(c.bytes(base))
        if data is None:
            return False
        out.write_bytes(data)
        return True

    return make


def _then(
    base: Callable[[Corpus, Path], None], transform: Callable[[bytearray], None]
) -> Callable[[Corpus, Path], None]:
    def make(c: Corpus, out: Path) -> None:
        base(c, out)
        data = bytearray(out.read_bytes())
        transform(data)
        out.write_bytes(data)

    return make


def _sparsified(c: Corpus, out: Path) -> None:
    """virt-sparsify's way: the guest's freed blocks zeroed in a raw copy, converted again
    with fine zero detection (-S 512), so what was data is now holes at odd places."""
    raw = c.scratch(".raw")
    shutil.copyfile(c.raw(SIZE, 2), raw)
    with open(raw, "r+b") as f:
        for offset, length in ((4096, 8192), (MiB + 6000, 3000), (2 * MiB - 60_000, 40_000)):
            f.seek(offset)
            f.write(bytes(length))
    run("qemu-img", "convert", "-S", "512", "-f", "raw", "-O", "qcow2", raw, out)
    raw.unlink()


def _repacked(base: str, order: str, seed: int) -> Callable[[Corpus, Path], bool]:
    return _from(base, lambda data: qcow2_repack(data, order, seed))


def _vhd_rebuilt(
    *,
    block: int,
    order: str,
    seed: int,
    template: str = "vpc/dynamic-force-size",
    creator: bytes | None = None,
    geometry: tuple[int, int, int] | None = None,
) -> Callable[[Corpus, Path], None]:
    """A VHD written here (`vhd_build`) of the seeded disk of `template`'s size; its creator
    application and CHS geometry (which decide qemu's idea of its size) as given."""

    def make(c: Corpus, out: Path) -> None:
        base = c.bytes(template)
        raw = c.raw(Vhd(base).current_size, 3).read_bytes()
        data = bytearray(vhd_build(raw, base, block=block, order=order, seed=seed))
        for at in (0, len(data) - 512):
            if creator is not None:
                data[at + 28 : at + 32] = creator
            if geometry is not None:
                struct.pack_into(">HBB", data, at + 56, *geometry)
        out.write_bytes(vhd_fix_checksums(data))

    return make


def _set_bits(offset: int, fmt: str, bits: int) -> Callable[[bytearray], None]:
    def apply(data: bytearray) -> None:
        put(data, offset, fmt, u(data, offset, fmt) | bits)

    return apply


BIG = 20 * GiB + 3 * 512  # a large sparse disk: tables of thousands of entries


def _big_written(fmt: str, options: str) -> Callable[[Corpus, Path], None]:
    """A BIG disk with a little data at its start, around its middle and at its very end."""
    return _create_written(
        fmt,
        options,
        [
            "write -P 0x61 0 70k",
            f"write -P 0x62 {10 * GiB - 3000} 9k",
            f"write -P 0x63 {17 * GiB + 12345 * 512} 1k",
            f"write -P 0x64 {BIG - 4096} 4k",
        ],
        size=BIG,
    )


def _qcow2_valid() -> list[Case]:
    v = "valid"
    cases = [
        Case("qcow2/v2-compat010", "qcow2", v, _convert("qcow2", "compat=0.10")),
        Case("qcow2/v3-c512", "qcow2", v, _convert("qcow2", "cluster_size=512")),
        Case("qcow2/v3-c4k", "qcow2", v, _convert("qcow2", "cluster_size=4096")),
        Case("qcow2/v3-c64k", "qcow2", v, _convert("qcow2", "")),
        Case("qcow2/v3-c2m", "qcow2", v, _convert("qcow2", "cluster_size=2M", seed=4)),
        Case("qcow2/v3-zlib", "qcow2", v, _convert("qcow2", "", extra=("-c",)), _f("compressed")),
        Case(
            "qcow2/v3-zlib-c4k",
            "qcow2",
            v,
            _convert("qcow2", "cluster_size=4096", extra=("-c",)),
            _f("compressed"),
        ),
        Case(
            "qcow2/v2-zlib",
            "qcow2",
            v,
            _convert("qcow2", "compat=0.10", extra=("-c",)),
            _f("compressed"),
        ),
        Case(
            "qcow2/v3-zstd",
            "qcow2",
            v,
            _convert("qcow2", "compression_type=zstd", extra=("-c",)),
            _f("compressed", "zstd"),
        ),
        Case(
            "qcow2/v3-zstd-c2m",
            "qcow2",
            v,
            _convert("qcow2", "compression_type=zstd,cluster_size=2M", seed=4, extra=("-c",)),
            _f("compressed", "zstd"),
        ),
        Case("qcow2/v3-prealloc-metadata", "qcow2", v, _convert("qcow2", "preallocation=metadata")),
        Case(
            "qcow2/v2-prealloc-metadata",
            "qcow2",
            v,
            _convert("qcow2", "compat=0.10,preallocation=metadata,cluster_size=4096"),
        ),
        Case(
            "qcow2/v3-snapshot",
            "qcow2",
            v,
            _snapshotted("cluster_size=4096"),
            _f("snapshot"),
        ),
        Case(
            "qcow2/v2-snapshot",
            "qcow2",
            v,
            _snapshotted("compat=0.10"),
            _f("snapshot"),
        ),
        Case(
            "qcow2/v3-lazy-refcounts",
            "qcow2",
            v,
            _qemu_io(
                _convert("qcow2", "lazy_refcounts=on,cluster_size=4096"),
                "qcow2",
                "write -P 0x5a 1536k 12k",
            ),
        ),
        Case(
            "qcow2/v3-lazy-dirty",
            "qcow2",
            v,
            _then(_convert("qcow2", "lazy_refcounts=on"), _set_bits(72, ">Q", 1)),
            _f("dirty"),
        ),
        Case("qcow2/v3-refcount64", "qcow2", v, _convert("qcow2", "refcount_bits=64")),
        Case("qcow2/v3-refcount1", "qcow2", v, _convert("qcow2", "refcount_bits=1")),
        Case(
            "qcow2/v3-zero-clusters",
            "qcow2",
            v,
            _qemu_io(
                _convert("qcow2", "cluster_size=4096"),
                "qcow2",
                "write -z 8k 16k",  # allocated clusters turned zero (offset kept)
                "write -z 2560k 64k",  # unallocated ones: the zero flag alone
                "discard 40k 8k",
                "write -P 0xab 2900k 5k",  # a late allocation, out of guest order
            ),
            _f("zero-clusters"),
        ),
        Case(
            "qcow2/v2-discarded",
            "qcow2",
            v,
            _qemu_io(
                _convert("qcow2", "compat=0.10,cluster_size=4096"),
                "qcow2",
                "write -z 8k 16k",
                "discard 40k 8k",
            ),
        ),
        Case(
            "qcow2/v3-written-backwards",
            "qcow2",
            v,
            _create_written(
                "qcow2",
                "cluster_size=4096",
                [
                    f"write -P {i + 1} {off} 6k"
                    for i, off in enumerate(range(SIZE - 8192, 0, -196_608))
                ],
            ),
        ),
        Case(
            "qcow2/v3-extended-l2",
            "qcow2",
            v,
            _qemu_io(
                _convert("qcow2", "extended_l2=on"), "qcow2", "write -z 4k 8k", "write -P 7 1m 2k"
            ),
            _f("extended-l2"),
        ),
        Case(
            "qcow2/v3-compressed-partial",
            "qcow2",
            v,
            # Compressed clusters, some rewritten in place (uncompressed) since.
            _qemu_io(
                _convert("qcow2", "cluster_size=4096", extra=("-c",)),
                "qcow2",
                "write -P 0x33 2k 5k",
                "write -z 60k 4k",
            ),
            _f("compressed", "zero-clusters"),
        ),
        Case("qcow2/sparsified", "qcow2", "rewritten", _sparsified),
        Case("qcow2/v3-big-sparse", "qcow2", v, _big_written("qcow2", "cluster_size=4096")),
        Case("qcow2/v2-big-sparse", "qcow2", v, _big_written("qcow2", "compat=0.10")),
        Case(
            "qcow2/v3-zlib-c512",
            "qcow2",
            v,
            _convert("qcow2", "cluster_size=512", extra=("-c",)),
            _f("compressed"),
        ),
        Case(
            "qcow2/repacked-c512",
            "qcow2",
            "rewritten",
            _qcow2_to_qcow2("qcow2/v3-c4k", "cluster_size=512"),
        ),
    ]
    for base, seed in (("qcow2/v3-c4k", 11), ("qcow2/v3-c512", 12), ("qcow2/v2-compat010", 13)):
        for order in ("l2-after-data", "data-reversed", "permuted", "l1-last"):
            cases.append(
                Case(
                    f"{base}/{order}",
                    "qcow2",
                    "shuffled",
                    _repacked(base, order, seed),
                    _f("data-before-tables") if order != "data-reversed" else frozenset(),
                )
            )
    for base, seed in (
        ("qcow2/v3-zlib-c4k", 14),
        ("qcow2/v3-zstd", 15),
        ("qcow2/v3-zero-clusters", 16),
    ):
        feats = Qcow2Features.get(base, frozenset())
        cases.append(
            Case(
                f"{base}/permuted",
                "qcow2",
                "shuffled",
                _repacked(base, "permuted", seed),
                feats | _f("data-before-tables"),
            )
        )
    cases += [
        Case(
            "qcow2/backing-file",
            "qcow2",
            "rejected",
            _with_backing,
            expect="BackingFileRejected",
        ),
        Case(
            "qcow2/external-data-file",
            "qcow2",
            "rejected",
            _then(_convert("qcow2", ""), _set_bits(72, ">Q", 4)),
            expect="DataFileRejected",
        ),
        Case(
            "qcow2/version-1",
            "qcow2",
            "rejected",
            _then(_convert("qcow2", "compat=0.10"), lambda d: put(d, 4, ">I", 1)),
            expect="UnsupportedFormat",
        ),
    ]
    return cases


Qcow2Features = {
    "qcow2/v3-zlib-c4k": frozenset({"compressed"}),
    "qcow2/v3-zstd": frozenset({"compressed", "zstd"}),
    "qcow2/v3-zero-clusters": frozenset({"zero-clusters"}),
}


def _f(*names: str) -> frozenset[str]:
    return frozenset(names)


def _snapshotted(options: str) -> Callable[[Corpus, Path], None]:
    def make(c: Corpus, out: Path) -> None:
        _convert("qcow2", options)(c, out)
        run("qemu-img", "snapshot", "-c", "first", out)
        run("qemu-io", "-f", "qcow2", "-c", "write -P 0x44 0 6k", "-c", "write -P 0x45 2m 3k", out)
        run("qemu-img", "snapshot", "-c", "second", out)
        run("qemu-io", "-f", "qcow2", "-c", "write -P 0x46 1k 1k", out)

    return make


def _with_backing(c: Corpus, out: Path) -> None:
    backing = c.dir / "backing.raw"
    if not backing.exists():
        shutil.copyfile(c.raw(SIZE, 1), backing)
    run("qemu-img", "create", "-f", "qcow2", "-b", backing, "-F", "raw", out)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 9 1m 4k", out)


def _qcow2_to_qcow2(base: str, options: str) -> Callable[[Corpus, Path], None]:
    def make(c: Corpus, out: Path) -> None:
        src = c.path(base)
        run("qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", "-o", options, src, out)

    return make


def _vmware_stream(shuffle: int) -> Callable[[Corpus, Path], None]:
    def make(c: Corpus, out: Path) -> None:
        out.write_bytes(
            vmdk_vmware_stream(c.raw(9 * MiB + 512, 5).read_bytes(), shuffle_tables=shuffle)
        )

    return make


def _vmdk_valid() -> list[Case]:
    v = "valid"
    return [
        Case("vmdk/monolithic-sparse", "vmdk", v, _convert("vmdk", "subformat=monolithicSparse")),
        Case(
            "vmdk/stream-optimized",
            "vmdk",
            v,
            _convert("vmdk", "subformat=streamOptimized"),
            _f("compressed"),
        ),
        Case(
            "vmdk/stream-optimized-big",
            "vmdk",
            v,
            _convert("vmdk", "subformat=streamOptimized", size=9 * MiB + 512, seed=5),
            _f("compressed"),
        ),
        Case(
            "vmdk/zeroed-grain",
            "vmdk",
            v,
            _qemu_io(
                _convert("vmdk", "zeroed_grain=on"), "vmdk", "write -z 0 64k", "write -z 2m 64k"
            ),
            _f("zero-grains"),
        ),
        Case("vmdk/compat6", "vmdk", v, _convert("vmdk", "compat6=on")),
        Case("vmdk/big-sparse", "vmdk", v, _big_written("vmdk", "subformat=monolithicSparse")),
        Case("vmdk/vmware-stream", "vmdk", "rewritten", _vmware_stream(0), _f("compressed")),
        Case(
            "vmdk/vmware-stream/shuffled",
            "vmdk",
            "shuffled",
            _vmware_stream(41),
            _f("compressed", "data-before-tables"),
        ),
        Case(
            "vmdk/written-backwards",
            "vmdk",
            v,
            _create_written(
                "vmdk",
                "subformat=monolithicSparse",
                [
                    f"write -P {i + 1} {off} 6k"
                    for i, off in enumerate(range(SIZE - 8192, 0, -196_608))
                ],
            ),
        ),
        Case(
            "vmdk/descriptor-no-capacity",
            "vmdk",
            "rejected",
            _then(_convert("vmdk", ""), lambda d: put(d, 12, "<Q", 0)),
            expect="BackingFileRejected",
        ),
    ]


ODD = "vpc/dynamic-force-size-odd"


def _vpc_valid() -> list[Case]:
    v = "valid"
    odd = 5 * MiB + 3 * 512  # not a CHS size: qemu rounds it up unless force_size
    cases = [
        Case("vpc/dynamic", "vpc", v, _convert("vpc", "subformat=dynamic", size=odd, seed=3)),
        Case("vpc/big-sparse", "vpc", v, _big_written("vpc", "subformat=dynamic,force_size=on")),
        Case(
            "vpc/blocks-4k",
            "vpc",
            "rewritten",
            _vhd_rebuilt(block=4 * KiB, order="permuted", seed=24),
        ),
        Case(
            "vpc/dynamic-force-size",
            "vpc",
            v,
            _convert("vpc", "subformat=dynamic,force_size=on", seed=3),
        ),
        Case(
            "vpc/dynamic-chs-exact",
            "vpc",
            v,
            _convert("vpc", "subformat=dynamic", size=16 * 63 * 4 * 512, seed=6),
        ),
        Case(
            "vpc/dynamic-force-size-odd",
            "vpc",
            v,
            _convert("vpc", "subformat=dynamic,force_size=on", size=odd, seed=3),
        ),
        Case(
            "vpc/written-backwards",
            "vpc",
            v,
            _create_written(
                "vpc",
                "subformat=dynamic",
                [
                    f"write -P {i + 1} {off} 6k"
                    for i, off in enumerate(range(SIZE - 8192, 0, -700_000))
                ],
            ),
        ),
        Case(
            "vpc/blocks-64k",
            "vpc",
            "rewritten",
            _vhd_rebuilt(block=64 * KiB, order="bat-first", seed=0),
        ),
        Case(
            "vpc/blocks-512k",
            "vpc",
            "rewritten",
            _vhd_rebuilt(block=512 * KiB, order="bat-first", seed=0),
        ),
        Case(
            "vpc/creator-vpc-chs",
            "vpc",
            "rewritten",
            _vhd_rebuilt(
                block=64 * KiB,
                order="bat-first",
                seed=0,
                template=ODD,
                creator=b"vpc ",
                geometry=(80, 4, 32),
            ),
            _f("chs-size"),
        ),
        Case(
            "vpc/creator-unknown-chs",
            "vpc",
            "rewritten",
            _vhd_rebuilt(
                block=64 * KiB,
                order="bat-first",
                seed=0,
                template=ODD,
                creator=b"abcd",
                geometry=(80, 4, 32),
            ),
            _f("chs-size"),
        ),
        Case(
            "vpc/creator-vpc-max-geometry",
            "vpc",
            "rewritten",
            _vhd_rebuilt(block=64 * KiB, order="bat-first", seed=0, template=ODD, creator=b"vpc "),
        ),
        Case(
            "vpc/creator-win",
            "vpc",
            "rewritten",
            _vhd_rebuilt(
                block=64 * KiB,
                order="bat-first",
                seed=0,
                template=ODD,
                creator=b"win ",
                geometry=(80, 4, 32),
            ),
        ),
        Case(
            "vpc/blocks-64k/permuted",
            "vpc",
            "shuffled",
            _vhd_rebuilt(block=64 * KiB, order="permuted", seed=21),
        ),
        Case(
            "vpc/blocks-64k/bat-last",
            "vpc",
            "shuffled",
            _vhd_rebuilt(block=64 * KiB, order="bat-last", seed=22),
            _f("data-before-tables"),
        ),
        Case(
            "vpc/blocks-2m/permuted",
            "vpc",
            "shuffled",
            _vhd_rebuilt(block=2 * MiB, order="permuted", seed=23),
        ),
    ]
    return cases


def _vdi_valid() -> list[Case]:
    v = "valid"
    return [
        Case("vdi/dynamic", "vdi", v, _convert("vdi", "", seed=7)),
        Case("vdi/static", "vdi", v, _convert("vdi", "static=on", seed=7)),
        Case("vdi/big-sparse", "vdi", v, _big_written("vdi", "static=off")),
        Case(
            "vdi/written-backwards",
            "vdi",
            v,
            _create_written(
                "vdi",
                "static=off",
                [
                    f"write -P {i + 1} {off} 6k"
                    for i, off in enumerate(range(SIZE - 8192, 0, -500_000))
                ],
            ),
        ),
        Case(
            "vdi/dynamic/permuted",
            "vdi",
            "shuffled",
            _from("vdi/dynamic", lambda d: vdi_permute(d, 31)),
        ),
        Case(
            "vdi/written-backwards/permuted",
            "vdi",
            "shuffled",
            _from("vdi/written-backwards", lambda d: vdi_permute(d, 32)),
        ),
        Case(
            "vdi/dynamic/discarded",
            "vdi",
            "rewritten",
            _from("vdi/dynamic", lambda d: vdi_permute(d, 33, discard=1)),
        ),
    ]


# Truncations: the base images cut, and where.
TRUNCATED = {
    "qcow2": (
        ["qcow2/v3-c4k", "qcow2/v3-zlib-c4k", "qcow2/v3-c4k/l2-after-data"],
        ["header", "l1", "l2", "refcounts", "data", "half", "last-byte"],
    ),
    "vmdk": (
        ["vmdk/monolithic-sparse", "vmdk/stream-optimized", "vmdk/vmware-stream"],
        ["header", "descriptor", "gd", "gt", "data", "half", "last-byte"],
    ),
    "vpc": (
        ["vpc/dynamic", "vpc/blocks-64k/bat-last"],
        ["header", "dynamic_header", "bat", "data", "half", "footer", "last-byte"],
    ),
    "vdi": (
        ["vdi/dynamic", "vdi/dynamic/permuted"],
        ["header", "bmap", "data", "half", "last-byte"],
    ),
}


def _qcow2_corruptions() -> dict[str, tuple[str, list[Edit]]]:
    c4k, comp, snap = "qcow2/v3-c4k", "qcow2/v3-zlib-c4k", "qcow2/v3-snapshot"
    big = 1 << 62

    def second_l1_shares_first(d: bytearray) -> None:
        q = Qcow2(bytes(d))
        first = q.l1()[0]
        put(d, q.l1_offset + 8, ">Q", first)

    def data_shared(d: bytearray) -> None:
        q = Qcow2(bytes(d))
        entries = [e for e in q.entries() if e[1] & L2_OFFSET_MASK and not e[1] & (1 << 62)]
        put(d, entries[1][2], ">Q", entries[0][1])

    def data_on_l1(d: bytearray) -> None:
        q = Qcow2(bytes(d))
        e = next(e for e in q.entries() if e[1] & L2_OFFSET_MASK and not e[1] & (3 << 62 >> 1))
        put(d, e[2], ">Q", (q.l1_offset & ~(q.cs - 1)) | 1 << 63)

    def data_on_header(d: bytearray) -> None:
        q = Qcow2(bytes(d))
        e = next(e for e in q.entries() if e[1] & L2_OFFSET_MASK)
        put(d, e[2], ">Q", 1 << 63)  # offset 0 with the COPIED flag: the header

    def l2_entry(fn: Callable[[Qcow2, int], int], nth: int = 0) -> Callable[[bytearray], None]:
        def apply(d: bytearray) -> None:
            q = Qcow2(bytes(d))
            e = [e for e in q.entries() if e[1] & L2_OFFSET_MASK][nth]
            put(d, e[2], ">Q", fn(q, e[1]))

        return apply

    def compressed_entry(fn: Callable[[Qcow2, int], int]) -> Callable[[bytearray], None]:
        def apply(d: bytearray) -> None:
            q = Qcow2(bytes(d))
            e = next(e for e in q.entries() if e[1] & (1 << 62))
            put(d, e[2], ">Q", fn(q, e[1]))

        return apply

    def garble_compressed(d: bytearray) -> None:
        q = Qcow2(bytes(d))
        e = next(e for e in q.entries() if e[1] & (1 << 62))
        off, n = q.compressed(e[1])
        for i in range(off + 2, off + min(n, 40)):
            d[i] ^= 0x5A

    def l1_entry(fn: Callable[[Qcow2, int], int]) -> Callable[[bytearray], None]:
        def apply(d: bytearray) -> None:
            q = Qcow2(bytes(d))
            put(d, q.l1_offset, ">Q", fn(q, q.l1()[0]))

        return apply

    def ext(kind: int, length: int) -> Callable[[bytearray], None]:
        def apply(d: bytearray) -> None:
            q = Qcow2(bytes(d))
            put(d, q.header_length, ">I", kind)
            put(d, q.header_length + 4, ">I", length)

        return apply

    def snapshot(offset: int, fmt: str, fn: Callable[[int], int]) -> Callable[[bytearray], None]:
        def apply(d: bytearray) -> None:
            at = Qcow2(bytes(d)).snapshots_offset + offset
            put(d, at, fmt, fn(u(d, at, fmt)))

        return apply

    def l1_extra_entry(d: bytearray) -> None:
        # One more L1 entry than the disk needs, naming an L2 table past the end of the file:
        # qemu never reads it.
        q = Qcow2(bytes(d))
        put(d, 36, ">I", q.l1_size + 1)
        put(d, q.l1_offset + 8 * q.l1_size, ">Q", (len(d) + 64 * q.cs) | 1 << 63)

    def l2_entry_past_disk(d: bytearray) -> None:
        # An entry of the last L2 table for a cluster past the disk's end: never read.
        q = Qcow2(bytes(d))
        index, table = q.l2_tables()[-1]
        per_l2 = q.cs // 8
        guest = -(-q.size // q.cs) + 1
        assert guest // per_l2 == index
        put(d, table + 8 * (guest % per_l2), ">Q", (len(d) + 64 * q.cs) | 1 << 63)

    def sectors_max(q, e):
        return e | (((1 << (q.cluster_bits - 8)) - 1) << (62 - (q.cluster_bits - 8)))

    return {
        "bad-magic": (c4k, [Edit("magic", 0x51464900)]),
        "version-2-with-v3-fields": (c4k, [Edit("version", 2)]),
        "version-4": (c4k, [Edit("version", 4)]),
        "version-0": (c4k, [Edit("version", 0)]),
        "cluster-bits-8": (c4k, [Edit("cluster_bits", 8)]),
        "cluster-bits-22": (c4k, [Edit("cluster_bits", 22)]),
        "cluster-bits-63": (c4k, [Edit("cluster_bits", 63)]),
        "cluster-bits-13": (c4k, [Edit("cluster_bits", 13)]),
        "size-0": (c4k, [Edit("size", 0)]),
        "size-huge": (c4k, [Edit("size", big)]),
        "size-max": (c4k, [Edit("size", (1 << 64) - 1)]),
        "size-2t": (c4k, [Edit("size", 2 << 40)]),
        "size-unaligned": (c4k, [Edit("size", SIZE - 100)]),
        "size-shrunk": (c4k, [Edit("size", 2 * MiB)]),
        "crypt-aes": (c4k, [Edit("crypt_method", 1)]),
        "crypt-luks": (c4k, [Edit("crypt_method", 2)]),
        "crypt-unknown": (c4k, [Edit("crypt_method", 7)]),
        "l1-size-0": (c4k, [Edit("l1_size", 0)]),
        "l1-size-1": (c4k, [Edit("l1_size", 1)]),
        "l1-size-huge": (c4k, [Edit("l1_size", 0x7FFF_FFFF)]),
        "l1-size-negative": (c4k, [Edit("l1_size", 0xFFFF_FFFF)]),
        "l1-offset-beyond-eof": (c4k, [Edit("l1_table_offset", lambda q: len(q.data) + 4096 * 8)]),
        "l1-offset-misaligned": (c4k, [Edit("l1_table_offset", lambda q: q.l1_offset + 8)]),
        "l1-offset-0": (c4k, [Edit("l1_table_offset", 0)]),
        "l1-offset-huge": (c4k, [Edit("l1_table_offset", big)]),
        "refcount-table-beyond-eof": (
            c4k,
            [Edit("refcount_table_offset", lambda q: len(q.data) + 4096 * 4)],
        ),
        "refcount-table-misaligned": (
            c4k,
            [Edit("refcount_table_offset", lambda q: q.rt_offset + 8)],
        ),
        "refcount-clusters-huge": (c4k, [Edit("refcount_table_clusters", 0xFFFF_FFFF)]),
        "refcount-order-7": (c4k, [Edit("refcount_order", 7)]),
        "snapshots-beyond-eof": (
            c4k,
            [Edit("nb_snapshots", 1), Edit("snapshots_offset", lambda q: len(q.data) + 4096)],
        ),
        "snapshots-too-many": (
            c4k,
            [Edit("nb_snapshots", 0xFFFF_FFFF), Edit("snapshots_offset", 4096)],
        ),
        "incompatible-unknown": (c4k, [Edit(apply=_set_bits(72, ">Q", 1 << 40))]),
        "incompatible-corrupt": (c4k, [Edit(apply=_set_bits(72, ">Q", 2))]),
        "compression-type-bad": (
            c4k,
            [Edit(apply=_set_bits(72, ">Q", 8)), Edit("compression_type", 9)],
        ),
        "header-length-short": (c4k, [Edit("header_length", 72)]),
        "header-length-huge": (c4k, [Edit("header_length", 0xFFFF_FFF0)]),
        "refcount-order-0": (c4k, [Edit("refcount_order", 0)]),
        "extension-too-long": (c4k, [Edit(apply=ext(0x6803F857, 0xFFFF_0000))]),
        "extension-backing-format": (c4k, [Edit(apply=ext(0xE2792ACA, 3))]),
        "l2-beyond-eof": (
            c4k,
            [Edit(apply=l1_entry(lambda q, e: (len(q.data) + 8 * q.cs) | 1 << 63))],
        ),
        "l2-misaligned": (c4k, [Edit(apply=l1_entry(lambda q, e: e + 512))]),
        "l2-huge": (
            c4k,
            [Edit(apply=l1_entry(lambda q, e: L2_OFFSET_MASK & ~(q.cs - 1) | 1 << 63))],
        ),
        "l2-on-header": (c4k, [Edit(apply=l1_entry(lambda q, e: 1 << 63))]),
        "l2-on-l1": (c4k, [Edit(apply=l1_entry(lambda q, e: q.l1_offset & ~(q.cs - 1) | 1 << 63))]),
        "l1-reserved-bits": (c4k, [Edit(apply=l1_entry(lambda q, e: e | 0x1FE))]),
        "l2-shared-by-two-l1": (c4k, [Edit(apply=second_l1_shares_first)]),
        "data-beyond-eof": (
            c4k,
            [Edit(apply=l2_entry(lambda q, e: (len(q.data) + 16 * q.cs) | 1 << 63, nth=1))],
        ),
        "data-misaligned": (c4k, [Edit(apply=l2_entry(lambda q, e: e + 512, nth=1))]),
        "data-huge-offset": (c4k, [Edit(apply=l2_entry(lambda q, e: (1 << 55) | 1 << 63, nth=1))]),
        "data-reserved-bits": (c4k, [Edit(apply=l2_entry(lambda q, e: e | 0x1FE))]),
        "data-high-bits": (c4k, [Edit(apply=l2_entry(lambda q, e: e | 1 << 58))]),
        "data-shared": (c4k, [Edit(apply=data_shared)]),
        "data-on-l1": (c4k, [Edit(apply=data_on_l1)]),
        "data-on-header": (c4k, [Edit(apply=data_on_header)]),
        "zero-flag-v2": ("qcow2/v2-compat010", [Edit(apply=l2_entry(lambda q, e: e | 1))]),
        "compressed-size-max": (comp, [Edit(apply=compressed_entry(sectors_max))]),
        "compressed-beyond-eof": (
            comp,
            [
                Edit(
                    apply=compressed_entry(
                        lambda q, e: (
                            (e & ~((1 << (62 - (q.cluster_bits - 8))) - 1)) | (len(q.data) + 8192)
                        )
                    )
                )
            ],
        ),
        "compressed-garbled": (comp, [Edit(apply=garble_compressed)]),
        "compressed-and-zero": (comp, [Edit(apply=compressed_entry(lambda q, e: e | 1))]),
        "compressed-at-0": (
            comp,
            [
                Edit(
                    apply=compressed_entry(
                        lambda q, e: e & ~((1 << (62 - (q.cluster_bits - 8))) - 1)
                    )
                )
            ],
        ),
        "l1-extra-entry-beyond-eof": (c4k, [Edit(apply=l1_extra_entry)]),
        "l2-entry-past-disk-end": (c4k, [Edit(apply=l2_entry_past_disk)]),
        "snapshot-extra-data-huge": (snap, [Edit(apply=snapshot(36, ">I", lambda x: 0xFFFF))]),
        "snapshot-extra-data-1025": (snap, [Edit(apply=snapshot(36, ">I", lambda x: 1025))]),
        "snapshot-l1-misaligned": (snap, [Edit(apply=snapshot(0, ">Q", lambda x: x + 8))]),
        "snapshot-l1-beyond-eof": (snap, [Edit(apply=snapshot(0, ">Q", lambda x: 1 << 50))]),
        "snapshot-l1-size-huge": (snap, [Edit(apply=snapshot(8, ">I", lambda x: 0x7FFF_FFFF))]),
        "snapshot-id-size-huge": (snap, [Edit(apply=snapshot(12, ">H", lambda x: 0xFFFF))]),
        "snapshot-name-size-huge": (snap, [Edit(apply=snapshot(14, ">H", lambda x: 0xFFFF))]),
        "zstd-as-zlib": ("qcow2/v3-zstd", [Edit("compression_type", 0)]),
        "zlib-as-zstd": (
            "qcow2/v3-zlib",
            [Edit(apply=_set_bits(72, ">Q", 8)), Edit("compression_type", 1)],
        ),
    }


def _vmdk_corruptions() -> dict[str, tuple[str, list[Edit]]]:
    sparse, stream, vmw = "vmdk/monolithic-sparse", "vmdk/stream-optimized", "vmdk/vmware-stream"

    def gt_marker_type(d: bytearray) -> None:
        v = Vmdk(bytes(d))
        gt = next(gt for gt in v.gd() if gt)
        put(d, (gt - 1) * 512 + 12, "<I", 9)

    def gt_entry(fn: Callable[[Vmdk, int], int], nth: int = 0, base: str = sparse):
        def apply(d: bytearray) -> None:
            v = Vmdk(bytes(d))
            grains = list(v.grains())
            put(d, grains[nth][2], "<I", fn(v, grains[nth][1]))

        return apply

    def gd_entry(fn: Callable[[Vmdk, int], int], index: int = 0):
        def apply(d: bytearray) -> None:
            v = Vmdk(bytes(d))
            put(d, v.gd_offset * 512 + 4 * index, "<I", fn(v, v.gd()[0]))

        return apply

    def grain_marker(offset: int, fmt: str, fn: Callable[[int], int]):
        def apply(d: bytearray) -> None:
            v = Vmdk(bytes(d))
            sector = next(iter(v.grains()))[1]
            at = sector * 512 + offset
            put(d, at, fmt, fn(u(d, at, fmt)))

        return apply

    def garble_grain(d: bytearray) -> None:
        v = Vmdk(bytes(d))
        sector = next(iter(v.grains()))[1]
        for i in range(sector * 512 + 14, sector * 512 + 60):
            d[i] ^= 0xA5

    def gt_shared(d: bytearray) -> None:
        v = Vmdk(bytes(d))
        gd = v.gd()
        put(d, v.gd_offset * 512 + 4, "<I", gd[0]) if len(gd) > 1 else None

    def duplicate_grain(d: bytearray) -> None:
        v = Vmdk(bytes(d))
        grains = list(v.grains())
        put(d, grains[1][2], "<I", grains[0][1])

    return {
        "bad-magic": (sparse, [Edit("magic", 0x4B444D57)]),
        "version-4": (sparse, [Edit("version", 4)]),
        "version-0": (sparse, [Edit("version", 0)]),
        "capacity-huge": (sparse, [Edit("capacity", 1 << 60)]),
        "capacity-max": (sparse, [Edit("capacity", (1 << 64) - 1)]),
        "capacity-small": (sparse, [Edit("capacity", 100)]),
        "capacity-0-no-descriptor": (sparse, [Edit("capacity", 0), Edit("descriptor_offset", 0)]),
        "grain-0": (sparse, [Edit("grain_size", 0)]),
        "grain-3": (sparse, [Edit("grain_size", 3)]),
        "grain-huge": (sparse, [Edit("grain_size", 1 << 40)]),
        "gtes-0": (sparse, [Edit("num_gtes_per_gt", 0)]),
        "gtes-huge": (sparse, [Edit("num_gtes_per_gt", 0xFFFF_FFFF)]),
        "gtes-1024": (sparse, [Edit("num_gtes_per_gt", 1024)]),
        "gd-beyond-eof": (sparse, [Edit("gd_offset", lambda v: len(v.data) // 512 + 100)]),
        "gd-huge": (sparse, [Edit("gd_offset", 1 << 60)]),
        "gd-0": (sparse, [Edit("gd_offset", 0)]),
        "rgd-huge": (sparse, [Edit("rgd_offset", (1 << 63) - 1)]),
        "rgd-beyond-eof": (sparse, [Edit("rgd_offset", lambda v: len(v.data) // 512 + 100)]),
        "descriptor-huge": (sparse, [Edit("descriptor_size", 1 << 40)]),
        "flags-unknown": (sparse, [Edit("flags", 0xFFFF_FFFF)]),
        "compress-unknown": (stream, [Edit("compress_algorithm", 7)]),
        "gt-beyond-eof": (sparse, [Edit(apply=gd_entry(lambda v, e: len(v.data) // 512 + 64))]),
        "gt-on-header": (sparse, [Edit(apply=gd_entry(lambda v, e: 0))]),
        "gt-shared": (sparse, [Edit(apply=gt_shared)]),
        "grain-beyond-eof": (
            sparse,
            [Edit(apply=gt_entry(lambda v, e: len(v.data) // 512 + 1000))],
        ),
        "grain-on-header": (sparse, [Edit(apply=gt_entry(lambda v, e: 2))]),
        "grain-misaligned": (sparse, [Edit(apply=gt_entry(lambda v, e: e + 1))]),
        "grain-duplicate": (sparse, [Edit(apply=duplicate_grain)]),
        "grain-huge-offset": (sparse, [Edit(apply=gt_entry(lambda v, e: 0xFFFF_FFF0))]),
        "stream-grain-beyond-eof": (
            stream,
            [Edit(apply=gt_entry(lambda v, e: len(v.data) // 512 + 5))],
        ),
        "stream-grain-size-huge": (
            stream,
            [Edit(apply=grain_marker(8, "<I", lambda x: 0xFFFF_FFF0))],
        ),
        "stream-grain-size-0": (stream, [Edit(apply=grain_marker(8, "<I", lambda x: 0))]),
        "stream-grain-size-plus": (stream, [Edit(apply=grain_marker(8, "<I", lambda x: x + 700))]),
        "stream-grain-lba-wrong": (stream, [Edit(apply=grain_marker(0, "<Q", lambda x: x + 128))]),
        "stream-grain-lba-beyond": (stream, [Edit(apply=grain_marker(0, "<Q", lambda x: 1 << 40))]),
        "stream-grain-garbled": (stream, [Edit(apply=garble_grain)]),
        "stream-grain-duplicate": (stream, [Edit(apply=duplicate_grain)]),
        "stream-not-compressed": (stream, [Edit("flags", 3)]),
        "footer-gd-beyond-eof": (vmw, [Edit("footer.gd_offset", lambda v: len(v.data))]),
        "footer-gd-on-header": (vmw, [Edit("footer.gd_offset", 0)]),
        "footer-capacity-doubled": (vmw, [Edit("footer.capacity", lambda v: 2 * v.capacity)]),
        "footer-capacity-halved": (vmw, [Edit("footer.capacity", lambda v: v.capacity // 2)]),
        "footer-marker-type": (vmw, [Edit(apply=lambda d: put(d, len(d) - 1536 + 12, "<I", 7))]),
        "eos-not-zero": (vmw, [Edit(apply=lambda d: put(d, len(d) - 512, "<Q", 5))]),
        "vmware-grain-lba-wrong": (vmw, [Edit(apply=grain_marker(0, "<Q", lambda x: x + 128))]),
        "vmware-grain-lba-beyond": (vmw, [Edit(apply=grain_marker(0, "<Q", lambda x: 1 << 40))]),
        "vmware-grain-size-huge": (vmw, [Edit(apply=grain_marker(8, "<I", lambda x: 1 << 30))]),
        "vmware-grain-duplicate": (vmw, [Edit(apply=duplicate_grain)]),
        "vmware-grain-unmapped": (vmw, [Edit(apply=gt_entry(lambda v, e: 0, nth=1))]),
        "vmware-gt-marker-type": (vmw, [Edit(apply=gt_marker_type)]),
        "vmware-grain-garbled": (vmw, [Edit(apply=garble_grain)]),
        "sparse-flagged-compressed": (sparse, [Edit(apply=_set_bits(8, "<I", 0x30000))]),
    }


def _vpc_corruptions() -> dict[str, tuple[str, list[Edit]]]:
    dyn, small = "vpc/dynamic", "vpc/blocks-64k"

    def bat_entry(fn: Callable[[Vhd, int, list[int]], int], nth: int = 0):
        def apply(d: bytearray) -> None:
            v = Vhd(bytes(d))
            bat = v.bat()
            used = [i for i, e in enumerate(bat) if e != VHD_UNUSED]
            put(
                d, v.bat_offset + 4 * used[nth], ">I", fn(v, bat[used[nth]], [bat[i] for i in used])
            )

        return apply

    def both_footers(offset: int, fmt: str, value: int):
        def apply(d: bytearray) -> None:
            for at in (0, len(d) - 512):
                put(d, at + offset, fmt, value)

        return apply

    def bad_checksum(d: bytearray) -> None:
        vhd_fix_checksums(d)
        for at in (0, len(d) - 512):
            put(d, at + 64, ">I", u(d, at + 64, ">I") ^ 0x55)

    return {
        "bad-cookie": (dyn, [Edit(apply=lambda d: d.__setitem__(slice(0, 8), b"conectiy"))]),
        "bad-checksum": (dyn, [Edit(apply=bad_checksum, fix_checksums=False)]),
        "footer-only-at-end": (dyn, [Edit(apply=lambda d: d.__setitem__(slice(0, 8), b"\0" * 8))]),
        "disk-type-fixed": (dyn, [Edit(apply=both_footers(60, ">I", 2))]),
        "disk-type-differencing": (dyn, [Edit(apply=both_footers(60, ">I", 4))]),
        "disk-type-9": (dyn, [Edit(apply=both_footers(60, ">I", 9))]),
        "current-size-0": (small, [Edit(apply=both_footers(48, ">Q", 0))]),
        "current-size-huge": (small, [Edit(apply=both_footers(48, ">Q", 1 << 60))]),
        "current-size-unaligned": (small, [Edit(apply=both_footers(48, ">Q", SIZE - 100))]),
        "current-size-beyond-table": (small, [Edit(apply=both_footers(48, ">Q", 64 * MiB))]),
        "geometry-0": ("vpc/dynamic", [Edit(apply=both_footers(56, ">I", 0))]),
        "geometry-max": (
            "vpc/dynamic-force-size-odd",
            [Edit(apply=both_footers(56, ">I", 0xFFFF10FF))],
        ),
        "data-offset-beyond-eof": (dyn, [Edit(apply=both_footers(16, ">Q", 1 << 40))]),
        "data-offset-misaligned": (dyn, [Edit(apply=both_footers(16, ">Q", 513))]),
        "dyn-bad-cookie": (dyn, [Edit("dyn.cookie", 0x6378737061727366)]),
        "bat-beyond-eof": (dyn, [Edit("dyn.table_offset", lambda v: len(v.data) + 4096)]),
        "bat-huge": (dyn, [Edit("dyn.table_offset", 1 << 62)]),
        "bat-on-header": (dyn, [Edit("dyn.table_offset", 0)]),
        "bat-misaligned": (small, [Edit("dyn.table_offset", lambda v: v.bat_offset + 3)]),
        "entries-0": (small, [Edit("dyn.max_table_entries", 0)]),
        "entries-too-few": (small, [Edit("dyn.max_table_entries", 3)]),
        "entries-huge": (small, [Edit("dyn.max_table_entries", 0xFFFF_FFFF)]),
        "block-size-0": (small, [Edit("dyn.block_size", 0)]),
        "block-size-odd": (small, [Edit("dyn.block_size", 65536 + 512)]),
        "block-size-huge": (small, [Edit("dyn.block_size", 1 << 31)]),
        "block-size-256": (small, [Edit("dyn.block_size", 256)]),
        "block-beyond-eof": (
            small,
            [Edit(apply=bat_entry(lambda v, e, used: len(v.data) // 512 + 64))],
        ),
        "block-overlaps-bat": (
            small,
            [Edit(apply=bat_entry(lambda v, e, used: v.bat_offset // 512))],
        ),
        "block-on-header": (small, [Edit(apply=bat_entry(lambda v, e, used: 0))]),
        "block-duplicate": (small, [Edit(apply=bat_entry(lambda v, e, used: used[0], nth=1))]),
        "block-overlapping": (
            small,
            [Edit(apply=bat_entry(lambda v, e, used: used[0] + 8, nth=1))],
        ),
        "block-into-footer": (
            small,
            [Edit(apply=bat_entry(lambda v, e, used: len(v.data) // 512 - 1))],
        ),
        "block-huge-offset": (small, [Edit(apply=bat_entry(lambda v, e, used: 0xFFFF_FFF0))]),
    }


def _vdi_corruptions() -> dict[str, tuple[str, list[Edit]]]:
    dyn = "vdi/dynamic"

    def bmap_entry(fn: Callable[[Vdi, int, list[int]], int], nth: int = 0):
        def apply(d: bytearray) -> None:
            v = Vdi(bytes(d))
            bmap = v.bmap()
            used = [i for i, e in enumerate(bmap) if e < VDI_DISCARDED]
            put(
                d,
                v.bmap_offset + 4 * used[nth],
                "<I",
                fn(v, bmap[used[nth]], [bmap[i] for i in used]),
            )

        return apply

    def bmap_extra_entry(d: bytearray) -> None:
        # A map one entry longer than the disk needs, that entry naming a block past the end
        # of the file: qemu reads only the entries that cover the disk.
        v = Vdi(bytes(d))
        put(d, 384, "<I", v.blocks + 1)
        put(d, v.bmap_offset + 4 * v.blocks, "<I", 0x00FF_FFFF)

    return {
        "bad-signature": (dyn, [Edit("signature", 0xBEDA1080)]),
        "version-2": (dyn, [Edit("version", 0x00020000)]),
        "version-1.0": (dyn, [Edit("version", 0x00010000)]),
        "header-size-0": (dyn, [Edit("header_size", 0)]),
        "header-size-huge": (dyn, [Edit("header_size", 0xFFFF_FFFF)]),
        "type-differencing": (dyn, [Edit("image_type", 4)]),
        "type-9": (dyn, [Edit("image_type", 9)]),
        "sector-size-4096": (dyn, [Edit("sector_size", 4096)]),
        "disk-size-0": (dyn, [Edit("disk_size", 0)]),
        "disk-size-huge": (dyn, [Edit("disk_size", 1 << 60)]),
        "disk-size-beyond-blocks": (dyn, [Edit("disk_size", lambda v: v.blocks * v.block + 512)]),
        "disk-size-unaligned": (dyn, [Edit("disk_size", SIZE - 100)]),
        "disk-size-smaller": (dyn, [Edit("disk_size", 2 * MiB)]),
        "block-size-2m": (dyn, [Edit("block_size", 2 * MiB)]),
        "block-size-0": (dyn, [Edit("block_size", 0)]),
        "block-extra": (dyn, [Edit("block_extra", 512)]),
        "blocks-0": (dyn, [Edit("blocks_in_image", 0)]),
        "blocks-huge": (dyn, [Edit("blocks_in_image", 0xFFFF_FFFF)]),
        # qemu 7.2's VDI_BLOCKS_IN_IMAGE_MAX is 0x1fffff80: one more is refused.
        "blocks-past-qemu-max": (dyn, [Edit("blocks_in_image", 0x1FFF_FF81)]),
        "blocks-allocated-0": (dyn, [Edit("blocks_allocated", 0)]),
        "blocks-allocated-huge": (dyn, [Edit("blocks_allocated", 0xFFFF_FFF0)]),
        "bmap-beyond-eof": (dyn, [Edit("offset_bmap", lambda v: len(v.data) + 4096)]),
        "bmap-misaligned": (dyn, [Edit("offset_bmap", lambda v: v.bmap_offset + 4)]),
        "bmap-after-data": (dyn, [Edit("offset_bmap", lambda v: v.data_offset)]),
        "data-beyond-eof": (dyn, [Edit("offset_data", lambda v: len(v.data) + MiB)]),
        "data-misaligned": (dyn, [Edit("offset_data", lambda v: v.data_offset + 100)]),
        "data-on-header": (dyn, [Edit("offset_data", 0)]),
        "link-uuid": (dyn, [Edit("uuid_link", 0x1234)]),
        "parent-uuid": (dyn, [Edit("uuid_parent", 0x1234)]),
        "block-beyond-eof": (dyn, [Edit(apply=bmap_entry(lambda v, e, used: len(used) + 7))]),
        "block-duplicate": (dyn, [Edit(apply=bmap_entry(lambda v, e, used: used[0], nth=1))]),
        "block-huge": (dyn, [Edit(apply=bmap_entry(lambda v, e, used: 0x7FFF_FFFF))]),
        "block-0xfffffffd": (dyn, [Edit(apply=bmap_entry(lambda v, e, used: 0xFFFF_FFFD))]),
        "bmap-extra-entry": (dyn, [Edit(apply=bmap_extra_entry)]),
        "static-with-holes": (
            "vdi/static",
            [Edit(apply=bmap_entry(lambda v, e, used: VDI_UNALLOCATED))],
        ),
    }


CORRUPTIONS: dict[str, Callable[[], dict[str, tuple[str, list[Edit]]]]] = {
    "qcow2": _qcow2_corruptions,
    "vmdk": _vmdk_corruptions,
    "vpc": _vpc_corruptions,
    "vdi": _vdi_corruptions,
}

# Investigated: the images qemu-img refuses and diskflow may well read (name → why).
QEMU_STRICT: dict[str, str] = {}


def cases() -> list[Case]:
    """Every case of the corpus, in a stable order."""
    out = _qcow2_valid() + _vmdk_valid() + _vpc_valid() + _vdi_valid()
    for fmt, (bases, points) in TRUNCATED.items():
        for base in bases:
            for point in points:

                def cut(data: bytes, fmt: str = fmt, point: str = point) -> bytes | None:
                    return truncate_at(fmt, data, point)

                out.append(Case(f"{base}/cut-{point}", fmt, "truncated", _from(base, cut)))
    for fmt, make in CORRUPTIONS.items():
        for name, (base, edits) in make().items():

            def edited(data: bytes, fmt: str = fmt, edits: list[Edit] = edits) -> bytes | None:
                try:
                    return corrupt(fmt, data, edits)
                except (IndexError, StopIteration):
                    return None  # the base has no such table entry

            full = f"{base}/{name}"
            out.append(
                Case(
                    full,
                    fmt,
                    "corrupted",
                    _from(base, edited),
                    qemu_lenient_ok=QEMU_STRICT.get(full),
                )
            )
    return out


# --- The oracle -----------------------------------------------------------------------------


@dataclass
class Outcome:
    """What happened to one image: `kind` is identical, refused, unsupported, redetected,
    unjudged (diskflow made a disk; qemu-img could not, even with 6 GiB), or a bug: differs,
    crash, lenient, inconsistent."""

    kind: str
    reason: str = ""  # a refusal's reason, or the exception's type
    message: str = ""
    qemu: str = ""  # qemu-img's result: "ok", or "failed: MESSAGE", or "not run: WHY"
    runs: list[tuple] = dataclasses.field(default_factory=list)

    @property
    def bug(self) -> bool:
        return self.kind in ("differs", "crash", "lenient", "inconsistent")

    def __str__(self) -> str:
        text = f"{self.kind}"
        if self.reason:
            text += f" [{self.reason}]"
        if self.message:
            text += f": {self.message}"
        if self.qemu:
            text += f" (qemu-img: {self.qemu})"
        return text


# The decode configurations every image goes through: the import's defaults, and a small
# odd chunk with little memory (so the spill file is used) and the file size known.
CONFIGS = (
    {"chunk": 1 << 20},
    {"chunk": 65521, "known_size": True, "memory": 256 << 10, "workers": 2},
)
# Well-formed images also go through small chunks with nothing held in memory (every early
# byte goes to the spill file) and one inflating thread.
TINY = {"chunk": 4093, "memory": 0, "workers": 1}
ADDRESS_SPACE = 2 * GiB  # a decode worker's address space: more is a bug (allocates too much)
DECODE_TIMEOUT = 30.0


def _worker_main(conn, address_space: int) -> None:  # pragma: no cover - in the child
    import resource

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-8, 1)  # M_ARENA_MAX: one arena, as qemu-img's runs
    threading.stack_size(512 << 10)
    resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    from importer.decoders import Unsupported
    from importer.errors import FinalError
    from importer.limits import Bound
    from tests.support.decoding import decode

    bound = Bound(BOUND, "the test volume")

    def check_size(size: int) -> None:
        bound.check("virtual size", size)

    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        image, out, spill, config = request
        try:
            size = decode(
                Path(image), Path(out), spill_dir=Path(spill), check_size=check_size, **config
            )
            reply = ("ok", str(size), "")
        except FinalError as exc:
            reply = ("refused", str(exc.reason), exc.message)
        except Unsupported as exc:
            reply = ("unsupported", "Unsupported", str(exc))
        except BaseException as exc:
            reply = ("crash", type(exc).__name__, "".join(traceback.format_exception(exc))[-3000:])
        conn.send(reply)


class DecodeWorker:
    """diskflow's decoder in a child process of its own, under an address-space limit, so a
    decoder that allocates too much fails with MemoryError there (not here), and one that
    hangs is killed after `timeout`."""

    def __init__(self, address_space: int = ADDRESS_SPACE, timeout: float = DECODE_TIMEOUT) -> None:
        self.address_space, self.timeout = address_space, timeout
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn = None

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        self._process = context.Process(
            target=_worker_main, args=(child, self.address_space), daemon=True
        )
        self._process.start()
        child.close()
        self._conn = parent

    def decode(self, image: Path, out: Path, spill: Path, config: dict) -> tuple[str, str, str]:
        """("ok", size, "") / ("refused", reason, message) / ("unsupported", ...) /
        ("crash", exception type, traceback) / ("hang", ...) / ("died", ...)."""
        if self._process is None or not self._process.is_alive():
            self._start()
        assert self._conn is not None and self._process is not None
        try:
            self._conn.send((str(image), str(out), str(spill), config))
            if not self._conn.poll(self.timeout):
                self.close()
                return ("hang", "Timeout", f"no answer after {self.timeout:g}s")
            return self._conn.recv()
        except (EOFError, OSError):  # the worker died: closed pipe, reset connection
            code = self._process.exitcode if self._process else None
            self.close()
            return ("died", "Died", f"the decode worker died (exit status {code})")

    def close(self) -> None:
        if self._process is not None:
            if self._process.is_alive():
                self._process.kill()
            self._process.join(5)
            self._process = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def header_size(fmt: str, head: bytes) -> int | None:
    from importer.formats import DiskFormat, header_virtual_size

    def read(offset: int, length: int) -> bytes | None:
        return head[offset : offset + length] if offset + length <= len(head) else None

    return header_virtual_size(DiskFormat(fmt), read)


def prechecks(fmt: str, head: bytes) -> Outcome | None:
    """The import's checks before any decoder runs: what they decide, or None."""
    from importer.formats import DiskFormat, detect_format, outside_reference, unsupported_format

    found = detect_format(head)
    unsupported = unsupported_format(head)
    if unsupported:
        return Outcome("refused", "UnsupportedFormat", f"the image is {unsupported} (pre-check)")
    if found.value != fmt:
        return Outcome("redetected", str(found), f"the bytes say {found}, not {fmt}")
    reference = outside_reference(DiskFormat(fmt), head)
    if reference:
        return Outcome("refused", str(reference[0]), reference[1] + " (pre-check)")
    if not head:
        return Outcome("refused", "InvalidImage", "empty (pre-check)")
    return None


def qemu_convert(image: Path, fmt: str, out: Path, *, roomy: bool = False) -> str:
    """qemu-img convert -O raw of `image` under the import's limits (`roomy`: more memory and
    time, for an image it needs them for): "ok" or why not."""
    from importer import qemu
    from importer.errors import Failure
    from importer.formats import DiskFormat

    limits = qemu.Limits(address_space=1 << 30, cpu_seconds=20, timeout=30)
    if roomy:
        limits = qemu.Limits(address_space=6 << 30, cpu_seconds=60, timeout=90)
    try:
        qemu.convert(
            str(image),
            DiskFormat(fmt),
            str(out),
            existing=False,
            direct=False,
            on_progress=lambda p: None,
            limits=limits,
        )
    except Failure as exc:
        return f"failed: [{exc.reason}] {exc.message}"
    return "ok"


LIMITED = re.compile(r"\[(ResourceLimit|TimedOut)\]")


def data_extents(path: Path) -> list[tuple[int, int]]:
    """The [start, end) ranges of `path` that are not holes (SEEK_DATA / SEEK_HOLE)."""
    extents, at = [], 0
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        while at < size:
            try:
                start = os.lseek(f.fileno(), at, os.SEEK_DATA)
            except OSError:  # ENXIO: nothing but a hole to the end
                break
            end = os.lseek(f.fileno(), start, os.SEEK_HOLE)
            extents.append((start, end))
            at = end
    return extents


def same_file(a: Path, b: Path) -> str | None:
    """None if the files are byte-identical (holes read as zeros), else where they first
    differ. Only their data extents are read: a sparse disk of many GiB compares quickly."""
    sa, sb = a.stat().st_size, b.stat().st_size
    if sa != sb:
        return f"sizes differ: {sa} (diskflow) vs {sb} (qemu-img)"
    ranges = sorted(data_extents(a) + data_extents(b))
    with open(a, "rb") as fa, open(b, "rb") as fb:
        done = 0
        for start, end in ranges:
            at = max(start, done)
            while at < end:
                n = min(1 << 20, end - at)
                x, y = os.pread(fa.fileno(), n, at), os.pread(fb.fileno(), n, at)
                if x != y:
                    i = next((i for i in range(min(len(x), len(y))) if x[i] != y[i]), 0)
                    return f"contents differ from byte {at + i}"
                at += n
            done = max(done, end)
    return None


def judge(
    image: Path,
    fmt: str,
    work: Path,
    worker: DecodeWorker,
    *,
    always_qemu: bool = True,
    configs: tuple[dict, ...] = CONFIGS,
) -> Outcome:
    """The differential oracle for one image (see the module's docstring). `work` is an empty
    directory for the outputs. `always_qemu`: run qemu-img even when diskflow refused (for
    the record); otherwise only to compare with what diskflow made."""
    with open(image, "rb") as f:
        head = f.read(2 << 20)
    early = prechecks(fmt, head)
    if early is not None:
        return early
    size = header_size(fmt, head)
    qemu_out = work / "qemu.raw"

    def qemu() -> str:
        if size is not None and size > BOUND:
            return f"not run: the header's virtual size {size} is past the bound, as in an import"
        return qemu_convert(image, fmt, qemu_out)

    qemu_result = qemu() if always_qemu else ""
    results, seconds = [], []
    for i, config in enumerate(configs):
        out, spill = work / f"diskflow-{i}.raw", work / f"spill-{i}"
        spill.mkdir(exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            out.unlink()
        began = time.monotonic()
        results.append(worker.decode(image, out, spill, config))
        seconds.append(time.monotonic() - began)
    runs = [
        (str(c), r[0], r[1], r[2][:3000], round(t, 3))
        for c, r, t in zip(configs, results, seconds, strict=True)
    ]
    for kind, reason, message in results:
        if kind in ("crash", "hang", "died"):
            return Outcome("crash", reason, message, qemu_result, runs)
    for kind, reason, message in results:
        if kind == "refused" and reason not in REFUSALS:
            return Outcome(
                "crash", reason, f"refused with an unexpected reason: {message}", qemu_result, runs
            )
        if kind == "refused" and len(message) < 12:
            return Outcome(
                "crash", reason, f"a refusal that names nothing: {message!r}", qemu_result, runs
            )
    kinds = {r[0] for r in results}
    if "ok" in kinds and "refused" in kinds:
        which = "; ".join(f"{r[0]} {r[1]} {r[2][:200]}" for r in results)
        return Outcome(
            "inconsistent", "", f"the chunk size changed the answer: {which}", qemu_result, runs
        )
    if "ok" not in kinds:
        first = next(r for r in results if r[0] == "refused") if "refused" in kinds else results[0]
        return Outcome(first[0], first[1], first[2], qemu_result, runs)
    if not qemu_result:
        qemu_result = qemu()
    if LIMITED.search(qemu_result):
        # qemu-img ran out of the import's memory or time (a huge table it allocates whole,
        # which diskflow does not read): judged again with more.
        qemu_result = qemu_convert(image, fmt, qemu_out, roomy=True)
        if LIMITED.search(qemu_result):
            return Outcome(
                "unjudged", "", "qemu-img cannot convert it within 6 GiB", qemu_result, runs
            )
    if qemu_result != "ok":
        return Outcome(
            "lenient", "", "diskflow made a disk of an image qemu-img fails on", qemu_result, runs
        )
    for i, r in enumerate(results):
        if r[0] == "ok":
            differs = same_file(work / f"diskflow-{i}.raw", qemu_out)
            if differs:
                return Outcome("differs", "", f"{differs} (config {configs[i]})", qemu_result, runs)
    return Outcome("identical", "", "", qemu_result, runs)


# --- Fuzzing: mutations of seed images ------------------------------------------------------

# The seeds the fuzzers mutate (small images whose every table is reached quickly).
FUZZ_SEEDS: dict[str, tuple[str, ...]] = {
    "qcow2": (
        "qcow2/v3-c4k",
        "qcow2/v3-zlib-c4k",
        "qcow2/v3-zstd",
        "qcow2/v3-c4k/l2-after-data",
        "qcow2/v2-snapshot",
        "qcow2/v3-zero-clusters",
        "qcow2/v3-big-sparse",
    ),
    "vmdk": (
        "vmdk/monolithic-sparse",
        "vmdk/stream-optimized",
        "vmdk/zeroed-grain",
        "vmdk/vmware-stream",
    ),
    "vpc": ("vpc/blocks-64k", "vpc/blocks-64k/bat-last", "vpc/creator-vpc-chs", "vpc/big-sparse"),
    "vdi": ("vdi/dynamic", "vdi/dynamic/permuted"),
}


def boundary_values(width: int, original: int, file_size: int) -> list[int]:
    """Values worth putting in a field `width` bytes wide that held `original`."""
    top = (1 << (8 * width)) - 1
    values = [0, 1, 2, 3, 7, 255, 256, 511, 512, 513, 4096, 65535, 65536, 1 << 20]
    values += [top, top - 1, top >> 1, (top >> 1) + 1, 1 << 31, (1 << 31) - 1, (1 << 32) - 1]
    values += [1 << 32, 1 << 40, 1 << 55, 1 << 62, 1 << 63]
    values += [original + 1, original - 1, original * 2, original // 2, original + 512]
    values += [original ^ (1 << (8 * width - 1)), original + 4096, original + 65536]
    values += [file_size, file_size - 1, file_size + 1, file_size // 512, file_size // 512 + 1]
    values += [file_size // 2, file_size * 2]
    return [v & top for v in values]


FLIP, FIELD, TRUNCATE, BYTES = "flip", "field", "truncate", "bytes"


def apply_ops(fmt: str, data: bytes, ops: list[tuple]) -> bytes:
    """`data` mutated by `ops`, in order; each op (all ints and strings, so a failing input
    can be written down and replayed):

    ("field", field number, value number): a field of the image's anatomy set to one of its
        `boundary_values` (numbers taken modulo the choices);
    ("flip", region, position, bit): one bit flipped in a region ("any": the whole file);
    ("bytes", region, position, hex bytes): bytes overwritten there;
    ("truncate", region, position): the file cut inside a region.

    A VHD's checksums are made right again afterwards (qemu-img refuses a wrong one; the
    differential corpus has that case)."""
    out = bytearray(data)
    for op in ops:
        if not out:
            break
        parts = anatomy(fmt, bytes(out))
        kind = op[0]
        if kind == FIELD:
            if not parts.fields:
                continue
            f = parts.fields[op[1] % len(parts.fields)]
            width = struct.calcsize(f.fmt)
            if f.offset + width > len(out):
                continue
            original = u(out, f.offset, f.fmt)
            values = boundary_values(width, original, len(out))
            put(out, f.offset, f.fmt, values[op[2] % len(values)])
            continue
        start, end = _region(parts, op[1], len(out))
        at = start + op[2] % max(1, end - start)
        if kind == FLIP:
            if at < len(out):
                out[at] ^= 1 << (op[3] % 8)
        elif kind == BYTES:
            chunk = bytes.fromhex(op[3])[: max(0, len(out) - at)]
            out[at : at + len(chunk)] = chunk
        elif kind == TRUNCATE:
            del out[at:]
        else:
            raise ValueError(op)
    if fmt == "vpc" and len(out) >= 512:
        with contextlib.suppress(struct.error, IndexError):
            vhd_fix_checksums(out)
    return bytes(out)


def _region(parts: Anatomy, name: str, size: int) -> tuple[int, int]:
    start, end = parts.regions.get(name, (0, size))
    start, end = max(0, min(start, size)), max(0, min(end, size))
    return (start, end) if end > start else (0, size)


REGIONS = ("any", "header", "l1", "l2", "refcounts", "gd", "gt", "bat", "bmap", "data")


def random_ops(rng: random.Random, fmt: str, data: bytes) -> list[tuple]:
    """Up to four random mutations, in the form `apply_ops` takes."""
    parts = anatomy(fmt, data)
    regions = ["any", *parts.regions]
    ops: list[tuple] = []
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
        kind = rng.choice((FIELD, FIELD, FIELD, FLIP, FLIP, BYTES, TRUNCATE))
        if kind == FIELD:
            ops.append((FIELD, rng.randrange(1 << 16), rng.randrange(1 << 16)))
        elif kind == FLIP:
            ops.append((FLIP, rng.choice(regions), rng.randrange(1 << 32), rng.randrange(8)))
        elif kind == BYTES:
            ops.append(
                (
                    BYTES,
                    rng.choice(regions),
                    rng.randrange(1 << 32),
                    rng.randbytes(rng.randint(1, 8)).hex(),
                )
            )
        else:
            ops.append((TRUNCATE, rng.choice(regions), rng.randrange(1 << 32)))
    return ops
