"""The test installer, run end to end by real virt-install, libvirtd and QEMU (TCG)."""

from __future__ import annotations

import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# The fixtures come in as a plugin; importing the module first would bypass assert rewriting.
pytest.register_assert_rewrite("tests.support.installer")
pytest_plugins = ["tests.support.installer"]

from tests.conftest import MiB, run  # noqa: E402
from tests.support.installer import (  # noqa: E402
    ANACONDA_LOG_DIRECTIVE,
    ANACONDA_LOG_PORT,
    MARKER_HEADER,
    TAIL_MARKER_OFFSET,
    Installer,
    expected_marker,
    validate_kickstart,
    write_kickstart,
)

URI = "qemu:///system"
DISK_SIZE = 64 * MiB


def virsh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-c", URI, *args], capture_output=True, text=True)


def domain_exists(name: str) -> bool:
    return virsh("domstate", name).returncode == 0


@pytest.fixture
def domain() -> Iterator[str]:
    """A fresh domain name; whatever domain has it is removed afterwards."""
    name = f"dftest-{random.randrange(1 << 32):08x}"
    try:
        yield name
    finally:
        virsh("destroy", name)
        virsh("undefine", name)


def install(
    installer: Installer,
    vm_dir: Path,
    name: str,
    kickstart: Path,
    disk: Path,
    extra: tuple[str, ...] = (),
) -> tuple[float, str]:
    """Run virt-install to the end; return the seconds it took and the console text."""
    fmt = "qcow2" if disk.suffix == ".qcow2" else "raw"
    console = vm_dir / "console.log"
    command = [
        "virt-install", "--connect", URI, "--name", name, "--virt-type", "qemu",
        "--osinfo", "linux2022", "--memory", "256", "--vcpus", "1",
        "--disk", f"path={disk},format={fmt},bus=virtio",
        "--install",
        f"kernel={installer.kernel},initrd={installer.initrd},"
        'kernel_args="console=ttyS0 inst.ks=file:/ks.cfg",kernel_args_overwrite=yes',
        "--initrd-inject", str(kickstart), "--noautoconsole", "--wait", "2",
        "--serial", f"file,path={console}", "--noreboot", "--transient",
        "--network", "none", "--graphics", "none", *extra,
    ]  # fmt: skip
    start = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=200)
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stdout + result.stderr
    # A transient domain that powered off is gone; libvirt may need a moment to forget it.
    deadline = time.monotonic() + 10
    while domain_exists(name):
        assert time.monotonic() < deadline, f"domain {name} still exists after the install"
        time.sleep(0.1)
    return elapsed, console.read_text(errors="replace")


def disk_bytes(disk: Path, vm_dir: Path) -> bytes:
    if disk.suffix != ".qcow2":
        return disk.read_bytes()
    raw = vm_dir / "converted.raw"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", disk, raw)
    return raw.read_bytes()


def test_install_writes_markers(minimal_installer: Installer, vm_dir: Path, domain: str) -> None:
    kickstart = write_kickstart(vm_dir / "ks.cfg", post="echo hello from %post\nuname -r")
    validate_kickstart(kickstart)
    disk = vm_dir / "disk.qcow2"
    run("qemu-img", "create", "-f", "qcow2", disk, str(DISK_SIZE))

    elapsed, console = install(minimal_installer, vm_dir, domain, kickstart, disk)

    assert "diskflow-test-installer: starting" in console
    assert "hello from %post" in console
    assert "diskflow-test-installer: done" in console
    data = disk_bytes(disk, vm_dir)
    marker = expected_marker(kickstart)
    assert data.startswith(marker)
    tail = len(data) - TAIL_MARKER_OFFSET
    assert data[tail : tail + len(marker)] == marker
    print(f"install took {elapsed:.1f} s")


def test_failing_post_powers_off_without_marker(
    minimal_installer: Installer, vm_dir: Path, domain: str
) -> None:
    post = 'echo "Traceback (most recent call last):"\nexit 3'
    kickstart = write_kickstart(vm_dir / "ks.cfg", post=post)
    disk = vm_dir / "disk.raw"
    disk.write_bytes(b"")
    run("truncate", "-s", str(DISK_SIZE), disk)

    _, console = install(minimal_installer, vm_dir, domain, kickstart, disk)

    assert "Traceback (most recent call last):" in console
    assert "diskflow-test-installer: %post failed with status 3" in console
    assert "diskflow-test-installer: done" not in console
    assert MARKER_HEADER not in disk.read_bytes()


def test_missing_kickstart_is_reported(
    minimal_installer: Installer, vm_dir: Path, domain: str
) -> None:
    # --initrd-inject keeps the file's name, so this one lands at /other.cfg, not /ks.cfg.
    kickstart = write_kickstart(vm_dir / "other.cfg")
    disk = vm_dir / "disk.raw"
    run("truncate", "-s", str(DISK_SIZE), disk)

    _, console = install(minimal_installer, vm_dir, domain, kickstart, disk)

    assert "diskflow-test-installer: error: kickstart /ks.cfg not found" in console
    assert MARKER_HEADER not in disk.read_bytes()


def test_post_output_goes_to_anaconda_log_channel(
    minimal_installer: Installer, vm_dir: Path, domain: str
) -> None:
    post = "echo line one\necho line two >&2"
    kickstart = write_kickstart(vm_dir / "ks.cfg", post=post, extra=ANACONDA_LOG_DIRECTIVE)
    validate_kickstart(kickstart)
    disk = vm_dir / "disk.raw"
    run("truncate", "-s", str(DISK_SIZE), disk)
    log = vm_dir / "anaconda.log"
    channel = f"file,path={log},target.type=virtio,target.name={ANACONDA_LOG_PORT}"

    _, console = install(
        minimal_installer, vm_dir, domain, kickstart, disk, extra=("--channel", channel)
    )

    assert f"({ANACONDA_LOG_PORT})" in console
    assert log.read_text() == "line one\nline two\n"
    assert disk.read_bytes().startswith(expected_marker(kickstart))
