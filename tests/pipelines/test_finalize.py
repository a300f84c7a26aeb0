"""Finalizing an installed disk: real virt-sysprep (libguestfs under TCG) and qemu-img."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from importer.errors import FinalError
from pipelines.accel import Accel
from pipelines.finalize import FinalizeOptions, QcowCompression, finalize
from tests.conftest import run, sha256

MACHINE_ID = "0123456789abcdef0123456789abcdef"


def os_disk(tmp_path: Path) -> Path:
    """A qcow2 holding a Linux root file system libguestfs recognises, made without mounting."""
    root = tmp_path / "root"
    for directory in ("etc/ssh", "bin", "usr/bin", "var/log", "tmp"):
        (root / directory).mkdir(parents=True)
    (root / "etc/machine-id").write_text(MACHINE_ID + "\n")
    (root / "etc/ssh/ssh_host_ed25519_key").write_text("host secret\n")
    (root / "etc/os-release").write_text("NAME=Fedora\nID=fedora\nVERSION_ID=40\n")
    (root / "etc/fedora-release").write_text("Fedora release 40 (Forty)\n")
    (root / "etc/fstab").write_text("/dev/sda / ext4 defaults 0 1\n")
    (root / "bin/sh").write_bytes(Path("/bin/busybox").read_bytes())
    raw = tmp_path / "os.raw"
    with open(raw, "wb") as f:
        f.truncate(64 << 20)
    run("mkfs.ext4", "-q", "-d", root, raw)
    disk = tmp_path / "installed.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", raw, disk)
    return disk


def read_file(image: Path, path: str, tmp_path: Path) -> str | None:
    """A file inside the template's ext4 file system, read with debugfs (no mount)."""
    raw = tmp_path / "check.raw"
    run("qemu-img", "convert", "-O", "raw", image, raw)
    done = subprocess.run(["debugfs", "-R", f"cat {path}", str(raw)], capture_output=True,
                          text=True)  # fmt: skip
    return None if "File not found" in done.stderr else done.stdout


@pytest.mark.libvirt  # virt-sysprep boots libguestfs's appliance under QEMU
def test_seal_removes_the_machine_identity(tmp_path: Path) -> None:
    disk = os_disk(tmp_path)
    output = tmp_path / "sealed.qcow2"
    done = finalize(disk, output, FinalizeOptions(seal=True), Accel.TCG)
    assert done.sealed and done.sha256 == sha256(output)
    assert read_file(output, "/etc/ssh/ssh_host_ed25519_key", tmp_path) is None
    assert MACHINE_ID not in (read_file(output, "/etc/machine-id", tmp_path) or "")
    assert read_file(output, "/etc/fedora-release", tmp_path) == "Fedora release 40 (Forty)\n"


@pytest.mark.libvirt
def test_seal_failure_is_specific_and_leaves_no_image(tmp_path: Path) -> None:
    disk = tmp_path / "blank.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", disk, "64M")
    output = tmp_path / "sealed.qcow2"
    with pytest.raises(FinalError) as caught:
        finalize(disk, output, FinalizeOptions(seal=True), Accel.TCG)
    assert caught.value.reason == "SealFailed"
    assert "virt-sysprep failed" in caught.value.message
    assert list(tmp_path.glob("*sealed*")) == []


@pytest.mark.parametrize("compression", list(QcowCompression))
def test_compression_type_is_the_one_asked_for(
    compression: QcowCompression, tmp_path: Path
) -> None:
    disk = os_disk(tmp_path)
    output = tmp_path / "out.qcow2"
    done = finalize(disk, output, FinalizeOptions(compression=compression), Accel.TCG)
    details = json.loads(run("qemu-img", "info", "--output=json", output))
    assert details["format-specific"]["data"]["compression-type"] == compression.value
    assert done.size == output.stat().st_size < disk.stat().st_size
    assert done.virtual_size == 64 << 20
    # Same guest-visible content as the installed disk.
    run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", disk, output)
