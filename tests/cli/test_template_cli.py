"""The template commands as CI and people run them: validate, ci changed/build, publish."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

pytest.register_assert_rewrite("tests.support.installer")
pytest_plugins = ["tests.support.installer"]

from tests.conftest import run, sha256  # noqa: E402
from tests.pipelines.manifests import STORED  # noqa: E402
from tests.support.commands import diskflow  # noqa: E402
from tests.support.events import result  # noqa: E402
from tests.support.git import commit, git, use_test_identity  # noqa: E402
from tests.support.installer import Installer, write_template  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TRACEBACK = 'echo "Traceback (most recent call last):"; echo "Boom"'


def test_every_shipped_kickstart_passes_validate() -> None:
    done = diskflow("validate", "--kickstarts", REPO / "kickstarts")
    assert done.returncode == 0, done.stderr
    shipped = sorted((REPO / "kickstarts").glob("*.ks"))
    assert len(shipped) >= 3
    assert [line.split()[1] for line in done.stdout.splitlines()] == [str(p) for p in shipped]


def test_validate_names_file_and_line_and_fails(
    tmp_path: Path, minimal_installer: Installer
) -> None:
    good = write_template(tmp_path, minimal_installer, "good")
    bad = write_template(tmp_path, minimal_installer, "bad", extra="part / --size=lots")
    done = diskflow("validate", good, bad)
    assert done.returncode == 1
    assert f"ok {good}" in done.stdout
    assert f"error: {bad}:11:" in done.stderr and "[InvalidKickstart]" in done.stderr


@pytest.fixture
def repo(tmp_path: Path, minimal_installer: Installer, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A git repository with two templates built by the test installer."""
    use_test_identity(monkeypatch)
    repo = tmp_path / "repo"
    (repo / "kickstarts").mkdir(parents=True)
    for name in ("alpha", "beta"):
        write_template(repo / "kickstarts", minimal_installer, name)
    git(repo, "init", "-q")
    commit(repo)
    return repo


def test_ci_build_builds_what_changed_and_reports_junit(
    repo: Path, minimal_installer: Installer, vm_dir: Path, tmp_path: Path
) -> None:
    base = git(repo, "rev-parse", "HEAD")
    write_template(repo / "kickstarts", minimal_installer, "alpha", post="echo alpha v2")
    write_template(repo / "kickstarts", minimal_installer, "beta", post=TRACEBACK)
    commit(repo)
    changed = diskflow("ci", "changed", "--since", base, cwd=repo)
    assert changed.stdout.split() == ["kickstarts/alpha.ks", "kickstarts/beta.ks"]

    store = tmp_path / "store"
    store.mkdir()
    junit = tmp_path / "results/templates.xml"
    done = diskflow(
        "ci", "build", "--since", base, "--junit", junit, "--publish-to", store, "--accel",
        "tcg", "--network", "none", "--workdir", vm_dir, "--progress", "none", cwd=repo,
    )  # fmt: skip
    assert done.returncode == 1
    # The run's failed result, and the failed template's error event before it (on stderr:
    # --progress none still shows errors).
    assert "error: 2 template(s), 1 failed" in done.stderr and "[TemplatesFailed]" in done.stderr
    assert re.search(r"^\d\d:\d\d:\d\d ci +x kickstarts/beta.ks: ", done.stderr, re.M), done.stderr
    cases = {case.get("name"): case for case in ET.parse(junit).getroot().iter("testcase")}
    assert set(cases) == {"alpha", "beta"}
    assert cases["alpha"].find("failure") is None
    failure = cases["beta"].find("failure")
    assert failure is not None and "Traceback" in (failure.text or "")
    (image,) = store.glob("alpha/*/alpha.qcow2")
    manifest = json.loads((image.parent / "manifest.json").read_text())
    assert manifest["output"]["sha256"] == sha256(image)
    assert not list(store.glob("beta/**/*"))  # a failed build publishes nothing

    nothing = diskflow("ci", "build", "--since", "HEAD", "--junit", junit, cwd=repo)
    assert nothing.returncode == 0, nothing.stderr
    summary = result(nothing.stdout)  # JSON lines: not a terminal
    assert summary["message"].startswith("0 template(s), 0 failed")
    assert (summary["ok"], summary["templates"], summary["failed"]) == (True, 0, 0)


def test_ci_changed_with_a_bad_ref_is_a_clear_error(repo: Path) -> None:
    done = diskflow("ci", "changed", "--since", "no-such-ref", cwd=repo)
    assert done.returncode == 1
    assert "no-such-ref" in done.stderr and "[InvalidArgument]" in done.stderr


