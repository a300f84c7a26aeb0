"""Template builds with real virt-install, libvirtd and QEMU (TCG), using the test installer.

Every failure path must leave no domain, no work files and no image that looks complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

# The fixtures come in as a plugin; importing the module first would bypass assert rewriting.
pytest.register_assert_rewrite("tests.support.installer")
pytest_plugins = ["tests.support.installer"]

from importer.errors import Failure, FinalError, TransientError  # noqa: E402
from pipelines.accel import Accel  # noqa: E402
from pipelines.boottest import METHOD  # noqa: E402
from pipelines.manifest import BootTestRecord  # noqa: E402
from pipelines.steps import (  # noqa: E402
    BuildRequest,
    BuildState,
    build_template,
    finalize_step,
    install_step,
    validate_step,
)
from pipelines.virtinstall import (  # noqa: E402
    KEPT,
    OWNER_FILE,
    STOP_GRACE_SECONDS,
    VIRTINST_SCRATCH,
    BuildOptions,
    OnError,
    destroy_domain,
    sweep_orphans,
    sweep_stale_copies,
    sweep_workdirs,
)
from tests.conftest import MiB, run, sha256  # noqa: E402
from tests.support.events import events, result  # noqa: E402
from tests.support.installer import (  # noqa: E402
    ANACONDA_LOG_DIRECTIVE,
    OS_SECTOR,
    OS_SECTORS,
    TAIL_MARKER_OFFSET,
    Installer,
    expected_marker,
    write_template,
)

FAST = BuildOptions(accel=Accel.TCG, network="none", timeout=180, no_output_timeout=60)
URI = "qemu:///system"
TRACEBACK = 'echo "Traceback (most recent call last):"; echo "  File x"; echo "Boom: bad"'


class Recorder:
    """An Emit that keeps every event."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, stage: str, kind: str, message: str, **fields: Any) -> None:
        self.events.append({"stage": stage, "kind": kind, "message": message, **fields})

    def lines(self, kind: str) -> list[str]:
        return [e["message"] for e in self.events if e["kind"] == kind]

    def stages(self) -> set[str]:
        return {e["stage"] for e in self.events}


def build(
    kickstart: Path, vm_dir: Path, output: Path, options: BuildOptions = FAST, **request: Any
) -> tuple[BuildState, Recorder]:
    recorder = Recorder()
    state = build_template(
        BuildRequest(
            kickstart=str(kickstart), output=str(output), workdir=str(vm_dir), build=options,
            **request,
        ),
        recorder,
    )  # fmt: skip
    return state, recorder


def domains(prefix: str) -> list[str]:
    names = run("virsh", "-c", URI, "list", "--all", "--name").split()
    return [name for name in names if name.startswith(prefix)]


def virsh(*args: str) -> str:
    return run("virsh", "-c", URI, *args).strip()


def assert_nothing_left(name: str, vm_dir: Path, output: Path) -> None:
    """No domain, no work directory content, no virt-install copies, no image."""
    assert domains(f"diskflow-{name}-") == []
    assert list(vm_dir.iterdir()) == []
    assert [p for p in VIRTINST_SCRATCH.glob("virtinst-*") if f"diskflow-{name}-" in p.name] == []
    assert list(output.glob(f"{name}/*.qcow2")) == []
    assert list(output.glob(f"{name}/.*")) == []


def failed_build(
    kickstart: Path, vm_dir: Path, output: Path, options: BuildOptions = FAST
) -> tuple[Failure, Recorder]:
    recorder = Recorder()
    with pytest.raises(Failure) as caught:
        build_template(
            BuildRequest(kickstart=str(kickstart), output=str(output), workdir=str(vm_dir),
                         build=options),
            recorder,
        )  # fmt: skip
    assert_nothing_left(kickstart.stem, vm_dir, output)
    return caught.value, recorder


