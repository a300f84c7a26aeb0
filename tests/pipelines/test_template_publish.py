"""Kickstart → qcow2 → published → DataVolume → imported again, end to end with real servers:
virt-install + libvirtd + QEMU (TCG), moto's S3 server, nginx as a WebDAV store, and
diskflow's own importer reading the URL the DataVolume names.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.register_assert_rewrite("tests.support.installer")
pytest_plugins = ["tests.support.installer", "tests.support.stores"]

from importer import Checksum, ImportOptions, S3Options, import_image  # noqa: E402
from pipelines.accel import Accel  # noqa: E402
from pipelines.manifest import TreeRecord  # noqa: E402
from pipelines.steps import (  # noqa: E402
    BuildRequest,
    PublishOptions,
    build_template,
    validate_step,
)
from pipelines.virtinstall import BuildOptions  # noqa: E402
from tests.conftest import MiB, sha256  # noqa: E402
from tests.pipelines.test_template_build import Recorder  # noqa: E402
from tests.support.events import events  # noqa: E402
from tests.support.installer import Installer, expected_marker, write_template, write_tree  # noqa: E402
from tests.support.stores import BUCKET, Dav, s3_client  # noqa: E402

FAST = BuildOptions(accel=Accel.TCG, network="none", timeout=180, no_output_timeout=60)


def request(kickstart: Path, tmp_path: Path, vm_dir: Path, **fields: Any) -> BuildRequest:
    return BuildRequest(
        kickstart=str(kickstart), output=str(tmp_path / "out"), workdir=str(vm_dir), build=FAST,
        **fields,
    )  # fmt: skip


def assert_imports_to_the_installed_disk(
    datavolume: dict[str, Any], kickstart: Path, tmp_path: Path, **options: Any
) -> None:
    """What the DataVolume names, imported by diskflow's importer, is the installed disk."""
    kind, source = next(iter(datavolume["spec"]["source"].items()))
    disk = tmp_path / f"imported-{kind}.img"
    checksum = Checksum.parse(source["checksum"])
    import_image(source["url"], str(disk), options=ImportOptions(checksum=checksum, **options))
    marker = expected_marker(kickstart)
    with open(disk, "rb") as f:
        assert f.read(len(marker)) == marker
    assert disk.stat().st_size == 64 * MiB


def test_build_published_to_s3_with_a_datavolume_then_skipped_until_forced(
    minimal_installer: Installer, vm_dir: Path, tmp_path: Path, moto_s3: str
) -> None:
    kickstart = write_template(tmp_path, minimal_installer, "s3golden")
    prefix = f"templates-{uuid.uuid4().hex[:8]}"
    publish = PublishOptions(s3=S3Options(endpoint=moto_s3), namespace="golden-images")
    job = request(
        kickstart, tmp_path, vm_dir, publish_to=f"s3://{BUCKET}/{prefix}", publish=publish
    )
    state = build_template(job)

    key = f"{prefix}/s3golden/{state.build_id}"
    objects = s3_client(moto_s3).list_objects_v2(Bucket=BUCKET, Prefix=key)["Contents"]
    assert sorted(o["Key"].rsplit("/", 1)[1] for o in objects) == [
        "manifest.json", "s3golden.qcow2", "s3golden.qcow2.sha256",
    ]  # fmt: skip
    body = s3_client(moto_s3).get_object(Bucket=BUCKET, Key=f"{key}/s3golden.qcow2")["Body"]
    assert body.read() == Path(state.image or "").read_bytes()
    stored = json.loads(
        s3_client(moto_s3).get_object(Bucket=BUCKET, Key=f"{key}/manifest.json")["Body"].read()
    )
    assert stored["published"]["image"]["sha256"] == stored["output"]["sha256"]
    assert stored == json.loads((tmp_path / "out/s3golden/manifest.json").read_text())

    datavolume = yaml.safe_load((tmp_path / "out/s3golden/datavolume.yaml").read_text())
    assert datavolume["apiVersion"] == "diskflow.io/v1beta1"
    assert datavolume["metadata"]["namespace"] == "golden-images"
    assert datavolume["spec"]["source"]["s3"] == {
        "url": f"{moto_s3}/{BUCKET}/{key}/s3golden.qcow2",
        "checksum": f"sha256:{stored['output']['sha256']}",
    }
    assert datavolume["spec"]["storage"]["resources"]["requests"]["storage"] == "64Mi"
    assert_imports_to_the_installed_disk(
        datavolume, kickstart, tmp_path, s3=S3Options(endpoint=moto_s3, cdi_url=True)
    )

    # The same kickstart, media and tools again: nothing boots, the published build stands.
    recorder = Recorder()
    again = build_template(job, recorder)
    assert again.skipped and again.build_id == state.build_id
    assert "install" not in recorder.stages()
    assert again.manifest.to_json() == stored
    forced = build_template(request(kickstart, tmp_path, vm_dir, publish_to=job.publish_to,
                                    publish=publish, force=True), recorder)  # fmt: skip
    assert not forced.skipped and "install" in recorder.stages()
    # The rebuild has a key of its own; the published build it replaces stays intact.
    assert forced.build_id.startswith(f"{state.build_id}.")
    for build_id in (state.build_id, forced.build_id):
        key = f"{prefix}/s3golden/{build_id}/manifest.json"
        stored = json.loads(s3_client(moto_s3).get_object(Bucket=BUCKET, Key=key)["Body"].read())
        assert stored["build_id"] == build_id


