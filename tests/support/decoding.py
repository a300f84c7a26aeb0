"""Stream-decode an image file with diskflow's decoders, as an import would, without one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from importer.decoders import HEAD_BYTES, run, start
from importer.formats import detect_format
from importer.target import GuestWriter


def chunks_of(path: Path, size: int) -> Iterator[bytes]:
    """The file's bytes, `size` at a time."""
    with open(path, "rb") as f:
        while data := f.read(size):
            yield data


def decode(
    image: Path,
    out: Path,
    *,
    chunk: int = 1 << 20,
    spill_dir: Path | None = None,
    known_size: bool = False,
    **limits: int,
) -> int:
    """Decode `image` (its format told by its bytes) into the raw file `out`, fed `chunk`
    bytes at a time; return the disk's size. Raises what an import would: Unsupported,
    FinalError. `known_size`: the layout is told the file's size up front (an uncompressed
    download with a length). `limits`: Layout's memory, spill_limit, workers."""
    with open(image, "rb") as f:
        head = f.read(HEAD_BYTES)
    out.touch()
    writer = GuestWriter(str(out), block=False)
    try:
        layout = start(
            detect_format(head),
            head,
            writer,
            file_size=image.stat().st_size if known_size else None,
            spill_dir=str(spill_dir) if spill_dir else None,
            **limits,
        )
        try:
            size = run(layout, chunks_of(image, chunk))
        finally:
            layout.close()
        writer.finish()
        return size
    finally:
        writer.close()
