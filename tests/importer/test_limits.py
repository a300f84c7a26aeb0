"""Bounds that hold without `--size`: decompression bombs, images whose header already says they
cannot fit, decompression windows, and an overall deadline."""

from __future__ import annotations

import bz2
import contextlib
import io
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zstandard

from importer import ImportOptions, import_image, probe
from importer.decoders import HEAD_BYTES
from importer.errors import Failure
from importer.sources import HttpOptions
from tests.conftest import Images, MiB, run
from tests.support.faultserver import FaultServer

GiB = 1 << 30


def zero_bomb(path: Path, compress: object, size: int, frame: int = 64 * MiB) -> Path:
    """`size` bytes of zeros as concatenated streams of `frame` bytes each: a few KB."""
    one = compress(bytes(frame))  # type: ignore[operator]
    path.write_bytes(one * (size // frame))
    return path


def test_a_bzip2_bomb_is_refused_in_seconds_without_size(tmp_path: Path) -> None:
    bomb = zero_bomb(tmp_path / "bomb.bz2", lambda data: bz2.compress(data, 9), 16 * GiB)
    assert bomb.stat().st_size < 32 << 10  # the 12.5 KB stream, give or take
    dest = tmp_path / "disk.img"
    with pytest.raises(Failure) as caught:
        import_image(str(bomb), str(dest))
    failure = caught.value
    assert failure.reason == "ExpansionLimit"
    assert "--size" in failure.message and "--max-expansion 0" in failure.message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.bz2"]


def zstd_bomb(tmp_path: Path, size: int) -> Path:
    return zero_bomb(tmp_path / "bomb.zst", zstandard.ZstdCompressor(level=3).compress, size)


def test_the_expansion_ceiling_is_lifted_by_size_or_max_expansion(tmp_path: Path) -> None:
    bomb = zstd_bomb(tmp_path, 2 * GiB)
    with pytest.raises(Failure) as caught:
        import_image(str(bomb), str(tmp_path / "refused.img"))
    assert caught.value.reason == "ExpansionLimit"
    for options in (ImportOptions(max_expansion=0), ImportOptions(size=3 * GiB)):
        dest = tmp_path / "disk.img"
        result = import_image(str(bomb), str(dest), options=options)
        assert result.size >= 2 * GiB
        assert os.stat(dest).st_blocks == 0  # all holes
        dest.unlink()


def test_a_qcow2_bomb_is_refused_by_its_virtual_size(tmp_path: Path) -> None:
    image = tmp_path / "huge.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", image, "4T")
    with pytest.raises(Failure) as caught:
        import_image(str(image), str(tmp_path / "disk.img"))
    assert caught.value.reason in ("ExpansionLimit", "ImageTooLarge")
    assert not (tmp_path / "disk.img").exists()


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vdi", "vpc", "vhdx"])
def test_an_image_too_large_is_refused_from_its_header(fmt: str, tmp_path: Path) -> None:
    """The rest of the file never arrives: the header alone must be enough to refuse it,
    whether a decoder streams the format (qcow2, vmdk, vdi, vpc) or it goes through scratch
    space (vhdx). A decoder parses the header from the image's first 2 MiB (HEAD_BYTES: a
    qcow2 header's extensions may fill a 2 MiB cluster), so the image is made larger than what
    arrives, and what arrives larger than that."""
    raw, image = tmp_path / "big.raw", tmp_path / f"big.{fmt}"
    with open(raw, "wb") as f:  # 3 GiB, of which the first 16 MiB are data
        f.write(os.urandom(16 * MiB))
        f.truncate(3 * GiB)
    run("qemu-img", "convert", "-f", "raw", "-O", fmt, raw, image)
    data = image.read_bytes()
    assert len(data) > 8 * MiB > HEAD_BYTES
    fifo = tmp_path / "slow"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            import_image(str(fifo), str(tmp_path / "disk.img"), options=ImportOptions(size=GiB))
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=attempt)
    worker.start()
    writer = open(fifo, "wb", buffering=0)  # noqa: SIM115 - closed below, after the verdict
    try:
        # Its first 8 MiB: the stream has not ended.
        writer.write(data[: 8 * MiB])
        worker.join(timeout=60)
        assert not worker.is_alive(), "the import waited for the rest of the image"
    finally:
        with contextlib.suppress(BrokenPipeError):  # the import stopped reading: the point
            writer.close()
        worker.join(timeout=60)
    [failure] = outcome
    assert isinstance(failure, Failure)
    assert failure.reason == "ImageTooLarge"
    assert "virtual size" in failure.message
    # As the header says it (a VHD's geometry rounds 3 GiB up), against the usable capacity.
    told = re.search(r"virtual size (\d+) bytes", failure.message)
    assert told is not None and 3 * GiB <= int(told[1]) < 3 * GiB + MiB, failure.message
    assert "usable capacity" in failure.message
    assert {p.name for p in tmp_path.iterdir()} == {"big.raw", f"big.{fmt}", "slow"}


