"""Stream decoders: qcow2, VMDK, VHD and VDI turned into raw disk bytes in one pass.

A decoder reads the image once, from its first byte to its last, as it downloads: it learns
where the guest's data lies from the image's tables as they arrive, and has the data written
straight to its guest offset. Nothing is landed in scratch space first, unless the layout puts
data before the tables that map it (held in memory, then a small spill file) or the image uses
something a decoder does not do (encryption, extended L2 entries...): then `Unsupported` is
raised and the import falls back to scratch space and qemu-img.

Each format is a module with one function, `open_image(head, layout)`: it parses the header in
`head` (the image's first HEAD_BYTES, or all of it when shorter), checks it, declares the
disk's virtual size (`layout.declare`) and tells `layout` (importer.decoders.layout.Layout)
which byte ranges of the image it needs and what to do with them. Everything after that is
driven by the bytes arriving.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from importer.buffers import AlignedBuffer
from importer.formats import DiskFormat

if TYPE_CHECKING:
    from importer.decoders.layout import Layout, Output

# The most a header parse may read from the start: qcow2's header extensions may fill its first
# cluster, and clusters are at most 2 MiB.
HEAD_BYTES = 2 << 20


class Unsupported(Exception):
    """The image is valid (as far as the decoder can tell) but this decoder does not stream it:
    the import falls back to scratch space and qemu-img. The message says why, for a person."""


_MODULES = {
    DiskFormat.QCOW2: "importer.decoders.qcow2",
    DiskFormat.VMDK: "importer.decoders.vmdk",
    DiskFormat.VPC: "importer.decoders.vhd",
    DiskFormat.VDI: "importer.decoders.vdi",
}


def decoder_for(fmt: DiskFormat) -> Callable[[bytes, Layout], int] | None:
    """The `open_image` function of the decoder for `fmt`, or None (VHDX: scratch only)."""
    module = _MODULES.get(fmt)
    return importlib.import_module(module).open_image if module else None


def start(
    fmt: DiskFormat,
    head: bytes,
    output: Output,
    *,
    file_size: int | None = None,
    spill_dir: str | None = None,
    check_size: Callable[[int], None] = lambda size: None,
    **limits: int,
) -> Layout:
    """Open an image of format `fmt` from its first bytes: parse and check its header, check
    its virtual size (`check_size`), and return the layout to `run` the stream through (to
    `close` in the end). `Unsupported` here means nothing was consumed or written. `limits`:
    the Layout's memory, spill_limit and workers."""
    from importer.decoders.layout import Layout

    open_image = decoder_for(fmt)
    if open_image is None:
        raise Unsupported(f"diskflow does not stream {fmt} images")
    layout = Layout(
        output,
        name=str(fmt),
        file_size=file_size,
        spill_dir=spill_dir,
        check_size=check_size,
        **limits,
    )
    try:
        open_image(head, layout)
    except BaseException:
        layout.close()
        raise
    return layout


def run(layout: Layout, chunks: Iterable[bytes | AlignedBuffer]) -> int:
    """Feed the whole image (from its first byte) through `layout`, then check that it was
    all there; return the disk's size. Buffers are released once fed."""
    for chunk in chunks:
        if isinstance(chunk, AlignedBuffer):
            try:
                layout.feed(chunk.data())
            finally:
                chunk.release()
        else:
            layout.feed(chunk)
    layout.end()
    return layout.output.size
