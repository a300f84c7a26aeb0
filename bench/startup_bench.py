"""Benchmark start-up: `diskflow import` of a 1 MiB raw image, from a file and over HTTP.

    python bench/startup_bench.py [--runs 20] [--target 0.25] [--diskflow PATH] [--importtime]

A 1 MiB image takes milliseconds to copy, so what is timed is the command's own overhead:
the interpreter, its imports, and tearing down. Measured in the same run, interleaved run by
run so that a noisy machine weighs on every command alike:

- `python -c pass` with diskflow's interpreter: the floor of any Python command;
- `cp` and `qemu-img convert -O raw` of the same file, and `curl` of the same URL: what the
  same copy costs a native tool;
- `diskflow import --progress none` of the file, and of the URL from `python -m http.server`
  on loopback; `diskflow import --help` and `diskflow --help`.

Each command runs once before timing. Python's bytecode cache goes to a scratch directory
(PYTHONPYCACHEPREFIX) even where PYTHONDONTWRITEBYTECODE is set, since the container image
compiles its modules ahead (compileall): without it, every edited module would be compiled
again in every run. Prints median and fastest wall time, median CPU time (user + system:
less swayed by a busy machine than wall time), each median's wall time's ratio to
`python -c pass` and to `qemu-img convert`, and whether the imports' medians meet --target.
With --importtime, also the slowest imports (cumulative, `python -X importtime`) of a file
import.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

IMAGE_SIZE = 1 << 20


def default_diskflow() -> str:
    beside = Path(sys.executable).with_name("diskflow")
    return str(beside) if beside.exists() else shutil.which("diskflow") or "diskflow"


def python_of(diskflow: str) -> str:
    """The interpreter a console script runs under (its #! line), else this one."""
    first = Path(diskflow).read_bytes().split(b"\n", 1)[0] if Path(diskflow).is_file() else b""
    return first[2:].decode().strip() if first.startswith(b"#!/") else sys.executable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def http_server(directory: Path, env: dict[str, str]) -> Iterator[str]:
    """`python -m http.server` on loopback serving `directory`, in a process of its own."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory",
         str(directory), str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the HTTP server did not start") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait()


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of one run of `cmd`, which must succeed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.decode()}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return elapsed, cpu


def slowest_imports(cmd: list[str], env: dict[str, str], count: int) -> list[tuple[int, str]]:
    """The `count` imports with the largest cumulative time (µs) in one run of `cmd`."""
    done = subprocess.run(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**env, "PYTHONPROFILEIMPORTTIME": "1"},
    )  # fmt: skip
    found = re.findall(r"^import time:\s+\d+ \|\s+(\d+) \|(\s*\S+)$", done.stderr, re.MULTILINE)
    return sorted(((int(cumulative), name) for cumulative, name in found), reverse=True)[:count]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="timed runs of each command")
    parser.add_argument("--target", type=float, default=0.25, help="seconds an import may take")
    parser.add_argument("--diskflow", default=default_diskflow(), help="the diskflow command")
    parser.add_argument("--importtime", action="store_true", help="show the slowest imports")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="diskflow-startup-") as scratch:
        work = Path(scratch)
        (work / "www").mkdir()
        image = work / "www" / "1MiB.raw"
        image.write_bytes(os.urandom(IMAGE_SIZE))
        out = str(work / "out.img")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
        python = python_of(args.diskflow)
        diskflow = [args.diskflow, "import", "--progress", "none"]

        with http_server(work / "www", env) as web:
            url = f"{web}/{image.name}"
            commands = {
                "python -c pass": [python, "-c", "pass"],
                "cp": ["cp", str(image), out],
                "qemu-img convert": ["qemu-img", "convert", "-O", "raw", str(image), out],
                "curl (HTTP)": ["curl", "-sf", "-o", out, url],
                "diskflow import FILE": [*diskflow, str(image), out],
                "diskflow import URL": [*diskflow, url, out],
                "diskflow import --help": [args.diskflow, "import", "--help"],
                "diskflow --help": [args.diskflow, "--help"],
            }
            commands = {n: c for n, c in commands.items() if shutil.which(c[0])}
            times: dict[str, list[float]] = {name: [] for name in commands}
            cpus: dict[str, list[float]] = {name: [] for name in commands}
            for cmd in commands.values():
                timed(cmd, env)  # warm: bytecode compiled, files in the page cache
            for _ in range(args.runs):
                for name, cmd in commands.items():
                    wall, cpu = timed(cmd, env)
                    times[name].append(wall)
                    cpus[name].append(cpu)
            if args.importtime:
                top = slowest_imports(commands["diskflow import FILE"], env, 25)

    median = {name: statistics.median(values) for name, values in times.items()}
    floor, native = median.get("python -c pass"), median.get("qemu-img convert")
    load = os.getloadavg()[0]
    print(f"{args.runs} runs each; {python}; {os.cpu_count()} CPUs, load average {load:.1f}")
    print(
        f"{'command':<24} {'median':>9} {'fastest':>9} {'CPU':>9} {'÷ python':>9} "
        f"{'÷ qemu-img':>11}"
    )
    for name, values in times.items():
        ratios = [f"{median[name] / base:.1f}x" if base else "-" for base in (floor, native)]
        cpu = statistics.median(cpus[name])
        print(
            f"{name:<24} {median[name] * 1000:7.0f}ms {min(values) * 1000:7.0f}ms "
            f"{cpu * 1000:7.0f}ms {ratios[0]:>9} {ratios[1]:>11}"
        )
    met = True
    for name in ("diskflow import FILE", "diskflow import URL"):
        ok = median[name] < args.target
        met &= ok
        verdict = "met" if ok else "NOT met"
        print(f"target {args.target:.2f}s, {name}: {verdict} ({median[name]:.3f}s)")
    if args.importtime:
        print("slowest imports of `diskflow import FILE` (cumulative, one run):")
        for micros, name in top:
            print(f"{micros / 1000:8.1f}ms {name}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