def test_publish_a_finished_build_to_a_served_directory(
    minimal_installer: Installer, vm_dir: Path, tmp_path: Path
) -> None:
    kickstart = write_template(tmp_path, minimal_installer, "later")
    built = diskflow("build", kickstart, "--output", tmp_path / "out", "--accel", "tcg",
                     "--network", "none", "--workdir", vm_dir, "--progress", "none")  # fmt: skip
    assert built.returncode == 0, built.stderr
    store = tmp_path / "store"
    store.mkdir()
    done = diskflow("publish", tmp_path / "out/later", "--publish-to", store, "--public-url",
                    "https://images.example/golden", "--progress", "json", "--secret-ref",
                    "image-store", "--volume-mode", "Block")  # fmt: skip
    assert done.returncode == 0, done.stderr
    (image,) = store.glob("later/*/later.qcow2")
    assert result(done.stdout)["sha256"] == sha256(image)
    datavolume = yaml.safe_load((tmp_path / "out/later/datavolume.yaml").read_text())
    build_id = image.parent.name
    assert datavolume["spec"]["source"]["http"] == {
        "url": f"https://images.example/golden/later/{build_id}/later.qcow2",
        "checksum": f"sha256:{sha256(image)}",
        "secretRef": "image-store",
    }
    assert datavolume["spec"]["storage"]["volumeMode"] == "Block"
    local = json.loads((tmp_path / "out/later/manifest.json").read_text())
    assert local["published"]["image"]["sha256"] == sha256(image)


def test_publish_refuses_a_directory_that_is_not_a_build(tmp_path: Path) -> None:
    done = diskflow("publish", tmp_path, "--publish-to", tmp_path)
    assert done.returncode == 1
    assert "holds no manifest.json" in done.stderr and "[InvalidArgument]" in done.stderr
    (tmp_path / "manifest.json").write_text('{"output": {"file": "x.qcow2"}}')
    done = diskflow("publish", tmp_path, "--publish-to", tmp_path)
    assert done.returncode == 1 and "[InvalidManifest]" in done.stderr
    assert "manifest.json: schema is missing" in done.stderr  # the field that is wrong
    (tmp_path / "manifest.json").write_text(json.dumps(STORED | {"output": None}))
    done = diskflow("publish", tmp_path, "--publish-to", tmp_path)
    assert done.returncode == 1 and "[InvalidManifest]" in done.stderr
    assert "is not a finished build's manifest: no output" in done.stderr


def test_store_url_with_credentials_is_refused_without_echoing_them(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps(STORED))
    done = diskflow("publish", tmp_path, "--publish-to", "https://ci:s3cr3t@store.example/x")
    assert done.returncode == 1
    assert "must not carry credentials" in done.stderr and "[InvalidArgument]" in done.stderr
    assert "s3cr3t" not in done.stdout + done.stderr


def test_ci_build_stopped_by_sigterm_still_writes_its_report(
    repo: Path, minimal_installer: Installer, vm_dir: Path, tmp_path: Path
) -> None:
    base = git(repo, "rev-parse", "HEAD")
    write_template(repo / "kickstarts", minimal_installer, "alpha", post="sleep 100000")
    write_template(repo / "kickstarts", minimal_installer, "beta", post="echo never built")
    commit(repo)
    junit = tmp_path / "report.xml"
    build = subprocess.Popen(
        [sys.executable, "-m", "diskflow", "ci", "build", "--since", base, "--junit", str(junit),
         "--accel", "tcg", "--network", "none", "--workdir", str(vm_dir), "--progress", "none"],
        cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    end = time.monotonic() + 120
    while not [d for d in domains() if d.startswith("diskflow-alpha-")]:
        assert build.poll() is None and time.monotonic() < end, build.communicate()
        time.sleep(0.2)
    build.send_signal(signal.SIGTERM)
    _, err = build.communicate(timeout=60)
    assert build.returncode == 75, err
    cases = {case.get("name"): case for case in ET.parse(junit).getroot().iter("testcase")}
    assert set(cases) == {"alpha"}  # beta was not started
    failure = cases["alpha"].find("failure")
    assert failure is not None and "[Terminated]" in (failure.text or "")
    assert not [d for d in domains() if d.startswith("diskflow-alpha-")]


def domains() -> list[str]:
    return run("virsh", "-c", "qemu:///system", "list", "--all", "--name").split()
