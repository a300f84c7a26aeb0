"""Benchmark publishing to S3: diskflow's S3 store against `aws s3 cp`, to the same moto server.

    python bench/publish_bench.py [--size 1G] [--repeat 3] [--part-size 8M] [--concurrency 8]

It writes --size bytes of incompressible data (os.urandom) as the image, starts moto's S3 server
(`moto_server`, in its own process so that the peak RSS of the commands, forked from this
one, does not count the objects moto holds) on loopback with one bucket, and times,
interleaved and --repeat times, two commands that each start a fresh process:

1. diskflow: `publish_build` to an S3Store (the image, multipart, with its sha256 taken in the
   upload pass and every part carrying its own; then its .sha256, the manifest and
   latest.json, every object checked with a HEAD);
2. `aws s3 cp IMAGE s3://bench/...` with the CLI's defaults (8 MiB parts, 10 threads).

After each run the object is read back and its sha256 compared with the image's (not timed),
then deleted. Prints both medians and the ratio (aws seconds / diskflow seconds).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from import_bench import MIB, BenchError, free_port, log, machine_info, parse_size, sha256, timed

BUCKET = "bench"
REPO = Path(__file__).resolve().parent.parent

# The diskflow side, in a child process like the aws CLI, so both pay their start-up.
DISKFLOW = """
import sys
from pathlib import Path
from importer import HttpOptions, S3Options
from pipelines.manifest import BuildManifest, Inputs, KickstartRecord, Settings
from pipelines.publish import publish_build
from pipelines.publish.s3 import S3Store

endpoint, url, image, build, part_size, concurrency = sys.argv[1:]
store = S3Store(url, S3Options(endpoint=endpoint), HttpOptions(),
                part_size=int(part_size), concurrency=int(concurrency))
manifest = BuildManifest(
    template="bench", build_id=build, kickstart=KickstartRecord("bench.ks", "RHEL9", "0" * 64),
    inputs=Inputs(), settings=Settings("linux2022", 1 << 30, 1 << 30, 1), tools={}, durations={},
)
publish_build(store, Path(image), manifest)
"""


def start_moto(bin_dir: Path, aws: str) -> tuple[subprocess.Popen[bytes], str]:
    """moto's S3 server on a free loopback port, with BUCKET made; the process and its URL."""
    port = free_port()
    server = subprocess.Popen(
        [str(bin_dir / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_for_port(port)
        subprocess.run(
            [aws, "--endpoint-url", endpoint, "s3", "mb", f"s3://{BUCKET}"],
            check=True,
            capture_output=True,
        )
    except BaseException:
        server.terminate()
        server.wait()
        raise
    return server, endpoint


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("1G"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--part-size", type=parse_size, default=parse_size("8M"))
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    bin_dir = Path(sys.executable).parent
    aws = str(bin_dir / "aws")

    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1"
    )
    with tempfile.TemporaryDirectory(prefix="diskflow-publish-bench-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        image = work / "bench.qcow2"
        with image.open("wb") as out:
            for _ in range(args.size // MIB):
                out.write(os.urandom(MIB))
        digest = sha256(image)
        print(json.dumps(machine_info(work)))
        server, endpoint = start_moto(bin_dir, aws)
        s3 = [aws, "--endpoint-url", endpoint, "s3"]
        try:
            times: dict[str, list[float]] = {"diskflow": [], "aws": []}
            cpu: dict[str, list[tuple[float, float]]] = {"diskflow": [], "aws": []}
            peak: dict[str, float] = {"diskflow": 0.0, "aws": 0.0}
            for run in range(args.repeat):
                build = uuid.uuid4().hex
                commands = {
                    "diskflow": (
                        [
                            *(sys.executable, "-c", DISKFLOW, endpoint, f"s3://{BUCKET}/df"),
                            *(str(image), build, str(args.part_size), str(args.concurrency)),
                        ],
                        f"df/bench/{build}/bench.qcow2",
                    ),
                    "aws": (
                        [*s3, "cp", "--only-show-errors", str(image), f"s3://{BUCKET}/aws/{build}"],
                        f"aws/{build}",
                    ),
                }
                for tool, (cmd, key) in commands.items():
                    log(f"run {run + 1}: {tool}")
                    before = (children_cpu(), process_cpu(server.pid))
                    seconds, rss = timed(cmd, work / "run.log")
                    times[tool].append(seconds)
                    cpu[tool].append(
                        (children_cpu() - before[0], process_cpu(server.pid) - before[1])
                    )
                    peak[tool] = max(peak[tool], rss)
                    check_and_delete(endpoint, key, digest)
        finally:
            server.terminate()
            server.wait()
    df, cli = statistics.median(times["diskflow"]), statistics.median(times["aws"])
    mib = args.size / MIB
    print(f"\n{mib:.0f} MiB of random data to moto S3, median of {args.repeat}:")
    for name, tool, seconds in (("diskflow publish", "diskflow", df), ("aws s3 cp", "aws", cli)):
        client = statistics.median(c for c, _ in cpu[tool])
        server = statistics.median(m for _, m in cpu[tool])
        print(
            f"  {name:<17} {seconds:6.2f} s {mib / seconds:6.1f} MiB/s  "
            f"CPU {client:5.2f} s (moto {server:5.2f} s)  peak RSS {peak[tool]:.0f} MiB"
        )
    print(f"  ratio (aws / diskflow) {cli / df:.2f}x")
    if args.json:
        results = {"seconds": times, "cpu_seconds_client_moto": cpu, "peak_rss_mib": peak}
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def children_cpu() -> float:
    """CPU seconds of the reaped children so far: the timed command, once it has ended."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def process_cpu(pid: int) -> float:
    """CPU seconds a running process has used (moto's server)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for_port(port: int, deadline: float = 10.0) -> None:
    end = time.monotonic() + deadline
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > end:
                raise BenchError(f"moto_server did not listen on {port}") from None
            time.sleep(0.05)


def check_and_delete(endpoint: str, key: str, digest: str) -> None:
    """Read the uploaded object back, compare its sha256 with the image's, and delete it."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    body = client.get_object(Bucket=BUCKET, Key=key)["Body"]
    hashed = hashlib.sha256()
    while chunk := body.read(8 * MIB):
        hashed.update(chunk)
    if hashed.hexdigest() != digest:
        raise BenchError(f"s3://{BUCKET}/{key} does not hold the image")
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=key.rsplit("/", 1)[0])
    for item in listed.get("Contents", []):
        client.delete_object(Bucket=BUCKET, Key=item["Key"])


if __name__ == "__main__":
    sys.exit(main())
