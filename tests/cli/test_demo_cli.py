"""`diskflow demo`: the import demo by default, and the template half with `demo template`."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run
from tests.support.commands import diskflow
from tests.support.events import events


def test_demo_lists_both_demos_and_runs_the_import_one_by_default() -> None:
    done = diskflow("demo", "--help")
    assert done.returncode == 0, done.stderr
    assert "import" in done.stdout and "template" in done.stdout
    # `diskflow demo [DIR] --progress ...` still reaches the import demo's options.
    done = diskflow("demo", "--progress", "bogus")
    assert done.returncode == 2
    assert "'bogus' is not one of 'auto', 'bar', 'log', 'json', 'none'" in done.stderr


@pytest.mark.libvirt
def test_demo_template_builds_boot_tests_publishes_and_imports_back(tmp_path: Path) -> None:
    directory = tmp_path / "demo"

    done = diskflow("demo", "template", directory, "--accel", "tcg", "--progress", "json")

    assert done.returncode == 0, done.stderr
    said = events(done.stdout)
    result = said[-1]
    assert result["type"] == "result" and result["ok"] is True
    assert result["boot_test"]["tested"] is True and result["boot_test"]["accel"] == "tcg"
    stages = {event.get("stage") for event in said}
    assert {"validate", "install", "finalize", "boot-test", "publish", "demo"} <= stages
    assert any("diskflow-test-os: running the user-data script" in e["message"] for e in said)
    # The publisher's own log line ("publishing ...") is a debug event: the stage says it.
    assert not [e for e in said if e.get("logger") == "diskflow.publish"], said
    # Published to the local store; the DataVolume points at the loopback server it was
    # served from, and the disk imported from it is the template's, byte for byte.
    assert result["published"].startswith(f"file://{directory.resolve()}/store/demo/")
    datavolume = Path(result["datavolume"]).read_text()
    assert "url: http://127.0.0.1:" in datavolume and "checksum: sha256:" in datavolume
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", result["image"], result["disk"])
