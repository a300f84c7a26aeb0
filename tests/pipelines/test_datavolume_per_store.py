"""A build published again, to another store: its datavolume.yaml follows the last publish, or
is gone when no DataVolume can be written for it, never left naming the store before."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import uuid
from pathlib import Path

import pytest
import requests
import yaml

from tests.pipelines.manifests import finished
from tests.support.commands import diskflow
from tests.support.stores import Dav, Image

pytest_plugins = ["tests.support.stores"]

TEMPLATE = "centos9"


@pytest.fixture
def build(qcow2: Image, tmp_path: Path) -> Path:
    """A finished build of TEMPLATE, as `diskflow build` leaves it: OUTPUT/NAME/ holding the
    image and its manifest."""
    directory = tmp_path / "out" / TEMPLATE
    directory.mkdir(parents=True)
    manifest = finished(TEMPLATE, uuid.uuid4().hex, qcow2.virtual_size)
    output = dataclasses.replace(manifest.finished(), sha256=qcow2.sha256)
    manifest = dataclasses.replace(manifest, output=output)
    (directory / output.file).write_bytes(qcow2.path.read_bytes())
    (directory / "manifest.json").write_text(json.dumps(manifest.to_json()))
    return directory


def publish(build: Path, store: Path, *options: str) -> list[dict]:
    """`diskflow publish` of BUILD to the directory STORE; its JSON events."""
    done = diskflow("publish", build, "--publish-to", store, "--progress", "json", *options)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def served_store(webdav: Dav) -> tuple[Path, str]:
    """A new directory nginx serves, and its URL."""
    name = uuid.uuid4().hex[:12]
    (webdav.root / "local" / name).mkdir()
    return webdav.root / "local" / name, f"{webdav.base}/local/{name}"


def datavolume_url(build: Path) -> str:
    manifest = yaml.safe_load((build / "datavolume.yaml").read_text())
    return manifest["spec"]["source"]["http"]["url"]


def test_the_datavolume_names_the_store_of_the_last_publish_or_is_gone(
    build: Path, qcow2: Image, webdav: Dav, tmp_path: Path
) -> None:
    for _ in range(2):  # the first store, then another: each publish's DataVolume names its own
        store, url = served_store(webdav)
        publish(build, store, "--public-url", url)
        fetched = datavolume_url(build)
        assert fetched.startswith(f"{url}/{TEMPLATE}/")
        response = requests.get(fetched, timeout=10)
        assert response.ok and hashlib.sha256(response.content).hexdigest() == qcow2.sha256

    # A directory no cluster can fetch from: no DataVolume, and none left from before.
    (tmp_path / "unserved").mkdir()
    events = publish(build, tmp_path / "unserved")
    assert not (build / "datavolume.yaml").exists()
    (warning,) = [e for e in events if "no DataVolume manifest" in e.get("message", "")]
    assert f"removed {build / 'datavolume.yaml'}, which an earlier publish" in warning["message"]
    # The manifest says where the build was published last.
    manifest = json.loads((build / "manifest.json").read_text())
    assert manifest["published"]["image"]["url"].startswith((tmp_path / "unserved").as_uri())
