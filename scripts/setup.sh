#!/usr/bin/env bash
# Install what diskflow needs on Debian 12 (as root): system tools and a virtualenv in .venv.
#   scripts/setup.sh          the CLI and its runtime tools
#   scripts/setup.sh --test   also what the test suite and benchmarks use
set -euo pipefail
cd "$(dirname "$0")/.."

# The importer needs qemu-img; template builds need virt-install (which needs cpio for
# --initrd-inject), libvirt and QEMU, xorriso (the boot test's NoCloud seed), and git for
# `diskflow ci`; `diskflow demo template` needs busybox-static (its tiny installer; the
# cloud kernel's package is downloaded with apt, not installed). libvirt-python, which drives
# libvirt, is built from PyPI against libvirt-dev (pkg-config finds it; gcc, python3-dev).
packages=(python3 python3-venv python3-dev gcc pkg-config libvirt-dev qemu-utils util-linux
          mount qemu-system-x86 libvirt-daemon-system libvirt-clients virtinst cpio xorriso git
          busybox-static)
extras=""
if [[ "${1:-}" == "--test" ]]; then
    # Real servers and tools the tests drive: nginx (Range/ETag; WebDAV for publishing),
    # compressors, openssl (TLS), Redis (the Celery broker),
    # libguestfs (virt-sysprep for --seal; its appliance needs a kernel in /boot) and
    # e2fsprogs (a test OS disk made without mounting, read back with debugfs); debootstrap,
    # buildah and podman (the container images, built from Debian packages: no registry).
    packages+=(nginx-light libnginx-mod-http-dav-ext curl gzip xz-utils zstd bzip2 openssl
               redis-server libguestfs-tools linux-image-cloud-amd64 e2fsprogs
               debootstrap buildah podman)
    extras="[test]"
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${packages[@]}"

if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
fi
# A fresh venv's pip (23.x) cannot parse some current packages' metadata.
.venv/bin/python -m pip install -q --upgrade "pip>=24"
.venv/bin/python -m pip install -q -e ".${extras}"
