"""The import data path, top-down:

    source ─► fetch ─► hash ─► decompress ─► sniff the format
      raw, iso   ─► sparse write to DEST ─► verify checksum ─► resize ─► sync ─► publish
      qcow2, ... ─► sparse write to scratch ─► verify checksum ─► qemu-img info (hardened)
                 ─► size check ─► qemu-img convert to DEST ─► resize ─► sync ─► publish

Fetching, hashing, inflating and writing run in threads joined by bounded queues, so memory
stays bounded and the stages overlap. The raw-or-scratch decision is made from the first
bytes of the stream, never by a failed first attempt. A file destination is written under a
temporary name and renamed only when complete; a block device gets its first MiB last.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum

from importer import qemu
from importer.archive import extract, is_tar
from importer.buffers import BufferPool
from importer.checksum import Checksum
from importer.errors import FinalError
from importer.formats import (
    SNIFF_BYTES,
    VHD_FOOTER_SIZE,
    Compression,
    DiskFormat,
    detect_compression,
    detect_format,
    fixed_vhd_disk_size,
    outside_reference,
    unsupported_format,
)
from importer.progress import Progress
from importer.sources import HttpOptions, S3Options, Source, open_source
from importer.streams import QUEUE_DEPTH, Chunk, decompressed, hashed, peek, read_chunks, threaded
from importer.target import (
    SparseWriter,
    Target,
    inspect_target,
    open_direct,
    wipe_head,
    zero_range,
)

BLANK = "blank:"  # the source of an empty disk, as CDI's `source: {blank: {}}`
ALIGNMENT = 1 << 20  # usable capacity is rounded down to whole MiB, as CDI does
# A non-raw image file may exceed its virtual size by its metadata; more than this is a bomb.
SCRATCH_SLACK = 64 << 20


class ContentType(StrEnum):
    KUBEVIRT = "kubevirt"
    ARCHIVE = "archive"


@dataclass(frozen=True, kw_only=True)
class ImportOptions:
    size: int | None = None
    """Capacity of the volume in bytes; default: the device's size, or for a file none."""
    checksum: Checksum | None = None
    """Expected digest of the bytes as downloaded (before decompression)."""
    http: HttpOptions = field(default_factory=HttpOptions)
    """TLS, retries and timeouts for HTTP and S3 sources; headers and auth for HTTP."""
    s3: S3Options = field(default_factory=S3Options)
    connections: int = 4
    """Parallel ranged GETs for HTTP and S3 sources that allow them, used only when one
    stream turns out slow (under 100 MB/s over the first 8 MiB); 1: always one stream."""
    preallocate: bool = False
    filesystem_overhead: float = 0.055
    """Fraction of a Filesystem volume kept free for the filesystem itself."""
    scratch_dir: str | None = None
    """Where non-raw images wait for qemu-img; default: the system's temporary directory."""
    content_type: ContentType = ContentType.KUBEVIRT
    """kubevirt: a disk image, converted to raw; archive: a tar extracted into a directory."""
    archive_max_members: int = 100_000
    """The most members an archive may hold (each costs a file or directory on the volume)."""


@dataclass(frozen=True)
class ImportResult:
    source: str
    destination: str
    compression: str
    format: str
    bytes_downloaded: int
    size: int
    """Length in bytes of the raw image at the destination, after any resize (for an
    archive: the bytes of file data extracted)."""
    checksum: str | None
    seconds: float


def usable_capacity(target: Target, options: ImportOptions) -> int | None:
    """Bytes the raw image may take: the device, or the volume less filesystem overhead."""
    if target.is_block:
        assert target.device_size is not None
        if options.size and options.size > target.device_size:
            raise FinalError(
                "InvalidArgument",
                f"--size {options.size} is larger than the device {target.path} "
                f"({target.device_size} bytes)",
            )
        return options.size or target.device_size
    if options.size is None:
        return None
    if not 0 <= options.filesystem_overhead < 1:
        raise FinalError(
            "InvalidArgument", "the filesystem overhead must be at least 0 and below 1"
        )
    usable = int(options.size * (1 - options.filesystem_overhead))
    return usable - usable % ALIGNMENT if usable >= ALIGNMENT else usable - usable % 512


