"""qemu-img never outlives the import that started it: not after SIGTERM (which the CLI turns
into an exception), not after an exception of any kind, not after the importer is SIGKILLed."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from importer import probe, qemu
from importer.errors import Failure
from importer.formats import DiskFormat
from tests.conftest import MiB, run

EXIT_TRANSIENT = 75


@pytest.fixture(scope="module")
def slow_qcow2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """512 MiB of random data in 512-byte clusters: qemu-img convert takes seconds over it. It
    streams (a decoder takes it): an import does not run qemu-img on it."""
    root = tmp_path_factory.mktemp("slow")
    raw, image = root / "random.raw", root / "random.qcow2"
    with open(raw, "wb") as f:
        for _ in range(64):
            f.write(os.urandom(8 * MiB))
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=512", raw, image)
    raw.unlink()
    return image


@pytest.fixture(scope="module")
def slow_scratch_qcow2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A qcow2 that goes through scratch space and qemu-img (extended L2 entries: no decoder
    takes it) and that qemu-img converts slowly: 128 MiB of 512-byte subclusters, every other
    one data, every other one unallocated (seconds of block-status calls)."""
    root = tmp_path_factory.mktemp("slow-scratch")
    raw, image = root / "striped.raw", root / "striped.qcow2"
    zeros = bytes(512)
    with open(raw, "wb") as f:
        for _ in range(32):
            data = os.urandom(2 * MiB)
            f.write(b"".join(data[i : i + 512] + zeros for i in range(0, len(data), 512)))
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-S", "512",
        "-o", "extended_l2=on,cluster_size=16k", raw, image)  # fmt: skip
    raw.unlink()
    assert probe(str(image)).needs_scratch
    return image


def qemu_img_commands(marker: Path) -> dict[int, list[bytes]]:
    """Live qemu-img processes with `marker` in their command line (a zombie has none), and
    their command lines, read once (a process may end between two reads)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if os.path.basename(argv[0]) == b"qemu-img" and any(
            str(marker).encode() in arg for arg in argv
        ):
            found[int(entry)] = argv
    return found


def qemu_img_processes(marker: Path) -> list[int]:
    """Live qemu-img processes with `marker` in their command line."""
    return list(qemu_img_commands(marker))


def wait_for(condition: object, what: str, deadline: float = 60.0) -> None:
    end = time.monotonic() + deadline
    while not condition():  # type: ignore[operator]
        if time.monotonic() > end:
            pytest.fail(f"no {what} within {deadline}s")
        time.sleep(0.01)


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """Scratch and destination directories; any qemu-img left over from them is killed."""
    (tmp_path / "scratch").mkdir()
    (tmp_path / "out").mkdir()
    yield tmp_path
    for pid in qemu_img_processes(tmp_path):
        os.kill(pid, signal.SIGKILL)


def start_import(source: Path, workdir: Path) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "diskflow", "import", str(source)]
    command += [str(workdir / "out" / "disk.img"), "--progress", "json"]
    command += ["--scratch-dir", str(workdir / "scratch")]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def converting(workdir: Path) -> bool:
    """Whether qemu-img converts a scratch file (`qemu-img info` on it comes and goes first)."""
    return any(b"convert" in argv for argv in qemu_img_commands(workdir / "scratch").values())


def test_sigterm_during_convert_leaves_no_qemu_img(slow_scratch_qcow2: Path, workdir: Path) -> None:
    rng = random.Random()
    for _ in range(3):
        importer = start_import(slow_scratch_qcow2, workdir)
        try:
            wait_for(lambda: converting(workdir), "qemu-img convert")
            time.sleep(rng.uniform(0, 0.5))  # not to wait for anything: a random moment
            importer.send_signal(signal.SIGTERM)
            _, stderr = importer.communicate(timeout=30)
        finally:
            importer.kill()
            importer.wait()
        assert importer.returncode == EXIT_TRANSIENT, stderr
        assert "[Terminated]" in stderr
        assert qemu_img_processes(workdir) == [], "qemu-img outlived the import"
        assert list((workdir / "out").iterdir()) == []
        assert list((workdir / "scratch").iterdir()) == []


def writing(out: Path) -> bool:
    """Whether the import has written guest data to its (temporary) file in `out`."""
    return any(p.stat().st_blocks > 0 for p in out.iterdir() if "diskflow-lock" not in p.name)


def test_sigterm_during_a_streamed_import_cleans_up(slow_qcow2: Path, workdir: Path) -> None:
    """The streamed path runs no qemu-img, and SIGTERM leaves nothing behind it either."""
    importer = start_import(slow_qcow2, workdir)
    try:
        wait_for(lambda: writing(workdir / "out"), "a streamed write to the destination")
        importer.send_signal(signal.SIGTERM)
        _, stderr = importer.communicate(timeout=30)
    finally:
        importer.kill()
        importer.wait()
    assert importer.returncode == EXIT_TRANSIENT, stderr
    assert "[Terminated]" in stderr
    assert qemu_img_processes(workdir) == []
    assert list((workdir / "out").iterdir()) == []
    assert list((workdir / "scratch").iterdir()) == []


def test_sigkill_of_the_importer_kills_qemu_img(slow_scratch_qcow2: Path, workdir: Path) -> None:
    importer = start_import(slow_scratch_qcow2, workdir)
    try:
        wait_for(lambda: converting(workdir), "qemu-img convert")
    finally:
        importer.kill()
        importer.wait()
    # The kernel sends qemu-img SIGKILL as the importer dies; the convert had seconds to go.
    wait_for(lambda: not qemu_img_processes(workdir), "end of qemu-img", deadline=1.0)


@pytest.mark.parametrize("exception", [KeyboardInterrupt, RuntimeError])
def test_exception_during_convert_kills_and_reaps_qemu_img(
    exception: type[BaseException], slow_qcow2: Path, workdir: Path
) -> None:
    def progress(percent: float) -> None:
        raise exception

    out = workdir / "out" / "disk.img"
    with pytest.raises(exception):
        qemu.run_with_progress(
            ["convert", "-p", "-f", "qcow2", "-O", "raw", str(slow_qcow2), str(out)],
            progress,
            qemu.Limits.for_size(512 * MiB),
        )
    assert qemu_img_processes(out) == []


def test_convert_runs_under_limits(slow_qcow2: Path, workdir: Path) -> None:
    out = str(workdir / "out" / "disk.img")
    for limits, reason, words in [
        (qemu.Limits(address_space=16 * MiB), "ResourceLimit", "address space limit of 16 MiB"),
        (qemu.Limits(timeout=0.5), "TimedOut", "took over 0.5s"),
    ]:
        with pytest.raises(Failure) as caught:
            qemu.convert(
                str(slow_qcow2),
                DiskFormat.QCOW2,
                out,
                existing=False,
                direct=False,
                on_progress=lambda percent: None,
                limits=limits,
            )
        assert caught.value.reason == reason
        assert caught.value.final is (reason == "ResourceLimit")  # time may pass next time
        assert words in caught.value.message
        assert qemu_img_processes(workdir) == []


def test_limits_grow_with_the_virtual_size() -> None:
    assert qemu.Limits.for_size(1) == qemu.Limits(1 << 30, 90, 420.0)
    assert qemu.Limits.for_size(10 << 30) == qemu.Limits(1 << 30, 360, 1500.0)
