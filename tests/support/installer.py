"""The test side of the tiny installer (pipelines/tiny_installer.py): its fixtures, and
kickstarts and templates it can install."""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from pykickstart.parser import KickstartParser
from pykickstart.version import RHEL9, makeVersion

from pipelines.tiny_installer import (
    ANACONDA_LOG_DIRECTIVE,
    ANACONDA_LOG_PORT,
    BOOT_ARGS,
    MARKER_HEADER,
    OS_SECTOR,
    OS_SECTORS,
    TAIL_MARKER_OFFSET,
    Installer,
    build_installer,
    expected_marker,
    write_kickstart,
    write_template,
)

__all__ = [  # what tests import from here, besides the fixtures
    "ANACONDA_LOG_DIRECTIVE", "ANACONDA_LOG_PORT", "BOOT_ARGS", "MARKER_HEADER", "OS_SECTOR",
    "OS_SECTORS", "TAIL_MARKER_OFFSET", "Installer", "expected_marker", "validate_kickstart",
    "write_kickstart", "write_template", "write_tree",
]  # fmt: skip

QEMU_CONF = Path("/etc/libvirt/qemu.conf")


def qemu_user() -> str:
    """The user libvirt runs QEMU as: qemu.conf's `user`, else Debian's default."""
    try:
        text = QEMU_CONF.read_text()
    except OSError:
        text = ""
    match = re.search(r'^\s*user\s*=\s*"\+?([^"]+)"', text, re.MULTILINE)
    return match.group(1) if match else "libvirt-qemu"


def kvm_access_problem() -> str | None:
    """Why libvirt would start every domain minutes late, or None.

    libvirt caches QEMU's capabilities and drops the cache whenever its QEMU probe found KVM
    (the probe runs with CAP_DAC_OVERRIDE) but /dev/kvm is not read-write for the QEMU user.
    Each lookup then re-probes QEMU, 8-12 s here, and a domain start does several.
    Debian's udev rule makes /dev/kvm root:kvm 0660; a machine without udev lacks it.
    """
    name = qemu_user()
    try:
        st = os.stat("/dev/kvm")
        user = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except (FileNotFoundError, KeyError):
        return None
    if user.pw_uid == 0:
        return None
    groups = {user.pw_gid} | {g.gr_gid for g in grp.getgrall() if user.pw_name in g.gr_mem}
    rw = stat.S_IRUSR | stat.S_IWUSR
    if (
        (st.st_uid == user.pw_uid and st.st_mode & rw == rw)
        or (st.st_gid in groups and st.st_mode & (rw >> 3) == rw >> 3)
        or st.st_mode & (rw >> 6) == rw >> 6
    ):
        return None
    return (
        f"/dev/kvm is not read-write for {user.pw_name}, so libvirt re-probes QEMU on every call "
        "and each domain start takes minutes; fix it as Debian's udev rule would: "
        "chgrp kvm /dev/kvm && chmod 0660 /dev/kvm"
    )


@pytest.fixture(scope="session")
def minimal_installer(tmp_path_factory: pytest.TempPathFactory) -> Installer:
    """The kernel and initrd of the test installer, built once per session."""
    if problem := kvm_access_problem():
        pytest.fail(problem)
    return build_installer(tmp_path_factory.mktemp("installer"))


@pytest.fixture
def vm_dir() -> Iterator[Path]:
    """A directory for a domain's disk, console and channel files.

    pytest's tmp_path is under 0700 directories that QEMU, running as libvirt-qemu, cannot
    search; libvirt chowns the disk itself but not its parent directories.
    """
    path = Path(tempfile.mkdtemp(prefix="diskflow-vm-"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def validate_kickstart(path: Path) -> None:
    """Raise pykickstart's error if PATH is not a valid RHEL9 kickstart."""
    parser = KickstartParser(makeVersion(RHEL9))
    parser.readKickstart(str(path))


def write_tree(directory: Path, installer: Installer) -> Path:
    """An install tree of the test installer, laid out like a distribution's: a .treeinfo
    naming images/pxeboot/vmlinuz and initrd.img, as virt-install --location reads it."""
    pxeboot = directory / "images" / "pxeboot"
    pxeboot.mkdir(parents=True)
    shutil.copyfile(installer.kernel, pxeboot / "vmlinuz")
    shutil.copyfile(installer.initrd, pxeboot / "initrd.img")
    treeinfo = directory / ".treeinfo"
    treeinfo.write_text(
        "[general]\nfamily = diskflow-test\nversion = 1\narch = x86_64\n\n"
        "[tree]\narch = x86_64\nplatforms = x86_64\n\n"
        "[images-x86_64]\nkernel = images/pxeboot/vmlinuz\ninitrd = images/pxeboot/initrd.img\n"
    )
    return treeinfo
