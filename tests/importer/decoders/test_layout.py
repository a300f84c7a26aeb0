"""The Layout that serves an image's byte ranges to its decoder, driven by a toy format.

The toy image: a 16-byte header (magic, virtual size, table offset), a table of
(host offset, guest offset, length, zlib?) entries wherever the header says, and data.
"""

from __future__ import annotations

import random
import struct
import zlib
from pathlib import Path

import pytest

from importer.decoders import Unsupported
from importer.decoders.layout import Layout
from importer.errors import FinalError
from importer.target import GuestWriter

ENTRY = struct.Struct("<QQII")


def toy_image(extents: list[tuple[int, bytes, bool]], size: int, *, table_last: bool) -> bytes:
    """An image of `size` bytes whose guest data is `extents` (guest offset, data, deflated?),
    its table before or after the data."""
    body = bytearray()
    entries = []
    table_length = 4 + ENTRY.size * len(extents)
    data_start = 16 + (0 if table_last else table_length)
    for guest, data, deflated in extents:
        stored = zlib.compress(data) if deflated else data
        entries.append(ENTRY.pack(data_start + len(body), guest, len(stored), deflated))
        body += stored
    table = struct.pack("<I", len(extents)) + b"".join(entries)
    table_offset = 16 + len(body) if table_last else 16
    header = b"TOYD" + struct.pack("<QI", size, table_offset)
    return header + (bytes(body) + table if table_last else table + bytes(body))


def open_toy(head: bytes, layout: Layout) -> None:
    """The toy format's decoder, written as a real one is."""
    size, table_offset = struct.unpack_from("<QI", head, 4)
    layout.declare(size)

    def parse_count(data: bytearray) -> None:
        (count,) = struct.unpack("<I", data)
        layout.need(table_offset + 4, count * ENTRY.size, parse_table, what="table")

    def parse_table(data: bytearray) -> None:
        for host, guest, length, deflated in ENTRY.iter_unpack(data):
            if deflated:

                def inflate(stored: bytearray, guest: int = guest) -> None:
                    layout.write(guest, zlib.decompress(stored))

                layout.need(host, length, inflate, what="block", parallel=True)
            else:
                layout.copy(host, length, guest, what="block")
        layout.mapped()

    layout.need(table_offset, 4, parse_count, what="table size")


def decode(
    image: bytes, tmp_path: Path, chunk: int, *, seen: list[Layout] | None = None, **options: object
) -> bytes:
    out = tmp_path / "out.raw"
    out.touch()
    writer = GuestWriter(str(out), block=False)
    layout = Layout(writer, **options)  # type: ignore[arg-type]
    if seen is not None:
        seen.append(layout)
    try:
        open_toy(image[:16], layout)
        for at in range(0, len(image), chunk):
            layout.feed(image[at : at + chunk])
        layout.end()
        writer.finish()
    finally:
        layout.close()
        writer.close()
    return out.read_bytes()


def expected(extents: list[tuple[int, bytes, bool]], size: int) -> bytes:
    disk = bytearray(size)
    for guest, data, _ in extents:
        disk[guest : guest + len(data)] = data
    return bytes(disk)


def sample(seed: int = 1) -> list[tuple[int, bytes, bool]]:
    rng = random.Random(seed)
    extents = []
    for i in range(24):
        data = rng.randbytes(8192) if i % 3 else bytes(4096) + b"text" * 1024
        extents.append((i * 16384 + (i % 4) * 512, data, i % 5 == 0))
    rng.shuffle(extents)
    return extents


SIZE = 24 * 16384 + 4096


@pytest.mark.parametrize("chunk", [1, 777, 4096, 1 << 20])
@pytest.mark.parametrize("table_last", [False, True], ids=["table-first", "table-last"])
def test_any_layout_and_chunking_gives_the_disk(tmp_path, chunk, table_last):
    extents = sample()
    if chunk == 1:
        extents = extents[:4]  # a byte at a time: keep it quick
    image = toy_image(extents, SIZE, table_last=table_last)
    assert decode(image, tmp_path, chunk) == expected(extents, SIZE)


