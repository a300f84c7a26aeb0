"""The embedded default: a whole import on one machine with nothing else running.

Makes a sample disk (qcow2, xz-compressed, with a published sha256), serves it over HTTP
from a server started here on loopback, and imports it like a pod would: streamed,
verified, converted to raw and grown to the volume size.
"""

from __future__ import annotations

import functools
import hashlib
import lzma
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from importer import Checksum, ImportOptions, ImportResult, Progress, import_image

SAMPLE_SIZE = 256 << 20


def make_sample(directory: Path) -> tuple[Path, str]:
    """A 256 MiB qcow2 disk with data at both ends, xz-compressed; returns it and its sha256."""
    raw, qcow2 = directory / "sample.raw", directory / "sample.qcow2"
    with open(raw, "wb") as disk:
        disk.truncate(SAMPLE_SIZE)
        disk.write(b"diskflow sample disk\n" * 50_000)
        disk.seek(SAMPLE_SIZE - 4096)
        disk.write(os.urandom(4096))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow2], check=True)
    raw.unlink()
    compressed = qcow2.with_suffix(".qcow2.xz")
    with open(qcow2, "rb") as src, lzma.open(compressed, "wb", preset=1) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    qcow2.unlink()
    return compressed, hashlib.sha256(compressed.read_bytes()).hexdigest()


def run_demo(directory: Path, progress: Progress, *, volume_size: int = 512 << 20) -> ImportResult:
    """Serve a sample image on 127.0.0.1 and import it into `directory`/disk.img."""
    directory.mkdir(parents=True, exist_ok=True)
    sample, sha256 = make_sample(directory)
    try:
        with serving(directory) as base_url:
            url = f"{base_url}{sample.name}"
            # disk.img is a plain file, not a volume's: it is the whole volume size.
            options = ImportOptions(
                size=volume_size, checksum=Checksum("sha256", sha256), filesystem_overhead=None
            )
            return import_image(
                url, str(directory / "disk.img"), options=options, progress=progress
            )
    finally:
        sample.unlink()


@contextmanager
def serving(directory: Path) -> Iterator[str]:
    """An HTTP server for `directory` on 127.0.0.1; yields its base URL (with a slash)."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass
