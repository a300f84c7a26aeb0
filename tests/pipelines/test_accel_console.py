"""The acceleration policy against real device files, and console parsing."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from importer.errors import FinalError
from pipelines.accel import Accel, choose_accel, kvm_problem
from pipelines.console import Line, LogTail, clean, failure_in

KVM = Path("/dev/kvm")
needs_kvm_device = pytest.mark.skipif(kvm_problem(KVM) is not None, reason="no usable /dev/kvm")


def cpuinfo(tmp_path: Path, flags: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 {flags}\n\nprocessor\t: 1\n")
    return path


def test_missing_device_makes_auto_choose_tcg_and_say_why(tmp_path: Path) -> None:
    choice = choose_accel(Accel.AUTO, tmp_path / "kvm", cpuinfo(tmp_path, "vmx"))
    assert choice.accel is Accel.TCG and choice.virt_type == "qemu"
    assert "chose TCG" in choice.reason and "does not exist" in choice.reason


def test_kvm_policy_refuses_a_device_that_is_not_kvm(tmp_path: Path) -> None:
    with pytest.raises(FinalError) as caught:
        choose_accel(Accel.KVM, Path("/dev/null"), cpuinfo(tmp_path, "vmx"))
    assert caught.value.reason == "KvmUnavailable"
    assert "/dev/null does not answer like KVM" in caught.value.message


def test_tcg_policy_never_looks_at_the_device(tmp_path: Path) -> None:
    choice = choose_accel(Accel.TCG, tmp_path / "kvm", tmp_path / "none")
    assert choice.accel is Accel.TCG and "--accel tcg" in choice.reason


@needs_kvm_device
def test_kvm_without_virtualization_flags_is_treated_as_unable_to_run_guests(
    tmp_path: Path,
) -> None:
    # This machine's KVM is a PVM hypervisor: /dev/kvm answers, the CPU has no vmx/svm.
    choice = choose_accel(Accel.AUTO, KVM, cpuinfo(tmp_path, "sse4_2"))
    assert choice.accel is Accel.TCG
    assert "no vmx or svm flag" in choice.reason


@needs_kvm_device
def test_working_kvm_with_virtualization_flags_is_chosen(tmp_path: Path) -> None:
    choice = choose_accel(Accel.AUTO, KVM, cpuinfo(tmp_path, "svm"))
    assert choice.accel is Accel.KVM and choice.virt_type == "kvm"
    assert choose_accel(Accel.KVM, KVM).accel is Accel.KVM


def test_console_lines_lose_escapes_and_redraws() -> None:
    assert clean("\x1b[1;32m[  OK  ]\x1b[0m Started udev\r\n") == "[  OK  ] Started udev"
    assert clean("10%\r50%\r100%") == "100%"
    assert clean("bell\x07 and nul\x00") == "bell and nul"


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("Traceback (most recent call last):", "traceback"),
        ("[   12.1] Kernel panic - not syncing: VFS", "kernel panic"),
        ("Out of memory: Killed process 812 (anaconda)", "out of memory"),
        ("[  301.2] BUG: unable to handle page fault for address: ffffa0c1", "kernel oops"),
        (
            "[  301.2] BUG: kernel NULL pointer dereference, address: 0000000000000008",
            "kernel oops",
        ),
        ("[  301.2] Oops: 0002 [#1] PREEMPT SMP NOPTI", "kernel oops"),
        ("[  301.2] general protection fault: 0000 [#1] SMP PTI", "kernel oops"),
        ("[  301.2] kernel BUG at mm/slub.c:4112!", "kernel oops"),
        ("write failed: No space left on device", "no space"),
        ("Error in POSTIN scriptlet in rpm package kernel-core", "scriptlet error"),
        ("Error code 1 running the kickstart script at line 40", "scriptlet error"),
        ("Error: Failed to download metadata for repo 'appstream'", "repository error"),
        (
            "Error: Failed to download metadata for repo 'baseos': Cannot download repomd.xml: "
            "Cannot download repodata/repomd.xml: All mirrors were tried",
            "repository error",
        ),
        (
            'Failed to download metadata (baseurl: "http://m/os/") for repository "baseos"',
            "repository error",
        ),
        ("Error setting up base repository", "repository error"),
        ("Cannot find a valid baseurl for repo: base/7/x86_64", "repository error"),
        ("Failed to fetch stage2 from http://mirror/os/", "repository error"),
        ("Error: Error downloading packages:", "repository error"),
        ("Started Anaconda", None),
        ("Installing kernel-core (412/420)", None),
    ],
)
def test_failure_patterns(text: str, pattern: str | None) -> None:
    assert failure_in(Line("console", 1, text)) == pattern


@pytest.mark.parametrize(
    "text",
    [
        # A kernel warning, a hung task, RCU stalls and soft lockups print a Call Trace and
        # carry on: common under TCG, where the guest runs many times slower than it thinks.
        "[  240.5] WARNING: CPU: 0 PID: 1 at kernel/workqueue.c:3199 __flush_work+0x1a/0x30",
        "[  240.5] Call Trace:",
        "[  240.5]  <TASK>",
        "[  240.5]  ? __warn+0x81/0x130",
        "[  240.5] ---[ end trace 0000000000000000 ]---",
        "[  363.1] INFO: task anaconda:1534 blocked for more than 122 seconds.",
        "[  401.9] rcu: INFO: rcu_sched self-detected stall on CPU",
        "[  401.9] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:",
        "[  402.0] watchdog: BUG: soft lockup - CPU#1 stuck for 23s! [kworker/1:2:97]",
        "[  7.2] traps: gnome-shell[1612] general protection fault ip:7f sp:7ffd error:0",
        "[  9.1] anaconda[812]: segfault at 0 ip 00007f sp 00007ffd error 4 in libc.so.6",
        # librepo and dnf report each mirror they give up on, then try the next one.
        "Curl error (28): Timeout was reached for http://mirror.example/os/repodata/repomd.xml"
        " [Operation timed out after 30000 milliseconds with 0 out of 0 bytes received]"
        " Trying other mirror.",
        "Cannot download repomd.xml: Curl error (6): Couldn't resolve host name for"
        " http://mirror.example/os/repodata/repomd.xml [Could not resolve host:"
        " mirror.example] Trying other mirror.",
        ">>> Curl error (6): Could not resolve hostname for https://mirror.example/os/repodata/"
        "repomd.xml [Could not resolve host: mirror.example]",  # dnf5, before the next try
        ">>> Status code: 404 for http://mirror.example/os/repodata/repomd.xml",
        'http://mirror.example/7/os/repodata/repomd.xml: [Errno 14] curl#7 - "Failed connect'
        ' to mirror.example:80; Connection refused"',  # yum, followed by "Trying other mirror."
    ],
)
def test_non_fatal_output_is_not_a_failure(text: str) -> None:
    assert failure_in(Line("console", 1, text)) is None


def rotate(path: Path, backups: int = 3) -> None:
    """What virtlogd does with a full file: shift the backups, rename, start a new one."""
    path.with_name(f"{path.name}.{backups - 1}").unlink(missing_ok=True)
    for number in range(backups - 2, -1, -1):
        older = path.with_name(f"{path.name}.{number}")
        if older.exists():
            os.rename(older, path.with_name(f"{path.name}.{number + 1}"))
    os.rename(path, path.with_name(f"{path.name}.0"))
    path.write_bytes(b"")


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def numbered(lines: list[Line]) -> list[tuple[int, str]]:
    return [(line.number, line.text) for line in lines]


def open_files(directory: Path) -> list[str]:
    """The files under `directory` this process has open."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the directory listing's own descriptor is gone
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(f"{directory}/"):
                found.append(target)
    return found


