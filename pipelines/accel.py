"""The acceleration policy: KVM when it can run the installer, TCG only when asked or said aloud.

Packer's QEMU builder silently falls back to TCG and a build takes hours instead of minutes.
Here `kvm` fails fast when /dev/kvm is unusable, `tcg` is an explicit choice, and `auto`
returns the reason for its choice so the caller can print it.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from importer.errors import FinalError

KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12


class Accel(StrEnum):
    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


@dataclass(frozen=True)
class AccelChoice:
    accel: Accel  # KVM or TCG, never AUTO
    reason: str

    @property
    def virt_type(self) -> str:
        """virt-install's --virt-type for this choice."""
        return "kvm" if self.accel is Accel.KVM else "qemu"


def choose_accel(
    policy: Accel, device: Path = Path("/dev/kvm"), cpuinfo: Path = Path("/proc/cpuinfo")
) -> AccelChoice:
    """Resolve the policy into KVM or TCG, with the reason; `kvm` raises if KVM is unusable."""
    if policy is Accel.TCG:
        return AccelChoice(Accel.TCG, "TCG (software emulation) was asked for with --accel tcg")
    problem = kvm_problem(device)
    if policy is Accel.KVM:
        if problem:
            raise FinalError("KvmUnavailable", f"--accel kvm: {problem}")
        return AccelChoice(Accel.KVM, f"KVM was asked for with --accel kvm and {device} works")
    if not problem and not _has_virtualization_flag(cpuinfo):
        problem = (
            f"{device} opens, but the CPU has no vmx or svm flag: this is a paravirtual KVM "
            "(such as PVM) that cannot run an unmodified installer kernel"
        )
    if problem:
        return AccelChoice(
            Accel.TCG,
            f"--accel auto chose TCG, software emulation, 10-50x slower than KVM, because "
            f"{problem}",
        )
    return AccelChoice(Accel.KVM, f"--accel auto chose KVM: {device} works and the CPU has vmx/svm")


def kvm_problem(device: Path = Path("/dev/kvm")) -> str | None:
    """Why KVM cannot be used through `device`, or None when it answers like KVM should."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return (
            f"{device} does not exist (no KVM on this host; on Kubernetes, request the "
            "devices.kubevirt.io/kvm resource)"
        )
    except PermissionError:
        return (
            f"{device} is not accessible to uid {os.getuid()} (add the user to the kvm group, "
            "or run the pod with the devices.kubevirt.io/kvm resource)"
        )
    except OSError as e:
        return f"{device} cannot be opened: {e.strerror}"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as e:
        return f"{device} does not answer like KVM: {e.strerror}"
    finally:
        os.close(fd)
    if version != KVM_API_VERSION:
        return f"{device} speaks KVM API version {version}, not {KVM_API_VERSION}"
    return None


def _has_virtualization_flag(cpuinfo: Path) -> bool:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = (set(line.split()) for line in text.splitlines() if line.startswith("flags"))
    return any({"vmx", "svm"} & cpu for cpu in flags)
