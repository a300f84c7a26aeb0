"""The import data path, top-down:

    source ─► fetch ─► hash ─► decompress ─► sniff the format
      raw, iso   ─► sparse write to DEST ─► verify checksum ─► resize ─► sync ─► publish
      qcow2, vmdk, vhd, vdi ─► stream decoder (importer.decoders): guest data written to DEST
                 at its offsets as it arrives ─► verify checksum ─► resize ─► sync ─► publish
      vhdx, and what a decoder does not stream (the "scratch" path)
                 ─► sparse write to scratch ─► verify checksum ─► qemu-img info (hardened)
                 ─► size check ─► qemu-img convert to DEST ─► resize ─► sync ─► publish

A decoder that gives up once it has read past the image's header (its tables come after more
data than a stream holds) cannot hand the bytes on: the import starts again on the scratch
path, from a new download. The result says which path was taken, and why.

Fetching, hashing, inflating and writing run in threads joined by bounded queues, so memory
stays bounded and the stages overlap. The stream-or-scratch decision is made from the first
bytes of the stream (only a layout the decoder cannot hold changes it later, as above);
`probe()` makes it without importing, with the same code stopped after those bytes. A file
destination is written under a temporary name and renamed only when complete; a block device
gets its first MiB last. The destination is claimed for the whole import (importer.claims),
and what the image may take is bounded even without a size (importer.limits).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from enum import StrEnum

from importer import decoders, qemu
from importer.archive import extract, is_tar
from importer.buffers import CHUNK, BufferPool
from importer.capacity import DEFAULT_OVERHEAD, usable_size
from importer.checksum import Checksum
from importer.claims import SCRATCH_PREFIX, owned_file, sweep
from importer.decoders import HEAD_BYTES, Unsupported, decoder_for
from importer.decoders.layout import SPILL_LIMIT
from importer.destination import (
    check_scratch_dir,
    claimed,
    cut_fixed_vhd_footer,
    finish_file,
    parent,
    published,
    supports_direct,
    sync,
    writing_into,
)
from importer.errors import Failure, FinalError, TransientError
from importer.formats import (
    SNIFF_BYTES,
    VHD_FOOTER_SIZE,
    Compression,
    DiskFormat,
    detect_compression,
    detect_format,
    header_virtual_size,
    outside_reference,
    unsupported_format,
)
from importer.limits import (
    Bound,
    Deadline,
    check_expansion,
    expansion_guard,
    free_space_bound,
)
from importer.outcome import ImportResult
from importer.progress import Progress
from importer.sources import HttpOptions, S3Options, Source, open_source
from importer.streams import (
    DECOMPRESSION_MEMORY,
    QUEUE_DEPTH,
    Chunk,
    decompressed,
    hashed,
    peek,
    read_chunks,
    threaded,
)
from importer.target import GuestWriter, SparseWriter, Target, wipe_head, zero_range

BLANK = "blank:"  # the source of an empty disk, as CDI's `source: {blank: {}}`
# A non-raw image file may exceed its virtual size by its metadata; more than this is a bomb.
SCRATCH_SLACK = 64 << 20


class ContentType(StrEnum):
    KUBEVIRT = "kubevirt"
    ARCHIVE = "archive"


@dataclass(frozen=True, kw_only=True)
class ImportOptions:
    size: int | None = None
    """Capacity of the volume in bytes; default: the device's size, or for a file none (the
    image is then bounded by the free space of DEST's filesystem and by `max_expansion`)."""
    checksum: Checksum | None = None
    """Expected digest of the bytes as downloaded (before decompression)."""
    http: HttpOptions = field(default_factory=HttpOptions)
    """TLS, retries and timeouts for HTTP and S3 sources; headers and auth for HTTP."""
    s3: S3Options = field(default_factory=S3Options)
    connections: int = 4
    """Parallel ranged GETs for HTTP and S3 sources that allow them, used only when one
    stream turns out slow (under 100 MB/s over the first 8 MiB); 1: always one stream."""
    preallocate: bool = False
    filesystem_overhead: float | None = DEFAULT_OVERHEAD
    """The filesystem's share of a Filesystem volume: the image may use size ÷ (1 + overhead),
    rounded down to whole MiB, as in CDI. None: DEST is a plain file, not a volume's disk.img,
    and the image may use all of `size` (`diskflow import`'s default; its pods are given the
    overhead of their volume)."""
    scratch_dir: str | None = None
    """Where images that do not stream wait for qemu-img, and where a stream decoder spills
    data that arrives before its tables; default: the system's temporary directory."""
    scratch: bool = True
    """False: there is no scratch space (an importer pod given none): an image that must go
    through it fails with NeedsScratch (transient: tried again with scratch space), and a
    decoder holds data that arrives before its tables in memory only."""
    spill_limit: int = SPILL_LIMIT
    """The most data a stream decoder holds while the tables that map it have not arrived
    (HOLD_MEMORY of it in memory, the rest in a spill file in `scratch_dir`); past it the image
    goes through scratch space, from a new download."""
    content_type: ContentType = ContentType.KUBEVIRT
    """kubevirt: a disk image, converted to raw; archive: a tar extracted into a directory."""
    archive_max_members: int = 100_000
    """The most members an archive may hold (each costs a file or directory on the volume)."""
    max_expansion: float = 2000.0
    """Without `size`: the most bytes of image per byte downloaded, once past 1 GiB of image
    (a decompression bomb expands far more); 0: no limit."""
    decompression_memory: int = DECOMPRESSION_MEMORY
    """The most memory an xz or zstd stream may ask for its window."""
    deadline: float | None = None
    """Seconds the whole import may take; None: no limit."""


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
    if options.size is None or options.filesystem_overhead is None:
        return options.size
    return usable_size(options.size, options.filesystem_overhead)


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
    archive = options.content_type is ContentType.ARCHIVE
    _refuse_blank_archive(source, options)
    if options.scratch and options.scratch_dir:
        check_scratch_dir(options.scratch_dir)
    # What the deadline stops: the transfer and its stages, once they exist.
    stoppers: list[Callable[[], None]] = []
    deadline = Deadline(options.deadline, lambda: [stop() for stop in list(stoppers)])
    try:
        with claimed(destination, directory=archive) as target:
            job = _Job(target, options, progress, deadline, stoppers)
            if source == BLANK:
                return _create_blank(job)
            return _transfer(source, job)
    except Failure:
        if deadline.passed():
            raise deadline.error() from None
        raise
    finally:
        deadline.stop()