def test_build_produces_a_compressed_template_with_manifest(
    minimal_installer: Installer, vm_dir: Path, tmp_path: Path
) -> None:
    kickstart = write_template(tmp_path, minimal_installer, "golden")
    state, recorder = build(kickstart, vm_dir, tmp_path / "out")

    image = tmp_path / "out/golden/golden.qcow2"
    assert state.image == str(image)
    details = json.loads(run("qemu-img", "info", "--output=json", image))
    assert details["format"] == "qcow2"
    assert details["format-specific"]["data"]["compression-type"] == "zstd"
    assert details["virtual-size"] == 64 * MiB
    # What the installer wrote is in the template, at both ends of the disk.
    raw = tmp_path / "disk.raw"
    run("qemu-img", "convert", "-O", "raw", image, raw)
    marker = expected_marker(kickstart)
    with open(raw, "rb") as f:
        assert f.read(len(marker)) == marker
        f.seek(64 * MiB - TAIL_MARKER_OFFSET)
        assert f.read(len(marker)) == marker

    manifest = json.loads((tmp_path / "out/golden/manifest.json").read_text())
    assert manifest == state.manifest.to_json()
    assert manifest["output"]["sha256"] == sha256(image)
    assert manifest["output"]["size"] == image.stat().st_size
    assert manifest["output"]["virtual_size"] == 64 * MiB
    assert manifest["kickstart"]["sha256"] == sha256(kickstart)  # no %include: text as is
    assert manifest["inputs"]["kernel"]["sha256"] == sha256(minimal_installer.kernel)
    assert manifest["inputs"]["initrd"]["sha256"] == sha256(minimal_installer.initrd)
    assert manifest["accel"]["used"] == "tcg"
    assert {"validate", "install", "finalize"} <= set(manifest["durations"])
    assert {"virt-install", "qemu-img", "qemu-system-x86_64"} <= set(manifest["tools"])
    assert (tmp_path / "out/golden/golden.qcow2.sha256").read_text() == (
        f"{sha256(image)}  golden.qcow2\n"
    )
    # The console was streamed as events and kept as a file.
    assert "diskflow-test-installer: done" in recorder.lines("console")
    assert "diskflow-test-installer: done" in (tmp_path / "out/golden/console.log").read_text()
    # The image was booted once, with its [boot] kernel, and its seed's script ran.
    assert manifest["boot_test"] == {"tested": True, "method": METHOD, "accel": "tcg",
                                     "boot": "kernel"}  # fmt: skip
    assert manifest["durations"]["boot_test"] > 0
    booted = (tmp_path / "out/golden/boot-console.log").read_text()
    assert "diskflow-test-os: running the user-data script of /dev/vdb" in booted
    boot_lines = [e["message"] for e in recorder.events if e["stage"] == "boot-test"]
    assert any(re.fullmatch(r"diskflow-boot-test [0-9a-f]{16} ok", line) for line in boot_lines)
    assert domains("diskflow-golden-") == []
    assert list(vm_dir.iterdir()) == []


def test_an_image_that_does_not_boot_fails_its_boot_test_and_is_not_kept(
    minimal_installer: Installer, vm_dir: Path, tmp_path: Path
) -> None:
    # As a broken bootloader would: %post wipes what the installer installed.
    wipe = f"dd if=/dev/zero of=/dev/vda bs=512 seek={OS_SECTOR} count={OS_SECTORS} conv=notrunc"
    kickstart = write_template(tmp_path, minimal_installer, "broken", post=wipe)
    output = tmp_path / "out"

    failure, recorder = failed_build(kickstart, vm_dir, output)

    assert failure.reason == "BootTestFailed"
    assert "the guest stopped without printing the marker" in failure.message
    assert "diskflow-test-installer: error: no operating system on /dev/vda" in failure.message
    assert {"install", "finalize"} <= recorder.stages()  # it installed; only booting failed
    assert not (output / "broken/manifest.json").exists()
    assert "no operating system" in (output / "broken/boot-console.log").read_text()


