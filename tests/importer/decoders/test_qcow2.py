"""The qcow2 stream decoder against the real qemu-img: every image is made by qemu-img (or
qemu-io), decoded as an import would, and compared byte for byte with `qemu-img convert -O raw`.
Hostile images are qemu-made ones with a field rewritten."""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
import zstandard

from importer.decoders import Unsupported
from importer.decoders.qcow2 import _inflate_zlib, _inflate_zstd
from importer.errors import FinalError
from tests.support.decoding import decode

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
    reason="needs qemu-img and qemu-io",
)

KiB, MiB = 1 << 10, 1 << 20
MASK = 0x00FFFFFFFFFFFE00
CHUNKS = (4096, 65537, MiB)


# Making images.


def _raw(path: Path, size: int, seed: int = 0, *, grain: int = 4 * KiB) -> Path:
    """A raw disk of `size` bytes: runs of random data, compressible data, written zeros and
    holes, `grain` bytes at a time (some runs deliberately unaligned)."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        at = 0
        while at < size:
            length = min(size - at, grain * rng.randint(1, 24) + rng.choice((0, 0, 512, 1000)))
            kind = rng.choice(("random", "text", "zeros", "hole", "hole"))
            if kind == "random":
                f.seek(at)
                f.write(rng.randbytes(length))
            elif kind == "text":
                f.seek(at)
                word = rng.randbytes(37)
                f.write((word * (length // 37 + 1))[:length])
            elif kind == "zeros":
                f.seek(at)
                f.write(bytes(length))
            at += length
        # The last byte is data, so a last partial cluster is mapped.
        f.seek(size - 1)
        f.write(b"\x7f")
    return path


def _qemu_img(*args: str | Path) -> None:
    subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True)


def _qemu_io(image: Path, *commands: str) -> None:
    args: list[str] = ["qemu-io"]
    for command in commands:
        args += ["-c", command]
    subprocess.run([*args, str(image)], check=True, capture_output=True)


def _convert(raw: Path, image: Path, *options: str) -> Path:
    _qemu_img("convert", "-f", "raw", "-O", "qcow2", *options, raw, image)
    return image


def _reference(image: Path) -> bytes:
    out = image.with_suffix(".ref")
    _qemu_img("convert", "-O", "raw", image, out)
    return out.read_bytes()


def _decoded(image: Path, tmp_path: Path, **kwargs) -> bytes:
    out = tmp_path / "decoded.raw"
    out.unlink(missing_ok=True)
    size = decode(image, out, **kwargs)
    data = out.read_bytes()
    assert size == len(data)
    return data


def _check(image: Path, tmp_path: Path, chunks=CHUNKS, **kwargs) -> None:
    """Decoded at each chunk size (and once more, the file's size known) == qemu-img convert."""
    expected = _reference(image)
    for chunk, known_size in [(chunk, False) for chunk in chunks] + [(chunks[-1], True)]:
        got = _decoded(image, tmp_path, chunk=chunk, known_size=known_size, **kwargs)
        assert len(got) == len(expected), (chunk, known_size)
        assert got == expected, (chunk, known_size)


# Reading and rewriting images (the hostile and shuffled cases).


class _Qcow2:
    """A qcow2 file in memory, with just enough parsing to rewrite it."""

    def __init__(self, path: Path) -> None:
        self.data = bytearray(path.read_bytes())
        self.cluster = 1 << self.u32(20)
        self.l1_offset = self.u64(40)
        self.l1_size = self.u32(36)

    def u32(self, at: int) -> int:
        return struct.unpack_from(">I", self.data, at)[0]

    def u64(self, at: int) -> int:
        return struct.unpack_from(">Q", self.data, at)[0]

    def set32(self, at: int, value: int) -> None:
        struct.pack_into(">I", self.data, at, value)

    def set64(self, at: int, value: int) -> None:
        struct.pack_into(">Q", self.data, at, value)

    def l1(self) -> list[int]:
        return [self.u64(self.l1_offset + 8 * i) for i in range(self.l1_size)]

    def l2_entries(self) -> list[tuple[int, int]]:
        """(position in the file, entry) of every L2 entry."""
        found = []
        for entry in self.l1():
            table = entry & MASK
            if table:
                for i in range(self.cluster // 8):
                    found.append((table + 8 * i, self.u64(table + 8 * i)))
        return found

    def compressed(self) -> list[tuple[int, int, int]]:
        """(position of the entry, host offset, size) of every compressed cluster."""
        bits = self.cluster.bit_length() - 1
        shift = 62 - (bits - 8)
        found = []
        for at, entry in self.l2_entries():
            if entry & (1 << 62):
                offset = entry & ((1 << shift) - 1)
                sectors = ((entry >> shift) & ((1 << (bits - 8)) - 1)) + 1
                found.append((at, offset, sectors * 512 - offset % 512))
        return found

    def append(self, table: bytes) -> int:
        """Put `table` at the (cluster-aligned) end; return its offset."""
        end = -(-len(self.data) // self.cluster) * self.cluster
        self.data.extend(bytes(end - len(self.data)))
        self.data.extend(table)
        self.data.extend(bytes(-len(self.data) % self.cluster))
        return end

    def save(self, path: Path) -> Path:
        path.write_bytes(self.data)
        return path


def _shuffle(image: Path, out: Path, *, move_l1: bool = True) -> Path:
    """Rewrite `image` so that its L2 tables (and its L1 table) come after all the data they
    map: a stream sees the data before it knows where it goes. The old tables are zeroed."""
    q = _Qcow2(image)
    for i, entry in enumerate(q.l1()):
        old = entry & MASK
        if old:
            table = bytes(q.data[old : old + q.cluster])
            q.data[old : old + q.cluster] = bytes(q.cluster)
            q.set64(q.l1_offset + 8 * i, q.append(table) | (entry & ~MASK))
    if move_l1:
        length = 8 * q.l1_size
        table = bytes(q.data[q.l1_offset : q.l1_offset + length])
        q.data[q.l1_offset : q.l1_offset + length] = bytes(length)
        q.set64(40, q.append(table))
    return q.save(out)


def _patched(image: Path, out: Path, **fields: int) -> Path:
    """`image` with header fields rewritten (name=value, as _FIELDS lays them out)."""
    q = _Qcow2(image)
    for name, value in fields.items():
        at, size = _FIELDS[name]
        (q.set32 if size == 4 else q.set64)(at, value)
    return q.save(out)


_FIELDS = {
    "version": (4, 4),
    "backing_file_offset": (8, 8),
    "cluster_bits": (20, 4),
    "size": (24, 8),
    "crypt_method": (32, 4),
    "l1_size": (36, 4),
    "l1_table_offset": (40, 8),
    "refcount_table_offset": (48, 8),
    "refcount_table_clusters": (56, 4),
    "nb_snapshots": (60, 4),
    "snapshots_offset": (64, 8),
    "incompatible": (72, 8),
    "autoclear": (88, 8),
    "refcount_order": (96, 4),
    "header_length": (100, 4),
}


def _fails(
    image: Path, tmp_path: Path, reason: str, match: str, *, qemu: bool = True, **kwargs
) -> FinalError:
    """Decoding `image` raises FinalError(`reason`) matching `match`; qemu-img refuses it
    too, unless `qemu` is False (diskflow is stricter there)."""
    with pytest.raises(FinalError, match=match) as caught:
        _decoded(image, tmp_path, **kwargs)
    assert caught.value.reason == reason
    if qemu:
        with pytest.raises(subprocess.CalledProcessError):
            _reference(image)
    return caught.value


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    return _raw(tmp_path / "disk.raw", 3 * MiB + 4608, seed=1)


# What qemu-img writes.


@pytest.mark.parametrize("cluster", [512, 4 * KiB, 64 * KiB, 2 * MiB])
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_convert_output_decodes_as_qemu_reads_it(tmp_path, raw, cluster, compat):
    image = _convert(raw, tmp_path / "d.qcow2", "-o", f"cluster_size={cluster},compat={compat}")
    _check(image, tmp_path)


@pytest.mark.parametrize("cluster", [512, 4 * KiB, 64 * KiB, 2 * MiB])
@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_compressed_clusters(tmp_path, raw, cluster, compression):
    image = _convert(
        raw,
        tmp_path / "c.qcow2",
        "-c",
        "-o",
        f"cluster_size={cluster},compression_type={compression}",
    )
    assert _Qcow2(image).compressed()
    _check(image, tmp_path)


def test_zlib_compressed_v2(tmp_path, raw):
    image = _convert(raw, tmp_path / "c.qcow2", "-c", "-o", "compat=0.10")
    _check(image, tmp_path)


def test_compressed_with_one_worker_and_many(tmp_path, raw):
    image = _convert(raw, tmp_path / "c.qcow2", "-c", "-o", "cluster_size=4096")
    expected = _reference(image)
    for workers in (1, 8):
        assert _decoded(image, tmp_path, chunk=8192, workers=workers) == expected


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_preallocation_metadata(tmp_path, raw, compat):
    image = _convert(raw, tmp_path / "p.qcow2", "-o", f"preallocation=metadata,compat={compat}")
    _check(image, tmp_path, chunks=(65537,))


@pytest.mark.parametrize(
    "options",
    [
        "lazy_refcounts=on",
        "refcount_bits=1",
        "refcount_bits=64",
        "cluster_size=8192,refcount_bits=2",
    ],
)
def test_header_options(tmp_path, raw, options):
    _check(_convert(raw, tmp_path / "o.qcow2", "-o", options), tmp_path, chunks=(65537,))


def test_zero_clusters_plain_and_preallocated(tmp_path):
    image = tmp_path / "z.qcow2"
    _qemu_img("create", "-f", "qcow2", image, "2M")
    _qemu_io(
        image,
        "write -P 0x11 0 1M",
        "write -z 0 64k",  # keeps its host cluster: zero flag with an offset
        "write -z -u 192k 128k",  # unmapped: zero flag alone
        "write -P 0x22 1536k 4k",
    )
    entries = [entry for _, entry in _Qcow2(image).l2_entries()]
    assert any(entry & 1 and entry & MASK for entry in entries)
    assert any(entry & 1 and not entry & MASK for entry in entries)
    _check(image, tmp_path)


def test_internal_snapshots_are_ignored(tmp_path, raw):
    image = _convert(raw, tmp_path / "s.qcow2")
    _qemu_img("snapshot", "-c", "before", image)
    _qemu_io(image, "write -P 0x33 64k 256k", "write -z 1M 128k", "discard 2M 64k")
    _qemu_img("snapshot", "-c", "after", image)
    _qemu_io(image, "write -P 0x44 0 4k")
    assert _reference(image) != raw.read_bytes()
    _check(image, tmp_path)


def test_virtual_size_not_a_multiple_of_the_cluster(tmp_path):
    raw = _raw(tmp_path / "odd.raw", 5 * 64 * KiB + 3 * 512, seed=2, grain=512)
    for options in (["-o", "cluster_size=65536"], ["-c", "-o", "cluster_size=65536"]):
        _check(_convert(raw, tmp_path / "odd.qcow2", *options), tmp_path, chunks=(4096,))


def test_virtual_size_not_a_multiple_of_512_is_cut_to_whole_sectors(tmp_path):
    """qemu counts the disk in sectors: a header size of 1 MiB + 1000 reads as 1 MiB + 512."""
    raw = _raw(tmp_path / "d.raw", 2 * MiB, seed=3)
    image = _patched(_convert(raw, tmp_path / "d.qcow2"), tmp_path / "cut.qcow2", size=MiB + 1000)
    assert len(_reference(image)) == MiB + 512
    _check(image, tmp_path, chunks=(65537,))


def test_empty_disk(tmp_path):
    image = tmp_path / "e.qcow2"
    _qemu_img("create", "-f", "qcow2", image, "0")
    # No disk at all: refused, as every format is (and the scratch path refuses it).
    with pytest.raises(FinalError, match="virtual size is 0") as caught:
        _decoded(image, tmp_path)
    assert caught.value.reason == "InvalidImage"
    _qemu_img("create", "-f", "qcow2", image, "64M")
    assert _decoded(image, tmp_path) == bytes(64 * MiB)


def test_dirty_bit_is_read_as_it_is(tmp_path, raw):
    image = _convert(raw, tmp_path / "d.qcow2", "-o", "lazy_refcounts=on")
    dirty = _patched(image, tmp_path / "dirty.qcow2", incompatible=1)
    assert _decoded(dirty, tmp_path) == _reference(image)


def test_persistent_bitmaps_do_not_stop_the_stream(tmp_path, raw):
    image = _convert(raw, tmp_path / "b.qcow2")
    _qemu_img("bitmap", "--add", image, "b0")
    _qemu_io(image, "write -P 0x55 0 64k")
    _check(image, tmp_path, chunks=(65537,))


# Layouts where the data comes before its tables: held, then spilled.


@pytest.mark.parametrize("compress", [False, True])
def test_tables_after_their_data(tmp_path, raw, compress):
    image = _convert(raw, tmp_path / "d.qcow2", *(["-c"] if compress else []))
    shuffled = _shuffle(image, tmp_path / "shuffled.qcow2")
    assert _reference(shuffled) == _reference(image)
    _check(shuffled, tmp_path)
    # Held in memory past a small limit: spilled to the scratch directory.
    spill = tmp_path / "spill"
    spill.mkdir()
    for known_size in (False, True):
        got = _decoded(
            shuffled, tmp_path, chunk=65537, memory=64 * KiB, spill_dir=spill, known_size=known_size
        )
        assert got == _reference(image)
    assert list(spill.iterdir()) == []  # the spill file is gone


def test_l2_tables_after_their_data_l1_first(tmp_path, raw):
    image = _convert(raw, tmp_path / "d.qcow2", "-o", "cluster_size=4096")
    _check(_shuffle(image, tmp_path / "s.qcow2", move_l1=False), tmp_path, chunks=(65537,))


def test_too_much_data_before_its_tables_falls_back(tmp_path, raw):
    shuffled = _shuffle(_convert(raw, tmp_path / "d.qcow2"), tmp_path / "s.qcow2")
    with pytest.raises(Unsupported, match="no scratch directory"):
        _decoded(shuffled, tmp_path, memory=64 * KiB)
    with pytest.raises(Unsupported, match=r"more than .* of data before the tables"):
        _decoded(shuffled, tmp_path, memory=64 * KiB, spill_dir=tmp_path, spill_limit=128 * KiB)


# Registered ahead of the stream, a budget at a time.


@pytest.mark.parametrize(
    "options",
    [
        ["-o", "cluster_size=512"],
        ["-c", "-o", "cluster_size=512"],
        ["-c", "-o", "cluster_size=4096,compression_type=zstd"],
    ],
)
def test_many_small_tables_and_clusters_in_order_and_shuffled(tmp_path, raw, options):
    """Thousands of L2 tables and compressed clusters, registered at once, their buffers made
    only as their bytes arrive: the same disk, in qemu-img's order and shuffled."""
    image = _convert(raw, tmp_path / "a.qcow2", *options)
    _check(image, tmp_path, chunks=(4096, 65537))
    shuffled = _shuffle(image, tmp_path / "s.qcow2")
    _check(shuffled, tmp_path, chunks=(65537,))


# Compressed clusters, as qemu inflates them.


def test_zstd_clusters_without_content_size_and_in_two_frames(tmp_path):
    """qemu loops over zstd frames until the cluster is full: a frame that does not say its
    size, or a cluster in two frames, reads the same. The new frames (compressed harder)
    must fit in the bytes of qemu's own: the sector they end in starts the next cluster."""
    raw = _raw(tmp_path / "d.raw", 2 * MiB, seed=4)
    image = _convert(raw, tmp_path / "z.qcow2", "-c", "-o", "compression_type=zstd")
    q = _Qcow2(image)
    plain = raw.read_bytes()
    guests = _guest_offsets(q)
    hard = zstandard.ZstdCompressor(level=19, write_content_size=False)
    half = q.cluster // 2
    kinds = {
        "two frames": lambda data: hard.compress(data[:half]) + hard.compress(data[half:]),
        "one frame, no size": hard.compress,
    }
    done = dict.fromkeys(kinds, 0)
    for at, offset, size in q.compressed():
        cluster = plain[guests[at] : guests[at] + q.cluster]
        if len(cluster) < q.cluster:
            continue
        frame = zstandard.ZstdDecompressor().decompressobj()
        frame.decompress(bytes(q.data[offset : offset + size]))
        length = size - len(frame.unused_data)  # qemu's frame
        for kind in sorted(kinds, key=done.get):
            new = kinds[kind](cluster)
            if len(new) <= length:
                q.data[offset : offset + length] = new + bytes(length - len(new))
                done[kind] += 1
                break
    assert min(done.values()) >= 2, done
    rewrote = q.save(tmp_path / "frames.qcow2")
    assert _reference(rewrote) == _reference(image)
    _check(rewrote, tmp_path, chunks=(65537,))


def _guest_offsets(q: _Qcow2) -> dict[int, int]:
    """The guest offset each L2 entry position maps."""
    found = {}
    span = q.cluster * (q.cluster // 8)
    for index, entry in enumerate(q.l1()):
        table = entry & MASK
        if table:
            for i in range(q.cluster // 8):
                found[table + 8 * i] = index * span + i * q.cluster
    return found


def test_inflate_zlib_as_qemu():
    cluster = 64 * KiB
    data = random.Random(5).randbytes(cluster // 2) * 2
    deflate = zlib.compressobj(9, zlib.DEFLATED, -12)
    stream = deflate.compress(data) + deflate.flush()
    assert _inflate_zlib(bytearray(stream + bytes(300)), cluster) == data  # sector padding
    longer = zlib.compressobj(9, zlib.DEFLATED, -12)
    assert _inflate_zlib(bytearray(longer.compress(data * 2) + longer.flush()), cluster) == data
    assert _inflate_zlib(bytearray(stream[: len(stream) // 2]), cluster) is None  # cut short
    short = zlib.compressobj(9, zlib.DEFLATED, -12)
    assert _inflate_zlib(bytearray(short.compress(data[:100]) + short.flush()), cluster) is None
    assert _inflate_zlib(bytearray(b"\xff" * 512), cluster) is None
    # A 32 KiB window (not qemu's own, which is 4 KiB): zlib reads it within one cluster.
    wide = zlib.compressobj(9, zlib.DEFLATED, -15)
    assert _inflate_zlib(bytearray(wide.compress(data) + wide.flush()), cluster) == data


def test_inflate_zstd_as_qemu():
    cluster = 64 * KiB
    data = random.Random(6).randbytes(cluster // 4) * 4
    one = zstandard.ZstdCompressor().compress(data)
    assert _inflate_zstd(bytearray(one + bytes(200)), cluster) == data
    assert _inflate_zstd(bytearray(one[:-5]), cluster) is None
    bigger = zstandard.ZstdCompressor().compress(data + b"x")
    assert _inflate_zstd(bytearray(bigger), cluster) is None  # the frame goes on past the cluster
    nosize = zstandard.ZstdCompressor(write_content_size=False)
    assert _inflate_zstd(bytearray(nosize.compress(data) + bytes(100)), cluster) == data
    assert _inflate_zstd(bytearray(nosize.compress(data + b"x")), cluster) is None
    halves = nosize.compress(data[: cluster // 2]) + nosize.compress(data[cluster // 2 :])
    assert _inflate_zstd(bytearray(halves), cluster) == data
    assert _inflate_zstd(bytearray(nosize.compress(data[: cluster // 2])), cluster) is None
    # Zeros after a first frame that is too short: not a frame, as qemu finds.
    assert _inflate_zstd(bytearray(nosize.compress(data[:100]) + bytes(64)), cluster) is None
    assert _inflate_zstd(bytearray(b"\x00" * 512), cluster) is None
    # A bomb: a small frame of a gigabyte stops once it is past the cluster.
    bomb = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(1 << 30))
    assert _inflate_zstd(bytearray(bomb), cluster) is None


@pytest.mark.parametrize("size", [MiB, 5 * MiB])
def test_last_compressed_cluster_may_end_inside_its_last_sector(tmp_path, size):
    """qemu reads a compressed cluster's whole last sector, zeros past the end of the file:
    a file cut right after the compressed stream still reads, where the file's size is known
    (given, or the image is shorter than the head the decoder starts from)."""
    rng = random.Random(7)
    raw = tmp_path / "d.raw"
    raw.write_bytes(bytes(rng.getrandbits(4) for _ in range(size)))  # compresses to about half
    image = _convert(raw, tmp_path / "c.qcow2", "-c")
    q = _Qcow2(image)
    _, offset, length = max(q.compressed(), key=lambda c: c[1])
    assert offset + length == len(q.data)  # qemu-img puts it last
    inflate = zlib.decompressobj(-12)
    inflate.decompress(bytes(q.data[offset : offset + length]))
    end = offset + length - len(inflate.unused_data)
    assert end < len(q.data)
    del q.data[end:]
    cut = q.save(tmp_path / "cut.qcow2")
    assert _reference(cut) == _reference(image)
    if len(q.data) < 2 * MiB:
        _check(cut, tmp_path, chunks=(4096,))
    else:
        assert _decoded(cut, tmp_path, known_size=True) == _reference(image)
        # Not known: the Layout has no range that may run past the end of the file.
        _fails(cut, tmp_path, "TruncatedImage", "compressed cluster", qemu=False)


# What is left to qemu-img.


def test_unsupported_features_fall_back(tmp_path, raw):
    image = _convert(raw, tmp_path / "d.qcow2")
    cases = {
        "encrypted .crypt_method 1": _patched(image, tmp_path / "aes.qcow2", crypt_method=1),
        "encrypted .crypt_method 2": _patched(image, tmp_path / "luks.qcow2", crypt_method=2),
        "extended L2": _patched(image, tmp_path / "extl2.qcow2", incompatible=1 << 4),
        "unknown to diskflow": _patched(image, tmp_path / "unknown.qcow2", incompatible=1 << 9),
        "marked corrupt": _patched(image, tmp_path / "corrupt.qcow2", incompatible=1 << 1),
        "version 4": _patched(image, tmp_path / "v4.qcow2", version=4),
    }
    for why, path in cases.items():
        with pytest.raises(Unsupported, match=why):
            _decoded(path, tmp_path)
    # qemu-made, too (a qemu-made LUKS image takes seconds to make: crypt_method above).
    extl2 = tmp_path / "extl2-made.qcow2"
    _qemu_img("create", "-f", "qcow2", "-o", "extended_l2=on", extl2, "1M")
    with pytest.raises(Unsupported, match="extended L2"):
        _decoded(extl2, tmp_path)


def test_unknown_compression_type_falls_back(tmp_path, raw):
    image = _convert(raw, tmp_path / "z.qcow2", "-o", "compression_type=zstd")
    q = _Qcow2(image)
    q.data[104] = 7
    with pytest.raises(Unsupported, match="compression type 7"):
        _decoded(q.save(tmp_path / "seven.qcow2"), tmp_path)


# Hostile headers and tables.


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"cluster_bits": 8}, "cluster_bits is 8"),
        ({"cluster_bits": 22}, "cluster_bits is 22"),
        ({"l1_size": 0}, "L1 table has 0 entries; the virtual size of 3150336 bytes needs 1"),
        ({"l1_size": 1 << 22 | 1}, "L1 table has 4194305 entries of 8 bytes"),
        ({"l1_table_offset": 0x30200}, "L1 table offset 0x30200 is not aligned"),
        ({"refcount_table_clusters": 0}, "no refcount table"),
        ({"refcount_table_offset": 512}, "refcount table offset 0x200 is not aligned"),
        ({"snapshots_offset": 100}, "snapshot table offset 0x64 is not aligned"),
        ({"nb_snapshots": 65537}, "snapshot table has 65537 entries"),
        ({"header_length": 96}, "header_length is 96: less than 104"),
        ({"header_length": 65540}, "header_length 65540 exceeds the cluster size"),
        ({"refcount_order": 7}, "refcount_order is 7"),
        ({"incompatible": 1 << 3}, "compression type is 0 but its incompatible feature bit 3"),
        ({"autoclear": 2}, "raw external data"),
        ({"size": 1 << 63}, "beyond 2\\^63"),
        ({"size": 1 << 40}, "L1 table has 1 entries; the virtual size of 1099511627776 bytes"),
    ],
)
def test_hostile_headers(tmp_path, raw, fields, match):
    image = _patched(_convert(raw, tmp_path / "d.qcow2"), tmp_path / "bad.qcow2", **fields)
    _fails(image, tmp_path, "InvalidImage", match)


def test_hostile_snapshot_table(tmp_path, raw):
    """The snapshot table is walked as qemu walks it when it opens the image: an entry with
    more than 1 KiB of extra data, and qemu refuses the image."""
    image = _convert(raw, tmp_path / "s.qcow2")
    for name in ("one", "two"):
        _qemu_img("snapshot", "-c", name, image)
    q = _Qcow2(image)
    first = q.u64(64)
    id_size, name_size = struct.unpack_from(">HH", q.data, first + 12)
    second = -(-(first + 40 + q.u32(first + 36) + id_size + name_size) // 8) * 8
    q.set32(second + 36, 1025)  # the second entry's extra data size
    hostile = q.save(tmp_path / "hostile.qcow2")
    _fails(hostile, tmp_path, "InvalidImage", "entry 1 has 1025 bytes of extra data")


def test_outside_references_are_refused(tmp_path, raw):
    image = _convert(raw, tmp_path / "d.qcow2")
    backing = _patched(image, tmp_path / "b.qcow2", backing_file_offset=512)
    _fails(backing, tmp_path, "BackingFileRejected", "backing file", qemu=False)
    data_file = _patched(image, tmp_path / "df.qcow2", incompatible=1 << 2)
    _fails(data_file, tmp_path, "DataFileRejected", "external data file", qemu=False)


def test_hostile_header_extensions(tmp_path, raw):
    image = _convert(raw, tmp_path / "d.qcow2")
    q = _Qcow2(image)
    start = q.u32(100)  # header_length: the extensions follow
    q.set32(start, 0x12345678)
    q.set32(start + 4, 1 << 20)
    _fails(q.save(tmp_path / "big.qcow2"), tmp_path, "InvalidImage", "extension 0x12345678.*past")
    q.set32(start, 0x0537BE77)  # a LUKS header extension in an image with no encryption
    q.set32(start + 4, 16)
    _fails(q.save(tmp_path / "crypto.qcow2"), tmp_path, "InvalidImage", "encryption header")
    q.set32(start, 0xE2792ACA)  # backing format name
    q.set32(start + 4, 16)
    _fails(q.save(tmp_path / "fmt.qcow2"), tmp_path, "InvalidImage", "backing format")


def test_hostile_l1_entries(tmp_path, raw):
    # 512-byte clusters: an L2 table maps 32 KiB, so the disk has many of them.
    q = _Qcow2(_convert(raw, tmp_path / "small.qcow2", "-o", "cluster_size=512"))
    l1 = q.l1()
    used = [i for i, entry in enumerate(l1) if entry & MASK]
    q.set64(q.l1_offset + 8 * used[1], l1[used[0]])
    # qemu reads it (the same clusters twice): diskflow refuses.
    _fails(
        q.save(tmp_path / "twice.qcow2"),
        tmp_path,
        "InvalidImage",
        "L2 table at .* twice",
        qemu=False,
    )
    q = _Qcow2(_convert(raw, tmp_path / "d.qcow2", "-o", "cluster_size=4096"))
    q.set64(q.l1_offset, q.l1()[0] + 512)
    _fails(q.save(tmp_path / "unaligned.qcow2"), tmp_path, "InvalidImage", "L1 entry 0 .* not")


def test_hostile_l2_entries(tmp_path, raw):
    image = _convert(raw, tmp_path / "d.qcow2", "-o", "cluster_size=4096")
    q = _Qcow2(image)
    data = [(at, e) for at, e in q.l2_entries() if e & MASK and not e & (1 << 62) and not e & 1]
    at, entry = data[0]
    q.set64(at, entry + 512)
    _fails(q.save(tmp_path / "u.qcow2"), tmp_path, "InvalidImage", "data cluster .* not cluster")
    q.set64(at, entry | 1 | 512)
    _fails(q.save(tmp_path / "z.qcow2"), tmp_path, "InvalidImage", "zero cluster .* not cluster")
    q.set64(at, data[1][1])  # two disk clusters in one host cluster
    _fails(q.save(tmp_path / "dup.qcow2"), tmp_path, "InvalidImage", "more than once", qemu=False)
    v2 = _Qcow2(_convert(raw, tmp_path / "v2.qcow2", "-o", "compat=0.10,cluster_size=4096"))
    at, entry = next((at, e) for at, e in v2.l2_entries() if e & MASK)
    v2.set64(at, entry | 1)
    _fails(v2.save(tmp_path / "v2z.qcow2"), tmp_path, "InvalidImage", "version 2 image has a zero")


def test_corrupt_compressed_cluster(tmp_path, raw):
    for compression in ("zlib", "zstd"):
        image = _convert(raw, tmp_path / "c.qcow2", "-c", "-o", f"compression_type={compression}")
        q = _Qcow2(image)
        _, offset, size = q.compressed()[0]
        q.data[offset : offset + size] = b"\xa5" * size
        _fails(q.save(tmp_path / "bad.qcow2"), tmp_path, "InvalidImage", "does not decompress to a")


# Truncated images.


def test_truncated_images(tmp_path, raw):
    """qemu reads zeros past the end of the file: diskflow calls a cut image truncated."""
    image = _convert(raw, tmp_path / "d.qcow2")
    whole = image.read_bytes()
    cut = tmp_path / "cut.qcow2"
    cut.write_bytes(whole[: len(whole) // 2])
    for known_size in (False, True):
        _fails(
            cut,
            tmp_path,
            "TruncatedImage",
            "qcow2 data clusters",
            qemu=False,
            known_size=known_size,
        )
    cut.write_bytes(whole[:100])
    _fails(cut, tmp_path, "TruncatedImage", "inside its version 3 header", qemu=False)
    # The L1 table past the end of a file whose size is known: refused before any data.
    q = _Qcow2(image)
    q.set64(40, len(whole) + 64 * KiB)
    _fails(
        q.save(tmp_path / "l1.qcow2"),
        tmp_path,
        "TruncatedImage",
        "L1 table",
        qemu=False,
        known_size=True,
    )
    _fails(tmp_path / "l1.qcow2", tmp_path, "TruncatedImage", "L1 table", qemu=False)


# Speed: a disk of tens of MiB, half data, streams well above what a download brings.


def test_streams_fast(tmp_path):
    import time

    raw = tmp_path / "big.raw"
    block = os.urandom(MiB)
    with open(raw, "wb") as f:
        f.truncate(64 * MiB)
        for at in range(0, 64, 2):
            f.seek(at * MiB)
            f.write(block)
    image = _convert(raw, tmp_path / "big.qcow2")
    start = time.monotonic()
    _decoded(image, tmp_path)
    assert time.monotonic() - start < 4.0  # ~0.2 s idle; generous for a busy machine