@dataclass(frozen=True)
class Probe:
    """What an import of a source would find, told from the source's first bytes: what a
    controller needs to know before it starts an importer (scratch space or not, how much)."""

    source: str
    """Where the bytes come from, safe to log (no credentials, no signed query string)."""
    compression: str
    """none, gzip, xz, zstd or bzip2."""
    format: str
    """raw, iso, qcow2, vmdk, vdi, vpc (VHD) or vhdx; "tar" for an archive. A fixed VHD is
    raw here: it streams as raw, and its footer (at the end) is seen only by the import."""
    download_size: int | None
    """Bytes to download, where the source says (Content-Length, the S3 object's size)."""
    virtual_size: int | None
    """The disk's size: from the header for the formats qemu-img converts (where the header
    lies within the bytes read); for raw and iso the download's size when not compressed;
    otherwise (and for an archive) unknown."""
    needs_scratch: bool
    """Whether the import lands the image in scratch space for qemu-img to convert: no
    decoder streams the format (vhdx), or its header asks for what the decoder does not do
    (encryption, ...). An image that streams may still fall back to scratch space when its
    layout puts data far before its tables: the result's `path` tells."""


def probe(source: str, options: ImportOptions | None = None) -> Probe:
    """Tell what importing `source` would find, with the code the import decides by, reading
    only what that takes (SNIFF_BYTES once decompressed: typically the first FETCH_CHUNK
    downloaded); then close it.

    HTTP and S3 settings of `options` (TLS, headers, auth, endpoint) apply; the checksum
    does not (only a whole download proves it). Fails with the reasons the import would:
    NotFound, HtmlInsteadOfImage, UnsupportedFormat, InvalidArchive..."""
    options = options or ImportOptions()
    _refuse_blank_archive(source, options)
    if source == BLANK:
        return Probe(BLANK, "none", "raw", 0, None, needs_scratch=False)
    # One connection: ranged parts fetched ahead would be thrown away unread.
    reading = _Reading(source, options, connections=1, importing=False)
    try:
        found, _ = reading.sniff()
    finally:
        reading.close()
    return found


def _refuse_blank_archive(source: str, options: ImportOptions) -> None:
    if source == BLANK and options.content_type is ContentType.ARCHIVE:
        raise FinalError("InvalidArgument", "blank: makes a disk; it is not an archive")


