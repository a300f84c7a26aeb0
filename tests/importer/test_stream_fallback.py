"""An image a decoder cannot stream goes through scratch space and says why: told from its
header (on the same download), or from its layout once part of it was read (from a new one);
without scratch space that is NeedsScratch. Data before its tables is held, then spilled."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from importer import ImportOptions, import_image, probe
from importer.errors import Failure
from tests.conftest import Images, MiB, run
from tests.support.corpus import qcow2_repack


@pytest.fixture
def tables_last(images: Images, tmp_path: Path) -> Path:
    """The test qcow2 with its L2 tables after all its data (4 MiB)."""
    image = tmp_path / "tables-last.qcow2"
    image.write_bytes(qcow2_repack(images.path("qcow2").read_bytes(), "l2-after-data", seed=1))
    run("qemu-img", "check", "-q", image)
    return image


def same_disk(dest: Path, images: Images) -> None:
    subprocess.run(["cmp", dest, images.raw], check=True)


def test_data_before_its_tables_is_spilled_and_still_streams(
    tables_last: Path, images: Images, tmp_path: Path
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    dest = tmp_path / "disk.img"
    options = ImportOptions(scratch_dir=str(scratch), spill_limit=64 * MiB)
    result = import_image(str(tables_last), str(dest), options=options)
    assert (result.path, result.fallback) == ("stream", None)
    assert result.bytes_downloaded == tables_last.stat().st_size
    same_disk(dest, images)
    assert list(scratch.iterdir()) == [], "the spill file is removed"


def test_more_than_the_spill_limit_starts_again_through_scratch_space(
    tables_last: Path, images: Images, tmp_path: Path
) -> None:
    dest = tmp_path / "disk.img"
    options = ImportOptions(scratch_dir=str(tmp_path), spill_limit=MiB)
    result = import_image(str(tables_last), str(dest), options=options)
    assert result.path == "scratch"
    assert result.fallback is not None and "before the tables that map it" in result.fallback
    # Read again: what the decoder consumed could not be handed to qemu-img.
    size = tables_last.stat().st_size
    assert size + MiB < result.bytes_downloaded <= 2 * size
    same_disk(dest, images)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.img", "tables-last.qcow2"]


def test_without_scratch_space_a_fallback_is_needs_scratch(
    tables_last: Path, images: Images, tmp_path: Path
) -> None:
    dest = tmp_path / "disk.img"
    # Held in memory, no spill file needed: it streams.
    result = import_image(str(tables_last), str(dest), options=ImportOptions(scratch=False))
    assert result.path == "stream"
    same_disk(dest, images)
    with pytest.raises(Failure) as caught:
        options = ImportOptions(scratch=False, spill_limit=MiB)
        import_image(str(tables_last), str(tmp_path / "other.img"), options=options)
    assert caught.value.reason == "NeedsScratch" and not caught.value.final
    assert "before the tables that map it" in caught.value.message
    assert not (tmp_path / "other.img").exists()


def test_a_header_the_decoder_does_not_take_goes_through_scratch_from_the_start(
    images: Images, tmp_path: Path
) -> None:
    image = tmp_path / "subclusters.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", "-o", "extended_l2=on", images.raw, image)
    assert probe(str(image)).needs_scratch
    assert not probe(str(images.path("qcow2"))).needs_scratch
    dest = tmp_path / "disk.img"
    result = import_image(str(image), str(dest), options=ImportOptions(scratch_dir=str(tmp_path)))
    assert result.path == "scratch" and "extended L2" in (result.fallback or "")
    assert result.bytes_downloaded == image.stat().st_size  # read once
    same_disk(dest, images)
    with pytest.raises(Failure) as caught:
        import_image(str(image), str(tmp_path / "other.img"), options=ImportOptions(scratch=False))
    assert caught.value.reason == "NeedsScratch"
