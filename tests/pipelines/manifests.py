"""Build manifests for tests that need one without building: a published manifest as the
dict-assembling steps wrote them before pipelines.manifest, and finished builds made from it."""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipelines.manifest import BuildManifest

# Every section, as validate, install, finalize, the boot test and publishing wrote them.
STORED: dict[str, Any] = {
    "schema": "diskflow.io/template-build/v1",
    "template": "centos9",
    "build_id": "3f9c2a7be01d45c6a8e2",
    "kickstart": {
        "file": "centos9.ks",
        "version": "RHEL9",
        "sha256": "5d41402abc4b2a76b9719d911017c592ae7a1b3c4d5e6f708192a3b4c5d6e7f8",
    },
    "inputs": {
        "kernel": {
            "file": "vmlinuz",
            "sha256": "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0",
        },
        "initrd": {
            "file": "initrd.img",
            "sha256": "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90",
        },
        "kernel_args": "console=ttyS0 inst.text",
    },
    "settings": {
        "os_variant": "centos-stream9",
        "disk_size": 21474836480,
        "memory": 2147483648,
        "vcpus": 2,
    },
    "tools": {
        "diskflow": "0.1.0",
        "virt-install": "4.1.0",
        "qemu-img": "qemu-img version 7.2.15 (Debian 1:7.2+dfsg-7+deb12u12)",
        "qemu-system-x86_64": "QEMU emulator version 7.2.15 (Debian 1:7.2+dfsg-7+deb12u12)",
        "virsh": "9.0.0",
    },
    "durations": {"validate": 0.412, "install": 613.27, "finalize": 41.9, "boot_test": 38.055},
    "accel": {
        "used": "kvm",
        "reason": "--accel auto chose KVM: /dev/kvm works and the CPU has vmx/svm",
    },
    "builder": "worker-7c9d",
    "built_at": "2026-11-28T09:14:03+00:00",
    "output": {
        "file": "centos9.qcow2",
        "format": "qcow2",
        "compression": "zstd",
        "sealed": True,
        "size": 912261120,
        "virtual_size": 21474836480,
        "sha256": "9e107d9d372bb6826bd81d3542a419d69e107d9d372bb6826bd81d3542a419d6",
    },
    "boot_test": {
        "tested": True,
        "method": "cloud-init NoCloud seed (virtio disk labelled cidata); marker on the serial "
        "console",
        "accel": "kvm",
        "boot": "bootloader",
    },
    "published": {
        "template": "centos9",
        "build_id": "3f9c2a7be01d45c6a8e2",
        "image": {
            "url": "s3://golden/images/centos9/3f9c2a7be01d45c6a8e2/centos9.qcow2",
            "sha256": "9e107d9d372bb6826bd81d3542a419d69e107d9d372bb6826bd81d3542a419d6",
            "size": 912261120,
        },
        "checksum_url": "s3://golden/images/centos9/3f9c2a7be01d45c6a8e2/centos9.qcow2.sha256",
        "manifest_url": "s3://golden/images/centos9/3f9c2a7be01d45c6a8e2/manifest.json",
        "source": {
            "kind": "s3",
            "url": "https://minio:9000/golden/images/centos9/3f9c2a7be01d45c6a8e2/centos9.qcow2",
        },
        "published_at": "2026-11-28T09:26:01Z",
    },
}


def finished(template: str, build_id: str, virtual_size: int | None = None) -> BuildManifest:
    """A finished build's manifest, not published yet, for `template` and `build_id`."""
    manifest = BuildManifest.from_json(STORED)
    output = manifest.finished()
    if virtual_size is not None:
        output = replace(output, virtual_size=virtual_size)
    return replace(manifest, template=template, build_id=build_id, output=output, published=None)


def finished_build(directory: Path, image: Path) -> Path:
    """DIRECTORY/centos9: a finished build of a copy of `image` (manifest.json and
    centos9.qcow2), as `publish` takes."""
    build = directory / "centos9"
    build.mkdir()
    copy = build / "centos9.qcow2"
    shutil.copy(image, copy)
    data = copy.read_bytes()
    manifest = finished("centos9", uuid.uuid4().hex[:20])
    output = replace(manifest.finished(), sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    (build / "manifest.json").write_text(json.dumps(replace(manifest, output=output).to_json()))
    return build