class _Reading:
    """A source opened for reading, and its stream's stages up to the first decompressed
    bytes: the part of an import that a probe runs too.

    An import runs each stage in a thread of its own, so that they overlap, and inflates into
    CHUNK-sized buffers for the writer. A probe runs them in its own thread and inflates into
    SNIFF_BYTES-sized buffers, so that it reads no further than it looks: the first fetch
    (FETCH_CHUNK bytes), for any compression."""

    def __init__(
        self, source: str, options: ImportOptions, *, connections: int, importing: bool
    ) -> None:
        self.stream = open_source(source, options.http, options.s3, connections=connections)
        self._options = options
        self._importing = importing
        self._stages: list[Iterator[Chunk]] = []
        # Every buffer the decompress stage may hold: its queue, one being filled, one written.
        self._pool = BufferPool(count=QUEUE_DEPTH + 2, size=CHUNK if importing else SNIFF_BYTES)

    def sniff(
        self,
        *,
        digest: hashlib._Hash | None = None,
        on_bytes: Callable[[int], None] = lambda n: None,
    ) -> tuple[Probe, Iterator[Chunk]]:
        """Start the stream (fetch, counting bytes with `on_bytes`; hash into `digest`;
        decompress) and tell from its first bytes what it holds, refusing what they already
        disprove. Returns that and the whole decompressed stream, its first bytes included."""
        chunks = self._stage(read_chunks(self.stream.read, on_bytes=on_bytes), "fetch")
        if digest is not None:
            chunks = self._stage(hashed(chunks, digest), "hash")
        head, chunks = peek(chunks, 8)
        compression = detect_compression(head)
        if compression is not Compression.NONE:
            memory = self._options.decompression_memory
            chunks = self._stage(
                decompressed(chunks, compression, self._pool, memory=memory), "decompress"
            )
        head, chunks = peek(chunks, SNIFF_BYTES)
        return _identify(head, compression, self.stream, self._options.content_type), chunks

    def cancel(self) -> None:
        """Stop the transfer and the stages waiting on it; from any thread."""
        self.stream.close()
        self._pool.close()

    def close(self) -> None:
        """Close the source and end every stage."""
        self.stream.close()
        for stage in reversed(self._stages):
            stage.close()  # type: ignore[attr-defined]

    def _stage(self, chunks: Iterator[Chunk], name: str) -> Iterator[Chunk]:
        if self._importing:
            chunks = threaded(chunks, name=name, cancel=self.cancel)
        self._stages.append(chunks)
        return chunks


def _identify(
    head: bytes, compression: Compression, stream: Source, content_type: ContentType
) -> Probe:
    """What the first decompressed bytes of `stream` say it is, as a Probe."""
    if content_type is ContentType.ARCHIVE:
        if not is_tar(head):
            raise FinalError(
                "InvalidArchive", f"{stream.description} is not a tar archive (once decompressed)"
            )
        return Probe(
            stream.description, compression.value, "tar", stream.size, None, needs_scratch=False
        )
    fmt = detect_format(head)
    _refuse_early(fmt, head, stream)
    if fmt.streams:
        size = stream.size if compression is Compression.NONE else None
    else:

        def read(offset: int, length: int) -> bytes | None:
            return head[offset : offset + length] if offset + length <= len(head) else None

        size = header_virtual_size(fmt, read)
    return Probe(
        stream.description,
        compression.value,
        fmt.value,
        stream.size,
        size,
        needs_scratch=not fmt.streams and not _streams(fmt, head),
    )


def _streams(fmt: DiskFormat, head: bytes) -> bool:
    """Whether a decoder streams the image whose first bytes are `head`, as far as its header
    tells (a hostile header fails here as it would in the import)."""
    if decoder_for(fmt) is None:
        return False
    try:
        decoders.start(fmt, head, _Sizing()).close()
    except Unsupported:
        return False
    return True


class _Sizing:
    """An output that only takes the disk's size: a probe's decoder writes nothing."""

    size = 0

    def declare(self, size: int) -> None:
        self.size = size

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        raise AssertionError("a probe writes nothing")


def _refuse_early(fmt: DiskFormat, head: bytes, stream: Source) -> None:
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


