"""Stream-decode an image file with diskflow's decoders, as an import would, without one; and
the helpers the decoders' tests share (qemu-img's answer, patching and reading fields)."""

from __future__ import annotations

import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from importer.decoders import HEAD_BYTES, run, start
from importer.errors import FinalError
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


def qemu_img(*args: str | Path) -> str:
    """Run qemu-img; its output."""
    return subprocess.run(
        ["qemu-img", *map(str, args)], check=True, capture_output=True, text=True
    ).stdout


def qemu_raw(image: Path, tmp_path: Path, fmt: str | None = None) -> bytes:
    """What `qemu-img convert -O raw` makes of `image` (of format `fmt`, or probed)."""
    out = tmp_path / f"{image.name}.qemu.raw"
    qemu_img("convert", *(["-f", fmt] if fmt else []), "-O", "raw", image, out)
    return out.read_bytes()


def decoded(image: Path, tmp_path: Path, **kwargs: object) -> bytes:
    """What diskflow's decoder makes of `image` (`decode`'s options)."""
    out = tmp_path / f"{image.name}.decoded.raw"
    out.unlink(missing_ok=True)
    decode(image, out, **kwargs)  # type: ignore[arg-type]
    return out.read_bytes()


def refused(image: Path, tmp_path: Path, reason: str, match: str, **kwargs: object) -> None:
    """The decoder refuses `image` with `reason` and a message matching `match`."""
    with pytest.raises(FinalError, match=match) as caught:
        decoded(image, tmp_path, **kwargs)
    assert caught.value.reason == reason


def patch(path: Path, offset: int, data: bytes) -> None:
    """Overwrite bytes of a file in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def field(path: Path, offset: int, fmt: str = "<I") -> int:
    """A field of a file, read with struct format `fmt`."""
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]
