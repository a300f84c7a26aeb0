"""The destination of an import: claimed for the whole run (a second import is refused), written
under a name of its own, swept of what killed imports left, and failures to write named."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import typer

from importer import Checksum, ContentType, ImportOptions, Progress, import_image
from importer.errors import Failure
from tests.conftest import Images, MiB, read_device, run
from tests.support.events import events

SWEEP_AGE = 3600  # seconds: files this old are past the sweep's grace period


@contextmanager
def importing_from_fifo(
    fifo: Path, dest: Path | str, options: ImportOptions | None = None
) -> Iterator[tuple[object, Future]]:
    """An import reading from the FIFO `fifo`, held mid-transfer: yields (the FIFO's writer,
    the import's future). By the time the writer is open, the import holds its destination."""
    os.mkfifo(fifo)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(import_image, str(fifo), str(dest), options=options)
        with open(fifo, "wb", buffering=0) as writer:
            yield writer, future


def test_a_second_import_into_the_same_file_is_refused(images: Images, tmp_path: Path) -> None:
    dest = tmp_path / "disk.img"
    data = images.raw.read_bytes()
    with importing_from_fifo(tmp_path / "slow.raw", dest) as (writer, first):
        writer.write(data[: 4 * MiB])
        with pytest.raises(Failure) as caught:
            import_image(str(images.raw), str(dest))
        assert caught.value.reason == "DestinationBusy"
        assert str(dest) in caught.value.message
        writer.write(data[4 * MiB :])
    first.result(timeout=60)
    assert dest.read_bytes() == data
    # Neither the lock nor a partial file is left beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.img", "slow.raw"]


def test_a_second_import_onto_the_same_device_is_refused(
    images: Images, device: str, tmp_path: Path
) -> None:
    data = images.raw.read_bytes()
    with importing_from_fifo(tmp_path / "slow.raw", device) as (writer, first):
        writer.write(data[: 4 * MiB])
        with pytest.raises(Failure) as caught:
            import_image(str(images.raw), device)
        assert caught.value.reason == "DestinationBusy"
        writer.write(data[4 * MiB :])
    first.result(timeout=60)
    assert read_device(device, len(data)) == data


def test_a_second_extraction_into_the_same_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "content").mkdir()
    (tmp_path / "content" / "file").write_bytes(os.urandom(3 * MiB))
    tar = tmp_path / "a.tar"
    run("tar", "-C", tmp_path / "content", "-cf", tar, "file")
    volume = tmp_path / "volume"
    volume.mkdir()
    archive = ImportOptions(content_type=ContentType.ARCHIVE)
    data = tar.read_bytes()
    with importing_from_fifo(tmp_path / "slow.tar", volume, archive) as (writer, first):
        writer.write(data[: 2 * MiB])
        with pytest.raises(Failure) as caught:
            import_image(str(tar), str(volume), options=archive)
        assert caught.value.reason == "DestinationBusy"
        writer.write(data[2 * MiB :])
    first.result(timeout=60)
    assert [p.name for p in volume.iterdir()] == ["file"]


def test_a_planted_symlink_beside_the_destination_is_never_written_through(
    images: Images, tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / ".disk.img.partial").symlink_to(victim)  # the fixed name older versions used
    import_image(str(images.raw), str(tmp_path / "disk.img"))
    assert victim.read_bytes() == b"precious"
    assert (tmp_path / "disk.img").read_bytes() == images.raw.read_bytes()


def test_a_symlink_at_the_lock_name_is_refused(images: Images, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / ".disk.img.diskflow-lock").symlink_to(victim)
    with pytest.raises(Failure) as caught:
        import_image(str(images.raw), str(tmp_path / "disk.img"))
    assert caught.value.reason == "InvalidDestination"
    assert "symbolic link" in caught.value.message
    assert victim.read_bytes() == b"precious"


