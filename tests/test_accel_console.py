"""The acceleration policy against real device files, and console parsing."""

from __future__ import annotations

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
        ("write failed: No space left on device", "no space"),
        ("Error in POSTIN scriptlet in rpm package kernel-core", "scriptlet error"),
        ("Error code 1 running the kickstart script at line 40", "scriptlet error"),
        ("Error: Failed to download metadata for repo 'appstream'", "repository error"),
        ("Started Anaconda", None),
        ("Installing kernel-core (412/420)", None),
    ],
)
def test_failure_patterns(text: str, pattern: str | None) -> None:
    assert failure_in(Line("console", 1, text)) == pattern


def test_log_tail_returns_complete_lines_and_follows_rotation(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    tail = LogTail(path, "console")
    assert tail.read() == []  # not there yet
    path.write_bytes(b"one\ntw")
    assert [line.text for line in tail.read()] == ["one"]
    with open(path, "ab") as f:
        f.write(b"o\nthree")
    assert [(line.number, line.text) for line in tail.read()] == [(2, "two")]
    # virtlogd renames the full file away and starts a new one.
    os.rename(path, tmp_path / "console.log.0")
    path.write_bytes(b"four\n")
    assert [line.text for line in tail.read(final=True)] == ["three", "four"]