def test_build_published_to_webdav_with_the_cli(
    minimal_installer: Installer, vm_dir: Path, tmp_path: Path, webdav: Dav
) -> None:
    kickstart = write_template(tmp_path, minimal_installer, "davgolden")
    base = f"{webdav.base}/dav/{uuid.uuid4().hex[:8]}"
    done = subprocess.run(
        [sys.executable, "-m", "diskflow", "build", str(kickstart), "--publish-to", base,
         "--output", str(tmp_path / "out"), "--workdir", str(vm_dir), "--accel", "tcg",
         "--network", "none", "--progress", "json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    said = events(done.stdout)
    result = said[-1]
    build_id = result["build_id"]
    assert any(e["stage"] == "publish" and e["type"] == "done" for e in said)

    # Image and checksum before the manifest, the manifest before latest.json.
    uri = base.removeprefix(webdav.base)
    puts = [u.rsplit("/", 1)[1] for m, u, s in webdav.requests(uri, count=8) if m == "PUT"]
    assert puts == ["davgolden.qcow2", "davgolden.qcow2.sha256", "manifest.json", "latest.json"]
    served = webdav.root / uri.lstrip("/") / "davgolden" / build_id
    assert sha256(served / "davgolden.qcow2") == result["manifest"]["output"]["sha256"]

    datavolume = yaml.safe_load((tmp_path / "out/davgolden/datavolume.yaml").read_text())
    assert datavolume["spec"]["source"]["http"]["url"] == (
        f"{base}/davgolden/{build_id}/davgolden.qcow2"
    )
    assert_imports_to_the_installed_disk(datavolume, kickstart, tmp_path)


def test_build_from_an_install_tree_served_over_http(
    minimal_installer: Installer, vm_dir: Path, tmp_path: Path, webdav: Dav
) -> None:
    # What the shipped templates do: virt-install --location fetches the tree's kernel and
    # initrd over HTTP (here from nginx) and the kickstart is injected into that initrd.
    folder = f"tree-{uuid.uuid4().hex[:8]}"
    treeinfo = write_tree(webdav.root / "readonly" / folder, minimal_installer)
    location = f"{webdav.base}/readonly/{folder}/"
    kickstart = write_template(tmp_path, minimal_installer, "fromtree", location=location)
    state = build_template(request(kickstart, tmp_path, vm_dir))

    raw = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", state.image or "", raw], check=True)
    marker = expected_marker(kickstart)
    with open(raw, "rb") as f:
        assert f.read(len(marker)) == marker
    assert state.manifest.inputs.location == TreeRecord(location, sha256(treeinfo))
    # A new compose (another .treeinfo) is another build.
    treeinfo.write_text(treeinfo.read_text() + "\n[checksums]\n")
    assert validate_step(request(kickstart, tmp_path, vm_dir)).build_id != state.build_id