def test_a_destination_with_a_name_near_the_longest_allowed_imports(
    images: Images, tmp_path: Path
) -> None:
    dest = tmp_path / ("d" * 250)  # no room left for ".NAME.diskflow-lock" in 255 bytes
    import_image(str(images.raw), str(dest))
    assert dest.read_bytes() == images.raw.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [dest.name]


def test_a_destination_name_too_long_is_named(images: Images, tmp_path: Path) -> None:
    with pytest.raises(Failure) as caught:
        import_image(str(images.raw), str(tmp_path / ("d" * 300)))
    assert caught.value.reason == "InvalidDestination"
    assert "too long" in caught.value.message


def diskflow_import(*args: str | Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "diskflow", "import", *map(str, args), "--progress", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(predicate: object, what: str, deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def age(path: Path) -> None:
    os.utime(path, (time.time() - SWEEP_AGE, time.time() - SWEEP_AGE))


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "vhdx"])
def test_files_of_a_killed_import_are_swept_by_the_next(
    fmt: str, images: Images, tmp_path: Path
) -> None:
    """SIGKILL (or the OOM killer) leaves a partial file (raw; qcow2, which streams) or a
    scratch file (vhdx, which goes through scratch space); the next import removes it: its
    owner's lock died with it."""
    scratch, volume = tmp_path / "scratch", tmp_path / "volume"
    scratch.mkdir()
    volume.mkdir()
    fifo, dest = tmp_path / "slow", volume / "disk.img"
    os.mkfifo(fifo)
    killed = diskflow_import(fifo, dest, "--scratch-dir", scratch)
    left_in, clean = (scratch, volume) if fmt == "vhdx" else (volume, scratch)
    with open(fifo, "wb") as writer:
        writer.write(images.path(fmt).read_bytes()[: 2 * MiB])
        writer.flush()
        wait_for(lambda: any(p.name != ".disk.img.diskflow-lock" for p in left_in.iterdir()),
                 "the import's temporary file")  # fmt: skip
        killed.kill()
        killed.wait()
    leftovers = [p for p in left_in.iterdir() if p.name != ".disk.img.diskflow-lock"]
    assert leftovers
    # Only where the path writes: a streamed image takes no scratch file, nor does vhdx
    # write to the volume before qemu-img converts it.
    assert [p for p in clean.iterdir() if p.name != ".disk.img.diskflow-lock"] == []
    for path in leftovers:
        age(path)
    # A scratch file some live import still holds is left alone, however old.
    held = scratch / "diskflow-scratch-held"
    held.write_bytes(b"in use")
    age(held)
    holder = os.open(held, os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        import_image(
            str(images.path(fmt)), str(dest), options=ImportOptions(scratch_dir=str(scratch))
        )
    finally:
        os.close(holder)
    assert not any(p.exists() for p in leftovers)
    assert held.exists()
    assert sorted(p.name for p in volume.iterdir()) == ["disk.img"]
    assert subprocess.run(["cmp", dest, images.raw]).returncode == 0


def test_the_commit_point_is_marked_only_when_the_import_stands(
    images: Images, tmp_path: Path
) -> None:
    failed = Progress()
    with pytest.raises(Failure):
        wrong = Checksum("sha256", "0" * 64)
        import_image(
            str(images.raw), str(tmp_path / "a.img"), options=ImportOptions(checksum=wrong),
            progress=failed,
        )  # fmt: skip
    assert not failed.committed
    done = Progress()
    import_image(str(images.path("qcow2")), str(tmp_path / "b.img"), progress=done)
    assert done.committed


def test_sigterm_after_the_commit_point_reports_success() -> None:
    """The CLI turns SIGTERM into an error, except once the import stands (renamed into
    place): then it must not report a completed import as `Terminated`."""
    from diskflow.failures import guarded
    from importer.outcome import Outcome

    def job() -> str:
        os.kill(os.getpid(), signal.SIGTERM)
        return "done"

    records: list[Outcome] = []
    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert guarded(job, finish=records.append, completed=lambda: True) == "done"
        assert records == []
        with pytest.raises(typer.Exit) as caught:
            guarded(job, finish=records.append, completed=lambda: False)
        assert caught.value.exit_code == 75
        assert records[-1].reason == "Terminated" and not records[-1].final
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_full_destination_is_no_space_naming_it(small_fs: Path, tmp_path: Path) -> None:
    source = tmp_path / "random.raw"
    source.write_bytes(os.urandom(100 * MiB))
    dest = small_fs / "disk.img"
    with pytest.raises(Failure) as caught:
        import_image(str(source), str(dest), options=ImportOptions(size=200 * MiB))
    assert caught.value.reason == "NoSpace"
    assert str(small_fs) in caught.value.message
    assert list(small_fs.iterdir()) == []


def test_a_full_scratch_directory_is_no_space_naming_it(small_fs: Path, tmp_path: Path) -> None:
    raw = tmp_path / "random.raw"
    raw.write_bytes(os.urandom(100 * MiB))
    # Extended L2 entries: no decoder takes it, so it goes through scratch space.
    qcow2 = tmp_path / "random.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "extended_l2=on", raw, qcow2)
    options = ImportOptions(scratch_dir=str(small_fs))
    with pytest.raises(Failure) as caught:
        import_image(str(qcow2), str(tmp_path / "disk.img"), options=options)
    assert caught.value.reason == "NoSpace"
    assert str(small_fs) in caught.value.message
    assert "--scratch-dir" in caught.value.message
    assert list(small_fs.iterdir()) == []
    assert not (tmp_path / "disk.img").exists()
    # The same disk in a qcow2 that streams needs no scratch space: the full one is no matter.
    streams = tmp_path / "streams.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, streams)
    result = import_image(str(streams), str(tmp_path / "disk.img"), options=options)
    assert (result.path, result.fallback) == ("stream", None)
    assert (tmp_path / "disk.img").read_bytes() == raw.read_bytes()
    assert list(small_fs.iterdir()) == []


def test_a_read_only_destination_is_named(small_fs: Path, images: Images) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    with pytest.raises(Failure) as caught:
        import_image(str(images.raw), str(small_fs / "disk.img"))
    assert caught.value.reason == "InvalidDestination"
    assert "read-only" in caught.value.message


def test_without_size_the_free_space_bounds_the_image(small_fs: Path, tmp_path: Path) -> None:
    sparse = tmp_path / "sparse.raw"
    with open(sparse, "wb") as f:
        f.truncate(100 * MiB)  # all holes: it would fit, but its size does not
    with pytest.raises(Failure) as caught:
        import_image(str(sparse), str(small_fs / "disk.img"))
    assert caught.value.reason == "ImageTooLarge"
    assert f"the free space of {small_fs}" in caught.value.message
    assert "--size" in caught.value.message
    # Given the volume's size, the same sparse image is imported.
    import_image(str(sparse), str(small_fs / "disk.img"), options=ImportOptions(size=128 * MiB))
    assert os.path.getsize(small_fs / "disk.img") >= 100 * MiB


def test_progress_json_never_repeats_an_event(images: Images, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "diskflow", "import", str(images.path("qcow2", "xz")),
         str(tmp_path / "disk.img"), "--progress", "json"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    said = events(done.stdout)
    progress = [(e["stage"], e["bytes_done"]) for e in said if e["type"] == "progress"]
    assert progress and len(progress) == len(set(progress))


@pytest.mark.root  # gives a file to another user
def test_files_the_sweep_must_leave_alone(images: Images, tmp_path: Path) -> None:
    """A FIFO or another user's file under a swept name neither hangs nor fails the import."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    fifo = scratch / "diskflow-scratch-planted"
    os.mkfifo(fifo)
    foreign = scratch / "diskflow-scratch-foreign"
    foreign.write_bytes(b"someone else's")
    os.chown(foreign, 65534, 65534)
    for path in (fifo, foreign):
        age(path)
    with ThreadPoolExecutor(1) as pool:
        done = pool.submit(
            import_image,
            str(images.path("qcow2")),
            str(tmp_path / "disk.img"),
            options=ImportOptions(scratch_dir=str(scratch)),
        )
        done.result(timeout=60)  # a blocking open of the FIFO would never return
    assert fifo.exists() and foreign.exists()


def test_destinations_whose_names_differ_by_a_dot_have_locks_of_their_own(
    images: Images, tmp_path: Path
) -> None:
    data = images.raw.read_bytes()
    with importing_from_fifo(tmp_path / "slow.raw", tmp_path / "disk") as (writer, first):
        writer.write(data[: 4 * MiB])
        import_image(str(images.raw), str(tmp_path / "disk."))
        writer.write(data[4 * MiB :])
    first.result(timeout=60)
    assert (tmp_path / "disk").read_bytes() == (tmp_path / "disk.").read_bytes() == data


def test_a_full_destination_when_preallocating_names_it_not_the_scratch_directory(
    small_fs: Path, tmp_path: Path
) -> None:
    sparse = tmp_path / "sparse.raw"
    with open(sparse, "wb") as f:
        f.write(os.urandom(MiB))
        f.truncate(50 * MiB)
    options = ImportOptions(size=100 * MiB, preallocate=True, scratch_dir=str(tmp_path))
    with pytest.raises(Failure) as caught:
        import_image(str(sparse), str(small_fs / "disk.img"), options=options)
    assert caught.value.reason == "NoSpace"
    assert f"{small_fs} has no room left for the image" in caught.value.message
    assert "scratch" not in caught.value.message
    assert list(small_fs.iterdir()) == []


def test_a_source_that_cannot_be_opened_is_not_blamed_on_the_destination(
    tmp_path: Path,
) -> None:
    with pytest.raises(Failure) as caught:
        import_image(str(tmp_path / ("s" * 300)), str(tmp_path / "disk.img"))
    assert caught.value.reason == "InvalidSource"
    assert "File name too long" in caught.value.message


def test_a_full_archive_destination_is_no_space_naming_it(small_fs: Path, tmp_path: Path) -> None:
    (tmp_path / "content").mkdir()
    (tmp_path / "content" / "big").write_bytes(os.urandom(100 * MiB))
    tar = tmp_path / "a.tar"
    run("tar", "-C", tmp_path / "content", "-cf", tar, "big")
    archive = ImportOptions(content_type=ContentType.ARCHIVE, size=200 * MiB)
    with pytest.raises(Failure) as caught:
        import_image(str(tar), str(small_fs), options=archive)
    assert caught.value.reason == "NoSpace"
    assert f"{small_fs} has no room left for the archive's files" in caught.value.message
    assert list(small_fs.iterdir()) == []


def test_a_sigterm_just_as_a_partial_file_is_made_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The CLI raises on SIGTERM; CPython runs the handler as soon as os.open returns, before
    # the file's cleanup could be set up after it. Sent from inside os.open: that very moment.
    from importer import claims
    from importer.errors import TransientError

    def terminated(signum: int, frame: object) -> None:
        raise TransientError("Terminated", "stopped by SIGTERM")

    real_open = os.open

    def open_then_signalled(path: str, flags: int, mode: int = 0o777) -> int:
        fd = real_open(path, flags, mode)
        if str(path).endswith(".partial"):
            os.kill(os.getpid(), signal.SIGTERM)
        return fd

    previous = signal.signal(signal.SIGTERM, terminated)
    monkeypatch.setattr(os, "open", open_then_signalled)
    try:
        with pytest.raises(TransientError), claims.owned_file(str(tmp_path), ".d.", ".partial"):
            pass
    finally:
        monkeypatch.undo()
        signal.signal(signal.SIGTERM, previous)
    assert list(tmp_path.iterdir()) == []