def test_log_tail_returns_complete_lines_and_follows_rotation(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    tail = LogTail(path, "console")
    assert tail.read() == []  # not there yet
    path.write_bytes(b"one\ntw")
    assert [line.text for line in tail.read()] == ["one"]
    append(path, b"o\nthree")
    assert numbered(tail.read()) == [(2, "two")]
    # More reaches the old file after that read; then virtlogd renames it and starts anew.
    append(path, b" and more\nthe failure line\nunfinished")
    rotate(path)
    append(path, b"four\nfi")
    assert numbered(tail.read()) == [
        (3, "three and more"),
        (4, "the failure line"),
        (5, "unfinished"),  # the old file's unterminated last line ends at the rotation
        (6, "four"),
    ]
    assert open_files(tmp_path) == []  # nothing is held open between reads
    append(path, b"ve")
    assert numbered(tail.read(final=True)) == [(7, "five")]


def test_log_tail_reads_everything_across_two_rotations_between_reads(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    path.write_bytes(b"first\n")
    tail = LogTail(path, "console")
    assert numbered(tail.read()) == [(1, "first")]
    append(path, b"second\n")
    rotate(path)
    append(path, b"third\nfourth\n")
    rotate(path)
    append(path, b"fifth")
    assert numbered(tail.read(final=True)) == [
        (2, "second"),
        (3, "third"),
        (4, "fourth"),
        (5, "fifth"),
    ]
    assert path.with_name("console.log.1").read_bytes() == b"first\nsecond\n"


def test_log_tail_between_the_rename_and_the_new_file(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    path.write_bytes(b"one\n")
    tail = LogTail(path, "console")
    assert numbered(tail.read()) == [(1, "one")]
    append(path, b"two\nthr")
    os.rename(path, tmp_path / "console.log.0")  # virtlogd has not created the new file yet
    assert numbered(tail.read()) == [(2, "two")]
    path.write_bytes(b"four\n")
    assert numbered(tail.read()) == [(3, "thr"), (4, "four")]
    assert tail.read(final=True) == []


def test_log_tail_carries_on_when_the_old_file_is_gone(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    path.write_bytes(b"one\ntw")
    tail = LogTail(path, "console")
    assert numbered(tail.read()) == [(1, "one")]
    os.rename(path, tmp_path / "elsewhere")  # not among the backups: rotated out of them all
    path.write_bytes(b"three\n")
    assert numbered(tail.read()) == [(2, "tw"), (3, "three")]


def test_log_tail_starts_over_on_a_file_shorter_than_what_was_read(tmp_path: Path) -> None:
    # Truncated in place, or a new file that got the old one's inode number.
    path = tmp_path / "console.log"
    path.write_bytes(b"a long first line\n")
    tail = LogTail(path, "console")
    assert numbered(tail.read()) == [(1, "a long first line")]
    path.write_bytes(b"new\n")
    assert numbered(tail.read()) == [(2, "new")]
