"""Benchmark `diskflow import` against a CDI-style path and a native shell pipeline.

Run it from the repository, with the venv that has diskflow installed:

    python bench/import_bench.py [--size 2G] [--repeat 3] [--workdir DIR] [--json FILE]

It writes a raw image of --size bytes (1 MiB blocks, about half of them zero, the others half
text and half seeded random bytes), makes every case's source from it (.gz, .zst, qcow2,
qcow2 with compressed clusters, streamOptimized VMDK, dynamic VHD, VDI), serves them with nginx
on 127.0.0.1 and times, for each case and --repeat times, three ways to import it, each ending
with the output durable and checked against the raw image:

- diskflow: `diskflow import --progress none --scratch-dir WORKDIR --checksum sha256:HEX URL OUT`;
- CDI-style: download (and decompress) to a scratch file, `qemu-img convert -O raw`, `sync`;
- native (gz and zst only): `curl | gzip -dc | dd conv=sparse`, `sync`.

Then, as root, it imports the qcow2 once more with --scratch-dir on a 32 MiB tmpfs: the stream
decoders need no scratch space for an image laid out as qemu-img writes it.

It prints the medians, diskflow's peak RSS and whether the targets are met. The page cache is
not dropped between runs: the served files stay cached, as on a warm server.
Needs curl, gzip, zstd, qemu-img, cmp, nginx and the diskflow command (--diskflow).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from isal import igzip_threaded

MIB = 1 << 20
SEED = 20240601
# case: (source file, qemu-img output format and options; None: compressed raw)
FORMATS: dict[str, tuple[str, list[str] | None]] = {
    "gz": ("disk.raw.gz", None),
    "zst": ("disk.raw.zst", None),
    "qcow2": ("disk.qcow2", ["-O", "qcow2"]),
    "qcow2c": ("disk.c.qcow2", ["-O", "qcow2", "-c"]),
    "vmdk": ("disk.vmdk", ["-O", "vmdk", "-o", "subformat=streamOptimized"]),
    "vhd": ("disk.vhd", ["-O", "vpc", "-o", "subformat=dynamic,force_size=on"]),
    "vdi": ("disk.vdi", ["-O", "vdi"]),
}
CASES = tuple(FORMATS)
SOURCES = {case: source for case, (source, _) in FORMATS.items()}
QEMU_FORMAT = {"qcow2": "qcow2", "qcow2c": "qcow2", "vmdk": "vmdk", "vhd": "vpc", "vdi": "vdi"}
DECOMPRESS = {"gz": "gzip -dc", "zst": "zstd -dc"}
TOOLS = ("diskflow", "cdi", "native")
# Minimum speed-up of diskflow over each baseline (baseline seconds / diskflow seconds); the
# issue that made VMDK, VHD and VDI stream set no speed target for them: they are reported.
TARGET_VS_CDI: dict[str, float | None] = {
    "gz": 2.5,
    "zst": 2.5,
    "qcow2": 1.5,
    "qcow2c": 1.5,
    "vmdk": None,
    "vhd": None,
    "vdi": None,
}
SMALL_SCRATCH = "32m"  # the tmpfs a qcow2 import must fit its scratch space into
TARGET_VS_NATIVE = 1.5
TARGET_RSS_MIB = 150
NGINX_START_TIMEOUT = 10.0


class BenchError(Exception):
    """A step of the benchmark failed; the message says which and why."""


@dataclass
class CaseResult:
    source: str
    source_bytes: int
    sha256: str
    seconds: dict[str, list[float]] = field(default_factory=dict)
    diskflow_rss_mib: list[float] = field(default_factory=list)

    def median(self, tool: str) -> float | None:
        runs = self.seconds.get(tool)
        return statistics.median(runs) if runs else None


def parse_size(text: str) -> int:
    """Bytes from '2G', '2GiB', '256M', '512Mi' or a plain number (binary units)."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B?)\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    size = int(match.group(1)) << (10 * " KMGT".index(match.group(2).upper() or " "))
    if size <= 0 or size % MIB:
        raise argparse.ArgumentTypeError("the size must be a positive whole number of MiB")
    return size


def run(cmd: list[str]) -> str:
    """Run a command; its stdout, or BenchError with its stderr."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise BenchError(f"{shlex.join(cmd)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding `path`, from /proc/self/mountinfo."""
    target, best, fstype = str(path.resolve()), "", "unknown"
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, _, rest = line.partition(" - ")
        mount = fields.split()[4]
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, fstype = mount, rest.split()[0]
    return fstype


def machine_info(workdir: Path) -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": model.group(1).strip() if model else platform.processor(),
        "memory_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "qemu_img": run(["qemu-img", "--version"]).splitlines()[0],
        "workdir_fs": filesystem_type(workdir),
        "commit": commit(),
    }