def test_a_failure_pattern_while_booting_fails_the_boot_test_with_its_lines(
    minimal_installer: Installer, vm_dir: Path, tmp_path: Path
) -> None:
    # The installed system is replaced by one that panics, as a broken initramfs would.
    panics = (
        f"dd if=/dev/zero of=/dev/vda bs=512 seek={OS_SECTOR} count={OS_SECTORS} conv=notrunc\n"
        "printf '#!/bin/sh\\necho \"Kernel panic - not syncing: VFS: Unable to mount root\"\\n'"
        f" | dd of=/dev/vda bs=512 seek={OS_SECTOR} conv=notrunc"
    )
    kickstart = write_template(tmp_path, minimal_installer, "panics", post=panics)

    failure, recorder = failed_build(kickstart, vm_dir, tmp_path / "out")

    assert failure.reason == "BootTestFailed"
    assert failure.message.startswith("the boot test failed: kernel panic in the console output")
    assert "Kernel panic - not syncing: VFS: Unable to mount root" in failure.message
    booting = [e["message"] for e in recorder.events if e["stage"] == "boot-test"]
    assert "Kernel panic - not syncing: VFS: Unable to mount root" in booting


def test_an_image_without_a_bootloader_fails_its_boot_test_on_silence(
    minimal_installer: Installer, vm_dir: Path, tmp_path: Path
) -> None:
    # No [boot] kernel: the image's own bootloader, which the test installer never installs.
    kickstart = write_template(tmp_path, minimal_installer, "nobootloader", boot=False)
    options = replace(FAST, no_output_timeout=8)

    failure, _ = failed_build(kickstart, vm_dir, tmp_path / "out", options)

    assert failure.reason == "BootTestFailed"
    assert "no console or installer output for 8s" in failure.message


def test_no_boot_test_publishes_untested_and_says_so(
    minimal_installer: Installer, vm_dir: Path, tmp_path: Path
) -> None:
    kickstart = write_template(tmp_path, minimal_installer, "untested", boot=False)

    state, recorder = build(kickstart, vm_dir, tmp_path / "out", boot_test=False)

    assert state.manifest.boot_test == BootTestRecord(tested=False)
    assert "the image is not boot-tested (--no-boot-test)" in recorder.lines("warning")
    assert "boot-test" not in {e["stage"] for e in recorder.events if e["kind"] == "console"}
    written = json.loads((tmp_path / "out/untested/manifest.json").read_text())
    assert written["boot_test"] == {"tested": False}


def test_same_inputs_give_the_same_build_id_and_a_changed_kickstart_another(
    minimal_installer: Installer, tmp_path: Path
) -> None:
    from pipelines.steps import validate_step

    kickstart = write_template(tmp_path, minimal_installer, "ids")
    first = validate_step(BuildRequest(kickstart=str(kickstart))).build_id
    assert validate_step(BuildRequest(kickstart=str(kickstart))).build_id == first
    write_template(tmp_path, minimal_installer, "ids", post="echo changed")
    assert validate_step(BuildRequest(kickstart=str(kickstart))).build_id != first


def test_failure_pattern_ends_the_build_with_the_matching_lines(
    minimal_installer: Installer, vm_dir: Path, tmp_path: Path
) -> None:
    kickstart = write_template(
        tmp_path, minimal_installer, "pattern", post=f"{TRACEBACK}; sleep 600"
    )
    # An earlier build's files, which must not pass for this build's, and a file of the user's.
    earlier = tmp_path / "out/pattern"
    earlier.mkdir(parents=True)
    for name in ("pattern.qcow2", "pattern.qcow2.sha256", "manifest.json", "datavolume.yaml"):
        (earlier / name).write_text("from an earlier build")
    (earlier / "notes.txt").write_text("mine")
    failure, _ = failed_build(kickstart, vm_dir, tmp_path / "out")
    assert sorted(p.name for p in earlier.iterdir()) == [
        "console.log",
        "installer.log",
        "notes.txt",
    ]
    assert isinstance(failure, FinalError)
    assert failure.reason == "InstallFailed"
    assert "traceback in the console output" in failure.message
    assert "Traceback (most recent call last):" in failure.message
    assert "Boom: bad" in failure.message  # the lines after the match come along
    assert "Traceback" in (tmp_path / "out/pattern/console.log").read_text()  # kept


