"""Benchmark the archive content type on a tar of many members: time and peak RSS.

    python bench/archive_bench.py [--members 200000,1000000] [--baselines gnu-tar[,tarfile]]

For each count N it writes a .tar.xz of N headers of the same directory `d/` (a few dozen KB
that expand to N * 512 bytes: the cheapest archive that costs an extractor one step per member)
and extracts it, each way in a fresh process, into an empty directory:

- diskflow: `import_image(..., ImportOptions(content_type=ARCHIVE, archive_max_members=N))`;
- gnu-tar: `tar -xJf` (its peak RSS is read from the child's rusage);
- tarfile (only if asked: here it took about 1 ms a member): Python's
  `tarfile.open(mode="r|xz").extractall(filter="data")` (no filter where the interpreter has
  none), which is what diskflow did before it made members itself.

It prints wall and CPU seconds (CPU time is what to compare on a busy machine) and peak RSS
(ru_maxrss) of each, and diskflow's ratios to each baseline. Time starts after the imports;
the diskflow and tarfile RSS include the interpreter and its imports.
"""

from __future__ import annotations

import argparse
import json
import lzma
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def make_archive(path: Path, members: int) -> None:
    """A .tar.xz of `members` headers of the directory `d/`, and the end marker."""
    info = tarfile.TarInfo("d/")
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    header = info.tobuf(format=tarfile.USTAR_FORMAT)
    batch = header * 2048
    with lzma.open(path, "wb", preset=6) as out:
        for done in range(0, members, len(batch) // len(header)):
            count = min(members - done, len(batch) // len(header))
            out.write(batch[: count * len(header)])
        out.write(bytes(2 * tarfile.BLOCKSIZE))


def extract(way: str, source: Path, dest: Path, members: int) -> None:
    """Extract `source` into `dest` the given way, in this process (or its child)."""
    if way == "diskflow":
        from importer import ContentType, ImportOptions, import_image

        options = ImportOptions(content_type=ContentType.ARCHIVE, archive_max_members=members)
        import_image(str(source), str(dest), options=options)
    elif way == "gnu-tar":
        subprocess.run(["tar", "-xJf", str(source), "-C", str(dest)], check=True)
    else:
        with tarfile.open(source, mode="r|xz") as archive:
            if hasattr(tarfile, "data_filter"):
                archive.extractall(dest, filter="data")
            else:
                archive.extractall(dest)


def child(way: str, source: Path, dest: Path, members: int) -> None:
    """Run one extraction and print its wall and CPU seconds and peak RSS (KiB) as JSON."""
    if way == "diskflow":
        import importer  # noqa: F401  (a second of imports, not part of the extraction)
    who = resource.RUSAGE_CHILDREN if way == "gnu-tar" else resource.RUSAGE_SELF
    before = resource.getrusage(who)
    started = time.monotonic()
    extract(way, source, dest, members)
    seconds = time.monotonic() - started
    after = resource.getrusage(who)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    print(json.dumps({"seconds": seconds, "cpu": cpu, "rss_kib": after.ru_maxrss}))


def measure(way: str, source: Path, workdir: Path, members: int) -> dict[str, float]:
    """Seconds and peak RSS of one extraction, in a fresh process, into an empty directory."""
    dest = workdir / f"out-{way}"
    dest.mkdir()
    try:
        cmd = [sys.executable, __file__, "--child", way, str(source), str(dest), str(members)]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        return json.loads(done.stdout.splitlines()[-1])
    finally:
        shutil.rmtree(dest)


def row(members: int, way: str, result: dict[str, float]) -> str:
    """One line of the table: wall and CPU seconds and peak RSS of one extraction."""
    return (
        f"{members:>9} {way:<9} {result['seconds']:>7.1f} {result['cpu']:>7.1f} "
        f"{result['rss_kib'] / 1024:>6.0f} MiB"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", default="200000,1000000", help="comma-separated counts")
    parser.add_argument("--baselines", default="gnu-tar", help="of: gnu-tar,tarfile")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        way, source, dest, members = args.child
        child(way, Path(source), Path(dest), int(members))
        return 0
    baselines = [b for b in args.baselines.split(",") if b]
    print(
        f"python {sys.version.split()[0]}, tarfile data filter: {hasattr(tarfile, 'data_filter')}"
    )
    print(f"{'members':>9} {'way':<9} {'wall s':>7} {'CPU s':>7} {'peak RSS':>10}  diskflow vs it")
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        workdir = Path(work)
        for members in (int(n) for n in args.members.split(",")):
            source = workdir / f"headers-{members}.tar.xz"
            make_archive(source, members)
            ours = measure("diskflow", source, workdir, members)
            print(row(members, "diskflow", ours), flush=True)
            for way in baselines:
                theirs = measure(way, source, workdir, members)
                ratios = {key: ours[key] / theirs[key] for key in ("seconds", "cpu", "rss_kib")}
                print(
                    f"{row(members, way, theirs)}  wall x{ratios['seconds']:.1f}, "
                    f"CPU x{ratios['cpu']:.1f}, RSS x{ratios['rss_kib']:.1f}",
                    flush=True,
                )
            source.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
