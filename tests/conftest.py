"""Shared fixtures: test images made with real qemu-img and compressors, and real servers."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.support.faultserver import FaultServer

MiB = 1 << 20
GiB = 1 << 30
FORMATS = ["raw", "qcow2", "vmdk", "vdi", "vpc", "vpc-fixed", "vhdx"]
COMPRESSORS = {
    "gz": ["gzip", "-k", "-1"],
    "xz": ["xz", "-k", "-T2", "-0"],
    "zst": ["zstd", "-q", "-1"],
    "bz2": ["bzip2", "-k", "-1"],
}


# Markers follow from the fixtures a test uses, so they cannot drift from what it needs:
# `-m "not loop and not libvirt"` is the part that runs in seconds without root.
_MARKED_BY_FIXTURE = {
    "device": "loop",  # a loop device: root
    "small_fs": "root",  # mounts a small tmpfs
    "minimal_installer": "libvirt",  # virt-install + libvirtd + QEMU
    "vm_dir": "libvirt",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for fixture, marker in _MARKED_BY_FIXTURE.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(marker)


def run(*args: str | os.PathLike) -> str:
    return subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True).stdout


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


@dataclass(frozen=True)
class Images:
    dir: Path
    raw: Path  # the disk every test image holds: 40 MiB, data at the start, middle and very end
    data_bytes: int  # how much of it is not zero

    def path(self, fmt: str, compression: str | None = None) -> Path:
        name = f"disk.{fmt}" + (f".{compression}" if compression else "")
        return self.dir / name

    def reference(self, fmt: str, tmp: Path) -> Path:
        """What `qemu-img convert -O raw` makes of the uncompressed image."""
        out = tmp / f"reference-{fmt}.raw"
        qemu_fmt = "vpc" if fmt.startswith("vpc") else fmt
        run("qemu-img", "convert", "-f", qemu_fmt, "-O", "raw", self.path(fmt), out)
        return out


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    """The test disk in every supported format, each compressed every supported way."""
    root = tmp_path_factory.mktemp("images")
    raw = root / "disk.raw"
    rng = __import__("random").Random(42)
    pieces = [(0, 3 * MiB), (17 * MiB + 4096, MiB), (40 * MiB - 64 * 1024, 64 * 1024)]
    with open(raw, "wb") as f:
        f.truncate(40 * MiB)
        for offset, length in pieces:
            f.seek(offset)
            f.write(rng.randbytes(length))
    for fmt in FORMATS[1:]:
        qemu_fmt, options = fmt, []
        if fmt == "vpc-fixed":
            qemu_fmt, options = "vpc", ["-o", "subformat=fixed"]
        run("qemu-img", "convert", "-f", "raw", "-O", qemu_fmt, *options, raw, root / f"disk.{fmt}")
    for fmt in FORMATS:
        for suffix, command in COMPRESSORS.items():
            source = root / f"disk.{fmt}"
            if suffix == "zst":
                run(*command, source, "-o", root / f"disk.{fmt}.zst")
            else:
                run(*command, source)
    return Images(root, raw, sum(length for _, length in pieces))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, deadline: float = 10.0) -> None:
    end = time.monotonic() + deadline
    while True:
        try:
            requests.get(url, timeout=1)
            return
        except requests.ConnectionError:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)


@pytest.fixture(scope="session")
def nginx(images: Images, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """nginx serving the test images (Range, ETag) on loopback; yields its base URL."""
    if not shutil.which("nginx"):
        pytest.fail("nginx is not installed (Debian: nginx-light); .ci/run installs it")
    prefix = tmp_path_factory.mktemp("nginx")
    with running_nginx(prefix, "access_log off; sendfile on;", f"root {images.dir};") as base:
        yield base


@contextmanager
def running_nginx(prefix: Path, http: str, server: str) -> Iterator[str]:
    """nginx, as root and in the foreground, from a config of its own in PREFIX: the `http`
    directives and one server on a free loopback port whose block holds `server`. Yields the
    base URL once it answers; stops it afterwards."""
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(f"""
        daemon off;
        user root;
        worker_processes 1;
        pid {prefix}/nginx.pid;
        error_log {prefix}/error.log;
        events {{ worker_connections 64; }}
        http {{
            client_body_temp_path {prefix}/body;
            proxy_temp_path {prefix};
            fastcgi_temp_path {prefix};
            uwsgi_temp_path {prefix};
            scgi_temp_path {prefix};
            types {{ }}
            default_type application/octet-stream;
            {http}
            server {{
                listen 127.0.0.1:{port};
                {server}
            }}
        }}
        """)
    process = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(prefix)])
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(base + "/")
        yield base
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def faults(images: Images) -> Iterator[FaultServer]:
    server = FaultServer(str(images.dir))
    yield server
    server.close()


DEVICE_SIZE = 64 * MiB


@pytest.fixture
def device(tmp_path: Path) -> Iterator[str]:
    """A 64 MiB loop device filled with 0xff, like a reused volume."""
    backing = tmp_path / "backing.img"
    backing.write_bytes(b"\xff" * DEVICE_SIZE)
    try:
        path = subprocess.run(
            ["losetup", "--find", "--show", str(backing)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        pytest.fail(f"a loop device is needed (run as root): {exc}")
    try:
        yield path
    finally:
        subprocess.run(["losetup", "--detach", path], check=True)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A directory on a 64 MiB tmpfs of its own (a full volume is a few writes away)."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mountpoint)],
            check=True,
            capture_output=True,
        )
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        pytest.fail(f"mounting a tmpfs is needed (run as root): {exc}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=True)


def read_device(path: str, length: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(length)