def test_an_xz_window_above_the_limit_says_how_to_raise_it(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(os.urandom(MiB))
    run("xz", "-k", "--lzma2=dict=192MiB", raw)
    with pytest.raises(Failure) as caught:
        import_image(str(raw) + ".xz", str(tmp_path / "disk.img"))
    assert caught.value.reason == "ResourceLimit"
    assert "--decompression-memory" in caught.value.message
    options = ImportOptions(decompression_memory=256 * MiB)
    import_image(str(raw) + ".xz", str(tmp_path / "disk.img"), options=options)
    assert (tmp_path / "disk.img").read_bytes() == raw.read_bytes()


def test_a_zstd_window_above_the_limit_says_how_to_raise_it(tmp_path: Path) -> None:
    data = os.urandom(MiB)
    params = zstandard.ZstdCompressionParameters.from_level(
        3, window_log=28, write_content_size=False
    )
    out = io.BytesIO()
    with zstandard.ZstdCompressor(compression_params=params).stream_writer(
        out, closefd=False
    ) as writer:
        writer.write(data)
    source = tmp_path / "disk.raw.zst"
    source.write_bytes(out.getvalue())
    with pytest.raises(Failure) as caught:
        import_image(str(source), str(tmp_path / "disk.img"))
    assert caught.value.reason == "ResourceLimit"
    assert "window" in caught.value.message and "--decompression-memory" in caught.value.message


def test_the_deadline_stops_a_stalled_import(faults: FaultServer, tmp_path: Path) -> None:
    url = faults.url("deadline", "disk.raw", stall_after=MiB, stall=60)
    options = ImportOptions(deadline=2, http=HttpOptions(stall_timeout=60, retries=0))
    started = time.monotonic()
    with pytest.raises(Failure) as caught:
        import_image(url, str(tmp_path / "disk.img"), options=options)
    assert caught.value.reason == "DeadlineExceeded"
    assert caught.value.final
    assert time.monotonic() - started < 30  # not the 60 s stall
    assert list(tmp_path.iterdir()) == []


def test_cli_options_for_the_bounds(images: Images, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "diskflow", "import", str(images.path("raw", "zst")),
         str(tmp_path / "disk.img"), "--max-expansion", "0", "--decompression-memory", "64Mi",
         "--archive-max-members", "10", "--deadline", "600", "--progress", "none"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "disk.img").read_bytes() == images.raw.read_bytes()


def padded(image: Path, fmt: str, *options: str) -> Path:
    """A 16 MiB disk of `fmt`, then 200 MiB of random bytes after the image."""
    run("qemu-img", "create", "-q", "-f", fmt, *options, image, "16M")
    with open(image, "ab") as f:
        for _ in range(200):
            f.write(os.urandom(MiB))
    return image


@pytest.mark.parametrize("fmt", ["vhdx", "qcow2"])
def test_an_image_file_far_larger_than_its_disk_stops_filling_scratch(
    fmt: str, tmp_path: Path
) -> None:
    """Without --size nothing bounded the scratch copy: a header saying 16 MiB, then hundreds
    of MB more, went to scratch (a node's /tmp) in full. vhdx goes through scratch space; so
    does a qcow2 with extended L2 entries (no decoder takes it)."""
    options = ["-o", "extended_l2=on"] if fmt == "qcow2" else []
    image = padded(tmp_path / f"padded.{fmt}", fmt, *options)
    assert probe(str(image)).needs_scratch
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with pytest.raises(Failure) as caught:
        import_image(
            str(image), str(tmp_path / "disk.img"), options=ImportOptions(scratch_dir=str(scratch))
        )
    assert caught.value.reason == "ImageTooLarge"
    assert "16777216 bytes" in caught.value.message
    assert list(scratch.iterdir()) == []
    assert not (tmp_path / "disk.img").exists()


def test_a_streamed_image_file_far_larger_than_its_disk_takes_no_scratch(
    tmp_path: Path,
) -> None:
    """What a decoder streams lands nothing in scratch space: the bytes after the image's
    last cluster are read and dropped, never written anywhere, and the disk is its 16 MiB."""
    image = padded(tmp_path / "padded.qcow2", "qcow2")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    dest = tmp_path / "disk.img"
    result = import_image(str(image), str(dest), options=ImportOptions(scratch_dir=str(scratch)))
    assert (result.path, result.fallback) == ("stream", None)
    assert result.size == 16 * MiB
    assert dest.stat().st_size == 16 * MiB and dest.stat().st_blocks == 0
    assert list(scratch.iterdir()) == []
