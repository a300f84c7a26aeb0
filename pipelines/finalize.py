"""From the installed disk to the template: optional seal, compressed qcow2, checksum."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from importer.errors import FinalError
from importer.formats import DiskFormat
from importer.qemu import info, run_with_progress
from pipelines.accel import Accel
from pipelines.events import Emit, discard

SEAL_TIMEOUT = 1800.0


class QcowCompression(StrEnum):
    ZSTD = "zstd"  # about 4x faster than zlib at the same ratio (research/templates.md)
    ZLIB = "zlib"  # readable by qemu older than 5.1


@dataclass(frozen=True)
class FinalizeOptions:
    seal: bool = False
    compression: QcowCompression = QcowCompression.ZSTD


@dataclass(frozen=True)
class Finished:
    """The finished image and what a manifest says about it."""

    image: Path
    size: int
    virtual_size: int
    sha256: str
    compression: QcowCompression
    sealed: bool
    seconds: float


def finalize(
    disk: Path,
    output: Path,
    options: FinalizeOptions,
    accel: Accel,
    emit: Emit = discard,
) -> Finished:
    """Seal `disk` if asked, compress it into `output` (a qcow2), and checksum the result."""
    started = time.monotonic()
    if options.seal:
        seal(disk, accel, emit)
    partial = output.with_name(f".{output.name}.partial")
    emit("finalize", "start", f"compressing into {output.name} with {options.compression}")
    try:
        run_with_progress(
            ["convert", "-p", "-c", "-f", "qcow2", "-O", "qcow2", "-o",
             f"compression_type={options.compression}", str(disk), str(partial)],
            lambda percent: emit("finalize", "progress", f"compress {percent:.0f}%",
                                 percent=percent),
        )  # fmt: skip
        digest = sha256_of(partial)
        virtual_size = info(str(partial), DiskFormat.QCOW2)["virtual-size"]
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    seconds = time.monotonic() - started
    size = output.stat().st_size
    emit("finalize", "done", f"{output.name}: {size} bytes, sha256 {digest}", sha256=digest)
    return Finished(output, size, virtual_size, digest, options.compression, options.seal, seconds)


def seal(disk: Path, accel: Accel, emit: Emit = discard) -> None:
    """virt-sysprep the disk: machine-id, SSH host keys, logs and the like are removed."""
    sysprep = shutil.which("virt-sysprep")
    if not sysprep:
        raise FinalError(
            "MissingTool", "virt-sysprep is not installed (Debian package libguestfs-tools)"
        )
    env = dict(os.environ)
    env.setdefault("LIBGUESTFS_BACKEND", "direct")  # no libvirtd needed for the appliance
    if accel is Accel.TCG:
        # The libguestfs appliance would try KVM and hang where the build itself needed TCG.
        env.setdefault("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
    emit("finalize", "start", "sealing with virt-sysprep")
    try:
        done = subprocess.run(
            [sysprep, "--quiet", "--format", "qcow2", "-a", str(disk)],
            env=env, capture_output=True, text=True, timeout=SEAL_TIMEOUT,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise FinalError("SealFailed", f"virt-sysprep took over {SEAL_TIMEOUT:.0f}s") from None
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise FinalError(
            "SealFailed", f"virt-sysprep failed: {lines[-1] if lines else done.returncode}"
        )


def sha256_of(path: Path) -> str:
    """The sha256 of a file, in hex."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
