"""The boot test: the finished image booted once, before anything is published.

A template that installs but does not boot (a broken bootloader, a missing virtio driver in the
initramfs, a relabel loop, a broken cloud-init) would otherwise be published with a green build.
The image is booted as a cluster would first boot it: from a copy-on-write overlay (the image
itself is never written), on virtio, with a cloud-init NoCloud seed (a disk labelled `cidata`,
as cloud-init looks for it) whose user-data script prints a marker on the serial console. The
marker is made of two halves joined only when the script runs, so a console that merely echoes
the user-data does not pass. The install's watchdogs apply (timeout, silence, failure patterns)
and the console is streamed as events; any failure is `BootTestFailed` with the console's last
lines. With `OnError.KEEP` a failed boot test leaves its domain and work directory (overlay,
seed, a link to the image) for debugging.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from importer.errors import FinalError
from importer.qemu import qemu_img
from pipelines.accel import Accel, choose_accel
from pipelines.console import LogTail
from pipelines.events import Emit, discard
from pipelines.template import Template
from pipelines.virtinstall import (
    OWNER_FILE,
    BuildOptions,
    OnError,
    Watch,
    check_libvirt,
    domain_command,
    escape,
    kept,
    known_os_variant,
    libvirt_uri,
    owner_record,
    require_tool,
    running_domain,
    tail,
)

STAGE = "boot-test"
MARKER_PREFIX = "diskflow-boot-test"
METHOD = "cloud-init NoCloud seed (virtio disk labelled cidata); marker on the serial console"
CONSOLE_LOG = "boot-console.log"


@dataclass(frozen=True)
class BootTested:
    """How the image was booted and how long it took to print the marker."""

    accel: Accel
    kernel: bool  # booted the template's [boot] kernel, not the image's own bootloader
    seconds: float


def boot_test(
    image: Path,
    template: Template,
    options: BuildOptions,
    workroot: str | None = None,
    keep_console: Path | None = None,
    emit: Emit = discard,
) -> BootTested:
    """Boot `image` (qcow2) once and wait for the seed's marker on its serial console.

    FinalError("BootTestFailed") says why, with the console's last lines; the console is
    copied to `keep_console` either way.
    """
    virt_install = require_tool("virt-install", "virtinst")
    xorriso = require_tool("xorrisofs", "xorriso")
    connect = libvirt_uri(options.connect)
    check_libvirt(connect)
    choice = choose_accel(options.accel)
    emit(STAGE, "warning" if choice.accel is Accel.TCG else "info", choice.reason)
    workdir = Path(tempfile.mkdtemp(prefix=f"diskflow-{template.name}-boot-", dir=workroot))
    domain = f"diskflow-{template.name}-boot-{secrets.token_hex(4)}"
    console = workdir / CONSOLE_LOG
    try:
        # QEMU runs as its own user: everything it opens is in this searchable directory.
        workdir.chmod(0o711)
        (workdir / OWNER_FILE).write_text(owner_record())
        overlay = _overlay(image, workdir)
        token = secrets.token_hex(8)
        seed = _seed(workdir, xorriso, template.name, token)
        boot = _private_kernel(template, workdir)
        os_variant = known_os_variant(virt_install, template.os_variant, emit)
        command = [
            *domain_command(virt_install, template, os_variant, options, choice, domain, console),
            f"--disk=path={escape(overlay)},format=qcow2,bus=virtio,cache=unsafe",
            f"--disk=path={escape(seed)},format=raw,bus=virtio,readonly=on",
            "--import",
            *boot,
        ]
        marker = f"{MARKER_PREFIX} {token} ok"
        emit(STAGE, "start", f"booting {image.name} ({domain}) and waiting for cloud-init's "
             "marker on its console", domain=domain, accel=choice.accel.value)  # fmt: skip
        started = time.monotonic()
        watch = Watch(STAGE, connect, domain, options.boot_timeout, options.no_output_timeout,
                      choice, until=lambda line: marker in line.text,
                      keep=options.on_error is OnError.KEEP)  # fmt: skip
        try:
            with running_domain(command, watch, [LogTail(console, "console")], workdir,
                                emit) as booted:  # fmt: skip
                if not booted:
                    raise FinalError(
                        "BootTestFailed",
                        "the boot test failed: the guest stopped without printing the marker "
                        "(is cloud-init installed and enabled?); last console lines:\n"
                        f"{tail(console)}",
                    )
        except FinalError as e:
            if e.reason == "BootTestFailed":
                raise
            raise FinalError("BootTestFailed", f"the boot test failed: {e.message}") from None
        seconds = time.monotonic() - started
        emit(STAGE, "done", f"booted: marker on the console after {seconds:.1f}s",
             seconds=round(seconds, 3))  # fmt: skip
        return BootTested(choice.accel, bool(template.boot.kernel), seconds)
    finally:
        if keep_console is not None and console.exists():
            shutil.copyfile(console, keep_console)
        if not kept(workdir):
            shutil.rmtree(workdir, ignore_errors=True)


def _overlay(image: Path, workdir: Path) -> Path:
    """A qcow2 overlay over (a link to, else a copy of) `image`, all inside `workdir`.

    QEMU must reach the backing file by a path it may search, which the output directory
    need not be; a hard link costs nothing where the file system allows it.
    """
    backing = workdir / "image.qcow2"
    try:
        os.link(image, backing)
    except OSError:
        shutil.copyfile(image, backing)
    overlay = workdir / "boot.qcow2"
    qemu_img()("create", "-q", "-f", "qcow2", "-b", backing.name, "-F", "qcow2", str(overlay))
    return overlay


def _seed(workdir: Path, xorriso: str, name: str, token: str) -> Path:
    """The NoCloud seed: meta-data and a user-data script printing the marker, as an ISO."""
    files = workdir / "seed"
    files.mkdir()
    (files / "meta-data").write_text(
        f"instance-id: diskflow-boot-test-{token}\nlocal-hostname: {name[:63]}\n"
    )
    # Written to the serial port itself: the guest's kernel console may be elsewhere.
    (files / "user-data").write_text(
        "#!/bin/sh\n"
        f'marker="{MARKER_PREFIX} $(echo {token}) ok"\n'
        'for port in /dev/ttyS0 /dev/console; do echo "$marker" >"$port"; done 2>/dev/null\n'
        "exit 0\n"
    )
    seed = workdir / "seed.iso"
    subprocess.run(
        [xorriso, "-quiet", "-o", str(seed), "-V", "cidata", "-J", "-R", str(files)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return seed


def _private_kernel(template: Template, workdir: Path) -> list[str]:
    """virt-install's --boot for the template's [boot] kernel, copied where QEMU can read it."""
    boot = template.boot
    if not boot.kernel or not boot.initrd:
        return []
    copies = []
    for role, path in (("kernel", boot.kernel), ("initrd", boot.initrd)):
        copy = workdir / f"boot-{role}"  # by role: the two may share a file name
        shutil.copyfile(path, copy)
        copies.append(escape(copy))
    return [f'--boot=kernel={copies[0]},initrd={copies[1]},kernel_args="{boot.kernel_args}"']