def import_image(
    source: str,
    destination: str,
    *,
    options: ImportOptions | None = None,
    progress: Progress | None = None,
) -> ImportResult:
    """Import the image at `source` (URL, path, or `blank:` for an empty disk) into
    `destination` (file or block device)."""
    options = options or ImportOptions()
    progress = progress or Progress()
    started = time.monotonic()
    archive = options.content_type is ContentType.ARCHIVE
    if archive and source == BLANK:
        raise FinalError("InvalidArgument", "blank: makes a disk; it is not an archive")
    target = _directory(destination) if archive else inspect_target(destination)
    capacity = usable_capacity(target, options)
    if source == BLANK:
        size = _create_blank(target, capacity, options, progress)
        seconds = round(time.monotonic() - started, 3)
        return ImportResult(BLANK, destination, "none", "raw", 0, size, None, seconds)
    digest = options.checksum.new_hash() if options.checksum else None
    stream = open_source(source, options.http, options.s3, connections=options.connections)
    stages: list[Iterator[Chunk]] = []
    # Every buffer the decompress stage may hold: its queue, one being filled, one written.
    pool = BufferPool(count=QUEUE_DEPTH + 2)
    downloaded = 0

    def fetched(n: int) -> None:
        nonlocal downloaded
        downloaded += n
        progress.advance(n)

    try:
        progress.stage("download", stream.size)

        def cancel() -> None:
            stream.close()
            pool.close()

        def in_thread(chunks: Iterator[Chunk], name: str) -> Iterator[Chunk]:
            stages.append(threaded(chunks, name=name, cancel=cancel))
            return stages[-1]

        chunks = in_thread(read_chunks(stream.read, on_bytes=fetched), "fetch")
        if digest is not None:
            chunks = in_thread(hashed(chunks, digest), "hash")
        head, chunks = peek(chunks, 8)
        compression = detect_compression(head)
        if compression is not Compression.NONE:
            chunks = in_thread(decompressed(chunks, compression, pool), "decompress")
        head, chunks = peek(chunks, SNIFF_BYTES)

        def verify() -> None:
            if options.checksum and digest is not None:
                options.checksum.verify(digest, what=f"{stream.description} as downloaded")

        if archive:
            if not is_tar(head):
                raise FinalError(
                    "InvalidArchive",
                    f"{stream.description} is not a tar archive (once decompressed)",
                )
            size = extract(
                chunks,
                destination,
                limit=capacity,
                verify=verify,
                max_members=options.archive_max_members,
            )
            kind = "tar"
        else:
            fmt = detect_format(head)
            _refuse_early(fmt, head, stream, compression, capacity)
            job = _Job(target, capacity, options, verify, progress)
            if fmt.streams:
                size, fmt = _write_raw(chunks, fmt, job)
            else:
                size = _write_converted(chunks, fmt, job)
            kind = fmt.value
    finally:
        stream.close()
        for stage in reversed(stages):
            stage.close()  # type: ignore[attr-defined]
    return ImportResult(
        source=stream.description,
        destination=destination,
        compression=compression.value,
        format=kind,
        bytes_downloaded=downloaded,
        size=size,
        checksum=str(options.checksum) if options.checksum else None,
        seconds=round(time.monotonic() - started, 3),
    )


def _refuse_early(
    fmt: DiskFormat, head: bytes, stream: Source, compression: Compression, capacity: int | None
) -> None:
    """Errors the first bytes already prove, before anything is written."""
    if fmt is DiskFormat.HTML:
        raise FinalError(
            "HtmlInsteadOfImage",
            f"{stream.description} holds an HTML page, not a disk image; the link may have "
            "expired or need a login",
        )
    unsupported = unsupported_format(head)
    if unsupported:
        raise FinalError(
            "UnsupportedFormat",
            f"the image is {unsupported}, which diskflow does not import; supported formats: "
            "raw, iso, qcow2, vmdk, vdi, vhd, vhdx",
        )
    reference = outside_reference(fmt, head)
    if reference:
        raise FinalError(*reference)
    if not head:
        raise FinalError("InvalidImage", f"{stream.description} is empty")
    raw_size = stream.size if compression is Compression.NONE and fmt.streams else None
    # A fixed VHD streams as raw with a 512-byte footer that is cut off at the end.
    if raw_size is not None:
        _check_fits("size", raw_size, capacity, slack=VHD_FOOTER_SIZE)


def _check_fits(what: str, size: int, capacity: int | None, *, slack: int = 0) -> None:
    """Refuse an image whose `what` passes the usable capacity (by more than `slack`)."""
    if capacity is not None and size > capacity + slack:
        raise FinalError(
            "ImageTooLarge",
            f"the image's {what} {size} bytes is larger than the usable capacity {capacity} bytes",
        )


@dataclass(frozen=True)
class _Job:
    """What both write paths need to know about the import in hand."""

    target: Target
    capacity: int | None
    options: ImportOptions
    verify: Callable[[], None]
    progress: Progress


def _write_raw(chunks: Iterator[Chunk], fmt: DiskFormat, job: _Job) -> tuple[int, DiskFormat]:
    """Stream raw bytes into the destination in one pass."""
    target, capacity = job.target, job.capacity
    # Room for a fixed VHD's footer in a file; a device ends where it ends.
    limit = capacity + VHD_FOOTER_SIZE if capacity is not None and not target.is_block else capacity
    with _published(target) as path:
        writer = SparseWriter(
            path,
            block=target.is_block,
            limit=limit,
            limit_what="the usable capacity",
            preallocate=job.options.preallocate,
        )
        try:
            size = writer.write_all(chunks)
            job.verify()
            disk_size = _fixed_vhd_size(path, size, block=target.is_block)
            if disk_size is not None:
                fmt, size = DiskFormat.VPC, disk_size
            _check_fits("size", size, capacity)
            if target.is_block:
                writer.commit()
            else:
                size = _finish_file(path, size, job)
        finally:
            writer.close()
    return size, fmt