def commit() -> str:
    """The commit of the checkout holding this script, '-dirty' if diskflow's code is edited."""
    git = ["git", "-C", str(Path(__file__).parent)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode:
        return "unknown"
    status = [*git, "status", "--porcelain", "--", ":/importer", ":/diskflow"]
    edited = subprocess.run(status, capture_output=True, text=True).stdout.strip()
    return head.stdout.strip() + ("-dirty" if edited else "")


def make_raw(path: Path, size: int) -> int:
    """Write the test image sparsely; return how many 1 MiB blocks hold data."""
    rng = random.Random(SEED)
    data_blocks = 0
    with path.open("wb") as image:
        for index in range(size // MIB):
            if index and rng.random() < 0.5:
                image.seek(MIB, os.SEEK_CUR)
                continue
            line = f"diskflow-bench block {index:08d}: the quick brown fox jumps over the dog\n"
            text = (line.encode() * (MIB // 2 // len(line) + 1))[: MIB // 2]
            image.write(text + rng.randbytes(MIB // 2))
            data_blocks += 1
        image.truncate(size)
    return data_blocks


def make_sources(workdir: Path, raw: Path, cases: list[str]) -> None:
    """Make every case's source file from the raw image."""
    if "gz" in cases:
        with (
            raw.open("rb") as src,
            igzip_threaded.open(
                workdir / SOURCES["gz"], "wb", compresslevel=1, threads=os.cpu_count() or 1
            ) as dst,
        ):
            shutil.copyfileobj(src, dst, MIB)
    if "zst" in cases:
        run(["zstd", "-q", "-f", "-T0", "-3", str(raw), "-o", str(workdir / SOURCES["zst"])])
    for case in cases:
        source, options = FORMATS[case]
        if options is not None:
            run(["qemu-img", "convert", "-f", "raw", *options, str(raw), str(workdir / source)])


def sha256(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Nginx:
    """nginx serving `root` on 127.0.0.1, configured and logging inside `prefix`."""

    def __init__(self, root: Path, prefix: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._prefix = prefix
        self._root = root
        self._error_log = prefix / "error.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def _config(self) -> Path:
        p = self._prefix
        conf = p / "nginx.conf"
        conf.write_text(
            f"""daemon off;
master_process on;
user root;
worker_processes 1;
pid {p}/nginx.pid;
error_log {self._error_log} warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    client_body_temp_path {p}/client_body;
    proxy_temp_path {p}/proxy;
    fastcgi_temp_path {p}/fastcgi;
    uwsgi_temp_path {p}/uwsgi;
    scgi_temp_path {p}/scgi;
    server {{
        listen 127.0.0.1:{self.port};
        root {self._root};
    }}
}}
"""
        )
        return conf

    def __enter__(self) -> Nginx:
        self._prefix.mkdir(parents=True, exist_ok=True)
        conf = self._config()
        cmd = ["nginx", "-c", str(conf), "-p", str(self._prefix), "-e", str(self._error_log)]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + NGINX_START_TIMEOUT
        probe = urllib.request.Request(f"{self.base_url}/disk.raw", method="HEAD")  # always made
        while True:
            if self._proc.poll() is not None:
                errors = self._error_log.read_text().strip() if self._error_log.exists() else ""
                raise BenchError(f"nginx exited {self._proc.returncode}: {errors}")
            try:
                with urllib.request.urlopen(probe, timeout=1):
                    return
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    raise BenchError(f"nginx did not answer in {NGINX_START_TIMEOUT}s") from None
                time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


def timed(cmd: list[str], log: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS in MiB of a command (the RSS includes its reaped children).

    The command runs in its own process group, killed whole if the benchmark is interrupted.
    """
    with log.open("wb") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        output = log.read_text(errors="replace").strip()
        raise BenchError(f"{shlex.join(cmd)} exited {proc.returncode}: {output}")
    return seconds, usage.ru_maxrss / 1024


def verify(raw: Path, out: Path, what: str) -> None:
    done = subprocess.run(["cmp", str(raw), str(out)], capture_output=True, text=True)
    if done.returncode:
        detail = (done.stdout + done.stderr).strip()
        raise BenchError(f"{what}: the output differs from the raw image: {detail}")


def remove(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def baseline_script(tool: str, case: str, url: str, out: Path, scratch: Path) -> str:
    o, s, u = shlex.quote(str(out)), shlex.quote(str(scratch)), shlex.quote(url)
    if tool == "native":
        dd = f"dd of={o} bs=1M iflag=fullblock conv=sparse status=none"
        return f"curl -sf {u} | {DECOMPRESS[case]} | {dd} && sync {o}"
    if case in QEMU_FORMAT:
        fetch, fmt = f"curl -sf -o {s} {u}", QEMU_FORMAT[case]
    else:
        fetch, fmt = f"curl -sf {u} | {DECOMPRESS[case]} > {s}", "raw"
    return f"{fetch} && qemu-img convert -f {fmt} -O raw {s} {o} && sync {o}"


def benchmark(
    args: argparse.Namespace, workdir: Path, base_url: str, results: dict[str, CaseResult]
) -> None:
    """Run every (case, tool) once per repeat, interleaved so drift hits all of them alike."""
    raw, out, scratch = workdir / "disk.raw", workdir / "out.img", workdir / "scratch.img"
    for repeat in range(1, args.repeat + 1):
        for case in results:
            result = results[case]
            url = f"{base_url}/{result.source}"
            for tool in TOOLS:
                if tool == "native" and case not in DECOMPRESS:
                    continue
                remove(out, scratch)
                os.sync()  # start each run with no dirty pages left by the previous one
                if tool == "diskflow":
                    cmd = [args.diskflow, "import", "--progress", "none", "--scratch-dir"]
                    cmd += [str(workdir), "--checksum", f"sha256:{result.sha256}", url, str(out)]
                    seconds, rss = timed(cmd, workdir / "run.log")
                    result.diskflow_rss_mib.append(rss)
                    note = f"  peak RSS {rss:.0f} MiB"
                else:
                    script = baseline_script(tool, case, url, out, scratch)
                    cmd = ["bash", "-c", f"set -o pipefail; {script}"]
                    seconds, _ = timed(cmd, workdir / "run.log")
                    note = ""
                verify(raw, out, f"{tool} {case} run {repeat}")
                result.seconds.setdefault(tool, []).append(seconds)
                log(f"run {repeat}/{args.repeat}  {case:5} {tool:8} {seconds:7.2f} s{note}")
    remove(out, scratch)


def targets(results: dict[str, CaseResult]) -> list[dict[str, Any]]:
    """Every target with its measured value and whether it is met."""
    rows: list[dict[str, Any]] = []
    for case, result in results.items():
        diskflow = result.median("diskflow")
        assert diskflow is not None
        goals = [("speed-up vs CDI", "cdi", TARGET_VS_CDI[case])]
        if case in DECOMPRESS:
            goals.append(("speed-up vs native", "native", TARGET_VS_NATIVE))
        for name, tool, goal in goals:
            baseline = result.median(tool)
            assert baseline is not None
            speedup = baseline / diskflow
            rows.append(
                {
                    "case": case,
                    "target": f"{name} >= {goal}x" if goal else f"{name} (no target)",
                    "measured": speedup,
                    "met": goal is None or speedup >= goal,
                }
            )
        rss = max(result.diskflow_rss_mib)
        rows.append(
            {
                "case": case,
                "target": f"peak RSS < {TARGET_RSS_MIB} MiB",
                "measured": rss,
                "met": rss < TARGET_RSS_MIB,
            }
        )
    return rows


def report(results: dict[str, CaseResult], goals: list[dict[str, Any]]) -> str:
    def cell(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    lines = [
        f"{'case':6}{'source MiB':>11}{'diskflow s':>12}{'CDI s':>9}{'CDI/df':>8}"
        f"{'native s':>10}{'native/df':>10}{'df RSS MiB':>12}"
    ]
    for case, result in results.items():
        diskflow, cdi, native = (result.median(tool) for tool in TOOLS)
        assert diskflow is not None
        lines.append(
            f"{case:6}{result.source_bytes / MIB:>11.0f}{diskflow:>12.2f}{cell(cdi, '.2f'):>9}"
            f"{cell(cdi and cdi / diskflow, '.2f'):>8}{cell(native, '.2f'):>10}"
            f"{cell(native and native / diskflow, '.2f'):>10}"
            f"{max(result.diskflow_rss_mib):>12.0f}"
        )
    lines.append("")
    for goal in goals:
        status = "met" if goal["met"] else "NOT met"
        lines.append(f"{goal['case']:6}{goal['target']:28}{goal['measured']:8.2f}  {status}")
    return "\n".join(lines)


def small_scratch(args: argparse.Namespace, workdir: Path, url: str, sha: str) -> dict[str, Any]:
    """Import `url` (the qcow2) with --scratch-dir on a 32 MiB tmpfs; the target row."""
    target = f"imports with --scratch-dir on a {SMALL_SCRATCH[:-1]} MiB filesystem"
    mount = workdir / "small-scratch"
    mount.mkdir(exist_ok=True)
    run(["mount", "-t", "tmpfs", "-o", f"size={SMALL_SCRATCH}", "tmpfs", str(mount)])
    out = workdir / "out.img"
    try:
        remove(out)
        cmd = [args.diskflow, "import", "--progress", "none", "--scratch-dir", str(mount)]
        cmd += ["--checksum", f"sha256:{sha}", url, str(out)]
        try:
            seconds, _ = timed(cmd, workdir / "run.log")
        except BenchError as exc:
            log(f"small scratch: {exc}")
            return {"case": "qcow2", "target": target, "measured": 0.0, "met": False}
        verify(workdir / "disk.raw", out, "qcow2 with a small scratch directory")
        log(f"small scratch: qcow2 imported in {seconds:.2f} s")
        return {"case": "qcow2", "target": target, "measured": seconds, "met": True}
    finally:
        run(["umount", str(mount)])
        remove(out)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def default_diskflow() -> str:
    beside = Path(sys.executable).with_name("diskflow")
    return str(beside) if beside.exists() else shutil.which("diskflow") or "diskflow"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size",
        type=parse_size,
        default=parse_size("2G"),
        help="raw image size, whole MiB (2G, 256M, 512Mi...; default 2G)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per command (default 3)")
    parser.add_argument(
        "--workdir",
        type=Path,
        help="directory for images and outputs, not tmpfs; kept afterwards "
        "(default: a fresh temporary directory, removed afterwards)",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument(
        "--cases",
        default=",".join(CASES),
        help=f"comma-separated cases to run (default: all of {','.join(CASES)})",
    )
    parser.add_argument("--diskflow", default=default_diskflow(), help="the diskflow command")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    args.cases = [case.strip() for case in args.cases.split(",") if case.strip()]
    unknown = sorted(set(args.cases) - set(CASES))
    if unknown or not args.cases:
        parser.error(f"--cases: unknown {', '.join(unknown) or 'nothing'}; known: {CASES}")
    return args


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up as on Ctrl-C
    temporary = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="diskflow-bench-")) if temporary else args.workdir
    workdir = workdir.resolve()
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        machine = machine_info(workdir)
        if machine["workdir_fs"] == "tmpfs":
            raise BenchError(f"{workdir} is on tmpfs; pass --workdir on a disk filesystem")
        machine_line = ", ".join(f"{key} {value}" for key, value in machine.items())
        log(f"machine: {machine_line}")

        raw = workdir / "disk.raw"
        started = time.perf_counter()
        data_blocks = make_raw(raw, args.size)
        log(f"wrote {raw}: {args.size // MIB} MiB, {data_blocks} data blocks of 1 MiB")
        make_sources(workdir, raw, args.cases)
        results: dict[str, CaseResult] = {}
        for case in args.cases:
            source = workdir / SOURCES[case]
            results[case] = CaseResult(source.name, source.stat().st_size, sha256(source))
            log(f"{source.name}: {source.stat().st_size / MIB:.0f} MiB")
        log(f"inputs ready in {time.perf_counter() - started:.0f} s")

        load = [os.getloadavg()[0]]  # other work on the machine skews the timings
        with Nginx(workdir, workdir / "nginx") as nginx:
            log(f"nginx serving {workdir} at {nginx.base_url}")
            benchmark(args, workdir, nginx.base_url, results)
            goals = targets(results)
            if "qcow2" in results and os.geteuid() == 0:
                qcow2 = results["qcow2"]
                url = f"{nginx.base_url}/{qcow2.source}"
                goals.append(small_scratch(args, workdir, url, qcow2.sha256))
        load.append(os.getloadavg()[0])
        print(f"machine: {machine_line}")
        print(f"load average (1 min) before and after the runs: {load[0]:.2f}, {load[1]:.2f}")
        print(
            f"image: {args.size // MIB} MiB raw, {data_blocks} data blocks; "
            f"medians of {args.repeat} runs\n"
        )
        print(report(results, goals))
        if args.json:
            document = {
                "machine": machine,
                "size": args.size,
                "data_blocks": data_blocks,
                "repeat": args.repeat,
                "load_average_before_after": load,
                "cases": {
                    case: {
                        "source": result.source,
                        "source_bytes": result.source_bytes,
                        "seconds": result.seconds,
                        "median_seconds": {tool: result.median(tool) for tool in result.seconds},
                        "diskflow_peak_rss_mib": result.diskflow_rss_mib,
                    }
                    for case, result in results.items()
                },
                "targets": goals,
            }
            args.json.write_text(json.dumps(document, indent=2) + "\n")
        return 0
    except BenchError as exc:
        log(f"FAILED: {exc}")
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            remove(workdir / "out.img", workdir / "scratch.img", workdir / "run.log")


if __name__ == "__main__":
    sys.exit(main())
