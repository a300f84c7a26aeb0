"""The template half of the embedded default: the whole product's flow on one machine.

Builds a tiny template with the tiny installer (Debian's cloud kernel and busybox: no
distribution mirror), boot-tests it, publishes it to a directory served over HTTP on
loopback, writes its DataVolume, and imports the image back with `diskflow import`, as the
DataVolume's importer pod would: the URL, checksum and size all come from that DataVolume.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from diskflow.demo import serving
from importer.api import DataVolume, HttpSource
from importer.errors import FinalError
from pipelines.accel import Accel
from pipelines.events import Emit, discard
from pipelines.steps import BuildRequest, PublishOptions, build_template
from pipelines.tiny_installer import build_installer, write_template
from pipelines.virtinstall import BuildOptions

NAME = "demo"
POST = 'echo "hello from the demo template\'s %post"'


@dataclass(frozen=True)
class TemplateDemo:
    """What the demo made, all under its directory."""

    image: Path  # the built template (qcow2)
    manifest: dict[str, Any]  # its manifest.json, as published
    datavolume: Path
    disk: Path  # the template imported back (raw)
    import_command: list[str]


def run_template_demo(
    directory: Path, accel: Accel = Accel.AUTO, emit: Emit = discard, progress: str = "none"
) -> TemplateDemo:
    """Build, boot-test, publish and import back a tiny template, all inside `directory`.

    `progress` is passed to `diskflow import` (its events go to this process's stderr).
    """
    directory = directory.resolve()
    store = directory / "store"
    store.mkdir(parents=True, exist_ok=True)
    emit("demo", "info", "building the tiny installer (Debian's cloud kernel and busybox)")
    installer = build_installer(directory / "installer")
    (directory / "kickstarts").mkdir(exist_ok=True)
    kickstart = write_template(directory / "kickstarts", installer, NAME, post=POST)
    with serving(store) as base_url:
        request = BuildRequest(
            kickstart=str(kickstart),
            output=str(directory / "build"),
            publish_to=str(store),
            force=True,  # a demo run again builds again
            build=BuildOptions(
                accel=accel, network="none", timeout=900, boot_timeout=900, no_output_timeout=300
            ),
            publish=PublishOptions(public_url=base_url),
        )
        state = build_template(request, emit)
        datavolume = Path(state.output_dir) / "datavolume.yaml"
        if not datavolume.is_file():
            raise FinalError("InternalError", f"the build wrote no DataVolume at {datavolume}")
        dv = DataVolume.from_manifest(yaml.safe_load(datavolume.read_text()))
        source = dv.spec.source
        if not isinstance(source, HttpSource) or not source.checksum:
            raise FinalError("InternalError", f"{datavolume} has no http source with a checksum")
        disk = directory / "disk.img"
        # The volume a cluster would provision for it, as its importer pod would be told.
        size = str(dv.spec.storage.pvc_size())
        arguments = [source.url, str(disk), "--checksum", source.checksum, "--size", size]
        command = [sys.executable, "-m", "diskflow", "import", *arguments, "--progress", progress]
        emit("demo", "info", "importing it back as its DataVolume says: diskflow import "
             + " ".join(arguments))  # fmt: skip
        imported = subprocess.run(command, stdout=sys.stderr)
        if imported.returncode != 0:
            raise FinalError(
                "ImportFailed", f"diskflow import exited with {imported.returncode} (see above)"
            )
    # What the importer wrote must be the template's disk, byte for byte.
    compared = subprocess.run(
        ["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", str(state.image), str(disk)]
    )
    if compared.returncode != 0:
        raise FinalError("InternalError", f"{disk} differs from the template {state.image}")
    return TemplateDemo(
        Path(state.image or ""), state.manifest.to_json(), datavolume, disk, command
    )
