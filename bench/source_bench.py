"""Benchmark the source side: parallel ranged downloads, and S3 imports against the
`aws s3 cp` + `qemu-img convert` path.

    python bench/source_bench.py [--size 2G] [--rate 32M] [--connections 4,8] [--json FILE]

It builds the same image as import_bench.py (half zero blocks) and its .zst and .qcow2, then:

1. Throttled server: the tests' fault-injecting server capping each connection at --rate bytes
   per second; `diskflow import --connections N` for N = 1 and each of --connections. With a
   per-connection cap, N connections should come close to N times faster.
2. nginx on loopback (no cap): --connections 1 against 4, to check that parallel parts cost
   nothing where one stream is already fast.
3. S3 through moto's server on loopback: `diskflow import s3://...` against
   `aws s3 cp` to a scratch file, then `zstd -dc` or `qemu-img convert`, then `sync`.

Every run ends with its output durable and compared with the raw image.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from import_bench import (
    SOURCES,
    Nginx,
    free_port,
    log,
    machine_info,
    make_raw,
    make_sources,
    parse_size,
    remove,
    sha256,
    timed,
    verify,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.support.faultserver import FaultServer

BUCKET = "bench"


def median_run(
    cmd: list[str], raw: Path, out: Path, logs: Path, repeat: int
) -> tuple[float, float]:
    """Median wall seconds and highest peak RSS of `cmd`, checking its output every time."""
    times, peak = [], 0.0
    for _ in range(repeat):
        remove(out)
        subprocess.run(["sync"], check=True)
        seconds, rss = timed(cmd, logs)
        verify(raw, out, shlex.join(cmd[:3]))
        times.append(seconds)
        peak = max(peak, rss)
    remove(out)
    return {"seconds": statistics.median(times), "rss": peak}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("2G"))
    parser.add_argument(
        "--rate", type=parse_size, default=parse_size("32M"), help="bytes/s per connection"
    )
    parser.add_argument("--connections", default="4,8")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    bin_dir = Path(sys.executable).parent
    diskflow, aws = str(bin_dir / "diskflow"), str(bin_dir / "aws")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="diskflow-source-bench-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        raw = work / "disk.raw"
        make_raw(raw, args.size)
        make_sources(work, raw)
        zst, qcow2 = work / SOURCES["zst"], work / SOURCES["qcow2"]
        out, logs = work / "out.img", work / "run.log"
        check = ["--checksum", f"sha256:{sha256(zst)}", "--progress", "none"]
        print(json.dumps(machine_info(work)))

        faults = FaultServer(str(work))
        try:
            token = uuid.uuid4().hex
            faults.configure(token, rate=args.rate)
            url = faults.url(token, zst.name)
            counts = [1, *(int(n) for n in args.connections.split(","))]
            for n in counts:
                log(f"throttled, {n} connection(s)")
                cmd = [diskflow, "import", url, str(out), "--connections", str(n), *check]
                results[f"throttled-{n}"] = median_run(cmd, raw, out, logs, args.repeat)
        finally:
            faults.close()

        (work / "nginx").mkdir()
        with Nginx(work, work / "nginx") as nginx:
            for n in (1, 4):
                log(f"nginx, {n} connection(s)")
                url = f"{nginx.base_url}/{zst.name}"
                cmd = [diskflow, "import", url, str(out), "--connections", str(n), *check]
                results[f"nginx-{n}"] = median_run(cmd, raw, out, logs, args.repeat)

        results.update(s3_cases(work, raw, zst, qcow2, out, logs, diskflow, aws, args.repeat))

    base = results["throttled-1"]["seconds"]
    print(f"\nthrottled server, {args.rate} bytes/s per connection:")
    for key, value in results.items():
        if key.startswith("throttled-"):
            seconds = value["seconds"]
            print(f"  {key.split('-')[1]:>2} connections {seconds:7.2f} s  x{base / seconds:.2f}")
    one, four = results["nginx-1"]["seconds"], results["nginx-4"]["seconds"]
    print(
        f"nginx loopback: 1 connection {one:.2f} s, 4 connections {four:.2f} s (x{one / four:.2f})"
    )
    for case in ("zst", "qcow2"):
        df, cli = results[f"s3-{case}-diskflow"]["seconds"], results[f"s3-{case}-aws"]["seconds"]
        print(f"S3 {case}: diskflow {df:.2f} s, aws s3 cp + convert {cli:.2f} s (x{cli / df:.2f})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def s3_cases(
    work: Path,
    raw: Path,
    zst: Path,
    qcow2: Path,
    out: Path,
    logs: Path,
    diskflow: str,
    aws: str,
    repeat: int,
) -> dict[str, dict]:
    """diskflow against `aws s3 cp` + convert, both through moto's S3 server on loopback."""
    from moto.server import ThreadedMotoServer

    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1"
    )
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    s3 = [aws, "--endpoint-url", endpoint, "s3"]
    results = {}
    try:
        subprocess.run([*s3, "mb", f"s3://{BUCKET}"], check=True, capture_output=True)
        for source in (zst, qcow2):
            subprocess.run(
                [*s3, "cp", str(source), f"s3://{BUCKET}/{source.name}"],
                check=True,
                capture_output=True,
            )
        scratch = work / "scratch"
        for case, source, convert in (
            ("zst", zst, f"zstd -dc {scratch} > {out}"),
            ("qcow2", qcow2, f"qemu-img convert -f qcow2 -O raw {scratch} {out}"),
        ):
            log(f"S3 {case}")
            cmd = [
                *(diskflow, "import", f"s3://{BUCKET}/{source.name}", str(out)),
                *("--s3-endpoint", endpoint, "--scratch-dir", str(work), "--progress", "none"),
                *("--checksum", f"sha256:{sha256(source)}"),
            ]
            results[f"s3-{case}-diskflow"] = median_run(cmd, raw, out, logs, repeat)
            copy = [*s3, "cp", "--only-show-errors", f"s3://{BUCKET}/{source.name}", str(scratch)]
            script = (
                f"{shlex.join(copy)} && {convert} && sync {out}; rc=$?; rm -f {scratch}; exit $rc"
            )
            results[f"s3-{case}-aws"] = median_run(["bash", "-c", script], raw, out, logs, repeat)
    finally:
        server.stop()
    return results


if __name__ == "__main__":
    sys.exit(main())
