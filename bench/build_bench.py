"""Benchmark a template build, stage by stage, against the shell script a CI job would run.

    python bench/build_bench.py [--repeat 3] [--disk-size 2G] [--data 512M] [--json FILE]

It builds the tests' minimal installer (Debian's cloud kernel and a busybox initramfs, see
tests/support/installer.py) and a template whose %post writes --data bytes to the disk from 8 MiB
on: half from /dev/urandom, a quarter of machine code (copies of busybox) and text (`seq`), a
quarter of zeros. It starts moto's S3 server on loopback in its own process with one bucket
and runs, interleaved and --repeat times (the order swapped every repeat), two builds of it:

1. diskflow: `diskflow build KS --publish-to s3://bench/diskflow --s3-endpoint URL --accel tcg
   --network none --progress json --force`. validate, install and finalize come from the
   manifest's durations; publish is the time from the finalize "done" event to the publish
   "done" event (the S3 client's set-up included); the total is the command's wall time.
2. script: what a hand-written CI script does, each command timed: `qemu-img create`, the same
   `virt-install` argv as diskflow's (`pipelines.virtinstall.virt_install_command`, `--wait=-1`),
   `qemu-img convert -c -O qcow2 -o compression_type=zstd`, `sha256sum`, and `aws s3 cp` of the
   image and of its .sha256. It does not validate the kickstart.

After each run (not timed) the image must start with the installer's marker (written only when
%post succeeded), and the uploaded image is read back, its sha256 checked, and deleted.
Prints the median seconds per stage of both, the ratio (script seconds / diskflow seconds) and
the publish throughput of diskflow against `aws s3 cp` of the image. Every domain, virt-install
copy and temporary file of the benchmark is removed at the end, on error and on Ctrl-C/SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from import_bench import (
    MIB,
    BenchError,
    default_diskflow,
    log,
    machine_info,
    parse_size,
    run,
    timed,
)
from publish_bench import BUCKET, REPO, check_and_delete, process_cpu, start_moto

sys.path.insert(0, str(REPO))
from importer.events import Event
from pipelines.accel import Accel, choose_accel
from pipelines.template import Template, load_template
from pipelines.virtinstall import (
    KICKSTART_NAME,
    VIRTINST_SCRATCH,
    BuildOptions,
    _remove_virtinst_leftovers,
    _virtinst_files,
    _with_private_media,
    destroy_domain,
    known_os_variant,
    libvirt_uri,
    virt_install_command,
)
from tests.support.installer import build_installer, expected_marker, write_template

STAGES = ("validate", "install", "finalize", "boot-test", "publish")  # the script: no boot test
TOOLS = ("diskflow", "script")
DISKFLOW_STEPS = (
    "install: to the first console line",
    "install: %post",
    "install: last console line to done",
    "publish: start to done event",
)
SCRIPT_STEPS = ("create", "virt-install", "convert", "sha256sum", "cp-image", "cp-sha256")
OPTIONS = BuildOptions(accel=Accel.TCG, network="none")
URI = libvirt_uri(OPTIONS.connect)  # what a build without --connect uses
DATA_OFFSET_MIB = 8  # the installer's marker is in the first MiB
TAIL_MIB = 2  # its second marker is 1 MiB before the end of the disk
POOL_MIB = 4  # the machine-code and text pools the %post copies
POST_DONE = "build-bench: wrote"  # the %post's last line


@dataclass(frozen=True)
class Setup:
    """What every run shares."""

    root: Path  # searchable by QEMU's user: the install disks live below it
    name: str  # the template's name; every domain and virt-install copy of the run holds it
    kickstart: Path
    template: Template
    os_variant: str
    virt_install: str
    diskflow: str
    aws: str
    endpoint: str
    moto_pid: int


@dataclass
class Run:
    tool: str
    seconds: float  # wall time of the whole build
    stages: dict[str, float]
    image_bytes: int
    moto_cpu: float  # CPU seconds moto's server used during the run
    steps: dict[str, float] = field(default_factory=dict)  # the script's commands; diskflow's rest

    @property
    def publish_mib_s(self) -> float:
        """Image MiB over the time that published it (diskflow: the stage; script: `aws s3 cp`)."""
        seconds = self.stages["publish"] if self.tool == "diskflow" else self.steps["cp-image"]
        return self.image_bytes / MIB / seconds


def post_script(data: int) -> str:
    """The %post body: `data` bytes to /dev/vda from DATA_OFFSET_MIB on, in 1 MiB writes."""
    total = data // MIB
    random_mib = total // 2
    files_mib = total // 4 // POOL_MIB * POOL_MIB  # alternating machine-code and text pools
    zero_mib = total - random_mib - files_mib
    pool = POOL_MIB * MIB
    return f"""\
