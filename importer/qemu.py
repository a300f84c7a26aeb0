"""The qemu-img wrapper: hardened inspection of untrusted images, conversion to raw.

Every run on an untrusted image gets an explicit `-f` (no probing of untrusted bytes) and
resource limits (address space, CPU time, wall time), so a crafted image cannot exhaust the pod.
qemu-img runs in a session of its own and its whole process group is killed and reaped on every
way out (an error, an exception such as the one the CLI makes of SIGTERM, Ctrl-C); the kernel
kills it too if the importer itself is killed (`setpriv --pdeathsig`), so it never writes on
alone.

The limits give the same answer every time for the same image. Left alone, glibc reserves a
64 MiB malloc arena and an 8 MiB stack for each thread, and qemu's I/O thread pool starts
between 1 and 64 threads depending on timing, so the same image passed or failed a 1 GiB
address-space limit at random. With one malloc arena and 256 KiB thread stacks the thread count
moves the peak by about 16 MiB at most.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import selectors
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from importer.errors import FinalError, TransientError
from importer.formats import DiskFormat
from importer.reasons import Reason

if TYPE_CHECKING:
    import sh

logging.getLogger("sh").setLevel(logging.WARNING)  # sh logs every command at INFO

GiB = 1 << 30
# Thread stacks come from RLIMIT_STACK; qemu-img's threads only issue I/O, and its coroutines
# have stacks of their own.
_STACK = 256 << 10
# qemu-img info of the largest snapshot table qcow2 allows prints about 15 MB.
_MAX_INFO_OUTPUT = 16 << 20
_STDERR_TAIL = 64 << 10
# Messages of qemu, GLib, glibc and the dynamic loader when an allocation fails.
_OUT_OF_MEMORY = re.compile(
    r"Cannot allocate memory|[Cc]ould not allocate|[Ff]ailed to allocate|out of memory"
    r"|qemu_thread_create|failed to map segment"
)
_PAST_END = re.compile(r"exceeding the end of the file.*offset (0x[0-9a-f]+) size (0x[0-9a-f]+)")
_PROGRESS = re.compile(r"\((\d+(?:\.\d+)?)/100%\)")


@dataclass(frozen=True)
class Limits:
    """What one qemu-img run on an untrusted image may use; the defaults are `qemu-img info`'s."""

    address_space: int = 1 << 30
    cpu_seconds: int = 30
    timeout: float = 60

    @classmethod
    def for_size(cls, virtual_size: int) -> Limits:
        """Limits for a pass over a whole image of `virtual_size` bytes (convert, map, check).

        1 GiB of address space (metadata caches and 16 copy buffers of 2 MiB need far less);
        60 s of CPU time plus 30 s per GiB (inflating compressed clusters runs at over
        100 MB/s); 300 s of wall time plus 120 s per GiB (a volume writing 9 MB/s finishes).
        """
        gib = -(-virtual_size // GiB)
        return cls(address_space=1 << 30, cpu_seconds=60 + 30 * gib, timeout=300.0 + 120 * gib)


def qemu_img() -> sh.Command:
    """The qemu-img command, or a clear error naming the package to install."""
    import sh  # 20 ms of imports (asyncio too): paid only by the template builds that use it

    return sh.Command(_qemu_img_path())


def _qemu_img_path() -> str:
    path = shutil.which("qemu-img")
    if path is None:
        raise FinalError("MissingTool", "qemu-img is not installed (Debian: qemu-utils)")
    return path


def info(path: str, fmt: DiskFormat, limits: Limits = Limits()) -> dict:
    """`qemu-img info` of `path` read as `fmt`, under resource limits."""
    what = f"qemu-img info of the {fmt} image"
    args = ["info", "-f", fmt.value, "--output=json", path]
    status, out, err = _run(args, limits, what, max_output=_MAX_INFO_OUTPUT)
    if status != 0:
        raise _failure(status, err, limits, fmt, f"qemu-img cannot read the image as {fmt}")
    return json.loads(out)


def validate(
    details: dict,
    fmt: DiskFormat,
    path: str,
    *,
    adjust: Callable[[Limits], Limits] = lambda limits: limits,
) -> int:
    """Reject images that reach outside themselves or are truncated (`check_complete`, under
    `Limits.for_size` passed through `adjust`, which may cut their time to a deadline);
    return the virtual size in bytes."""
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
    # Only now: map and check would open any backing file or external extent named.
    check_complete(path, fmt, adjust(Limits.for_size(size)))
    return size


def check_complete(path: str, fmt: DiskFormat, limits: Limits) -> None:
    """Refuse an image whose metadata points past the end of its file (a truncated upload),
    which qemu would read as zeros and silently make a different disk of.

    `qemu-img map` gives where every allocated extent lies in the file (qcow2, vmdk, vdi, vpc,
    vhdx); for a qcow2, `qemu-img check` also finds L2 tables and refcount blocks cut off.
    vpc and vhdx already refuse to open a file whose block table points past its end, and a
    compressed cluster cut off fails to inflate during the conversion.
    """
    file_size = os.path.getsize(path)
    end = _mapped_end(path, fmt, limits)
    if fmt is DiskFormat.QCOW2:
        end = max(end, _checked_end(path, limits))
    if end > file_size:
        raise FinalError(
            Reason.TRUNCATED_IMAGE,
            f"the {fmt} image refers to data past its end (byte {end} of a file of "
            f"{file_size} bytes): the file is truncated",
        )


def _mapped_end(path: str, fmt: DiskFormat, limits: Limits) -> int:
    """The end of the last extent of `path` that qemu reads from the file."""
    end, pending = 0, b""

    def extents(chunk: bytes) -> None:
        # One extent per line; a fragmented terabyte image has millions, so none are kept.
        nonlocal end, pending
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            end = max(end, _extent_end(line))

    what = f"qemu-img map of the {fmt} image"
    args = ["map", "--output=json", "-f", fmt.value, path]
    status, _, err = _run(args, limits, what, on_output=extents)
    if status != 0:
        raise _failure(status, err, limits, fmt, f"qemu-img cannot map the {fmt} image")
    return max(end, _extent_end(pending))


def _extent_end(line: bytes) -> int:
    text = line.strip().strip(b"[],")
    if not text:
        return 0
    extent = json.loads(text)
    # Zero clusters and holes are not read from the file, whatever offset they have.
    return extent["offset"] + extent["length"] if extent.get("data") and "offset" in extent else 0


def _checked_end(path: str, limits: Limits) -> int:
    """The end of the last qcow2 metadata or data region past the end of the file, or 0."""
    what = "qemu-img check of the qcow2 image"
    status, _, err = _run(["check", "-f", "qcow2", "--output=json", path], limits, what)
    # 2 and 3: corruptions or leaks found; only those past the end are this check's business.
    if status not in (0, 2, 3):
        raise _failure(status, err, limits, DiskFormat.QCOW2, "qemu-img cannot check the image")
    return max(
        (int(offset, 16) + int(size, 16) for offset, size in _PAST_END.findall(err)), default=0
    )


def convert(
    source: str,
    fmt: DiskFormat,
    destination: str,
    *,
    existing: bool,
    direct: bool,
    on_progress: Callable[[float], None],
    limits: Limits,
) -> None:
    """Convert `source` (an image `validate` accepted) to raw at `destination`, reporting
    percent done, under `limits` (`Limits.for_size` of its virtual size, or less).

    `existing` writes into what is there (a block device) instead of creating a file;
    `direct` writes with O_DIRECT (where the filesystem supports it). The source is read
    through the page cache, where the freshly written scratch file still is.
    """
    args = ["convert", "-p", "-f", fmt.value, "-O", "raw", "-W", "-m", "16"]
    args += ["-t", "none" if direct else "writeback", "-T", "writeback"]
    if existing:
        args.append("-n")
    args += [source, destination]
    run_with_progress(args, on_progress, limits)


def run_with_progress(
    args: list[str], on_progress: Callable[[float], None], limits: Limits | None = None
) -> None:
    """Run `qemu-img ARGS` (which must include -p), reporting its percent done; `limits` for
    an untrusted image, none for one of our own."""
    pending = ""

    def progress(chunk: bytes) -> None:
        # qemu-img redraws "    (12.34/100%)" ending in \r.
        nonlocal pending
        pending += chunk.decode(errors="replace")
        if "\r" in pending:
            *lines, pending = pending.split("\r")
            for match in _PROGRESS.finditer("".join(lines)):
                on_progress(float(match.group(1)))

    status, _, err = _run(args, limits, f"qemu-img {args[0]}", on_output=progress)
    if status != 0 and "No space left on device" in err:
        # As any write that finds the disk full: the caller knows which disk, and for what.
        raise OSError(errno.ENOSPC, f"qemu-img {args[0]}: no space left on device")
    if status != 0:
        fmt = DiskFormat(args[args.index("-f") + 1]) if "-f" in args else None
        raise _failure(
            status, err, limits, fmt, f"qemu-img {args[0]} failed", Reason.CONVERSION_FAILED
        )


def _run(
    args: list[str],
    limits: Limits | None,
    what: str,
    *,
    on_output: Callable[[bytes], None] | None = None,
    max_output: int | None = None,
) -> tuple[int, bytes, str]:
    """Run `qemu-img ARGS` to its end under `limits`: its exit status, its output (unless
    `on_output` takes it as it comes) and the end of its stderr. Whatever way this returns or
    raises, no process of it is left."""
    env = {**os.environ, "MALLOC_ARENA_MAX": "1", "LC_ALL": "C"}
    deadline = None if limits is None else time.monotonic() + limits.timeout
    process = subprocess.Popen(
        [*_confined(limits), _qemu_img_path(), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env=env,
    )
    try:
        try:
            out, err = _read_all(process, deadline, on_output, max_output, what)
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise _TimedOut
            status = process.wait(remaining)
        except (_TimedOut, subprocess.TimeoutExpired):
            assert limits is not None
            # Time depends on the volume and the machine as much as on the image: it may
            # pass on another try, unlike the CPU and memory limits.
            raise TransientError(
                Reason.TIMED_OUT, f"{what} took over {limits.timeout:g}s (its time limit)"
            ) from None
    finally:
        _stop(process)
    return status, bytes(out), err.decode(errors="replace")


class _TimedOut(Exception):
    pass


def _confined(limits: Limits | None) -> list[str]:
    """The commands qemu-img runs under: killed when the thread that started it dies
    (`setpriv --pdeathsig`, kept across exec), no core file, and `limits`.

    Set by util-linux's tools in the child rather than by a preexec function, which is not
    safe in a process with threads (the import always has some)."""
    command = [_tool("setpriv"), "--pdeathsig", "KILL", _tool("prlimit"), "--core=0"]
    if limits is not None:
        # SIGXCPU at the soft CPU limit tells that limit apart from any other kill.
        command += [
            f"--as={limits.address_space}",
            f"--cpu={limits.cpu_seconds}:{limits.cpu_seconds + 5}",
            f"--stack={_STACK}",
        ]
    return [*command, "--"]


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise FinalError(Reason.MISSING_TOOL, f"{name} is not installed (Debian: util-linux)")
    return path


def _read_all(
    process: subprocess.Popen[bytes],
    deadline: float | None,
    on_output: Callable[[bytes], None] | None,
    max_output: int | None,
    what: str,
) -> tuple[bytearray, bytearray]:
    """Stdout (or nothing, if `on_output` takes it) and the end of stderr, until both close."""
    out, err = bytearray(), bytearray()
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ, out)  # type: ignore[arg-type]
        selector.register(process.stderr, selectors.EVENT_READ, err)  # type: ignore[arg-type]
        while selector.get_map():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise _TimedOut
            for key, _ in selector.select(remaining):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    selector.unregister(key.fileobj)
                elif key.data is err:
                    err += chunk
                    del err[:-_STDERR_TAIL]
                elif on_output is not None:
                    on_output(chunk)
                else:
                    out += chunk
                    if max_output is not None and len(out) > max_output:
                        raise FinalError(
                            "ResourceLimit", f"{what} printed over {max_output >> 20} MiB"
                        )
    return out, err


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Kill qemu-img's process group unless it has been reaped already, and reap it."""
    # Once reaped, its id may be another process's: never signal it then.
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            stream.close()


def _failure(
    status: int,
    stderr: str,
    limits: Limits | None,
    fmt: DiskFormat | None,
    prefix: str,
    reason: Reason = Reason.INVALID_IMAGE,
) -> FinalError:
    """The error a failed qemu-img run means: a resource limit hit, a truncated image, or
    `reason` with qemu-img's last word."""
    lines = [line.removeprefix("qemu-img: ") for line in stderr.strip().splitlines()]
    if limits is not None and status == -signal.SIGXCPU:
        return FinalError(
            "ResourceLimit", f"{prefix}: it used up its CPU time limit of {limits.cpu_seconds}s"
        )
    if limits is not None and _OUT_OF_MEMORY.search(stderr):
        return FinalError(
            "ResourceLimit",
            f"{prefix}: it needs more than its address space limit of "
            f"{limits.address_space >> 20} MiB",
        )
    cut = next((line for line in lines if "truncated" in line.lower()), None)
    if cut is not None:
        return FinalError(Reason.TRUNCATED_IMAGE, f"the {fmt} image is truncated: {cut}")
    if lines:
        detail = lines[-1]
    elif status < 0:
        detail = f"killed by {signal.Signals(-status).name}"
    else:
        detail = f"exit status {status}"
    return FinalError(reason, f"{prefix}: {detail}")