def test_data_before_its_table_spills_to_a_file_and_the_file_goes(tmp_path):
    extents = sample()
    image = toy_image(extents, SIZE, table_last=True)
    spill = tmp_path / "spill"
    spill.mkdir()
    layouts: list[Layout] = []
    got = decode(image, tmp_path, 4096, spill_dir=str(spill), memory=8192, seen=layouts)
    assert got == expected(extents, SIZE)
    assert layouts[0].spilled > 8192
    assert list(spill.iterdir()) == []


def test_more_held_than_memory_without_a_spill_directory_is_unsupported(tmp_path):
    image = toy_image(sample(), SIZE, table_last=True)
    with pytest.raises(Unsupported, match="no scratch directory"):
        decode(image, tmp_path, 4096, memory=8192)


def test_more_held_than_the_spill_limit_is_unsupported(tmp_path):
    image = toy_image(sample(), SIZE, table_last=True)
    with pytest.raises(Unsupported, match="before the tables that map it"):
        decode(image, tmp_path, 4096, spill_dir=str(tmp_path), spill_limit=65536)


def test_a_table_naming_bytes_past_the_end_is_a_truncated_image(tmp_path):
    extents = [(0, b"x" * 4096, False)]
    image = bytearray(toy_image(extents, SIZE, table_last=False))
    ENTRY.pack_into(image, 20, len(image) + 100, 0, 4096, 0)
    ends = r"truncated: it ends after \d+ bytes, but needs bytes \d+-\d+ \(block\)"
    with pytest.raises(FinalError, match=ends) as caught:
        decode(bytes(image), tmp_path, 4096)
    assert caught.value.reason == "TruncatedImage"
    short = r"truncated: it is \d+ bytes, but needs bytes \d+-\d+ \(block\)"
    with pytest.raises(FinalError, match=short) as caught:
        decode(bytes(image), tmp_path, 4096, file_size=len(image))
    assert caught.value.reason == "TruncatedImage"


def test_host_bytes_copied_twice_are_refused(tmp_path):
    extents = [(0, b"a" * 4096, False), (8192, b"b" * 4096, False)]
    image = bytearray(toy_image(extents, SIZE, table_last=False))
    first_host = ENTRY.unpack_from(image, 20)[0]
    ENTRY.pack_into(image, 20 + ENTRY.size, first_host + 512, 8192, 4096, 0)
    with pytest.raises(FinalError, match="to the disk more than once") as caught:
        decode(bytes(image), tmp_path, 4096)
    assert caught.value.reason == "InvalidImage"


def test_guest_bytes_beyond_the_disk_or_written_twice_are_refused(tmp_path):
    beyond = toy_image([(SIZE - 100, b"x" * 4096, False)], SIZE, table_last=False)
    with pytest.raises(FinalError, match="beyond its virtual size"):
        decode(beyond, tmp_path, 4096)
    twice = toy_image([(0, b"x" * 4096, True), (2048, b"y" * 4096, True)], SIZE, table_last=False)
    with pytest.raises(FinalError, match="twice") as caught:
        decode(twice, tmp_path, 4096)
    assert caught.value.reason == "InvalidImage"


def test_a_failing_worker_fails_the_stream(tmp_path):
    image = bytearray(toy_image([(0, b"z" * 65536, True)], SIZE, table_last=False))
    image[-10:] = b"\xff" * 10  # the deflated block's tail: zlib.error in the worker
    with pytest.raises(zlib.error):
        decode(bytes(image), tmp_path, 4096)


def test_bytes_needed_after_the_layout_let_them_go_are_unsupported(tmp_path):
    out = tmp_path / "out.raw"
    out.touch()
    writer = GuestWriter(str(out), block=False)
    layout = Layout(writer)
    try:
        layout.declare(4096)
        layout.mapped()
        layout.feed(b"q" * 8192)
        with pytest.raises(Unsupported, match="streaming it would need the image twice"):
            layout.copy(0, 4096, 0, what="late block")
    finally:
        layout.close()
        writer.close()


def test_the_virtual_size_is_checked_before_anything_is_written(tmp_path):
    out = tmp_path / "out.raw"
    out.touch()
    writer = GuestWriter(str(out), block=False)

    def refuse(size: int) -> None:
        raise FinalError("ImageTooLarge", f"{size} is too large")

    layout = Layout(writer, check_size=refuse)
    try:
        with pytest.raises(FinalError, match="too large"):
            open_toy(toy_image([], SIZE, table_last=False)[:16], layout)
        assert writer.size == 0
    finally:
        layout.close()
        writer.close()
