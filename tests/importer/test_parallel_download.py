"""Parallel ranged downloads: one stream first, parts over several connections only when that
stream is slow; parts handed on in order, each pinned to the version first read and retried
on its own."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest

from importer import HttpOptions, ImportOptions, import_image
from importer.errors import Failure
from importer.sources import HttpSource
from importer.sources.parallel import PART_SIZE, PROBE_BYTES, ParallelSource
from tests.conftest import Images, MiB
from tests.importer.test_http_source import drain_within
from tests.importer.test_import_formats import assert_same_content
from tests.support.faultserver import FaultServer

FAST = HttpOptions(retries=3, backoff=0.01, stall_timeout=2.0)
SLOW = 16 * MiB  # bytes/s per connection: well under the fan-out threshold


def fetch(url: str, tmp_path: Path, connections: int = 4) -> Path:
    dest = tmp_path / "disk.img"
    options = ImportOptions(http=FAST, connections=connections, scratch_dir=str(tmp_path))
    import_image(url, str(dest), options=options)
    return dest


def test_a_fast_stream_stays_one_stream(faults: FaultServer, images: Images) -> None:
    # "Fast" is a threshold no loaded machine misses here (1 byte/s): what is tested is that
    # a stream found fast enough is read to its end as one stream, with no part requested.
    token = uuid.uuid4().hex
    source = ParallelSource(
        HttpSource(faults.url(token, "disk.raw"), FAST), connections=4, fast_enough=1
    )
    try:
        data = b"".join(iter(lambda: bytes(source.read(MiB)), b""))
    finally:
        source.close()
    assert data == images.raw.read_bytes()
    assert len(faults.requests[token]) == 1


def test_a_slow_stream_fans_out_into_pinned_parts(
    faults: FaultServer, images: Images, tmp_path: Path
) -> None:
    token = uuid.uuid4().hex
    assert_same_content(fetch(faults.url(token, "disk.raw", rate=SLOW), tmp_path), images.raw)
    sent = faults.requests[token]
    assert "Range" not in sent[0]["headers"]  # the probing stream
    size = images.raw.stat().st_size
    expected = {
        f"bytes={start}-{min(size, start + PART_SIZE) - 1}"
        for start in range(PROBE_BYTES, size, PART_SIZE)
    }
    assert {r["headers"]["Range"] for r in sent[1:]} == expected
    assert len({r["headers"]["If-Range"] for r in sent[1:]}) == 1


def parallel(url: str) -> bytes:
    source = ParallelSource(HttpSource(url, FAST), connections=4, probe_bytes=0)
    try:
        return b"".join(iter(lambda: bytes(source.read(MiB)), b""))
    finally:
        source.close()


def test_failed_parts_are_fetched_again(faults: FaultServer, images: Images) -> None:
    token = uuid.uuid4().hex
    # The first three responses drop half-way: the opening stream and two parts.
    assert (
        parallel(faults.url(token, "disk.raw", drop_after=1_000_000, times=3))
        == images.raw.read_bytes()
    )
    parts = -(-images.raw.stat().st_size // PART_SIZE)
    assert len(faults.requests[token]) == 1 + parts + 2


def test_object_replaced_between_parts(faults: FaultServer) -> None:
    with pytest.raises(Failure) as caught:
        parallel(faults.url(uuid.uuid4().hex, "disk.raw", etag="changing"))
    assert caught.value.reason == "SourceChanged"


def test_without_range_support_one_stream(
    faults: FaultServer, images: Images, tmp_path: Path
) -> None:
    token = uuid.uuid4().hex
    assert_same_content(
        fetch(faults.url(token, "disk.raw", ranges=0, rate=SLOW), tmp_path), images.raw
    )
    assert len(faults.requests[token]) == 1


def test_one_connection_is_one_stream(faults: FaultServer, images: Images, tmp_path: Path) -> None:
    token = uuid.uuid4().hex
    assert_same_content(
        fetch(faults.url(token, "disk.raw", rate=SLOW), tmp_path, connections=1), images.raw
    )
    assert len(faults.requests[token]) == 1


@pytest.mark.parametrize("name", ["disk.raw", "disk.vhdx"])
def test_nginx_results_are_the_same_either_way(
    name: str, nginx: str, images: Images, tmp_path: Path
) -> None:
    fmt = name.split(".")[1]
    assert_same_content(fetch(f"{nginx}/{name}", tmp_path), images.reference(fmt, tmp_path))


def test_closing_while_the_reader_waits_for_a_part(faults: FaultServer, images: Images) -> None:
    # Parts trickle in at 64 KiB/s: the reader is left waiting, and close() must free it.
    import threading

    url = faults.url(uuid.uuid4().hex, "disk.raw", rate=64 << 10)
    source = ParallelSource(HttpSource(url, FAST), connections=2, probe_bytes=0)
    failure: list[BaseException] = []

    def read() -> None:
        try:
            source.read(MiB)
        except BaseException as exc:
            failure.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    source.close()
    reader.join(timeout=10)
    assert not reader.is_alive()
    assert failure and isinstance(failure[0], Failure)


def test_parts_from_a_cache_that_answers_from_byte_zero(
    faults: FaultServer, tmp_path: Path
) -> None:
    # The probe is read as one stream; every part then comes back as bytes 0-...
    url = faults.url(uuid.uuid4().hex, "disk.raw", rate=SLOW, from_zero=1)
    with pytest.raises(Failure) as caught:
        fetch(url, tmp_path)
    assert caught.value.reason == "BadContentRange", caught.value.message
    # Whichever part failed first: every one was answered with the first bytes.
    asked = re.search(r"for bytes (\d+)-(\d+) with Content-Range 'bytes 0-", caught.value.message)
    assert asked, caught.value.message
    start, end = map(int, asked.groups())
    assert start >= PROBE_BYTES and (start - PROBE_BYTES) % PART_SIZE == 0
    assert end == start + PART_SIZE - 1
    assert list(tmp_path.iterdir()) == []


def test_trickling_parts_fail_as_too_slow(faults: FaultServer) -> None:
    token = uuid.uuid4().hex
    url = faults.url(token, "disk.raw", rate=1)  # a byte a second: under any stall timeout
    http = HttpOptions(
        retries=1, backoff=0.01, stall_timeout=5.0, min_rate=4096, min_rate_window=1.0
    )
    error = drain_within(
        lambda: ParallelSource(HttpSource(url, http), connections=2, probe_bytes=0), seconds=30
    )
    assert isinstance(error, Failure) and error.reason == "TooSlow", error
    # The opening stream, then at most two attempts at each of the two parts in flight.
    assert len(faults.requests[token]) <= 1 + 2 * 2
