"""`probe()`: what an import would find, told before importing, over real HTTP (nginx, and the
fault server where a transfer must stop), by the same code as the import."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import tarfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from importer import (
    ContentType,
    HttpOptions,
    ImportOptions,
    Probe,
    Progress,
    S3Options,
    import_image,
    probe,
)
from importer.errors import Failure
from importer.streams import FETCH_CHUNK
from tests.conftest import COMPRESSORS, FORMATS, Images, MiB, run, running_nginx
from tests.support.faultserver import HTML, FaultServer
from tests.support.stores import BUCKET, s3_client

pytest_plugins = ["tests.support.stores"]

DISK = 40 * MiB  # the virtual size of every test image
COMPRESSIONS = {None: "none", "gz": "gzip", "xz": "xz", "zst": "zstd", "bz2": "bzip2"}


@pytest.fixture(scope="module")
def served(images: Images, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """nginx serving the test images and a few files of other kinds: an ISO made by xorriso,
    a gzipped tar, and an HTML page served as application/octet-stream, so that only its
    bytes tell what it is."""
    root = tmp_path_factory.mktemp("probe-root")
    for image in images.dir.iterdir():
        (root / image.name).symlink_to(image)
    content = tmp_path_factory.mktemp("iso-content")
    (content / "README").write_text("a CD\n")
    run("xorriso", "-as", "mkisofs", "-quiet", "-o", root / "cd.iso", content)
    with tarfile.open(root / "files.tar.gz", "w:gz") as tar:
        data = b"hello\n" * 1000
        member = tarfile.TarInfo("hello.txt")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    (root / "page.img").write_bytes(HTML)
    # A qcow2 no decoder takes (extended L2 entries): it goes through scratch space.
    run("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", "-o", "extended_l2=on",
        images.raw, root / "subclusters.qcow2")  # fmt: skip
    prefix = tmp_path_factory.mktemp("probe-nginx")
    with running_nginx(prefix, "access_log off;", f"root {root};") as base:
        yield base


def test_compressed_raw_streams_with_no_scratch(served: str, images: Images) -> None:
    found = probe(f"{served}/disk.raw.xz")
    assert found == Probe(
        source=f"{served}/disk.raw.xz",
        compression="xz",
        format="raw",
        download_size=images.path("raw", "xz").stat().st_size,
        virtual_size=None,  # an xz stream says its size only at its end
        needs_scratch=False,
    )


def test_uncompressed_raw_is_as_large_as_its_download(served: str) -> None:
    found = probe(f"{served}/disk.raw")
    assert (found.format, found.needs_scratch) == ("raw", False)
    assert found.virtual_size == found.download_size == DISK


@pytest.mark.parametrize(
    ("fmt", "compression"),
    [("qcow2", None), ("qcow2", "gz"), ("vmdk", None), ("vdi", "zst"), ("vpc", "bz2")],
)
def test_decoded_formats_stream_and_tell_their_size(
    fmt: str, compression: str | None, served: str, images: Images
) -> None:
    """A decoder streams these formats: no scratch space, and the size from the header."""
    image = images.path(fmt, compression)
    found = probe(f"{served}/{image.name}")
    assert (found.format, found.needs_scratch) == (fmt, False)
    assert found.compression == COMPRESSIONS[compression]
    assert found.download_size == image.stat().st_size
    # As qemu-img reads it (a VHD's geometry rounds its 40 MiB up).
    info = json.loads(run("qemu-img", "info", "--output", "json", "-f", fmt, images.path(fmt)))
    assert found.virtual_size == info["virtual-size"]


def test_a_qcow2_no_decoder_takes_needs_scratch_and_tells_its_size(served: str) -> None:
    found = probe(f"{served}/subclusters.qcow2")
    assert (found.format, found.compression, found.needs_scratch) == ("qcow2", "none", True)
    assert found.virtual_size == DISK


def test_vhdx_size_lies_past_what_a_probe_reads(served: str) -> None:
    found = probe(f"{served}/disk.vhdx")  # its metadata region starts past the first MiB
    assert (found.format, found.needs_scratch, found.virtual_size) == ("vhdx", True, None)


def test_iso_streams_with_no_scratch(served: str) -> None:
    found = probe(f"{served}/cd.iso")
    assert (found.format, found.compression, found.needs_scratch) == ("iso", "none", False)
    assert found.virtual_size == found.download_size


def test_archive_is_a_tar(served: str) -> None:
    options = ImportOptions(content_type=ContentType.ARCHIVE)
    found = probe(f"{served}/files.tar.gz", options)
    assert (found.format, found.compression, found.needs_scratch) == ("tar", "gzip", False)
    with pytest.raises(Failure) as caught:
        probe(f"{served}/disk.raw.gz", options)  # a disk is no archive
    assert caught.value.reason == "InvalidArchive"


@pytest.mark.parametrize(
    ("name", "reason"),
    [("missing.img", "NotFound"), ("page.img", "HtmlInsteadOfImage")],
)
def test_probe_fails_as_the_import_would(
    name: str, reason: str, served: str, tmp_path: Path
) -> None:
    with pytest.raises(Failure) as probed:
        probe(f"{served}/{name}")
    with pytest.raises(Failure) as imported:
        import_image(f"{served}/{name}", str(tmp_path / "disk.img"))
    assert probed.value.reason == imported.value.reason == reason
    assert probed.value.message == imported.value.message


def test_blank_needs_nothing_and_is_no_archive() -> None:
    assert probe("blank:") == Probe("blank:", "none", "raw", 0, None, needs_scratch=False)
    with pytest.raises(Failure) as caught:
        probe("blank:", ImportOptions(content_type=ContentType.ARCHIVE))
    assert caught.value.reason == "InvalidArgument"


def test_unsupported_format_is_refused(tmp_path: Path) -> None:
    qed = tmp_path / "disk.qed"
    run("qemu-img", "create", "-q", "-f", "qed", qed, "1M")
    with pytest.raises(Failure) as caught:
        probe(str(qed))
    assert caught.value.reason == "UnsupportedFormat"


@pytest.mark.parametrize(
    ("name", "fmt"), [("disk.raw", "raw"), ("disk.qcow2.gz", "qcow2"), ("disk.vmdk.xz", "vmdk")]
)
def test_probe_answers_from_the_first_fetch(name: str, fmt: str, faults: FaultServer) -> None:
    """The rest of the image does not come (the server stalls after the first fetch for longer
    than the stall timeout): the probe needs none of it."""
    url = faults.url(uuid.uuid4().hex, name, stall_after=FETCH_CHUNK, stall=10)
    found = probe(url, ImportOptions(http=HttpOptions(stall_timeout=5, retries=0)))
    assert (found.format, found.virtual_size) == (fmt, DISK)


def test_probe_closes_everything(served: str, images: Images) -> None:
    def held() -> tuple[set[str], set[threading.Thread]]:
        # Sets, not counts: the fault server's handlers in this process come and go meanwhile.
        return set(os.listdir("/proc/self/fd")), set(threading.enumerate())

    fds, threads = held()
    for source in (f"{served}/disk.qcow2.xz", f"{served}/missing.img", str(images.raw)):
        with contextlib.suppress(Failure):
            probe(source)
    fds_after, threads_after = held()
    assert fds_after <= fds and threads_after <= threads


def test_probe_sends_the_import_s_headers_and_auth(faults: FaultServer) -> None:
    token = uuid.uuid4().hex
    http = HttpOptions(
        headers=(("X-Trace", "1"),), secret_headers=(("X-Api-Key", "k3y"),), auth=("u", "p")
    )
    assert probe(faults.url(token, "disk.vdi.gz"), ImportOptions(http=http)).format == "vdi"
    (sent,) = [request["headers"] for request in faults.requests[token]]
    assert (sent["X-Trace"], sent["X-Api-Key"]) == ("1", "k3y")
    assert sent["Authorization"] == "Basic " + base64.b64encode(b"u:p").decode()


def test_probe_of_an_s3_object(moto_s3: str, images: Images) -> None:
    image = images.path("qcow2", "zst")
    s3_client(moto_s3).upload_file(str(image), BUCKET, "probe/disk.qcow2.zst")
    options = ImportOptions(s3=S3Options(endpoint=moto_s3))
    found = probe(f"s3://{BUCKET}/probe/disk.qcow2.zst", options)
    assert found == Probe(
        source=f"s3://{BUCKET}/probe/disk.qcow2.zst",
        compression="zstd",
        format="qcow2",
        download_size=image.stat().st_size,
        virtual_size=DISK,
        needs_scratch=False,  # a decoder streams it
    )


def fixture_images() -> Iterator[tuple[str, str | None]]:
    for fmt in FORMATS:
        for compression in (None, *COMPRESSORS):
            yield fmt, compression


@pytest.mark.parametrize(("fmt", "compression"), list(fixture_images()))
def test_import_and_probe_agree(
    fmt: str, compression: str | None, served: str, images: Images, tmp_path: Path
) -> None:
    """Each test image, probed and imported: the same compression and format, and scratch
    space exactly where the import used qemu-img (its result's path and stages say): vhdx
    only; every other format streams."""
    url = f"{served}/{images.path(fmt, compression).name}"
    found = probe(url)
    progress = Progress()
    result = import_image(url, str(tmp_path / "disk.img"), progress=progress)
    assert found.source == result.source and found.compression == result.compression
    assert found.compression == COMPRESSIONS[compression]
    # A fixed VHD streams as raw; the import names it by the footer it cut off at the end.
    assert found.format == ("raw" if fmt == "vpc-fixed" else result.format)
    stages = [snapshot.stage for snapshot in progress.snapshots()]
    assert found.needs_scratch == ("convert" in stages) == (fmt == "vhdx")
    assert result.path == ("scratch" if found.needs_scratch else "stream")
    assert (result.fallback is not None and "vhdx" in result.fallback) == (fmt == "vhdx")


def test_import_and_probe_agree_on_a_qcow2_no_decoder_takes(served: str, tmp_path: Path) -> None:
    url = f"{served}/subclusters.qcow2"
    found = probe(url)
    progress = Progress()
    result = import_image(url, str(tmp_path / "disk.img"), progress=progress)
    assert (found.format, found.needs_scratch) == (result.format, True) == ("qcow2", True)
    assert "convert" in [snapshot.stage for snapshot in progress.snapshots()]
    assert result.path == "scratch" and "extended L2" in (result.fallback or "")
