"""The build manifest's typed model: the JSON each step's manifest has, read back exactly, and
errors that name the field; manifests the dict-assembling steps wrote still read."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from importer.errors import FinalError
from pipelines.accel import Accel
from pipelines.finalize import QcowCompression
from pipelines.manifest import (
    SCHEMA,
    AccelRecord,
    BootTestRecord,
    BuildManifest,
    ImportSource,
    Inputs,
    KickstartRecord,
    MediaFile,
    OutputRecord,
    PublishedImage,
    PublishedRecord,
    Settings,
    TreeRecord,
)
from pipelines.publish import Published
from pipelines.steps import BuildRequest, BuildState
from pipelines.template import InstallSource, Template
from tests.pipelines.manifests import STORED

VALIDATED = BuildManifest(
    template="alma9",
    build_id="0123456789abcdef0123",
    kickstart=KickstartRecord("alma9.ks", "RHEL9", "ab" * 32),
    inputs=Inputs(location=TreeRecord("https://mirror.example/alma/9/os/", None)),
    settings=Settings("almalinux9", 20 << 30, 2 << 30, 2),
    tools={"diskflow": "0.1.0", "virt-install": "4.1.0"},
    durations={"validate": 0.25},
)
INSTALLED = replace(
    VALIDATED,
    accel=AccelRecord(Accel.TCG, "TCG (software emulation) was asked for with --accel tcg"),
    builder="builder-1",
    built_at="2026-12-02T10:00:00+00:00",
).timed("install", 300.5)
FINALIZED = replace(
    INSTALLED,
    output=OutputRecord("alma9.qcow2", "qcow2", QcowCompression.ZLIB, False, 5 << 20, 20 << 30,
                        "cd" * 32),
).timed("finalize", 12.0)  # fmt: skip
BOOT_TESTED = replace(FINALIZED, boot_test=BootTestRecord(tested=False)).timed("boot_test", 0.0)
PUBLISHED = replace(
    BOOT_TESTED,
    published=PublishedRecord(
        template="alma9",
        build_id="0123456789abcdef0123",
        image=PublishedImage("file:///srv/alma9/0123456789abcdef0123/alma9.qcow2", "cd" * 32,
                             5 << 20),
        checksum_url="file:///srv/alma9/0123456789abcdef0123/alma9.qcow2.sha256",
        manifest_url="file:///srv/alma9/0123456789abcdef0123/manifest.json",
        source=None,
        published_at="2026-12-02T10:06:00Z",
    ),
)  # fmt: skip
VALIDATE_KEYS = {"schema", "template", "build_id", "kickstart", "inputs", "settings", "tools",
                 "durations"}  # fmt: skip


def test_a_manifest_written_before_the_model_reads_and_writes_back_the_same() -> None:
    manifest = BuildManifest.from_json(STORED)
    assert manifest.to_json() == STORED
    assert manifest.accel == AccelRecord(Accel.KVM, STORED["accel"]["reason"])
    assert manifest.inputs.kernel == MediaFile("vmlinuz", STORED["inputs"]["kernel"]["sha256"])
    assert manifest.finished().compression is QcowCompression.ZSTD
    assert manifest.boot_test is not None and manifest.boot_test.accel is Accel.KVM
    assert manifest.published is not None
    assert manifest.published.source == ImportSource("s3", STORED["published"]["source"]["url"])
    # As manifest.json and the stores hold it: through JSON text and back.
    assert BuildManifest.parse(json.dumps(STORED), "manifest.json") == manifest


def test_each_step_adds_its_part_and_nothing_else() -> None:
    shapes = {
        "validate": (VALIDATED, VALIDATE_KEYS),
        "install": (INSTALLED, VALIDATE_KEYS | {"accel", "builder", "built_at"}),
        "finalize": (FINALIZED, VALIDATE_KEYS | {"accel", "builder", "built_at", "output"}),
        "boot_test": (BOOT_TESTED, set(STORED) - {"published"}),
        "publish": (PUBLISHED, set(STORED)),
    }
    for step, (manifest, keys) in shapes.items():
        data = manifest.to_json()
        assert set(data) == keys, step
        # A queued build's manifest crosses Celery as JSON after every step.
        assert BuildManifest.from_json(json.loads(json.dumps(data))) == manifest, step
    assert VALIDATED.to_json()["schema"] == SCHEMA
    assert VALIDATED.to_json()["inputs"] == {
        "location": {"url": "https://mirror.example/alma/9/os/", "treeinfo_sha256": None}
    }  # a tree without .treeinfo says so; media it does not have are absent
    assert BOOT_TESTED.to_json()["durations"] == {
        "validate": 0.25, "install": 300.5, "finalize": 12.0, "boot_test": 0.0,
    }  # fmt: skip
    data = PUBLISHED.to_json()
    assert data["boot_test"] == {"tested": False}
    assert data["accel"]["used"] == "tcg" and data["output"]["compression"] == "zlib"
    assert data["published"]["source"] is None  # a directory nothing serves


def test_the_build_state_carries_the_manifest_through_json() -> None:
    template = Template(
        name="alma9",
        kickstart=Path("alma9.ks"),
        metadata=Path("alma9.toml"),
        version="RHEL9",
        os_variant="almalinux9",
        disk_size=20 << 30,
        memory=2 << 30,
        vcpus=2,
        install=InstallSource(location="https://mirror.example/alma/9/os/"),
    )
    state = BuildState(BuildRequest("alma9.ks"), template, "text\n", "0123", INSTALLED)
    carried = BuildState.from_json(json.loads(json.dumps(state.to_json())))
    assert carried == state
    assert carried.manifest.accel is not None and carried.manifest.accel.used is Accel.TCG


def changed(path: str, value: Any) -> dict[str, Any]:
    """STORED with the value at a dotted path replaced (or the key removed, for `...`)."""
    data = copy.deepcopy(STORED)
    *parents, key = path.split(".")
    table = data
    for name in parents:
        table = table[name]
    if value is ...:
        del table[key]
    else:
        table[key] = value
    return data


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("schema", "diskflow.io/template-build/v2",
         "schema is 'diskflow.io/template-build/v2', not 'diskflow.io/template-build/v1'"),
        ("template", ..., "template is missing"),
        ("schema", ..., "schema is missing"),
        ("build_id", "", "build_id is empty"),
        ("kickstart", "centos9.ks", "kickstart is a string, not an object"),
        ("inputs.kernel.sha256", None, "inputs.kernel.sha256 is null, not a string"),
        ("settings.vcpus", "2", "settings.vcpus is a string, not an integer"),
        ("tools.virsh", 9, "tools.virsh is an integer, not a string"),
        ("durations.install", "613s", "durations.install is a string, not a number"),
        ("accel.used", "hvf", "accel.used is 'hvf', not one of 'auto', 'kvm', 'tcg'"),
        ("output.sha256", ..., "output.sha256 is missing"),
        ("output.file", "", "output.file is empty"),
        ("output.size", True, "output.size is true or false, not an integer"),
        ("output.sealed", 1, "output.sealed is an integer, not true or false"),
        ("output.compression", "xz", "output.compression is 'xz', not one of 'zstd', 'zlib'"),
        ("boot_test.boot", "uefi", "boot_test.boot is 'uefi', not one of 'kernel', 'bootloader'"),
        ("published.image", [], "published.image is a list, not an object"),
        ("published.source.kind", "ftp", "published.source.kind is 'ftp', not one of 'http', 's3'"),
    ],
)  # fmt: skip
def test_a_field_that_does_not_fit_is_named(path: str, value: Any, message: str) -> None:
    with pytest.raises(FinalError) as caught:
        BuildManifest.from_json(changed(path, value), "s3://golden/centos9/b1/manifest.json")
    assert caught.value.reason == "InvalidManifest"
    assert caught.value.message == f"s3://golden/centos9/b1/manifest.json: {message}"


def test_what_is_not_a_manifest_is_refused() -> None:
    for text, message in [
        ("{", "m.json is not JSON: "),
        (b"\xff", "m.json is not JSON: "),
        ("[]", "m.json is not a JSON object"),
    ]:
        with pytest.raises(FinalError) as caught:
            BuildManifest.parse(text, "m.json")
        assert caught.value.reason == "InvalidManifest"
        assert caught.value.message.startswith(message)


def test_only_a_finished_build_has_an_image_to_publish() -> None:
    with pytest.raises(FinalError) as caught:
        INSTALLED.finished("out/alma9/manifest.json")
    assert caught.value.reason == "InvalidManifest"
    assert caught.value.message == (
        "out/alma9/manifest.json is not a finished build's manifest: no output"
    )
    assert FINALIZED.finished() == FINALIZED.output
    with pytest.raises(FinalError) as caught:
        Published.from_manifest(FINALIZED)
    assert caught.value.reason == "InvalidManifest" and "'published'" in caught.value.message


def test_a_published_manifest_from_before_boot_tests_still_reads() -> None:
    # Published before the boot test existed, by a diskflow that wrote a key since dropped.
    data = changed("boot_test", ...) | {"comment": "a key this diskflow does not know"}
    manifest = BuildManifest.from_json(data)
    assert manifest.boot_test is None
    published = Published.from_manifest(manifest)
    assert (published.size, published.virtual_size) == (912261120, 21474836480)
    assert published.source == ImportSource("s3", STORED["published"]["source"]["url"])