say() {{ echo "build-bench: $*"; }}
pool() {{ head -c {pool} >"$1" && [ "$(wc -c <"$1")" -eq {pool} ] || exit 1; }}
cat /bin/busybox /bin/busybox /bin/busybox | pool /tmp/code
seq 1 800000 | pool /tmp/text
say "{random_mib} MiB from /dev/urandom"
dd if=/dev/urandom of=/dev/vda bs=1M count={random_mib} seek={DATA_OFFSET_MIB} \\
    iflag=fullblock conv=notrunc 2>/dev/null || exit 1
say "{files_mib} MiB of machine code and text"
at={DATA_OFFSET_MIB + random_mib}
i=0
while [ $i -lt {files_mib // POOL_MIB} ]; do
    if [ $((i % 2)) -eq 0 ]; then src=/tmp/code; else src=/tmp/text; fi
    dd if=$src of=/dev/vda bs=1M seek=$((at + i * {POOL_MIB})) conv=notrunc 2>/dev/null || exit 1
    i=$((i + 1))
done
say "{zero_mib} MiB of zeros"
dd if=/dev/zero of=/dev/vda bs=1M count={zero_mib} seek=$((at + {files_mib})) \\
    conv=notrunc 2>/dev/null || exit 1
sync
echo "{POST_DONE} {total} MiB"
"""


def run_step(cmd: list[str], output: Path, what: str) -> float:
    """Wall seconds of `cmd` (see import_bench.timed); on failure, the last lines it printed."""
    try:
        seconds, _ = timed(cmd, output)
    except BenchError:
        lines = output.read_text(errors="replace").strip().splitlines()[-20:]
        detail = "\n".join(f"  {line[:300]}" for line in lines)
        raise BenchError(f"{what} failed ({shlex.join(cmd[:3])} ...):\n{detail}") from None
    return seconds


def check_image(image: Path, kickstart: Path, what: str) -> None:
    """The image must start with the installer's marker: %post ran to the end."""
    head = image.with_name(f"{image.name}.head")
    try:
        dd = ["qemu-img", "dd", "-f", "qcow2", "-O", "raw", "bs=4096", "count=1"]
        run([*dd, f"if={image}", f"of={head}"])
        if not head.read_bytes().startswith(expected_marker(kickstart)):
            raise BenchError(f"{what}: {image.name} lacks the installer's marker: %post failed")
    finally:
        head.unlink(missing_ok=True)


def diskflow_run(setup: Setup, number: int) -> Run:
    output, vms = setup.root / "output", setup.root / "vm"
    vms.mkdir(mode=0o711, exist_ok=True)
    cmd = [
        setup.diskflow, "build", str(setup.kickstart), "--output", str(output),
        "--workdir", str(vms), "--accel", "tcg", "--network", "none",
        "--publish-to", f"s3://{BUCKET}/diskflow", "--s3-endpoint", setup.endpoint,
        "--progress", "json", "--force",
    ]  # fmt: skip
    events_file = setup.root / "diskflow.jsonl"
    moto = process_cpu(setup.moto_pid)
    seconds = run_step(cmd, events_file, f"diskflow build (run {number})")
    moto = process_cpu(setup.moto_pid) - moto
    events = []
    for line in events_file.read_text().splitlines():
        if line.startswith("{"):
            made = Event.from_json(json.loads(line))  # stderr's lines (none when all is well)
            events.append({"time": made.time, "type": made.type, "message": made.message,
                           **made.fields})  # fmt: skip

    def when(stage: str, kind: str, text: str = "", first: bool = False) -> float:
        """The time of the last (or first) event of that stage and type."""
        times = [
            e["time"]
            for e in events
            if e.get("stage") == stage and e["type"] == kind and text in e["message"]
        ]
        if not times:
            raise BenchError(f"diskflow run {number}: no {stage} {kind} event {text!r}")
        return times[0] if first else times[-1]

    result = events[-1] if events else {}
    if result.get("type") != "result":
        raise BenchError(f"diskflow run {number}: its last line is not the result: {result}")
    manifest, image = result["manifest"], Path(result["image"])
    durations = manifest["durations"]
    stages = {stage: durations[stage] for stage in STAGES[:3]}
    # The boot test runs between finalize and publish: timed by its events, like publish.
    stages["boot-test"] = when("boot-test", "done") - when("finalize", "done")
    stages["publish"] = when("publish", "done") - when("boot-test", "done")
    # Where the install's time goes (event times are those of diskflow's 0.25 s polls).
    spans = (
        (when("install", "start"), when("install", "console", first=True)),
        (when("install", "console", "running %post"), when("install", "console", POST_DONE)),
        (when("install", "console"), when("install", "done")),
        (when("publish", "start"), when("publish", "done")),
    )
    steps = {step: end - start for step, (start, end) in zip(DISKFLOW_STEPS, spans, strict=True)}
    check_image(image, setup.kickstart, f"diskflow run {number}")
    key = f"diskflow/{setup.name}/{manifest['build_id']}/{image.name}"
    check_and_delete(setup.endpoint, key, manifest["output"]["sha256"])
    shutil.rmtree(output / setup.name)
    steps["other"] = seconds - sum(stages.values())
    return Run("diskflow", seconds, stages, manifest["output"]["size"], moto, steps)


def script_run(setup: Setup, number: int) -> Run:
    work = setup.root / f"script-{number}"
    work.mkdir(mode=0o711)  # as diskflow: QEMU needs to search it, not to list it
    domain = f"script-{setup.name}-{number}"
    # Kernel and initrd linked under names holding the domain's, as diskflow does, so that
    # the copies virt-install leaves when it is killed can be told apart and removed.
    template = _with_private_media(setup.template, work, domain)
    kickstart = work / KICKSTART_NAME
    shutil.copyfile(setup.kickstart, kickstart)
    disk, image = work / "disk.qcow2", work / f"{setup.name}.qcow2"
    virt_install = virt_install_command(
        setup.virt_install, template, setup.os_variant, OPTIONS, choose_accel(OPTIONS.accel),
        domain, disk, kickstart, work / "console.log", work / "installer.log",
    )  # fmt: skip
    cp = [setup.aws, "--endpoint-url", setup.endpoint, "s3", "cp", "--only-show-errors"]
    target = f"s3://{BUCKET}/script/{number}/{image.name}"
    commands = {
        "create": ["qemu-img", "create", "-q", "-f", "qcow2", str(disk), str(template.disk_size)],
        "virt-install": virt_install,
        "convert": ["qemu-img", "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd",
                    str(disk), str(image)],
        "sha256sum": ["bash", "-c", f"cd {shlex.quote(str(work))} && "
                      f"sha256sum {image.name} > {image.name}.sha256"],
        "cp-image": [*cp, str(image), target],
        "cp-sha256": [*cp, f"{image}.sha256", f"{target}.sha256"],
    }  # fmt: skip
    steps: dict[str, float] = {}
    before = _virtinst_files()
    moto = process_cpu(setup.moto_pid)
    try:
        started = time.perf_counter()
        for step, cmd in commands.items():
            steps[step] = run_step(cmd, work / f"{step}.log", f"script {step} (run {number})")
        seconds = time.perf_counter() - started
    finally:
        destroy_domain(URI, domain, lambda _stage, _kind, message: log(message))
        _remove_virtinst_leftovers(before, domain)
    moto = process_cpu(setup.moto_pid) - moto
    stages = {
        "install": steps["create"] + steps["virt-install"],
        "finalize": steps["convert"] + steps["sha256sum"],
        "publish": steps["cp-image"] + steps["cp-sha256"],
    }
    check_image(image, setup.kickstart, f"script run {number}")
    digest = Path(f"{image}.sha256").read_text().split()[0]
    check_and_delete(setup.endpoint, f"script/{number}/{image.name}", digest)
    size = image.stat().st_size
    shutil.rmtree(work)
    return Run("script", seconds, stages, size, moto, steps)


def remove_leftovers(name: str) -> None:
    """Every domain and virt-install copy whose name holds `name`: this benchmark's only."""
    listed = subprocess.run(
        ["virsh", "--connect", URI, "list", "--all", "--name"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    for domain in listed.stdout.split():
        if name in domain:
            log(f"removing domain {domain}")
            destroy_domain(URI, domain, lambda _stage, _kind, message: log(message))
    for copy in VIRTINST_SCRATCH.glob(f"virtinst-*{name}*"):
        copy.unlink(missing_ok=True)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summary(runs: list[Run]) -> dict[str, dict[str, float | None]]:
    """Per tool: the median of every stage, of the total and of the publish throughput."""
    medians: dict[str, dict[str, float | None]] = {}
    for tool in TOOLS:
        mine = [r for r in runs if r.tool == tool]
        row = {stage: median([r.stages[stage] for r in mine if stage in r.stages])
               for stage in STAGES}  # fmt: skip
        row |= {step: median([r.steps[step] for r in mine]) for step in mine[0].steps}
        row |= {
            "total": median([r.seconds for r in mine]),
            "image_mib": median([r.image_bytes / MIB for r in mine]),
            "publish_mib_s": median([r.publish_mib_s for r in mine]),
            "moto_cpu": median([r.moto_cpu for r in mine]),
        }
        medians[tool] = row
    return medians


def report(medians: dict[str, dict[str, float | None]]) -> str:
    def cell(value: float | None, fmt: str = ".2f") -> str:
        return "-" if value is None else format(value, fmt)

    df, sh = medians["diskflow"], medians["script"]
    lines = [f"{'stage':34}{'diskflow s':>11}{'script s':>10}{'script/df':>11}"]
    rows = [*STAGES, "other", "total"]
    for row in rows:
        mine, theirs = df.get(row), None if row == "other" else sh.get(row)
        ratio = theirs / mine if mine and theirs else None
        label = {
            "other": "other (start-up, checks, hand-over)",
            "install": "install (script: + qemu-img create)",
            "finalize": "finalize (script: + sha256sum)",
        }.get(row, row)
        times = cell(ratio) + ("x" if ratio else "")
        lines.append(f"{label:34}{cell(mine):>11}{cell(theirs):>10}{times:>11}")
    lines.append("script's commands: " + ", ".join(f"{s} {cell(sh[s])}" for s in SCRIPT_STEPS))
    lines.append("diskflow's events: " + ", ".join(f"{s} {cell(df[s])}" for s in DISKFLOW_STEPS))
    lines.append("")
    lines.append("publish of the image:")
    for name, row, how in (
        ("diskflow", df, "publish stage: client, image, .sha256, manifests, HEADs"),
        ("aws s3 cp", sh, "`aws s3 cp` of the image alone"),
    ):
        seconds = df["publish"] if row is df else sh["cp-image"]
        lines.append(
            f"  {name:10}{cell(row['image_mib'], '.0f'):>5} MiB  {cell(seconds):>6} s "
            f"{cell(row['publish_mib_s'], '.1f'):>7} MiB/s  moto CPU {cell(row['moto_cpu'])} s"
            f"  ({how})"
        )
    if df["publish_mib_s"] and sh["publish_mib_s"]:
        ratio = df["publish_mib_s"] / sh["publish_mib_s"]
        lines.append(f"  throughput ratio (diskflow / aws) {ratio:.2f}x")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="builds of each (default 3)")
    parser.add_argument(
        "--disk-size", type=parse_size, default=parse_size("2G"),
        help="the template's disk, whole MiB (default 2G)",
    )  # fmt: skip
    parser.add_argument(
        "--data", type=parse_size, default=parse_size("512M"),
        help="what the %%post writes to the disk, whole MiB (default 512M)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--diskflow", default=default_diskflow(), help="the diskflow command")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.data < 4 * POOL_MIB * MIB:
        parser.error(f"--data must be at least {4 * POOL_MIB} MiB")
    if args.data + (DATA_OFFSET_MIB + TAIL_MIB) * MIB > args.disk_size:
        parser.error(f"--data must leave {DATA_OFFSET_MIB + TAIL_MIB} MiB of --disk-size free")
    return args


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up as on Ctrl-C
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1"
    )
    bin_dir = Path(sys.executable).parent
    aws = str(bin_dir / "aws")
    name = f"buildbench-{secrets.token_hex(3)}"
    # QEMU runs as libvirt-qemu and must reach the disks below this directory.
    root = Path(tempfile.mkdtemp(prefix="diskflow-build-bench-"))
    root.chmod(0o711)
    server: subprocess.Popen[bytes] | None = None
    try:
        machine = machine_info(root)
        machine_line = ", ".join(f"{key} {value}" for key, value in machine.items())
        log(f"machine: {machine_line}")
        try:
            installer = build_installer(root / "installer")
        except (subprocess.CalledProcessError, RuntimeError) as exc:
            raise BenchError(f"cannot build the test installer: {exc}") from None
        kickstart = write_template(root, installer, name, post_script(args.data),
                                   disk_size=f"{args.disk_size // MIB}Mi")  # fmt: skip
        template = load_template(kickstart)
        virt_install = shutil.which("virt-install") or "virt-install"
        server, endpoint = start_moto(bin_dir, aws)
        setup = Setup(
            root, name, kickstart, template, known_os_variant(virt_install, template.os_variant),
            virt_install, args.diskflow, aws, endpoint, server.pid,
        )  # fmt: skip
        log(f"template {name}: {args.disk_size // MIB} MiB disk, %post writes "
            f"{args.data // MIB} MiB; moto at {endpoint}")  # fmt: skip

        runs: list[Run] = []
        load = [os.getloadavg()[0]]  # other work on the machine skews the timings
        for repeat in range(1, args.repeat + 1):
            order = TOOLS if repeat % 2 else TOOLS[::-1]  # neither always goes first
            for tool in order:
                os.sync()  # no dirty pages left by the previous run
                done = (diskflow_run if tool == "diskflow" else script_run)(setup, repeat)
                runs.append(done)
                stages = "  ".join(f"{s} {v:.2f}" for s, v in done.stages.items())
                log(f"run {repeat}/{args.repeat}  {tool:8} {done.seconds:6.2f} s  ({stages})  "
                    f"image {done.image_bytes / MIB:.0f} MiB")  # fmt: skip
        load.append(os.getloadavg()[0])

        medians = summary(runs)
        print(f"machine: {machine_line}")
        print(f"load average (1 min) before and after the runs: {load[0]:.2f}, {load[1]:.2f}")
        print(
            f"template: {args.disk_size // MIB} MiB disk, %post writes {args.data // MIB} MiB "
            f"(TCG, minimal installer); medians of {args.repeat} runs\n"
        )
        print(report(medians))
        if args.json:
            document = {
                "machine": machine,
                "disk_size": args.disk_size,
                "data": args.data,
                "repeat": args.repeat,
                "load_average_before_after": load,
                "runs": [asdict(r) | {"publish_mib_s": r.publish_mib_s} for r in runs],
                "medians": medians,
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
        remove_leftovers(name)
        if server is not None:
            server.terminate()
            server.wait()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
