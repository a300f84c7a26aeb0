"""Parallel ranged downloads: parts fetched over several connections are handed on in order,
each pinned to the version first read, each retried on its own."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from importer import HttpOptions, ImportOptions, import_image
from importer.errors import ImportFailure
from importer.sources.parallel import PART_SIZE
from tests.conftest import Images
from tests.faultserver import FaultServer
from tests.test_import_formats import assert_same_content

FAST = HttpOptions(retries=3, backoff=0.01, stall_timeout=2.0)


def fetch(url: str, tmp_path: Path, connections: int = 4) -> Path:
    dest = tmp_path / "disk.img"
    options = ImportOptions(http=FAST, connections=connections, scratch_dir=str(tmp_path))
    import_image(url, str(dest), options=options)
    return dest


@pytest.mark.parametrize("name", ["disk.raw", "disk.vhdx"])
def test_parallel_download_from_nginx(
    name: str, nginx: str, images: Images, tmp_path: Path
) -> None:
    fmt = name.split(".")[1]
    assert_same_content(fetch(f"{nginx}/{name}", tmp_path), images.reference(fmt, tmp_path))


def test_every_part_is_a_pinned_ranged_get(
    faults: FaultServer, images: Images, tmp_path: Path
) -> None:
    token = uuid.uuid4().hex
    assert_same_content(fetch(faults.url(token, "disk.raw"), tmp_path), images.raw)
    sent = [r["headers"] for r in faults.requests[token]]
    size = images.raw.stat().st_size
    expected = {
        f"bytes={start}-{min(size, start + PART_SIZE) - 1}" for start in range(0, size, PART_SIZE)
    }
    assert {h["Range"] for h in sent[1:]} == expected
    assert all(h["If-Range"] == sent[1]["If-Range"] for h in sent[1:])


def test_failed_parts_are_fetched_again(
    faults: FaultServer, images: Images, tmp_path: Path
) -> None:
    token = uuid.uuid4().hex
    # The first three responses drop half-way: the opening stream and two parts.
    assert_same_content(
        fetch(faults.url(token, "disk.raw", drop_after=1_000_000, times=3), tmp_path), images.raw
    )
    parts = -(-images.raw.stat().st_size // PART_SIZE)
    assert len(faults.requests[token]) == 1 + parts + 2


def test_object_replaced_between_parts(faults: FaultServer, tmp_path: Path) -> None:
    with pytest.raises(ImportFailure) as caught:
        fetch(faults.url(uuid.uuid4().hex, "disk.raw", etag="changing"), tmp_path)
    assert caught.value.reason == "SourceChanged"


def test_without_range_support_one_stream(
    faults: FaultServer, images: Images, tmp_path: Path
) -> None:
    token = uuid.uuid4().hex
    assert_same_content(fetch(faults.url(token, "disk.raw", ranges=0), tmp_path), images.raw)
    assert len(faults.requests[token]) == 1


def test_one_connection_is_one_stream(faults: FaultServer, images: Images, tmp_path: Path) -> None:
    token = uuid.uuid4().hex
    assert_same_content(fetch(faults.url(token, "disk.raw"), tmp_path, connections=1), images.raw)
    assert len(faults.requests[token]) == 1