@dataclass
class _Job:
    """The import in hand: where it goes, within which bounds, and how it is followed."""

    target: Target
    options: ImportOptions
    progress: Progress
    deadline: Deadline
    stoppers: list[Callable[[], None]]
    started: float = field(default_factory=time.monotonic)
    downloaded: int = 0
    raw_size: int | None = None
    """The raw image's size, where the source tells it before the download."""
    verify: Callable[[], None] = lambda: None
    fallback: str | None = None
    """Why the image went through scratch space though its format streams."""

    def __post_init__(self) -> None:
        self.capacity = usable_capacity(self.target, self.options)
        self.bound = _bound(self.target, self.capacity, self.options)

    @property
    def expansion(self) -> float | None:
        """The expansion ceiling in force: only for a file given no size."""
        unbounded = self.options.size is None and not self.target.is_block
        return self.options.max_expansion if unbounded and self.options.max_expansion else None

    def finish_file(self, path: str, size: int) -> int:
        """Grow the written file to the usable capacity, allocate it if asked, sync it."""
        return finish_file(
            path,
            size,
            capacity=self.capacity,
            preallocate=self.options.preallocate,
            progress=self.progress,
        )

    def limits(self, limits: qemu.Limits) -> qemu.Limits:
        """`limits` for a qemu-img run, its time cut to what the deadline leaves."""
        left = self.deadline.remaining()
        return limits if left is None else replace(limits, timeout=min(limits.timeout, left))

    def check_virtual_size(self, size: int, downloaded: int | None) -> None:
        """Refuse a virtual size past the bound, or (made from `downloaded` bytes, where
        that is known) past the expansion ceiling."""
        self.bound.check("virtual size", size)
        if self.expansion and downloaded is not None:
            check_expansion(size, downloaded, ratio=self.expansion)


def _bound(target: Target, capacity: int | None, options: ImportOptions) -> Bound:
    if target.is_block:
        assert capacity is not None
        return Bound(capacity, f"the device {target.path}" if not options.size else "--size")
    if capacity is None:
        return free_space_bound(target.path if os.path.isdir(target.path) else parent(target.path))
    overhead = options.filesystem_overhead
    if overhead is None:
        return Bound(capacity, "--size")
    return Bound(capacity, "the usable capacity", _overhead_hint(overhead))


def _overhead_hint(overhead: float) -> str:
    """How the usable capacity follows from --size, and how to change it."""
    cdi = " (CDI's default)" if overhead == DEFAULT_OVERHEAD else ""
    return (
        f"; it is --size less a filesystem overhead of {overhead:g}{cdi}, in whole MiB: set "
        "--filesystem-overhead to change it, or leave it out for a plain file, which may use "
        "all of --size"
    )


def _transfer(source: str, job: _Job, *, decode: bool = True) -> ImportResult:
    """Fetch `source` and write it as the content type says; with `decode`, a format a
    decoder streams is written as it arrives, else it goes through scratch space."""
    options, progress = job.options, job.progress
    scratch_dir = options.scratch_dir or tempfile.gettempdir()
    sweep(scratch_dir, SCRATCH_PREFIX)  # left by imports killed outright
    digest = options.checksum.new_hash() if options.checksum else None
    reading = _Reading(source, options, connections=options.connections, importing=True)
    stream = reading.stream
    job.stoppers.append(reading.cancel)

    def fetched(n: int) -> None:
        job.downloaded += n
        progress.advance(n)

    def verify() -> None:
        if options.checksum and digest is not None:
            options.checksum.verify(digest, what=f"{stream.description} as downloaded")

    job.verify = verify
    try:
        if job.deadline.passed():  # opening the source took all the time there was
            raise job.deadline.error()
        progress.stage("download", stream.size)
        found, chunks = reading.sniff(digest=digest, on_bytes=fetched)
        if job.expansion:
            chunks = expansion_guard(chunks, downloaded=lambda: job.downloaded, ratio=job.expansion)
        kind = found.format
        if options.content_type is ContentType.ARCHIVE:
            size = _extract(chunks, job)
        else:
            fmt = DiskFormat(found.format)
            if not fmt.streams:
                file_size = stream.size if found.compression == Compression.NONE else None
                size = _write_image(chunks, fmt, scratch_dir, stream, job, decode, file_size)
            else:
                job.raw_size = found.virtual_size
                # A fixed VHD streams as raw with a 512-byte footer that is cut off at the end.
                if job.raw_size is not None:
                    job.bound.check("size", job.raw_size, slack=VHD_FOOTER_SIZE)
                size, fmt = _write_raw(chunks, fmt, job)
            kind = fmt.value
    except _Fallback as fallback:
        # The decoder read past what can be handed on: start again, through scratch space.
        reading.close()
        _fall_back(job, found.format, str(fallback))
        return _transfer(source, job, decode=False)
    finally:
        reading.close()
    scratch = job.fallback is not None
    return ImportResult(
        source=stream.description,
        destination=job.target.path,
        compression=found.compression,
        format=kind,
        bytes_downloaded=job.downloaded,
        size=size,
        checksum=str(options.checksum) if options.checksum else None,
        seconds=round(time.monotonic() - job.started, 3),
        path="scratch" if scratch else "stream",
        fallback=job.fallback,
    )


