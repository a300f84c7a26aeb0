"""`blank:` makes an empty raw disk, like CDI's blank DataVolume source."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from importer import ImportOptions, import_image
from importer.capacity import usable_size
from importer.errors import Failure
from tests.conftest import DEVICE_SIZE, MiB, allocated, read_device


def test_blank_file_is_sparse_at_the_usable_capacity(tmp_path: Path) -> None:
    dest = tmp_path / "disk.img"
    result = import_image("blank:", str(dest), options=ImportOptions(size=10 << 30))
    usable = usable_size(10 << 30)
    assert result.size == usable == dest.stat().st_size
    assert allocated(dest) < MiB
    assert [p.name for p in tmp_path.iterdir()] == ["disk.img"]


def test_blank_file_preallocated(tmp_path: Path) -> None:
    dest = tmp_path / "disk.img"
    options = ImportOptions(size=64 * MiB, filesystem_overhead=0, preallocate=True)
    import_image("blank:", str(dest), options=options)
    assert allocated(dest) >= 64 * MiB
    assert dest.read_bytes() == bytes(64 * MiB)


def test_blank_file_needs_a_size(tmp_path: Path) -> None:
    with pytest.raises(Failure) as caught:
        import_image("blank:", str(tmp_path / "disk.img"))
    assert caught.value.reason == "InvalidArgument" and "--size" in caught.value.message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("preallocate", [False, True])
def test_blank_device_is_zeroed(device: str, preallocate: bool) -> None:
    result = import_image("blank:", device, options=ImportOptions(preallocate=preallocate))
    assert result.size == DEVICE_SIZE
    assert read_device(device, DEVICE_SIZE) == bytes(DEVICE_SIZE)


def test_blank_from_the_cli(tmp_path: Path) -> None:
    dest = tmp_path / "disk.img"
    done = subprocess.run(
        [sys.executable, "-m", "diskflow", "import", "blank:", str(dest), "--size", "1Gi",
         "--progress", "none"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert dest.stat().st_size == 1 << 30  # a plain file: no filesystem overhead