def test_silent_guest_is_stopped_by_the_no_output_watchdog(
    minimal_installer: Installer, vm_dir: Path, tmp_path: Path
) -> None:
    kickstart = write_template(tmp_path, minimal_installer, "silent", post="sleep 100000")
    options = BuildOptions(accel=Accel.TCG, network="none", timeout=300, no_output_timeout=8)
    failure, _ = failed_build(kickstart, vm_dir, tmp_path / "out", options)
    assert failure.reason == "NoConsoleOutput"
    assert "no console or installer output for 8s" in failure.message
    assert "running %post" in failure.message  # the last thing the guest said


def test_overall_timeout_stops_a_busy_guest(
    minimal_installer: Installer, vm_dir: Path, tmp_path: Path
) -> None:
    kickstart = write_template(
        tmp_path, minimal_installer, "busy", post="while :; do echo working; sleep 1; done"
    )
    options = BuildOptions(accel=Accel.TCG, network="none", timeout=25, no_output_timeout=20)
    failure, _ = failed_build(kickstart, vm_dir, tmp_path / "out", options)
    assert failure.reason == "Timeout"
    assert "within 25s" in failure.message
    assert "working" in failure.message


def test_installer_that_writes_nothing_is_a_failure(
    minimal_installer: Installer, vm_dir: Path, tmp_path: Path
) -> None:
    # A failing %pre ends the install before the disk is touched.
    kickstart = write_template(tmp_path, minimal_installer, "empty", extra="%pre\nexit 3\n%end")
    failure, _ = failed_build(kickstart, vm_dir, tmp_path / "out")
    assert failure.reason == "InstallFailed"
    assert "without writing to the disk" in failure.message
    assert "%pre failed with status 3" in failure.message


def test_invalid_kickstart_is_refused_before_anything_boots(
    minimal_installer: Installer, vm_dir: Path, tmp_path: Path
) -> None:
    kickstart = write_template(tmp_path, minimal_installer, "invalid", extra="bootloader --bogus")
    failure, recorder = failed_build(kickstart, vm_dir, tmp_path / "out")
    assert failure.reason == "InvalidKickstart"
    assert f"{kickstart}:" in failure.message and "--bogus" in failure.message
    assert recorder.stages() <= {"validate"}


def test_unreachable_libvirt_is_a_clear_transient_error(
    minimal_installer: Installer, vm_dir: Path, tmp_path: Path
) -> None:
    kickstart = write_template(tmp_path, minimal_installer, "nolibvirt")
    options = BuildOptions(
        connect="qemu+unix:///system?socket=/nonexistent/libvirt-sock", accel=Accel.TCG
    )
    failure, _ = failed_build(kickstart, vm_dir, tmp_path / "out", options)
    assert isinstance(failure, TransientError)
    assert failure.reason == "LibvirtUnreachable"
    assert "cannot reach libvirt at qemu+unix:///system?socket=/nonexistent" in failure.message


def test_installer_log_channel_is_captured(
    minimal_installer: Installer, vm_dir: Path, tmp_path: Path
) -> None:
    kickstart = write_template(
        tmp_path, minimal_installer, "logged", post="echo anaconda says hello",
        extra=ANACONDA_LOG_DIRECTIVE,
    )  # fmt: skip
    _, recorder = build(kickstart, vm_dir, tmp_path / "out")
    assert "anaconda says hello" in recorder.lines("installer")
    assert "anaconda says hello" in (tmp_path / "out/logged/installer.log").read_text()


def test_failure_pattern_in_the_installer_log_counts_too(
    minimal_installer: Installer, vm_dir: Path, tmp_path: Path
) -> None:
    kickstart = write_template(
        tmp_path, minimal_installer, "logfail",
        post="echo 'insufficient disk space: need 2 GiB'; sleep 600",
        extra=ANACONDA_LOG_DIRECTIVE,
    )  # fmt: skip
    failure, _ = failed_build(kickstart, vm_dir, tmp_path / "out")
    assert failure.reason == "InstallFailed"
    assert "no space" in failure.message
    assert "installer:" in failure.message or "console:" in failure.message