class _Fallback(Exception):
    """The decoder gave up after consuming part of the stream: the import starts again."""


def _write_image(
    chunks: Iterator[Chunk],
    fmt: DiskFormat,
    scratch_dir: str,
    stream: Source,
    job: _Job,
    decode: bool,
    file_size: int | None,
) -> int:
    """Write a non-raw image: decoded as it streams where a decoder can, else through
    scratch space and qemu-img (`job.fallback` says why)."""
    if decode and decoder_for(fmt) is not None:
        head, chunks = peek(chunks, HEAD_BYTES)
        try:
            return _write_decoded(head, chunks, fmt, scratch_dir, stream, job, file_size)
        except Unsupported as why:  # from the header: nothing was consumed
            _fall_back(job, fmt, str(why))
    elif decode:
        _fall_back(job, fmt, f"diskflow does not stream {fmt} images")
    return _write_converted(chunks, fmt, scratch_dir, stream, job)


def _fall_back(job: _Job, fmt: str, why: str) -> None:
    """Go through scratch space, because `why`: say so, or fail if there is none."""
    if not job.options.scratch:
        raise TransientError(
            "NeedsScratch",
            f"the {fmt} image must go through scratch space ({why}), and this import has none",
        )
    job.fallback = why
    job.progress.fall_back(why)


def _write_decoded(
    head: bytes,
    chunks: Iterator[Chunk],
    fmt: DiskFormat,
    scratch_dir: str,
    stream: Source,
    job: _Job,
    file_size: int | None,
) -> int:
    """Decode the image as it arrives, writing its guest data straight to the destination.
    Unsupported from its header is raised as it is; from further in, as _Fallback."""
    target = job.target
    needs = f" (the download alone is {stream.size} bytes)" if stream.size else ""
    with published(target, job.progress.commit, needs=needs) as path:
        writer = GuestWriter(path, block=target.is_block, preallocate=job.options.preallocate)
        try:
            layout = decoders.start(
                fmt,
                head,
                writer,
                file_size=file_size,
                spill_dir=scratch_dir if job.options.scratch else None,
                spill_limit=job.options.spill_limit,
                # The expansion is judged against the whole download, where it is known.
                check_size=lambda size: job.check_virtual_size(size, stream.size),
            )
            try:
                decoders.run(layout, chunks)
            except Unsupported as why:
                raise _Fallback(str(why)) from None
            finally:
                layout.close()
            job.verify()
            size = writer.finish()
            if target.is_block:
                job.progress.commit()
                writer.commit()
                return size
            return job.finish_file(path, size)
        except BaseException:
            if target.is_block:
                wipe_head(path)
            raise
        finally:
            writer.close()


def _extract(chunks: Iterator[Chunk], job: _Job) -> int:
    def verify_then_commit() -> None:
        job.verify()
        job.progress.commit()  # members are moved into place next

    with writing_into(job.target.path, "the archive's files"):
        return extract(
            chunks,
            job.target.path,
            limit=job.bound.limit,
            verify=verify_then_commit,
            max_members=job.options.archive_max_members,
        )


def _write_raw(chunks: Iterator[Chunk], fmt: DiskFormat, job: _Job) -> tuple[int, DiskFormat]:
    """Stream raw bytes into the destination in one pass."""
    target = job.target
    # Room for a fixed VHD's footer in a file; a device ends where it ends.
    bound = (
        job.bound
        if target.is_block
        else replace(job.bound, limit=job.bound.limit + VHD_FOOTER_SIZE)
    )
    needs = f" (the image is {job.raw_size} bytes)" if job.raw_size else ""
    with published(job.target, job.progress.commit, needs=needs) as path:
        writer = SparseWriter(
            path, block=target.is_block, bound=bound, preallocate=job.options.preallocate
        )
        try:
            size = writer.write_all(chunks)
            job.verify()
            disk_size = cut_fixed_vhd_footer(path, size, block=target.is_block)
            if disk_size is not None:
                fmt, size = DiskFormat.VPC, disk_size
            job.bound.check("size", size)
            if target.is_block:
                job.progress.commit()
                writer.commit()
            else:
                size = job.finish_file(path, size)
        finally:
            writer.close()
    return size, fmt