def _write_converted(chunks: Iterator[Chunk], fmt: DiskFormat, job: _Job) -> int:
    """Land the image in scratch space, check it, and let qemu-img convert it to raw."""
    target, capacity, progress = job.target, job.capacity, job.progress
    scratch_limit = None if capacity is None else capacity + capacity // 8 + SCRATCH_SLACK
    fd, scratch = tempfile.mkstemp(prefix="diskflow-scratch-", dir=job.options.scratch_dir)
    os.close(fd)
    try:
        writer = SparseWriter(
            scratch,
            block=False,
            limit=scratch_limit,
            limit_what=f"what an image for a usable capacity of {capacity} bytes can need",
            scratch=True,
        )
        try:
            writer.write_all(chunks)
        finally:
            writer.close()
        job.verify()
        virtual_size = qemu.validate(qemu.info(scratch, fmt), fmt, scratch)
        _check_fits("virtual size", virtual_size, capacity)
        with _published(target) as path:
            progress.stage("convert", virtual_size)
            direct = _supports_direct(path)
            try:
                qemu.convert(
                    scratch,
                    fmt,
                    path,
                    existing=target.is_block,
                    direct=direct,
                    on_progress=lambda percent: progress.set_done(
                        int(virtual_size * percent / 100)
                    ),
                )
                if target.is_block:
                    _sync(path)
                    return virtual_size
                return _finish_file(path, virtual_size, job)
            except BaseException:
                if target.is_block:
                    wipe_head(path)
                raise
    finally:
        os.unlink(scratch)


def _directory(path: str) -> Target:
    if not os.path.isdir(path):
        raise FinalError(
            "InvalidDestination", f"an archive is extracted into a directory; {path} is not one"
        )
    return Target(path, False, None)


def _create_blank(
    target: Target, capacity: int | None, options: ImportOptions, progress: Progress
) -> int:
    """An empty raw disk: a sparse file of the usable capacity, or a zeroed device (zeroed by
    the device itself where it can, not by writing every byte)."""
    if capacity is None:
        raise FinalError("InvalidArgument", "a blank disk in a file needs --size")
    job = _Job(target, capacity, options, verify=lambda: None, progress=progress)
    if not target.is_block:
        with _published(target) as path:
            return _finish_file(path, 0, job)
    progress.stage("zero", capacity)
    fd = os.open(target.path, os.O_WRONLY | os.O_EXCL)
    try:
        zero_range(fd, 0, capacity, block=True, write_only=options.preallocate)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    progress.set_done(capacity)
    return capacity


def _finish_file(path: str, size: int, job: _Job) -> int:
    """Grow a raw file to the usable capacity (never shrink), allocate it if asked, sync it."""
    final = max(size, job.capacity or 0)
    fd = os.open(path, os.O_WRONLY)
    try:
        if final != os.fstat(fd).st_size:
            job.progress.stage("resize", final)
            os.ftruncate(fd, final)
            job.progress.set_done(final)
        if job.options.preallocate:
            os.posix_fallocate(fd, 0, final)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    return final


def _fixed_vhd_size(path: str, size: int, *, block: bool) -> int | None:
    """The disk size if the raw stream was a fixed VHD (disk + 512-byte footer)."""
    if size <= VHD_FOOTER_SIZE:
        return None
    with open(path, "rb") as image:
        image.seek(size - VHD_FOOTER_SIZE)
        footer = image.read(VHD_FOOTER_SIZE)
    disk_size = fixed_vhd_disk_size(footer)
    if disk_size != size - VHD_FOOTER_SIZE:
        return None
    fd = os.open(path, os.O_WRONLY)
    try:  # drop the footer: cut it off a file, zero it on a device
        if block:
            os.pwrite(fd, bytes(VHD_FOOTER_SIZE), disk_size)
        else:
            os.ftruncate(fd, disk_size)
    finally:
        os.close(fd)
    return disk_size


def _supports_direct(path: str) -> bool:
    fd = open_direct(path, os.O_RDONLY)
    if fd is None:
        return False
    os.close(fd)
    return True


def _sync(path: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


class _published:
    """The path to write: a temporary name beside a file destination, renamed on success
    (and removed on failure); a block device is written in place."""

    def __init__(self, target: Target) -> None:
        self._target = target
        directory, name = os.path.split(os.path.abspath(target.path))
        self._partial = os.path.join(directory, f".{name}.partial")

    def __enter__(self) -> str:
        if self._target.is_block:
            return self._target.path
        open(self._partial, "wb").close()
        return self._partial

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._target.is_block:
            return
        if exc_type is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._partial)
            return
        os.replace(self._partial, self._target.path)
        directory = os.open(os.path.dirname(self._partial), os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
