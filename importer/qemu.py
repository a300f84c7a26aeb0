"""The qemu-img wrapper: hardened inspection of untrusted images, conversion to raw.

`qemu-img info` always gets an explicit `-f` (no probing of untrusted bytes) and runs under
an address-space limit, a CPU limit and a timeout, so a crafted image cannot exhaust the pod.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

import sh

from importer.errors import FinalError
from importer.formats import DiskFormat

logging.getLogger("sh").setLevel(logging.WARNING)  # sh logs every command at INFO


@dataclass(frozen=True)
class Limits:
    """What one `qemu-img info` on an untrusted image may use."""

    address_space: int = 1 << 30
    cpu_seconds: int = 30
    timeout: float = 60


_PROGRESS = re.compile(r"\((\d+(?:\.\d+)?)/100%\)")


def qemu_img() -> sh.Command:
    """The qemu-img command, or a clear error naming the package to install."""
    try:
        return sh.Command("qemu-img")
    except sh.CommandNotFound:
        raise FinalError("MissingTool", "qemu-img is not installed (Debian: qemu-utils)") from None


def info(path: str, fmt: DiskFormat, limits: Limits = Limits()) -> dict:
    """`qemu-img info` of `path` read as `fmt`, under resource limits."""
    command = qemu_img()
    limited = sh.Command("prlimit").bake(
        f"--as={limits.address_space}", f"--cpu={limits.cpu_seconds}", "--", command._path
    )
    try:
        out = limited("info", "-f", fmt.value, "--output=json", path, _timeout=limits.timeout)
    except sh.TimeoutException:
        raise FinalError(
            "InvalidImage", f"qemu-img info took over {limits.timeout}s on the {fmt} image"
        ) from None
    except sh.ErrorReturnCode as exc:
        detail = exc.stderr.decode(errors="replace").strip().splitlines()
        raise FinalError(
            "InvalidImage",
            f"qemu-img cannot read the image as {fmt}: {detail[-1] if detail else exc}",
        ) from None
    return json.loads(out)


def validate(details: dict, fmt: DiskFormat, path: str) -> int:
    """Reject images that reach outside themselves; return the virtual size in bytes."""
    if details.get("format") != fmt.value:
        raise FinalError(
            "InvalidImage", f"qemu-img read the image as {details.get('format')}, not {fmt}"
        )
    backing = details.get("backing-filename") or details.get("full-backing-filename")
    if backing:
        raise FinalError(
            "BackingFileRejected", f"the {fmt} image names a backing file ({backing!r})"
        )
    specific = details.get("format-specific", {}).get("data", {})
    if specific.get("data-file"):
        raise FinalError(
            "DataFileRejected",
            f"the qcow2 image names an external data file ({specific['data-file']!r})",
        )
    for extent in specific.get("extents", []):
        if extent.get("filename") not in (None, path):
            raise FinalError(
                "BackingFileRejected",
                f"the vmdk image names an external extent ({extent.get('filename')!r})",
            )
    size = details.get("virtual-size")
    if not isinstance(size, int) or size <= 0:
        raise FinalError("InvalidImage", f"the {fmt} image has no valid virtual size ({size!r})")
    return size


def convert(
    source: str,
    fmt: DiskFormat,
    destination: str,
    *,
    existing: bool,
    direct: bool,
    on_progress: Callable[[float], None],
) -> None:
    """Convert `source` to raw at `destination`, reporting percent done.

    `existing` writes into what is there (a block device) instead of creating a file;
    `direct` writes with O_DIRECT (where the filesystem supports it). The source is read
    through the page cache, where the freshly written scratch file still is.
    """
    args = ["convert", "-p", "-f", fmt.value, "-O", "raw", "-W", "-m", "16"]
    args += ["-t", "none" if direct else "writeback", "-T", "writeback"]
    if existing:
        args.append("-n")
    args += [source, destination]
    run_with_progress(args, on_progress)


def run_with_progress(args: list[str], on_progress: Callable[[float], None]) -> None:
    """Run `qemu-img ARGS` (which must include -p), reporting its percent done."""
    pending = ""

    def progress(chunk: str) -> None:
        # qemu-img redraws "    (12.34/100%)" ending in \r; sh hands it over char by char.
        nonlocal pending
        pending += chunk
        if "\r" in pending:
            *lines, pending = pending.split("\r")
            for match in _PROGRESS.finditer("".join(lines)):
                on_progress(float(match.group(1)))

    try:
        qemu_img()(*args, _out=progress, _out_bufsize=0, _decode_errors="replace")
    except sh.ErrorReturnCode as exc:
        detail = exc.stderr.decode(errors="replace").strip().splitlines()
        raise FinalError(
            "ConversionFailed", f"qemu-img {args[0]} failed: {detail[-1] if detail else exc}"
        ) from None