def _write_converted(
    chunks: Iterator[Chunk], fmt: DiskFormat, scratch_dir: str, stream: Source, job: _Job
) -> int:
    """Land the image in scratch space, check it, and let qemu-img convert it to raw."""
    target, capacity, progress = job.target, job.capacity, job.progress
    scratch_bound = None
    if capacity is not None:
        scratch_bound = _scratch_bound(capacity, f"a usable capacity of {capacity} bytes")
    needs = f" (the download alone is {stream.size} bytes)" if stream.size else ""
    with contextlib.ExitStack() as scratch_kept:
        with writing_into(
            scratch_dir,
            f"the {fmt} image's scratch copy",
            needs=needs,
            hint=" or set --scratch-dir",
        ):
            scratch = scratch_kept.enter_context(owned_file(scratch_dir, SCRATCH_PREFIX))
            writer = SparseWriter(scratch, block=False, bound=scratch_bound, scratch=True)
            try:
                _write_checking_header(writer, chunks, fmt, job, download_size=stream.size)
            finally:
                writer.close()
        job.verify()
        details = qemu.info(scratch, fmt, job.limits(qemu.Limits()))
        virtual_size = qemu.validate(details, fmt, scratch, adjust=job.limits)
        job.check_virtual_size(virtual_size, job.downloaded)
        needs = f" (the disk is {virtual_size} bytes, less its zeros)"
        with published(job.target, job.progress.commit, needs=needs) as path:
            progress.stage("convert", virtual_size)
            try:
                qemu.convert(
                    scratch,
                    fmt,
                    path,
                    existing=target.is_block,
                    direct=supports_direct(path),
                    on_progress=lambda percent: progress.set_done(
                        int(virtual_size * percent / 100)
                    ),
                    limits=job.limits(qemu.Limits.for_size(virtual_size)),
                )
                if target.is_block:
                    job.progress.commit()
                    sync(path)
                    return virtual_size
                return job.finish_file(path, virtual_size)
            except BaseException:
                if target.is_block:
                    wipe_head(path)
                raise


def _scratch_bound(disk_size: int, of_what: str) -> Bound:
    """What the image file of a disk of `disk_size` bytes may take in scratch space."""
    return Bound(
        disk_size + disk_size // 8 + SCRATCH_SLACK, f"what the image file of {of_what} can need"
    )


def _write_checking_header(
    writer: SparseWriter,
    chunks: Iterator[Chunk],
    fmt: DiskFormat,
    job: _Job,
    *,
    download_size: int | None,
) -> None:
    """Write the image to scratch, refusing it as soon as its header shows a virtual size
    the volume cannot hold: not after the whole file was downloaded."""
    fd = os.open(writer.path, os.O_RDONLY | os.O_NOFOLLOW)
    try:

        def read(offset: int, length: int) -> bytes | None:
            if offset + length > writer.size:
                return None
            return os.pread(fd, length, offset)

        checked = False
        for chunk in chunks:
            writer.write(chunk)
            if not checked:
                size = header_virtual_size(fmt, read)
                if size is not None:
                    # The expansion is judged against the whole download, where it is known.
                    job.check_virtual_size(size, download_size)
                    # Nor may the file itself be much larger than the disk it describes: that
                    # would fill the scratch directory (a node's /tmp) for nothing.
                    writer.tighten(_scratch_bound(size, f"a {fmt} image of {size} bytes"))
                    checked = True
        writer.finish()
    finally:
        os.close(fd)


def _create_blank(job: _Job) -> ImportResult:
    """An empty raw disk: a sparse file of the usable capacity, or a zeroed device (zeroed by
    the device itself where it can, not by writing every byte)."""
    target, capacity, progress = job.target, job.capacity, job.progress
    if capacity is None:
        raise FinalError("InvalidArgument", "a blank disk in a file needs --size")
    if not target.is_block:
        with published(job.target, job.progress.commit) as path:
            size = job.finish_file(path, 0)
    else:
        progress.stage("zero", capacity)
        fd = os.open(target.path, os.O_WRONLY)
        try:
            zero_range(fd, 0, capacity, block=True, write_only=job.options.preallocate)
            progress.commit()
            os.fdatasync(fd)
        finally:
            os.close(fd)
        progress.set_done(capacity)
        size = capacity
    seconds = round(time.monotonic() - job.started, 3)
    return ImportResult(BLANK, target.path, "none", "raw", 0, size, None, seconds, "stream")