def test_cli_build_streams_json_events_and_exits_non_zero_on_failure(
    minimal_installer: Installer, vm_dir: Path, tmp_path: Path
) -> None:
    kickstart = write_template(tmp_path, minimal_installer, "clifail", post=TRACEBACK)
    done = subprocess.run(
        [sys.executable, "-m", "diskflow", "build", str(kickstart), "--output",
         str(tmp_path / "out"), "--accel", "tcg", "--network", "none", "--workdir", str(vm_dir),
         "--progress", "json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    said = events(done.stdout)
    assert any(e["type"] == "console" and "running %post" in e["message"] for e in said)
    assert any(e["level"] == "warning" and "TCG" in e["message"] for e in said)
    assert said[-1]["ok"] is False and said[-1]["reason"] == "InstallFailed"
    assert "[InstallFailed]" in done.stderr
    assert_nothing_left("clifail", vm_dir, tmp_path / "out")


def test_missing_virt_install_is_named_with_its_package(
    minimal_installer: Installer, vm_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A PATH holding every tool a build uses except virt-install.
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("virsh", "qemu-img", "qemu-system-x86_64", "prlimit"):
        (tools / tool).symlink_to(shutil.which(tool) or tool)
    monkeypatch.setenv("PATH", str(tools))
    kickstart = write_template(tmp_path, minimal_installer, "notool")
    failure, _ = failed_build(kickstart, vm_dir, tmp_path / "out")
    assert failure.reason == "MissingTool"
    assert "virt-install is not installed (Debian package virtinst)" in failure.message


def test_sigterm_stops_the_build_and_removes_the_domain(
    minimal_installer: Installer, vm_dir: Path, tmp_path: Path
) -> None:
    kickstart = write_template(tmp_path, minimal_installer, "stopped", post="sleep 100000")
    build = subprocess.Popen(
        [sys.executable, "-m", "diskflow", "build", str(kickstart), "--output",
         str(tmp_path / "out"), "--accel", "tcg", "--network", "none", "--workdir", str(vm_dir),
         "--progress", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    end = time.monotonic() + 120
    while not domains("diskflow-stopped-"):
        assert build.poll() is None and time.monotonic() < end, build.communicate()
        time.sleep(0.2)
    stopping = time.monotonic()
    build.send_signal(signal.SIGTERM)
    out, err = build.communicate(timeout=60)
    # The domain is destroyed first, so virt-install ends at once: a stop that took
    # virt-install's grace period (19 s, when the domain went last) would fail here; a pod's
    # grace period is 30 s.
    assert time.monotonic() - stopping < STOP_GRACE_SECONDS
    assert build.returncode == 75, err
    assert result(out)["reason"] == "Terminated"
    assert_nothing_left("stopped", vm_dir, tmp_path / "out")


def test_virt_install_s_warnings_and_errors_keep_their_kind_and_its_advice_is_dropped(
    minimal_installer: Installer, vm_dir: Path, tmp_path: Path
) -> None:
    # A network libvirt does not have: virt-install fails after its checks, with an ERROR line
    # and advice to restart a domain that never was.
    kickstart = write_template(tmp_path, minimal_installer, "nonet")
    options = replace(FAST, network="network=diskflow-no-such-network")

    failure, recorder = failed_build(kickstart, vm_dir, tmp_path / "out", options)

    assert failure.reason == "VirtInstallFailed"
    assert "diskflow-no-such-network" in failure.message
    said = [e for e in recorder.events if e["stage"] == "install"]
    errors = [e["message"] for e in said if e["kind"] == "error"]
    assert any("diskflow-no-such-network" in message for message in errors)
    # The tiny template's 256 MiB are below the osinfo database's recommendation.
    assert any(e["kind"] == "warning" and e["message"].startswith("Requested memory")
               for e in said)  # fmt: skip
    text = "\n".join(e["message"] for e in said)
    assert not re.search(r"^(WARNING|ERROR) ", text, re.MULTILINE)
    assert "restart your domain" not in text and "virsh --connect" not in text


def test_on_error_keep_leaves_a_failed_install_running_for_its_console(
    minimal_installer: Installer, vm_dir: Path, tmp_path: Path
) -> None:
    kickstart = write_template(
        tmp_path, minimal_installer, "kept", post=f"{TRACEBACK}; sleep 100000"
    )
    done = subprocess.run(
        [sys.executable, "-m", "diskflow", "build", str(kickstart), "--output",
         str(tmp_path / "out"), "--accel", "tcg", "--network", "none", "--workdir", str(vm_dir),
         "--progress", "none", "--on-error", "keep"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    kept = domains("diskflow-kept-")
    try:
        assert done.returncode == 1, done.stderr
        assert "[InstallFailed]" in done.stderr and "Boom: bad" in done.stderr
        [domain] = kept
        [workdir] = vm_dir.iterdir()
        assert f"kept domain {domain} (running) and its work directory {workdir}" in done.stderr
        assert f"attach to its console with: virsh --connect {URI} console {domain}" in done.stderr
        assert virsh("domstate", domain) == "running"
        assert virsh("ttyconsole", domain).startswith("/dev/pts/")  # what `virsh console` opens
        assert virsh("desc", domain).startswith(KEPT)
        assert (workdir / "disk.qcow2").is_file()
        assert not (workdir / "ks.cfg").exists()  # it may hold a password hash
        # The build's process is gone, yet this is no killed build's: the sweep leaves it.
        sweep_orphans(URI, vm_dir)
        assert domains("diskflow-kept-") == [domain] and workdir.is_dir()
        # The error line's (a warning line before it says the same: --progress none shows it).
        removal = done.stderr.rsplit("remove it all with: ", 1)[1].split(" [InstallFailed]")[0]
        subprocess.run(removal, shell=True, check=True, capture_output=True)
        assert domains("diskflow-kept-") == [] and list(vm_dir.iterdir()) == []
    finally:
        for domain in kept:
            destroy_domain(URI, domain)


def test_on_error_keep_leaves_a_failed_boot_test_defined_to_start_again(
    minimal_installer: Installer, vm_dir: Path, tmp_path: Path
) -> None:
    wipe = f"dd if=/dev/zero of=/dev/vda bs=512 seek={OS_SECTOR} count={OS_SECTORS} conv=notrunc"
    kickstart = write_template(tmp_path, minimal_installer, "keptboot", post=wipe)
    recorder = Recorder()
    request = BuildRequest(
        kickstart=str(kickstart),
        output=str(tmp_path / "out"),
        workdir=str(vm_dir),
        build=replace(FAST, on_error=OnError.KEEP),
    )
    try:
        with pytest.raises(Failure) as caught:
            build_template(request, recorder)
        failure = caught.value
        [domain] = domains("diskflow-keptboot-boot-")
        assert domains("diskflow-keptboot-") == [domain]  # the install succeeded: removed
        [workdir] = vm_dir.iterdir()  # the boot test's
        assert failure.reason == "BootTestFailed"
        assert "the guest stopped without printing the marker" in failure.message
        start = f"virsh --connect {URI} start --console {domain}"
        assert f"kept domain {domain} (shut off) and its work directory {workdir}" in (
            failure.message
        )
        assert start in failure.message
        [warning] = [e for e in recorder.events if e.get("domain") == domain
                     and e["kind"] == "warning"]  # fmt: skip
        assert warning["message"] in failure.message and warning["workdir"] == str(workdir)
        assert {"boot.qcow2", "image.qcow2", "seed.iso"} <= {p.name for p in workdir.iterdir()}
        assert virsh("domstate", domain) == "shut off"
        assert virsh("desc", domain).startswith(KEPT)
        # The guest starts again, as the message says, from its kept overlay.
        virsh("start", domain)
        assert virsh("domstate", domain) == "running"
        # virt-install's advice to start the install's domain (defined, as this build's were)
        # is not passed on: diskflow removed that domain.
        assert not any("start diskflow-" in e["message"] for e in recorder.events)
    finally:
        for domain in domains("diskflow-keptboot-"):
            destroy_domain(URI, domain)


def test_stale_copies_of_killed_builds_are_swept_and_fresh_ones_kept() -> None:
    stale = VIRTINST_SCRATCH / "virtinst-aaaa1111-diskflow-gone-0123abcd-kernel"
    fresh = VIRTINST_SCRATCH / "virtinst-bbbb2222-diskflow-gone-89abcdef-initrd"
    other = VIRTINST_SCRATCH / "virtinst-cccc3333-vmlinuz"  # not diskflow's: never touched
    for path in (stale, fresh, other):
        path.write_bytes(b"kernel")
    two_hours_ago = time.time() - 7200
    for path in (stale, other):
        os.utime(path, (two_hours_ago, two_hours_ago))
    try:
        assert sweep_stale_copies(URI) == [stale]
        assert fresh.exists() and other.exists()
    finally:
        for path in (stale, fresh, other):
            path.unlink(missing_ok=True)


def test_what_a_killed_build_left_is_swept_by_the_next(
    minimal_installer: Installer, vm_dir: Path, tmp_path: Path
) -> None:
    kickstart = write_template(tmp_path, minimal_installer, "orphan", post="sleep 100000")
    build = subprocess.Popen(
        [sys.executable, "-m", "diskflow", "build", str(kickstart), "--output",
         str(tmp_path / "out"), "--accel", "tcg", "--network", "none", "--workdir", str(vm_dir),
         "--progress", "none"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    end = time.monotonic() + 120
    while not domains("diskflow-orphan-"):
        assert build.poll() is None and time.monotonic() < end
        time.sleep(0.2)
    build.kill()  # SIGKILL: no clean-up at all, like a worker whose pod died
    build.wait()
    assert domains("diskflow-orphan-") and list(vm_dir.iterdir())

    sweep_orphans(URI, vm_dir)
    assert domains("diskflow-orphan-") == []
    assert list(vm_dir.iterdir()) == []
    sweep_stale_copies(URI, older_than=0)
    assert not [p for p in VIRTINST_SCRATCH.glob("virtinst-*") if "diskflow-orphan-" in p.name]


def test_a_finished_install_outlives_a_worker_restart(
    minimal_installer: Installer, vm_dir: Path, tmp_path: Path
) -> None:
    """The install's disk waits for finalize in its work dir, marked as no process's: a
    worker restarted in between (a StatefulSet pod: same name, same volume, new processes)
    sweeps it for a killed build's only once it is a week old; finalize then finds it."""
    kickstart = write_template(tmp_path, minimal_installer, "restart")
    request = BuildRequest(
        kickstart=str(kickstart), output=str(tmp_path / "out"), workdir=str(vm_dir), build=FAST
    )
    installed = install_step(validate_step(request))
    assert installed.workdir and installed.disk
    # No process named: this process living on is not what keeps it.
    record = (Path(installed.workdir) / OWNER_FILE).read_text()
    assert record.startswith("diskflow build installed at=") and "pid=" not in record
    assert sweep_workdirs(vm_dir) == []  # as the next install on the restarted worker does
    assert Path(installed.disk).is_file()
    assert sweep_workdirs(vm_dir, keep_installed=7 * 24 * 3600) == []
    finalized = finalize_step(installed)
    assert finalized.image and Path(finalized.image).is_file()

    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs: a build killed outright on this host
    killed, abandoned = vm_dir / "diskflow-killed-x", vm_dir / "diskflow-abandoned-x"
    for workdir, record in (
        (killed, f"diskflow build host={socket.gethostname()} pid={dead.pid}"),
        (abandoned, f"diskflow build installed at={int(time.time()) - 8 * 24 * 3600}"),
    ):
        workdir.mkdir()
        (workdir / OWNER_FILE).write_text(record)
    assert sorted(sweep_workdirs(vm_dir)) == sorted([killed, abandoned])
